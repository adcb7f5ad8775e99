"""The GoGePo method (and the ARS baseline) in pure torch and numpy: no Ray, gymnasium,
MLflow or pydantic imports here."""

from __future__ import annotations

from gogepo_ray.core.buffer import ReplayBuffer
from gogepo_ray.core.critic import Critic
from gogepo_ray.core.generator import Generator
from gogepo_ray.core.normalizer import ObsStats
from gogepo_ray.core.policy import PolicySpec, policy_actions, policy_preactivation


def make_learner(cfg, spec: PolicySpec):
    """The learner of ``cfg.algorithm``. Both implement the protocol the Trainer drives:
    ``step(batches, proposals)``, ``propose(n)``, ``propose_eval(commands, episodes)``,
    ``eval_command()``, ``stats()``, ``state_dict()`` / ``load_state_dict()``."""
    if cfg.algorithm == "ars":
        from gogepo_ray.core.ars import ArsLearner

        return ArsLearner(cfg, spec)
    from gogepo_ray.core.learner import Learner

    return Learner(cfg, spec)


def takes_commands(cfg) -> bool:
    """Whether the algorithm's policies are written for a commanded return (GoGePo), so that
    a command sweep means something."""
    return cfg.algorithm == "gogepo"


__all__ = [
    "Critic",
    "Generator",
    "ObsStats",
    "PolicySpec",
    "ReplayBuffer",
    "make_learner",
    "policy_actions",
    "policy_preactivation",
    "takes_commands",
]
