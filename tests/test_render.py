"""`gogepo render`: a tiny real InvertedPendulum-v5 run, rendered offscreen to an mp4 that
is read back frame by frame; `run.render_at_end` logs its video to MLflow; a machine that
cannot render says so in one line.

Needs an OpenGL backend: OSMesa on a CPU machine (`.ci/run` installs libosmesa6; README
"Rendering")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gogepo_ray import render
from tests.conftest import TINY, run_gogepo

ROOT = Path(__file__).resolve().parents[1]
IP = str(ROOT / "configs" / "inverted_pendulum.yaml")
MAX_STEPS = 30


def _frames(path: Path) -> tuple[int, tuple[int, ...]]:
    """Frames decoded from the file (not its header's count), and the first one's shape."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        shapes = [frame.shape for frame in reader]
    finally:
        reader.close()
    return len(shapes), shapes[0]


@pytest.fixture(scope="module")
def tiny_run(ray_session, tmp_path_factory):
    from gogepo_ray.callbacks import JsonlMetrics
    from gogepo_ray.config import load_config
    from gogepo_ray.tracking import MLflowTracker
    from gogepo_ray.trainer import Trainer

    out = tmp_path_factory.mktemp("render")
    cfg = load_config(
        IP,
        [
            *TINY,
            "run.total_env_steps=600",
            "run.eval_every=300",
            "run.eval_episodes=2",
            "run.workers=1",
            "learner.updates_per_episode=0.25",  # learning is not what is tested
            "run.render_at_end=true",
            f"run.output_dir={out}",
        ],
    )
    uri = f"sqlite:///{out / 'mlflow.db'}"
    tracker = MLflowTracker(tracking_uri=uri, experiment="render")
    trainer = Trainer(cfg, run_dir=out / "run", callbacks=[JsonlMetrics(), tracker])
    try:
        trainer.run_until(cfg.run.total_env_steps)
        trainer.finish()
    finally:
        trainer.shutdown()
    return {"run_dir": out / "run", "uri": uri, "run_id": tracker.run_id}


@pytest.mark.e2e
def test_render_writes_a_playable_mp4_with_one_frame_per_step(tiny_run, tmp_path):
    video = tmp_path / "policy.mp4"
    proc = run_gogepo(
        "render",
        str(tiny_run["run_dir"]),
        "--episodes",
        "2",
        "--max-steps",
        str(MAX_STEPS),
        "--out",
        str(video),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    lengths = result["lengths"]
    assert len(lengths) == 2 and all(1 <= n <= MAX_STEPS for n in lengths)
    # InvertedPendulum-v5 pays 1 a step while the pole is up and 0 on the step it falls, so
    # the return says independently how long each episode was.
    for n, ret in zip(lengths, result["returns"]):
        assert ret == (n if n == MAX_STEPS else n - 1)
    expected = sum(n + 1 for n in lengths)  # the reset frame, then one per step
    assert result["frames"] == expected
    count, shape = _frames(video)
    assert count == expected
    assert shape == (480, 480, 3)


@pytest.mark.e2e
def test_render_at_end_logs_the_video_to_mlflow(tiny_run):
    from mlflow.tracking import MlflowClient

    video = tiny_run["run_dir"] / "policy.mp4"
    assert video.is_file()
    count, _ = _frames(video)
    assert 2 <= count <= render.AT_END_MAX_STEPS + 1
    client = MlflowClient(tracking_uri=tiny_run["uri"])
    names = {a.path for a in client.list_artifacts(tiny_run["run_id"])}
    assert "policy.mp4" in names


@pytest.mark.e2e
@pytest.mark.parametrize(
    "gl,needle",
    [
        ("glfw", "apt-get install libglfw3"),  # a real backend, and no display to open
        ("bogus", "MUJOCO_GL=bogus cannot render offscreen"),
    ],
)
def test_a_backend_that_cannot_render_gives_one_error_line(tiny_run, tmp_path, gl, needle):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MUJOCO_GL"] = gl
    video = tmp_path / "policy.mp4"
    proc = run_gogepo("render", str(tiny_run["run_dir"]), "--out", str(video), env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0]
    assert not video.exists()


def test_default_backend(monkeypatch):
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.setattr(render.sys, "platform", "linux")
    monkeypatch.setattr(render.os.path, "exists", lambda p: p == "/dev/nvidiactl")
    assert render.default_gl_backend() == "egl"
    monkeypatch.setattr(render.os.path, "exists", lambda p: False)
    monkeypatch.setattr(render.glob, "glob", lambda pattern: [])
    assert render.default_gl_backend() == "osmesa"
    monkeypatch.setenv("MUJOCO_GL", "EGL")
    assert render.default_gl_backend() == "egl"


def test_bad_output_name_is_a_user_error(tmp_path):
    proc = run_gogepo("render", str(tmp_path), "--out", str(tmp_path / "policy.gif"))
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == f"error: --out must be an .mp4 file, got '{tmp_path / 'policy.gif'}'"
    )
