"""`gogepo submit` / `gogepo jobs` against a real Ray head started with `ray start --head`,
token authentication on, everything on 127.0.0.1.

The head is a separate Ray instance (own ports, own --temp-dir, own session); the CLI talks to
it over HTTP only, so the session-wide ``ray_session`` fixture may run in the same process.
The token lives in a temporary file named by RAY_AUTH_TOKEN_PATH (~/.ray/auth_token is not
touched). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes this a head-only cluster whose node IP is
127.0.0.1 (Ray otherwise replaces 127.0.0.1 with the host's outward-facing address).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import conftest
from tests.servers import (
    BIN,
    clean_env,
    free_ports,
    http_status,
    log_tail,
    start_server,
    stop_server,
    wait_http_ok,
)

pytestmark = pytest.mark.e2e

TINY = [
    *conftest.TINY,
    "tracking.enabled=true",
    "run.total_env_steps=200",
    "run.workers=1",
    "run.eval_every=100",
]


@dataclass
class Head:
    url: str
    env: dict[str, str]  # what a client needs: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH
    tmp: Path
    token: str


@pytest.fixture(scope="module")
def ray_head(request) -> Head:
    # Short path: Ray's unix sockets live under --temp-dir (limit ~107 characters).
    tmp = Path(tempfile.mkdtemp(prefix="gogepo-head-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
    token_file = tmp / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    gcs, dash, client, metrics, agent_http, agent_grpc, runtime_env, node_mgr, obj_mgr = free_ports(
        9
    )
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        f"--ray-client-server-port={client}",
        f"--metrics-export-port={metrics}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        "--num-cpus=4",
        f"--temp-dir={tmp / 'ray'}",
        "--disable-usage-stats",
    ]
    env = clean_env(**auth, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    log = tmp / "head.log"
    proc = start_server(cmd, env, log, cwd=tmp)

    def stop() -> None:
        leftover = stop_server(proc)
        if leftover:
            print(f"ray head: killed {len(leftover)} leftover processes", file=sys.stderr)

    request.addfinalizer(stop)  # runs before the rmtree above (finalizers are LIFO)
    wait_http_ok(f"http://127.0.0.1:{dash}/api/gcs_healthz", proc, log, timeout=120)
    head = Head(url=f"http://127.0.0.1:{dash}", env=clean_env(**auth), tmp=tmp, token=token)
    yield head
    if proc.poll() is not None:
        pytest.fail(f"the Ray head exited during the tests:\n{log_tail(log)}")


def gogepo(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return conftest.run_gogepo(*args, env=env, timeout=timeout)


def test_submit_follow_succeeds_and_records_mlflow_run(ray_head: Head, tmp_path: Path):
    db = tmp_path / "mlflow.db"
    env = {**ray_head.env, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    sets = [a for item in TINY for a in ("--set", item)]
    started = time.monotonic()
    res = gogepo(
        "submit",
        "configs/inverted_pendulum.yaml",
        "--address",
        ray_head.url,
        "--follow",
        "--timeout",
        "300",
        *sets,
        env=env,
        timeout=360,
    )
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    job_id = res.stdout.splitlines()[0]
    assert re.fullmatch(r"raysubmit_\w+", job_id), res.stdout[:500]
    assert f"{job_id}: SUCCEEDED" in res.stdout.splitlines()[-1]
    assert '"env_steps"' in res.stdout  # the job's own output (its summary) was streamed
    print(f"submit --follow: {time.monotonic() - started:.1f} s; {res.stdout.splitlines()[-1]}")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("gogepo")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["env.id"] == "InvertedPendulum-v5"
    assert run.data.params["run.total_env_steps"] == "200"
    assert "eval/return_mean" in run.data.metrics

    res = gogepo("jobs", "status", job_id, "--address", ray_head.url, env=ray_head.env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{job_id}: SUCCEEDED")
    print(f"jobs status: {res.stdout.strip()}")

    res = gogepo("jobs", "list", "--address", ray_head.url, env=ray_head.env)
    assert res.returncode == 0, res.stderr
    assert any(line.startswith(job_id) and "SUCCEEDED" in line for line in res.stdout.splitlines())

    res = gogepo("jobs", "logs", job_id, "--address", ray_head.url, env=ray_head.env)
    assert res.returncode == 0, res.stderr
    assert "run directory:" in res.stdout


def job_status(head: Head, job_id: str) -> str:
    req = urllib.request.Request(
        f"{head.url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {head.token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)["status"]


def test_stop_a_job(ray_head: Head):
    res = gogepo(
        "submit",
        "configs/inverted_pendulum.yaml",
        "--address",
        ray_head.url,
        *[a for item in [*TINY, "run.total_env_steps=1000000"] for a in ("--set", item)],
        env={**ray_head.env, "MLFLOW_TRACKING_URI": f"sqlite:///{ray_head.tmp / 'stop.db'}"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    job_id = res.stdout.strip()
    deadline = time.monotonic() + 120
    while (status := job_status(ray_head, job_id)) == "PENDING" and time.monotonic() < deadline:
        time.sleep(1)
    assert status == "RUNNING", status
    res = gogepo("jobs", "stop", job_id, "--address", ray_head.url, env=ray_head.env)
    assert res.returncode == 0, res.stderr
    assert f"stop requested for {job_id}" in res.stdout
    # --follow ends with the final status and a non-zero exit for anything but SUCCEEDED
    res = gogepo(
        "jobs",
        "logs",
        job_id,
        "--address",
        ray_head.url,
        "--follow",
        "--timeout",
        "90",
        env=ray_head.env,
        timeout=150,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stdout.splitlines()[-1].startswith(f"{job_id}: STOPPED"), res.stdout[-2000:]


def test_auth_stays_on(ray_head: Head):
    assert http_status(f"{ray_head.url}/api/jobs/") == 401
    assert (
        http_status(f"{ray_head.url}/api/jobs/", {"Authorization": "Bearer not-the-token"}) == 403
    )
    assert (
        http_status(f"{ray_head.url}/api/jobs/", {"Authorization": f"Bearer {ray_head.token}"})
        == 200
    )


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def test_client_errors_are_one_line(ray_head: Head, tmp_path: Path):
    no_mode = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_MODE"}
    line = _one_error_line(gogepo("jobs", "list", "--address", ray_head.url, env=no_mode))
    assert "401" in line and "RAY_AUTH_MODE=token" in line

    bad = tmp_path / "bad_token"
    bad.write_text("0" * 64)
    wrong = {**ray_head.env, "RAY_AUTH_TOKEN_PATH": str(bad)}
    line = _one_error_line(gogepo("jobs", "list", "--address", ray_head.url, env=wrong))
    assert "403" in line and "rejected" in line

    (port,) = free_ports(1)
    line = _one_error_line(
        gogepo("jobs", "list", "--address", f"http://127.0.0.1:{port}", env=ray_head.env)
    )
    assert "cannot reach" in line

    line = _one_error_line(
        gogepo("jobs", "status", "raysubmit_nosuchjob", "--address", ray_head.url, env=ray_head.env)
    )
    assert "does not exist" in line

    # A bad config fails locally, before anything is uploaded or submitted.
    res = gogepo(
        "submit",
        "configs/inverted_pendulum.yaml",
        "--set",
        "run.workers=0",
        "--address",
        f"http://127.0.0.1:{port}",
        env=ray_head.env,
    )
    assert _one_error_line(res).startswith("error: invalid config") and "run.workers" in res.stderr
