"""The MLflow server goes away in the middle of a run: training goes on, the failure is
reported once, and the metrics held back are written when the server returns."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from gogepo_ray.callbacks import JsonlMetrics
from gogepo_ray.config import load_config
from gogepo_ray.tracking import MLflowTracker
from gogepo_ray.trainer import Trainer
from tests.conftest import TINY
from tests.servers import free_ports, start_mlflow_server, stop_server


def kill_now(proc: subprocess.Popen) -> None:
    """The server vanishes at once, as a crashed or preempted pod does."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


pytestmark = pytest.mark.e2e


def test_training_survives_mlflow_server_outage(ray_session, tmp_path, capfd):
    import json
    import math

    from mlflow.tracking import MlflowClient

    (port,) = free_ports(1)
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    cfg = load_config(
        None,
        [
            *TINY,
            "env.id=tests.fault_envs:PointEnv",
            "env.kwargs={step_sleep: 0.003}",
            "env.return_min=-100",
            "env.return_max=0",
            "run.workers=1",
            "run.total_env_steps=1600",
            "run.eval_every=200",
            "run.eval_episodes=1",
            f"run.output_dir={tmp_path / 'runs'}",
            "tracking.enabled=true",
        ],
    )
    tracker = MLflowTracker(
        tracking_uri=uri, experiment="outage", every_seconds=0.0, retry_seconds=1.0
    )
    trainer = Trainer(cfg, callbacks=[JsonlMetrics(every_seconds=0.0), tracker])
    jsonl = trainer.run_dir / "metrics.jsonl"  # both sinks see every event (every_seconds=0)
    try:
        trainer.run_until(400)
        kill_now(server)  # the server goes away mid-run
        outage_begins = len(jsonl.read_text().splitlines())
        t0 = time.monotonic()
        trainer.run_until(1000)
        assert time.monotonic() - t0 < 120  # training did not wait on MLflow
        outage_ends = len(jsonl.read_text().splitlines())
        server = start_mlflow_server(tmp_path, port)  # ... and comes back
        trainer.run_until(cfg.run.total_env_steps)
        summary = trainer.finish()
    finally:
        trainer.shutdown()
        stop_server(server)
    err = capfd.readouterr().err
    assert err.count("warning: MLflow") == 1, err
    assert "metrics.jsonl" in err and "reachable again" in err
    # What reached the server, read from its sqlite store: no third server start.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'srv.db'}")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(tracker.run_id, "train/best_return")}
    assert max(steps) == summary["env_steps"]
    # Every metric that metrics.jsonl recorded while the server was down reached the
    # server once it was back, at its step and with its value (except the ones read off
    # the wall clock, which each sink reads for itself).
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    during = rows[outage_begins:outage_ends]
    assert any("train/best_return" in r for r in during), during
    assert any("eval/return_mean" in r for r in during), during
    clock = {"timers/wall_seconds", "train/env_steps_per_second", "learner/busy"}

    def same(v: float) -> float | str:
        return "nan" if math.isnan(v) else v

    for key in sorted({k for r in during for k in r} - {"train/env_steps"}):
        history = client.get_metric_history(tracker.run_id, key)
        on_server = {(m.step, same(m.value)) for m in history}
        for r in (r for r in during if key in r):
            step = int(r["train/env_steps"])
            if key in clock:
                assert step in {s for s, _ in on_server}, (key, step)
            else:
                assert (step, same(float(r[key]))) in on_server, (key, step, r[key])
