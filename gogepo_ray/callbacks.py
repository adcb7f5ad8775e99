"""Subscribers to a Trainer's events that write to this machine: the progress bar and
``metrics.jsonl``. MLflow's subscriber is ``gogepo_ray.tracking.MLflowTracker``; the metrics
they record are defined in ``gogepo_ray.metrics``. A subscriber consumes events
(``on_start``, ``on_train``, ``on_eval``, ``on_checkpoint``, ``on_end``) and produces
nothing the run depends on."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gogepo_ray.metrics import json_metric, train_metrics, warn_non_finite
from gogepo_ray.types import LearnerStats

if TYPE_CHECKING:
    from gogepo_ray.trainer import Trainer


class ProgressBar:
    """tqdm bar over training env steps: best training return, last eval, steps/s."""

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self.bar = None

    def on_start(self, trainer: Trainer) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=trainer.cfg.run.total_env_steps,
            initial=trainer.progress.env_steps,
            unit="step",
            dynamic_ncols=True,
            disable=self.disable,
            desc=trainer.cfg.env.id,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )

    def _postfix(self, trainer: Trainer) -> None:
        s = trainer.latest_stats
        self.bar.set_postfix(
            best=f"{s.best_return:.1f}" if s else "-",
            eval=f"{trainer.last_eval:.1f}",
            sps=f"{trainer.progress.env_steps / max(trainer.wall_seconds, 1e-9):.0f}",
            refresh=False,
        )

    def on_train(self, trainer: Trainer, stats: LearnerStats) -> None:
        self._postfix(trainer)
        self.bar.update(min(trainer.progress.env_steps, self.bar.total) - self.bar.n)

    def on_eval(self, trainer: Trainer, env_steps: int, mean: float, std: float) -> None:
        self._postfix(trainer)

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        pass

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        self.bar.close()


class JsonlMetrics:
    """Every metric, also written to ``<run_dir>/metrics.jsonl`` (one JSON object a line),
    so results survive without any tracking server. NaN and ±inf are written as the strings
    "NaN", "Infinity", "-Infinity" (see ``json_metric``), so every line is valid JSON."""

    def __init__(self, every_seconds: float = 1.0) -> None:
        self.every_seconds = every_seconds
        self._last = 0.0
        self.fh = None
        self._run_dir: Path | None = None

    def _write(self, row: dict[str, float]) -> None:
        warn_non_finite(self._run_dir, row, int(row["train/env_steps"]))
        self.fh.write(json.dumps({k: json_metric(v) for k, v in row.items()}) + "\n")
        self.fh.flush()

    def on_start(self, trainer: Trainer) -> None:
        self._run_dir = trainer.run_dir
        self.fh = open(trainer.run_dir / "metrics.jsonl", "a")

    def on_train(self, trainer: Trainer, stats: LearnerStats) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_seconds:
            self._last = now
            self._write(train_metrics(trainer, stats))

    def on_eval(self, trainer: Trainer, env_steps: int, mean: float, std: float) -> None:
        # wall seconds when the result came in: `gogepo compare` plots return against them
        self._write(
            {
                "train/env_steps": env_steps,
                "eval/return_mean": mean,
                "eval/return_std": std,
                **trainer.last_eval_contexts,  # task families: per held-out context
                "timers/wall_seconds": trainer.wall_seconds,
            }
        )

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        pass

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        if trainer.latest_stats is not None:  # the final figures, as MLflow gets them
            self._write(train_metrics(trainer, trainer.latest_stats))
        self.fh.close()
