"""The GoGePo method in pure torch and numpy: no Ray, gymnasium, MLflow or pydantic imports
here. ``gogepo_ray.algorithms`` says which learner a run uses."""

from __future__ import annotations

from gogepo_ray.core.buffer import ReplayBuffer
from gogepo_ray.core.critic import Critic
from gogepo_ray.core.generator import Generator
from gogepo_ray.core.normalizer import ObsStats
from gogepo_ray.core.policy import PolicySpec, policy_actions, policy_preactivation

__all__ = [
    "Critic",
    "Generator",
    "ObsStats",
    "PolicySpec",
    "ReplayBuffer",
    "policy_actions",
    "policy_preactivation",
]
