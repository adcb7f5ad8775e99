"""The metrics of a run, as every sink (metrics.jsonl, MLflow, RLlib results) records them.

Metric keys are namespaced and documented once, here and in docs/results.md:

    train/env_steps            training env steps so far (the step axis of every metric)
    train/episodes             finished training episodes taken in (the buffer keeps the newest capacity)
    train/failed_episodes      episodes dropped (env error, non-finite values)
    train/best_return          best training return (survival offset included)
    train/env_steps_per_second training env steps per wall-clock second
    eval/return_mean           mean true return of G(best return), no noise, run.eval_episodes episodes
    eval/return_std            its standard deviation
    losses/critic              last critic loss, mean (V(θ) − R)²
    losses/generator           last generator loss, mean (V(G(c)) − c)²
    losses/critic_fresh_error  mean |V(θ) − R| on episodes before training on them
    buffer/size                (θ, R) pairs held
    learner/rounds             critic+generator rounds run so far (updates_per_episode per episode);
                               ARS runs: iterations finished
    ars/policy_norm            ARS runs only: |θ|
    ars/step_norm              ARS runs only: |Δθ| of the last iteration
    ars/return_std             ARS runs only: σ_R, std of the returns of the top b directions
    ars/directions_used        ARS runs only: directions in the last step (b, fewer if episodes failed)
    learner/busy               learner update seconds / wall seconds so far
    timers/learner_seconds     learner update time so far
    timers/rollout_seconds     worker rollout time so far (train and eval)
    timers/wall_seconds        wall time so far
    workers/alive              rollout workers alive now (below run.workers while a replacement waits)
    train/lowest_return        lowest training return taken in (with best_return: the range seen)
    explore/param_noise        σ of the exploration noise now (moves with exploration.noise adaptive)
    explore/action_distance    RMS tanh-output difference of noisy and noise-free policies (adaptive noise)
    eval/restores              times run.restore_drop restored the best evaluation's networks
    explore/restarts           times exploration.restart_patience started the learner afresh
    buffer/return_mean, buffer/return_p90, buffer/return_max
                               the buffer's training returns, at each evaluation
    buffer/top_share           share of buffer entries within 10% of the return range of its best
    buffer/top_bucket_size     buffer.sampling buckets: entries in the highest non-empty bucket
    diag/critic_error_top      mean |V(θ) − R| on the 32 best policies in the buffer
    diag/critic_gap_eval       V(G(c)) − c at the evaluation command
    diag/eval_drift            |G(c_eval) − G'(c_eval)| / |G'(c_eval)|, G' the last evaluation's generator
    diag/generated_norm        |G(c_eval)|
    diag/noise_to_weights      σ·√D / |G(c_eval)|: exploration noise against the generated weights
    diag/saturation            share of G(c_eval)'s output pre-activations on the critic's probing
                               states past atanh(0.99), where tanh passes almost no gradient
    summary/*                  at the end: best and final evaluation (and their steps), restores,
                               command_fidelity of the end-of-run sweep

A NaN or ±inf value is recorded in every sink (metrics.jsonl writes it as a string, see
``json_metric``), and stderr says so once per metric: a diverging run must show.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gogepo_ray.types import LearnerStats

if TYPE_CHECKING:
    from gogepo_ray.trainer import Trainer


def train_metrics(trainer: Trainer, stats: LearnerStats) -> dict[str, float]:
    wall = trainer.wall_seconds
    out = {
        "train/env_steps": trainer.progress.env_steps,
        "train/episodes": stats.episodes,
        "train/failed_episodes": stats.failed_episodes,
        "train/best_return": stats.best_return,
        "train/return": stats.last_return,
        "train/env_steps_per_second": trainer.progress.env_steps / max(wall, 1e-9),
        **stats.metrics,
        "learner/rounds": stats.rounds,
        "workers/alive": trainer.alive_workers,
        "learner/busy": stats.learner_seconds / max(wall, 1e-9),
        "timers/learner_seconds": stats.learner_seconds,
        "timers/rollout_seconds": trainer.progress.rollout_seconds,
        "timers/wall_seconds": wall,
    }
    # Training returns come from finished episodes only, so a NaN there means "no episode
    # yet" and is left out. Every other value is recorded as it is, NaN and ±inf included:
    # a diverging run must show in both sinks.
    unmeasured = {"train/best_return", "train/return"}
    return {
        k: float(v)
        for k, v in out.items()
        if v is not None and not (k in unmeasured and math.isnan(float(v)))
    }


def summary_metrics(summary: dict) -> dict[str, float]:
    """The run's outcome as metrics: the best evaluation and the final one with their
    steps, the restores, the command fidelity of the end-of-run sweep, and the faults it
    survived (worker and learner restarts, workers alive at the end, episodes lost)."""
    keys = (
        "best_eval_return",
        "best_eval_env_steps",
        "final_eval_return",
        "final_eval_env_steps",
        "restores",
        "exploration_restarts",
        "command_fidelity",
        "worker_restarts",
        "workers_alive",
        "learner_restarts",
        "lost_episodes",
    )
    return {f"summary/{k}": float(summary[k]) for k in keys if summary.get(k) is not None}


def json_metric(value: float) -> float | str:
    """A metric value as metrics.jsonl holds it: finite numbers as they are, NaN and ±inf as
    the strings "NaN", "Infinity" and "-Infinity" (JSON has no such numbers; ``float()``
    reads the strings back)."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


_non_finite_warned: dict[str, set[str]] = {}  # run directory -> metric keys warned about


def warn_non_finite(run_dir: Path, metrics: dict[str, float], step: int) -> None:
    """Warn on stderr, once per metric and run, the first time a metric is NaN or ±inf.
    Every sink calls this; the first one to see the value prints."""
    warned = _non_finite_warned.setdefault(str(Path(run_dir).resolve()), set())
    for key, value in metrics.items():
        if not math.isfinite(value) and key not in warned:
            warned.add(key)
            print(
                f"warning: {key} is {value} at training env step {step}; it is recorded as is in "
                f'MLflow and as "{json_metric(value)}" in {Path(run_dir) / "metrics.jsonl"} '
                "(this warning is not repeated for this metric)",
                file=sys.stderr,
            )
