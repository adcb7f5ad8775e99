"""Learning that holds: the bucketed buffer, adaptive noise, the evaluation command rules,
the best evaluation (best.pt, --checkpoint) and keep-the-best, and command fidelity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gogepo_ray import checkpoint as ckpt
from gogepo_ray.analysis.evaluation import choose_command, command_fidelity
from gogepo_ray.config import ConfigError, build_config, load_config
from gogepo_ray.core.buffer import BucketBuffer
from gogepo_ray.core.learner import Learner
from gogepo_ray.envs import policy_spec
from gogepo_ray.trainer import Callback
from tests.conftest import make_batch, run_gogepo, train_to_end

ROOT = Path(__file__).resolve().parents[1]
IP_FAST = str(ROOT / "configs" / "inverted_pendulum_fast.yaml")


def _cfg(**run):
    return build_config(
        {
            "env": {"id": "InvertedPendulum-v5", "return_min": 0, "return_max": 1000},
            "policy": {"hidden": []},
            "generator": {"hidden": [16], "batch_size": 4, "steps_per_episode": 1},
            "critic": {
                "hidden": [16],
                "probing_states": 5,
                "batch_size": 4,
                "steps_per_episode": 1,
            },
            "learner": {"num_threads": 1},
            "run": {"seed": 3, **run},
        }
    )


# ---------------------------------------------------------------------- bucketed buffer
def test_bucket_buffer_keeps_rare_good_policies_and_samples_buckets_evenly():
    buf = BucketBuffer(10, 2, low=0.0, high=100.0, buckets=2, bucket_exponent=0.0)
    buf.add(torch.ones(2), 95.0)  # the one good policy
    for i in range(30):  # many poor ones after it
        buf.add(torch.zeros(2), float(i % 5))
    assert len(buf) == 10
    assert 95.0 in buf.returns_in_order()  # not evicted: the fullest bucket gave room
    assert buf.bucket_counts().tolist() == [9, 1]
    # bucket_exponent 0: each bucket drawn alike, so the good policy is half of all draws
    probs = buf.entry_probabilities()
    slot = [i for i in range(len(buf)) if float(buf._returns[i]) == 95.0][0]
    assert probs[slot] == pytest.approx(0.5)
    _, returns, _ = buf.sample(4000, torch.Generator().manual_seed(0))
    assert (returns == 95.0).float().mean() == pytest.approx(0.5, abs=0.03)
    # exponent 1: bucket i weighs i + 1, so the high bucket takes 2/3
    steep = BucketBuffer(10, 2, low=0.0, high=100.0, buckets=2, bucket_exponent=1.0)
    steep.add(torch.ones(2), 95.0)
    steep.add(torch.zeros(2), 5.0)
    assert sorted(steep.entry_probabilities().tolist()) == pytest.approx([1 / 3, 2 / 3])


def test_bucket_buffer_state_round_trip_keeps_order_and_eviction():
    buf = BucketBuffer(6, 3, low=0.0, high=10.0, buckets=3)
    rng = np.random.default_rng(0)
    for r in rng.uniform(0, 10, 20):
        buf.add(torch.as_tensor(rng.normal(size=3), dtype=torch.float32), float(r))
    back = BucketBuffer(6, 3, low=0.0, high=10.0, buckets=3)
    back.load_state_dict(buf.state_dict())
    assert back.returns_in_order() == buf.returns_in_order()
    assert back.bucket_counts().tolist() == buf.bucket_counts().tolist()
    for b in (buf, back):  # the same next eviction in both
        b.add(torch.zeros(3), 9.5)
    assert back.returns_in_order() == buf.returns_in_order()


# ---------------------------------------------------------------------- evaluation rules
def test_choose_command_takes_the_highest_scoring_and_highest_on_ties():
    pb = Learner(_cfg(), policy_spec("InvertedPendulum-v5", [])).propose_eval(
        [1000.0, 750.0, 500.0, 250.0], 1
    )
    batch = make_batch(pb, returns=[489.0, 1000.0, 1000.0, 80.0], lengths=[489, 1000, 1000, 80])
    assert choose_command(batch) == 750.0
    failed = make_batch(
        pb, [1.0, 900.0, 2.0, 3.0], [1, 900, 2, 3], failures=(None, "x", None, None)
    )
    assert choose_command(failed) == 250.0


def test_command_fidelity_by_hand():
    commands = np.array([0.0, 50.0, 100.0, 150.0])
    achieved = np.array([10.0, 40.0, 100.0, 0.0])
    # commands in [0, 100]: errors 10, 10, 0 -> mean 20/3, over the range 100
    assert command_fidelity(commands, achieved, 0.0, 100.0) == pytest.approx(20 / 3 / 100)
    assert np.isnan(command_fidelity(commands, achieved, 200.0, 300.0))


def test_sweep_rule_evaluates_the_very_policy_its_sweep_chose():
    spec = policy_spec("InvertedPendulum-v5", [])
    learner = Learner(_cfg(eval_command="sweep", eval_sweep_commands=4), spec)
    learner.best_return = 800.0
    probe = learner.begin_eval(10)
    assert probe.commands.tolist() == [800.0, 600.0, 400.0, 200.0]
    before = probe.policy_params[1].copy()
    for p in learner.generator.parameters():  # the learner moves on before stage two
        p.data.add_(1.0)
    chosen = learner.eval_at(600.0, 10)
    assert chosen.commands.tolist() == [600.0] * 10
    assert all(np.array_equal(p, before) for p in chosen.policy_params)
    assert chosen.trained_env_steps == probe.trained_env_steps
    assert learner.eval_command() == 600.0  # what `gogepo eval` asks for afterwards
    learner.end_eval(1000.0)
    learner.best_return = 900.0  # the next sweep keeps the command chosen last as a candidate
    assert learner.begin_eval(10).commands.tolist() == [900.0, 675.0, 600.0, 450.0, 225.0]
    learner.end_eval(1000.0)
    learner.chosen_command = 450.0  # already one of the sweep's commands: not twice
    assert learner.begin_eval(10).commands.tolist() == [900.0, 675.0, 450.0, 225.0]


def test_best_evaluation_is_kept_and_restored_after_a_fall():
    spec = policy_spec("InvertedPendulum-v5", [])
    learner = Learner(_cfg(restore_drop=0.3), spec)
    learner.best_return = 500.0
    learner.begin_eval(2)
    best_weights = {k: v.clone() for k, v in learner.generator.state_dict().items()}
    assert learner.end_eval(900.0) == {"best": True, "restored": False, "restarted": False}
    for p in learner.generator.parameters():
        p.data.add_(1.0)
    learner.begin_eval(2)
    # 200 below the best is less than restore_drop 0.3 × 1000: nothing restored
    assert learner.end_eval(700.0) == {"best": False, "restored": False, "restarted": False}
    moved = {k: v.clone() for k, v in learner.generator.state_dict().items()}
    learner.begin_eval(2)
    assert learner.end_eval(100.0) == {"best": False, "restored": True, "restarted": False}
    for k, v in learner.generator.state_dict().items():
        assert torch.equal(v, best_weights[k]) and not torch.equal(v, moved[k])
    best = learner.best_state_dict()
    assert best["best_eval"]["return"] == 900.0 and best["best_return"] == 500.0
    assert torch.equal(
        best["generator"][next(iter(best_weights))], next(iter(best_weights.values()))
    )
    # the state (best included) survives a checkpoint round trip
    again = Learner(_cfg(restore_drop=0.3), spec)
    again.load_state_dict(learner.state_dict())
    assert again.best_eval["return"] == 900.0 and again.restores == 1


def test_a_stalled_attempt_restarts_afresh_and_keeps_the_run_going():
    spec = policy_spec("InvertedPendulum-v5", [])
    cfg = build_config(
        _cfg().model_dump() | {"exploration": {"restart_patience": 3000, "restart_gain": 0.1}}
    )
    learner = Learner(cfg, spec)
    params = learner.propose(2)
    learner.step([make_batch(params, returns=[40.0, 50.0], lengths=[40, 50])], [])
    first = {k: v.clone() for k, v in learner.generator.state_dict().items()}
    learner.chosen_command = 45.0  # as an eval_command sweep would have chosen

    def evaluate(mean, steps):
        learner.env_steps = steps
        learner.begin_eval(2)
        return learner.end_eval(mean)

    assert not evaluate(50.0, 2000)["restarted"]  # the mark: 50 at 2000 steps
    assert not evaluate(140.0, 4000)["restarted"]  # a rise of 90 < 0.1 × 1000: no progress
    out = evaluate(60.0, 5000)  # 3000 steps since the mark, still below 50 + 100
    assert out["restarted"] and learner.restarts == 1
    # a fresh start: other networks, an empty buffer, no best; the counters go on
    assert len(learner.buffer) == 0 and learner.best_return is None
    assert learner.best_eval is None and learner.env_steps == 5000 and learner.episodes == 2
    assert learner.chosen_command is None  # the old attempt's command is no candidate
    assert any(not torch.equal(v, first[k]) for k, v in learner.generator.state_dict().items())
    assert learner.stats().metrics["explore/restarts"] == 1
    # the new attempt's networks come from another seed than the run's first ones
    start = Learner(cfg, spec).generator.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in learner.generator.state_dict().items())
    # a rise of restart_gain resets the clock: 4000 steps after the mark, 2000 after the rise
    assert not evaluate(300.0, 6000)["restarted"]  # the new attempt's mark
    assert not evaluate(450.0, 8000)["restarted"]  # a rise of 150: the mark moves to 8000
    assert not evaluate(460.0, 10000)["restarted"]
    # at the top of the range nothing restarts
    assert not evaluate(1000.0, 12000)["restarted"]
    assert not evaluate(1000.0, 19000)["restarted"]
    # nor at the run's final evaluation, however long the attempt has waited
    learner.best_eval, learner._progress_mark = None, (100.0, 12000, 0.0)
    assert not evaluate(100.0, cfg.run.total_env_steps)["restarted"]
    assert evaluate(100.0, cfg.run.total_env_steps - 1)["restarted"]
    # restarts and the mark survive a checkpoint
    again = Learner(cfg, spec)
    again.load_state_dict(learner.state_dict())
    assert again.restarts == 2 and again._progress_mark == learner._progress_mark


def test_the_run_ends_with_the_best_of_every_attempt():
    spec = policy_spec("InvertedPendulum-v5", [])
    cfg = build_config(
        _cfg(restore_drop=0.1).model_dump()
        | {"exploration": {"restart_patience": 1500, "restart_gain": 0.1}}
    )
    learner = Learner(cfg, spec)

    def evaluate(mean, steps):
        learner.env_steps = steps
        learner.begin_eval(2)
        return learner.end_eval(mean)

    assert evaluate(600.0, 1000)["best"]
    first = {k: v.clone() for k, v in learner.generator.state_dict().items()}
    assert not evaluate(620.0, 2000)["restarted"]
    assert evaluate(610.0, 3000)["restarted"]  # no rise of 100 in 2000 steps: attempt 1
    assert evaluate(300.0, 4000)["best"]  # attempt 1's own best; nothing is restored
    assert not any(torch.equal(first[k], v) for k, v in learner.generator.state_dict().items())
    again = Learner(cfg, spec)  # the earlier attempts' best survives a checkpoint
    again.load_state_dict(learner.state_dict())
    # the final evaluation falls far below attempt 0's 600: once the steps are trained, or
    # when the run ends early (a time limit), where a stalled attempt must not restart
    learner.env_steps = cfg.run.total_env_steps
    again.env_steps = 9000
    for run, final in ((learner, False), (again, True)):
        run.begin_eval(2)
        outcome = run.end_eval(310.0, final=final)
        assert outcome["restored"] and not outcome["restarted"]
        nets = run.generator.state_dict()
        assert all(torch.equal(first[k], nets[k]) for k in first)


def test_an_attempt_whose_training_returns_still_rise_is_not_restarted():
    spec = policy_spec("InvertedPendulum-v5", [])
    cfg = build_config(
        _cfg().model_dump() | {"exploration": {"restart_patience": 3000, "restart_gain": 0.1}}
    )
    learner = Learner(cfg, spec)

    def evaluate(mean, steps, best_training_return):
        learner.env_steps, learner.best_return = steps, best_training_return
        learner.begin_eval(2)
        return learner.end_eval(mean)

    assert not evaluate(50.0, 2000, 60.0)["restarted"]  # the mark: 50, 60 at 2000 steps
    assert not evaluate(60.0, 4000, 150.0)["restarted"]
    assert not evaluate(60.0, 5000, 170.0)["restarted"]  # 3000 steps, but training rose 110
    assert learner._progress_mark == (60.0, 5000, 170.0)
    assert not evaluate(70.0, 7000, 260.0)["restarted"]
    assert evaluate(70.0, 8000, 260.0)["restarted"]  # neither has risen by 100 since 5000


def test_no_restart_without_restart_patience():
    learner = Learner(_cfg(), policy_spec("InvertedPendulum-v5", []))
    for k in range(20):
        learner.env_steps = 1000 * k
        learner.begin_eval(1)
        assert not learner.end_eval(10.0)["restarted"]
    assert learner.restarts == 0


def test_adaptive_noise_moves_sigma_towards_the_action_distance():
    spec = policy_spec("InvertedPendulum-v5", [])
    cfg = _cfg()
    cfg = build_config(
        cfg.model_dump()
        | {"exploration": {"noise": "adaptive", "param_noise": 5.0, "action_distance": 0.05}}
    )
    learner = Learner(cfg, spec)
    for _ in range(30):
        learner.propose(4)
    assert learner.param_noise < 1.0
    d = learner.stats().metrics["explore/action_distance"]
    assert 0.02 < d < 0.12


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm=ars", "run.eval_command=sweep"], "run.eval_command: sweep picks a command"),
        (["run.eval_command=best"], "run.eval_command"),
        (["run.restore_drop=0"], "run.restore_drop"),
        (["run.restore_drop=1.5"], "run.restore_drop"),
        (["buffer.sampling=top"], "buffer.sampling"),
        (["buffer.buckets=0"], "buffer.buckets"),
        (["exploration.noise=big"], "exploration.noise"),
        (["exploration.action_distance=0"], "exploration.action_distance"),
        (["exploration.restart_patience=0"], "exploration.restart_patience"),
        (["exploration.restart_gain=0"], "exploration.restart_gain"),
        (["exploration.restart_gain=2"], "exploration.restart_gain"),
    ],
)
def test_new_options_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(IP_FAST, overrides)


def test_sweep_rule_refuses_task_families():
    with pytest.raises(ConfigError, match="not for task families"):
        load_config(str(ROOT / "configs" / "point_goal.yaml"), ["run.eval_command=sweep"])


# ---------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_restore_best_and_undo_restore_swap_the_networks_and_their_statistics():
    spec = policy_spec("InvertedPendulum-v5", [])
    learner = Learner(_cfg(eval_command="sweep"), spec)
    assert not learner.restore_best()  # no evaluation yet: nothing to restore
    learner.begin_eval(2)
    learner.end_eval(500.0)
    best = {k: v.clone() for k, v in learner.generator.state_dict().items()}
    for p in learner.generator.parameters():  # training moves on
        p.data.add_(1.0)
    learner.obs_stats.count, learner.chosen_command = 77, 123.0
    latest = {k: v.clone() for k, v in learner.generator.state_dict().items()}
    assert learner.restore_best()
    assert all(torch.equal(best[k], v) for k, v in learner.generator.state_dict().items())
    assert learner.obs_stats.count != 77
    learner.undo_restore()
    assert all(torch.equal(latest[k], v) for k, v in learner.generator.state_dict().items())
    assert learner.obs_stats.count == 77 and learner.chosen_command == 123.0


class _EvalsSeen(Callback):
    """A trainer callback that keeps every evaluation it is told of."""

    def __init__(self) -> None:
        self.evals: list[tuple[int, float]] = []

    def on_eval(self, trainer, env_steps: int, mean: float, std: float) -> None:
        self.evals.append((env_steps, mean))


def _end_with_a_worse_best(trainer):
    """Make the best evaluation's networks write a policy that cannot run (non-finite
    weights: every episode of it fails, whatever the machine's floating point makes of a
    barely trained pendulum) and claim a best of 500, above the latest and within the
    drop, so that the run's end must rescore them and keep its latest networks."""

    def spoil(actor):
        best = actor.learner.best_eval
        for t in best["nets"]["generator"].values():
            t.fill_(float("nan"))
        best["return"] = 500.0  # above what the final evaluation scores, within the drop

    trainer._lget(trainer.learner.__ray_call__.remote(spoil))
    trainer.progress.best_eval_return = 500.0


def test_the_run_ends_with_its_latest_networks_when_the_best_rescores_lower(ray_session, tmp_path):
    from gogepo_ray.trainer import Trainer

    cfg = load_config(
        IP_FAST,
        [
            "run.total_env_steps=2000",
            "run.eval_every=1000",
            "run.workers=1",
            "run.sweep_at_end=false",
            "run.restore_drop=0.999",
            "exploration.restart_patience=null",
            "tracking.enabled=false",
            f"run.output_dir={tmp_path}",
        ],
    )
    seen = _EvalsSeen()
    trainer = Trainer(cfg, callbacks=[seen])
    try:
        trainer.run_until(cfg.run.total_env_steps)
        before = trainer._lget(trainer.learner.state_dict.remote())["generator"]
        _end_with_a_worse_best(trainer)
        summary = trainer.finish()
    finally:
        trainer.shutdown()
    history = summary["eval_history"]
    # latest, the best rescored (every episode failed), then the latest's score again
    assert history[-1] == history[-3] and math.isnan(history[-2][1])
    assert summary["final_eval_return"] == history[-3][1]
    assert summary["restores"] == 0
    # callbacks (MLflow, bench/learning.py) see the same evaluations, the final one last
    assert repr(seen.evals) == repr([(step, mean) for step, mean in history])
    final = ckpt.load(trainer.run_dir / "checkpoints" / "final.pt")["learner"]["generator"]
    assert all(torch.equal(before[k], final[k]) for k in before)


def test_best_checkpoint_written_and_used_by_default(ray_session, tmp_path):
    cfg = load_config(
        IP_FAST,
        [
            "run.total_env_steps=2000",
            "run.eval_every=1000",
            "run.workers=1",
            "run.sweep_commands=3",
            "run.eval_command=sweep",
            "tracking.enabled=false",
            f"run.output_dir={tmp_path}",
        ],
    )
    summary, trainer = train_to_end(cfg)
    run_dir = trainer.run_dir
    # tracking off still writes the learning curve
    assert (run_dir / "learning_curve.png").stat().st_size > 1000
    best_path = run_dir / "checkpoints" / "best.pt"
    best = ckpt.load(best_path)["learner"]
    final = ckpt.load(run_dir / "checkpoints" / "final.pt")["learner"]
    assert best["best_eval"]["return"] == summary["best_eval_return"]
    assert summary["best_eval_return"] == max(m for _, m in summary["eval_history"])
    assert summary["best_eval_env_steps"] in [s for s, _ in summary["eval_history"]]
    assert summary["final_eval_return"] == summary["eval_history"][-1][1]
    # Make best.pt's generator clearly differ from the final one, then check which one each
    # --checkpoint evaluates: best writes G(command) from best.pt, latest from final.pt.
    payload = ckpt.load(best_path)
    gen = payload["learner"]["generator"]
    for k in gen:
        gen[k] = gen[k] + 0.5
    ckpt.save(best_path, payload)
    out = tmp_path / "exports"
    out.mkdir()
    for which in ("best", "latest"):
        res = run_gogepo(
            "export",
            str(run_dir),
            "--checkpoint",
            which,
            "--command",
            "500",
            "--out",
            str(out / f"{which}.pt"),
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stderr
    default = run_gogepo(
        "export", str(run_dir), "--command", "500", "--out", str(out / "default.pt"), cwd=tmp_path
    )
    assert default.returncode == 0, default.stderr

    def exported(name):
        blob = torch.load(out / f"{name}.pt", weights_only=True)
        return torch.cat([v.reshape(-1) for v in blob["state_dict"].values()])

    assert not torch.equal(exported("best"), exported("latest"))  # best.pt was changed
    assert torch.equal(exported("default"), exported("best"))
    bad = run_gogepo("eval", str(best_path), "--checkpoint", "best", cwd=tmp_path)
    assert bad.returncode == 2 and "is a file already" in bad.stderr
    res = run_gogepo("eval", str(run_dir), "--checkpoint", "latest", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["command"] == final["chosen_command"]
