"""The learner on a GPU (``learner.device: cuda``), with real Hopper-v5 episodes.

Skipped where torch sees no CUDA device (CI has none). It imports neither Ray nor MLflow,
so it also runs on a bare GPU machine with only torch, gymnasium/MuJoCo and pydantic:
``python -m pytest --noconftest tests/test_gpu.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gogepo_ray.config import load_config
from gogepo_ray.core.learner import Learner
from gogepo_ray.envs import policy_spec
from gogepo_ray.rollout import Rollouts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

HOPPER_FAST = str(Path(__file__).resolve().parents[1] / "configs" / "hopper_fast.yaml")


def _learner(device: str, precision: str = "auto") -> Learner:
    cfg = load_config(
        HOPPER_FAST,
        [f"learner.device={device}", f"learner.precision={precision}", "learner.num_threads=1"],
    )
    return Learner(cfg, policy_spec(cfg.env.id, cfg.policy.hidden))


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def _train(learner: Learner, episodes: int) -> None:
    """Real Hopper episodes from the learner's own proposals, each taken in and learned from."""
    rollouts = Rollouts(learner.cfg.env.id, learner.spec)
    try:
        for _ in range(episodes):
            assert learner.take_in(rollouts.run(learner.propose(1))) == 1
            learner.learn()
    finally:
        rollouts.close()


def test_learner_learns_on_cuda_and_hands_out_cpu_state():
    learner = _learner("cuda")
    assert learner.precision == "bf16"  # auto: bf16 on a GPU
    assert all(p.is_cuda for p in learner.generator.parameters())
    assert all(p.is_cuda for p in learner.critic.parameters())
    before = [p.detach().clone() for p in learner.generator.parameters()]
    _train(learner, 8)
    assert learner.rounds == 8
    stats = learner.stats()
    assert math.isfinite(stats.metrics["losses/critic"])
    assert math.isfinite(stats.metrics["losses/generator"])
    moved = [not torch.equal(a, b) for a, b in zip(before, learner.generator.parameters())]
    assert any(moved), "the generator did not learn"
    # The state leaves the actor for a driver that may have no GPU: every tensor on the CPU.
    state = learner.state_dict()
    assert all(t.device.type == "cpu" for t in _tensors(state))


def test_gpu_state_resumes_on_cpu_and_cpu_state_on_gpu():
    """A checkpoint moves between devices both ways, writes the same policies, and the
    resumed learner keeps learning on its own device."""
    gpu = _learner("cuda", "fp32")
    _train(gpu, 4)
    cpu = _learner("cpu", "fp32")
    cpu.load_state_dict(gpu.state_dict())
    commands = [0.0, 500.0, 1500.0]
    on_gpu = gpu.propose_eval(commands).policy_params
    on_cpu = cpu.propose_eval(commands).policy_params
    np.testing.assert_allclose(on_cpu, on_gpu, rtol=1e-4, atol=1e-5)
    # The GPU run resumes on the CPU: its optimisers step there (not capturable there).
    assert not any(g["capturable"] for g in cpu.generator_opt.param_groups)
    assert all(math.isfinite(loss) for loss in cpu.update(2))
    # ... and a CPU run resumes on a GPU, its steps captured as CUDA graphs there.
    cpu_run = _learner("cpu", "fp32")
    _train(cpu_run, 4)
    back = _learner("cuda", "fp32")
    back.load_state_dict(cpu_run.state_dict())
    np.testing.assert_allclose(
        back.propose_eval(commands).policy_params,
        cpu_run.propose_eval(commands).policy_params,
        rtol=1e-4,
        atol=1e-5,
    )
    assert all(math.isfinite(loss) for loss in back.update(2))
    assert back._generator_update._graph is not None
    opt_state = back.generator_opt.state_dict()["state"]
    assert all(v.is_cuda for s in opt_state.values() for v in s.values())


def _filled(learner: Learner, n: int = 200) -> Learner:
    gen = torch.Generator().manual_seed(1)
    k = learner.buffer.context_dim  # a task family's normalised contexts, else 0
    for i in range(n):
        params = 0.1 * torch.randn(learner.spec.num_params, generator=gen)
        learner.buffer.add(params, float(i), torch.randn(k, generator=gen) if k else None)
    return learner


def _same_weights(a: Learner, b: Learner) -> None:
    for net in ("generator", "critic"):
        for (name, pa), pb in zip(getattr(a, net).named_parameters(), getattr(b, net).parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=f"{net}.{name}")


@pytest.mark.parametrize("config", ["hopper.yaml", "hopper_fast.yaml", "point_goal.yaml"])
def test_cuda_graph_steps_learn_what_eager_steps_learn(config):
    """Learner rounds on a GPU replay captured CUDA graphs; the capture's warm-up steps are
    undone, so the run learns what eager steps learn, also after a checkpoint is loaded into
    a learner whose steps were already captured (the optimiser's state tensors are new).
    PointGoal is a task family: its steps also take the tasks' contexts as graph inputs."""
    cfg = load_config(
        str(Path(HOPPER_FAST).with_name(config)),
        ["learner.device=cuda", "learner.precision=fp32"],
    )

    def make() -> Learner:
        return _filled(Learner(cfg, policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)))

    graphed, eager = make(), make()
    eager._critic_update.cuda_graph = eager._generator_update.cuda_graph = False
    for _ in range(3):
        assert graphed.update(1) == pytest.approx(eager.update(1), rel=1e-4)
    assert graphed._generator_update._graph is not None  # the steps were really captured
    _same_weights(graphed, eager)
    state = eager.state_dict()
    graphed.load_state_dict(state)
    eager.load_state_dict(state)
    assert graphed._critic_update._graph is None  # dropped: recaptured at the next step
    for _ in range(2):
        assert graphed.update(1) == pytest.approx(eager.update(1), rel=1e-4)
    _same_weights(graphed, eager)
