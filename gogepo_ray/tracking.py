"""MLflow tracking of a run: one MLflow run per training run, fed from the Trainer's events
on a background thread (``MLflowTracker``), and the store a run uses by default."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gogepo_ray.metrics import summary_metrics, train_metrics, warn_non_finite
from gogepo_ray.types import LearnerStats

if TYPE_CHECKING:
    from gogepo_ray.trainer import Trainer


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
        # what Trainer.finish wrote: each file that exists goes up
        for path, sub in [
            (trainer.run_dir / "policy.mp4", None),  # run.render_at_end
            (trainer.run_dir / "config.yaml", None),
            (trainer.run_dir / "summary.json", None),
            (trainer.run_dir / "learning_curve.png", None),
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
