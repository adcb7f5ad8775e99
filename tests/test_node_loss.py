"""Node loss on a real multi-node Ray cluster (tests/node_loss.py runs each scenario in a
process of its own). Each scenario is bounded by a timeout: a run that hangs on a worker
that can never be placed, or on a learner that never comes back, fails here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

SCENARIO_TIMEOUT_S = 240


def scenario(case: str, tmp_path: Path) -> dict:
    out = tmp_path / case
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # A temp dir of its own: a Cluster records its address in <temp dir>/ray_current_cluster,
    # where any ray.init() on the machine would find it and join it while it lives. (Short:
    # Ray's socket paths must fit in 107 characters.)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="nl", dir="/tmp")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.node_loss", case, str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # the scenario and its cluster
            os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{case}: still running after {SCENARIO_TIMEOUT_S} s:\n{log[-4000:]}")
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 0, f"{case} failed:\n{log[-4000:]}"
    result = json.loads((out / "result.json").read_text())
    result["log"], result["run_dir"] = log, out / "run"
    return result


def assert_nothing_lost_or_doubled(result: dict) -> dict:
    """Episodes in the buffer = episodes taken in − those counted lost; every policy handed
    out ran once; the observation statistics count the buffer's steps; the evaluations'
    trained-steps labels never run ahead of training."""
    assert "error" not in result, result["error"]
    summary, learner = result["summary"], result["learner"]
    assert summary["env_steps"] >= 3000
    assert learner["episodes"] == summary["episodes"] == learner["buffer_total_added"]
    assert learner["episodes"] + learner["failed_episodes"] == learner["next_train_id"]
    assert learner["env_steps"] == summary["env_steps"] == learner["obs_count"]
    steps = [s for s, _ in summary["eval_history"]]
    assert steps == sorted(steps) and steps[-1] <= summary["env_steps"], steps
    assert (result["run_dir"] / "summary.json").exists()
    return summary


def test_worker_node_lost_without_spare_capacity_finishes_with_fewer_workers(tmp_path):
    result = scenario("no_spare", tmp_path)
    summary = assert_nothing_lost_or_doubled(result)
    assert summary["worker_restarts"] == 1 and summary["workers_alive"] == 1, summary
    assert "run.worker_placement_timeout_s" in result["log"]
    assert "the run goes on with 1 of 2 workers" in result["log"]


def test_worker_node_lost_with_a_spare_node_is_replaced(tmp_path):
    summary = assert_nothing_lost_or_doubled(scenario("spare_node", tmp_path))
    assert summary["worker_restarts"] == 1 and summary["workers_alive"] == 2, summary


def test_last_worker_node_lost_stops_with_the_checkpoint_and_resume(tmp_path):
    result = scenario("no_worker_left", tmp_path)
    error = result.get("error", "")
    run_dir = result["run_dir"]
    assert "no rollout worker is left" in error, result
    assert f"gogepo train --resume {run_dir}" in error and str(run_dir / "checkpoints") in error
    assert (run_dir / "checkpoints" / "latest.pt").exists()


def test_learner_node_lost_restarts_the_learner_from_its_checkpoint(tmp_path):
    result = scenario("learner_node", tmp_path)
    summary = assert_nothing_lost_or_doubled(result)
    assert summary["learner_restarts"] == 1, summary
    assert summary["lost_episodes"] > 0 and summary["lost_env_steps"] > 0, summary
    rows = [json.loads(line) for line in (result["run_dir"] / "failures.jsonl").open()]
    lost = [r for r in rows if r["kind"] == "lost"]
    assert len(lost) == summary["lost_episodes"]
    assert sum(r["length"] for r in lost) == summary["lost_env_steps"]
    assert "restarting it from" in result["log"]


def test_learner_node_lost_with_no_restarts_left_names_resume_then_resume_finishes(tmp_path):
    result = scenario("cli_learner_node", tmp_path)
    first, run_dir = result["first"], result["run_dir"]
    assert result["checkpoint_steps"] > 0
    assert first["returncode"] == 1, first
    errors = [line for line in first["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, first["stderr"]
    assert "run.max_learner_restarts=0" in errors[0]
    assert f"gogepo train --resume {run_dir}" in errors[0]
    assert "Traceback" not in first["stderr"] and "Unhandled error" not in first["stderr"]
    assert result["resumed"]["returncode"] == 0, result["resumed"]
    assert result["summary"]["env_steps"] >= 3000


def test_rllib_algorithm_recovers_a_dead_learner_inside_train(ray_session, tmp_path):
    """The RLlib wrapper drives the same trainer: a learner that dies between two
    ``train()`` calls is rebuilt inside the next one (here from the run's step-0 checkpoint),
    so a Tune trial goes on without Tune's retry."""
    import ray

    from tests.test_rllib import small_config

    algo = (
        small_config(workers=1).training(gogepo={"run": {"output_dir": str(tmp_path)}}).build_algo()
    )
    try:
        algo.train()
        trainer = algo.trainer
        taken_in = trainer.progress.episodes
        ray.kill(trainer.learner, no_restart=True)
        result = algo.train()
        p = trainer.progress
        assert p.learner_restarts == 1 and p.lost_episodes >= taken_in > 0, p
        assert result["num_env_steps_sampled_lifetime"] == p.env_steps >= 600
        state = ray.get(trainer.learner.state_dict.remote())
        assert state["counters"]["episodes"] == p.episodes == state["buffer"]["total_added"]
        assert state["counters"]["env_steps"] == p.env_steps == int(state["obs_stats"]["count"])
    finally:
        algo.stop()
