"""`gogepo submit` on the submitting machine, with no cluster: what it uploads as the job's
working directory (packed by Ray's own code, as the job SDK packs it) and when it warns about
a tracking URI that the cluster cannot share."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from gogepo_ray import cli
from gogepo_ray.integrations import jobs
from tests.conftest import ROOT

# Files that a clone in use holds, and whether the README says the job gets them.
WORKING_DIR = {
    "configs/inverted_pendulum.yaml": True,
    "gogepo_ray/trainer.py": True,
    "bench/measured/scaling.json": True,
    "README.md": True,
    ".gitignore": True,
    ".venv/bin/python": False,
    ".venv/lib/site.py": False,
    "runs/IP-s0/summary.json": False,
    "mlruns/0/meta.yaml": False,
    "mlartifacts/1/model.pt": False,
    "mlflow.db": False,
    "notes/old.db": False,
    ".git/HEAD": False,
    "bench/results/mine.json": False,
    "gogepo_ray/__pycache__/trainer.cpython-311.pyc": False,
    "secret/token.txt": False,  # listed in .gitignore
}


class FakeJobClient:
    """Stands in for Ray's JobSubmissionClient: records the submission and packs the
    working directory with Ray's packaging functions, as submit_job would before upload."""

    submitted: list[dict] = []

    def __init__(self, address: str) -> None:
        self.address = address

    def submit_job(self, **kwargs) -> str:
        from ray._private.runtime_env.packaging import create_package
        from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

        packed: list[str] = []

        def upload(working_dir: str, excludes: list[str], is_file: bool = False) -> None:
            target = Path(working_dir).parent / "package.zip"
            create_package(working_dir, target, include_gitignore=True, excludes=excludes)
            with zipfile.ZipFile(target) as z:
                packed.extend(n for n in z.namelist() if not n.endswith("/"))
            target.unlink()

        upload_working_dir_if_needed(dict(kwargs["runtime_env"]), True, upload_fn=upload)
        self.submitted.append(kwargs | {"uploaded": sorted(packed)})
        return "raysubmit_fake"


@pytest.fixture
def working_dir(tmp_path, monkeypatch) -> Path:
    wd = tmp_path / "clone"
    for rel in WORKING_DIR:
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text("x\n")
    shutil.copy(ROOT / "configs" / "inverted_pendulum.yaml", wd / "configs")
    (wd / ".gitignore").write_text("secret/\n")
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobClient)
    monkeypatch.setattr(jobs, "_check_reachable", lambda address: None)
    monkeypatch.setattr(FakeJobClient, "submitted", [])
    monkeypatch.chdir(wd)
    return wd


def submit(address: str) -> int:
    return cli.main(
        ["submit", "configs/inverted_pendulum.yaml", "--address", address, "--set", "run.workers=4"]
    )


@pytest.mark.parametrize("ray_defaults", [True, False], ids=["ray-defaults", "no-ray-defaults"])
def test_submit_uploads_the_working_dir_without_local_state(
    working_dir, monkeypatch, capsys, ray_defaults
):
    # Ray skips .git, .venv and __pycache__ by itself unless told otherwise: the README's
    # list must hold without that too.
    if not ray_defaults:
        monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert submit("http://ray-head.example:8265") == 0
    assert capsys.readouterr().out.splitlines()[0] == "raysubmit_fake"
    (job,) = FakeJobClient.submitted
    assert job["entrypoint"] == (
        "python -m gogepo_ray train configs/inverted_pendulum.yaml --set run.workers=4"
    )
    assert Path(job["runtime_env"]["working_dir"]) == working_dir
    assert job["uploaded"] == sorted(rel for rel, sent in WORKING_DIR.items() if sent)


@pytest.mark.parametrize(
    "uri, address, warns",
    [
        ("sqlite:///runs/mlflow.db", "http://ray-head.example:8265", True),
        ("file:///home/me/mlruns", "http://10.0.0.5:8265", True),
        ("runs/mlruns", "http://ray-head.example:8265", True),
        ("http://mlflow:5000", "http://ray-head.example:8265", False),
        ("https://mlflow.example", "http://ray-head.example:8265", False),
        ("sqlite:///runs/mlflow.db", "http://127.0.0.1:8265", False),  # the cluster is here
        (None, "http://ray-head.example:8265", False),
    ],
)
def test_local_tracking_uri_warns_and_is_passed_on(
    working_dir, monkeypatch, capsys, uri, address, warns
):
    if uri is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert submit(address) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    if warns:
        assert len(warning) == 1 and f"MLFLOW_TRACKING_URI={uri} is a local store" in warning[0]
        assert "tracking server (http://...)" in warning[0]
    else:
        assert not warning, err
    (job,) = FakeJobClient.submitted
    passed = job["runtime_env"].get("env_vars", {})
    assert passed == ({} if uri is None else {"MLFLOW_TRACKING_URI": uri})
