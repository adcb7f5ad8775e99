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
from gogepo_ray.config import Config
from gogepo_ray.core import takes_commands
from gogepo_ray.core.normalizer import EPS
from gogepo_ray.distributed.actors import (
    check_learner_gpu,
    ensure_ray,
    learner_actor,
    rollout_actor,
    wait_for_learner,
)
from gogepo_ray.envs import family_of, policy_spec
from gogepo_ray.errors import TrainingError
from gogepo_ray.evaluation import (
    ContextSweep,
    SweepResult,
    choose_command,
    failure_rows,
    heldout_metrics,
    plot_learning_curve,
    sweep_commands,
)
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
        self._resume_batches: list[tuple[ParamBatch, int]] = []
        if resume is not None:
            learner_state = resume["learner"]
            self.progress = Progress(**resume["progress"])
            count = int(resume["learner"]["obs_stats"]["count"])
            self._resume_batches = [
                (_batch_from_state(b, count), int(b["issued_at"]))
                for b in resume.get("inflight", [])
            ]
        self.latest_stats: LearnerStats | None = None
        self.last_eval: float = float("nan")
        # Task families: the last evaluation per held-out context (``eval/heldout/...``)
        self.last_eval_contexts: dict[str, float] = {}
        check_learner_gpu(cfg, local=ensure_ray(cfg))
        self.learner = learner_actor(cfg, self.spec, learner_state)
        wait_for_learner(self.learner, cfg)
        self.workers = [rollout_actor(cfg, self.spec, i) for i in range(cfg.run.workers)]
        # ref -> (worker, batch, issued_at, probe): issued_at ≥ 0 marks an evaluation, probe
        # the small sweep that picks an evaluation's command (run.eval_command: sweep)
        self._inflight: dict[ray.ObjectRef, tuple[int, ParamBatch | ray.ObjectRef, int, bool]] = {}
        self._stats_refs: list[ray.ObjectRef] = []  # learner steps in progress, oldest first
        self._waiting: list[tuple[int, EpisodeBatch]] = []  # results for the next learner step
        # Workers the learner had no episodes for (ARS, while its iteration's last results
        # are out): they get work from the next learner step instead of asking again at once.
        self._parked: list[int] = []
        self._consecutive_failures = 0
        self._failure_log = open(self.run_dir / "failures.jsonl", "a")
        self._started = time.perf_counter()
        self._finished = False
        for cb in self.callbacks:
            cb.on_start(self)

    # ------------------------------------------------------------------ the loop
    def _submit(
        self, worker: int, batch: ParamBatch | ray.ObjectRef, issued_at: int, probe: bool = False
    ) -> None:
        ref = self.workers[worker].run.remote(batch)
        self._inflight[ref] = (worker, batch, issued_at, probe)

    def _other_work(self, worker: int) -> bool:
        """Give a free worker the next of the policies a checkpoint had out on workers, or an
        evaluation if one is due. False when it needs new training policies instead."""
        if self._resume_batches:
            self._submit(worker, *self._resume_batches.pop(0))
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
            if len(resumed) < len(self._resume_batches):
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
            self._submit(worker, *self._resume_batches.pop(0))
        if evaluate is not None:
            self._submit_eval(evaluate)
        self._stats_refs.append(stats)

    def _eval_inflight(self) -> bool:
        return any(issued >= 0 for _, _, issued, _ in self._inflight.values())

    def _handle(
        self, result: EpisodeBatch, issued_at: int, worker: int, probe: bool = False
    ) -> bool:
        """Account for a finished batch: evaluations are recorded, training results join the
        results waiting for the learner's next step. An evaluation's small sweep (``probe``)
        sends its chosen command's episodes to the same worker; True when it did."""
        self.progress.rollout_seconds += result.rollout_seconds
        ok = np.array([f is None for f in result.failures], dtype=bool)
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
        return False

    def _record_eval(self, result: EpisodeBatch, issued_at: int) -> None:
        """An evaluation's result: history, callbacks, and the learner's best (a new best is
        written to checkpoints/best.pt; a fall past run.restore_drop restores it)."""
        returns = result.returns[[f is None for f in result.failures]]
        mean = float(returns.mean()) if len(returns) else float("nan")
        std = float(returns.std()) if len(returns) else float("nan")
        self.progress.eval_history.append([issued_at, mean, std])
        self.last_eval = mean
        if result.contexts is not None:
            self.last_eval_contexts = heldout_metrics(result)
        outcome = ray.get(self.learner.end_eval.remote(mean))
        if outcome["best"]:
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
        """The result of a finished rollout task. A worker that died is replaced and the
        same batch (same episode ids and seeds) is issued again, so no episode is lost or
        counted twice."""
        worker, batch, issued_at, probe = self._inflight.pop(ref)
        try:
            result = ray.get(ref)
            if result.kind == "eval":  # labelled with what the generator had learned from
                issued = ray.get(batch) if isinstance(batch, ray.ObjectRef) else batch
                if issued.trained_env_steps >= 0:
                    issued_at = int(issued.trained_env_steps)
            return worker, result, issued_at, probe
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            self.progress.worker_restarts += 1
            if self.progress.worker_restarts > self.cfg.run.max_worker_restarts:
                raise TrainingError(
                    f"rollout workers died {self.progress.worker_restarts} times "
                    f"(run.max_worker_restarts={self.cfg.run.max_worker_restarts}); last: {exc}"
                ) from None
            print(
                f"warning: rollout worker {worker} died ({type(exc).__name__}); replacing it and "
                f"re-issuing its episodes",
                file=sys.stderr,
            )
            self.workers[worker] = rollout_actor(self.cfg, self.spec, worker)
            self._submit(worker, batch, issued_at, probe)
            return worker, None, issued_at, probe

    def _drain_stats(self, block: bool = False) -> None:
        while self._stats_refs:
            ready, _ = ray.wait(self._stats_refs[:1], timeout=None if block else 0)
            if not ready:
                return
            self._stats_refs.pop(0)
            self.latest_stats = ray.get(ready[0])
            for cb in self.callbacks:
                cb.on_train(self, self.latest_stats)

    def run_until(self, target_env_steps: int) -> None:
        """Stream episodes until ``target_env_steps`` training steps have been taken.
        Work in flight carries over to the next call."""
        if not self._inflight and not self._stats_refs:
            self._parked = []
            for w in range(len(self.workers)):
                self._next_work(w)
        while self.progress.env_steps < target_env_steps:
            ready, _ = ray.wait(list(self._inflight) + self._stats_refs[:1], num_returns=1)
            if self._stats_refs and ready[0] == self._stats_refs[0]:
                self._drain_stats()
            else:
                worker, result, issued_at, probe = self._collect(ready[0])
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
        """Finish every episode still running, so counters and buffer agree."""
        while self._inflight:
            ready, _ = ray.wait(list(self._inflight), num_returns=1)
            worker, result, issued_at, probe = self._collect(ready[0])
            if result is not None:
                self._handle(result, issued_at, worker, probe)
        if self._waiting:
            self._dispatch_waiting(give_work=False)
        self._drain_stats(block=True)

    def run_batch(self, batch: ParamBatch) -> EpisodeBatch:
        """Run one (evaluation) ParamBatch spread over all workers; results in order."""
        n = len(batch.episode_ids)
        parts = np.array_split(np.arange(n), min(len(self.workers), n))
        refs = [
            self.workers[i].run.remote(
                batch._replace(
                    episode_ids=batch.episode_ids[idx],
                    seeds=batch.seeds[idx],
                    commands=batch.commands[idx],
                    policy_params=batch.policy_params[idx],
                    contexts=None if batch.contexts is None else batch.contexts[idx],
                )
            )
            for i, idx in enumerate(parts)
        ]
        results = ray.get(refs)
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

    def evaluate(
        self,
        commands: list[float] | None = None,
        episodes: int | None = None,
        contexts: np.ndarray | None = None,
    ) -> EpisodeBatch:
        """Noise-free policies for ``commands`` (default: the best return so far; for a task
        family each of ``contexts``, default the held-out ones, at its best estimate)."""
        eps = episodes or self.cfg.run.eval_episodes
        return self.run_batch(ray.get(self.learner.propose_eval.remote(commands, eps, contexts)))

    def evaluate_now(self) -> EpisodeBatch:
        """A periodic evaluation run at once on all workers, as the loop runs one (for
        ``run.eval_command: sweep`` its small sweep first, its episodes counted as
        evaluation steps); recorded at the current step. Returns the evaluation's episodes."""
        eps = self.cfg.run.eval_episodes
        batch = self.run_batch(ray.get(self.learner.begin_eval.remote(eps)))
        if self.cfg.run.eval_command == "sweep":
            self._account(batch, "eval sweep")
            command = choose_command(batch)
            batch = self.run_batch(ray.get(self.learner.eval_at.remote(command, eps)))
        self._handle(batch, self.progress.env_steps, -1)
        return batch

    def _account(self, result: EpisodeBatch, source: str) -> None:
        """Count an evaluation-kind batch run outside the loop (sweeps) and log its failures."""
        self.progress.eval_env_steps += int(result.lengths.sum())
        self.progress.rollout_seconds += result.rollout_seconds
        failed = [i for i, f in enumerate(result.failures) if f is not None]
        self._log_failures(result, failed, source=source)

    def sweep(self, episodes: int = 1) -> SweepResult | ContextSweep:
        """Achieved against commanded return over the env's return range; for a task family
        over held-out contexts × commands, with the held-out table."""
        commands = sweep_commands(self.cfg)
        if self.cfg.context is not None:
            runs: list[EpisodeBatch] = []

            def run(batch: ParamBatch) -> EpisodeBatch:
                runs.append(self.run_batch(batch))
                return runs[-1]

            sweep = ContextSweep.run(
                lambda c, e, x: ray.get(self.learner.propose_eval.remote(c, e, x)),
                run,
                family_of(self.cfg.env.id, self.cfg.env.kwargs)[1],
                self.cfg.context.heldout,
                commands,
                episodes,
                self.cfg.env.survival_offset,
            )
            for result in runs:
                self._account(result, "sweep")
            return sweep
        result = self.evaluate(commands, episodes)
        self._account(result, "sweep")  # failed episodes are left out of the sweep's means
        return SweepResult.from_batch(result, len(commands), episodes, self.cfg.env.survival_offset)

    def finish(self) -> dict:
        """Drain, final evaluation, final checkpoint, command sweep, summary.json."""
        if self._finished:
            return json.loads((self.run_dir / "summary.json").read_text())
        self._drain_inflight()
        restores = self.progress.restores
        final = self.evaluate_now()
        if self.progress.restores > restores:  # the run ends with the best networks: their score
            final = self.evaluate_now()
        final_mean = self.last_eval
        self.latest_stats = ray.get(self.learner.stats.remote())
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
        if self.cfg.context is not None:  # the final evaluation, per held-out context
            summary["heldout"] = dict(self.last_eval_contexts)
        # failed episodes are left out of the final evaluation's and the sweep's means
        summary["final_eval_failed_episodes"] = sum(f is not None for f in final.failures)
        summary["sweep_failed_episodes"] = sweep.failed_episodes if sweep else None
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._finished = True
        for cb in self.callbacks:
            cb.on_end(self, summary)
        return summary

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
            "eval_env_steps": p.eval_env_steps,
            "best_train_return": stats.best_return if stats else None,
            "eval_history": [[int(s), m] for s, m, _ in p.eval_history],
            "eval_command": self.cfg.run.eval_command,
            "final_eval_return": final_eval if final_eval is not None else self.last_eval,
            "final_eval_env_steps": p.eval_history[-1][0] if p.eval_history else None,
            "best_eval_return": p.best_eval_return,
            "best_eval_env_steps": p.best_eval_env_steps,
            "restores": p.restores,
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
    def state(self) -> dict:
        """The whole run state as a checkpoint payload (tensors and plain values only)."""
        if self._waiting:  # results that arrived belong in the learner state, not in limbo
            self._dispatch_waiting()
        learner_state = ray.get(self.learner.state_dict.remote())
        progress = self.progress.__dict__ | {"wall_seconds": self.wall_seconds}
        # Policies handed out but not finished yet are part of the state: a resumed run
        # issues exactly these again instead of drawing new ones.
        # An evaluation's small sweep is not carried over: the resumed run begins that
        # evaluation again, as the learner's copy of its networks is not in the checkpoint.
        inflight = [
            _batch_to_state(
                ray.get(batch) if isinstance(batch, ray.ObjectRef) else batch, issued_at
            )
            for _, batch, issued_at, probe in sorted(self._inflight.values(), key=lambda v: v[0])
            if not probe
        ]
        inflight += [_batch_to_state(b, at) for b, at in self._resume_batches]
        probes = [at for _, _, at, probe in self._inflight.values() if probe]
        if probes:
            progress["next_eval_at"] = min(progress["next_eval_at"], *probes)
        return ckpt.payload(
            cfg=self.cfg, learner=learner_state, progress=progress, inflight=inflight
        )

    def save_best(self) -> Path | None:
        """Write the learner's best evaluation to checkpoints/best.pt (the generator, critic
        and observation statistics it was evaluated with, and its command)."""
        learner_state = ray.get(self.learner.best_state_dict.remote())
        if learner_state is None:
            return None
        progress = self.progress.__dict__ | {"wall_seconds": self.wall_seconds}
        state = ckpt.payload(cfg=self.cfg, learner=learner_state, progress=progress)
        return ckpt.save(self.run_dir / "checkpoints" / "best.pt", state)

    def save_checkpoint(self, final: bool = False) -> Path:
        """Write the run state atomically to checkpoints/latest.pt (and final.pt at the end)."""
        state = self.state()
        directory = self.run_dir / "checkpoints"
        path = ckpt.save(directory / "latest.pt", state)
        if final:
            path = ckpt.save(directory / "final.pt", state)
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)
        return path

    def memory(self) -> dict[str, dict[str, int]]:
        """Current and peak RSS of the learner and of every rollout worker, in bytes."""
        refs = [self.learner.memory.remote()] + [w.memory.remote() for w in self.workers]
        learner, *workers = ray.get(refs)
        return {"learner": learner} | {f"worker_{i}": m for i, m in enumerate(workers)}

    def shutdown(self) -> None:
        for actor in [self.learner, *self.workers]:
            ray.kill(actor)
        self.workers = []
        self._failure_log.close()


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
