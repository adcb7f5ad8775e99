"""Faults a cluster produces, injected on a real local Ray: dying workers, a SIGKILLed
driver, misbehaving envs, and a run where every episode fails."""

from __future__ import annotations

import contextlib
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
from tests.conftest import ROOT, TINY, assert_same_state

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

    from gogepo_ray.tracking import MLflowTracker

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


# The whole learner state, timers aside: networks, optimisers, buffer, observation
# statistics, both RNG states, best return and every counter.
def _assert_same_state(a: dict, b: dict) -> None:
    assert_same_state(a, b, skip={"counters.learner_seconds"})


def _assert_resumed_from(trainer: Trainer, payload: dict) -> None:
    """Right after resuming, before any new episode: the trainer holds the checkpoint's
    state, and that state is well past a fresh start (so a resume that ignored the
    checkpoint cannot pass by replaying the same seeded run)."""
    saved = payload["learner"]
    c = saved["counters"]
    assert c["env_steps"] >= 300 and c["episodes"] > 0 and c["rounds"] > 0, c
    assert c["next_eval_id"] > 0 and saved["best_return"] is not None, c
    assert saved["buffer"]["total_added"] == c["episodes"] == len(saved["buffer"]["returns"])
    assert int(saved["obs_stats"]["count"]) > 0
    assert payload["progress"]["env_steps"] == c["env_steps"]
    assert payload["progress"]["eval_history"], "no evaluation before the checkpoint"
    assert payload["inflight"], "no policy was out on the worker at the checkpoint"
    live = ray.get(trainer.learner.state_dict.remote())
    assert live["counters"] == c, "the resumed learner's counters are not the checkpoint's"
    assert trainer.progress.__dict__ == payload["progress"]  # eval history included
    assert len(trainer._reissue) == len(payload["inflight"])
    assert_same_state(saved, live)


RESUME_SETTINGS = [
    *TINY,
    "run.workers=1",
    "run.eval_every=150",
    "run.eval_episodes=2",
    "run.checkpoint_every=100000",
]


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory) -> tuple[dict, list]:
    """Learner state and evaluations of a run taken to 600 steps without interruption."""
    cfg = load_config(IP, [*RESUME_SETTINGS, f"run.output_dir={tmp_path_factory.mktemp('a')}"])
    trainer = Trainer(cfg)
    try:
        return _learner_state_after(trainer, 600), trainer.progress.eval_history
    finally:
        trainer.shutdown()


def _resume_and_compare(run_dir: Path, uninterrupted: tuple[dict, list]) -> None:
    payload = ckpt.load(run_dir / "checkpoints" / "latest.pt")
    resumed = resume_trainer(run_dir)
    try:
        _assert_resumed_from(resumed, payload)
        state = _learner_state_after(resumed, 600)
        evals = resumed.progress.eval_history
    finally:
        resumed.shutdown()
    state_a, evals_a = uninterrupted
    _assert_same_state(state_a, state)
    assert [e[:2] for e in evals_a] == [e[:2] for e in evals]


def test_interrupted_then_resumed_run_equals_uninterrupted(uninterrupted, tmp_path):
    cfg = load_config(IP, [*RESUME_SETTINGS, f"run.output_dir={tmp_path}"])
    b = Trainer(cfg)
    try:
        b.run_until(300)
        b.save_checkpoint()  # a clean stop: checkpoint, then shut down
    finally:
        b.shutdown()
    _resume_and_compare(b.run_dir, uninterrupted)


# A driver that writes its scheduled checkpoint and is SIGKILLed the moment it is on disk,
# with the worker's next episode in flight.
CRASH_AFTER_CHECKPOINT = """
import os, signal, sys
from gogepo_ray.config import load_config
from gogepo_ray.trainer import Trainer

class KilledAfterCheckpoint:
    def on_checkpoint(self, trainer, path):
        if trainer.progress.env_steps > 0:  # not the run's step-0 checkpoint
            os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, event):  # every other event: nothing
        return lambda *args: None

config, run_dir, *overrides = sys.argv[1:]
trainer = Trainer(load_config(config, overrides), run_dir=run_dir, callbacks=[KilledAfterCheckpoint()])
trainer.run_until(10**9)
"""


def test_crashed_then_resumed_run_equals_uninterrupted(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    # The crashing driver joins the test's Ray instance (as a second driver would join a
    # cluster); Ray ends its actors when the driver process dies.
    gcs = ray.get_runtime_context().gcs_address
    res = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER_CHECKPOINT, IP, str(run_dir), *RESUME_SETTINGS,
         "run.checkpoint_every=300", f"run.output_dir={tmp_path}"],
        cwd=tmp_path, env=os.environ | {"RAY_ADDRESS": gcs}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-3000:])
    _resume_and_compare(run_dir, uninterrupted)


def test_sigkilled_driver_resumes_from_its_checkpoint(tmp_path):
    """`gogepo train --resume` after the driver and its local Ray were SIGKILLed: the run
    goes on from the checkpoint, keeps what came before it (buffer, evaluations) and
    continues its MLflow run. The env draws its start points from OS entropy, so a run
    that started over could not reproduce the checkpoint's returns."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    args = [sys.executable, "-m", "gogepo_ray", "train", "--no-progress", "--run-dir", str(run_dir)]
    sets = [
        *TINY,
        "env.id=tests.fault_envs:PointEnv",
        "env.kwargs={step_sleep: 0.01, unseeded: true}",
        "env.return_min=-100",
        "env.return_max=0",
        "run.workers=1",
        "run.total_env_steps=1200",
        "run.checkpoint_every=400",
        "run.eval_every=200",
        "run.eval_episodes=2",
        "tracking.enabled=true",
    ]
    overrides = [x for s in sets for x in ("--set", s)]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*args, IP, *overrides],
            cwd=tmp_path,
            env=env,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    latest = run_dir / "checkpoints" / "latest.pt"
    run_id_file = run_dir / "mlflow_run_id"
    deadline = time.monotonic() + 240
    try:
        # the first checkpoint after step 0 (the run writes one at step 0 too)
        while not (_trained(latest) and run_id_file.exists()) and time.monotonic() < deadline:
            assert proc.poll() is None, (
                f"the run ended before it was killed:\n{log.read_text()[-3000:]}"
            )
            time.sleep(0.2)
        assert latest.exists() and run_id_file.exists(), log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):  # the driver and the local Ray it started
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    killed_ms = time.time() * 1000
    before = ckpt.load(latest)
    run_id = run_id_file.read_text().strip()
    assert before["learner"]["counters"]["env_steps"] < 1200
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
    final = ckpt.load(run_dir / "checkpoints" / "final.pt")["learner"]
    after = final["counters"]
    assert summary["env_steps"] >= 1200 and after["env_steps"] == summary["env_steps"]
    assert after["episodes"] + after["failed_episodes"] == after["next_train_id"]
    # The buffer goes on from the checkpoint's: its first entries are the checkpoint's,
    # returns drawn from OS entropy that no fresh run would draw again.
    old = before["learner"]["buffer"]
    n = len(old["returns"])
    assert 0 < n < len(final["buffer"]["returns"]), (n, len(final["buffer"]["returns"]))
    assert torch.equal(final["buffer"]["returns"][:n], old["returns"])
    assert torch.equal(final["buffer"]["params"][:n], old["params"])
    # The evaluations from before the kill are kept, as they were.
    evals_before = [[int(s), m] for s, m, _ in before["progress"]["eval_history"]]
    assert evals_before and summary["eval_history"][: len(evals_before)] == evals_before
    # The resumed run continued the MLflow run: one run, the same id, finished, and what the
    # second session logged starts where the checkpoint left off, not at step 0.
    assert run_id_file.read_text().strip() == run_id
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("gogepo").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/episodes")
    resumed_steps = sorted(m.step for m in history if m.timestamp > killed_ms)
    assert resumed_steps, [(m.step, m.timestamp) for m in history]
    assert resumed_steps[0] >= before["progress"]["env_steps"], resumed_steps
    assert resumed_steps[-1] == summary["env_steps"]


def _trained(checkpoint: Path) -> bool:
    return checkpoint.exists() and ckpt.load(checkpoint)["progress"]["env_steps"] > 0


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
