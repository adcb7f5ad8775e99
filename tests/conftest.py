"""Shared fixtures: one real local Ray instance for the whole session (no local_mode)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "policy.hidden=[16,16]",
    "generator.hidden=[32,32]",
    "generator.tile=8",
    "critic.hidden=[32,32]",
    "critic.probing_states=20",
    "run.sweep_commands=3",
    "tracking.enabled=false",
]


def pytest_collection_modifyitems(config, items):
    # e2e tests start Ray and train on real MuJoCo envs; run them after the unit tier.
    items.sort(key=lambda item: 1 if item.get_closest_marker("e2e") else 0)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # Ray workers inherit the environment at ray.init: let them import tests.fault_envs.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    if not ray.is_initialized():
        # 4 logical CPUs on a 2-core machine: a learner and 2 workers share the cores.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def assert_same_state(a: Any, b: Any, skip: Collection[str] = (), path: str = "") -> None:
    """Two checkpoint states are equal in every key, tensor, number and list, at any depth
    (optimiser states, RNG states and counters included). ``skip`` names dotted paths left
    out, e.g. ``counters.learner_seconds``, a timer."""
    import torch

    if path in skip:
        return
    where = path or "state"
    if isinstance(a, dict):
        assert isinstance(b, dict), f"{where}: dict against {type(b).__name__}"
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            assert_same_state(a[key], b[key], skip, f"{path}.{key}" if path else str(key))
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, skip, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor against {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), f"{where}: nan != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run_gogepo(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -m gogepo_ray ARGS`` in a subprocess, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "gogepo_ray", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tracked_run(cfg, uri: str, experiment: str) -> tuple[dict, str]:
    """Train ``cfg`` to its total_env_steps on the session's Ray, with metrics.jsonl and an
    MLflow run in ``uri``; returns the summary and the MLflow run id."""
    from gogepo_ray.callbacks import JsonlMetrics
    from gogepo_ray.tracking import MLflowTracker

    tracker = MLflowTracker(tracking_uri=uri, experiment=experiment)
    summary, _ = train_to_end(cfg, [JsonlMetrics(), tracker])
    return summary, tracker.run_id


def train_to_end(cfg, callbacks: list | None = None):
    """Train ``cfg`` to its total_env_steps on the session's Ray and finish the run (final
    evaluation, checkpoint, sweep); the actors are stopped either way. Returns the summary
    and the Trainer (its run_dir and progress stay readable)."""
    from gogepo_ray.trainer import Trainer

    trainer = Trainer(cfg, callbacks=callbacks)
    try:
        trainer.run_until(cfg.run.total_env_steps)
        summary = trainer.finish()
    finally:
        trainer.shutdown()
    return summary, trainer


def make_batch(pb, returns, lengths=None, failures=None, obs=None):
    """The EpisodeBatch a worker would send back for ParamBatch ``pb``, with chosen returns,
    lengths (default 10 each), failures and observations (their statistics delta)."""
    import numpy as np

    from gogepo_ray.core.normalizer import ObsStats
    from gogepo_ray.types import EpisodeBatch

    n = len(pb.episode_ids)
    delta = ObsStats(len(pb.obs_mean))
    if obs is not None and len(obs):
        delta.update(np.asarray(obs, dtype=np.float64))
    return EpisodeBatch(
        kind=pb.kind,
        episode_ids=pb.episode_ids,
        commands=pb.commands,
        policy_params=pb.policy_params,
        returns=np.asarray(returns, dtype=np.float64),
        lengths=np.asarray(lengths if lengths is not None else [10] * n, dtype=np.int64),
        failures=tuple(failures) if failures is not None else (None,) * n,
        obs_count=delta.count,
        obs_mean=delta.mean,
        obs_m2=delta.m2,
        rollout_seconds=0.1,
        contexts=pb.contexts,
    )
