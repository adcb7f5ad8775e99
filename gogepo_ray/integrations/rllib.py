"""GoGePo as an RLlib ``Algorithm``: RLlib's config builder, ``algo.train()``, RLlib
checkpoints and Tune scheduling, all driving the one GoGePo runtime,
:class:`gogepo_ray.trainer.Trainer`.

    from ray import tune
    from gogepo_ray.integrations.rllib import GoGePoConfig

    config = (
        GoGePoConfig()
        .environment("Hopper-v5")                    # gymnasium id or "package.module:ClassName"
        .env_runners(num_env_runners=7)              # rollout worker actors (run.workers)
        .learners(num_gpus_per_learner=1)            # learner on a GPU (learner.device=cuda)
        .training(return_max=3500, survival_offset=-1, steps_per_iteration=5000,
                  gogepo={"generator": {"lr": 2e-6}, "critic": {"hidden": [256, 256]}})
    )
    algo = config.build_algo()
    result = algo.train()           # 5000 more training env steps
    algo.save_to_path("/tmp/ckpt")  # Algorithm.from_checkpoint("/tmp/ckpt") continues the run

    tune.Tuner("GoGePo", param_space=config.training(
        gogepo={"generator": {"lr": tune.grid_search([1e-6, 2e-6])}})).fit()

Settings. ``.training(gogepo={...})`` takes any part of a GoGePo run config, as nested
sections exactly as in a YAML config file (``configs/*.yaml`` load as they are); calls merge
key by key. Flat shortcuts: ``return_min``, ``return_max``, ``survival_offset`` (env
section), ``total_env_steps`` (run section). RLlib's own settings map onto GoGePo's:

    .environment(env=..., env_config={...})     env.id, env.kwargs
    .env_runners(num_env_runners=N)             run.workers (default: CPUs - 1)
    .env_runners(num_envs_per_env_runner=N)     run.envs_per_worker
    .learners(num_gpus_per_learner=1)           learner.device = "cuda"
    .learners(num_cpus_per_learner=C)           learner.num_cpus
    .debugging(seed=S)                          run.seed
    .resources(num_cpus_for_main_process=C)     CPUs of the driver (the Algorithm itself)

Giving one of these in both places with different values is an error, as are RLlib's
generic training settings (``lr``, ``gamma``, ``train_batch_size``, ...), which GoGePo has
no use for. ``validate()`` / :meth:`GoGePoConfig.to_gogepo_config` check everything and
raise :class:`~gogepo_ray.config.ConfigError` naming the bad key. Unlike ``gogepo train``,
MLflow tracking is off unless asked for (``gogepo={"tracking": {"enabled": True}}``, or
:func:`tune_with_mlflow`): Tune already records every result.

One ``train()`` = ``steps_per_iteration`` more training env steps (default
``run.eval_every``); work in flight carries over to the next call. Results hold RLlib's
usual keys plus GoGePo's own metrics, nested by their namespace (see
:mod:`gogepo_ray.metrics`): ``train/…``, ``losses/…``, ``buffer/…``, ``learner/…``, ``eval/…``,
``timers/…``. ``env_runners/episode_return_mean`` is the return of the latest finished
evaluation (noise-free policy G(best return), ``run.eval_episodes`` episodes, the env's
true return): GoGePo's training episodes deliberately ask for more than the best return
and add parameter noise, so their returns measure exploration, not the policy. It is NaN
until the first evaluation finishes; evaluations run alongside training, so it trails by up
to one iteration. ``done`` becomes true at ``run.total_env_steps``.

What RLlib builds and what it does not: no EnvRunnerGroup, LearnerGroup or RLModule. The
Trainer starts one learner actor and ``run.workers`` rollout actors; inside a Tune trial
they land in the trial's placement group (Tune captures child actors), which
:meth:`GoGePo.default_resource_request` sizes for the driver, the learner and the workers.

Checkpoints (``save_to_path``, Tune's checkpoints): RLlib's usual directory
(``rllib_checkpoint.json``, ``class_and_ctor_args.pkl`` with the config,
``algorithm_state.pkl`` with the iteration counter) plus ``gogepo.pt``, the
``Trainer.state()`` payload: an ordinary GoGePo checkpoint that loads with
``torch.load(weights_only=True)`` and works with ``gogepo eval|sweep|export <dir>/gogepo.pt``.

The run directory of the Trainer (config.yaml, checkpoints/, summary.json, sweep) is the
Algorithm's ``logdir`` (the trial directory under Tune). ``algo.stop()`` (Tune: end of
trial) finishes the run as ``gogepo train`` does: final evaluation, final checkpoint,
command sweep (``run.sweep_at_end``), summary.json, MLflow artifacts.
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
import time
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.callbacks.utils import make_callback
from ray.rllib.utils import force_list
from ray.rllib.utils.annotations import override
from ray.rllib.utils.checkpoints import Checkpointable
from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.tune.registry import register_trainable
from ray.tune.result import TRAINING_ITERATION
from ray.util import log_once

from gogepo_ray import algorithms
from gogepo_ray import checkpoint as ckpt
from gogepo_ray.config import Config, ConfigError, build_config
from gogepo_ray.distributed.actors import ensure_ray
from gogepo_ray.metrics import train_metrics
from gogepo_ray.tracking import MLflowTracker, default_tracking_uri
from gogepo_ray.trainer import Trainer

if TYPE_CHECKING:
    from typing_extensions import Self

STATE_KEY = "gogepo"  # the Trainer.state() payload in get_state() / set_state()
PAYLOAD_FILE = "gogepo.pt"  # the same payload inside a checkpoint directory

# RLlib's generic training() settings that mean nothing to GoGePo. ("model" and
# "optimizer" still pass through: AlgorithmConfig.update_from_dict routes them here.)
_RLLIB_PASSTHROUGH = {"model", "optimizer"}

# Where the GoGePoConfig defaults differ from a YAML run config's.
_DEFAULTS: dict[str, Any] = {"tracking": {"enabled": False}}

# Settings that fix the shapes of the learner's tensors: a checkpoint restores only into
# an algorithm that agrees on all of them.
_SHAPE_KEYS = [
    ("env", "id"),
    ("env", "kwargs"),
    ("policy", "hidden"),
    ("generator", "tile"),
    ("generator", "embedding_dim"),
    ("generator", "hidden"),
    ("critic", "probing_states"),
    ("critic", "hidden"),
]


def _merged(base: Mapping, update: Mapping) -> dict:
    """A new dict: ``base`` with ``update`` merged in, nested dicts key by key."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _take(data: dict, section: str, key: str, value: Any, rllib_name: str, same=None) -> None:
    """Put an RLlib setting into the GoGePo config data, unless that says otherwise."""
    node = data.setdefault(section, {})
    if not isinstance(node, dict):
        return  # build_config names the malformed section
    if key in node and not (same or (lambda a, b: a == b))(node[key], value):
        raise ConfigError(
            f"{section}.{key}: gogepo={{...}} sets {node[key]!r} but {rllib_name} gives {value!r}; set it in one place"
        )
    node[key] = value


class GoGePoConfig(AlgorithmConfig):
    """RLlib-style builder for a GoGePo run; see the module docstring for the mapping of
    RLlib settings onto GoGePo's config sections."""

    # The run config's ``algorithm`` this builder's Algorithm runs, and its Tune name.
    ALGORITHM = algorithms.DEFAULT

    def __init__(self, algo_class: type | None = None) -> None:
        super().__init__(algo_class=algo_class or GoGePo)
        self.gogepo: dict[str, Any] = {}
        self.steps_per_iteration: int | None = None
        self.mlflow_parent_run_id: str | None = None
        # None: run.workers from gogepo={...}, else GoGePo's default (CPUs - 1).
        self.num_env_runners = None

    @override(AlgorithmConfig)
    def training(
        self,
        *,
        gogepo: Mapping[str, Any] | None = NotProvided,
        return_min: float | None = NotProvided,
        return_max: float | None = NotProvided,
        survival_offset: float | None = NotProvided,
        total_env_steps: int | None = NotProvided,
        steps_per_iteration: int | None = NotProvided,
        mlflow_parent_run_id: str | None = NotProvided,
        **kwargs: Any,
    ) -> Self:
        """GoGePo's settings.

        Args:
            gogepo: Nested config sections, as in a YAML run config, e.g.
                ``{"generator": {"lr": 2e-6, "hidden": [256, 256]}, "run": {"eval_every": 5000}}``.
                Merged key by key into what earlier calls set. Tune search spaces may
                stand for any value.
            return_min: ``env.return_min``, the bottom of the command range.
            return_max: ``env.return_max``, the top of the command range.
            survival_offset: ``env.survival_offset``, added to every training reward.
            total_env_steps: ``run.total_env_steps``: results say ``done`` from there on.
            steps_per_iteration: Training env steps per ``train()``; default ``run.eval_every``.
            mlflow_parent_run_id: With tracking enabled, the MLflow run is nested under
                this run (tag ``mlflow.parentRunId``); :func:`tune_with_mlflow` sets it.

        Returns:
            This updated config.
        """
        unused = sorted(
            k for k, v in kwargs.items() if v is not NotProvided and k not in _RLLIB_PASSTHROUGH
        )
        if unused:
            raise ConfigError(
                f"{', '.join(unused)}: RLlib training setting(s) that GoGePo does not use; set GoGePo's "
                "own with .training(gogepo={...}), e.g. gogepo={'generator': {'lr': 2e-6}, 'critic': {'lr': 5e-3}}"
            )
        super().training(**kwargs)
        if gogepo is not NotProvided and gogepo is not None:
            if not isinstance(gogepo, Mapping):
                raise ConfigError(
                    f"gogepo: must be a dict of config sections, got {type(gogepo).__name__}"
                )
            self.gogepo = _merged(self.gogepo, gogepo)
        flat = {
            ("env", "return_min"): return_min,
            ("env", "return_max"): return_max,
            ("env", "survival_offset"): survival_offset,
            ("run", "total_env_steps"): total_env_steps,
        }
        for (section, key), value in flat.items():
            if value is not NotProvided:
                self.gogepo = _merged(self.gogepo, {section: {key: value}})
        if steps_per_iteration is not NotProvided:
            self.steps_per_iteration = steps_per_iteration
        if mlflow_parent_run_id is not NotProvided:
            self.mlflow_parent_run_id = mlflow_parent_run_id
        return self

    def tune_name(self) -> str:
        """The name Tune knows this builder's Algorithm by (``tune.Tuner(name, ...)``)."""
        return algorithms.get(self.ALGORITHM).rllib_name

    def to_gogepo_config(self) -> Config:
        """The validated GoGePo run config this builder describes (the one place where
        RLlib settings, shortcuts and ``gogepo={...}`` come together)."""
        if not isinstance(self.gogepo, Mapping):
            raise ConfigError(
                f"gogepo: must be a dict of config sections, got {type(self.gogepo).__name__}"
            )
        data = _merged(_DEFAULTS, self.gogepo)
        if data.setdefault("algorithm", self.ALGORITHM) != self.ALGORITHM:
            try:
                other = f"{algorithm_class(data['algorithm']).__name__}.get_default_config()"
            except ValueError as err:
                raise ConfigError(str(err)) from None
            raise ConfigError(
                f"algorithm: gogepo={{...}} sets {data['algorithm']!r}, but {type(self).__name__} "
                f"builds {self.ALGORITHM!r} runs; use {other} for {data['algorithm']!r}"
            )
        env = self.env
        if isinstance(env, type):
            env = f"{env.__module__}:{env.__qualname__}"
        if env is not None and not isinstance(env, str):
            raise ConfigError(
                f"env: {env!r} is neither a gymnasium id nor an entry point 'package.module:ClassName'"
            )
        if env is not None:
            _take(data, "env", "id", env, f"environment(env={env!r})")
        elif not (isinstance(data.get("env"), dict) and "id" in data["env"]):
            raise ConfigError(
                "env: no environment; call .environment(env=...) with a gymnasium id "
                "(e.g. 'InvertedPendulum-v5') or an entry point 'package.module:ClassName'"
            )
        if self.env_config:
            _take(data, "env", "kwargs", dict(self.env_config), "environment(env_config=...)")
        if self.num_env_runners is not None:
            if (
                isinstance(self.num_env_runners, bool)
                or not isinstance(self.num_env_runners, int)
                or self.num_env_runners < 1
            ):
                raise ConfigError(
                    f"num_env_runners: GoGePo needs at least 1 rollout worker actor, got {self.num_env_runners!r}"
                )
            _take(data, "run", "workers", self.num_env_runners, "env_runners(num_env_runners=...)")
        if self.num_envs_per_env_runner != 1:
            _take(
                data,
                "run",
                "envs_per_worker",
                self.num_envs_per_env_runner,
                "env_runners(num_envs_per_env_runner=...)",
            )
        if self.num_learners not in (0, 1):
            raise ConfigError(
                f"num_learners: GoGePo has exactly one learner, got {self.num_learners!r}"
            )
        if self.num_gpus_per_learner:
            if self.num_gpus_per_learner != 1:
                raise ConfigError(
                    f"num_gpus_per_learner: GoGePo's learner uses 0 or 1 GPU, got {self.num_gpus_per_learner!r}"
                )
            _take(
                data,
                "learner",
                "device",
                "cuda",
                "learners(num_gpus_per_learner=1)",
                same=lambda mine, _: str(mine).startswith("cuda"),
            )
        if self.num_cpus_per_learner != "auto":
            _take(
                data,
                "learner",
                "num_cpus",
                self.num_cpus_per_learner,
                "learners(num_cpus_per_learner=...)",
            )
        if self.seed is not None:
            _take(data, "run", "seed", self.seed, "debugging(seed=...)")
        spi = self.steps_per_iteration
        if spi is not None and (isinstance(spi, bool) or not isinstance(spi, int) or spi < 1):
            raise ConfigError(f"steps_per_iteration: must be a positive integer, got {spi!r}")
        return build_config(data, "GoGePoConfig")

    @override(AlgorithmConfig)
    def validate(self) -> None:
        # RLlib's notice "You are running GoGePo on the new API stack!" does not apply:
        # GoGePo uses neither RLModules nor RLlib's EnvRunners. Consume its log-once key.
        log_once(f"{getattr(self.algo_class, '__name__', 'GoGePo')}_on_new_api_stack")
        super().validate()
        self.to_gogepo_config()


class GoGePo(Algorithm):
    """GoGePo as an RLlib Algorithm; training runs in a :class:`~gogepo_ray.trainer.Trainer`."""

    config: GoGePoConfig

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> GoGePoConfig:
        return GoGePoConfig()

    @override(Algorithm)
    def setup(self, config: GoGePoConfig) -> None:
        # Not Algorithm.setup(): that builds RLlib's EnvRunnerGroup, LearnerGroup and
        # RLModule. The Trainer starts GoGePo's own learner and rollout actors, on first
        # use, so that restoring a checkpoint right after construction starts them once.
        self.gogepo_config = self.config.to_gogepo_config()
        self.callbacks = [cls() for cls in force_list(self.config.callbacks_class)]
        self._trainer: Trainer | None = None
        self._resume: dict | None = None
        self._trained = False  # train() ran in this session: stop() finishes the run
        self._failed = False
        ensure_ray(self.gogepo_config)
        self._set_up_metrics()  # the Ray metrics that Algorithm.log_result() records into
        make_callback(
            "on_algorithm_init",
            self.callbacks,
            self.config.callbacks_on_algorithm_init,
            kwargs=dict(algorithm=self, metrics_logger=self.metrics),
        )

    @property
    def trainer(self) -> Trainer:
        """The Trainer behind this algorithm (started on first use)."""
        if self._trainer is None:
            callbacks = []
            tracking = self.gogepo_config.tracking
            if tracking.enabled:
                callbacks.append(
                    MLflowTracker(
                        tracking_uri=tracking.tracking_uri,
                        experiment=tracking.experiment,
                        parent_run_id=self.config.mlflow_parent_run_id,
                    )
                )
            self._trainer = Trainer(
                self.gogepo_config, run_dir=self.logdir, callbacks=callbacks, resume=self._resume
            )
            self._resume = None
        return self._trainer

    @property
    def steps_per_iteration(self) -> int:
        return self.config.steps_per_iteration or self.gogepo_config.run.eval_every

    # ------------------------------------------------------------------ training
    @override(Algorithm)
    def training_step(self) -> None:
        """Stream episodes until the next multiple of ``steps_per_iteration`` training env steps."""
        trainer = self.trainer
        target = (
            trainer.progress.env_steps // self.steps_per_iteration + 1
        ) * self.steps_per_iteration
        trainer.run_until(target)

    @override(Algorithm)
    def step(self) -> dict:
        trainer = self.trainer
        steps_before, episodes_before = trainer.progress.env_steps, trainer.progress.episodes
        start = time.perf_counter()
        try:
            self.training_step()
        except BaseException:
            self._failed = True
            raise
        self._trained = True
        return self._results(time.perf_counter() - start, steps_before, episodes_before)

    def _results(self, seconds: float, steps_before: int, episodes_before: int) -> dict:
        trainer = self.trainer
        p = trainer.progress
        stats = trainer.latest_stats
        out: dict[str, Any] = {}
        if stats is not None:
            for key, value in train_metrics(trainer, stats).items():
                section, name = key.split("/", 1)
                out.setdefault(section, {})[name] = value
        eval_return = math.nan
        if p.eval_history:
            at, mean, std = p.eval_history[-1]
            eval_return = mean
            out["eval"] = {"return_mean": mean, "return_std": std, "env_steps": at}
            # task families: heldout_return_mean and heldout/<context>, as in MLflow
            out["eval"].update({k[5:]: v for k, v in trainer.last_eval_contexts.items()})
        out.setdefault("timers", {}).update(
            {"training_iteration": seconds, "training_step": seconds}
        )
        out["env_runners"] = {
            "episode_return_mean": eval_return,
            "num_env_steps_sampled": p.env_steps - steps_before,
            "num_episodes": p.episodes - episodes_before,
            "num_env_steps_sampled_lifetime": p.env_steps,
            "num_episodes_lifetime": p.episodes,
        }
        out["num_env_steps_sampled_lifetime"] = p.env_steps
        out["num_episodes_lifetime"] = p.episodes
        out["num_env_steps_trained_lifetime"] = stats.env_steps if stats is not None else 0
        out["done"] = p.env_steps >= self.gogepo_config.run.total_env_steps
        return out

    @override(Algorithm)
    def evaluate(self, parallel_train_future=None) -> dict:
        """Evaluate G(best return) now: ``run.eval_episodes`` noise-free episodes."""
        batch = self.trainer.evaluate()
        ok = batch.ok()
        returns, lengths = batch.returns[ok], batch.lengths[ok]
        found = len(returns) > 0
        return {
            "evaluation": {
                "env_runners": {
                    "episode_return_mean": float(returns.mean()) if found else math.nan,
                    "episode_return_std": float(returns.std()) if found else math.nan,
                    "episode_len_mean": float(lengths.mean()) if found else math.nan,
                    "num_episodes": int(ok.sum()),
                }
            }
        }

    # ------------------------------------------------------------------ state and checkpoints
    @override(Algorithm)
    def get_state(
        self,
        components: str | Collection[str] | None = None,
        *,
        not_components: str | Collection[str] | None = None,
        **kwargs: Any,
    ) -> dict:
        """``{"gogepo": Trainer.state(), "training_iteration": n}``."""
        state: dict[str, Any] = {TRAINING_ITERATION: self.training_iteration}
        if self._check_component(STATE_KEY, components, not_components):
            # Restored but not started yet: the payload is the state, no actors needed.
            state[STATE_KEY] = (
                self._resume
                if self._trainer is None and self._resume is not None
                else self.trainer.state()
            )
        return state

    @override(Algorithm)
    def set_state(self, state: dict) -> None:
        """Continue from ``state``: the Trainer restarts from its payload (with this
        algorithm's config, which must agree on the env and the network shapes)."""
        if TRAINING_ITERATION in state:
            self._iteration = state[TRAINING_ITERATION]
        if STATE_KEY in state:
            payload = state[STATE_KEY]
            self._check_payload(payload)
            if self._trainer is not None:
                self._trainer.shutdown()  # not finish(): the run goes on from the payload
                self._trainer = None
            self._resume = payload

    def _check_payload(self, payload: Any) -> None:
        if not isinstance(payload, dict) or payload.get("format") != ckpt.FORMAT:
            raise ckpt.CheckpointError(f"not a GoGePo state (format {ckpt.FORMAT!r} expected)")
        mine = self.gogepo_config.model_dump(mode="json")
        saved = payload.get("config", {})
        diff = [
            f"{s}.{k}: checkpoint {saved.get(s, {}).get(k)!r}, config {mine[s][k]!r}"
            for s, k in _SHAPE_KEYS
            if saved.get(s, {}).get(k) != mine[s][k]
        ]
        theirs = saved.get("algorithm", algorithms.DEFAULT)
        if theirs != mine["algorithm"]:
            diff.insert(0, f"algorithm: checkpoint {theirs!r}, config {mine['algorithm']!r}")
        if diff:
            raise ckpt.CheckpointError(
                "the checkpoint belongs to another env or architecture: " + "; ".join(diff)
            )

    @override(Algorithm)
    def get_checkpointable_components(self) -> list[tuple[str, Checkpointable]]:
        return []  # the whole state is the Trainer's payload, written by save_to_path

    @override(Algorithm)
    def save_to_path(
        self,
        path: str | os.PathLike | None = None,
        *,
        state: dict | None = None,
        filesystem: pyarrow.fs.FileSystem | None = None,
        use_msgpack: bool = False,
    ) -> str:
        """RLlib's checkpoint directory, with the Trainer payload in ``gogepo.pt``."""
        state = dict(state) if state is not None else self.get_state()
        payload = state.pop(STATE_KEY, None)
        state.setdefault(
            TRAINING_ITERATION, self.training_iteration
        )  # never empty: see Checkpointable
        if path is not None and filesystem is None:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(_uri(path))
        path = Checkpointable.save_to_path(
            self, path, state=state, filesystem=filesystem, use_msgpack=use_msgpack
        )
        if payload is not None:
            _write_payload(
                filesystem or pyarrow.fs.LocalFileSystem(), f"{path}/{PAYLOAD_FILE}", payload
            )
        return path

    @override(Algorithm)
    def restore_from_path(
        self,
        path: str | os.PathLike,
        *,
        component: str | None = None,
        filesystem: pyarrow.fs.FileSystem | None = None,
        **kwargs: Any,
    ) -> None:
        # Not Algorithm.restore_from_path(): that re-syncs RLlib EnvRunners.
        if component is not None:
            raise ValueError(f"GoGePo checkpoints have no components (got component={component!r})")
        if filesystem is None:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(_uri(path))
        path = Path(path).as_posix()
        Checkpointable.restore_from_path(
            self, path, filesystem=filesystem, **kwargs
        )  # iteration counter
        self.set_state({STATE_KEY: _read_payload(filesystem, f"{path}/{PAYLOAD_FILE}")})

    @override(Algorithm)
    def save_checkpoint(self, checkpoint_dir: str) -> None:
        self.save_to_path(checkpoint_dir)

    @override(Algorithm)
    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self.restore_from_path(checkpoint_dir)
        make_callback(
            "on_checkpoint_loaded",
            callbacks_objects=self.callbacks,
            callbacks_functions=self.config.callbacks_on_checkpoint_loaded,
            kwargs=dict(algorithm=self),
        )

    # ------------------------------------------------------------------ resources and end
    @classmethod
    @override(Algorithm)
    def default_resource_request(cls, config: GoGePoConfig | dict) -> PlacementGroupFactory:
        """The trial's placement group: the driver (this Algorithm) in bundle 0, the
        learner actor in bundle 1 (+1 GPU on cuda), rollout worker i in bundle 2 + i.

        The Trainer pins each actor to its own bundle (``distributed.actors.placement``),
        so bundles of different sizes cannot be taken by the wrong actor, and a trial's
        workers may spread over several nodes.
        """
        if not isinstance(config, GoGePoConfig):
            config = cls.get_default_config().update_from_dict(
                config.to_dict() if isinstance(config, AlgorithmConfig) else config
            )
        cfg = config.to_gogepo_config()
        driver = {
            "CPU": config.num_cpus_for_main_process,
            **config.custom_resources_for_main_process,
        }
        gpus = 1 if cfg.learner.device.startswith("cuda") else 0
        learner = {k: v for k, v in {"CPU": cfg.learner.num_cpus, "GPU": gpus}.items() if v}
        actors = [learner] + [{"CPU": 1.0} for _ in range(cfg.run.workers)]
        return PlacementGroupFactory(bundles=[driver, *actors], strategy=config.placement_strategy)

    @override(Algorithm)
    def cleanup(self) -> None:
        """Finish the run if it trained in this session (final evaluation, checkpoint,
        sweep, summary, MLflow FINISHED), or mark its MLflow run FAILED; stop the actors."""
        trainer, self._trainer = getattr(self, "_trainer", None), None
        if trainer is None:
            return
        try:
            if self._failed:
                for cb in trainer.callbacks:
                    if isinstance(cb, MLflowTracker):
                        cb.fail()
            elif self._trained:
                trainer.finish()
        finally:
            trainer.shutdown()


def _uri(path: str | os.PathLike) -> str:
    """pyarrow wants URIs or absolute paths; RLlib passes plain relative paths through."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


def _write_payload(fs: pyarrow.fs.FileSystem, path: str, payload: dict) -> None:
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        ckpt.save(path, payload)  # atomic, fsynced
        return
    buf = io.BytesIO()
    torch.save(payload, buf)
    with fs.open_output_stream(path) as fh:
        fh.write(buf.getvalue())


def _read_payload(fs: pyarrow.fs.FileSystem, path: str) -> dict:
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        return ckpt.load(path)
    try:
        with fs.open_input_stream(path) as fh:
            data = fh.readall()
    except FileNotFoundError:
        raise ckpt.CheckpointError(f"{path} not found: not a GoGePo checkpoint") from None
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{path} is not a readable GoGePo checkpoint: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != ckpt.FORMAT:
        raise ckpt.CheckpointError(
            f"{path} is not a GoGePo checkpoint (format {ckpt.FORMAT!r} expected)"
        )
    return payload


# ---------------------------------------------------------------------- Tune + MLflow
def _absolute_tracking_uri(uri: str) -> str:
    """Trials run in their own working directories: relative store paths must not move."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    if ":" not in uri:  # a plain directory: MLflow's file store
        return Path(uri).resolve().as_uri()
    return uri


def tune_with_mlflow(
    config: GoGePoConfig,
    *,
    tune_config: Any = None,
    run_config: Any = None,
    tracking_uri: str | None = None,
    experiment: str = "gogepo",
    run_name: str | None = None,
) -> tuple[Any, str]:
    """Run ``tune.Tuner("GoGePo", param_space=config, ...)`` recorded in MLflow: one parent
    run for the sweep and, nested under it (tag ``mlflow.parentRunId``), one run per trial
    with the trial's params, metrics by env step and end-of-run artifacts.

    ``tracking_uri`` defaults as for ``gogepo train``: $MLFLOW_TRACKING_URI, else
    ``sqlite:///<run.output_dir>/mlflow.db`` (made absolute here, since trials run in their
    own directories). Returns ``(ResultGrid, parent_run_id)``; the parent run ends FINISHED
    when every trial did, else FAILED.
    """
    from mlflow.tracking import MlflowClient
    from ray import tune

    run_section = config.gogepo.get("run") if isinstance(config.gogepo, Mapping) else None
    output_dir = str((run_section or {}).get("output_dir", "runs"))
    uri = _absolute_tracking_uri(tracking_uri or default_tracking_uri(output_dir))
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        exp_id = exp.experiment_id
    else:  # as MLflowTracker does: keep artifacts next to a sqlite store
        artifacts = (
            (Path(output_dir).resolve() / "mlartifacts").as_uri()
            if uri.startswith("sqlite:")
            else None
        )
        exp_id = client.create_experiment(experiment, artifact_location=artifacts)
    name = run_name or getattr(run_config, "name", None) or "gogepo-sweep"
    parent = client.create_run(
        exp_id, run_name=name, tags={"gogepo.sweep": "true", "env_id": str(config.env)}
    )
    parent_id = parent.info.run_id
    config = config.copy(copy_frozen=False).training(
        gogepo={"tracking": {"enabled": True, "tracking_uri": uri, "experiment": experiment}},
        mlflow_parent_run_id=parent_id,
    )
    status = "FAILED"
    try:
        results = tune.Tuner(
            config.tune_name(), param_space=config, tune_config=tune_config, run_config=run_config
        ).fit()
        status = "FINISHED" if not results.errors else "FAILED"
        return results, parent_id
    finally:
        client.set_terminated(parent_id, status)


class GoGePoARSConfig(GoGePoConfig):
    """The builder of :class:`GoGePoARS` runs: the same settings, with ``algorithm: ars``
    (the ARS settings go in ``gogepo={"ars": {...}}``)."""

    ALGORITHM = "ars"

    def __init__(self, algo_class: type | None = None) -> None:
        super().__init__(algo_class=algo_class or GoGePoARS)


class GoGePoARS(GoGePo):
    """The paper's ARS V2-t baseline as an RLlib Algorithm (Tune name ``"GoGePoARS"``); it
    runs in the same Trainer, on the same workers, as :class:`GoGePo`."""

    config: GoGePoARSConfig

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> GoGePoARSConfig:
        return GoGePoARSConfig()


_CLASSES: dict[str, type[GoGePo]] = {
    GoGePoConfig.ALGORITHM: GoGePo,
    GoGePoARSConfig.ALGORITHM: GoGePoARS,
}


def algorithm_class(name: str) -> type[GoGePo]:
    """The RLlib Algorithm of the registered algorithm ``name``, known to Tune under its
    ``rllib_name``. ``GoGePo`` and ``GoGePoARS`` are written out below; any other registered
    algorithm gets a subclass (and a config builder) of its own, made and registered with
    Tune on first use."""
    if name in _CLASSES:
        return _CLASSES[name]
    entry = algorithms.get(name)  # a ValueError naming the registered ones
    builder = type(f"{entry.rllib_name}Config", (GoGePoConfig,), {"ALGORITHM": name})
    cls = type(
        entry.rllib_name,
        (GoGePo,),
        {
            "__doc__": f"{entry.summary}, as an RLlib Algorithm (Tune name {entry.rllib_name!r}).",
            "get_default_config": classmethod(lambda c: builder(algo_class=c)),
        },
    )
    _CLASSES[name] = cls
    register_trainable(entry.rllib_name, cls)
    return cls
