"""Helpers for tests that start real servers (a Ray head, an MLflow tracking server).

Every server binds to 127.0.0.1 only and runs in its own session (``start_new_session``), so
that stopping it can find every process it spawned by that session id, and nothing else:
``ray stop`` is never used, because it kills every Ray process on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]

# Outbound traffic of any kind stays off: Ray usage stats, MLflow telemetry.
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray / MLflow settings of its own (a session-wide
    ``ray.init`` sets RAY_AUTH_MODE here, for one), the venv first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(QUIET_ENV)
    env.update(extra)
    return env


def http_status(
    url: str, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> int | None:
    """Status code of a GET, or None when nothing answers."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def wait_http_ok(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Wait (bounded) until ``url`` answers 200; fail early when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode} before {url} came up:\n{log_tail(log)}"
            )
        if http_status(url, timeout=2.0) == 200:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout:.0f} s:\n{log_tail(log)}")


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def start_server(
    cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_server(proc: subprocess.Popen, grace: float = 60.0) -> list[int]:
    """SIGTERM the server (it shuts down its own children), wait up to ``grace`` seconds,
    then SIGKILL whatever is left in its session. Returns the pids that had to be killed."""
    sid = proc.pid  # start_new_session: the server leads its own session
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.monotonic() + 15.0
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftover = _session_pids(sid)
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return leftover


def start_mlflow_server(tmp: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:``port`` (sqlite store and artifacts under
    ``tmp``), up and answering /health when this returns."""
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp / 'srv.db'}",
        "--artifacts-destination",
        str(tmp / "art"),
    ]
    log = tmp / f"server-{port}.log"
    proc = start_server(cmd, clean_env(), log, cwd=tmp)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", proc, log, timeout=120)
    except RuntimeError:
        stop_server(proc, grace=10)
        raise
    return proc
