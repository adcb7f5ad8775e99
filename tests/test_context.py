"""Task contexts (issue 10), unit tier: conditioned generator and critic, the buffer's
contexts, the best-return estimate, the learner's proposals, config validation, and the
CLI's answers to bad contexts. No Ray here; the end-to-end run is in test_context_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gogepo_ray import checkpoint as ckpt
from gogepo_ray.algorithms import make_learner
from gogepo_ray.config import ConfigError, load_config
from gogepo_ray.core.buffer import ReplayBuffer
from gogepo_ray.core.context import TaskContexts
from gogepo_ray.core.critic import Critic
from gogepo_ray.core.generator import Generator
from gogepo_ray.core.policy import PolicySpec
from gogepo_ray.envs import policy_spec
from gogepo_ray.trainer import Progress, _batch_from_state, _batch_to_state
from tests.conftest import ROOT, TINY, assert_same_state, make_batch

SMALL = ["learner.num_threads=1", "learner.precision=fp32", "tracking.enabled=false"]
FAMILY = [*TINY, *SMALL]


def point_goal(*overrides: str):
    cfg = load_config(ROOT / "configs" / "point_goal.yaml", [*FAMILY, *overrides])
    return cfg, policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)


# ---------------------------------------------------------------------- no context: as before
def test_config_without_context_updates_exactly_as_before():
    """The learner of a config with no context section gives the same policies, losses and
    best returns, step for step, as the code before task contexts existed: the values in
    tests/golden_no_context.json were written by that code (commit bbca4ab) from this
    sequence."""
    cfg = load_config(
        ROOT / "configs" / "inverted_pendulum.yaml",
        TINY + ["learner.precision=fp32", "learner.num_threads=1", "run.seed=3"],
    )
    assert cfg.context is None
    spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
    learner = make_learner(cfg, spec)
    assert learner.generator.context_dim == 0 and learner.critic.context_dim == 0
    rng = np.random.default_rng(0)
    pb = learner.propose(2)
    assert pb.contexts is None
    got = []
    for i in range(6):
        returns = pb.policy_params.astype(np.float64).sum(1) * 10 + i * 5
        batch = make_batch(pb, returns, lengths=[20, 30], obs=rng.normal(size=(50, spec.obs_dim)))
        pb, stats = learner.step([batch], [2])
        got.append(
            [float(x) for x in pb.policy_params[:, :4].ravel()]
            + [
                stats.metrics["losses/critic"],
                stats.metrics["losses/generator"],
                stats.best_return,
            ]
        )
    got.append(
        [float(x) for x in learner.propose_eval([1.0, 50.0], 1).policy_params[:, -4:].ravel()]
    )
    golden = json.loads((ROOT / "tests" / "golden_no_context.json").read_text())
    for row, want in zip(got, golden, strict=True):
        np.testing.assert_allclose(row, want, rtol=1e-4, atol=1e-6)
    assert "contexts" not in learner.buffer.state_dict()  # the checkpoint format is unchanged


# ---------------------------------------------------------------------- the networks
def test_generator_and_critic_condition_on_the_context():
    spec = PolicySpec(2, 2, (8,), (-0.1, -0.1), (0.1, 0.1))
    torch.manual_seed(0)
    gen = Generator(spec, command_scale=100.0, tile=4, hidden=(16,), context_dim=2)
    critic = Critic(spec, probing_states=5, hidden=(16,), context_dim=2)
    c = torch.tensor([-10.0, -10.0])
    x = torch.tensor([[0.5, 0.5], [-0.5, 0.2]])
    params = gen(c, x)
    assert params.shape == (2, spec.num_params)
    assert not torch.allclose(params[0], params[1])  # same return, other task, other policy
    same = gen(c, x[[0, 0]])
    assert torch.equal(same[0], same[1])
    v = critic(params, x)
    assert v.shape == (2,)
    assert not torch.allclose(critic(params[[0, 0]], x), critic(params[[0, 0]], x[[0, 0]]))
    # The losses reach the context weights of both networks.
    ((critic(gen.layers(c, x), x) - c) ** 2).mean().backward()
    assert gen.hypernets["input"][0].weight.grad[:, -2:].abs().sum() > 0
    assert critic.head[0].weight.grad[:, -2:].abs().sum() > 0
    with pytest.raises(ValueError, match="context of shape"):
        gen(c)
    with pytest.raises(ValueError, match="context of shape"):
        critic(params, x[:, :1])
    with pytest.raises(ValueError, match="takes no context"):
        Generator(spec, command_scale=1.0, tile=4, hidden=(16,))(c, x)


def test_buffer_keeps_each_entry_with_its_context():
    buf = ReplayBuffer(5, 3, context_dim=2)
    for i in range(8):  # wraps: entries 3..7 stay
        buf.add(torch.full((3,), float(i)), float(i), torch.tensor([i, -i]))
    params, returns, contexts = buf.sample(200, torch.Generator().manual_seed(0))
    assert torch.equal(params[:, 0], returns)
    assert torch.equal(contexts[:, 0], returns) and torch.equal(contexts[:, 1], -returns)
    assert set(returns.tolist()) <= {3.0, 4.0, 5.0, 6.0, 7.0}
    stored, rets = buf.contexts_and_returns()
    assert sorted(rets.tolist()) == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert torch.equal(stored[:, 0], rets.float())
    back = ReplayBuffer(5, 3, context_dim=2)
    back.load_state_dict(buf.state_dict())
    assert_same_state(back.state_dict(), buf.state_dict())
    with pytest.raises(ValueError, match="contexts of 2 values, this run's have 0"):
        ReplayBuffer(5, 3).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="context of 2 values"):
        buf.add(torch.zeros(3), 0.0)


def test_best_return_of_a_context_is_the_best_of_its_nearest_entries():
    tc = TaskContexts(1, heldout=[[0.5]], train_low=[0.0], train_high=[2.0], neighbours=2)
    assert np.isnan(tc.best(np.array([[1.0]]), torch.zeros(0, 1), torch.zeros(0))[0])
    raw = np.array([[0.0], [0.1], [1.0], [1.1], [2.0]])
    stored = tc.normalise(raw)
    assert torch.allclose(stored[:, 0], torch.tensor([-1.0, -0.9, 0.0, 0.1, 1.0]))
    returns = torch.tensor([5.0, 1.0, 7.0, 3.0, 9.0], dtype=torch.float64)
    best = tc.best(np.array([[0.02], [1.04], [3.0]]), stored, returns)
    np.testing.assert_array_equal(best, [5.0, 7.0, 9.0])  # outside the range: its edge answers
    blind = TaskContexts(1, heldout=[[0.5]], train_low=[0.0], train_high=[2.0], blind=True)
    assert blind.cond_dim == 0 and blind.normalise(raw).shape == (5, 0)
    np.testing.assert_array_equal(blind.best(np.array([[0.0]]), stored, returns), [9.0])


def test_training_contexts_come_from_the_box_or_the_list():
    g = torch.Generator().manual_seed(0)
    box = TaskContexts(2, heldout=[[0, 0]], train_low=[-1, 0], train_high=[1, 3])
    x = box.sample(2000, g)
    assert x.shape == (2000, 2) and (x[:, 0] >= -1).all() and (x[:, 1] <= 3).all()
    assert x[:, 1].std() > 0.8  # spread over the box, not a point
    pts = TaskContexts(1, heldout=[[0.5]], train_points=[[0.0], [1.0], [2.0]])
    assert set(pts.sample(300, g)[:, 0].tolist()) == {0.0, 1.0, 2.0}


# ---------------------------------------------------------------------- the learner
def test_family_learner_explores_every_task_and_evaluates_the_heldout_ones():
    cfg, spec = point_goal("exploration.drive=5", "context.neighbours=10")
    learner = make_learner(cfg, spec)
    pb = learner.propose(64)
    assert pb.contexts.shape == (64, 2)
    assert (np.abs(pb.contexts) <= 1).all() and pb.contexts.std(0).min() > 0.3
    np.testing.assert_array_equal(pb.commands, 5.0)  # empty buffer: best 0, + drive
    # Returns that grow with goal_x: the best estimate of a task follows its neighbours.
    returns = -100 + 50 * pb.contexts[:, 0]
    learner.step([make_batch(pb, returns, lengths=[100] * 64)], [])
    probe = np.array([[-0.9, 0.0], [0.9, 0.0]])
    best = learner.best_for(probe)
    # by hand: the box [-1, 1]² normalises to itself; the best of the 10 nearest goals
    dist = np.linalg.norm(pb.contexts[None, :, :] - probe[:, None, :], axis=2)
    want = [returns[np.argsort(d)[:10]].max() for d in dist]
    np.testing.assert_allclose(best, want, rtol=1e-6)
    assert best[0] < best[1]
    nxt = learner.propose(200)
    want = learner.best_for(nxt.contexts) + 5
    np.testing.assert_allclose(nxt.commands, want)
    ev = learner.propose_eval(None, 2)
    heldout = np.array(cfg.context.heldout)
    np.testing.assert_array_equal(ev.contexts, np.repeat(heldout, 2, axis=0))
    np.testing.assert_allclose(ev.commands, np.repeat(learner.best_for(heldout), 2))
    one = learner.propose_eval([-20.0], 1, [[0.3, 0.7]])
    assert one.commands.tolist() == [-20.0] and one.contexts.tolist() == [[0.3, 0.7]]
    with pytest.raises(ValueError, match="2 commands for 1 contexts"):
        learner.propose_eval([-20.0, -10.0], 1, [[0.3, 0.7]])
    # A blind learner sees no context, its episodes still run on sampled tasks.
    blind = make_learner(point_goal("context.blind=true")[0], spec)
    assert blind.generator.context_dim == 0
    bpb = blind.propose(8)
    assert bpb.contexts.shape == (8, 2) and len(set(map(tuple, bpb.contexts))) == 8


def test_family_learner_state_round_trips_with_contexts():
    cfg, spec = point_goal()
    a = make_learner(cfg, spec)
    pb = a.propose(4)
    a.step([make_batch(pb, [-50.0, -40.0, -30.0, -20.0], lengths=[100] * 4)], [])
    b = make_learner(cfg, spec)
    b.load_state_dict(a.state_dict())
    assert_same_state(b.state_dict(), a.state_dict())
    assert b.state_dict()["buffer"]["contexts"].shape == (4, 2)
    np.testing.assert_array_equal(b.propose(3).contexts, a.propose(3).contexts)
    # in-flight batches of a checkpoint keep their contexts; others keep having none
    back = _batch_from_state(_batch_to_state(pb, -1), 0)
    np.testing.assert_array_equal(back.contexts, pb.contexts)
    plain_cfg = load_config(ROOT / "configs" / "inverted_pendulum.yaml", FAMILY)
    plain = make_learner(plain_cfg, policy_spec(plain_cfg.env.id, plain_cfg.policy.hidden))
    assert _batch_from_state(_batch_to_state(plain.propose(2), -1), 0).contexts is None


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["env.id=Hopper-v5"], "context: env.id 'Hopper-v5' is not a task family"),
        (["context.heldout=[[0.5]]"], "heldout contexts have [1] values, the training ones 2"),
        (["context.heldout=[[2.5, 0]]"], "context.heldout[0]: context goal_x = 2.5 is outside"),
        (["context.train.high=[1, 3]"], "context.train.high: context goal_y = 3"),
        (["context.train={points: [[0.3, 0.7]]}"], "must not be training points"),
        (["context.train={low: [0, 0]}"], "a box needs both low and high"),
        (["context.train={low: [1, 0], high: [0, 1]}"], "low must not exceed high"),
        (["algorithm=ars"], "ars does not train on task contexts; algorithms that do: gogepo"),
        (["context.heldout=[]"], "at least one context"),
        (["context.neighbours=0"], "context.neighbours"),
    ],
)
def test_bad_context_configs_name_the_problem(overrides, message):
    with pytest.raises(ConfigError) as err:
        point_goal(*overrides)
    assert message in str(err.value), str(err.value)


def test_one_dimensional_contexts_may_be_written_as_numbers():
    cfg = load_config(ROOT / "configs" / "half_cheetah_vel.yaml", FAMILY)
    assert cfg.context.dim == 1 and all(len(x) == 1 for x in cfg.context.heldout)
    cfg = load_config(
        ROOT / "configs" / "half_cheetah_vel.yaml",
        [*FAMILY, "context.train={low: 0.5, high: 2.5}", "context.heldout=[0.1, 2.9]"],
    )
    assert cfg.context.train.low == [0.5] and cfg.context.heldout == [[0.1], [2.9]]


# ---------------------------------------------------------------------- CLI, bad contexts
@pytest.fixture(scope="module")
def family_checkpoint(tmp_path_factory) -> Path:
    """A PointGoal run's checkpoint after one learner step, written without Ray."""
    cfg, spec = point_goal()
    learner = make_learner(cfg, spec)
    pb = learner.propose(8)
    learner.step([make_batch(pb, np.linspace(-80, -20, 8), lengths=[100] * 8)], [])
    run = tmp_path_factory.mktemp("pg-run")
    payload = ckpt.payload(
        cfg=cfg, learner=learner.state_dict(), progress=Progress().__dict__, inflight=[]
    )
    ckpt.save(run / "checkpoints" / "latest.pt", payload)
    return run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--context", "0.5"], "--context: context has 1 value, this family takes 2"),
        (["eval", "--context", "nan", "0.1"], "--context: context goal_x is nan"),
        (["eval", "--context", "0.1", "2.5"], "--context: context goal_y = 2.5 is outside"),
        (["export", "--command", "-10", "--out", "x.pt"], "--context is required"),
        (["export", "--command", "nan", "--context", "0", "0", "--out", "x.pt"], "finite"),
        (["eval", "--command", "inf", "--context", "0", "0"], "--command must be a finite"),
    ],
)
def test_cli_refuses_bad_contexts_with_one_line(family_checkpoint, args, message, capsys):
    # in process (the CLI's own main) to keep the unit tier fast; the subprocess tests
    # below run the same entry point as a user does
    from gogepo_ray.cli import main

    assert main([args[0], str(family_checkpoint), *args[1:]]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert not (ROOT / "x.pt").exists()


def _checkpoint_learner(run: Path):
    payload = ckpt.load(run)
    cfg = ckpt.config_of(payload)
    learner = make_learner(cfg, policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs))
    learner.load_state_dict(payload["learner"])
    return learner


def _play(policy, context: list[float], seeds) -> list[float]:
    """Returns of ``policy`` (an exported nn.Sequential) on PointGoal-v0 at ``context``, one
    episode per reset seed, stepped by hand: no gogepo rollout code in the way."""
    import gymnasium as gym

    env = gym.make("PointGoal-v0")
    returns = []
    for seed in seeds:
        obs, _ = env.reset(seed=int(seed), options={"context": context})
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = policy(torch.as_tensor(obs, dtype=torch.float32)).numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
        returns.append(total)
    return returns


def test_cli_eval_and_export_on_a_family_checkpoint(family_checkpoint, tmp_path, capsys):
    from gogepo_ray.cli import main
    from gogepo_ray.core.policy import policy_actions
    from gogepo_ray.export import build_policy, load_policy

    ckpt_dir = str(family_checkpoint)
    assert main(["eval", ckpt_dir, "--context", "0.3", "0.7", "--episodes", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["context"] == [0.3, 0.7] and out["episodes"] == 2
    assert out["return_mean"] < 0  # PointGoal rewards are −distance
    # The episodes ran G(best(x), x) on goal x = (0.3, 0.7): the same policy, played by hand
    # on that goal from the same reset seeds (a fresh load of the checkpoint hands out the
    # evaluation ids the CLI used), scores the same.
    learner = _checkpoint_learner(family_checkpoint)
    issued = learner.propose_eval(None, 2, np.array([[0.3, 0.7]]))
    command = float(issued.commands[0])
    assert out["command"] == pytest.approx(command)
    policy, _ = build_policy(learner, command, [0.3, 0.7])
    assert out["return_mean"] == pytest.approx(
        np.mean(_play(policy, [0.3, 0.7], issued.seeds)), rel=1e-4, abs=1e-3
    )
    assert main(["eval", ckpt_dir, "--episodes", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["contexts"]) == 9  # every held-out goal
    path = tmp_path / "pg.pt"
    args = ["export", ckpt_dir, "--command", "-10", "--context", "0.3", "0.7", "--out", str(path)]
    assert main(args) == 0
    blob = torch.load(path, weights_only=True)
    assert blob["context"] == [0.3, 0.7] and blob["command"] == -10.0
    # The file holds G(−10, (0.3, 0.7)) with its normaliser and action bounds: its actions
    # are those of the generated policy on normalised observations, and not those of the
    # same command on another goal.
    learner = _checkpoint_learner(family_checkpoint)
    spec = learner.spec
    obs = torch.rand(64, spec.obs_dim, generator=torch.Generator().manual_seed(0)) * 4 - 2

    def generated(context):
        issued = learner.propose_eval([-10.0], 1, np.array([context]))
        mean, std = (torch.from_numpy(a) for a in issued.normalizer())
        params = torch.from_numpy(issued.policy_params)  # (1, D)
        return policy_actions(spec, params, ((obs - mean) / std)[None])[0]  # (64, act_dim)

    with torch.no_grad():
        exported = load_policy(path)(obs)
        torch.testing.assert_close(exported, generated([0.3, 0.7]), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(exported, generated([-0.6, 0.2]), atol=1e-3)


def test_cli_refuses_a_context_for_a_run_that_is_not_a_family(tmp_path, capsys):
    from gogepo_ray.cli import main

    cfg = load_config(ROOT / "configs" / "inverted_pendulum.yaml", FAMILY)
    learner = make_learner(cfg, policy_spec(cfg.env.id, cfg.policy.hidden))
    payload = ckpt.payload(
        cfg=cfg, learner=learner.state_dict(), progress=Progress().__dict__, inflight=[]
    )
    ckpt.save(tmp_path / "checkpoints" / "latest.pt", payload)
    assert main(["eval", str(tmp_path), "--context", "1.0"]) == 2
    err = capsys.readouterr().err
    assert "was not trained as a task family" in err and err.count("\n") == 1
