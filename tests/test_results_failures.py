"""Results that never hide a failure: failed episodes stay out of eval and sweep means and
are counted and logged, NaN losses reach both metric sinks, and a call MLflow refuses is
reported once and dropped while the calls after it go on."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from gogepo_ray import checkpoint as ckpt
from gogepo_ray.callbacks import JsonlMetrics
from gogepo_ray.config import load_config
from gogepo_ray.core.learner import Learner
from gogepo_ray.envs import policy_spec
from gogepo_ray.errors import TrainingError
from gogepo_ray.metrics import json_metric
from gogepo_ray.rollout import Rollouts
from gogepo_ray.tracking import MLflowTracker, mlflow_error_is_transient
from gogepo_ray.trainer import Trainer
from tests.conftest import TINY, run_gogepo, train_to_end
from tests.servers import free_ports, start_mlflow_server, stop_server


def point_cfg(tmp_path: Path, env: str, *extra: str):
    return load_config(
        None,
        [
            *TINY,
            f"env.id=tests.fault_envs:{env}",
            "env.return_min=-100",
            "env.return_max=0",
            f"run.output_dir={tmp_path / 'runs'}",
            *extra,
        ],
    )


def write_checkpoint(tmp_path: Path, env: str, seed: int) -> Path:
    """An untrained learner's checkpoint in a run directory, as training would leave it."""
    cfg = point_cfg(tmp_path, env, f"run.seed={seed}")
    learner = Learner(cfg, policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs))
    run_dir = tmp_path / f"{env}-run"
    state = ckpt.payload(cfg=cfg, learner=learner.state_dict(), progress={})
    ckpt.save(run_dir / "checkpoints" / "final.pt", state)
    return run_dir


def replay(run_dir: Path, commands: list[float], episodes: int):
    """The episodes `gogepo eval|sweep` runs from this checkpoint, run here again: the same
    policies and reset seeds, so the same returns and the same failures."""
    payload = ckpt.load(run_dir / "checkpoints" / "final.pt")
    cfg = ckpt.config_of(payload)
    spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
    learner = Learner(cfg, spec)
    learner.load_state_dict(payload["learner"])
    batch = learner.propose_eval(commands, episodes)
    return batch, Rollouts(cfg.env.id, spec).run(batch)


def failure_log(run_dir: Path) -> list[dict]:
    path = run_dir / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------ eval and sweep (CLI)
@pytest.mark.e2e
def test_cli_eval_leaves_failed_episodes_out_counts_and_logs_them(tmp_path):
    run_dir = write_checkpoint(tmp_path, "EvalFaultEnv", seed=1)
    batch, expected = replay(run_dir, [-50.0], 8)
    ok = np.array([f is None for f in expected.failures])
    modes = batch.seeds % 4  # EvalFaultEnv fails by reset seed: 1 reset, 2 mid-episode, 3 NaN
    assert ok.sum() >= 1 and {1, 2, 3} <= set(modes.tolist()), modes  # the case is covered

    res = run_gogepo("eval", str(run_dir), "--command", "-50", "--episodes", "8", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["failed_episodes"] == int((~ok).sum()) and out["episodes"] == int(ok.sum())
    assert out["return_mean"] == pytest.approx(expected.returns[ok].mean())
    # the old mean, with partial returns and the 0 of a failed reset, is not what is shown
    assert out["return_mean"] != pytest.approx(expected.returns.mean())
    assert "failed and are left out" in res.stderr and "failures.jsonl" in res.stderr
    rows = failure_log(run_dir)
    assert len(rows) == (~ok).sum()
    assert {r["source"] for r in rows} == {"gogepo eval"}
    assert sorted(r["episode_id"] for r in rows) == sorted(batch.episode_ids[~ok].tolist())
    reasons = " ".join(r["reason"] for r in rows)
    assert "simulated reset failure" in reasons and "non-finite" in reasons

    res = run_gogepo("eval", str(run_dir), "--command", "-50", "--episodes", "8")
    assert res.returncode == 0, res.stderr
    assert f"over {ok.sum()} episodes ({(~ok).sum()} failed, left out)" in res.stdout


@pytest.mark.e2e
def test_cli_eval_where_every_episode_fails_shows_nan_not_zero(tmp_path):
    run_dir = write_checkpoint(tmp_path, "BrokenEnv", seed=0)
    res = run_gogepo("eval", str(run_dir), "--command", "-50", "--episodes", "3", "--json")
    assert res.returncode == 1, res.stderr  # nothing was measured
    out = json.loads(res.stdout)  # valid JSON: NaN is written as the string "NaN"
    assert out["return_mean"] == "NaN" and math.isnan(float(out["return_mean"]))
    assert out["failed_episodes"] == 3 and out["episodes"] == 0
    assert len(failure_log(run_dir)) == 3
    res = run_gogepo("eval", str(run_dir), "--command", "-50", "--episodes", "3")
    assert res.returncode == 1 and "return nan ± nan  over 0 episodes (3 failed" in res.stdout


@pytest.mark.e2e
def test_cli_sweep_leaves_failed_episodes_out_counts_and_logs_them(tmp_path):
    run_dir = write_checkpoint(tmp_path, "EvalFaultEnv", seed=1)
    cfg = point_cfg(tmp_path, "EvalFaultEnv")
    commands = np.linspace(cfg.env.return_min, cfg.env.return_max, 3).tolist()
    batch, expected = replay(run_dir, commands, 4)
    ok = np.array([f is None for f in expected.failures]).reshape(3, 4)
    returns = expected.returns.reshape(3, 4)
    assert (ok.sum(1) == 0).any() and (ok.sum(1) > 0).any(), ok  # the case is covered

    res = run_gogepo(
        "sweep", str(run_dir), "--commands", "3", "--episodes", "4", "--out", str(tmp_path / "sw")
    )
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "sw.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["command", "achieved_mean", "achieved_std", "episodes", "failed"]
    for row, o, r in zip(rows, ok, returns):
        assert int(row["failed"]) == (~o).sum() and int(row["episodes"]) == o.sum()
        if o.any():
            assert float(row["achieved_mean"]) == pytest.approx(r[o].mean(), rel=1e-5)
        else:  # every episode of this command failed: NaN, not a partial return or 0
            assert math.isnan(float(row["achieved_mean"]))
    assert f"{(~ok).sum()} of 12 episodes failed and are left out" in res.stdout
    logged = failure_log(run_dir)
    assert len(logged) == (~ok).sum() and {r["source"] for r in logged} == {"gogepo sweep"}
    assert sorted(r["episode_id"] for r in logged) == sorted(
        batch.episode_ids[~ok.ravel()].tolist()
    )


# ------------------------------------------------------------------ end-of-training sweep (Ray)
@pytest.mark.e2e
def test_end_of_training_sweep_leaves_failed_episodes_out(ray_session, tmp_path):
    cfg = point_cfg(
        tmp_path,
        "EvalFaultEnv",
        "run.workers=1",
        "run.total_env_steps=200",
        "run.eval_every=200",
        "run.eval_episodes=4",
        "run.sweep_commands=8",
    )
    summary, trainer = train_to_end(cfg)
    saved = json.loads((trainer.run_dir / "summary.json").read_text())
    assert saved["sweep_failed_episodes"] == summary["sweep_failed_episodes"] > 0
    assert 0 <= saved["final_eval_failed_episodes"] <= cfg.run.eval_episodes
    with open(trainer.run_dir / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sum(int(r["failed"]) for r in rows) == summary["sweep_failed_episodes"]
    logged = [r for r in failure_log(trainer.run_dir) if r.get("source") == "sweep"]
    assert len(logged) == summary["sweep_failed_episodes"]
    failed_commands = sorted(round(r["command"], 3) for r in logged)
    for row in rows:  # one episode per command: failed means no result, not a partial one
        assert int(row["episodes"]) + int(row["failed"]) == 1
        assert math.isnan(float(row["achieved_mean"])) == (row["failed"] == "1")
    assert failed_commands == sorted(
        round(float(r["command"]), 3) for r in rows if r["failed"] == "1"
    )


# ------------------------------------------------------------------ non-finite metrics
def test_json_metric_keeps_non_finite_values_as_valid_json():
    row = {"a": 1.5, "b": math.nan, "c": math.inf, "d": -math.inf}
    line = json.dumps({k: json_metric(v) for k, v in row.items()}, allow_nan=False)
    back = {k: float(v) for k, v in json.loads(line).items()}
    assert back["a"] == 1.5 and math.isnan(back["b"]) and back["c"] == math.inf
    assert back["d"] == -math.inf


@pytest.mark.e2e
def test_nan_loss_reaches_both_sinks_and_is_warned_once(ray_session, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    # A critic learning rate this large diverges on the first update: a real NaN loss.
    cfg = point_cfg(
        tmp_path,
        "PointEnv",
        "critic.lr=1e12",
        "run.workers=1",
        "run.total_env_steps=400",
        "run.eval_every=10000",
        "run.max_consecutive_failures=6",
        "tracking.enabled=true",
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(tracking_uri=uri, experiment="nan", every_seconds=0.0)
    trainer = Trainer(cfg, callbacks=[JsonlMetrics(every_seconds=0.0), tracker])
    try:
        with pytest.raises(TrainingError):  # the NaN generator's policies all fail
            trainer.run_until(cfg.run.total_env_steps)
        tracker.fail()
    finally:
        trainer.shutdown()
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"not valid JSON: {c}"))
    logged = [r["losses/critic"] for r in rows if "losses/critic" in r]
    assert logged and all(v in ("NaN", "Infinity", "-Infinity") for v in logged), logged
    history = MlflowClient(uri).get_metric_history(tracker.run_id, "losses/critic")
    assert history
    # MLflow keeps NaN; it stores ±inf as ±float max
    assert all(math.isnan(m.value) or abs(m.value) >= 1e308 for m in history), history
    err = capfd.readouterr().err
    assert err.count("warning: losses/critic is") == 1, err
    assert err.count("warning: losses/generator is") == 1, err


# ------------------------------------------------------------------ permanent MLflow errors
def test_mlflow_errors_are_sorted_into_transient_and_permanent(tmp_path, monkeypatch):
    from mlflow.entities import Metric
    from mlflow.exceptions import RestException
    from mlflow.tracking import MlflowClient

    def error_of(fn) -> Exception:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            return exc
        raise AssertionError("the call succeeded")

    local = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run_id = local.create_run(local.create_experiment("e")).info.run_id
    bad_name = error_of(lambda: local.log_batch(run_id, metrics=[Metric("a@b", 1.0, 0, 0)]))
    local.delete_run(run_id)
    deleted = error_of(lambda: local.log_batch(run_id, metrics=[Metric("a", 1.0, 0, 0)]))
    (port,) = free_ports(1)  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as MLflowTracker sets it
    refused = error_of(lambda: MlflowClient(f"http://127.0.0.1:{port}").get_run(run_id))
    assert mlflow_error_is_transient(refused), refused
    assert not mlflow_error_is_transient(bad_name), bad_name
    assert not mlflow_error_is_transient(deleted), deleted
    # what the REST client raises for a server's JSON error answer
    assert mlflow_error_is_transient(RestException({"error_code": "TEMPORARILY_UNAVAILABLE"}))
    assert mlflow_error_is_transient(RestException({"error_code": "REQUEST_LIMIT_EXCEEDED"}))
    assert not mlflow_error_is_transient(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST"}))
    assert not mlflow_error_is_transient(ValueError("a bug in this process"))


@pytest.mark.e2e
def test_permanent_mlflow_error_is_reported_once_and_later_metrics_still_arrive(
    ray_session, tmp_path, capfd
):
    from mlflow.tracking import MlflowClient

    (port,) = free_ports(1)
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    cfg = point_cfg(
        tmp_path,
        "PointEnv",
        "run.workers=1",
        "run.total_env_steps=600",
        "run.eval_every=200",
        "run.eval_episodes=1",
        "tracking.enabled=true",
    )
    tracker = MLflowTracker(
        tracking_uri=uri, experiment="refused", every_seconds=0.0, retry_seconds=0.5, end_timeout=30
    )
    trainer = Trainer(cfg, callbacks=[JsonlMetrics(every_seconds=0.0), tracker])
    try:
        trainer.run_until(200)
        refused_at = trainer.progress.env_steps
        # A metric name the server does not accept ("@"): this call can never succeed.
        tracker.log({"custom/return@best": 1.0}, refused_at)
        tracker.log({"custom/return@best": 2.0}, refused_at)  # same kind: not reported again
        trainer.run_until(cfg.run.total_env_steps)
        summary = trainer.finish()
        err = capfd.readouterr().err
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(tracker.run_id)
        history = client.get_metric_history(tracker.run_id, "train/best_return")
        evals = client.get_metric_history(tracker.run_id, "eval/return_mean")
    finally:
        trainer.shutdown()
        stop_server(server)
    assert err.count("MLflow refused") == 1, err
    assert "2 MLflow calls were refused in all" in err
    assert "custom/return@best" in err and "not retried" in err
    assert "retried every" not in err  # no outage was reported: the server was up
    assert run.info.status == "FINISHED"
    rows = [
        json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    train_steps = {r["train/env_steps"] for r in rows if "train/best_return" in r}
    eval_steps = [r["train/env_steps"] for r in rows if "eval/return_mean" in r]
    # metrics.jsonl is complete: every learner update and every evaluation, to the end ...
    assert max(train_steps) == summary["env_steps"]
    assert len(eval_steps) == len(summary["eval_history"])
    # ... and every step it holds reached MLflow, those after the refused call included
    assert train_steps == {m.step for m in history}
    assert any(s > refused_at for s in train_steps)
    assert sorted(eval_steps) == sorted(m.step for m in evals)
