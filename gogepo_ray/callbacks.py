"""Subscribers to a Trainer's events: progress bar, local metrics file, MLflow.

Metric keys are namespaced and documented once, here and in the README:

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
    train/lowest_return        lowest training return taken in (with best_return: the range seen)
    explore/param_noise        σ of the exploration noise now (moves with exploration.noise adaptive)
    explore/action_distance    RMS tanh-output difference of noisy and noise-free policies (adaptive noise)
    eval/restores              times run.restore_drop restored the best evaluation's networks
    buffer/return_mean, buffer/return_p90, buffer/return_max
                               the buffer's training returns, at each evaluation
    buffer/top_share           share of buffer entries within 10% of the return range of its best
    buffer/top_bucket_size     buffer.sampling buckets: entries in the highest non-empty bucket
    diag/critic_error_top      mean |V(θ) − R| on the 32 best policies in the buffer
    diag/critic_gap_eval       V(G(c)) − c at the evaluation command
    diag/eval_drift            |G(c_eval) − G'(c_eval)| / |G'(c_eval)|, G' the last evaluation's generator
    diag/generated_norm        |G(c_eval)|
    diag/noise_to_weights      σ·√D / |G(c_eval)|: exploration noise against the generated weights
    summary/*                  at the end: best and final evaluation (and their steps), restores,
                               command_fidelity of the end-of-run sweep

A NaN or ±inf value is recorded in every sink (metrics.jsonl writes it as a string, see
``json_metric``), and stderr says so once per metric: a diverging run must show.
"""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
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


def default_tracking_uri(output_dir: str) -> str:
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"
    )


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# MLflow error codes (as MlflowException.error_code names them) for a store that is busy or
# overloaded: the same call can succeed later. A local sqlite store raises
# TEMPORARILY_UNAVAILABLE for a locked or unreachable database.
_TRANSIENT_MLFLOW_CODES = {
    "TEMPORARILY_UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "REQUEST_LIMIT_EXCEEDED",
    "RESOURCE_EXHAUSTED",
}


def mlflow_error_is_transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call may succeed if tried again.

    Transient: the server cannot be reached or does not answer in time (a connection or
    timeout error anywhere in the exception's chain; MLflow wraps the ``requests`` error in an
    MlflowException), an HTTP 408, 429 or 5xx answer (MLflow's client raises a ``requests``
    RetryError for those once its own retries are used up, or a RestException whose error
    code maps to such a status), or a store that reports itself busy. Everything else is
    permanent: the server refused the request (a deleted run, a metric name it does not
    accept, a param changed), or the call failed in this process.
    """
    import requests

    transient_types = (
        ConnectionError,  # builtin: refused, reset, aborted
        TimeoutError,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.RetryError,
        requests.exceptions.ChunkedEncodingError,
    )
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, transient_types):
            return True
        err = err.__cause__ or err.__context__
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, RestException):
        status = exc.get_http_status_code()
        return status in (408, 429) or (status >= 500 and status != 501)
    return isinstance(exc, MlflowException) and exc.error_code in _TRANSIENT_MLFLOW_CODES


class MLflowTracker:
    """One MLflow run per training run: params, metrics by env step, tags, artifacts.

    Every MLflow call runs on a background thread from a bounded queue, so training never
    waits on the tracking server. If the server goes away (a transient error, see
    ``mlflow_error_is_transient``), the failure is reported once on stderr, the calls are
    retried every ``retry_seconds``, and the backlog is written when the server returns. A
    call the server refuses (a permanent error) is reported once per kind of call and
    dropped, and the calls after it go on. Whatever cannot be written is still in
    ``metrics.jsonl`` in the run directory, and the user is told so.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "gogepo",
        parent_run_id: str | None = None,
        every_seconds: float = 1.0,
        retry_seconds: float = 5.0,
        end_timeout: float = 60.0,
        max_queue: int = 100_000,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.every_seconds = every_seconds
        self.retry_seconds = retry_seconds
        self.end_timeout = end_timeout
        self.run_id: str | None = None
        self.client = None
        self._last = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._down_since: float | None = None
        self._dropped = 0
        self._refused_calls = 0  # calls dropped after a permanent error
        self._refused_kinds: set[str] = set()
        self._disabled = False  # the run could not be started: nothing more is sent
        self._run_dir: Path | None = None

    # ---------------------------------------------------------------- background writer
    def _back_up(self) -> None:
        if self._down_since is not None:
            print(
                f"MLflow is reachable again after {time.monotonic() - self._down_since:.0f} s; "
                "the metrics held back are being written",
                file=sys.stderr,
            )
            self._down_since = None

    def _refused(self, what: str, exc: Exception) -> None:
        """A call that can never succeed: report it once per kind of call, and drop it."""
        self._back_up()  # the server answered
        self._refused_calls += 1
        if what == "run start" and self.run_id is None:
            self._disabled = True  # every later call needs the run
            print(
                f"warning: MLflow refused to start the run ({type(exc).__name__}: {str(exc)[:300]}); "
                f"nothing more is sent to MLflow for this run, and every metric is in "
                f"{self._run_dir / 'metrics.jsonl'}",
                file=sys.stderr,
            )
        elif what not in self._refused_kinds:
            self._refused_kinds.add(what)
            print(
                f"warning: MLflow refused a {what} call ({type(exc).__name__}: {str(exc)[:300]}); "
                f"it is dropped and not retried (a permanent error), the later calls go on, and "
                f"every metric is in {self._run_dir / 'metrics.jsonl'}",
                file=sys.stderr,
            )

    def _worker(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                return
            what, fn = op
            while not self._disabled:
                try:
                    fn()
                    self._back_up()
                    break
                except Exception as exc:  # noqa: BLE001 - tracking must not kill training
                    if not mlflow_error_is_transient(exc):
                        self._refused(what, exc)
                        break
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        print(
                            f"warning: MLflow {what} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                            f"training goes on, MLflow calls are retried every {self.retry_seconds:g} s, and "
                            f"every metric is also in {self._run_dir / 'metrics.jsonl'}",
                            file=sys.stderr,
                        )
                    if self._stop.wait(self.retry_seconds):
                        return

    def _submit(self, what: str, fn) -> None:
        try:
            self._queue.put_nowait((what, fn))
        except queue.Full:
            self._dropped += 1  # still in metrics.jsonl

    # ---------------------------------------------------------------- callbacks
    def on_start(self, trainer: Trainer) -> None:
        import mlflow
        import ray
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        import gogepo_ray

        # Fail fast on a dead server (the default retries for minutes); the thread retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        cfg = trainer.cfg
        self._run_dir = trainer.run_dir
        uri = (
            self.tracking_uri
            or cfg.tracking.tracking_uri
            or default_tracking_uri(cfg.run.output_dir)
        )
        self.tracking_uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        id_file = trainer.run_dir / "mlflow_run_id"
        prior = id_file.read_text().strip() if id_file.is_file() else None

        def start() -> None:
            if prior:  # a resumed run continues its MLflow run
                self.client.update_run(prior, status="RUNNING")
                self.run_id = prior
                return
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
            if self.run_id is None:  # a retry after a failure below makes no second run
                run = self.client.create_run(exp_id, tags=tags, run_name=trainer.run_dir.name)
                id_file.write_text(run.info.run_id)
                self.run_id = run.info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in cfg.flat().items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i : i + 100])

        self._thread = threading.Thread(target=self._worker, name="mlflow-writer", daemon=True)
        self._thread.start()
        self._submit("run start", start)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if self._run_dir is not None:
            warn_non_finite(self._run_dir, metrics, step)
        ts = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if k != "train/env_steps"
        ]
        self._submit("metric logging", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def on_train(self, trainer: Trainer, stats: LearnerStats) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_seconds:
            self._last = now
            self.log(train_metrics(trainer, stats), trainer.progress.env_steps)

    def on_eval(self, trainer: Trainer, env_steps: int, mean: float, std: float) -> None:
        # NaN when every evaluation episode failed: recorded, so that it shows
        self.log(
            {"eval/return_mean": mean, "eval/return_std": std, **trainer.last_eval_contexts},
            env_steps,
        )

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        pass

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        if trainer.latest_stats is not None:
            self.log(train_metrics(trainer, trainer.latest_stats), trainer.progress.env_steps)
        self.log(summary_metrics(summary), trainer.progress.env_steps)
        curve = trainer.run_dir / "learning_curve.png"  # the Trainer writes it at the end
        video = None
        if trainer.cfg.run.render_at_end:
            from gogepo_ray.render import render_at_end

            video = render_at_end(trainer)
        for path, sub in [
            *([(video, None)] if video else []),
            (trainer.run_dir / "config.yaml", None),
            (trainer.run_dir / "summary.json", None),
            (curve, None),
            (trainer.run_dir / "sweep.csv", None),
            (trainer.run_dir / "sweep.png", None),
            (trainer.run_dir / "sweep-heldout.csv", None),  # task families
            (trainer.run_dir / "sweep-heldout.md", None),
            (trainer.run_dir / "metrics.jsonl", None),
            (trainer.run_dir / "checkpoints" / "final.pt", "checkpoints"),
        ]:
            if path.is_file():
                self._submit(
                    "artifact upload",
                    lambda p=path, s=sub: self.client.log_artifact(self.run_id, str(p), s),
                )
        self._finish("FINISHED")

    def fail(self) -> None:
        """Mark the run FAILED (the CLI calls this when training raises)."""
        self._finish("FAILED")

    def _finish(self, status: str) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        self._submit("run end", lambda: self.client.set_terminated(self.run_id, status))
        self._queue.put(None)
        self._thread.join(self.end_timeout)
        if self._thread.is_alive():
            self._stop.set()
            print(
                f"warning: MLflow at {self.tracking_uri} did not take the run's last records within "
                f"{self.end_timeout:g} s; every metric is in {self._run_dir / 'metrics.jsonl'} and the "
                f"artifacts are in {self._run_dir}",
                file=sys.stderr,
            )
        elif self._dropped:
            print(
                f"warning: {self._dropped} metric batches were not sent to MLflow (queue full); they are in "
                f"{self._run_dir / 'metrics.jsonl'}",
                file=sys.stderr,
            )
        if self._refused_calls > len(self._refused_kinds) + self._disabled:
            print(
                f"warning: {self._refused_calls} MLflow calls were refused in all (each kind is reported above); "
                f"every metric is in {self._run_dir / 'metrics.jsonl'}",
                file=sys.stderr,
            )
