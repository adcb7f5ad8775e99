"""Tiny gymnasium envs for the tests, loaded through entry points ``tests.envs:ClassName``."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class NoisyPointEnv(gym.Env):
    """3-D observation, 2-D action with asymmetric bounds [0, 2] x [-1, 1], 20 steps.

    The observation is a fixed target point (first two coordinates) plus a little noise and
    the remaining-time fraction; the reward is -|action - target| summed over dimensions.
    """

    metadata = {"render_modes": []}
    EPISODE_STEPS = 20

    def __init__(
        self, noise: float = 0.05, target: tuple[float, float] | list[float] = (1.5, -0.25)
    ) -> None:
        super().__init__()
        self.noise = float(noise)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float64)
        self.action_space = spaces.Box(
            low=np.array([0.0, -1.0], dtype=np.float32),
            high=np.array([2.0, 1.0], dtype=np.float32),
            dtype=np.float32,
        )
        self.target = np.asarray(target, dtype=np.float64).reshape(2)
        self._t = 0

    def _obs(self) -> np.ndarray:
        noise = self.np_random.normal(0.0, self.noise, size=2)
        remaining = 1.0 - self._t / self.EPISODE_STEPS
        return np.array([*(self.target + noise), remaining], dtype=np.float64)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        return self._obs(), {}

    def step(self, action):
        action = np.clip(
            np.asarray(action, dtype=np.float64), self.action_space.low, self.action_space.high
        )
        reward = -float(np.abs(action - self.target).sum())
        self._t += 1
        truncated = self._t >= self.EPISODE_STEPS
        return self._obs(), reward, False, truncated, {}


class DictObsEnv(NoisyPointEnv):
    """Same dynamics, but a Dict observation space: not usable by GoGePo policies."""

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = spaces.Dict(
            {
                "pos": spaces.Box(-np.inf, np.inf, shape=(2,)),
                "time": spaces.Box(0.0, 1.0, shape=(1,)),
            }
        )


class ImageObsEnv(NoisyPointEnv):
    """A 2-D Box observation (an "image"): not a 1-D Box, so rejected."""

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = spaces.Box(0.0, 1.0, shape=(4, 4), dtype=np.float64)


class UnboundedActionEnv(NoisyPointEnv):
    """A Box action space with infinite bounds: the policy cannot map tanh onto it."""

    def __init__(self) -> None:
        super().__init__()
        self.action_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)


class NotAnEnv:
    """Constructible, but not a gymnasium.Env."""


class SizedEnv(NoisyPointEnv):
    """An env whose constructor needs an argument: the observation size."""

    def __init__(self, obs_dim: int) -> None:
        super().__init__()
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(obs_dim,), dtype=np.float64)

    def _obs(self) -> np.ndarray:
        return np.resize(super()._obs(), self.observation_space.shape)
