"""Task families: gymnasium envs whose task is chosen by a context vector.

A *task family* is one environment class that stands for many related tasks: the
dynamics are shared and a small real vector, the *context*, picks the task (where
the goal is, how fast to run, which way to walk). A goal-conditioned generator of
policies can then be asked for a policy per context, and the family gives a cheap
way to build and evaluate each task.

Every family env here follows one protocol:

* class attributes ``context_space`` (a float64, 1-D ``gymnasium.spaces.Box``: the
  family's valid contexts), ``context_names`` (one name per dimension) and
  ``default_context``;
* a constructor keyword ``context=None`` (``None`` gives ``default_context``),
  stored as ``env.context``, a read-only float64 array of shape ``(k,)``;
* ``env.reset(seed=..., options={"context": [...]})`` switches the task without
  rebuilding the env; a reset without that option keeps the current context;
* the context is *not* part of the observation: a policy for one task is
  specialised to it by whoever made the policy;
* :func:`check_context` validates a context (the constructor and ``reset`` both use
  it) and :func:`context_space_of` tells whether an env is a family.

The tasks come from the meta-reinforcement-learning literature: the 2-D point
navigation task of MAML (Finn et al., 2017, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks") and ProMP (Rothfuss et al., 2019), and the MuJoCo
locomotion families introduced with MAML and used since then: HalfCheetahVel (run
at a target forward velocity) and AntDir (walk in a given direction; MAML's
version is forward/backward, later work uses any planar angle). The code is
written here from those task descriptions on top of gymnasium's v5 MuJoCo envs.

Importing this module registers ``PointGoal-v0``, ``HalfCheetahVel-v0`` and
``AntDir-v0`` with gymnasium.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = [  # and HalfCheetahVel, AntDir: loaded on first use (module __getattr__)
    "PointGoal",
    "check_context",
    "context_space_of",
]


def _num(x: float) -> str:
    return f"{float(x):g}"


def check_context(space: spaces.Box, names: Sequence[str], value: Any) -> np.ndarray:
    """``value`` as a fresh float64 array of shape ``space.shape``, or ``ValueError``.

    ``space`` is a family's ``context_space`` and ``names`` its ``context_names``.
    A bare number is accepted for a family with a 1-D context.
    """
    names = tuple(names)
    k = int(space.shape[0])
    takes = f"this family takes {k} ({', '.join(names)})"
    if value is None:
        raise ValueError(f"context is None, {takes}")
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"context must be numbers, got {value!r}; {takes}") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"context must be a flat list of numbers, got shape {arr.shape}; {takes}")
    if arr.shape[0] != k:
        n = arr.shape[0]
        raise ValueError(f"context has {n} value{'' if n == 1 else 's'}, {takes}")
    low, high = space.low, space.high
    for i, name in enumerate(names):
        x = arr[i]
        if not math.isfinite(x):
            raise ValueError(f"context {name} is {x}")
        if not low[i] <= x <= high[i]:
            raise ValueError(
                f"context {name} = {_num(x)} is outside the family's valid range "
                f"[{_num(low[i])}, {_num(high[i])}]"
            )
    return arr


def context_space_of(env: gym.Env) -> tuple[spaces.Box, tuple[str, ...]] | None:
    """``(context_space, context_names)`` of a family env (wrapped or not), else ``None``."""
    base = getattr(env, "unwrapped", env)
    space = getattr(base, "context_space", None)
    names = getattr(base, "context_names", None)
    if not isinstance(space, spaces.Box) or names is None:
        return None
    return space, tuple(names)


class _ContextMixin:
    """The context bookkeeping shared by the families."""

    context_space: spaces.Box
    context_names: tuple[str, ...]
    default_context: tuple[float, ...]
    context: np.ndarray

    def _set_context(self, value: Any) -> None:
        if value is None:
            value = self.default_context
        ctx = check_context(self.context_space, self.context_names, value)
        ctx.setflags(write=False)
        self.context = ctx
        self._on_context(ctx)
        # MuJoCo envs pickle (and deepcopy) by rebuilding from their constructor
        # arguments (EzPickle): keep the current task in them.
        ez = getattr(self, "_ezpickle_kwargs", None)
        if ez is not None:
            ez["context"] = ctx.tolist()

    def _on_context(self, ctx: np.ndarray) -> None:
        """Cache whatever the step needs from the new context."""

    def _context_from_options(self, options: dict[str, Any] | None) -> None:
        if options is not None and options.get("context") is not None:
            self._set_context(options["context"])


def _context_box(low: Sequence[float], high: Sequence[float]) -> spaces.Box:
    return spaces.Box(
        low=np.asarray(low, dtype=np.float64),
        high=np.asarray(high, dtype=np.float64),
        dtype=np.float64,
    )


# --------------------------------------------------------------------------- PointGoal


class PointGoal(_ContextMixin, gym.Env):
    """2-D point navigation to a goal (the MAML/ProMP task), pure numpy.

    Observation: the point's position, in the arena ``[-2, 2]^2``. Action: a
    displacement in ``[-0.1, 0.1]^2`` (clipped to that box; the new position is
    clipped to the arena). Reward: minus the distance to the goal after the move.
    It never terminates: ``PointGoal-v0`` has a 100-step time limit. Context: the
    goal ``(goal_x, goal_y)`` in ``[-2, 2]^2``, default ``(0.5, 0.5)``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    context_space = _context_box([-2.0, -2.0], [2.0, 2.0])
    context_names = ("goal_x", "goal_y")
    default_context = (0.5, 0.5)

    ARENA = 2.0
    MAX_STEP = 0.1
    RESET_NOISE = 0.01
    RENDER_SIZE = 128

    def __init__(self, context: Sequence[float] | None = None, render_mode: str | None = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode {render_mode!r} is not supported, "
                f"use one of {self.metadata['render_modes']} or None"
            )
        self.render_mode = render_mode
        a, m = self.ARENA, self.MAX_STEP
        self.observation_space = spaces.Box(-a, a, shape=(2,), dtype=np.float64)
        self.action_space = spaces.Box(-m, m, shape=(2,), dtype=np.float64)
        self._x = 0.0
        self._y = 0.0
        self._gx = self._gy = 0.0
        self._canvas: np.ndarray | None = None
        self._set_context(context)

    def _on_context(self, ctx: np.ndarray) -> None:
        self._gx, self._gy = float(ctx[0]), float(ctx[1])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._context_from_options(options)  # validated before anything changes
        super().reset(seed=seed)
        n = self.RESET_NOISE
        self._x, self._y = (float(v) for v in self.np_random.uniform(-n, n, size=2))
        return np.array((self._x, self._y)), {"distance": self._distance()}

    def _distance(self) -> float:
        return math.hypot(self._x - self._gx, self._y - self._gy)

    def step(self, action):
        # Plain float arithmetic: for two numbers it is several times cheaper than
        # numpy ufuncs on tiny arrays, and step runs millions of times.
        if len(action) != 2:
            raise ValueError(f"PointGoal takes a 2-D action, got {len(action)} values")
        m, a = self.MAX_STEP, self.ARENA
        dx, dy = float(action[0]), float(action[1])
        dx = m if dx > m else (-m if dx < -m else dx)  # NaN passes through ...
        dy = m if dy > m else (-m if dy < -m else dy)
        if dx != dx or dy != dy:  # ... and is refused here, before it reaches the state
            raise ValueError(f"PointGoal action is not finite: {action!r}")
        x, y = self._x + dx, self._y + dy
        self._x = a if x > a else (-a if x < -a else x)
        self._y = a if y > a else (-a if y < -a else y)
        dist = self._distance()
        return np.array((self._x, self._y)), -dist, False, False, {"distance": dist}

    # rendering: a tiny numpy drawing, enough for video recording
    def _to_pixel(self, x: float, y: float) -> tuple[float, float]:
        s, a = self.RENDER_SIZE - 1, self.ARENA
        return (a - y) / (2 * a) * s, (x + a) / (2 * a) * s  # (row, col), y points up

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        size = self.RENDER_SIZE
        if self._canvas is None:
            canvas = np.full((size, size, 3), 245, dtype=np.uint8)
            mid = size // 2
            canvas[mid, :] = canvas[:, mid] = 215  # axes through the origin
            canvas[[0, -1], :] = canvas[:, [0, -1]] = 90  # arena border
            self._canvas = canvas
            self._rows, self._cols = np.mgrid[0:size, 0:size]
        img = self._canvas.copy()
        for (x, y), radius, colour in (
            ((self._gx, self._gy), 5.0, (220, 50, 40)),
            ((self._x, self._y), 3.5, (40, 80, 220)),
        ):
            r, c = self._to_pixel(x, y)
            img[(self._rows - r) ** 2 + (self._cols - c) ** 2 <= radius**2] = colour
        return img


# ------------------------------------------------------------------------ registration

# The MuJoCo families live in ``families_mujoco``: importing MuJoCo reads MUJOCO_GL and
# raises on a bad value, and this module is imported by every command (``gogepo render``
# must get to say which OpenGL backend is wrong). They load on first use.
_MUJOCO = "gogepo_ray.envs.families_mujoco"
_FAMILIES = (
    ("PointGoal-v0", f"{__name__}:PointGoal", 100),
    ("HalfCheetahVel-v0", f"{_MUJOCO}:HalfCheetahVel", 200),
    ("AntDir-v0", f"{_MUJOCO}:AntDir", 200),
)

for _env_id, _entry, _steps in _FAMILIES:
    if _env_id not in gym.registry:
        gym.register(id=_env_id, entry_point=_entry, max_episode_steps=_steps)


def __getattr__(name: str):
    """``families.HalfCheetahVel`` and ``families.AntDir``, imported on first use."""
    if name in ("HalfCheetahVel", "AntDir"):
        import importlib

        return getattr(importlib.import_module(_MUJOCO), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
