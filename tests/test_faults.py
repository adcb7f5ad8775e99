"""Faults a cluster produces, injected on a real local Ray: dying workers, a SIGKILLed
driver, misbehaving envs, and a run where every episode fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from gogepo_ray import checkpoint as ckpt
from gogepo_ray.config import load_config
from gogepo_ray.envs import policy_spec
from gogepo_ray.rollout import Rollouts
from gogepo_ray.trainer import Trainer, TrainingError, resume_trainer
from gogepo_ray.types import ParamBatch
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.e2e

IP = str(ROOT / "configs" / "inverted_pendulum.yaml")


def point_cfg(tmp_path: Path, *extra: str, env: str = "PointEnv", sleep: float = 0.0):
    return load_config(
        None,
        [
            *TINY,
            f"env.id=tests.fault_envs:{env}",
            f"env.kwargs={{step_sleep: {sleep}}}",
            "env.return_min=-100",
            "env.return_max=0",
            "run.eval_every=200",
            "run.eval_episodes=2",
            f"run.output_dir={tmp_path}",
            *extra,
        ],
    )


def assert_counters_agree(trainer: Trainer, summary: dict) -> dict:
    """Every policy handed out was run exactly once: ingested, or dropped as failed."""
    state = ray.get(trainer.learner.state_dict.remote())
    c = state["counters"]
    assert c["episodes"] == summary["episodes"] == state["buffer"]["total_added"]
    assert c["env_steps"] == summary["env_steps"]
    assert c["episodes"] + c["failed_episodes"] == c["next_train_id"], c
    return state


def test_killed_workers_are_replaced_and_their_episodes_reissued(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    from gogepo_ray.callbacks import MLflowTracker

    cfg = point_cfg(tmp_path, "run.workers=2", "run.total_env_steps=1200", sleep=0.01)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(tracking_uri=uri, experiment="faults", every_seconds=0.0)
    trainer = Trainer(cfg, callbacks=[tracker])
    try:
        trainer.run_until(200)
        # SIGKILL a worker's process in the middle of an episode (each takes ~0.4 s) ...
        os.kill(ray.get(trainer.workers[0].pid.remote()), signal.SIGKILL)
        trainer.run_until(600)
        # ... and kill the other one through Ray.
        ray.kill(trainer.workers[1])
        trainer.run_until(cfg.run.total_env_steps)
        summary = trainer.finish()
        assert summary["worker_restarts"] >= 2
        assert summary["env_steps"] >= 1200
        assert_counters_agree(trainer, summary)
    finally:
        trainer.shutdown()
    client = MlflowClient(tracking_uri=uri)
    episodes = client.get_metric_history(tracker.run_id, "train/episodes")
    assert max(m.value for m in episodes) == summary["episodes"]
    steps = client.get_metric_history(tracker.run_id, "train/best_return")
    assert max(m.step for m in steps) == summary["env_steps"]


def test_worker_restart_limit_stops_the_run(ray_session, tmp_path):
    cfg = point_cfg(
        tmp_path,
        "run.workers=1",
        "run.total_env_steps=100000",
        "run.max_worker_restarts=1",
        sleep=0.01,
    )
    trainer = Trainer(cfg)
    try:
        trainer.run_until(100)
        with pytest.raises(TrainingError, match="max_worker_restarts=1"):
            for _ in range(3):
                os.kill(ray.get(trainer.workers[0].pid.remote()), signal.SIGKILL)
                trainer.run_until(trainer.progress.env_steps + 100)
    finally:
        trainer.shutdown()


def _learner_state_after(trainer: Trainer, steps: int) -> dict:
    trainer.run_until(steps)
    trainer._drain_inflight()
    return ray.get(trainer.learner.state_dict.remote())


def _assert_same_state(a: dict, b: dict) -> None:
    for part in ("generator", "critic"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    assert torch.equal(a["buffer"]["params"], b["buffer"]["params"])
    assert torch.equal(a["buffer"]["returns"], b["buffer"]["returns"])
    assert torch.equal(a["rng"], b["rng"])
    for key in ("env_steps", "episodes", "next_train_id", "next_eval_id"):
        assert a["counters"][key] == b["counters"][key], key
    assert a["best_return"] == b["best_return"]
    for key in ("count", "mean", "m2"):
        assert torch.equal(a["obs_stats"][key], b["obs_stats"][key])


def test_interrupted_then_resumed_run_equals_uninterrupted(ray_session, tmp_path):
    over = [
        *TINY,
        "run.workers=1",
        "run.eval_every=150",
        "run.eval_episodes=2",
        "run.checkpoint_every=100000",
    ]
    cfg_a = load_config(IP, [*over, f"run.output_dir={tmp_path / 'a'}"])
    a = Trainer(cfg_a)
    try:
        state_a = _learner_state_after(a, 600)
        evals_a = a.progress.eval_history
    finally:
        a.shutdown()

    cfg_b = load_config(IP, [*over, f"run.output_dir={tmp_path / 'b'}"])
    b = Trainer(cfg_b)
    try:
        b.run_until(300)
        b.save_checkpoint()  # the state a crash would leave behind
    finally:
        b.shutdown()
    resumed = resume_trainer(b.run_dir)
    try:
        state_b = _learner_state_after(resumed, 600)
        evals_b = resumed.progress.eval_history
    finally:
        resumed.shutdown()
    _assert_same_state(state_a, state_b)
    assert [e[:2] for e in evals_a] == [e[:2] for e in evals_b]


def test_sigkilled_driver_resumes_from_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "gogepo_ray", "train", "--no-progress", "--run-dir", str(run_dir)]
    sets = [
        *TINY,
        "env.id=tests.fault_envs:PointEnv",
        "env.kwargs={step_sleep: 0.002}",
        "env.return_min=-100",
        "env.return_max=0",
        "run.workers=1",
        "run.total_env_steps=2400",
        "run.checkpoint_every=400",
        "run.eval_every=400",
        "run.eval_episodes=2",
    ]
    overrides = [x for s in sets for x in ("--set", s)]
    proc = subprocess.Popen(
        [*args, IP, *overrides],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    latest = run_dir / "checkpoints" / "latest.pt"
    deadline = time.monotonic() + 240
    try:
        while not latest.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert latest.exists(), (
            proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no checkpoint"
        )
        before = ckpt.load(latest)["learner"]["counters"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=30)
    assert before["env_steps"] < 2400
    res = subprocess.run(
        [*args[:-2], "--resume", str(run_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    after = ckpt.load(run_dir / "checkpoints" / "final.pt")["learner"]["counters"]
    assert summary["env_steps"] >= 2400 and after["env_steps"] == summary["env_steps"]
    assert after["episodes"] >= before["episodes"]
    assert after["episodes"] + after["failed_episodes"] == after["next_train_id"]


def test_misbehaving_env_episodes_are_dropped_counted_and_logged(ray_session, tmp_path):
    cfg = point_cfg(tmp_path, "run.workers=2", "run.total_env_steps=600", env="FaultyEnv")
    trainer = Trainer(cfg)
    try:
        trainer.run_until(cfg.run.total_env_steps)
        summary = trainer.finish()
        assert_counters_agree(trainer, summary)
    finally:
        trainer.shutdown()
    assert summary["failed_episodes"] > 0 and summary["episodes"] > 0
    rows = [
        json.loads(line) for line in (trainer.run_dir / "failures.jsonl").read_text().splitlines()
    ]
    reasons = {r["reason"] for r in rows}
    assert any("simulated physics blow-up" in r for r in reasons), reasons
    assert any("non-finite" in r for r in reasons), reasons
    assert sum(r["kind"] == "train" for r in rows) == summary["failed_episodes"]


def test_policy_with_nan_output_is_dropped():
    spec = policy_spec("InvertedPendulum-v5", [8])
    params = np.full((2, spec.num_params), 0.1, np.float32)
    params[1, 0] = np.nan
    batch = ParamBatch(
        "train",
        np.arange(2),
        np.arange(2),
        np.zeros(2),
        params,
        0,
        np.zeros(spec.obs_dim),
        np.zeros(spec.obs_dim),
    )
    result = Rollouts("InvertedPendulum-v5", spec).run(batch)
    assert (
        result.failures[0] is None and result.failures[1] == "policy produced a non-finite action"
    )
    # the dropped episode's observations stay out of the statistics delta
    assert result.obs_count == result.lengths[0]


def test_every_episode_failing_stops_with_a_clear_error(tmp_path):
    sets = [
        *TINY,
        "env.id=tests.fault_envs:BrokenEnv",
        "env.return_min=-100",
        "env.return_max=0",
        "run.workers=1",
        "run.max_consecutive_failures=20",
        f"run.output_dir={tmp_path}",
    ]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gogepo_ray",
            "train",
            "--no-progress",
            IP,
            *[x for s in sets for x in ("--set", s)],
        ],
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1
    assert "error: the last 20 training episodes all failed" in res.stderr
    assert "this env is broken" in res.stderr and "Traceback" not in res.stderr


def test_inflight_batches_round_trip_and_old_checkpoints_still_resume():
    from gogepo_ray.core.normalizer import ObsStats
    from gogepo_ray.trainer import _batch_from_state, _batch_to_state

    stats = ObsStats(4)
    stats.update(np.random.default_rng(0).normal(1.0, 2.0, size=(50, 4)))
    batch = ParamBatch(
        "train",
        np.arange(3),
        np.arange(3) + 7,
        np.full(3, 20.0),
        np.ones((3, 10), np.float32),
        stats.count,
        stats.mean,
        stats.m2,
    )
    state = _batch_to_state(batch, -1)
    back = _batch_from_state(state, master_count=999)
    assert back.kind == "train" and back.obs_count == 50 and isinstance(back.obs_count, int)
    for a, b in zip(batch[1:], back[1:]):
        assert np.array_equal(a, b)
    # A checkpoint written when batches carried (mean, std + eps) instead of count and M2:
    # the episodes run again with the same normalisation.
    mean, std = batch.normalizer()
    old = {k: v for k, v in state.items() if k not in ("obs_count", "obs_m2")}
    old |= {"obs_mean": torch.from_numpy(mean), "obs_std": torch.from_numpy(std)}
    rebuilt = _batch_from_state(old, master_count=80)
    assert rebuilt.obs_count == 80
    assert np.allclose(rebuilt.normalizer()[0], mean) and np.allclose(
        rebuilt.normalizer()[1], std, rtol=1e-6
    )
    # ... and one issued before any statistics existed still sees raw observations.
    raw = old | {"obs_mean": torch.zeros(4), "obs_std": torch.ones(4)}
    assert _batch_from_state(raw, master_count=80).obs_count == 0
