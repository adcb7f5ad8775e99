"""Ray Jobs from the ``gogepo`` CLI: submit a training run to a cluster, follow, inspect, stop.

Everything goes through Ray's ``JobSubmissionClient`` (HTTP to the dashboard, port 8265).
Token authentication (on by default for Ray 2.60 clusters started as in ``cluster/``) works
the way it does for ``ray job submit``: with ``RAY_AUTH_MODE=token`` in the environment the
client sends the token from ``RAY_AUTH_TOKEN``, the file in ``RAY_AUTH_TOKEN_PATH``, or
``~/.ray/auth_token`` as ``Authorization: Bearer ...``. Nothing here turns authentication off.

Ray is imported lazily so that ``gogepo --help`` and config errors stay fast.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded as the job's working directory (Ray also skips what .gitignore lists).
EXCLUDES = [
    ".venv",
    "runs",
    "mlruns",
    "mlartifacts",
    "*.db",
    ".git",
    "bench/results",
    "__pycache__",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Environment variables passed from the submitting shell to the job, when set.
PASSTHROUGH_ENV = ("MLFLOW_TRACKING_URI",)
AUTH_HELP = (
    "export RAY_AUTH_MODE=token and provide the cluster's token as RAY_AUTH_TOKEN, "
    "as a file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token"
)


class JobsError(Exception):
    """A cluster cannot be reached or refuses the request; the message says what to do."""


def resolve_address(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


@contextmanager
def _explicit_address() -> Iterator[None]:
    # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its address
    # argument; here --address (which already defaults to $RAY_ADDRESS) must win.
    saved = {
        k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ
    }
    try:
        yield
    finally:
        os.environ.update(saved)


def _auth_failure(address: str, exc: Exception) -> JobsError:
    text = getattr(exc, "message", str(exc))
    if "Authentication failed" in text:  # HTTP 403: a token was sent and rejected
        return JobsError(
            f"the Ray cluster at {address} rejected the authentication token (HTTP 403): "
            f"wrong token for this cluster; {AUTH_HELP}"
        )
    mode = os.environ.get("RAY_AUTH_MODE", "")
    why = (
        "no token was found locally"
        if mode.lower() == "token"
        else "RAY_AUTH_MODE is not 'token', so no token was sent"
    )
    return JobsError(
        f"the Ray cluster at {address} requires token authentication (HTTP 401) and {why}; {AUTH_HELP}"
    )


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A bounded TCP connect first: the job SDK's requests have no timeout of their own."""
    if "://" not in address or not address.startswith(("http://", "https://")):
        return  # a GCS / ray:// address; Ray resolves it to the dashboard itself
    parts = urlsplit(address)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise JobsError(
            f"bad address {address!r}: expected http://HOST:PORT (the dashboard, port 8265)"
        ) from None
    if not parts.hostname:
        raise JobsError(
            f"bad address {address!r}: expected http://HOST:PORT (the dashboard, port 8265)"
        )
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise JobsError(
            f"cannot reach the Ray dashboard at {address} ({reason}): is the cluster up, "
            "and is this its dashboard address (http://HOST:8265)?"
        ) from None


# ----------------------------------------------------------------------------- submit
def _is_excluded(rel: Path, excludes: list[str]) -> bool:
    text = rel.as_posix()
    for pattern in excludes:
        if "/" in pattern:
            if text == pattern or text.startswith(pattern.rstrip("/") + "/"):
                return True
        elif any(fnmatch.fnmatch(part, pattern) for part in rel.parts):
            return True
    return False


def build_submission(
    config: str,
    overrides: list[str],
    working_dir: str | None = ".",
    pip: list[str] | None = None,
) -> dict[str, Any]:
    """Validate CONFIG locally and return ``submit_job`` keyword arguments.

    With a working directory the job runs ``python -m gogepo_ray train`` from the uploaded copy,
    so local code and config edits apply without rebuilding the cluster image (the package
    imports from the working directory, which Ray puts first on the job's PYTHONPATH). The
    config path is given relative to the working directory.
    """
    from gogepo_ray.config import ConfigError, load_config

    cfg_path = Path(config)
    runtime_env: dict[str, Any] = {}
    if working_dir is not None:
        wd = Path(working_dir).resolve()
        if not wd.is_dir():
            raise ConfigError(f"--working-dir {working_dir}: not a directory")
        try:
            rel = cfg_path.resolve().relative_to(wd)
        except ValueError:
            raise ConfigError(
                f"config {config} is outside the working directory {wd}: the job only gets the "
                "files under it (move the config there, or pass --working-dir)"
            ) from None
        if _is_excluded(rel, EXCLUDES):
            raise ConfigError(
                f"config {config} is in a path that is not uploaded ({', '.join(EXCLUDES)}); "
                "move it, e.g. to configs/"
            )
        cfg = load_config(cfg_path, overrides)
        job_config = rel.as_posix()
        runtime_env = {"working_dir": str(wd), "excludes": list(EXCLUDES)}
    else:
        if cfg_path.is_file():
            cfg = load_config(cfg_path, overrides)
        else:
            cfg = None
            print(
                f"note: {config} is not a local file, so it is not checked here; it must exist at that path "
                "on the cluster",
                file=sys.stderr,
            )
        job_config = config
    if pip:
        runtime_env["pip"] = list(pip)
    env_vars = {k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    args = ["python", "-m", "gogepo_ray", "train", job_config]
    for item in overrides:
        args += ["--set", item]
    metadata = {"gogepo.config": job_config}
    if cfg is not None:
        metadata["gogepo.env_id"] = cfg.env.id
    return {"entrypoint": shlex.join(args), "runtime_env": runtime_env, "metadata": metadata}


def _warn_local_tracking(address: str) -> None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    host = urlsplit(address).hostname if "://" in address else None
    if (
        uri
        and not uri.startswith(("http://", "https://", "databricks"))
        and host not in ("127.0.0.1", "localhost", "::1")
    ):
        print(
            f"warning: MLFLOW_TRACKING_URI={uri} is a local store; on a remote cluster the job writes it to "
            "the node's own disk. Point it at a tracking server (http://...) instead.",
            file=sys.stderr,
        )


class Cluster:
    """A connected job client for one Ray cluster (``address``: its dashboard URL)."""

    def __init__(self, address: str | None = None) -> None:
        self.address = resolve_address(address)
        _check_reachable(self.address)
        from ray.job_submission import JobSubmissionClient

        def make():
            with _explicit_address():
                return JobSubmissionClient(self.address)

        self.client = self._call(make)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run one job-API call; every failure becomes a one-line JobsError."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return fn()
        except AuthenticationError as exc:
            raise _auth_failure(self.address, exc) from None
        except requests.exceptions.JSONDecodeError:
            raise JobsError(
                f"{self.address} does not answer as a Ray dashboard (http://HOST:8265)"
            ) from None
        except (ConnectionError, requests.exceptions.RequestException) as exc:
            raise JobsError(
                f"lost the connection to the Ray dashboard at {self.address}: {exc}"
            ) from None
        except RuntimeError as exc:
            text = " ".join(str(exc).split()).rstrip(".")
            if (
                "does not exist" in text
            ):  # "Request failed with status code 404: Job X does not exist"
                raise JobsError(f"{text.rsplit(': ', 1)[-1]} on {self.address}") from None
            raise JobsError(f"the Ray job API at {self.address} failed: {text}") from None

    def submit(self, submission: dict[str, Any], submission_id: str | None = None) -> str:
        _warn_local_tracking(self.address)
        return self._call(lambda: self.client.submit_job(submission_id=submission_id, **submission))

    def status(self, job_id: str) -> tuple[str, str]:
        """(STATUS, a line describing it) for ``job_id``."""
        info = self._call(lambda: self.client.get_job_info(job_id))
        status = str(info.status)
        line = f"{job_id}: {status}"
        if info.message:
            line += f"  ({' '.join(str(info.message).split())})"
        return status, line

    def list_lines(self) -> list[str]:
        jobs = [j for j in self._call(self.client.list_jobs) if j.submission_id]
        jobs.sort(key=lambda j: j.start_time or 0)
        lines = [f"{'submission id':<30} {'status':<10} {'started':<19} entrypoint"]
        for j in jobs:
            started = (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000))
                if j.start_time
                else "-"
            )
            entry = j.entrypoint if len(j.entrypoint) <= 100 else j.entrypoint[:97] + "..."
            lines.append(f"{j.submission_id:<30} {str(j.status):<10} {started:<19} {entry}")
        return lines

    def logs(self, job_id: str) -> str:
        return self._call(lambda: self.client.get_job_logs(job_id))

    def stop(self, job_id: str) -> bool:
        return bool(self._call(lambda: self.client.stop_job(job_id)))

    def follow(self, job_id: str, timeout: float | None = None, poll: float = 2.0) -> str:
        """Stream the job's logs to stdout until it ends (or ``timeout`` seconds pass);
        returns its last status. Logs come over the dashboard's websocket; should that
        fail, by polling ``get_job_logs``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        printed = [0]
        try:
            asyncio.run(_tail(self.client, job_id, printed, deadline))
        except TimeoutError:
            pass
        except Exception as exc:  # noqa: BLE001 - websocket trouble: poll instead
            from ray.exceptions import AuthenticationError

            if isinstance(exc, AuthenticationError):
                raise _auth_failure(self.address, exc) from None
            print(
                f"note: log stream interrupted ({type(exc).__name__}: {exc}); polling instead",
                file=sys.stderr,
            )
        # After the stream closes the status can lag a moment; after a stream failure this
        # loop prints the rest of the log.
        while True:
            status, _ = self.status(job_id)
            text = self.logs(job_id)
            if len(text) > printed[0]:
                _write(text[printed[0] :])
                printed[0] = len(text)
            if status in TERMINAL or (deadline is not None and time.monotonic() >= deadline):
                return status
            time.sleep(poll)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def _tail(client: Any, job_id: str, printed: list[int], deadline: float | None) -> None:
    async def consume() -> None:
        async for chunk in client.tail_job_logs(job_id):
            _write(chunk)
            printed[0] += len(chunk)

    if deadline is None:
        await consume()
    else:
        await asyncio.wait_for(consume(), max(0.0, deadline - time.monotonic()))
