"""Register GoGePo (and its ARS baseline) with RLlib and Tune under the names ``"GoGePo"`` and ``"GoGePoARS"`` without importing Ray.

``import gogepo_ray`` must stay cheap, and ``gogepo_ray.core`` must not pull in Ray (the
core boundary test), so the package cannot call ``ray.tune.register_trainable`` when it is
imported. Instead it adds a lazy entry to RLlib's own algorithm table,
``ray.rllib.algorithms.registry.ALGORITHMS``, the same ``name -> importer`` table that
holds PPO, SAC, ... Tune consults that table whenever it meets a trainable name it does not
know (``ray.tune.registry.get_trainable_cls`` -> ``ray.rllib._register_all()``), so
``tune.Tuner("GoGePo", ...)`` works whichever of gogepo_ray and Ray is imported first:

* RLlib's registry module already imported: the entry is added at once;
* not yet: a meta-path finder waits for that one module and adds the entry right after
  the module has run. The finder imports nothing and touches no other module.

This table is the one place the package's algorithms are registered with Tune; Tune
registers each entry once, when it first resolves an unknown name. An algorithm added to
``gogepo_ray.algorithms`` at run time gets its Tune name from
``gogepo_ray.integrations.rllib.algorithm_class``.
"""

from __future__ import annotations

import sys
from importlib.machinery import PathFinder

from gogepo_ray import algorithms

REGISTRY_MODULE = "ray.rllib.algorithms.registry"


def _importer(name: str):
    """RLlib's importer convention for algorithm ``name``: () -> (Algorithm class, its
    default config)."""

    def load() -> tuple[type, object]:
        from gogepo_ray.integrations.rllib import algorithm_class

        cls = algorithm_class(name)
        return cls, cls.get_default_config()

    return load


def _add_entry(registry_module) -> None:
    """One entry per algorithm that ships with the package, under its RLlib name."""
    table = getattr(registry_module, "ALGORITHMS", None)
    if isinstance(table, dict):
        for name in algorithms.BUILTIN:
            table.setdefault(algorithms.get(name).rllib_name, _importer(name))


class _RegisteringLoader:
    """Runs the real loader, then adds the GoGePo entry; anything else goes to the real loader."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _add_entry(module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _RegistryFinder:
    """Meta-path finder that answers for RLlib's registry module only."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # let the other finders handle it; gogepo_ray.integrations.rllib still registers
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    module = sys.modules.get(REGISTRY_MODULE)
    if module is not None:
        _add_entry(module)
    elif not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())
