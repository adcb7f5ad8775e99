"""A stand-in for an expensive simulator: a Box env that sleeps a set time per step.

    env:
      id: gogepo_ray.envs.slow_env:SlowEnv
      kwargs: {step_seconds: 0.002, episode_steps: 200}

Its physics cost nothing and its wall time is all sleep, so many workers can share a
small machine (over-commit Ray's CPUs) and the runtime's scaling shows on its own:
``bench/scaling.py`` runs 1 to 8 workers on it. The task is learnable but simple: the
observation drifts as a random walk, and the reward is highest when each action follows
tanh of the matching observation coordinate.
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class SlowEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(
        self,
        step_seconds: float = 0.002,
        episode_steps: int = 200,
        obs_dim: int = 11,
        act_dim: int = 3,
    ) -> None:
        super().__init__()
        if step_seconds < 0:
            raise ValueError("step_seconds must be >= 0")
        if episode_steps < 1 or obs_dim < act_dim or act_dim < 1:
            raise ValueError("need episode_steps >= 1 and obs_dim >= act_dim >= 1")
        self.step_seconds = float(step_seconds)
        self.episode_steps = int(episode_steps)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(obs_dim,), dtype=np.float64)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(act_dim,), dtype=np.float32)
        self._state = np.zeros(obs_dim)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._state = self.np_random.normal(0.0, 1.0, self.observation_space.shape)
        self._t = 0
        return self._state.copy(), {}

    def step(self, action):
        if self.step_seconds:
            time.sleep(self.step_seconds)
        a = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        target = np.tanh(self._state[: len(a)])
        reward = 1.0 - float(np.abs(a - target).mean())  # in [-1, 1] per step
        self._state = 0.9 * self._state + self.np_random.normal(0.0, 0.5, self._state.shape)
        self._t += 1
        return self._state.copy(), reward, False, self._t >= self.episode_steps, {}
