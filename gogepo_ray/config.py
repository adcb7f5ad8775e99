"""Run configuration: pydantic models loaded from YAML, with ``--set key=value`` overrides.

Every default below is the reference value of the paper (Faccio et al., AAAI 2023, arXiv
2207.01570) and of the authors' public code (IDSIA/GoGePo). A config file only needs to
say what differs (the env and its return range, mostly). Unknown keys, wrong types,
out-of-range values, env ids that do not exist and non-Box spaces are all rejected with
one message that names the field.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A user's configuration is wrong; the message says where and why."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; read it as the float users mean."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True
    )


class EnvConfig(_Section):
    id: str = "InvertedPendulum-v5"
    """Gymnasium env id (``Hopper-v5``) or an entry point ``package.module:ClassName``."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the env constructor."""
    return_min: float = 0.0
    """Lowest return of interest: the bottom of the command sweep."""
    return_max: float = 1000.0
    """Highest return of interest. Commands enter the generator divided by (return_max − return_min)."""
    survival_offset: float = 0.0
    """Added to the reward of every *training* step (Hopper, Walker2d, Ant: −1). Evaluation reports the true return."""
    max_episode_steps: int | None = Field(default=None, ge=1)
    """Episode step limit; None keeps the env's own."""

    @model_validator(mode="after")
    def _check(self) -> EnvConfig:
        from gogepo_ray.envs import EnvError, check_env_id

        if self.return_max <= self.return_min:
            raise ValueError("return_max must be greater than return_min")
        try:
            check_env_id(self.id, self.kwargs)
        except EnvError as exc:
            raise ValueError(f"env.id {self.id!r}: {exc}") from None
        return self


class PolicyConfig(_Section):
    hidden: list[int] = Field(default_factory=lambda: [256, 256])
    """Hidden layer sizes of the generated MLP policy (tanh units)."""
    obs_norm: bool = True
    """Normalise observations with running statistics of all training steps."""

    @field_validator("hidden")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(h < 1 for h in value):
            raise ValueError("hidden sizes must be positive")
        return value


class GeneratorConfig(_Section):
    tile: int = Field(default=16, ge=1)
    """k: weight matrices are written in k×k tiles."""
    embedding_dim: int = Field(default=8, ge=1)
    """Size of each tile's learned embedding."""
    hidden: list[int] = Field(default_factory=lambda: [256, 256])
    """Hidden sizes of the per-layer-kind hypernetwork MLPs (ReLU)."""
    output_scale: float = Field(default=2.0, gt=0)
    """s: generated weights and biases are scaled by s/√fan_in."""
    saturation_penalty: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """λ: the generator's loss adds λ·(return_max − return_min)² × the mean of max(|z| − atanh(0.99), 0)² over the output pre-activations z of its policies on 64 standard-normal (normalised) observations, so that G(c) does not pin its actions at the bounds, where neither the critic's gradient nor the parameter noise moves them (docs "Learning that holds"). 0: off (the paper)."""
    lr: float = Field(default=2e-6, gt=0)
    """Adam learning rate of the generator."""
    batch_size: int = Field(default=16, ge=1)
    """Commands per generator step, sampled from the buffer's returns."""
    steps_per_episode: int = Field(default=19, ge=0)
    """Generator steps after every finished training episode."""


class CriticConfig(_Section):
    probing_states: int = Field(default=200, ge=1)
    """P: learned probing states whose actions form a policy's fingerprint."""
    hidden: list[int] = Field(default_factory=lambda: [256, 256])
    """Hidden sizes of the critic MLP on the fingerprint (ReLU)."""
    lr: float = Field(default=5e-3, gt=0)
    """Adam learning rate of the critic (and the probing states)."""
    batch_size: int = Field(default=16, ge=1)
    """(θ, R) pairs per critic step."""
    steps_per_episode: int = Field(default=4, ge=0)
    """Critic steps after every finished training episode."""


class BufferConfig(_Section):
    capacity: int = Field(default=10_000, ge=1)
    """Most (θ, R) pairs kept; the oldest go first."""
    recency_exponent: float = Field(default=1.1, ge=0)
    """``sampling: recency``: the entry of age k (1 = newest) is sampled with weight (1/k)^recency_exponent."""
    sampling: Literal["recency", "buckets"] = "recency"
    """``recency``: the paper's rule, newest entries first; the oldest entry makes room. ``buckets``: entries grouped into return buckets over [env.return_min, env.return_max] (UDRLPG, arXiv 2501.16288); a bucket is drawn first, higher ones more often, then an entry of it uniformly, and the oldest entry of the fullest bucket makes room, so rare good policies stay (docs "Learning that holds")."""
    buckets: int = Field(default=10, ge=1)
    """``sampling: buckets``: how many equal return buckets cut [env.return_min, env.return_max]."""
    bucket_exponent: float = Field(default=1.0, ge=0)
    """``sampling: buckets``: bucket i (0 = lowest) that holds entries is drawn with weight (i + 1)^bucket_exponent; 0 draws every bucket alike."""


class ExplorationConfig(_Section):
    drive: float = 20.0
    """Exploration command = best training return so far + drive."""
    param_noise: float = Field(default=0.1, ge=0)
    """σ of the Gaussian noise added to generated parameters of training policies (with ``noise: adaptive``, its starting value)."""
    noise: Literal["fixed", "adaptive"] = "fixed"
    """``fixed``: σ is ``param_noise`` throughout (the paper). ``adaptive``: σ is scaled after every batch of training policies so that a noisy policy's actions differ from the noise-free G(c)'s by ``action_distance`` (Plappert et al. 2018, arXiv 1706.01905)."""
    restart_patience: int | None = Field(default=None, ge=1)
    """Restarts for a run stuck in its first basin: when neither the best evaluation of the current attempt nor its best training return has risen by ``restart_gain`` of (return_max − return_min) for this many training env steps, and the best evaluation is below return_max minus that, the learner starts afresh: new generator, critic and optimisers from a new seed, an empty buffer, new observation statistics and noise. The run's best evaluation and ``best.pt`` stay, and the final evaluation is judged against the best of every attempt (with ``run.restore_drop`` a fall there restores that one, so the run ends with it). No restart once ``run.total_env_steps`` are trained (the final evaluation). None: never (the paper)."""
    restart_gain: float = Field(default=0.1, gt=0, le=1)
    """``restart_patience``: the rise of the best evaluation or of the best training return, as a fraction of (return_max − return_min), that counts as progress."""
    action_distance: float = Field(default=0.1, gt=0)
    """``noise: adaptive``: the target root-mean-square action difference between G(c) + σε and G(c), in units of half the action range, on 64 standard-normal (normalised) observations."""


class ArsConfig(_Section):
    """Augmented Random Search V2-t (Mania et al. 2018, arXiv 1803.07055, Algorithm 2), run
    with ``algorithm: ars``. Defaults are the ARS paper's Hopper settings."""

    directions: int = Field(default=8, ge=1)
    """N: random directions δ per iteration; each is run as θ + νδ and θ − νδ (2N episodes)."""
    top_directions: int = Field(default=4, ge=1)
    """b: the directions with the highest max(r+, r−) that make the step (b ≤ N; b < N is the "-t" of V2-t)."""
    step_size: float = Field(default=0.01, gt=0)
    """α: θ += α / (b σ_R) Σ (r+ − r−) δ over the top b directions, σ_R the std of their 2b returns."""
    noise: float = Field(default=0.025, gt=0)
    """ν: scale of the exploration perturbations of θ."""

    @model_validator(mode="after")
    def _check(self) -> ArsConfig:
        if self.top_directions > self.directions:
            raise ValueError(
                f"top_directions ({self.top_directions}) must be at most directions ({self.directions})"
            )
        return self


def _as_points(value: Any) -> Any:
    """A list of numbers is a list of 1-D contexts: [0.5, 1.5] -> [[0.5], [1.5]]."""
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return [[v] for v in value]
    return value


def _as_vector(value: Any) -> Any:
    return [value] if isinstance(value, (int, float)) else value


class ContextTrainConfig(_Section):
    """The training distribution of task contexts: a uniform box, or a list of points."""

    low: list[float] | None = None
    """Lower corner of the uniform box (one number per context dimension; a number for 1-D)."""
    high: list[float] | None = None
    """Upper corner of the uniform box."""
    points: list[list[float]] | None = None
    """Or: the training contexts as a list, drawn uniformly ([[x, y], ...]; [v1, v2, ...] for 1-D)."""

    _vector = field_validator("low", "high", mode="before")(_as_vector)
    _points = field_validator("points", mode="before")(_as_points)

    @model_validator(mode="after")
    def _check(self) -> ContextTrainConfig:
        box = self.low is not None or self.high is not None
        if box == (self.points is not None):
            raise ValueError("give either low and high (a uniform box) or points (a list)")
        if box:
            if self.low is None or self.high is None:
                raise ValueError("a box needs both low and high")
            if len(self.low) != len(self.high):
                raise ValueError(f"low has {len(self.low)} values, high {len(self.high)}")
            if any(lo > hi for lo, hi in zip(self.low, self.high)):
                raise ValueError("low must not exceed high in any dimension")
        elif not self.points or len({len(p) for p in self.points}) != 1:
            raise ValueError("points must be a non-empty list of contexts of one length")
        return self

    @property
    def dim(self) -> int:
        return len(self.low) if self.points is None else len(self.points[0])


class ContextConfig(_Section):
    """Task families (docs/task-families.md): the generator is asked for [return, context]
    and learns every task of the env's family at once. ``env.id`` must be a family, e.g.
    ``PointGoal-v0``."""

    train: ContextTrainConfig
    """Training distribution of contexts: ``{low: [..], high: [..]}`` or ``{points: [[..], ..]}``."""
    heldout: list[list[float]]
    """Held-out contexts, never trained on: evaluated with G(best(x), x) (``eval/heldout_return_mean``). A list of numbers for 1-D."""
    neighbours: int = Field(default=50, ge=1)
    """The best return of a context is the highest among this many buffer entries with the nearest contexts."""
    blind: bool = False
    """Withhold the context from G and V (episodes still run on sampled tasks): the context-blind baseline, one policy for every task."""

    _points = field_validator("heldout", mode="before")(_as_points)

    @model_validator(mode="after")
    def _check(self) -> ContextConfig:
        if not self.heldout:
            raise ValueError("heldout must list at least one context")
        dims = {len(p) for p in self.heldout}
        if dims != {self.train.dim}:
            raise ValueError(
                f"heldout contexts have {sorted(dims)} values, the training ones {self.train.dim}"
            )
        if self.train.points is not None:
            shared = [p for p in self.heldout if p in self.train.points]
            if shared:
                raise ValueError(f"held-out contexts must not be training points: {shared}")
        return self

    @property
    def dim(self) -> int:
        return self.train.dim


class LearnerConfig(_Section):
    device: str = "cpu"
    """Torch device of the learner: ``cpu`` or ``cuda`` (the learner actor then asks Ray for a GPU,
    and replays its critic and generator steps as CUDA graphs)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Arithmetic of the generator's hypernetworks and the critic's fingerprint: bf16 autocast
    (parameters, optimiser state, predicted returns and losses stay fp32). ``auto``: bf16 on a GPU,
    and on a CPU with AMX or AVX512-BF16 for policies of 10 000 weights or more, where it is faster
    (``bench/learner_step.py``); else fp32."""
    updates_per_episode: float = Field(default=1.0, gt=0, le=64)
    """Critic+generator rounds (``critic.steps_per_episode`` then ``generator.steps_per_episode``) per
    finished training episode; fractions carry over (0.25: one round every 4 episodes). 1 is the
    paper's schedule. Below 1 the learner keeps up with more workers, at the cost of more env
    steps per unit of progress (docs/benchmarks.md, "Scaling")."""
    num_threads: int = Field(default=0, ge=0)
    """Torch intra-op threads of the learner; 0: as many as it reserves CPUs (``num_cpus``, at least 1)."""
    num_cpus: float = Field(default=2.0, ge=0)
    """CPUs the learner actor reserves in Ray. The learner is the method's bottleneck, so it gets two cores by default."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda"):
            raise ValueError("device must be 'cpu' or 'cuda' (optionally 'cuda:N')")
        return value


class RunConfig(_Section):
    seed: int = Field(default=0, ge=0)
    """Base seed; every worker's and every episode's seed derives from it."""
    total_env_steps: int = Field(default=100_000, ge=1)
    """Training env steps to run (evaluation steps are counted apart)."""
    eval_every: int = Field(default=10_000, ge=1)
    """Evaluate G(best return) after every this many training env steps."""
    eval_episodes: int = Field(default=10, ge=1)
    """Episodes averaged per evaluation."""
    workers: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 2) - 1), ge=1)
    """Rollout worker actors. Default: the machine's CPUs minus one for the learner."""
    envs_per_worker: int = Field(default=1, ge=1)
    """Policies a worker gets per request. It runs their episodes one after another and
    sends the results back together: more than 1 saves round trips where episodes are
    short."""
    checkpoint_every: int = Field(default=50_000, ge=1)
    """Write a checkpoint after every this many training env steps (and at the end)."""
    output_dir: str = "runs"
    """Where run directories are created."""
    name: str | None = None
    """Run directory name; default ``<env>-<time>-s<seed>``."""
    eval_command: Literal["best_return", "sweep"] = "best_return"
    """The command an evaluation asks for. ``best_return``: the best training return so far (the paper). ``sweep``: first ``eval_sweep_commands`` commands spread over (return_min, best return], one episode each, and the command the last evaluation chose (after a restore, the best evaluation's) when it is not one of them, then ``eval_episodes`` episodes of the command whose episode scored highest (the highest such command on a tie); the sweep's episodes count as evaluation steps. ``gogepo eval`` then uses the command the run's last (or best) evaluation chose."""
    eval_sweep_commands: int = Field(default=5, ge=2)
    """``eval_command: sweep``: commands in the small sweep that picks an evaluation's command."""
    restore_drop: float | None = Field(default=None, gt=0, le=1)
    """Keep the best: when an evaluation scores more than this fraction of (return_max − return_min) below the best evaluation so far, the generator and critic (and their optimisers) of the best evaluation are restored, with the observation statistics they were evaluated under; the buffer stays. At the run's end a smaller fall evaluates the best networks on fresh episodes too, and the run ends with whichever scores higher. None: never restore (the paper)."""
    sweep_commands: int = Field(default=21, ge=2)
    """Commands in the final command sweep, spread over [return_min, return_max]."""
    sweep_at_end: bool = True
    """Run the command sweep once training ends and record it with the run."""
    render_at_end: bool = False
    """Once training ends, render one evaluation episode (at most 1000 steps) to ``<run_dir>/policy.mp4`` (logged to MLflow with tracking on). Needs an OpenGL backend (docs/results.md, "Rendering a policy video"); without one the run only warns."""
    max_worker_restarts: int = Field(default=20, ge=0)
    """Dead rollout workers replaced (their episodes re-issued) before the run fails."""
    max_consecutive_failures: int = Field(default=200, ge=1)
    """Training episodes failing in a row (env errors, non-finite values) before the run stops with an error."""
    worker_placement_timeout_s: float = Field(default=120.0, gt=0)
    """Seconds a replacement rollout worker may wait for a place on the cluster (after its node is lost, say). After that the run says so once and goes on with the workers it has; a replacement placed later joins the pool. With no live worker left the run stops with an error naming its checkpoint and ``gogepo train --resume``. A rebuilt learner (``max_learner_restarts``) gets as long to be placed and start, or the run stops with that error."""
    max_learner_restarts: int = Field(default=3, ge=0)
    """Times the learner actor is rebuilt from ``checkpoints/latest.pt`` when it dies (its node lost, say). The episodes taken in since that checkpoint are lost and counted. 0: a dead learner stops the run with an error naming ``gogepo train --resume``."""


class TrackingConfig(_Section):
    enabled: bool = True
    """Record the run in MLflow."""
    tracking_uri: str | None = None
    """MLflow tracking URI. Default: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir>/mlflow.db``."""
    experiment: str = "gogepo"
    """MLflow experiment name."""


class Config(_Section):
    """A whole GoGePo run."""

    algorithm: str = "gogepo"
    """A registered algorithm (``gogepo_ray.algorithms``). ``gogepo``: the generator of policies. ``ars``: the paper's baseline, Augmented Random Search V2-t, on the same workers (the ``ars`` section; ``generator``, ``critic``, ``buffer`` and ``exploration`` are then unused)."""
    env: EnvConfig = Field(default_factory=EnvConfig)
    """The env to train on, and the range of returns that commands are normalised by."""
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    """The MLP policy whose weights the generator writes (ARS: the policy it trains)."""
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    """G: the hypernetwork that maps a command to policy weights, and its optimiser."""
    critic: CriticConfig = Field(default_factory=CriticConfig)
    """V: the critic that predicts a policy's return from its fingerprint on probing states."""
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    """The replay buffer of (θ, return) pairs and how it is sampled."""
    exploration: ExplorationConfig = Field(default_factory=ExplorationConfig)
    """How training policies explore: the command's drive and the parameter noise."""
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    """Where and how the learner runs: device, precision, threads, rounds per episode."""
    ars: ArsConfig = Field(default_factory=ArsConfig)
    """Augmented Random Search V2-t, used with ``algorithm: ars``."""
    context: ContextConfig | None = None
    """Task contexts for an env that is a task family; none (the default) trains on the env's one task."""
    run: RunConfig = Field(default_factory=RunConfig)
    """The run: seed, budget, workers, evaluations, checkpoints and fault limits."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow tracking of the run."""

    @field_validator("algorithm")
    @classmethod
    def _check_algorithm(cls, name: str) -> str:
        from gogepo_ray import algorithms

        algorithms.get(name)  # a ValueError naming the registered algorithms
        return name

    @model_validator(mode="after")
    def _check_eval_command(self) -> Config:
        if self.run.eval_command != "sweep":
            return self
        from gogepo_ray.algorithms import takes_commands

        if not takes_commands(self):
            raise ValueError(
                f"run.eval_command: sweep picks a command, and {self.algorithm} policies take none; "
                "use best_return"
            )
        if self.context is not None:
            raise ValueError(
                "run.eval_command: sweep is not for task families (each held-out context is "
                "evaluated at its own estimated best return); use best_return"
            )
        return self

    @model_validator(mode="after")
    def _check_context(self) -> Config:
        if self.context is None:
            return self
        from gogepo_ray import algorithms
        from gogepo_ray.envs import family_of
        from gogepo_ray.envs.families import check_context

        if not algorithms.of(self).takes_contexts:
            able = [n for n in algorithms.names() if algorithms.get(n).takes_contexts]
            raise ValueError(
                f"context: {self.algorithm} does not train on task contexts; "
                f"algorithms that do: {', '.join(able)}"
            )
        family = family_of(self.env.id, self.env.kwargs)
        if family is None:
            raise ValueError(
                f"context: env.id {self.env.id!r} is not a task family (e.g. PointGoal-v0, "
                "HalfCheetahVel-v0, AntDir-v0); remove the context section to train on it"
            )
        space, names = family
        c = self.context
        if c.dim != space.shape[0]:
            raise ValueError(
                f"context: {self.env.id} contexts have {space.shape[0]} values "
                f"({', '.join(names)}), the config's {c.dim}"
            )
        where = [("train.low", c.train.low), ("train.high", c.train.high)]
        where += [(f"train.points[{i}]", p) for i, p in enumerate(c.train.points or [])]
        where += [(f"heldout[{i}]", p) for i, p in enumerate(c.heldout)]
        for name, value in where:
            if value is not None:
                try:
                    check_context(space, names, value)
                except ValueError as exc:
                    raise ValueError(f"context.{name}: {exc}") from None
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {"generator.lr": 2e-06}."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value and prefix.count(".") < 1:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error" and "error" in e.get("ctx", {}):
            msg = str(e["ctx"]["error"])
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``generator.lr=1e-5`` -> (["generator", "lr"], 1e-05); values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has no key")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def build_config(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{p} is not a text file (byte {exc.start} is not UTF-8): a config is YAML text"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
        try:
            loaded = _yaml_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides or [])
    return build_config(data, source)


def reference_markdown() -> str:
    """The config reference table of docs/config.md, generated from the models' docstrings."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section_name, section_field in Config.model_fields.items():
        model = section_field.annotation
        if section_name == "context":  # optional section: its keys, then its sub-section's
            for name, field in ContextConfig.model_fields.items():
                if name == "train":
                    for sub, f in ContextTrainConfig.model_fields.items():
                        desc = " ".join((f.description or "").split())
                        lines.append(f"| `context.train.{sub}` | `null` | {desc} |")
                    continue
                default = "required" if field.is_required() else json.dumps(field.default)
                desc = " ".join((field.description or "").split())
                lines.append(f"| `context.{name}` | `{default}` | {desc} |")
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):  # a top-level key
            desc = " ".join((section_field.description or "").split())
            lines.append(f"| `{section_name}` | `{section_field.default}` | {desc} |")
            continue
        for name, field in model.model_fields.items():
            if field.default_factory is not None:
                default = field.default_factory()
            else:
                default = field.default
            if section_name == "run" and name == "workers":
                default = "CPUs − 1"
            shown = default if isinstance(default, str) else json.dumps(default)
            desc = " ".join((field.description or "").split())
            lines.append(f"| `{section_name}.{name}` | `{shown}` | {desc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
