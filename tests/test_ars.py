"""ARS V2-t, the paper's baseline, as a second learner on the same runtime: its update
against a hand computation, results in any order, exact checkpoints, and end to end on a
real local Ray (learning, exact resume, a killed worker)."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from gogepo_ray import checkpoint as ckpt
from gogepo_ray.algorithms import make_learner, takes_commands
from gogepo_ray.algorithms.ars.learner import (
    ArsLearner,
    ars_step,
    directions,
    initial_policy_params,
)
from gogepo_ray.config import ConfigError, load_config
from gogepo_ray.envs import policy_spec
from gogepo_ray.trainer import Trainer, resume_trainer
from tests.conftest import ROOT, assert_same_state, make_batch, train_to_end

ARS_IP = str(ROOT / "configs" / "ars_inverted_pendulum.yaml")


def ars_cfg(*extra: str):
    return load_config(
        None,
        [
            "algorithm=ars",
            "env.id=tests.fault_envs:PointEnv",
            "env.return_min=-100",
            "env.return_max=0",
            "policy.hidden=[]",
            "ars.directions=3",
            "ars.top_directions=2",
            "tracking.enabled=false",
            *extra,
        ],
    )


# ---------------------------------------------------------------------------- unit tier
def test_ars_step_is_the_papers_update_by_hand():
    deltas = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    returns = np.array([[5.0, 1.0], [2.0, 3.0], [0.0, 9.0]])  # max: 5, 3, 9
    change, figures = ars_step(deltas, returns, top=2, step_size=0.1)
    # top 2 by max(r+, r−): directions 2 (9) and 0 (5); σ_R = std of {0, 9, 5, 1}
    sigma = np.std([0.0, 9.0, 5.0, 1.0])
    expected = 0.1 / (2 * sigma) * ((0.0 - 9.0) * deltas[2] + (5.0 - 1.0) * deltas[0])
    np.testing.assert_allclose(change, expected)
    assert figures["ars/directions_used"] == 2 and figures["ars/return_std"] == pytest.approx(sigma)


def test_ars_step_leaves_out_directions_with_a_failed_episode():
    deltas = np.eye(3)
    returns = np.array([[np.nan, 1.0], [2.0, 3.0], [4.0, 0.0]])
    change, figures = ars_step(deltas, returns, top=3, step_size=1.0)
    sigma = np.std([2.0, 3.0, 4.0, 0.0])
    np.testing.assert_allclose(change, [0.0, (2.0 - 3.0) / (2 * sigma), 4.0 / (2 * sigma)])
    assert figures["ars/directions_used"] == 2
    none, figures = ars_step(deltas, np.full((3, 2), np.nan), top=2, step_size=1.0)
    assert not none.any() and figures["ars/directions_used"] == 0
    same, _ = ars_step(deltas, np.ones((3, 2)), top=2, step_size=1.0)  # σ_R = 0: no step
    assert not same.any()


def test_proposals_are_theta_plus_and_minus_noise_times_each_direction():
    cfg = ars_cfg("ars.noise=0.5")
    spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
    learner = ArsLearner(cfg, spec)
    assert not learner.policy_params.any()  # linear: θ_0 = 0, as in the ARS paper
    a, b, c = learner.propose(4), learner.propose(4), learner.propose(4)
    assert len(a.episode_ids) == 4 and len(b.episode_ids) == 2 and len(c.episode_ids) == 0
    assert c.policy_params.shape == (0, spec.num_params)
    params = np.concatenate([a.policy_params, b.policy_params])
    deltas = directions(cfg.run.seed, 0, 3, spec.num_params)
    expected = np.stack([s * 0.5 * deltas[j] for j in range(3) for s in (1.0, -1.0)])
    np.testing.assert_allclose(params, expected, rtol=1e-6)
    assert np.isnan(a.commands).all()  # ARS policies take no command
    assert not a.follow_stats and not b.follow_stats  # fixed statistics within an iteration
    ev = learner.propose_eval([100.0, 200.0], episodes=2)  # commands are ignored
    assert len(ev.episode_ids) == 4 and not ev.policy_params.any()
    assert not takes_commands(cfg) and isinstance(make_learner(cfg, spec), ArsLearner)


def test_an_iteration_steps_once_all_its_results_are_in_whatever_their_order():
    cfg = ars_cfg()
    spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
    rng = np.random.default_rng(0)
    returns = rng.normal(size=6)
    obs = rng.normal(size=(6, 5, spec.obs_dim))
    finals = []
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 0, 4, 1, 2]):
        learner = ArsLearner(cfg, spec)
        batches = [learner.propose(1) for _ in range(6)]
        for k, i in enumerate(order):
            stats = learner.step([make_batch(batches[i], [returns[i]], obs=obs[i])], [])[-1]
            if k < 5:  # θ and the statistics policies see wait for the whole iteration
                assert stats.rounds == 0 and not learner.policy_params.any()
                assert learner.obs_stats.count == 0
        assert stats.rounds == 1 and learner.iteration == 1 and learner.issued == 0
        assert learner.obs_stats.count == 30
        np.testing.assert_allclose(learner.obs_stats.mean, obs.reshape(30, -1).mean(0))
        deltas = directions(cfg.run.seed, 0, 3, spec.num_params)
        change, _ = ars_step(deltas, returns.reshape(3, 2), top=2, step_size=cfg.ars.step_size)
        np.testing.assert_allclose(learner.policy_params, change)  # survival_offset 0
        assert stats.episodes == 6 and stats.env_steps == 60
        assert stats.metrics["ars/directions_used"] == 2
        finals.append(learner.policy_params)
        with pytest.raises(ValueError, match="iteration 0"):  # an episode of a past iteration
            learner.take_in(make_batch(batches[0], [1.0]))
    np.testing.assert_array_equal(*finals)


def test_ars_state_round_trips_mid_iteration_to_the_same_future():
    cfg = ars_cfg("env.survival_offset=-1")
    spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
    a = ArsLearner(cfg, spec)
    rng = np.random.default_rng(1)
    for _ in range(7):  # one whole iteration and one episode into the next
        batch = a.propose(1)
        a.take_in(make_batch(batch, rng.normal(size=1), obs=rng.normal(size=(3, spec.obs_dim))))
        a.update()
    out = a.propose(2)
    a.take_in(make_batch(out, [1.0, 2.0], failures=[None, "env step raised"]))
    state = a.state_dict()
    b = ArsLearner(cfg, spec)
    b.load_state_dict(state)
    assert_same_state(state, b.state_dict())
    assert b.iteration == 1 and b.issued == 3 and b.failed_episodes == 1
    for learner in (a, b):  # the same remaining proposals, results and step
        rest = learner.propose(5)
        assert len(rest.episode_ids) == 3
        learner.step([make_batch(rest, [3.0, 4.0, 5.0])], [])
    assert a.iteration == b.iteration == 2
    np.testing.assert_array_equal(a.policy_params, b.policy_params)
    assert_same_state(a.state_dict(), b.state_dict(), skip={"counters.learner_seconds"})
    gogepo = load_config(None, ["env.id=tests.fault_envs:PointEnv", "policy.hidden=[4]"])
    with pytest.raises(ValueError, match="not an ARS learner state"):
        b.load_state_dict(make_learner(gogepo, spec).state_dict())


def test_fixed_statistics_training_episodes_act_as_the_master_statistics_say():
    """follow_stats=False: a training episode normalises with the batch's statistics as they
    are (like an evaluation), and still sends its steps back as the statistics delta."""
    from gogepo_ray.rollout import Rollouts

    cfg = load_config(None, ["algorithm=ars", "env.id=Hopper-v5", "policy.hidden=[]"])
    spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(50, spec.obs_dim))
    learner = ArsLearner(cfg, spec)
    learner.obs_stats.update(obs)
    train = learner.propose(4)._replace(policy_params=rng.normal(size=(4, spec.num_params)) * 0.3)
    rollouts = Rollouts(cfg.env.id, spec)
    fixed = rollouts.run(train)
    as_eval = rollouts.run(train._replace(kind="eval"))
    followed = rollouts.run(train._replace(follow_stats=True))
    np.testing.assert_array_equal(fixed.returns, as_eval.returns)
    assert not np.array_equal(fixed.returns, followed.returns)
    assert fixed.obs_count == int(fixed.lengths.sum()) > 0
    assert followed.obs_count == int(followed.lengths.sum())


def test_an_mlp_policy_option_starts_acting_zero_with_distinct_hidden_units():
    cfg = ars_cfg("policy.hidden=[8]")
    spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
    theta = initial_policy_params(spec, seed=0)
    (w1, b1), (w2, b2) = spec.split(torch.from_numpy(theta[None]))
    assert w1.std() > 0.1 and not b1.any() and not w2.any() and not b2.any()
    assert len(ArsLearner(cfg, spec).propose(6).episode_ids) == 6


def test_ars_config_rejects_more_top_directions_than_directions():
    with pytest.raises(ConfigError, match="ars: .*top_directions \\(5\\) must be at most"):
        ars_cfg("ars.top_directions=5")
    with pytest.raises(ConfigError, match="algorithm"):
        load_config(None, ["algorithm=es"])


# ---------------------------------------------------------------------------- on Ray
@pytest.mark.e2e
def test_ars_learns_inverted_pendulum_on_a_real_local_ray(ray_session, tmp_path):
    cfg = load_config(
        ARS_IP,
        [
            "run.total_env_steps=12000",
            "env.max_episode_steps=200",
            "run.eval_every=2000",
            f"run.output_dir={tmp_path}",
            "tracking.enabled=false",
        ],
    )
    summary, trainer = train_to_end(cfg)
    evals = [m for _, m in summary["eval_history"]]
    # θ_0 = 0 holds the pole for about 25 steps; ARS balances it for the whole 200 within
    # about 8k steps (seeds 0-2); a policy that learned nothing stays near 25.
    assert evals[0] < 100
    assert summary["final_eval_return"] >= 190, evals
    assert not (tmp_path / summary["run_dir"] / "sweep.csv").exists()  # no commands to sweep
    assert summary["failed_episodes"] == 0


def _ars_state(trainer: Trainer, steps: int) -> dict:
    trainer.run_until(steps)
    trainer._drain_inflight()
    return ray.get(trainer.learner.state_dict.remote())


@pytest.mark.e2e
def test_ars_resume_is_exact(ray_session, tmp_path):
    extra = ["run.workers=1", "run.eval_every=400", "run.checkpoint_every=100000"]
    cfg = ars_cfg(*extra, f"run.output_dir={tmp_path / 'a'}")
    trainer = Trainer(cfg)
    try:
        expected = _ars_state(trainer, 1600)
    finally:
        trainer.shutdown()
    cfg = ars_cfg(*extra, f"run.output_dir={tmp_path / 'b'}")
    first = Trainer(cfg)
    try:
        first.run_until(700)  # mid-iteration, with an episode out on the worker
        first.save_checkpoint()
        saved = first.state()
    finally:
        first.shutdown()
    assert saved["inflight"], "the checkpoint should hold the episode out on the worker"
    c = saved["learner"]["counters"]
    assert c["iteration"] > 0 and c["env_steps"] >= 700 - 40
    resumed = resume_trainer(first.run_dir)
    try:
        now = ray.get(resumed.learner.state_dict.remote())
        assert_same_state(saved["learner"], now)  # it continues, it does not start over
        assert resumed.progress.env_steps == saved["progress"]["env_steps"] > 0
        got = _ars_state(resumed, 1600)
    finally:
        resumed.shutdown()
    assert_same_state(expected, got, skip={"counters.learner_seconds"})


@pytest.mark.e2e
def test_a_killed_worker_loses_no_ars_episode(ray_session, tmp_path):
    cfg = ars_cfg(
        "run.workers=2",
        "run.total_env_steps=1600",
        "run.eval_every=100000",
        "env.kwargs={step_sleep: 0.01}",
        f"run.output_dir={tmp_path}",
    )
    trainer = Trainer(cfg)
    try:
        trainer.run_until(300)
        os.kill(ray.get(trainer.workers[0].pid.remote()), signal.SIGKILL)  # mid-episode
        trainer.run_until(cfg.run.total_env_steps)
        summary = trainer.finish()
        state = ray.get(trainer.learner.state_dict.remote())
    finally:
        trainer.shutdown()
    assert summary["worker_restarts"] >= 1
    c = state["counters"]
    received = int(state["received"].sum())
    # every episode handed out came back exactly once: 2N per finished iteration, plus
    # those of the iteration in progress (all of which are back after finish())
    assert c["issued"] == received
    assert c["episodes"] + c["failed_episodes"] == c["iteration"] * 2 * 3 + received
    assert c["episodes"] == summary["episodes"] and c["env_steps"] == summary["env_steps"]
    assert c["env_steps"] == 40 * c["episodes"]  # PointEnv episodes are 40 steps
    assert math.isfinite(summary["final_eval_return"])


@pytest.mark.e2e
def test_ars_as_an_rllib_algorithm_of_its_own_name(ray_session, tmp_path, monkeypatch):
    from ray.rllib.algorithms.algorithm import Algorithm
    from ray.tune.registry import get_trainable_cls

    from gogepo_ray.integrations.rllib import GoGePoARS, GoGePoARSConfig, GoGePoConfig

    monkeypatch.setattr(
        "ray.tune.trainable.trainable.DEFAULT_STORAGE_PATH", str(tmp_path / "ray_results")
    )
    assert get_trainable_cls("GoGePoARS") is GoGePoARS
    with pytest.raises(ConfigError, match="algorithm: .*'ars'.*GoGePoConfig builds 'gogepo'"):
        GoGePoConfig().environment("InvertedPendulum-v5").training(
            gogepo={"algorithm": "ars"}
        ).to_gogepo_config()
    config = (
        GoGePoARSConfig()
        .environment("InvertedPendulum-v5")
        .env_runners(num_env_runners=2)
        .training(
            gogepo={
                "policy": {"hidden": []},
                "ars": {"directions": 4, "top_directions": 2, "step_size": 0.02, "noise": 0.03},
                "env": {"max_episode_steps": 200},
                "run": {"eval_every": 1000, "eval_episodes": 2},
            },
            steps_per_iteration=1500,
        )
    )
    assert config.to_gogepo_config().algorithm == "ars"
    algo = config.build_algo()
    try:
        result = algo.train()
        assert result["num_env_steps_sampled_lifetime"] >= 1500
        assert "ars" in result and "policy_norm" in result["ars"], result.keys()
        path = Path(algo.save_to_path(tmp_path / "ckpt"))
        saved = algo.trainer.state()
    finally:
        algo.stop()
    assert saved["config"]["algorithm"] == "ars" and saved["learner"]["algorithm"] == "ars"
    restored = Algorithm.from_checkpoint(path)
    try:
        assert isinstance(restored, GoGePoARS)
        assert_same_state(saved["learner"], restored.trainer.state()["learner"])
        assert restored.train()["num_env_steps_sampled_lifetime"] >= 3000
    finally:
        restored.stop()
    gogepo = GoGePoConfig().environment("InvertedPendulum-v5").build_algo()
    try:
        with pytest.raises(ckpt.CheckpointError, match="algorithm: checkpoint 'ars'"):
            gogepo.restore_from_path(path)
    finally:
        gogepo.stop()


def _ip_returns(policy, seeds, max_steps: int) -> list[float]:
    """Returns of an exported policy on InvertedPendulum-v5, one episode per reset seed,
    stepped by hand with plain gymnasium."""
    import gymnasium as gym

    env = gym.make("InvertedPendulum-v5", max_episode_steps=max_steps)
    returns = []
    for seed in seeds:
        obs, _ = env.reset(seed=int(seed))
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = policy(torch.as_tensor(obs, dtype=torch.float32)).numpy()
            obs, r, terminated, truncated, _ = env.step(action)
            total += r
            done = terminated or truncated
        returns.append(total)
    return returns


@pytest.mark.e2e
def test_ars_runs_from_the_cli_with_eval_and_export_and_sweep_says_it_does_not_apply(tmp_path):
    from gogepo_ray.export import load_policy
    from tests.conftest import run_gogepo

    train = run_gogepo(
        "train",
        ARS_IP,
        "--no-progress",
        "--set",
        "run.total_env_steps=3000",
        "--set",
        "env.max_episode_steps=200",
        "--set",
        "tracking.enabled=false",
        "--set",
        f"run.output_dir={tmp_path}",
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["env_steps"] >= 3000 and not (tmp_path / "run" / "sweep.csv").exists()

    ev = run_gogepo("eval", str(tmp_path / "run"), "--episodes", "3", "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    out = json.loads(ev.stdout.strip().splitlines()[-1])
    assert out["algorithm"] == "ars" and out["command"] is None and out["episodes"] == 3

    refused = run_gogepo("eval", str(tmp_path / "run"), "--command", "100")
    assert refused.returncode == 2 and "takes no command" in refused.stderr
    sweep = run_gogepo("sweep", str(tmp_path / "run"))
    assert sweep.returncode == 2
    assert sweep.stderr.strip().splitlines()[-1].startswith("error: sweep applies to GoGePo runs")

    exported = run_gogepo("export", str(tmp_path / "run"), "--out", str(tmp_path / "p.pt"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    final = run_gogepo(
        "export", str(tmp_path / "run"), "--checkpoint", "latest", "--out", str(tmp_path / "f.pt")
    )
    assert final.returncode == 0, final.stderr[-2000:]

    def checkpoint_learner(which: str):
        payload = ckpt.load(tmp_path / "run", which)
        cfg = ckpt.config_of(payload)
        learner = make_learner(cfg, policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs))
        learner.load_state_dict(payload["learner"])
        return cfg, learner

    # `gogepo eval` (the run directory: best.pt) ran the exported policy: played by hand
    # from the reset seeds of the evaluation ids a fresh load of best.pt hands out, which
    # are the ones the command used, it scores what the command printed.
    cfg, best = checkpoint_learner("best")
    seeds = best.propose_eval([best.eval_command()], 3).seeds
    played = _ip_returns(load_policy(tmp_path / "p.pt"), seeds, 200)
    assert out["return_mean"] == pytest.approx(np.mean(played), abs=1e-6), played
    assert out["return_std"] == pytest.approx(np.std(played), abs=1e-6), played
    # The run's final evaluation ran the θ and statistics of its final checkpoint: the
    # exported final policy, on the seeds of the final evaluation's episodes (the last
    # run.eval_episodes evaluation ids), scores the summary's final_eval_return.
    from gogepo_ray.types import episode_seed

    n = ckpt.load(tmp_path / "run", "latest")["learner"]["counters"]["next_eval_id"]
    k = cfg.run.eval_episodes
    final_seeds = [episode_seed(cfg.run.seed, "eval", i) for i in range(n - k, n)]
    played = _ip_returns(load_policy(tmp_path / "f.pt"), final_seeds, 200)
    assert summary["final_eval_return"] == pytest.approx(np.mean(played), abs=1e-6), played
