"""Ray actors around the plain ``Learner`` and ``Rollouts`` classes; no logic of their own."""

from __future__ import annotations

import os
import resource
import sys

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gogepo_ray import algorithms
from gogepo_ray.config import Config, ConfigError
from gogepo_ray.core.policy import PolicySpec
from gogepo_ray.rollout import Rollouts
from gogepo_ray.sysinfo import LEARNER_ENV
from gogepo_ray.types import EpisodeBatch, LearnerStats, ParamBatch


def process_memory() -> dict[str, int]:
    """This process's resident set size now and at its peak, in bytes (Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB
    rss = 0
    try:
        with open("/proc/self/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    return {"rss_bytes": rss, "peak_rss_bytes": peak}


class LearnerActor:
    def __init__(
        self,
        cfg: Config,
        spec: PolicySpec,
        state: dict | None = None,
        entry: algorithms.Algorithm | None = None,
    ) -> None:
        self.learner = algorithms.make_learner(cfg, spec, entry)
        if state is not None:
            self.learner.load_state_dict(state)

    def step(self, batches: list[EpisodeBatch], proposals: list[int]) -> list:
        out = self.learner.step(batches, proposals)
        return out if len(out) > 1 else out[0]  # Ray unpacks a list only for num_returns > 1

    def propose(self, n: int) -> ParamBatch:
        return self.learner.propose(n)

    def propose_eval(
        self, commands: list[float] | None = None, episodes: int = 1, contexts=None
    ) -> ParamBatch:
        return self.learner.propose_eval(commands, episodes, contexts)

    def begin_eval(self, episodes: int) -> ParamBatch:
        return self.learner.begin_eval(episodes)

    def eval_at(self, command: float, episodes: int) -> ParamBatch:
        return self.learner.eval_at(command, episodes)

    def end_eval(self, mean: float, final: bool = False) -> dict:
        return self.learner.end_eval(mean, final)

    def best_state_dict(self) -> dict | None:
        return self.learner.best_state_dict()

    def restore_best(self) -> bool:
        return self.learner.restore_best()

    def undo_restore(self) -> None:
        self.learner.undo_restore()

    def stats(self) -> LearnerStats:
        return self.learner.stats()

    def state_dict(self) -> dict:
        return self.learner.state_dict()

    def pid(self) -> int:
        return os.getpid()

    def memory(self) -> dict[str, int]:
        return process_memory()


class RolloutActor:
    def __init__(self, cfg: Config, spec: PolicySpec) -> None:
        self.rollouts = Rollouts(
            cfg.env.id, spec, env_kwargs=cfg.env.kwargs, max_episode_steps=cfg.env.max_episode_steps
        )

    def run(self, batch: ParamBatch) -> EpisodeBatch:
        return self.rollouts.run(batch)

    def pid(self) -> int:
        return os.getpid()

    def memory(self) -> dict[str, int]:
        return process_memory()


LEARNER_BUNDLE = 1  # in a placement group made by GoGePo.default_resource_request: 0 is the driver


def placement(bundle: int) -> dict:
    """Inside a placement group (a Tune trial), pin the actor to its own bundle: bundle 1
    holds the learner and bundle 2 + i rollout worker i. Elsewhere: no constraint."""
    pg = ray.util.get_current_placement_group()
    if pg is None or bundle >= len(pg.bundle_specs):
        return {}
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=bundle, placement_group_capture_child_tasks=False
        )
    }


def learner_actor(cfg: Config, spec: PolicySpec, state: dict | None = None):
    """Start the learner actor; it asks for a GPU when ``learner.device`` is cuda."""
    gpus = 1 if cfg.learner.device.startswith("cuda") else 0
    cls = ray.remote(LearnerActor).options(
        num_cpus=cfg.learner.num_cpus,
        num_gpus=gpus,
        runtime_env={"env_vars": LEARNER_ENV},
        max_restarts=0,
        **placement(LEARNER_BUNDLE),
    )
    # the registry entry goes along: an algorithm registered at run time is known only here
    return cls.remote(cfg, spec, state, algorithms.of(cfg))


def rollout_actor(cfg: Config, spec: PolicySpec, index: int):
    """Start rollout worker ``index`` (a replacement takes the index of the one it replaces)."""
    return (
        ray.remote(RolloutActor)
        .options(num_cpus=1, **placement(LEARNER_BUNDLE + 1 + index))
        .remote(cfg, spec)
    )


def ensure_ray(cfg: Config) -> bool:
    """Connect to the cluster in RAY_ADDRESS (Ray Jobs, `ray start`), or start a local one
    sized for this run's actors. True when this call started a local instance (which has
    no autoscaler: what it has is all it will ever have)."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
        return False
    cpus = max(os.cpu_count() or 1, cfg.run.workers + int(-(-cfg.learner.num_cpus // 1)))
    ray.init(
        num_cpus=cpus,
        num_gpus=None,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    return True


def check_learner_gpu(cfg: Config, local: bool) -> None:
    """A cuda learner asks Ray for a GPU. On a local instance with none, Ray would wait for it
    forever: say so and stop before any actor starts."""
    if not cfg.learner.device.startswith("cuda"):
        return
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) >= 1:
        return
    if local:
        raise ConfigError(
            f"learner.device={cfg.learner.device} needs a GPU, but this machine's Ray instance "
            f"has none ({resources.get('CPU', 0):g} CPUs, 0 GPUs) and nothing can add one: "
            "set learner.device=cpu, or run on a cluster with a GPU node (RAY_ADDRESS)"
        )


def wait_for_learner(learner, cfg: Config, warn_after: float = 30.0) -> None:
    """Block until the learner actor runs; warn once if it waits for resources (a cuda
    learner on a cluster whose autoscaler has not added a GPU node yet)."""
    ready, _ = ray.wait([learner.pid.remote()], timeout=warn_after)
    if ready:
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    needs = (
        f"1 GPU and {cfg.learner.num_cpus:g} CPUs"
        if cfg.learner.device.startswith("cuda")
        else f"{cfg.learner.num_cpus:g} CPUs"
    )
    print(
        f"warning: the learner actor has waited {warn_after:g} s for {needs} "
        f"(the cluster has {gpus:g} GPUs free or in total now); still waiting for the cluster "
        "to provide them. Ctrl-C stops; learner.device=cpu runs without a GPU.",
        file=sys.stderr,
        flush=True,
    )
    ray.get(learner.pid.remote())
