"""The algorithm registry: every algorithm the service trains, and what the runtime asks of it.

An algorithm is one folder here holding an :class:`Algorithm` entry, plus one line in
:data:`BUILTIN` below; settings of its own are a section of ``config.Config`` (ARS: ``ars``). The Trainer, the CLI, the RLlib wrapper, serving and the config's
validation ask the registry (``get(cfg.algorithm)``); none of them tests an algorithm's
name. ``register`` adds one at run time (the tests register a tiny third algorithm so).

The learner protocol the Trainer drives (``gogepo_ray.core.learner.StreamingLearner``):
``step(batches, proposals)``, ``propose(n)``, ``propose_eval(commands, episodes, contexts)``,
``eval_command()``, ``begin_eval`` / ``eval_at`` / ``end_eval(mean, final)``, ``best_state_dict()``,
``stats()``, ``state_dict()`` / ``load_state_dict()``. What it checkpoints is its
``state_dict()``: ``checkpoints/*.pt`` hold it under ``learner``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

#: folders of the algorithms that ship with the package, by config name (``algorithm:``)
BUILTIN = {
    "gogepo": "gogepo_ray.algorithms.gogepo",
    "ars": "gogepo_ray.algorithms.ars",
}
DEFAULT = "gogepo"


@dataclass(frozen=True)
class Algorithm:
    """What the runtime needs to know of an algorithm. Plain strings and flags, so that an
    entry travels to the learner actor with the call that starts it."""

    name: str
    """The config's ``algorithm`` value."""
    learner: str
    """``module:Class`` of its learner, built as ``Class(cfg, policy_spec)``."""
    takes_commands: bool
    """Whether its policies are written for a commanded return, so that ``--command``, a
    command sweep and ``run.eval_command: sweep`` mean something."""
    takes_contexts: bool
    """Whether it trains on a task family's contexts (the ``context`` section)."""
    rllib_name: str
    """Its name under RLlib and Tune (``tune.Tuner(rllib_name, ...)``)."""
    summary: str
    """One line: the docstring of its RLlib Algorithm class."""

    def make_learner(self, cfg, spec):
        module, _, cls = self.learner.partition(":")
        return getattr(importlib.import_module(module), cls)(cfg, spec)


_REGISTRY: dict[str, Algorithm] = {}


def register(entry: Algorithm) -> Algorithm:
    """Add ``entry`` under its name (a second entry of the same name replaces the first)."""
    _REGISTRY[entry.name] = entry
    return entry


def _load_builtin() -> None:
    for name, module in BUILTIN.items():
        if name not in _REGISTRY:
            register(importlib.import_module(module).ALGORITHM)


def names() -> list[str]:
    _load_builtin()
    return list(_REGISTRY)


def get(name: str) -> Algorithm:
    """The entry of ``name``; a ValueError naming the registered ones where there is none."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"algorithm: {name!r} is not a registered algorithm; one of {', '.join(_REGISTRY)}"
        ) from None


def of(cfg) -> Algorithm:
    """The entry of ``cfg.algorithm``."""
    return get(cfg.algorithm)


def make_learner(cfg, spec, entry: Algorithm | None = None):
    """The learner of ``cfg.algorithm`` (or of ``entry``, which a Ray actor gets passed, since
    an algorithm registered at run time is only known in the process that registered it)."""
    return (entry or of(cfg)).make_learner(cfg, spec)


def takes_commands(cfg) -> bool:
    return of(cfg).takes_commands


__all__ = ["Algorithm", "BUILTIN", "DEFAULT", "get", "make_learner", "names", "of", "register"]
