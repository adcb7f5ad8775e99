"""The one GoGePo runtime: a driver that keeps every rollout worker busy and streams each
finished episode into the learner actor as it arrives.

The CLI, the RLlib ``Algorithm`` and the Ray Job entrypoint all drive this class:

    trainer = Trainer(cfg)
    trainer.run_until(cfg.run.total_env_steps)   # or in chunks, as RLlib's train() does
    summary = trainer.finish()

The driver streams: a worker's training result joins the results waiting for the learner;
whenever the learner is free, every waiting result goes to it in one ``learner.step``
(buffer, then the rounds those episodes owe, ``learner.updates_per_episode`` each, then
the next policies of the workers that sent them from the updated generator). The driver
never waits on that call: it passes the policies' refs straight on to ``worker.run``, so
Ray orders learner work and rollouts by their data dependencies. A worker thus waits for
the learner call in progress when its result arrived and the rounds of its own group, and
with one worker and 1 round per episode the sequence is the paper's.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray
import torch

from gogepo_ray import checkpoint as ckpt
from gogepo_ray.algorithms import takes_commands
from gogepo_ray.analysis.evaluation import (
    ContextSweep,
    SweepResult,
    choose_command,
    command_sweep,
    failure_rows,
    heldout_metrics,
    plot_learning_curve,
)
from gogepo_ray.config import Config
from gogepo_ray.core.normalizer import EPS
from gogepo_ray.distributed.actors import (
    check_learner_gpu,
    ensure_ray,
    learner_actor,
    rollout_actor,
    wait_for_learner,
)
from gogepo_ray.envs import policy_spec
from gogepo_ray.errors import TrainingError
from gogepo_ray.types import EpisodeBatch, LearnerStats, ParamBatch


class Callback(Protocol):
    """Optional subscribers to a run's events (progress bar, MLflow, RLlib results)."""

    def on_start(self, trainer: Trainer) -> None: ...
    def on_train(self, trainer: Trainer, stats: LearnerStats) -> None: ...
    def on_eval(self, trainer: Trainer, env_steps: int, mean: float, std: float) -> None: ...
    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...
    def on_end(self, trainer: Trainer, summary: dict) -> None: ...


@dataclass
class Progress:
    """Driver-side counters; the learner keeps its own, and checkpoints both."""

    env_steps: int = 0
    episodes: int = 0
    eval_env_steps: int = 0
    rollout_seconds: float = 0.0
    wall_seconds: float = 0.0  # of earlier sessions of a resumed run
    next_eval_at: int = 0
    next_checkpoint_at: int = 0
    worker_restarts: int = 0
    failed_episodes: int = 0
    eval_history: list[list[float]] = field(default_factory=list)  # [env_steps, mean, std]
    best_eval_return: float | None = None  # the best evaluation so far (checkpoints/best.pt)
    best_eval_env_steps: int | None = None
    restores: int = 0  # times run.restore_drop put the best networks back
    exploration_restarts: int = 0  # times exploration.restart_patience started afresh
    learner_restarts: int = 0  # learner actors rebuilt from checkpoints/latest.pt
    lost_episodes: int = 0  # taken in after that checkpoint by a learner that then died
    lost_env_steps: int = 0


# Progress fields that a learner restart keeps: they count what happened, not what the
# checkpoint's learner holds. Every other field goes back to the checkpoint's value.
_CUMULATIVE = (
    "wall_seconds",
    "rollout_seconds",
    "eval_env_steps",
    "worker_restarts",
    "failed_episodes",
    "best_eval_return",
    "best_eval_env_steps",
    "restores",
    "exploration_restarts",
    "learner_restarts",
    "lost_episodes",
    "lost_env_steps",
)
LEARNER_PING_S = 60.0  # how long a busy learner may take to answer "are you alive"

_RAY_LOST = (
    ray.exceptions.RayActorError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.ObjectLostError,
)


class _LearnerLost(Exception):
    """The learner actor died; the public method it broke rebuilds it and runs again."""


@dataclass
class _Task:
    """A batch of policies given to a rollout worker actor."""

    actor: Any
    worker: int
    batch: ParamBatch | ray.ObjectRef
    issued_at: int = -1  # ≥ 0 marks an evaluation, labelled with this step
    probe: bool = False  # the small sweep that picks an evaluation's command


def _recovers(method):
    """A public Trainer method that survives the learner's death: the learner is rebuilt
    from the latest checkpoint (``Trainer._recover``) and the method runs again. Calls from
    inside another such method leave the recovery to the outermost one."""

    @functools.wraps(method)
    def wrapper(self: Trainer, *args, **kwargs):
        if self._in_call:
            return method(self, *args, **kwargs)
        self._in_call = True
        try:
            while True:
                try:
                    return method(self, *args, **kwargs)
                except _LearnerLost as exc:
                    self._recover(exc)
        finally:
            self._in_call = False

    return wrapper


def default_run_dir(cfg: Config) -> Path:
    name = (
        cfg.run.name
        or f"{cfg.env.id.replace(':', '.').replace('/', '.')}-{time.strftime('%Y%m%d-%H%M%S')}-s{cfg.run.seed}"
    )
    return Path(cfg.run.output_dir) / name


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path | None = None,
        callbacks: list[Any] | None = None,
        resume: dict | None = None,
    ) -> None:
        self.cfg = cfg
        self.spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self.callbacks = list(callbacks or [])
        self.progress = Progress(
            next_eval_at=cfg.run.eval_every, next_checkpoint_at=cfg.run.checkpoint_every
        )
        learner_state = None
        # Batches to give the next free workers, before any new policies: those a checkpoint
        # had out on workers (a resumed run issues exactly these again), and those of a
        # worker that died. (batch, issued_at, probe)
        self._reissue: list[tuple[ParamBatch | ray.ObjectRef, int, bool]] = []
        if resume is not None:
            learner_state = resume["learner"]
            self.progress = Progress(**resume["progress"])
            self._reissue = _inflight_from(resume)
        self._in_call = False
        self._target = 0
        self.latest_stats: LearnerStats | None = None
        self.last_eval: float = float("nan")
        # Task families: the last evaluation per held-out context (``eval/heldout/...``)
        self.last_eval_contexts: dict[str, float] = {}
        check_learner_gpu(cfg, local=ensure_ray(cfg))
        self.learner = learner_actor(cfg, self.spec, learner_state)
        wait_for_learner(self.learner, cfg)
        # A worker whose actor died is None until its replacement is placed.
        self.workers: list[Any] = [rollout_actor(cfg, self.spec, i) for i in range(cfg.run.workers)]
        self._idle: list[int] = list(range(cfg.run.workers))  # live workers with no work
        # Replacement workers not placed yet: pid ref -> (worker, actor, deadline); the
        # deadline is None once run.worker_placement_timeout_s has passed and been reported.
        self._pending: dict[ray.ObjectRef, tuple[int, Any, float | None]] = {}
        self._inflight: dict[ray.ObjectRef, _Task] = {}
        # Results of work the run gave up on (a dead learner's): read and dropped, so that
        # Ray does not report them as unhandled errors.
        self._orphans: list[ray.ObjectRef] = []
        # Training episodes taken in since the last checkpoint, (ids, commands, lengths,
        # returns): those a learner restart loses.
        self._since_checkpoint: list[tuple[np.ndarray, ...]] = []
        self._stats_refs: list[ray.ObjectRef] = []  # learner steps in progress, oldest first
        self._waiting: list[tuple[int, EpisodeBatch]] = []  # results for the next learner step
        # Workers the learner had no episodes for (ARS, while its iteration's last results
        # are out): they get work from the next learner step instead of asking again at once.
        self._parked: list[int] = []
        self._consecutive_failures = 0
        self._failure_log = open(self.run_dir / "failures.jsonl", "a")
        self._started = time.perf_counter()
        self._finished = False
        self._final = False  # the final evaluation is under way (_final_evaluation)
        for cb in self.callbacks:
            cb.on_start(self)
        if resume is None:  # step 0: a learner restart and --resume always have a checkpoint
            self.save_checkpoint()

    # ------------------------------------------------------------------ workers
    def _live(self) -> list[int]:
        return [i for i, actor in enumerate(self.workers) if actor is not None]

    @property
    def alive_workers(self) -> int:
        """Rollout workers whose actor runs now (fewer than run.workers after a node loss
        the cluster had no room to replace)."""
        return len(self._live())

    def _worker_lost(self, task: _Task, exc: BaseException) -> None:
        """The worker actor of ``task`` died: it leaves the pool and a replacement is
        started, which joins once the cluster places it. The caller re-issues the batch."""
        if self.workers[task.worker] is not task.actor:  # already replaced or given up
            return
        self.progress.worker_restarts += 1
        if self.progress.worker_restarts > self.cfg.run.max_worker_restarts:
            raise TrainingError(
                f"rollout workers died {self.progress.worker_restarts} times "
                f"(run.max_worker_restarts={self.cfg.run.max_worker_restarts}); last: {type(exc).__name__}"
            ) from None
        print(
            f"warning: rollout worker {task.worker} died ({type(exc).__name__}); replacing it "
            "and re-issuing its episodes",
            file=sys.stderr,
        )
        self.workers[task.worker] = None
        self._start_replacement(task.worker)

    def _start_replacement(self, worker: int) -> None:
        actor = rollout_actor(self.cfg, self.spec, worker)
        deadline = time.monotonic() + self.cfg.run.worker_placement_timeout_s
        self._pending[actor.pid.remote()] = (worker, actor, deadline)

    def _wait(self, refs: list[ray.ObjectRef]) -> ray.ObjectRef | None:
        """The first of ``refs`` to finish. None when a replacement worker was placed (it
        joins ``_idle``) or ran past its placement deadline first: the caller looks again.
        Nothing here waits longer than the nearest placement deadline."""
        self._reap_orphans()
        if not self._live() and not self._pending:
            self._no_worker_left()
        deadlines = [d for _, _, d in self._pending.values() if d is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        ready, _ = ray.wait(refs + list(self._pending), num_returns=1, timeout=timeout)
        if not ready:
            self._expire_placements()
            return None
        if ready[0] in self._pending:
            self._join(ready[0])
            return None
        return ready[0]

    def _join(self, ref: ray.ObjectRef) -> None:
        worker, actor, deadline = self._pending.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as exc:  # the replacement died before it ran anything
            self.workers[worker] = actor
            self._worker_lost(_Task(actor, worker, None), exc)
            return
        self.workers[worker] = actor
        self._idle.append(worker)
        if deadline is None:  # it was reported missing
            print(
                f"note: rollout worker {worker}'s replacement is placed and joins the pool "
                f"({self.alive_workers} of {self.cfg.run.workers} workers alive)",
                file=sys.stderr,
            )

    def _expire_placements(self) -> None:
        now = time.monotonic()
        late = [r for r, (_, _, d) in self._pending.items() if d is not None and d <= now]
        if late and not self._live():
            self._no_worker_left()
        for ref in late:
            worker, actor, _ = self._pending[ref]
            self._pending[ref] = (worker, actor, None)  # reported once; it may still join
            print(
                f"warning: rollout worker {worker}'s replacement found no place on the cluster "
                f"in {self.cfg.run.worker_placement_timeout_s:g} s (run.worker_placement_timeout_s); "
                f"the run goes on with {self.alive_workers} of {self.cfg.run.workers} workers, and "
                "the replacement joins if the cluster makes room",
                file=sys.stderr,
            )

    def _no_worker_left(self) -> None:
        path = self.save_checkpoint()
        raise TrainingError(
            f"no rollout worker is left, and none could be placed on the cluster in "
            f"{self.cfg.run.worker_placement_timeout_s:g} s (run.worker_placement_timeout_s); "
            f"the run is saved in {path}. Continue it once the cluster has room: "
            f"gogepo train --resume {self.run_dir}"
        )

    def _reap_orphans(self, timeout: float = 0) -> None:
        if not self._orphans:
            return
        ready, self._orphans = ray.wait(
            self._orphans, num_returns=len(self._orphans), timeout=timeout
        )
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                pass

    # ------------------------------------------------------------------ the learner
    def _lget(self, ref: Any) -> Any:
        """``ray.get`` of a learner call's result; the learner's death raises _LearnerLost."""
        try:
            return ray.get(ref)
        except _RAY_LOST as exc:
            raise _LearnerLost(type(exc).__name__) from exc

    def _learner_died(self, exc: BaseException) -> bool:
        """Whether the error of a rollout task comes from the learner's death (its policies,
        the task's input, died with it) rather than the worker's."""
        learner_id = self.learner._actor_id.hex()
        if getattr(exc, "actor_id", None) == learner_id:
            return True
        try:
            ray.get(self.learner.pid.remote(), timeout=LEARNER_PING_S)
        except _RAY_LOST:
            return True
        except ray.exceptions.GetTimeoutError:  # busy, so alive
            pass
        return False

    def _recover(self, lost: _LearnerLost) -> None:
        """Rebuild the dead learner from checkpoints/latest.pt, up to run.max_learner_restarts
        times, and take the run back to that checkpoint: the episodes taken in since are
        lost (counted, and written to failures.jsonl), the policies it had out on workers are
        issued again, and the workers keep their actors."""
        latest = self.run_dir / "checkpoints" / "latest.pt"
        limit = self.cfg.run.max_learner_restarts
        while True:
            self.progress.learner_restarts += 1
            cause = f"the learner actor died ({lost})"
            if self.progress.learner_restarts > limit:
                raise TrainingError(
                    f"{cause}, and run.max_learner_restarts={limit} restarts are used up; "
                    f"{self.run_dir} keeps its latest checkpoint. Continue the run with: "
                    f"gogepo train --resume {self.run_dir}"
                ) from None
            payload = ckpt.load(latest)
            steps = int(payload["progress"]["env_steps"])
            print(
                f"warning: {cause}; restarting it from {latest} ({steps} training steps), "
                f"restart {self.progress.learner_restarts} of {limit} (run.max_learner_restarts)",
                file=sys.stderr,
            )
            ray.kill(self.learner)
            self.learner = learner_actor(self.cfg, self.spec, payload["learner"])
            timeout = self.cfg.run.worker_placement_timeout_s
            ready, _ = ray.wait([self.learner.pid.remote()], timeout=timeout)
            if not ready:
                ray.kill(self.learner)
                raise TrainingError(
                    f"{cause}, and its restart found no place on the cluster in {timeout:g} s "
                    f"(run.worker_placement_timeout_s); {self.run_dir} keeps its latest "
                    f"checkpoint. Continue the run with: gogepo train --resume {self.run_dir}"
                ) from None
            try:
                ray.get(ready[0])
                break
            except _RAY_LOST as exc:  # the new learner died as it started
                lost = _LearnerLost(type(exc).__name__)
        self._rollback(payload)

    def _rollback(self, payload: dict) -> None:
        steps = int(payload["progress"]["env_steps"])
        n = self.progress.learner_restarts
        reason = (
            f"lost: taken in after the checkpoint at {steps} training steps by a learner "
            f"that then died (learner restart {n})"
        )
        lost_steps = 0
        for ids, commands, lengths, returns in self._since_checkpoint:
            for i, c, length, r in zip(ids, commands, lengths, returns):
                row = {"kind": "lost", "episode_id": int(i), "length": int(length)}
                row |= {"command": float(c) if np.isfinite(c) else None, "return": float(r)}
                self._failure_log.write(json.dumps(row | {"reason": reason}) + "\n")
            lost_steps += int(lengths.sum())
        self._failure_log.flush()
        lost = sum(len(ids) for ids, *_ in self._since_checkpoint)
        kept = {k: getattr(self.progress, k) for k in _CUMULATIVE}
        self.progress = Progress(**(payload["progress"] | kept))
        self.progress.lost_episodes += lost
        self.progress.lost_env_steps += lost_steps
        self.last_eval = (
            self.progress.eval_history[-1][1] if self.progress.eval_history else float("nan")
        )
        self._orphans += list(self._inflight) + self._stats_refs
        self._inflight, self._stats_refs, self._waiting, self._parked = {}, [], [], []
        self._since_checkpoint = []
        self._reissue = _inflight_from(payload)
        self._idle = self._live()
        self._consecutive_failures = 0
        self.latest_stats = self._lget(self.learner.stats.remote())
        print(
            f"note: the run goes on from {steps} training steps; {lost} episodes "
            f"({lost_steps} steps) taken in since are lost ({self.run_dir / 'failures.jsonl'})",
            file=sys.stderr,
        )

    # ------------------------------------------------------------------ the loop
    def _submit(
        self, worker: int, batch: ParamBatch | ray.ObjectRef, issued_at: int, probe: bool = False
    ) -> None:
        actor = self.workers[worker]
        if actor is None:  # died since it was given this work: the next free worker runs it
            self._reissue.append((batch, issued_at, probe))
            return
        ref = actor.run.remote(batch)
        self._inflight[ref] = _Task(actor, worker, batch, issued_at, probe)

    def _other_work(self, worker: int) -> bool:
        """Give a free worker the next batch to issue again (a checkpoint's or a dead
        worker's), or an evaluation if one is due. False when it needs new training
        policies instead."""
        if self._reissue:
            self._submit(worker, *self._reissue.pop(0))
            return True
        if self._eval_due():
            self._submit_eval(worker)
            return True
        return False

    def _eval_due(self) -> bool:
        return self.progress.env_steps >= self.progress.next_eval_at and not self._eval_inflight()

    def _submit_eval(self, worker: int) -> None:
        at = self.progress.next_eval_at
        self.progress.next_eval_at += self.cfg.run.eval_every * max(
            1, (self.progress.env_steps - at) // self.cfg.run.eval_every + 1
        )
        ref = self.learner.begin_eval.remote(self.cfg.run.eval_episodes)
        self._submit(worker, ref, at, probe=self.cfg.run.eval_command == "sweep")

    def _next_work(self, worker: int) -> None:
        """Work for a worker that brought no training result (start, after an evaluation)."""
        if not self._other_work(worker):
            self._submit(worker, self.learner.propose.remote(self.cfg.run.envs_per_worker), -1)

    def _dispatch_waiting(self, give_work: bool = True) -> None:
        """Send every training result waiting for the learner to it in one step; the workers
        that sent them get their next work: policies a checkpoint had out first, then an
        evaluation if one is due, proposed *after* the step, so that it evaluates the
        generator that has learned from every episode counted so far; the others get
        training policies written by the step."""
        group, self._waiting = self._waiting, []
        parked, self._parked = (self._parked, []) if give_work else ([], self._parked)
        resumed, evaluate, need = [], None, []
        for worker in [w for w, _ in group] + parked if give_work else []:
            if len(resumed) < len(self._reissue):
                resumed.append(worker)
            elif evaluate is None and self._eval_due():
                evaluate = worker
            else:
                need.append(worker)
        n = self.cfg.run.envs_per_worker
        refs = self.learner.step.options(num_returns=len(need) + 1).remote(
            [result for _, result in group], [n] * len(need)
        )
        *proposals, stats = refs if need else [refs]
        for worker, ref in zip(need, proposals):
            self._submit(worker, ref, -1)
        for worker in resumed:
            self._submit(worker, *self._reissue.pop(0))
        if evaluate is not None:
            self._submit_eval(evaluate)
        self._stats_refs.append(stats)

    def _eval_inflight(self) -> bool:
        return any(t.issued_at >= 0 for t in self._inflight.values()) or any(
            issued >= 0 for _, issued, _ in self._reissue
        )

    def _handle(
        self, result: EpisodeBatch, issued_at: int, worker: int, probe: bool = False
    ) -> bool:
        """Account for a finished batch: evaluations are recorded, training results join the
        results waiting for the learner's next step. An evaluation's small sweep (``probe``)
        sends its chosen command's episodes to the same worker; True when it did."""
        self.progress.rollout_seconds += result.rollout_seconds
        ok = result.ok()
        failed = np.flatnonzero(~ok).tolist()
        self._log_failures(result, failed)
        if result.kind == "eval":
            self.progress.eval_env_steps += int(result.lengths.sum())
            if probe:
                ref = self.learner.eval_at.remote(
                    choose_command(result), self.cfg.run.eval_episodes
                )
                self._submit(worker, ref, issued_at)
                return True
            self._record_eval(result, issued_at)
            return False
        if len(result.episode_ids) == 0:  # the learner had nothing to hand out
            self._parked.append(worker)
            return False
        self.progress.env_steps += int(result.lengths[ok].sum())
        self.progress.episodes += int(ok.sum())
        self.progress.failed_episodes += len(failed)
        self._consecutive_failures = 0 if ok.any() else self._consecutive_failures + len(failed)
        if self._consecutive_failures >= self.cfg.run.max_consecutive_failures:
            reasons = sorted({result.failures[i] for i in failed})
            raise TrainingError(
                f"the last {self._consecutive_failures} training episodes all failed "
                f"(run.max_consecutive_failures={self.cfg.run.max_consecutive_failures}); reasons: {'; '.join(reasons)}. "
                f"Details in {self.run_dir / 'failures.jsonl'}"
            )
        self._waiting.append((worker, result))
        self._since_checkpoint.append(
            (result.episode_ids[ok], result.commands[ok], result.lengths[ok], result.returns[ok])
        )
        return False

    def _record_eval(self, result: EpisodeBatch, issued_at: int) -> None:
        """An evaluation's result: history, callbacks, and the learner's best (a new best is
        written to checkpoints/best.pt; a fall past run.restore_drop restores it)."""
        returns = result.returns[result.ok()]
        mean = float(returns.mean()) if len(returns) else float("nan")
        std = float(returns.std()) if len(returns) else float("nan")
        self.progress.eval_history.append([issued_at, mean, std])
        self.last_eval = mean
        if result.contexts is not None:
            self.last_eval_contexts = heldout_metrics(result)
        outcome = self._lget(self.learner.end_eval.remote(mean, self._final))
        best = self.progress.best_eval_return
        # after a learner restart the restored learner's best can be below the run's best
        if outcome["best"] and (best is None or not mean <= best):
            self.progress.best_eval_return, self.progress.best_eval_env_steps = mean, issued_at
            self.save_best()
        if outcome["restored"]:
            self.progress.restores += 1
            print(
                f"note: evaluation {mean:.1f} at {issued_at} steps fell past run.restore_drop "
                f"below the best ({self.progress.best_eval_return:.1f} at "
                f"{self.progress.best_eval_env_steps}); the best generator and critic are restored",
                file=sys.stderr,
            )
        if outcome.get("restarted"):
            self.progress.exploration_restarts += 1
            print(
                f"note: the best evaluation has not risen by exploration.restart_gain for "
                f"exploration.restart_patience steps ({issued_at} steps); the learner starts afresh "
                f"(best.pt keeps {self.progress.best_eval_return:.1f})",
                file=sys.stderr,
            )
        for cb in self.callbacks:
            cb.on_eval(self, issued_at, mean, std)

    def _log_failures(self, result: EpisodeBatch, failed: list[int], **extra: str) -> None:
        for row in failure_rows(result, **extra):
            self._failure_log.write(json.dumps(row) + "\n")
        if failed:
            self._failure_log.flush()
            if self.progress.failed_episodes == 0 or self._consecutive_failures == 0:
                print(
                    f"warning: {len(failed)} {result.kind} episode(s) dropped: {result.failures[failed[0]]} "
                    f"(all failures: {self.run_dir / 'failures.jsonl'})",
                    file=sys.stderr,
                )

    def _collect(self, ref: ray.ObjectRef) -> tuple[int, EpisodeBatch | None, int, bool]:
        """The result of a finished rollout task. When its worker died, the same batch (same
        episode ids and seeds) goes back to be issued to the next free worker, so no episode
        is lost or counted twice. The learner's death raises _LearnerLost."""
        task = self._inflight.pop(ref)
        try:
            result = ray.get(ref)
        except _RAY_LOST as exc:
            if self._learner_died(exc):
                raise _LearnerLost(type(exc).__name__) from exc
            if isinstance(exc, ray.exceptions.ObjectLostError):
                # its policies were lost with a node while the learner lives: new ones instead
                self._idle.append(task.worker)
                return task.worker, None, task.issued_at, task.probe
            self._worker_lost(task, exc)
            self._reissue.insert(0, (task.batch, task.issued_at, task.probe))
            return task.worker, None, task.issued_at, task.probe
        issued_at = task.issued_at
        if result.kind == "eval":  # labelled with what the generator had learned from
            issued = self._value(task.batch)
            if issued.trained_env_steps >= 0:
                issued_at = int(issued.trained_env_steps)
        return task.worker, result, issued_at, task.probe

    def _value(self, batch: ParamBatch | ray.ObjectRef) -> ParamBatch:
        return self._lget(batch) if isinstance(batch, ray.ObjectRef) else batch

    def _drain_stats(self, block: bool = False) -> None:
        while self._stats_refs:
            ready, _ = ray.wait(self._stats_refs[:1], timeout=None if block else 0)
            if not ready:
                return
            self._stats_refs.pop(0)
            self.latest_stats = self._lget(ready[0])
            for cb in self.callbacks:
                cb.on_train(self, self.latest_stats)

    @_recovers
    def run_until(self, target_env_steps: int) -> None:
        """Stream episodes until ``target_env_steps`` training steps have been taken.
        Work in flight carries over to the next call."""
        self._target = target_env_steps
        self._run_until(target_env_steps)

    def _run_until(self, target_env_steps: int) -> None:
        while self.progress.env_steps < target_env_steps:
            while self._idle:
                self._next_work(self._idle.pop(0))
            ready = self._wait(list(self._inflight) + self._stats_refs[:1])
            if ready is None:
                continue
            if self._stats_refs and ready == self._stats_refs[0]:
                self._drain_stats()
            else:
                worker, result, issued_at, probe = self._collect(ready)
                if result is None:
                    continue
                resubmitted = self._handle(result, issued_at, worker, probe)
                if result.kind == "eval" and not resubmitted:
                    self._next_work(worker)
            if self._waiting and not self._stats_refs:  # the learner is free
                self._dispatch_waiting()
            if self.progress.env_steps >= self.progress.next_checkpoint_at:
                self.progress.next_checkpoint_at += self.cfg.run.checkpoint_every
                self.save_checkpoint()
        if self._waiting:  # every worker leaves with work in flight
            self._dispatch_waiting()
        self._drain_stats()

    # ------------------------------------------------------------------ end of a run
    def _drain_inflight(self) -> None:
        """Finish every episode handed out (those of dead workers on the live ones), so
        counters and buffer agree. Waits only on live workers, and on a replacement only
        until its placement deadline."""
        while True:
            busy = {t.worker for t in self._inflight.values()}
            for worker in self._live():
                if self._reissue and worker not in busy:
                    self._submit(worker, *self._reissue.pop(0))
                    busy.add(worker)
            if not self._inflight and not self._reissue:
                break
            ready = self._wait(list(self._inflight))
            if ready is None:
                continue
            worker, result, issued_at, probe = self._collect(ready)
            if result is not None:
                self._handle(result, issued_at, worker, probe)
        if self._waiting:
            self._dispatch_waiting(give_work=False)
        self._drain_stats(block=True)
        self._parked, self._idle = [], self._live()

    def run_batch(self, batch: ParamBatch) -> EpisodeBatch:
        """Run one (evaluation) ParamBatch spread over the live workers; results in order.
        A part whose worker dies runs again on another."""
        n = len(batch.episode_ids)
        parts = np.array_split(np.arange(n), max(1, min(self.alive_workers, n)))
        subs = [
            batch._replace(
                episode_ids=batch.episode_ids[idx],
                seeds=batch.seeds[idx],
                commands=batch.commands[idx],
                policy_params=batch.policy_params[idx],
                contexts=None if batch.contexts is None else batch.contexts[idx],
            )
            for idx in parts
        ]
        results: list[EpisodeBatch | None] = [None] * len(subs)
        todo, running, turn = list(range(len(subs))), {}, 0
        while todo or running:
            live = self._live()
            for i in todo if live else []:
                worker = live[turn % len(live)]
                turn += 1
                task = _Task(self.workers[worker], worker, subs[i])
                running[task.actor.run.remote(subs[i])] = (i, task)
            todo = todo if not live else []
            ready = self._wait(list(running))
            if ready is None:
                continue
            i, task = running.pop(ready)
            try:
                results[i] = ray.get(ready)
            except _RAY_LOST as exc:
                self._worker_lost(task, exc)
                todo.append(i)
        return EpisodeBatch(
            kind=batch.kind,
            episode_ids=np.concatenate([r.episode_ids for r in results]),
            commands=np.concatenate([r.commands for r in results]),
            policy_params=np.concatenate([r.policy_params for r in results]),
            returns=np.concatenate([r.returns for r in results]),
            lengths=np.concatenate([r.lengths for r in results]),
            failures=tuple(f for r in results for f in r.failures),
            obs_count=0,
            obs_mean=results[0].obs_mean,
            obs_m2=results[0].obs_m2,
            rollout_seconds=sum(r.rollout_seconds for r in results),
            contexts=None
            if batch.contexts is None
            else np.concatenate([r.contexts for r in results]),
        )

    @_recovers
    def evaluate(
        self,
        commands: list[float] | None = None,
        episodes: int | None = None,
        contexts: np.ndarray | None = None,
    ) -> EpisodeBatch:
        """Noise-free policies for ``commands`` (default: the best return so far; for a task
        family each of ``contexts``, default the held-out ones, at its best estimate)."""
        eps = episodes or self.cfg.run.eval_episodes
        return self.run_batch(self._lget(self.learner.propose_eval.remote(commands, eps, contexts)))

    @_recovers
    def evaluate_now(self) -> EpisodeBatch:
        """A periodic evaluation run at once on all workers, as the loop runs one (for
        ``run.eval_command: sweep`` its small sweep first, its episodes counted as
        evaluation steps); recorded at the current step. Returns the evaluation's episodes."""
        eps = self.cfg.run.eval_episodes
        batch = self.run_batch(self._lget(self.learner.begin_eval.remote(eps)))
        if self.cfg.run.eval_command == "sweep":
            self._account(batch, "eval sweep")
            command = choose_command(batch)
            batch = self.run_batch(self._lget(self.learner.eval_at.remote(command, eps)))
        self._handle(batch, self.progress.env_steps, -1)
        return batch

    def _account(self, result: EpisodeBatch, source: str) -> None:
        """Count an evaluation-kind batch run outside the loop (sweeps) and log its failures."""
        self.progress.eval_env_steps += int(result.lengths.sum())
        self.progress.rollout_seconds += result.rollout_seconds
        failed = np.flatnonzero(~result.ok()).tolist()
        self._log_failures(result, failed, source=source)

    @_recovers
    def sweep(self, episodes: int = 1) -> SweepResult | ContextSweep:
        """The command sweep (``analysis.evaluation.command_sweep``) on the workers; its
        episodes count as evaluation steps and its failures are logged."""

        def run(batch: ParamBatch) -> EpisodeBatch:
            result = self.run_batch(batch)
            self._account(result, "sweep")  # failed episodes are left out of the means
            return result

        return command_sweep(
            self.cfg,
            lambda c, e, x: self._lget(self.learner.propose_eval.remote(c, e, x)),
            run,
            episodes,
        )

    @_recovers
    def finish(self) -> dict:
        """Drain, final evaluation, final checkpoint, command sweep, summary.json."""
        if self._finished:
            return json.loads((self.run_dir / "summary.json").read_text())
        if self.progress.env_steps < self._target:  # a learner restart took the run back
            self._run_until(self._target)
        self._drain_inflight()
        final = self._final_evaluation()
        final_mean = self.last_eval
        self.latest_stats = self._lget(self.learner.stats.remote())
        self.save_checkpoint(final=True)
        sweep = None
        if self.cfg.run.sweep_at_end and takes_commands(self.cfg):
            sweep = self.sweep()
            sweep.write(self.run_dir / "sweep", self.cfg.env.id)
        summary = self.summary(final_eval=final_mean)
        summary["command_fidelity"] = None
        if sweep is not None and self.latest_stats is not None:
            low = self.latest_stats.metrics.get("train/lowest_return", float("nan"))
            fidelity = sweep.fidelity(low, self.latest_stats.best_return)
            summary["command_fidelity"] = fidelity if np.isfinite(fidelity) else None
        plot_learning_curve(
            summary["eval_history"], self.run_dir / "learning_curve.png", self.cfg.env.id
        )
        if self.cfg.run.render_at_end:
            from gogepo_ray.render import render_at_end

            render_at_end(self)  # <run_dir>/policy.mp4, or a warning
        if self.cfg.context is not None:  # the final evaluation, per held-out context
            summary["heldout"] = dict(self.last_eval_contexts)
        # failed episodes are left out of the final evaluation's and the sweep's means
        summary["final_eval_failed_episodes"] = int((~final.ok()).sum())
        summary["sweep_failed_episodes"] = sweep.failed_episodes if sweep else None
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._finished = True
        for cb in self.callbacks:
            cb.on_end(self, summary)
        return summary

    def _final_evaluation(self) -> EpisodeBatch:
        """The run's last evaluation. With ``run.restore_drop`` the run ends with the better
        of its latest networks and its best evaluation's: a fall past the drop restores the
        best at once; a smaller fall evaluates the best networks on fresh episodes too, and
        they stay only if they score higher there (the best evaluation is the highest of
        many noisy ones, so its own score overstates it). The final evaluation is the score
        of the networks the run ends with, on episodes no choice was made on."""
        self._final = True  # the learner judges these evaluations as the run's last
        restores = self.progress.restores
        latest = self.evaluate_now()
        if self.progress.restores > restores:  # past the drop: the best networks, rescored
            return self.evaluate_now()
        best, latest_mean = self.progress.best_eval_return, self.last_eval
        best_at = self.progress.best_eval_env_steps
        if self.cfg.run.restore_drop is None or best is None or not latest_mean < best:
            return latest
        if not self._lget(self.learner.restore_best.remote()):
            return latest
        contexts, restores = self.last_eval_contexts, self.progress.restores
        rescored = self.evaluate_now()
        if self.last_eval > latest_mean:
            if self.progress.restores == restores:  # (a fall past the drop counted it already)
                self.progress.restores += 1
            print(
                f"note: the best evaluation's networks ({best:.1f} at {best_at} steps) score "
                f"{self.last_eval:.1f} on fresh episodes against {latest_mean:.1f} for the "
                "latest; the run ends with them",
                file=sys.stderr,
            )
            return rescored
        self._lget(self.learner.undo_restore.remote())
        # the final evaluation is the latest networks' again, recorded after the rescore
        step, mean, std = self.progress.eval_history[-2]
        self.progress.eval_history.append([step, mean, std])
        self.last_eval, self.last_eval_contexts = mean, contexts
        for cb in self.callbacks:
            cb.on_eval(self, step, mean, std)
        return latest

    def summary(self, final_eval: float | None = None) -> dict:
        stats = self.latest_stats
        p = self.progress
        learner_seconds = stats.learner_seconds if stats else 0.0
        return {
            "env_id": self.cfg.env.id,
            "seed": self.cfg.run.seed,
            "workers": self.cfg.run.workers,
            "env_steps": p.env_steps,
            "episodes": p.episodes,
            "failed_episodes": p.failed_episodes,
            "worker_restarts": p.worker_restarts,
            "workers_alive": self.alive_workers,
            "learner_restarts": p.learner_restarts,
            "lost_episodes": p.lost_episodes,
            "lost_env_steps": p.lost_env_steps,
            "eval_env_steps": p.eval_env_steps,
            "best_train_return": stats.best_return if stats else None,
            "eval_history": [[int(s), m] for s, m, _ in p.eval_history],
            "eval_command": self.cfg.run.eval_command,
            "final_eval_return": final_eval if final_eval is not None else self.last_eval,
            "final_eval_env_steps": p.eval_history[-1][0] if p.eval_history else None,
            "best_eval_return": p.best_eval_return,
            "best_eval_env_steps": p.best_eval_env_steps,
            "restores": p.restores,
            "exploration_restarts": p.exploration_restarts,
            "wall_seconds": self.wall_seconds,
            "learner_seconds": learner_seconds,
            "learner_seconds_per_episode": learner_seconds / max(1, p.episodes),
            "rollout_seconds": p.rollout_seconds,
            "run_dir": str(self.run_dir),
        }

    @property
    def wall_seconds(self) -> float:
        return self.progress.wall_seconds + (time.perf_counter() - self._started)

    # ------------------------------------------------------------------ checkpoints
    @_recovers
    def state(self) -> dict:
        """The whole run state as a checkpoint payload (tensors and plain values only)."""
        if self._waiting:  # results that arrived belong in the learner state, not in limbo
            self._dispatch_waiting()
        learner_state = self._lget(self.learner.state_dict.remote())
        progress = self.progress.__dict__ | {"wall_seconds": self.wall_seconds}
        # Policies handed out but not finished yet are part of the state: a resumed run
        # issues exactly these again instead of drawing new ones.
        # An evaluation's small sweep is not carried over: the resumed run begins that
        # evaluation again, as the learner's copy of its networks is not in the checkpoint.
        tasks = sorted(self._inflight.values(), key=lambda t: t.worker)
        out = [(t.batch, t.issued_at, t.probe) for t in tasks]
        out += self._reissue
        inflight = [_batch_to_state(self._value(b), at) for b, at, probe in out if not probe]
        probes = [at for _, at, probe in out if probe]
        if probes:
            progress["next_eval_at"] = min(progress["next_eval_at"], *probes)
        return ckpt.payload(
            cfg=self.cfg, learner=learner_state, progress=progress, inflight=inflight
        )

    def save_best(self) -> Path | None:
        """Write the learner's best evaluation to checkpoints/best.pt (the generator, critic
        and observation statistics it was evaluated with, and its command)."""
        learner_state = self._lget(self.learner.best_state_dict.remote())
        if learner_state is None:
            return None
        progress = self.progress.__dict__ | {"wall_seconds": self.wall_seconds}
        state = ckpt.payload(cfg=self.cfg, learner=learner_state, progress=progress)
        return ckpt.save(self.run_dir / "checkpoints" / "best.pt", state)

    @_recovers
    def save_checkpoint(self, final: bool = False) -> Path:
        """Write the run state atomically to checkpoints/latest.pt (and final.pt at the end)."""
        state = self.state()
        self._since_checkpoint = []  # in the checkpoint now
        directory = self.run_dir / "checkpoints"
        path = ckpt.save(directory / "latest.pt", state)
        if final:
            path = ckpt.save(directory / "final.pt", state)
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)
        return path

    def memory(self) -> dict[str, dict[str, int]]:
        """Current and peak RSS of the learner and of every rollout worker, in bytes."""
        live = self._live()
        refs = [self.learner.memory.remote()] + [self.workers[i].memory.remote() for i in live]
        learner, *workers = ray.get(refs)
        return {"learner": learner} | {f"worker_{i}": m for i, m in zip(live, workers)}

    def shutdown(self) -> None:
        actors = [self.learner, *(self.workers[i] for i in self._live())]
        for actor in actors + [a for _, a, _ in self._pending.values()]:
            ray.kill(actor)
        # read what was still out, so that Ray reports none of it as an unhandled error
        self._orphans += list(self._inflight) + self._stats_refs
        self._reap_orphans(timeout=5)
        self.workers, self._pending, self._orphans = [], {}, []
        self._failure_log.close()


def _inflight_from(payload: dict) -> list[tuple[ParamBatch, int, bool]]:
    """The batches a checkpoint had out on workers, to issue again."""
    count = int(payload["learner"]["obs_stats"]["count"])
    return [
        (_batch_from_state(b, count), int(b["issued_at"]), False)
        for b in payload.get("inflight", [])
    ]


def _batch_to_state(batch: ParamBatch, issued_at: int) -> dict:
    d = {
        k: torch.from_numpy(np.array(v))
        for k, v in batch._asdict().items()
        if k != "kind" and v is not None  # contexts: None outside task families
    }
    return d | {"kind": batch.kind, "issued_at": int(issued_at)}


def _batch_from_state(d: dict, master_count: int) -> ParamBatch:
    """A checkpointed in-flight batch. Checkpoints written before batches carried the
    statistics' count and M2 hold (mean, std + eps): their statistics are rebuilt with the
    checkpoint's master count, so those episodes still run with the same normalisation."""
    if "obs_count" not in d:
        count = master_count if d["obs_std"].ne(1).any() or d["obs_mean"].ne(0).any() else 0
        std = (d["obs_std"].double() - EPS).clamp_min(0)
        d = {k: v for k, v in d.items() if k != "obs_std"} | {
            "obs_count": torch.tensor(count),
            "obs_mean": d["obs_mean"].double(),
            "obs_m2": std**2 * count,
        }
    # arrays stay arrays; the scalar fields (counts, flags) come back as Python values
    fields = {
        k: d[k].item() if d[k].dim() == 0 else d[k].numpy()
        for k in ParamBatch._fields
        if k != "kind" and k in d
    }
    return ParamBatch(kind=d["kind"], **fields)


def load_resume(run_dir: str | Path) -> dict:
    """The latest checkpoint of the run in ``run_dir``, to continue it from."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ckpt.CheckpointError(f"run directory not found: {run_dir}")
    return ckpt.load(run_dir / "checkpoints" / "latest.pt")


def resume_trainer(run_dir: str | Path, callbacks: list[Any] | None = None) -> Trainer:
    """A Trainer that continues the run in ``run_dir`` from its latest checkpoint."""
    payload = load_resume(run_dir)
    return Trainer(ckpt.config_of(payload), run_dir=run_dir, callbacks=callbacks, resume=payload)
