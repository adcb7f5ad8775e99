"""Shared fixtures: one real local Ray instance for the whole session (no local_mode)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
