"""Videos of a run's policy: MuJoCo renders offscreen (gymnasium's ``rgb_array`` mode), and
imageio's ffmpeg plugin writes the frames to an mp4 as they come.

The policy runs through the rollout workers' own code (:class:`gogepo_ray.rollout.Rollouts`)
on the policies of the learner's ``propose_eval``, so a video shows exactly what an
evaluation episode does, for either algorithm. Frames stream to the file, one episode at a
time: nothing holds a whole episode of frames in memory.

OpenGL backend (``MUJOCO_GL``): a value the user set is used as it is. Unset on Linux, it
is ``egl`` where a GPU device is visible (``/dev/nvidiactl``, ``/dev/dri/renderD*``) and
``osmesa`` (software rendering) elsewhere. Before any frame the chosen backend opens a
small context in a child process, so a missing system library ends in one
:class:`RenderError` that names the package to install, instead of a traceback or a crash
of the calling process.
"""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gogepo_ray.config import Config
    from gogepo_ray.core.policy import PolicySpec
    from gogepo_ray.types import ParamBatch

# What each backend needs on Debian/Ubuntu (docs/results.md "Rendering a policy video" has other distributions).
GL_PACKAGES = {
    "osmesa": "apt-get install libosmesa6",
    "egl": "apt-get install libegl1 libegl-mesa0 (on an NVIDIA node the driver's EGL; in a "
    "container also NVIDIA_DRIVER_CAPABILITIES=graphics,compute,utility)",
    "glfw": "apt-get install libglfw3, and run it where a display is (DISPLAY)",
}
_READY: set[str] = set()  # backends that opened a context in this process's probe
AT_END_MAX_STEPS = 1000  # the video ``run.render_at_end`` writes: one episode, at most this long

# Opens and frees a 16×16 context; on failure prints the reason as its last line and
# leaves at once (no half-built context's finaliser writing to stderr after it).
_PROBE = """
import os, sys, warnings
warnings.simplefilter("error")  # glfw only warns when it has no display
backend = os.environ["MUJOCO_GL"]
try:
    if backend == "egl":
        from mujoco.egl import GLContext
    elif backend == "osmesa":
        from mujoco.osmesa import GLContext
    else:
        from mujoco.glfw import GLContext
    ctx = GLContext(16, 16)
    ctx.make_current()
    ctx.free()
except BaseException as exc:
    print(f"{type(exc).__name__}: {exc}", flush=True)
    os._exit(1)
"""


class RenderError(ValueError):
    """A video cannot be made here: no usable OpenGL backend, no video writer, or an env
    that does not render. The message says what to install or change."""


def default_gl_backend() -> str | None:
    """``MUJOCO_GL`` when set; on Linux ``egl`` with a GPU device, else ``osmesa``. None on
    other systems, where MuJoCo's own default (glfw, or cgl on macOS) applies."""
    if os.environ.get("MUJOCO_GL"):
        return os.environ["MUJOCO_GL"].strip().lower()
    if not sys.platform.startswith("linux"):
        return None
    gpu = os.path.exists("/dev/nvidiactl") or glob.glob("/dev/dri/renderD*")
    return "egl" if gpu else "osmesa"


def prepare_gl() -> str | None:
    """Choose the backend, check that it opens a context, and export it as ``MUJOCO_GL``
    for this process (before MuJoCo's renderer is first used). Raises RenderError."""
    backend = default_gl_backend()
    if backend is None:
        return None
    if backend not in GL_PACKAGES:
        raise RenderError(
            f"MUJOCO_GL={backend} cannot render offscreen; set MUJOCO_GL=egl (GPU nodes), "
            "osmesa (CPU machines) or glfw (a desktop with a display), or unset it"
        )
    platform = os.environ.get("PYOPENGL_PLATFORM", "").strip().lower()
    if backend in ("egl", "osmesa") and platform and platform != backend:
        raise RenderError(
            f"PYOPENGL_PLATFORM={platform} conflicts with MUJOCO_GL={backend}; unset "
            "PYOPENGL_PLATFORM or set it to the same value"
        )
    if backend in _READY:
        return backend
    env = dict(os.environ, MUJOCO_GL=backend)
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _PROBE],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        raise RenderError(
            f"MUJOCO_GL={backend}: opening an OpenGL context did not finish within 120 s"
        ) from None
    if probe.returncode != 0:
        lines = [ln.strip() for ln in (probe.stderr + probe.stdout).splitlines() if ln.strip()]
        why = lines[-1][:200] if lines else f"exit status {probe.returncode}"
        raise RenderError(
            f"MUJOCO_GL={backend} cannot open an OpenGL context ({why}); install the system "
            f"package: {GL_PACKAGES[backend]}. docs/results.md 'Rendering a policy video' lists the packages"
        )
    os.environ["MUJOCO_GL"] = backend
    _READY.add(backend)
    return backend


def _video_writer(path: Path, fps: float):
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401 - the ffmpeg plugin's binary
    except ImportError as exc:
        raise RenderError(
            f"writing a video needs imageio and imageio-ffmpeg ({exc}); pip install imageio "
            "imageio-ffmpeg"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    # libx264 with yuv420p plays everywhere; it needs frame sides that are multiples of
    # the macro block size (imageio resizes others, with a warning).
    return imageio.get_writer(str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264")


def _recording_env(cfg: Config, max_steps: int | None, sink: Callable[[np.ndarray], None]):
    """The run's env in ``rgb_array`` mode, at most ``max_steps`` steps an episode, handing
    every frame (after reset and after each step) to ``sink``."""
    import gymnasium as gym

    from gogepo_ray.envs import EnvError, make_env

    kwargs = dict(cfg.env.kwargs) | {"render_mode": "rgb_array"}
    try:
        env = make_env(cfg.env.id, kwargs, cfg.env.max_episode_steps)
    except EnvError as exc:
        raise RenderError(
            f"env {cfg.env.id!r} cannot be made with render_mode='rgb_array': {exc}"
        ) from None
    if max_steps is not None:
        env = gym.wrappers.TimeLimit(env, max_steps)

    class Recorder(gym.Wrapper):
        def _frame(self) -> None:
            frame = self.env.render()
            if not isinstance(frame, np.ndarray) or frame.ndim != 3:
                raise RenderError(
                    f"env {cfg.env.id!r} returned no rgb_array frame from render() "
                    f"(got {type(frame).__name__})"
                )
            sink(frame)

        def reset(self, **kwargs: Any):
            out = self.env.reset(**kwargs)
            self._frame()
            return out

        def step(self, action):
            out = self.env.step(action)
            self._frame()
            return out

    return Recorder(env)


@dataclass
class RenderResult:
    path: Path
    fps: float
    frames: int  # every episode's reset frame and one per step: sum(lengths + 1)
    backend: str | None  # MUJOCO_GL used (None: MuJoCo's own default)
    commands: list[float] = field(default_factory=list)  # NaN where the policy takes none
    returns: list[float] = field(default_factory=list)  # the env's true return per episode
    lengths: list[int] = field(default_factory=list)


def render_policy(
    cfg: Config,
    spec: PolicySpec,
    propose: Callable[[], ParamBatch],
    out: str | Path,
    episodes: int = 1,
    max_steps: int | None = None,
    fps: float | None = None,
) -> RenderResult:
    """Run ``episodes`` evaluation episodes, each with a policy from ``propose()`` (a
    one-policy ParamBatch, e.g. ``learner.propose_eval([command], 1)``), and write their
    frames one after the other to ``out`` (mp4). Raises RenderError."""
    from gogepo_ray.rollout import Rollouts

    if episodes < 1:
        raise RenderError("episodes must be at least 1")
    if max_steps is not None and max_steps < 1:
        raise RenderError("max steps must be at least 1")
    path = Path(out)
    if path.suffix.lower() != ".mp4":
        raise RenderError(f"the video file must end in .mp4, got {str(path)!r}")
    backend = prepare_gl()
    frames = 0
    writer = None

    def sink(frame: np.ndarray) -> None:
        nonlocal frames
        writer.append_data(frame)
        frames += 1

    env = _recording_env(cfg, max_steps, sink)

    rollouts = Rollouts(
        cfg.env.id, spec, env_kwargs=cfg.env.kwargs, max_episode_steps=cfg.env.max_episode_steps
    )
    rollouts.env = env  # the workers' rollout code, stepping the recording env
    rate = fps or float(env.metadata.get("render_fps") or 30)
    writer = _video_writer(path, rate)
    result = RenderResult(path, rate, 0, backend)
    try:
        for _ in range(episodes):
            batch = propose()
            if len(batch.episode_ids) != 1:
                raise ValueError(f"propose() gave {len(batch.episode_ids)} policies, expected 1")
            try:
                episode = rollouts.run(batch)
            except RenderError:
                raise
            except Exception as exc:  # a GL failure in this process after a good probe
                raise RenderError(
                    f"rendering {cfg.env.id} with MUJOCO_GL={backend} failed: "
                    f"{type(exc).__name__}: {str(exc)[:200]}"
                ) from None
            if episode.failures[0] is not None:
                raise RenderError(
                    f"the episode failed (MUJOCO_GL={backend}): {episode.failures[0][:300]}"
                )
            result.commands.append(float(batch.commands[0]))
            result.returns.append(float(episode.returns[0]))
            result.lengths.append(int(episode.lengths[0]))
    except BaseException:
        writer.close()
        env.close()
        path.unlink(missing_ok=True)  # no half-written video
        raise
    writer.close()
    env.close()
    result.frames = frames
    return result


def render_at_end(trainer) -> Path | None:
    """``run.render_at_end``: one evaluation episode of the finished run (at most
    AT_END_MAX_STEPS steps) to ``<run_dir>/policy.mp4``. A machine that cannot render
    gets a warning, and the run is unaffected."""
    import ray

    path = trainer.run_dir / "policy.mp4"
    try:
        result = render_policy(
            trainer.cfg,
            trainer.spec,
            # a task family: its first held-out task
            lambda: ray.get(
                trainer.learner.propose_eval.remote(
                    None,
                    1,
                    None if trainer.cfg.context is None else trainer.cfg.context.heldout[:1],
                )
            ),
            path,
            max_steps=AT_END_MAX_STEPS,
        )
    except RenderError as exc:
        print(f"warning: run.render_at_end: no video ({exc})", file=sys.stderr)
        return None
    print(
        f"video of the final policy: {path} ({result.frames} frames, return "
        f"{result.returns[0]:.1f})",
        file=sys.stderr,
    )
    return path


def describe(result: RenderResult) -> str:
    """One line for the CLI."""
    cmds = [c for c in result.commands if math.isfinite(c)]
    cmd = f"command {cmds[0]:g}, " if cmds else ""
    rets = ", ".join(f"{r:.1f}" for r in result.returns)
    return (
        f"wrote {result.path}: {len(result.returns)} episode(s), {cmd}return {rets}; "
        f"{result.frames} frames at {result.fps:g} fps (MUJOCO_GL={result.backend or 'default'})"
    )
