"""The MuJoCo task families of ``gogepo_ray.envs.families`` (HalfCheetahVel, AntDir), apart so
that importing the family protocol does not import MuJoCo. See ``gogepo_ray.envs.families``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import utils
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

from gogepo_ray.envs.families import _context_box, _ContextMixin

# ---------------------------------------------------------------------- HalfCheetahVel


class HalfCheetahVel(_ContextMixin, HalfCheetahEnv):
    """HalfCheetah-v5 that must run at a target forward velocity.

    Reward: ``-forward_reward_weight * |x_velocity - target_velocity| - ctrl_cost``,
    with HalfCheetah-v5's own forward velocity and control cost (``ctrl_cost_weight``
    0.1 by default); other keywords go to ``HalfCheetahEnv``. ``HalfCheetahVel-v0``
    has the meta-RL horizon of 200 steps. Context: ``(target_velocity,)`` in
    ``[0, 3]``, default ``1.0``. The info of a step holds v5's keys
    (``x_position``, ``x_velocity``, ``reward_forward``: the velocity term,
    ``reward_ctrl``) plus ``target_velocity`` and ``velocity_error``
    (``x_velocity - target_velocity``, signed).
    """

    context_space = _context_box([0.0], [3.0])
    context_names = ("target_velocity",)
    default_context = (1.0,)

    def __init__(self, context: Sequence[float] | float | None = None, **kwargs: Any):
        self._target_velocity = 0.0
        self._set_context(context)  # before the parent builds anything: fail fast
        super().__init__(**kwargs)
        # The parent recorded its own positional arguments for pickling; this
        # class's constructor takes keywords only.
        utils.EzPickle.__init__(self, context=self.context.tolist(), **kwargs)

    def _on_context(self, ctx: np.ndarray) -> None:
        self._target_velocity = float(ctx[0])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._context_from_options(options)
        return super().reset(seed=seed, options=options)

    def _get_rew(self, x_velocity: float, action):
        error = x_velocity - self._target_velocity
        velocity_reward = -self._forward_reward_weight * abs(error)
        ctrl_cost = self.control_cost(action)
        reward_info = {
            "reward_forward": velocity_reward,
            "reward_ctrl": -ctrl_cost,
            "target_velocity": self._target_velocity,
            "velocity_error": error,
        }
        return velocity_reward - ctrl_cost, reward_info

    def _get_reset_info(self):
        return {**super()._get_reset_info(), "target_velocity": self._target_velocity}


# ------------------------------------------------------------------------------ AntDir


class AntDir(_ContextMixin, AntEnv):
    """Ant-v5 that must walk in a given planar direction.

    Reward: ``forward_reward_weight * (v_x cos a + v_y sin a)`` (the main body's
    velocity along the direction ``a``) ``+ healthy_reward - ctrl_cost -
    contact_cost``, all of those Ant-v5's own terms; termination when unhealthy is
    Ant-v5's. ``AntDir-v0`` has a 200-step time limit. Context: ``(direction,)``,
    an angle in radians in ``[-pi, pi]``, default ``0`` (Ant-v5's +x). In the
    info, ``reward_forward`` is the directional term; ``direction`` and
    ``direction_velocity`` are added.
    """

    context_space = _context_box([-math.pi], [math.pi])
    context_names = ("direction",)
    default_context = (0.0,)

    def __init__(self, context: Sequence[float] | float | None = None, **kwargs: Any):
        self._direction = 0.0
        self._cos, self._sin = 1.0, 0.0
        self._set_context(context)
        super().__init__(**kwargs)
        utils.EzPickle.__init__(self, context=self.context.tolist(), **kwargs)

    def _on_context(self, ctx: np.ndarray) -> None:
        self._direction = float(ctx[0])
        self._cos, self._sin = math.cos(self._direction), math.sin(self._direction)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._context_from_options(options)
        return super().reset(seed=seed, options=options)

    def step(self, action):
        # Ant-v5 hands only the x velocity to its _get_rew, so take its step (and
        # its cost terms and termination from the info) and swap the forward term.
        observation, _, terminated, truncated, info = super().step(action)
        velocity = self._cos * info["x_velocity"] + self._sin * info["y_velocity"]
        forward = self._forward_reward_weight * velocity
        reward = forward + info["reward_survive"] + info["reward_ctrl"] + info["reward_contact"]
        info["reward_forward"] = forward
        info["direction"] = self._direction
        info["direction_velocity"] = velocity
        return observation, reward, terminated, truncated, info

    def _get_reset_info(self):
        return {**super()._get_reset_info(), "direction": self._direction}
