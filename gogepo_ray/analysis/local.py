"""A run's learner and env on this machine, loaded from a checkpoint: what ``gogepo eval``,
``sweep``, ``export``, ``render`` and ``serve`` run, without Ray."""

from __future__ import annotations

from pathlib import Path


def load_learner(path: str | Path, which: str | None = None):
    """``(cfg, policy_spec, learner)`` of a checkpoint file or run directory (``which``:
    best or latest, see ``checkpoint.load``). A run trained with a GPU learner loads on a
    CPU where there is no GPU: the checkpoint's tensors are on the CPU, and so is this
    learner."""
    import torch

    from gogepo_ray import checkpoint as ckpt
    from gogepo_ray.algorithms import make_learner
    from gogepo_ray.envs import policy_spec

    payload = ckpt.load(path, which)
    cfg = ckpt.config_of(payload)
    if cfg.learner.device != "cpu" and not torch.cuda.is_available():
        cfg = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"device": "cpu"})})
    spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
    learner = make_learner(cfg, spec)
    try:
        learner.load_state_dict(payload["learner"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ckpt.CheckpointError(
            f"{path}: checkpoint does not match its env/architecture ({cfg.env.id}, hidden {cfg.policy.hidden}): {exc}"
        ) from None
    return cfg, spec, learner


def rollouts(cfg, spec):
    """The run's env on this process, as a worker runs it."""
    from gogepo_ray.rollout import Rollouts

    return Rollouts(
        cfg.env.id, spec, env_kwargs=cfg.env.kwargs, max_episode_steps=cfg.env.max_episode_steps
    )
