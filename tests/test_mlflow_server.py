"""`gogepo train` recording to a real MLflow tracking server (as on a cluster), on 127.0.0.1.

The server proxies artifacts (``--artifacts-destination``, the default ``--serve-artifacts``):
experiments get the ``mlflow-artifacts:/`` root and the training process uploads its files
over HTTP, as cluster nodes that cannot see the server's disk must. (With a local
``--default-artifact-root`` the client would write straight into that directory and the
upload path would go untested.)
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from gogepo_ray.config import load_config
from tests import conftest
from tests.servers import ROOT, clean_env, free_ports, start_mlflow_server, stop_server

pytestmark = pytest.mark.e2e

CONFIG = "configs/inverted_pendulum.yaml"
TINY = [
    *conftest.TINY,
    "tracking.enabled=true",
    "run.total_env_steps=200",
    "run.workers=1",
    "run.eval_every=100",
]


@dataclass
class Server:
    url: str
    artifacts: Path


@pytest.fixture(scope="module")
def mlflow_server(request, tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("mlflow-server")
    (port,) = free_ports(1)
    proc = start_mlflow_server(tmp, port)
    request.addfinalizer(lambda: stop_server(proc, grace=30))
    return Server(url=f"http://127.0.0.1:{port}", artifacts=tmp / "art")


@pytest.fixture(scope="module")
def trained(mlflow_server: Server, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("train")
    token = tmp / "ray_token"  # the local ray.init() needs a token: keep it off ~/.ray/auth_token
    token.write_text(secrets.token_hex(32))
    env = clean_env(
        MLFLOW_TRACKING_URI=mlflow_server.url,
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )  # local Ray on 127.0.0.1, not the host's IP
    sets = [a for item in [*TINY, f"run.output_dir={tmp / 'runs'}"] for a in ("--set", item)]
    res = subprocess.run(
        [sys.executable, "-m", "gogepo_ray", "train", CONFIG, *sets, "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning: MLflow" not in res.stderr, res.stderr[-3000:]
    run_id = next((tmp / "runs").glob("*/mlflow_run_id")).read_text().strip()
    return {"run_id": run_id}


@pytest.fixture(scope="module")
def client(mlflow_server: Server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.url)


def test_run_finished_with_flattened_config(trained, client):
    exp = client.get_experiment_by_name("gogepo")
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [trained["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    expected = load_config(ROOT / CONFIG, TINY).flat()
    params = run.data.params
    assert params["env.id"] == "InvertedPendulum-v5"
    assert params["generator.lr"] == str(expected["generator.lr"])
    assert params["run.total_env_steps"] == "200"
    assert params["generator.hidden"] == str(expected["generator.hidden"])


def test_metrics_have_env_step_axis(trained, client):
    evals = client.get_metric_history(trained["run_id"], "eval/return_mean")
    steps = [m.step for m in evals]
    assert len(evals) >= 2 and steps == sorted(steps) and steps[-1] >= 200, steps
    assert "losses/critic" in client.get_run(trained["run_id"]).data.metrics


def test_artifacts_uploaded_through_the_server(trained, client, mlflow_server: Server):
    run_id = trained["run_id"]
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "summary.json", "sweep.csv", "learning_curve.png"} <= names, names
    assert "checkpoints/final.pt" in {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    # ... and they are on the server's side, under --artifacts-destination
    on_server = {
        p.relative_to(mlflow_server.artifacts).as_posix()
        for p in mlflow_server.artifacts.rglob("*")
        if p.is_file()
    }
    assert any(p.endswith(f"{run_id}/artifacts/checkpoints/final.pt") for p in on_server), sorted(
        on_server
    )
