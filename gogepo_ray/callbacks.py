"""Subscribers to a Trainer's events: progress bar, local metrics file, MLflow.

Metric keys are namespaced and documented once, here and in the README:

    train/env_steps            training env steps so far (the step axis of every metric)
    train/episodes             finished training episodes in the buffer
    train/failed_episodes      episodes dropped (env error, non-finite values)
    train/best_return          best training return (survival offset included)
    train/env_steps_per_second training env steps per wall-clock second
    eval/return_mean           mean true return of G(best return), no noise, run.eval_episodes episodes
    eval/return_std            its standard deviation
    losses/critic              last critic loss, mean (V(θ) − R)²
    losses/generator           last generator loss, mean (V(G(c)) − c)²
    losses/critic_fresh_error  mean |V(θ) − R| on episodes before training on them
    buffer/size                (θ, R) pairs held
    timers/learner_seconds     learner update time so far
    timers/rollout_seconds     worker rollout time so far (train and eval)
    timers/wall_seconds        wall time so far
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
        "train/env_steps_per_second": trainer.progress.env_steps / max(wall, 1e-9),
        "losses/critic": stats.critic_loss,
        "losses/generator": stats.generator_loss,
        "losses/critic_fresh_error": stats.critic_fresh_error,
        "buffer/size": stats.buffer_size,
        "timers/learner_seconds": stats.learner_seconds,
        "timers/rollout_seconds": trainer.progress.rollout_seconds,
        "timers/wall_seconds": wall,
    }
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


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
    so results survive without any tracking server."""

    def __init__(self, every_seconds: float = 1.0) -> None:
        self.every_seconds = every_seconds
        self._last = 0.0
        self.fh = None

    def _write(self, row: dict) -> None:
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()

    def on_start(self, trainer: Trainer) -> None:
        self.fh = open(trainer.run_dir / "metrics.jsonl", "a")

    def on_train(self, trainer: Trainer, stats: LearnerStats) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_seconds:
            self._last = now
            self._write(train_metrics(trainer, stats))

    def on_eval(self, trainer: Trainer, env_steps: int, mean: float, std: float) -> None:
        self._write({"train/env_steps": env_steps, "eval/return_mean": mean, "eval/return_std": std})

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        pass

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        self.fh.close()


def default_tracking_uri(output_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class MLflowTracker:
    """One MLflow run per training run: params, metrics by env step, tags, artifacts.

    A tracking failure never stops training: it is reported once on stderr, and the
    metrics stay in ``metrics.jsonl`` in the run directory.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "gogepo", parent_run_id: str | None = None,
                 every_seconds: float = 1.0) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.every_seconds = every_seconds
        self.run_id: str | None = None
        self.client = None
        self._last = 0.0
        self._failed = False

    def _guard(self, what: str, fn, *args, **kwargs) -> Any:
        if self._failed and self.run_id is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must not kill training
            if not self._failed:
                self._failed = True
                print(
                    f"warning: MLflow {what} failed ({type(exc).__name__}: {exc}); training goes on, "
                    "metrics are kept in metrics.jsonl in the run directory",
                    file=sys.stderr,
                )
            return None

    def on_start(self, trainer: Trainer) -> None:
        import mlflow
        import ray
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        import gogepo_ray

        cfg = trainer.cfg
        uri = self.tracking_uri or cfg.tracking.tracking_uri or default_tracking_uri(cfg.run.output_dir)
        self.client = MlflowClient(tracking_uri=uri)

        def start() -> str:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                artifacts = None
                if uri.startswith("sqlite:///"):
                    artifacts = (Path(cfg.run.output_dir).resolve() / "mlartifacts").as_uri()
                exp_id = self.client.create_experiment(self.experiment, artifact_location=artifacts)
            else:
                exp_id = exp.experiment_id
            tags = {
                "gogepo.version": gogepo_ray.__version__,
                "ray.version": ray.__version__,
                "mlflow.version": mlflow.__version__,
                "env_id": cfg.env.id,
                "run_dir": str(trainer.run_dir.resolve()),
            }
            if commit := git_commit():
                tags["git.commit"] = commit
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            prior = (trainer.run_dir / "mlflow_run_id").read_text().strip() if (trainer.run_dir / "mlflow_run_id").is_file() else None
            if prior:  # a resumed run continues its MLflow run
                self.client.update_run(prior, status="RUNNING")
                return prior
            run = self.client.create_run(exp_id, tags=tags, run_name=trainer.run_dir.name)
            params = [Param(k, str(v)[:6000]) for k, v in cfg.flat().items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(run.info.run_id, params=params[i : i + 100])
            (trainer.run_dir / "mlflow_run_id").write_text(run.info.run_id)
            return run.info.run_id

        self.run_id = self._guard("run start", start)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if k != "train/env_steps"]
        self._guard("metric logging", self.client.log_batch, self.run_id, metrics=batch)

    def on_train(self, trainer: Trainer, stats: LearnerStats) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_seconds:
            self._last = now
            self.log(train_metrics(trainer, stats), trainer.progress.env_steps)

    def on_eval(self, trainer: Trainer, env_steps: int, mean: float, std: float) -> None:
        self.log({"eval/return_mean": mean, "eval/return_std": std}, env_steps)

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        pass

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        if self.run_id is None:
            return
        from gogepo_ray.evaluation import plot_learning_curve

        if trainer.latest_stats is not None:
            self.log(train_metrics(trainer, trainer.latest_stats), trainer.progress.env_steps)
        curve = plot_learning_curve(summary["eval_history"], trainer.run_dir / "learning_curve.png", trainer.cfg.env.id)
        for path, sub in [
            (trainer.run_dir / "config.yaml", None),
            (trainer.run_dir / "summary.json", None),
            (curve, None),
            (trainer.run_dir / "sweep.csv", None),
            (trainer.run_dir / "sweep.png", None),
            (trainer.run_dir / "metrics.jsonl", None),
            (trainer.run_dir / "checkpoints" / "final.pt", "checkpoints"),
        ]:
            if path.is_file():
                self._guard("artifact upload", self.client.log_artifact, self.run_id, str(path), sub)
        self._guard("run end", self.client.set_terminated, self.run_id, "FINISHED")

    def fail(self) -> None:
        """Mark the run FAILED (the CLI calls this when training raises)."""
        if self.run_id is not None:
            self._guard("run end", self.client.set_terminated, self.run_id, "FAILED")
