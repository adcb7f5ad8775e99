"""Making and checking environments: gymnasium ids and user entry points ``pkg.mod:Class``."""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

import gymnasium as gym
import numpy as np

import gogepo_ray.envs.families  # noqa: F401 - registers the task-family env ids
from gogepo_ray.core.policy import PolicySpec


class EnvError(ValueError):
    """The env cannot be used: it does not exist, or its spaces are not 1-D Boxes."""


def _resolve_entry_point(env_id: str) -> Any:
    module_name, _, attr = env_id.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EnvError(f"env {env_id!r}: cannot import module {module_name!r} ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise EnvError(
            f"env {env_id!r}: module {module_name!r} has no attribute {attr!r}"
        ) from None


def make_env(
    env_id: str, kwargs: dict[str, Any] | None = None, max_episode_steps: int | None = None
) -> gym.Env:
    """A fresh env instance; ids with a ``:`` are entry points, others gymnasium ids."""
    kwargs = dict(kwargs or {})
    if ":" in env_id:
        factory = _resolve_entry_point(env_id)
        try:
            env = factory(**kwargs)
        except TypeError as exc:
            raise EnvError(f"env {env_id!r} could not be constructed: {exc}") from None
        if not isinstance(env, gym.Env):
            raise EnvError(
                f"env {env_id!r} did not build a gymnasium.Env (got {type(env).__name__})"
            )
        if max_episode_steps is not None:
            env = gym.wrappers.TimeLimit(env, max_episode_steps)
        return env
    try:
        return gym.make(
            env_id, max_episode_steps=max_episode_steps, disable_env_checker=True, **kwargs
        )
    except gym.error.Error as exc:
        raise EnvError(f"unknown env id {env_id!r}: {exc}") from None


def env_dims(env: gym.Env) -> tuple[int, int, tuple[float, ...], tuple[float, ...]]:
    """(obs_dim, act_dim, action_low, action_high); raises EnvError for unusable spaces."""
    obs_space, act_space = env.observation_space, env.action_space
    for name, space in (("observation", obs_space), ("action", act_space)):
        if not isinstance(space, gym.spaces.Box):
            raise EnvError(f"{name} space must be a Box, got {type(space).__name__}")
        if len(space.shape) != 1:
            raise EnvError(f"{name} space must be 1-D, got shape {space.shape}")
    low, high = act_space.low.astype(np.float64), act_space.high.astype(np.float64)
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise EnvError("action space bounds must be finite")
    return obs_space.shape[0], act_space.shape[0], tuple(low.tolist()), tuple(high.tolist())


@lru_cache(maxsize=64)
def _dims_of(env_id: str, kwargs_items: tuple) -> tuple:
    try:
        env = make_env(env_id, dict(kwargs_items))
    except EnvError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user env failing in its constructor
        raise EnvError(
            f"env {env_id!r} could not be constructed: {type(exc).__name__}: {exc}"
        ) from None
    try:
        return env_dims(env)
    finally:
        env.close()


def check_env_id(env_id: str, kwargs: dict[str, Any] | None = None) -> tuple:
    """Validate that an env exists and has 1-D Box spaces (cached per id)."""
    try:
        key = tuple(sorted((kwargs or {}).items()))
        hash(key)
    except TypeError:  # unhashable kwargs (nested lists/dicts): check without the cache
        return _dims_of.__wrapped__(env_id, tuple(sorted((kwargs or {}).items())))
    return _dims_of(env_id, key)


@lru_cache(maxsize=64)
def _family_of(env_id: str, kwargs_items: tuple) -> tuple | None:
    from gogepo_ray.envs.families import context_space_of

    env = make_env(env_id, dict(kwargs_items))
    try:
        return context_space_of(env)
    finally:
        env.close()


def family_of(env_id: str, kwargs: dict[str, Any] | None = None) -> tuple | None:
    """(context_space, context_names) of a task-family env (``gogepo_ray.envs.families``), None
    for an env whose task is fixed. The env must pass ``check_env_id`` first."""
    items = tuple(sorted((kwargs or {}).items()))
    try:
        hash(items)
    except TypeError:
        return _family_of.__wrapped__(env_id, items)
    return _family_of(env_id, items)


def policy_spec(
    env_id: str, hidden: list[int] | tuple[int, ...], kwargs: dict[str, Any] | None = None
) -> PolicySpec:
    obs_dim, act_dim, low, high = check_env_id(env_id, kwargs)
    return PolicySpec(obs_dim, act_dim, tuple(hidden), low, high)
