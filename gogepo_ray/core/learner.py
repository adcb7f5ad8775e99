"""The GoGePo learner: generator, critic, their optimisers, the replay buffer and the
master observation statistics, with the update loop of the paper (Algorithm 1).

Per finished training episode (θ, R):
  1. R_train = R + survival_offset · length; store (θ, R_train) in the buffer.
  2. ``learner.updates_per_episode`` rounds (1 in the paper; a fraction carries over), each:
     ``critic.steps_per_episode`` critic steps:       min_V  mean (V(θ_i) − R_i)²
     ``generator.steps_per_episode`` generator steps, V frozen, commands c_i = buffer
     returns:                                        min_G  mean (V(G(c_i)) − c_i)²
With many workers the learner takes in every episode that arrived since its last update
(:meth:`Learner.step`), runs the rounds they owe, then writes the next policies of the
workers that sent them. With one worker and 1 round per episode this is the paper's
sequence: episode, round, next policy.
Exploration: command c = best training return so far + drive; θ = G(c) + σ·ε, ε ~ N(0, I).
With ``exploration.noise: adaptive`` σ follows a target distance in action space
(Plappert et al. 2018): after each batch, σ ← σ·√(δ / d), d the RMS difference of tanh
outputs of G(c) + σε and G(c) on fixed standard-normal observations.
Evaluation: G(best training return), no noise; with ``run.eval_command: sweep`` the
command whose episode scored highest on a small sweep (``begin_eval`` / ``eval_at``).
Every periodic evaluation keeps a copy of the networks it evaluated; ``end_eval`` keeps the
best of them (``best_state_dict``, the run's ``checkpoints/best.pt``) and, with
``run.restore_drop``, restores it when an evaluation falls far below it.
Task families (``core.context``): every training episode runs on a context x drawn from the
training distribution, with command best(x) + drive, θ = G(c, x) + σ·ε; evaluation runs
G(best(x), x) on every held-out x.

This module knows tensors and numpy only. It reads its settings from a config object by
attribute (``gogepo_ray.config.Config``) without importing pydantic.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import torch

from gogepo_ray.core.buffer import BucketBuffer, ReplayBuffer
from gogepo_ray.core.context import TaskContexts
from gogepo_ray.core.critic import Critic
from gogepo_ray.core.generator import Generator
from gogepo_ray.core.normalizer import ObsStats
from gogepo_ray.core.policy import PolicySpec, policy_preactivation
from gogepo_ray.sysinfo import resolve_precision
from gogepo_ray.types import EpisodeBatch, Kind, LearnerStats, ParamBatch, episode_seed

if TYPE_CHECKING:
    from gogepo_ray.config import Config


def critic_loss(
    critic: Critic,
    policy_params: torch.Tensor,
    returns: torch.Tensor,
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paper eq. (critic): mean over the batch of (V(θ[, x]) − R)²."""
    return ((critic(policy_params, context) - returns) ** 2).mean()


# |z| beyond this puts tanh(z) past ±0.99, where its slope is below 0.02: diag/saturation
# and generator.saturation_penalty
_SATURATED = math.atanh(0.99)


def generator_loss(
    generator: Generator,
    critic: Critic,
    commands: torch.Tensor,
    context: torch.Tensor | None = None,
    penalty: float = 0.0,
    states: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paper eq. (generator): mean over commands of (V(G(c[, x])[, x]) − c)², V held fixed.

    ``penalty`` > 0 (generator.saturation_penalty × (return_max − return_min)²) adds
    penalty × the mean of max(|z| − atanh(0.99), 0)² over the output pre-activations z of
    the generated policies on ``states`` (N, obs_dim, on G's device and in the dtype of its
    layers): a cost on pinning tanh at ±1."""
    layers = generator.layers(commands, context)
    loss = ((critic(layers, context) - commands) ** 2).mean()
    if penalty:
        z = policy_preactivation(generator.spec, layers, states)
        loss = loss + penalty * (torch.relu(z.float().abs() - _SATURATED) ** 2).mean()
    return loss


# exploration.restart_patience: restart k draws its networks and noise from seed + k × this
_RESTART_SEED_STRIDE = 104_729


def exploration_command(best_return: float | None, drive: float) -> float:
    """Paper §3: ask for a little more than the best return seen so far."""
    return (0.0 if best_return is None else best_return) + drive


def training_return(true_return: float, length: int, survival_offset: float) -> float:
    """Return the method learns from: the env's return plus a per-step offset (Hopper: −1)."""
    return true_return + survival_offset * length


class OptimiserStep:
    """One optimiser step, ``loss_fn(*inputs)`` then backward then ``optimizer.step()``,
    returning the loss as a device tensor (read it with ``.item()`` when needed).

    With ``cuda_graph`` the whole step (forward, backward and the fused Adam update) is
    captured once as a CUDA graph and replayed on each call, the inputs copied into fixed
    buffers first. A learner step is thousands of small kernels: launched one by one from
    Python the GPU idles most of the time (measured on an H100 at the paper's Hopper sizes:
    about 19 ms of GPU work in 154 ms per round, docs/benchmarks.md "Learner"); a replay launches
    them all at once. The maths is the eager step's: the warm-up steps that a capture needs
    are undone, so a graphed run learns exactly what an eager one would (tests/test_gpu.py).

    Inputs may be on the host: they are copied to ``device`` once, straight into the
    graph's input buffers when there is a graph. The returned loss of a replayed step is
    the graph's own output buffer: the next call overwrites it. Inputs must keep their
    shapes (batch sizes are fixed per run); call :meth:`reset` after replacing the
    optimiser's state (``load_state_dict``).
    """

    WARMUP = 3  # eager steps on a side stream before capture, as CUDA graphs require

    def __init__(self, loss_fn, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.device = device
        self.cuda_graph = device.type == "cuda"
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.reset()

    def reset(self) -> None:
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: list[torch.Tensor | None] = []
        self._loss: torch.Tensor | None = None

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        if not self.cuda_graph:
            return self._step([None if x is None else x.to(self.device) for x in inputs]).detach()
        if self._graph is None:
            self._capture(inputs)
        for buf, x in zip(self._inputs, inputs):
            if buf is not None:
                buf.copy_(x, non_blocking=True)
        self._graph.replay()
        return self._loss

    def _step(self, inputs, zero_grad: bool = True) -> torch.Tensor:
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(*inputs)
        loss.backward()
        self.optimizer.step()
        return loss

    def _capture(self, inputs) -> None:
        self._inputs = [
            None if x is None else torch.empty_like(x, device=self.device) for x in inputs
        ]
        for buf, x in zip(self._inputs, inputs):
            if buf is not None:
                buf.copy_(x)
        # What the warm-up changes, to put back afterwards: the parameters, and the Adam
        # state of parameters that had one (a fresh state is zeros, step 0).
        params_before = [p.detach().clone() for p in self.params]
        state_before = {
            p: {k: v.clone() for k, v in self.optimizer.state[p].items()}
            for p in self.params
            if self.optimizer.state.get(p)
        }
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self._step(self._inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Gradients set to None outside the graph: backward inside it then writes them into
        # the graph's own buffers on every replay instead of adding to them.
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            loss = self._step(self._inputs, zero_grad=False)
        with torch.no_grad():
            for p, before in zip(self.params, params_before):
                p.copy_(before)
            for p in self.params:
                for k, v in self.optimizer.state[p].items():
                    if p in state_before:
                        v.copy_(state_before[p][k])
                    else:
                        v.zero_()
        self._graph, self._loss = graph, loss.detach()


class StreamingLearner:
    """The streaming step both learners share (GoGePo's ``Learner``, ARS's
    ``algorithms.ars.learner.ArsLearner``): take in results, learn from them, write the next policies."""

    cfg: Config
    spec: PolicySpec
    obs_stats: ObsStats
    env_steps: int
    learner_seconds: float

    def param_batch(
        self,
        kind: Kind,
        ids: np.ndarray,
        commands: np.ndarray,
        policy_params: np.ndarray,
        follow_stats: bool = True,
    ) -> ParamBatch:
        """Policies for a worker: per-episode reset seeds from the run seed, the master
        observation statistics (none with ``policy.obs_norm`` off) and the training steps
        learned from so far."""
        stats = self.obs_stats if self.cfg.policy.obs_norm else ObsStats(self.spec.obs_dim)
        return ParamBatch(
            kind=kind,
            episode_ids=ids,
            seeds=np.array(
                [episode_seed(self.cfg.run.seed, kind, int(i)) for i in ids], dtype=np.int64
            ),
            commands=np.asarray(commands, dtype=np.float64),
            policy_params=np.asarray(policy_params, np.float32).reshape(
                len(ids), self.spec.num_params
            ),
            obs_count=stats.count,
            obs_mean=stats.mean,
            obs_m2=stats.m2,
            trained_env_steps=self.env_steps,
            follow_stats=follow_stats,
        )

    def take_in(self, batch: EpisodeBatch) -> int:
        raise NotImplementedError

    def learn(self) -> None:
        """Whatever the episodes taken in so far call for (GoGePo: the rounds owed)."""
        raise NotImplementedError

    def propose(self, n: int) -> ParamBatch:
        raise NotImplementedError

    def stats(self, update_seconds: float = 0.0) -> LearnerStats:
        raise NotImplementedError

    def step(self, batches: list[EpisodeBatch], proposals: list[int]) -> list:
        """The streaming update: take in every training episode that arrived since the last
        step (``batches``, in arrival order), learn, then write one batch of ``n``
        exploration policies from what was learned for every ``n`` in ``proposals``.
        Returns those ParamBatches, then the LearnerStats."""
        start = time.perf_counter()
        for batch in batches:
            self.take_in(batch)
        self.learn()
        out: list = [self.propose(n) for n in proposals]
        took = time.perf_counter() - start
        self.learner_seconds += took
        return [*out, self.stats(took)]

    # ------------------------------------------------------------------ evaluations
    # A periodic evaluation is begin_eval (the learner keeps a copy of the networks it
    # evaluates), for eval_command sweep eval_at, then end_eval with the mean return.
    best_eval: dict | None = None  # the best evaluation: return, env_steps, command, nets
    chosen_command: float | None = None  # eval_command sweep: the command last chosen
    restores: int = 0
    _candidate: dict | None = None  # the evaluation in progress
    _held: dict | None = None  # the networks restore_best replaced

    def _nets_state(self) -> dict:
        """Copies of what an evaluation evaluates, by their state_dict keys."""
        raise NotImplementedError

    def _load_nets_state(self, nets: dict) -> None:
        raise NotImplementedError

    def _best_command_fields(self, command: float | None) -> dict:
        """state_dict entries that make ``eval_command()`` answer ``command``."""
        return {}

    def _obs_state(self) -> dict:
        return {k: torch.tensor(v) for k, v in self.obs_stats.state_dict().items()}

    def begin_eval(self, episodes: int) -> ParamBatch:
        """The policies of a periodic evaluation (for eval_command sweep: its small sweep,
        one episode a command). The networks they come from are kept until ``end_eval``."""
        self._candidate = {
            "nets": self._nets_state(),
            "obs_stats": self._obs_state(),
            "env_steps": self.env_steps,
            "command": None,
        }
        batch = self.first_eval_batch(episodes)
        if self._candidate.get("probe") is None and np.isfinite(batch.commands).any():
            self._candidate["command"] = float(batch.commands[0])
        return batch

    def first_eval_batch(self, episodes: int) -> ParamBatch:
        return self.propose_eval(None, episodes)

    def end_eval(self, mean: float, final: bool = False) -> dict:
        """Record the mean return of the evaluation begun last. It becomes the best one when
        it beats it; with ``run.restore_drop`` an evaluation that falls more than that
        fraction of the return range below the best restores the best networks and the
        observation statistics they were evaluated with (the buffer stays). ``final``: the
        run's final evaluation (subclasses judge it differently)."""
        cand, self._candidate = self._candidate, None
        out = {"best": False, "restored": False, "restarted": False}
        if cand is None or not math.isfinite(mean):
            return out
        best = self.best_eval
        if best is None or mean > best["return"]:
            self.best_eval = {
                "return": float(mean),
                "env_steps": int(cand["env_steps"]),
                "command": cand["command"],
                "nets": cand["nets"],
                "obs_stats": cand["obs_stats"],
            }
            out["best"] = True
            return out
        drop = self.cfg.run.restore_drop
        span = self.cfg.env.return_max - self.cfg.env.return_min
        if drop is not None and mean < best["return"] - drop * span:
            self._put_back(best)
            self.restores += 1
            out["restored"] = True
        return out

    def restore_best(self) -> bool:
        """Put the best evaluation's networks and observation statistics back, keeping the
        current ones for ``undo_restore``. False (nothing changes) before any evaluation."""
        if self.best_eval is None:
            return False
        self._held = {
            "nets": self._nets_state(),
            "obs_stats": self._obs_state(),
            "chosen_command": self.chosen_command,
        }
        self._put_back(self.best_eval)
        return True

    def _put_back(self, kept: dict) -> None:
        """Load networks kept earlier, with the observation statistics they were evaluated
        under: the generated weights mean something only with that normalisation (a
        balanced pendulum shrinks the observations' spread, and the same weights then act
        on inputs many times larger)."""
        self._load_nets_state(_cloned(kept["nets"]))
        self.obs_stats = _obs_stats_from(kept["obs_stats"])

    def undo_restore(self) -> None:
        """Back to the networks ``restore_best`` replaced."""
        held, self._held = self._held, None
        self._put_back(held)
        self.chosen_command = held["chosen_command"]

    def best_state_dict(self) -> dict | None:
        """The learner state with the networks (and observation statistics) of the best
        evaluation: what ``checkpoints/best.pt`` holds. None before any evaluation."""
        if self.best_eval is None:
            return None
        state = self.state_dict()
        state.update(_cloned(self.best_eval["nets"]))
        state["obs_stats"] = _cloned(self.best_eval["obs_stats"])
        state.update(self._best_command_fields(self.best_eval["command"]))
        return state

    def _eval_state(self) -> dict:
        return {"best_eval": self.best_eval, "restores": self.restores}

    def _load_eval_state(self, state: dict) -> None:
        self.best_eval = state.get("best_eval")
        self.restores = int(state.get("restores", 0))
        self._candidate = None


def _on_cpu(tree):
    """A (nested) state dict with every tensor copied to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_on_cpu(v) for v in tree)
    return tree


def _cloned(tree):
    """A (nested) state dict with every tensor copied (to the CPU)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _cloned(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cloned(v) for v in tree)
    return tree


def _obs_stats_from(state: dict) -> ObsStats:
    """ObsStats from their state as a checkpoint holds it (tensors), sharing no memory."""
    return ObsStats.from_state_dict(
        {
            "count": int(state["count"]),
            "mean": state["mean"].numpy().copy(),
            "m2": state["m2"].numpy().copy(),
        }
    )


def _load_optimiser(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimiser's state saved on any device. torch takes every group setting from
    the saved state, ``capturable`` and ``fused`` included, and those belong to the device
    the state was saved on: a GPU run's ``capturable=True`` stops a CPU step, and a CPU
    run's ``capturable=False`` stops a CUDA graph capture. This learner keeps its own."""
    own = [{k: g[k] for k in ("capturable", "fused")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings)


class Learner(StreamingLearner):
    """All learning state of a run. The Ray learner actor wraps one of these."""

    def __init__(self, cfg: Config, spec: PolicySpec) -> None:
        self.cfg = cfg
        self.spec = spec
        self.device = torch.device(cfg.learner.device)
        # Ray sets OMP_NUM_THREADS=1 in actors; the learner is the bottleneck of the method,
        # so by default it uses as many threads as it reserves CPUs (more would spin against
        # other processes on the same cores).
        torch.set_num_threads(cfg.learner.num_threads or max(1, math.ceil(cfg.learner.num_cpus)))
        self.precision = resolve_precision(
            cfg.learner.precision, cfg.learner.device, spec.num_params
        )
        self.env_steps = 0
        self.episodes = 0
        self.failed_episodes = 0
        self.next_id = {"train": 0, "eval": 0}
        self.learner_seconds = 0.0
        # Rounds per episode as an exact fraction, so that 0.1 × 10 episodes is 1 round.
        self.updates_per_episode = Fraction(str(cfg.learner.updates_per_episode))
        self.rounds = 0
        self.restarts = 0  # exploration.restart_patience: fresh starts so far
        self._run_best: dict | None = None  # the best evaluation of the attempts before this
        # exploration.restart_patience's mark: the attempt's best evaluation, the step and
        # the best training return when one of the two last rose by restart_gain
        self._progress_mark: tuple[float, int, float] | None = None
        self._fresh(cfg.run.seed)

    def _fresh(self, seed: int) -> None:
        """New networks, optimisers, buffer, statistics and exploration state from ``seed``:
        a run's start, and each restart of exploration.restart_patience."""
        cfg, spec = self.cfg, self.spec
        torch.manual_seed(seed)
        g, c = cfg.generator, cfg.critic
        bf16 = self.precision == "bf16"
        self.contexts = TaskContexts.from_config(cfg)  # None: not a task family
        k = self.contexts.cond_dim if self.contexts is not None else 0
        self.generator = Generator(
            spec,
            command_scale=cfg.env.return_max - cfg.env.return_min,
            tile=g.tile,
            embedding_dim=g.embedding_dim,
            hidden=tuple(g.hidden),
            output_scale=g.output_scale,
            bf16=bf16,
            context_dim=k,
        ).to(self.device)
        self.critic = Critic(
            spec, probing_states=c.probing_states, hidden=tuple(c.hidden), bf16=bf16, context_dim=k
        ).to(self.device)
        # fused: one kernel per step for all parameters instead of a dozen ops per tensor;
        # capturable on a GPU, so that a whole step replays as one CUDA graph (OptimiserStep)
        cuda = self.device.type == "cuda"
        self.generator_opt = torch.optim.Adam(
            self.generator.parameters(), lr=g.lr, fused=True, capturable=cuda
        )
        self.critic_opt = torch.optim.Adam(
            self.critic.parameters(), lr=c.lr, fused=True, capturable=cuda
        )
        self._critic_update = OptimiserStep(
            lambda params, returns, x: critic_loss(self.critic, params, returns, x),
            self.critic_opt,
            self.device,
        )
        span = cfg.env.return_max - cfg.env.return_min
        penalty = g.saturation_penalty * span**2
        # where adaptive noise measures the action distance and the saturation penalty
        # looks at the generated policies: normalised observations
        self._noise_states = torch.randn(
            64, spec.obs_dim, generator=torch.Generator().manual_seed(seed + 1)
        )  # (64, obs_dim)
        # once here, not at every step: G's layers are bf16 under bf16, and so are these
        states = self._noise_states.to(self.device, torch.bfloat16 if bf16 else torch.float32)
        self._generator_update = OptimiserStep(
            lambda commands, x: generator_loss(
                self.generator, self.critic, commands, x, penalty, states
            ),
            self.generator_opt,
            self.device,
        )
        b = cfg.buffer
        if b.sampling == "buckets":
            self.buffer: ReplayBuffer = BucketBuffer(
                b.capacity,
                spec.num_params,
                cfg.env.return_min,
                cfg.env.return_max,
                b.buckets,
                b.bucket_exponent,
                context_dim=k,
            )
        else:
            self.buffer = ReplayBuffer(
                b.capacity, spec.num_params, b.recency_exponent, context_dim=k
            )
        self.obs_stats = ObsStats(spec.obs_dim)
        self.rng = torch.Generator().manual_seed(seed)  # noise and buffer sampling
        self.param_noise = cfg.exploration.param_noise  # σ now (adaptive noise moves it)
        self.chosen_command = None  # a new attempt has chosen no evaluation command yet
        self._last_eval_params: torch.Tensor | None = None  # G(c_eval) of the last evaluation
        self._diag: dict[str, float] = {}  # diagnostics of the last evaluation
        self.best_return: float | None = None
        self.lowest_return: float | None = None  # lowest training return taken in
        self.rounds_owed = Fraction(0)  # carried over between updates, always < 1 after one
        # None: not measured yet (no round, no second intake). A measured NaN stays NaN, so
        # that a diverging run shows in the logged metrics.
        self._last: dict[str, float | None] = {
            "critic_loss": None,
            "generator_loss": None,
            "fresh": None,
            "return": float("nan"),
        }

    # ------------------------------------------------------------------ restarts
    def end_eval(self, mean: float, final: bool = False) -> dict:
        """As ``StreamingLearner.end_eval``; with ``exploration.restart_patience`` also a
        fresh start (``restarted`` in the outcome) when this attempt has stopped rising.
        The final evaluation (``final``, or any once ``run.total_env_steps`` are trained)
        is judged against the best of every attempt: with ``run.restore_drop`` a fall
        restores that one, so the run ends with the best networks it found. It never
        restarts: no training follows it."""
        final = final or self.env_steps >= self.cfg.run.total_env_steps
        if self._run_best is not None and final:
            if self.best_eval is None or self._run_best["return"] > self.best_eval["return"]:
                self.best_eval = self._run_best
        out = super().end_eval(mean, final)
        out["restarted"] = not final and self._stalled(mean)
        if out["restarted"]:
            self.restarts += 1
            if self.best_eval is not None and (
                self._run_best is None or self.best_eval["return"] > self._run_best["return"]
            ):
                self._run_best = self.best_eval
            self._fresh(self.cfg.run.seed + _RESTART_SEED_STRIDE * self.restarts)
            # this attempt has no best yet; the run's (and best.pt, the Trainer's) stays
            self.best_eval = None
            self._progress_mark = None
        return out

    def _stalled(self, mean: float) -> bool:
        """Whether neither this attempt's best evaluation nor its best training return has
        risen by ``restart_gain`` of the return range for ``restart_patience`` training
        steps (and the best evaluation is below the top of the range, where it cannot rise):
        an attempt whose exploration still finds better policies goes on. (Never at the
        final evaluation: no training follows it, so a fresh start would only leave the
        final checkpoint and the end-of-run sweep with untrained networks.)"""
        e, env = self.cfg.exploration, self.cfg.env
        if e.restart_patience is None or not math.isfinite(mean):
            return False
        gain = e.restart_gain * (env.return_max - env.return_min)
        trained = env.return_min if self.best_return is None else self.best_return
        mark = self._progress_mark
        if mark is None or mean >= mark[0] + gain or trained >= mark[2] + gain:
            self._progress_mark = (
                mean if mark is None else max(mean, mark[0]),
                self.env_steps,
                trained,
            )
            return False
        best = self.best_eval["return"] if self.best_eval is not None else mean
        waited = self.env_steps - self._progress_mark[1]
        return waited >= e.restart_patience and best < env.return_max - gain

    # ------------------------------------------------------------------ proposing policies
    def _batch(
        self, kind: Kind, commands: np.ndarray, noise: float, contexts: np.ndarray | None = None
    ) -> ParamBatch:
        with torch.no_grad():
            c = torch.as_tensor(commands, dtype=torch.float32, device=self.device)
            x = None if contexts is None else self.contexts.normalise(contexts).to(self.device)
            params = self.generator(c, x).cpu()  # (n, D)
            if noise > 0:
                clean = params
                params = params + noise * torch.randn(params.shape, generator=self.rng)
                if self.cfg.exploration.noise == "adaptive":
                    self._adapt_noise(clean, params)
        n = len(commands)
        ids = np.arange(self.next_id[kind], self.next_id[kind] + n, dtype=np.int64)
        self.next_id[kind] += n
        return self.param_batch(kind, ids, commands, params.numpy())._replace(contexts=contexts)

    def _adapt_noise(self, clean: torch.Tensor, noisy: torch.Tensor) -> None:
        """σ ← σ·√(δ/d), within a factor 2 per batch: d is the RMS difference between the
        tanh outputs (actions in units of half the action range) of the noisy policies and
        their noise-free ones on fixed standard-normal observations, δ the target."""
        states = self._noise_states
        a = torch.tanh(policy_preactivation(self.spec, clean, states))  # (n, 64, act_dim)
        b = torch.tanh(policy_preactivation(self.spec, noisy, states))
        d = float((a - b).pow(2).mean().sqrt())
        self._last["action_distance"] = d
        if d > 0:
            factor = math.sqrt(self.cfg.exploration.action_distance / d)
            self.param_noise *= min(2.0, max(0.5, factor))

    def propose(self, n: int) -> ParamBatch:
        """n exploration policies from the newest generator: G(best + drive) + σ·ε; for a
        task family each on its own context x from the training distribution, with the
        command best(x) + drive."""
        drive = self.cfg.exploration.drive
        if self.contexts is None:
            command = exploration_command(self.best_return, drive)
            return self._batch("train", np.full(n, command), self.param_noise)
        contexts = self.contexts.sample(n, self.rng)
        commands = self.best_for(contexts) + drive
        return self._batch("train", commands, self.param_noise, contexts)

    def best_for(self, contexts: np.ndarray) -> np.ndarray:
        """Estimated best training return of each task context (m, k) (``core.context``);
        0 while the buffer is empty, like the first command of a run."""
        best = self.contexts.best(contexts, *self.buffer.contexts_and_returns())
        return np.nan_to_num(best, nan=0.0)

    def eval_command(self, context: np.ndarray | None = None) -> float:
        """The command evaluation asks for: the best training return so far (for a task
        family: the estimated best of ``context``); with ``run.eval_command: sweep`` the
        command the last evaluation chose, once there is one."""
        if context is not None:
            return float(self.best_for(np.asarray(context, np.float64).reshape(1, -1))[0])
        if self.cfg.run.eval_command == "sweep" and self.chosen_command is not None:
            return self.chosen_command
        return 0.0 if self.best_return is None else self.best_return

    def probe_commands(self) -> np.ndarray:
        """The small sweep of ``run.eval_command: sweep``: ``eval_sweep_commands`` commands
        evenly spread over (return_min, best training return], and the command the last
        evaluation chose (after a restore, the best evaluation's) when it is not one of
        them, the highest first. The best policy restored is then a candidate again."""
        top = self.cfg.env.return_max if self.best_return is None else self.best_return
        low = min(self.cfg.env.return_min, top)
        k = self.cfg.run.eval_sweep_commands
        commands = np.linspace(low, top, k + 1)[1:]
        last = self.chosen_command
        if last is not None and not np.isclose(commands, last).any():
            commands = np.append(commands, last)
        return np.sort(commands)[::-1].copy()

    def first_eval_batch(self, episodes: int) -> ParamBatch:
        self._diagnose()
        if self.cfg.run.eval_command != "sweep":
            return self.propose_eval(None, episodes)
        batch = self._batch("eval", self.probe_commands(), 0.0)
        self._candidate["probe"] = batch
        return batch

    def eval_at(self, command: float, episodes: int) -> ParamBatch:
        """``episodes`` copies of the policy the evaluation's sweep wrote for ``command``
        (the one it chose), with the statistics that sweep ran with: the very policy the
        sweep measured, whatever the learner has learned since."""
        probe: ParamBatch = self._candidate["probe"]
        i = int(np.argmin(np.abs(probe.commands - command)))
        chosen = float(probe.commands[i])
        self.chosen_command = chosen
        self._candidate["command"] = chosen
        ids = np.arange(self.next_id["eval"], self.next_id["eval"] + episodes, dtype=np.int64)
        self.next_id["eval"] += episodes
        fresh = self.param_batch(
            "eval", ids, np.full(episodes, chosen), probe.policy_params[[i] * episodes]
        )
        return probe._replace(
            episode_ids=fresh.episode_ids,
            seeds=fresh.seeds,
            commands=fresh.commands,
            policy_params=fresh.policy_params,
        )

    def _diagnose(self) -> None:
        """What moves when a run falls (docs "Learning that holds"), measured at every
        periodic evaluation: the buffer's returns, the critic's error on the buffer's best
        policies, V(G(c)) against c at the evaluation command, how far G(c_eval) moved since
        the last evaluation, the exploration noise against the generated weights, and the
        share of G(c_eval)'s actions on the probing states where tanh is saturated."""
        n = len(self.buffer)
        if n == 0 or self.contexts is not None:
            return
        _, returns = self.buffer.contexts_and_returns()
        top = torch.topk(returns, min(32, n)).indices
        span = self.cfg.env.return_max - self.cfg.env.return_min
        with torch.no_grad():
            params = self.buffer.params_at(top.tolist())
            v_top = self.critic(params.to(self.device)).cpu().double()
            c = self.eval_command()
            g = self.generator(torch.tensor([c], dtype=torch.float32, device=self.device))
            v_g = float(self.critic(g))
            # the critic sees a policy through its tanh actions on the probing states
            z = policy_preactivation(self.spec, g, self.critic.probing_states)
            saturated = float((z.abs() > _SATURATED).double().mean())
            g = g.cpu()[0]
        d = {
            "buffer/return_mean": float(returns.mean()),
            "buffer/return_p90": float(torch.quantile(returns, 0.9)),
            "buffer/return_max": float(returns.max()),
            "buffer/top_share": float((returns >= returns.max() - 0.1 * span).double().mean()),
            "diag/critic_error_top": float((v_top - returns[top]).abs().mean()),
            "diag/critic_gap_eval": v_g - c,
            "diag/generated_norm": float(g.norm()),
            "diag/saturation": saturated,
            "diag/noise_to_weights": self.param_noise
            * math.sqrt(g.numel())
            / max(float(g.norm()), 1e-12),
        }
        if self._last_eval_params is not None:
            prev = self._last_eval_params
            d["diag/eval_drift"] = float((g - prev).norm()) / max(float(prev.norm()), 1e-12)
        self._last_eval_params = g
        if isinstance(self.buffer, BucketBuffer):
            counts = self.buffer.bucket_counts()
            d["buffer/top_bucket_size"] = float(counts[counts > 0][-1])
        self._diag = d

    def _nets_state(self) -> dict:
        return _cloned(
            {
                "generator": self.generator.state_dict(),
                "critic": self.critic.state_dict(),
                "generator_opt": self.generator_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(),
            }
        )

    def _load_nets_state(self, nets: dict) -> None:
        """A restore: the best evaluation's networks, and (eval_command sweep) its command."""
        self._load_nets(nets)
        if self.best_eval is not None and self.best_eval["command"] is not None:
            self.chosen_command = (
                self.best_eval["command"] if self.cfg.run.eval_command == "sweep" else None
            )

    def _load_nets(self, nets: dict) -> None:
        self.generator.load_state_dict(nets["generator"])
        self.critic.load_state_dict(nets["critic"])
        _load_optimiser(self.generator_opt, nets["generator_opt"])
        _load_optimiser(self.critic_opt, nets["critic_opt"])
        # The optimisers' state tensors are new objects: a captured step would update the old.
        self._critic_update.reset()
        self._generator_update.reset()

    def _eval_state(self) -> dict:
        return super()._eval_state() | {"run_best": self._run_best}

    def _load_eval_state(self, state: dict) -> None:
        super()._load_eval_state(state)
        self._run_best = state.get("run_best")

    def _best_command_fields(self, command: float | None) -> dict:
        if command is None or self.contexts is not None:  # a family's commands are per context
            return {}
        return {"best_return": command, "chosen_command": command}

    def propose_eval(
        self,
        commands: list[float] | None = None,
        episodes: int = 1,
        contexts: np.ndarray | list | None = None,
    ) -> ParamBatch:
        """Noise-free policies, ``episodes`` copies of G(c) for every command. For a task
        family, commands pair with ``contexts`` (m, k) one to one (default: the held-out
        tasks); with no commands each context gets its estimated best return."""
        if self.contexts is None:
            if contexts is not None:
                raise ValueError("this run is not on a task family; it takes no context")
            cmds = [self.eval_command()] if commands is None else list(commands)
            return self._batch("eval", np.repeat(np.asarray(cmds, dtype=np.float64), episodes), 0.0)
        x = self.contexts.heldout if contexts is None else np.asarray(contexts, np.float64)
        x = x.reshape(-1, self.contexts.dim)
        cmds = self.best_for(x) if commands is None else np.asarray(commands, np.float64)
        if len(cmds) != len(x):
            raise ValueError(f"{len(cmds)} commands for {len(x)} contexts; give one each")
        return self._batch("eval", np.repeat(cmds, episodes), 0.0, np.repeat(x, episodes, axis=0))

    # ------------------------------------------------------------------ learning
    def critic_step(self) -> float:
        """One critic step on a batch from the buffer; its loss."""
        return self._critic_step().item()

    def generator_step(self) -> float:
        """One generator step on commands from the buffer, V held fixed; its loss."""
        with self._critic_frozen():
            return self._generator_step().item()

    # The batches stay on the host here: OptimiserStep copies them to the device once.
    def _critic_step(self) -> torch.Tensor:
        params, returns, x = self.buffer.sample(self.cfg.critic.batch_size, self.rng)
        return self._critic_update(params, returns, self._cond(x))

    def _generator_step(self) -> torch.Tensor:
        _, commands, x = self.buffer.sample(self.cfg.generator.batch_size, self.rng)
        return self._generator_update(commands, self._cond(x))

    def _cond(self, x: torch.Tensor) -> torch.Tensor | None:
        """Normalised contexts from the buffer as G and V take them; None without any."""
        return x if self.generator.context_dim else None

    @contextmanager
    def _critic_frozen(self):
        """V held fixed (no gradients into it) for generator steps."""
        self.critic.requires_grad_(False)
        try:
            yield
        finally:
            self.critic.requires_grad_(True)

    def update(self, rounds: int) -> tuple[float | None, float | None]:
        """``rounds`` rounds of the configured critic steps, then generator steps. Returns
        the last losses (None for a kind of step that is configured to 0 steps)."""
        # Losses stay on the device until the end: reading one back waits for the GPU, so
        # only the last of each kind is read.
        closs: torch.Tensor | None = None
        gloss: torch.Tensor | None = None
        self.rounds += rounds
        for _ in range(rounds):
            for _ in range(self.cfg.critic.steps_per_episode):
                closs = self._critic_step()
            with self._critic_frozen():
                for _ in range(self.cfg.generator.steps_per_episode):
                    gloss = self._generator_step()
        return (
            None if closs is None else closs.item(),
            None if gloss is None else gloss.item(),
        )

    def take_in(self, batch: EpisodeBatch) -> int:
        """Add a worker's finished training episodes to the buffer and merge its observation
        statistics; they then owe ``updates_per_episode`` rounds each. Returns how many
        episodes were taken in (failed ones are counted and dropped)."""
        if batch.kind != "train":
            raise ValueError("only training episodes enter the learner")
        ok = np.flatnonzero(batch.ok())
        self.failed_episodes += len(batch.failures) - len(ok)
        # Statistics of every training step count, failed episodes excluded by the worker.
        self.obs_stats.merge(
            ObsStats(self.spec.obs_dim, batch.obs_count, batch.obs_mean, batch.obs_m2)
        )
        if len(ok) == 0:
            return 0
        params = torch.as_tensor(batch.policy_params[ok])
        if self.contexts is not None:
            if batch.contexts is None:
                raise ValueError("a task-family run got episodes without contexts")
            x = self.contexts.normalise(batch.contexts[ok])  # (m, cond_dim)
        else:
            x = torch.zeros(len(ok), 0)
        train_returns = [
            training_return(
                float(batch.returns[i]), int(batch.lengths[i]), self.cfg.env.survival_offset
            )
            for i in ok
        ]
        if len(self.buffer) > 0:
            with torch.no_grad():
                cond = self._cond(x)
                cond = None if cond is None else cond.to(self.device)
                pred = self.critic(params.to(self.device), cond).cpu()
            self._last["fresh"] = float((pred - torch.tensor(train_returns)).abs().mean())
        for p, r, xi in zip(params, train_returns, x):
            self.buffer.add(p, r, xi)
            self.best_return = r if self.best_return is None else max(self.best_return, r)
            self.lowest_return = r if self.lowest_return is None else min(self.lowest_return, r)
        self._last["return"] = float(np.mean(train_returns))
        self.env_steps += int(batch.lengths[ok].sum())
        self.episodes += len(ok)
        self.rounds_owed += self.updates_per_episode * len(ok)
        return len(ok)

    def learn(self) -> None:
        self.update_owed()

    def update_owed(self) -> None:
        """Run the whole rounds owed; a fraction of a round carries over."""
        rounds = math.floor(self.rounds_owed)
        if rounds > 0:
            self.rounds_owed -= rounds
            closs, gloss = self.update(rounds)
            self._last["critic_loss"], self._last["generator_loss"] = closs, gloss

    def stats(self, update_seconds: float = 0.0) -> LearnerStats:
        metrics = {
            "losses/critic": self._last["critic_loss"],
            "losses/generator": self._last["generator_loss"],
            "losses/critic_fresh_error": self._last["fresh"],
            "explore/action_distance": self._last.get("action_distance"),
        }
        return LearnerStats(
            env_steps=self.env_steps,
            episodes=self.episodes,
            failed_episodes=self.failed_episodes,
            best_return=float("nan") if self.best_return is None else self.best_return,
            last_return=self._last["return"],
            learner_seconds=self.learner_seconds,
            update_seconds=update_seconds,
            rounds=self.rounds,
            metrics={
                "buffer/size": len(self.buffer),
                "explore/param_noise": self.param_noise,
                "explore/restarts": self.restarts,
                "eval/restores": self.restores,
            }
            | ({} if self.lowest_return is None else {"train/lowest_return": self.lowest_return})
            | self._diag
            | {k: v for k, v in metrics.items() if v is not None},
        )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """The whole learning state, as tensors and plain Python values (safe to load with
        ``torch.load(weights_only=True)``). Always on the CPU, whatever ``learner.device``
        is: the state leaves the learner actor for a driver or a laptop that may have no GPU
        (a CUDA tensor cannot even be unpickled there)."""
        return {
            "generator": _on_cpu(self.generator.state_dict()),
            "critic": _on_cpu(self.critic.state_dict()),
            "generator_opt": _on_cpu(self.generator_opt.state_dict()),
            "critic_opt": _on_cpu(self.critic_opt.state_dict()),
            "buffer": self.buffer.state_dict(),
            "obs_stats": {k: torch.as_tensor(v) for k, v in self.obs_stats.state_dict().items()},
            "rng": self.rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "best_return": self.best_return,
            "chosen_command": self.chosen_command,
            "lowest_return": self.lowest_return,
            "param_noise": self.param_noise,
            **self._eval_state(),
            "counters": {
                "env_steps": self.env_steps,
                "episodes": self.episodes,
                "failed_episodes": self.failed_episodes,
                "next_train_id": self.next_id["train"],
                "next_eval_id": self.next_id["eval"],
                "learner_seconds": self.learner_seconds,
                "rounds": self.rounds,
                "rounds_owed": [self.rounds_owed.numerator, self.rounds_owed.denominator],
                "restarts": self.restarts,
                "progress_mark": None if self._progress_mark is None else list(self._progress_mark),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self._load_nets(state)
        self.buffer.load_state_dict(state["buffer"])
        self.obs_stats = _obs_stats_from(state["obs_stats"])
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.best_return = state["best_return"]
        self.chosen_command = state.get("chosen_command")
        self.lowest_return = state.get("lowest_return")
        self.param_noise = float(state.get("param_noise", self.cfg.exploration.param_noise))
        self._load_eval_state(state)
        c = state["counters"]
        self.env_steps, self.episodes = int(c["env_steps"]), int(c["episodes"])
        self.failed_episodes = int(c["failed_episodes"])
        self.next_id = {"train": int(c["next_train_id"]), "eval": int(c["next_eval_id"])}
        self.learner_seconds = float(c["learner_seconds"])
        # Checkpoints from before the schedule existed ran 1 round per episode, none owed.
        self.rounds = int(c.get("rounds", self.episodes))
        self.restarts = int(c.get("restarts", 0))
        mark = c.get("progress_mark")
        self._progress_mark = (
            None
            if mark is None
            else (float(mark[0]), int(mark[1]), float(mark[2] if len(mark) > 2 else mark[0]))
        )
        self.rounds_owed = Fraction(*c.get("rounds_owed", (0, 1)))
