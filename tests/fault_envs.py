"""Small gymnasium envs that misbehave on purpose, for the fault-injection tests."""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np


class PointEnv(gym.Env):
    """Move a point towards the origin; reward −|x|. ``step_sleep`` slows each step down so
    that a test can kill a worker in the middle of an episode. ``unseeded`` draws every start
    point from fresh OS entropy instead of the reset seed, so that no two runs are alike: a
    test can then tell a run that resumed from one that started over."""

    def __init__(self, horizon: int = 40, step_sleep: float = 0.0, unseeded: bool = False) -> None:
        self.observation_space = gym.spaces.Box(-10.0, 10.0, shape=(3,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.horizon, self.step_sleep, self.unseeded = horizon, step_sleep, unseeded
        self.t = 0
        self.x = np.zeros(3, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        rng = np.random.default_rng() if self.unseeded else self.np_random
        self.x = rng.uniform(-1, 1, size=3).astype(np.float32)
        return self.x.copy(), {}

    def _advance(self, action):
        if self.step_sleep:
            time.sleep(self.step_sleep)
        self.t += 1
        self.x[:2] = np.clip(self.x[:2] - 0.1 * np.asarray(action, np.float32), -10, 10)
        return -float(np.abs(self.x).sum()), self.t >= self.horizon

    def step(self, action):
        reward, truncated = self._advance(action)
        return self.x.copy(), reward, False, truncated, {}


class FaultyEnv(PointEnv):
    """Every episode whose reset seed is ≡ 1 (mod 3) raises mid-episode; ≡ 2 (mod 3)
    returns a NaN observation; the rest behave."""

    def reset(self, *, seed=None, options=None):
        self.mode = (seed or 0) % 3
        return super().reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        if self.t == 5 and self.mode == 1:
            raise RuntimeError("simulated physics blow-up")
        if self.t == 5 and self.mode == 2:
            obs[0] = np.nan
        return obs, reward, terminated, truncated, info


class BrokenEnv(PointEnv):
    """Every step raises: a run on it can never make progress."""

    def step(self, action):
        raise RuntimeError("this env is broken")


class EvalFaultEnv(PointEnv):
    """Fails by its reset seed mod 4: 0 behaves, 1 raises in reset (the episode's return
    stays 0), 2 raises mid-episode (a partial return), 3 returns a NaN observation."""

    def reset(self, *, seed=None, options=None):
        self.mode = (seed or 0) % 4
        if self.mode == 1:
            raise RuntimeError("simulated reset failure")
        return super().reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        if self.t == 5 and self.mode == 2:
            raise RuntimeError("simulated physics blow-up")
        if self.t == 5 and self.mode == 3:
            obs[0] = np.nan
        return obs, reward, terminated, truncated, info
