"""``gogepo serve``: policies on demand from a trained generator, over HTTP on Ray Serve.

One Serve application, one deployment (``PolicyServer``, a FastAPI ingress) with
``--replicas`` replicas. Each replica loads the checkpoint the way ``gogepo export`` does
and answers

    POST /policy   {"command": R, "context": [...]?}          G(R[, x]) as gogepo export writes it
    POST /act      {"command": R, "context"?, "observations": [[...], ...]}   actions
    GET  /info     env, spaces, command range, context space, the checkpoint serving
    GET  /healthz  liveness, open without a token

A generated policy is the file ``gogepo_ray.export.export_policy`` writes, kept in a
bounded LRU by (command, context): ``/policy`` returns those bytes (or their tensors as
JSON) and ``/act`` runs the ``nn.Sequential`` loaded from them, so both are the exported
policy by construction. Concurrent ``/act`` requests are batched by ``@serve.batch``: one
forward per distinct policy in a batch.

``--ingress`` picks what stands in front of the replicas on the Ray this command starts:
Serve's Python proxy (``proxy``), or HAProxy (``haproxy``: the replica serves HTTP itself
and HAProxy forwards to it; its stats page and Prometheus metrics get free ports, since
Serve's fixed ones clash between two instances on one machine).

``--follow`` watches the run directory from the driver and redeploys the application
with the new checkpoint in the deployment's ``user_config``; replicas load it in
``reconfigure``. Serve rolls the replicas over with ``max_surge_percent=100``: the old
ones answer until the new ones are ready, so no request is dropped.

The bottom of this module is a small client (``Client``, ``run_episode``): docs/serving.md.
"""

import contextlib
import hashlib
import hmac
import http.client
import io
import json
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from gogepo_ray import checkpoint as ckpt
from gogepo_ray.config import ConfigError

APP_NAME = "gogepo"
TOKEN_ENV = "GOGEPO_SERVE_TOKEN"
POLICY_FIELDS = ("command", "context")
ACT_FIELDS = ("command", "context", "observations")
PT_MEDIA = "application/octet-stream"
INGRESSES = ("proxy", "haproxy")
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


@dataclass(frozen=True)
class ServeSettings:
    """How ``gogepo serve`` runs; every field is a command-line option of the same name."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds. Serve's own default is every interface (0.0.0.0)."""
    port: int = 8000
    """HTTP port of the proxy."""
    token: str | None = None
    """Bearer token required on every endpoint but /healthz (default: $GOGEPO_SERVE_TOKEN)."""
    replicas: int = 1
    """Replicas of the deployment; each holds its own generator and policy cache."""
    max_ongoing_requests: int = 64
    """Requests a replica takes at once (Serve's default is 5, too few to batch)."""
    num_cpus: float = 0.25
    """Logical CPUs Ray reserves per replica: fractional, so that a laptop fits several."""
    max_batch_size: int = 32
    """Most /act requests one batched forward takes (``@serve.batch``)."""
    batch_wait_ms: float = 1.0
    """How long a batch waits for more requests before it runs."""
    cache_size: int = 128
    """Generated policies a replica keeps, by (command, context); least recently used go."""
    max_body_bytes: int = 1 << 20
    """Largest request body; a larger one gets a 400."""
    ingress: str = "proxy"
    """What stands in front of the replicas on the Ray this command starts: Serve's Python
    proxy, or ``haproxy`` (several times the requests per second; docs/serving.md)."""

    def check(self) -> None:
        """ConfigError naming the option, for every setting out of its range."""
        rules = [
            ("--port", 1 <= self.port <= 65535, "must be in 1..65535"),
            ("--replicas", self.replicas >= 1, "must be at least 1"),
            ("--max-ongoing-requests", self.max_ongoing_requests >= 1, "must be at least 1"),
            ("--num-cpus", math.isfinite(self.num_cpus) and self.num_cpus > 0, "must be > 0"),
            ("--max-batch-size", self.max_batch_size >= 1, "must be at least 1"),
            ("--batch-wait-ms", 0 <= self.batch_wait_ms <= 1000, "must be in [0, 1000]"),
            ("--cache-size", self.cache_size >= 1, "must be at least 1"),
            ("--max-body-bytes", self.max_body_bytes >= 1024, "must be at least 1024"),
            ("--token", self.token is None or self.token.strip() != "", "must not be empty"),
            ("--host", bool(self.host), "must not be empty"),
            ("--ingress", self.ingress in INGRESSES, f"must be one of {', '.join(INGRESSES)}"),
        ]
        for flag, ok, rule in rules:
            if not ok:
                value = getattr(self, flag[2:].replace("-", "_"))
                raise ConfigError(f"{flag} {rule}, got {value!r}")

    def replica_args(self) -> dict:
        """What a replica is given: everything but the token, whose SHA-256 goes instead
        (init args show in Serve's dashboard and `serve config`), and the ingress, which
        the replica reads off its own Ray (/info)."""
        out = asdict(self)
        out.pop("ingress")
        token = out.pop("token")
        out["token_sha256"] = None if token is None else _sha256(token.strip())
        return out


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------- request checks
class BadRequest(ValueError):
    """A request the server refuses with 400; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def parse_body(body: bytes, allowed: tuple[str, ...]) -> dict:
    """The JSON object of a request body; unknown keys are refused by name."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("body", f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("body", f"body must be a JSON object, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            raise BadRequest(key, f"unknown field {key!r} (fields: {', '.join(allowed)})")
    return data


def parse_command(data: dict) -> float:
    """``command``: a finite number, required."""
    if "command" not in data:
        raise BadRequest("command", "command is required: the desired return, a number")
    value = data["command"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest("command", f"command must be a number, got {value!r}")
    try:
        command = float(value)
    except OverflowError:
        command = math.inf
    if not math.isfinite(command):
        raise BadRequest("command", f"command must be a finite number, got {value!r}")
    return command


def parse_context(data: dict, family: tuple | None, env_id: str) -> tuple[float, ...] | None:
    """``context``: required for a task-family run, inside the family's space; refused
    elsewhere. ``family`` is ``envs.family_of``'s (space, names)."""
    from gogepo_ray.envs.families import check_context

    value = data.get("context")
    if family is None:
        if value is not None:
            raise BadRequest(
                "context", f"this run's env {env_id} is not a task family; it takes no context"
            )
        return None
    space, names = family
    if value is None:
        raise BadRequest(
            "context",
            f"context is required: {env_id} is a task family ({', '.join(names)})",
        )
    if isinstance(value, list) and any(isinstance(v, bool) for v in value):
        raise BadRequest("context", f"context must be numbers, got {value!r}")
    try:
        return tuple(float(v) for v in check_context(space, names, value))
    except ValueError as exc:
        raise BadRequest("context", str(exc)) from None


def parse_observations(data: dict, obs_dim: int) -> np.ndarray:
    """``observations``: a non-empty list of observations of ``obs_dim`` finite numbers
    -> (n, obs_dim) float32, what the exported policy takes."""
    if "observations" not in data:
        raise BadRequest(
            "observations", f"observations is required: a list of observations of {obs_dim}"
        )
    value = data["observations"]
    if not isinstance(value, list) or not value:
        raise BadRequest(
            "observations", f"observations must be a non-empty list of lists of {obs_dim} numbers"
        )
    try:
        arr = np.asarray(value)
    except ValueError:
        arr = np.asarray([None])  # ragged
    if arr.dtype.kind not in "fi" or arr.ndim != 2:
        raise BadRequest(
            "observations",
            f"observations must be a list of lists of {obs_dim} numbers each (got shape "
            f"{arr.shape if arr.dtype.kind in 'fi' else 'ragged or not numbers'})",
        )
    if arr.shape[1] != obs_dim:
        raise BadRequest(
            "observations", f"each observation has {obs_dim} numbers here, got {arr.shape[1]}"
        )
    if not np.isfinite(arr).all():
        row = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise BadRequest("observations", f"observation {row} is not finite")
    return np.ascontiguousarray(arr, np.float32)


# ---------------------------------------------------------------------- a loaded checkpoint
def stamp(path: Path) -> tuple[int, int]:
    """(mtime_ns, size): what changes when a checkpoint file is replaced."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def read_progress(path: Path) -> dict:
    """A checkpoint's config and driver counters, read without loading its tensors (mmap:
    a checkpoint holds the replay buffer, gigabytes for large policies)."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a CheckpointError
        raise ckpt.CheckpointError(f"{path} is not a readable checkpoint: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != ckpt.FORMAT:
        raise ckpt.CheckpointError(f"{path} is not a gogepo checkpoint ({ckpt.FORMAT})")
    return {"config": payload["config"], "progress": dict(payload.get("progress") or {})}


def _finite_or_none(values) -> list:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, np.float64)]


def _jsonable(tree: Any) -> Any:
    """``tree`` with every non-finite float as None (JSON has no NaN or infinity)."""
    if isinstance(tree, dict):
        return {k: _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def _box(space) -> dict:
    """A Box as JSON: shape and bounds, an unbounded side as null."""
    return {
        "shape": list(space.shape),
        "low": _finite_or_none(space.low),
        "high": _finite_or_none(space.high),
    }


class Generated(NamedTuple):
    """One policy of the cache: the file ``export_policy`` wrote, and its nn.Sequential."""

    blob: bytes
    policy: Any  # torch.nn.Sequential


class Served:
    """The checkpoint a replica serves: config, learner, spaces and what /info says."""

    def __init__(self, path: str | os.PathLike) -> None:
        from gogepo_ray.algorithms import takes_commands
        from gogepo_ray.analysis.local import load_learner
        from gogepo_ray.envs import family_of, make_env

        self.path = Path(path)
        for _ in range(5):  # a training run may replace the file while it is read
            before = stamp(self.path)
            meta = read_progress(self.path)
            cfg, spec, learner = load_learner(str(self.path))
            if stamp(self.path) == before:
                break
        else:
            raise ckpt.CheckpointError(f"{self.path} kept changing while it was read")
        if not takes_commands(cfg):
            raise ckpt.CheckpointError(refuse_algorithm(cfg.algorithm))
        self.cfg, self.spec, self.learner = cfg, spec, learner
        self.mtime_ns, self.size = before
        self.family = family_of(cfg.env.id, cfg.env.kwargs) if cfg.context is not None else None
        env = make_env(cfg.env.id, cfg.env.kwargs)
        try:
            obs_space = _box(env.observation_space)
        finally:
            env.close()
        self.low, self.high = learner.lowest_return, learner.best_return  # training returns
        self.mean, self.std = (a.tolist() for a in learner.obs_stats.normalizer())
        progress = meta["progress"]
        history = progress.get("eval_history") or []
        context = None
        if self.family is not None:
            space, names = self.family
            context = {"names": list(names), **_box(space)}
            context["heldout"] = np.asarray(learner.contexts.heldout).tolist()
        self.info = _jsonable(
            {
                "env": {
                    "id": cfg.env.id,
                    "kwargs": cfg.env.kwargs,
                    "max_episode_steps": cfg.env.max_episode_steps,
                    "survival_offset": cfg.env.survival_offset,
                },
                "algorithm": cfg.algorithm,
                "observation_space": obs_space,
                "action_space": {
                    "shape": [spec.act_dim],
                    "low": list(spec.action_low),
                    "high": list(spec.action_high),
                },
                "policy": {"layer_sizes": list(spec.layer_sizes), "num_params": spec.num_params},
                "command_range": {
                    "trained": None if self.low is None else [self.low, self.high],
                    "configured": [cfg.env.return_min, cfg.env.return_max],
                    "eval_command": learner.eval_command(),
                },
                "context": context,
                "checkpoint": {
                    "path": str(self.path.resolve()),
                    "file": self.path.name,
                    "mtime": time.strftime(
                        "%Y-%m-%dT%H:%M:%S%z", time.localtime(self.mtime_ns / 1e9)
                    ),
                    "mtime_ns": self.mtime_ns,
                    "size": self.size,
                    "env_steps": int(progress.get("env_steps", learner.env_steps)),
                    # the evaluation last recorded: for best.pt the score of these networks
                    "eval_return": float(history[-1][1]) if history else None,
                    "eval_env_steps": int(history[-1][0]) if history else None,
                    "best_eval_return": progress.get("best_eval_return"),
                },
            }
        )

    def warning(self, command: float) -> str | None:
        """Why a command may not be met: outside the training returns the generator saw."""
        if self.low is None:
            return "this run took in no training episode yet; the generator is untrained"
        if self.low <= command <= self.high:
            return None
        return (
            f"command {command:g} is outside the returns seen in training "
            f"[{self.low:.1f}, {self.high:.1f}]: the policy may return something else"
        )

    def generate(self, command: float, context: tuple[float, ...] | None, tmp: Path) -> Generated:
        """G(command[, context]) through ``gogepo export``'s own functions: the file
        export_policy writes (bit-equal to `gogepo export`) and load_policy's module."""
        from gogepo_ray.export import export_policy, load_policy

        path = export_policy(self.learner, command, tmp / "policy.pt", context)
        blob = path.read_bytes()
        return Generated(blob, load_policy(io.BytesIO(blob)))


def refuse_algorithm(algorithm: str) -> str:
    return (
        f"serve writes policies for commanded returns (GoGePo runs): this is an {algorithm} "
        "run, whose one policy takes no command; use gogepo export for it"
    )


class PolicyCache:
    """A bounded LRU of generated policies by (command, context)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple, Generated] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple, make) -> Generated:
        got = self._items.get(key)
        if got is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return got
        self.misses += 1
        got = self._items[key] = make()
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return got

    def __len__(self) -> int:
        return len(self._items)


# ---------------------------------------------------------------------- the deployment
api = FastAPI(title="gogepo serve", docs_url=None, redoc_url=None, openapi_url=None)


def _json(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    body = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _error(status: int, field: str, message: str, headers: dict | None = None) -> Response:
    return _json({"error": message, "field": field}, status, headers)


@serve.deployment(name="PolicyServer")
@serve.ingress(api)
class PolicyServer:
    """One replica: a generator, its policy cache and the batched /act forward."""

    def __init__(self, settings: dict) -> None:
        self.settings = settings
        self.cache = PolicyCache(settings["cache_size"])
        self.served: Served | None = None
        self.reload_error: str | None = None
        self.counts = {
            "act_requests": 0,
            "act_batches": 0,
            "act_observations": 0,
            "act_body_seconds": 0.0,
            "act_handler_seconds": 0.0,
        }
        self._tmp = tempfile.TemporaryDirectory(
            prefix="gogepo-serve-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        self._act_batch.set_max_batch_size(settings["max_batch_size"])
        self._act_batch.set_batch_wait_timeout_s(settings["batch_wait_ms"] / 1000)

    def reconfigure(self, config: dict) -> None:
        """user_config: {"checkpoint": path, ...}. A checkpoint that fails to load leaves
        the one serving in place (reported as /info's reload_error); a replica with none
        yet fails, and Serve retries it."""
        path = config["checkpoint"]
        try:
            served = Served(path)
        except Exception as exc:  # noqa: BLE001
            self.reload_error = f"{path}: {type(exc).__name__}: {exc}"
            if self.served is None:
                raise
            return
        self.served, self.reload_error = served, None
        self.cache = PolicyCache(self.settings["cache_size"])

    # -- plumbing
    def _denied(self, request: Request) -> Response | None:
        want = self.settings["token_sha256"]
        if want is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(_sha256(token.strip()), want):
            return None
        return _error(
            401,
            "Authorization",
            "missing or wrong bearer token (header Authorization: Bearer <token>)",
            {"WWW-Authenticate": "Bearer"},
        )

    async def _body(self, request: Request, allowed: tuple[str, ...]) -> dict:
        limit = self.settings["max_body_bytes"]
        length = request.headers.get("content-length")
        too_big = f"body is larger than {limit} bytes (--max-body-bytes)"
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise BadRequest("body", too_big)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BadRequest("body", too_big)
        return parse_body(bytes(body), allowed)

    def _policy_for(self, data: dict) -> tuple[tuple, Generated]:
        s = self.served
        command = parse_command(data)
        context = parse_context(data, s.family, s.cfg.env.id)
        key = (command, context)
        return key, self.cache.get(key, lambda: s.generate(command, context, Path(self._tmp.name)))

    # -- endpoints
    @api.get("/healthz")
    async def healthz(self) -> Response:
        return _json({"status": "ok" if self.served is not None else "loading"})

    @api.get("/info")
    async def info(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        ctx = serve.get_replica_context()
        serving = {
            "replica": ctx.replica_id.unique_id,
            "pid": os.getpid(),
            "cache_entries": len(self.cache),
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            **self.counts,
            **{k: v for k, v in self.settings.items() if k != "token_sha256"},
            "auth": self.settings["token_sha256"] is not None,
            # what this replica's Ray runs in front of it, whatever the driver asked for
            "ingress": "haproxy" if os.environ.get(HAPROXY_ENV) == "1" else "proxy",
        }
        return _json(self.served.info | {"serving": serving, "reload_error": self.reload_error})

    @api.post("/policy")
    async def policy(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            key, gen = self._policy_for(await self._body(request, POLICY_FIELDS))
        except BadRequest as exc:
            return _error(400, exc.field, str(exc))
        warning = self.served.warning(key[0])
        if PT_MEDIA in request.headers.get("accept", ""):
            headers = {"Content-Disposition": 'attachment; filename="policy.pt"'}
            if warning:
                headers["X-Gogepo-Warning"] = warning
            return Response(gen.blob, media_type=PT_MEDIA, headers=headers)
        import torch

        blob = torch.load(io.BytesIO(gen.blob), weights_only=True)
        state = blob.pop("state_dict")
        out = blob | {
            "dtype": "float32",
            "state_dict": {k: v.tolist() for k, v in state.items()},
            "shapes": {k: list(v.shape) for k, v in state.items()},
            # already folded into layer 0: for a client that runs the raw policy_params
            "obs_mean": self.served.mean,
            "obs_std": self.served.std,
        }
        if warning:
            out["warning"] = warning
        return _json(out)

    @api.post("/act")
    async def act(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        t0 = time.perf_counter()
        try:
            data = await self._body(request, ACT_FIELDS)
            t1 = time.perf_counter()
            obs = parse_observations(data, self.served.spec.obs_dim)
            key, gen = self._policy_for(data)
        except BadRequest as exc:
            return _error(400, exc.field, str(exc))
        actions = await self._act_batch(gen.policy, obs)
        if not np.isfinite(actions).all():  # a generator that diverged: the server's fault
            return _error(
                500, "command", f"the policy for command {key[0]:g} gives non-finite actions"
            )
        out: dict[str, Any] = {"actions": actions.tolist()}
        if warning := self.served.warning(key[0]):
            out["warning"] = warning
        response = _json(out)
        # where a request's time goes inside the replica (bench/serve.py reads these)
        self.counts["act_body_seconds"] += t1 - t0
        self.counts["act_handler_seconds"] += time.perf_counter() - t0
        return response

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
    async def _act_batch(self, policies: list, observations: list[np.ndarray]) -> list:
        """The /act requests that arrived together: one forward per distinct policy."""
        import torch

        groups: dict[int, list[int]] = {}
        for i, policy in enumerate(policies):
            groups.setdefault(id(policy), []).append(i)
        out: list = [None] * len(policies)
        with torch.inference_mode():
            for idx in groups.values():
                x = torch.from_numpy(np.concatenate([observations[i] for i in idx]))
                y = policies[idx[0]](x).numpy()  # (sum n_i, act_dim)
                start = 0
                for i in idx:
                    n = len(observations[i])
                    out[i], start = y[start : start + n], start + n
        self.counts["act_requests"] += len(policies)
        self.counts["act_batches"] += 1
        self.counts["act_observations"] += sum(len(o) for o in observations)
        return out


def application(checkpoint: str | os.PathLike, settings: ServeSettings, pin: dict | None = None):
    """The bound Serve application for ``checkpoint`` (a file)."""
    path = Path(checkpoint).resolve()
    mtime_ns, size = stamp(path)
    return PolicyServer.options(
        num_replicas=settings.replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.num_cpus, **(pin or {})},
        user_config={"checkpoint": str(path), "mtime_ns": mtime_ns, "size": size},
        # a redeploy starts the new replicas before it stops the old: none dropped
        max_surge_percent=100,
        graceful_shutdown_timeout_s=20,
    ).bind(settings.replica_args())


def build_app(args: dict):
    """Serve application builder, for ``serve run gogepo_ray.integrations.serve:build_app
    checkpoint=RUN_DIR`` or a Serve config file (``import_path``, ``args``). The HTTP
    host and port then come from Serve's own options."""
    args = dict(args)
    path = ckpt.resolve(args.pop("checkpoint"), args.pop("which", None))
    defaults = ServeSettings()
    # `serve run ... key=value` gives strings: each takes the type of its default
    typed = {
        k: v if getattr(defaults, k) is None else type(getattr(defaults, k))(v)
        for k, v in args.items()
    }
    settings = ServeSettings(**typed)
    settings.check()
    return application(path, settings)


# ---------------------------------------------------------------------- the driver
def _port_free(host: str, port: int) -> bool:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} does not resolve: {exc}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback now (all held open until all are picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def ingress_environment(ingress: str) -> dict[str, str]:
    """What the Ray processes must see for ``ingress``; set it where Ray starts.

    HAProxy's stats page and Prometheus metrics listen on fixed ports (8404, 9101) in
    Serve; a second HAProxy on the same machine cannot bind them and crashes at start, so
    each instance gets free ones here."""
    if ingress != "haproxy":
        return {HAPROXY_ENV: "0"}
    stats, metrics = free_ports(2)
    return {
        HAPROXY_ENV: "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
    }


@contextlib.contextmanager
def _environ(extra: dict[str, str]):
    """os.environ with ``extra`` while Ray starts (its processes inherit it), then back."""
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _node_pin() -> dict:
    """Replicas read the checkpoint from the run directory's path: keep them on this
    driver's node (on a local Ray the only node). Nothing when the driver is not a node."""
    import ray

    node = f"node:{ray.util.get_node_ip_address()}"
    return {"resources": {node: 0.001}} if node in ray.cluster_resources() else {}


@dataclass
class Service:
    """A running ``gogepo serve``: start, follow the run directory, stop.

    ``source`` is a run directory or a checkpoint file and ``which`` picks the checkpoint
    as in ``gogepo export``; each poll under ``--follow`` resolves it again, so best.pt
    appearing, or final.pt at the end of training, is picked up too."""

    source: str | os.PathLike
    which: str | None
    settings: ServeSettings
    app_name: str = APP_NAME
    route_prefix: str = "/"
    path: Path | None = None
    serving: tuple | None = None  # (path, mtime_ns, size) of the checkpoint deployed
    reloads: int = 0
    _started_serve: bool = False
    _pin: dict = field(default_factory=dict)
    _started_ray: bool = False
    ingress_env: dict = field(default_factory=dict)  # what the Ray this service started saw
    ingress: str | None = None  # what runs in front of the replicas, as a replica reports it

    @property
    def url(self) -> str:
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        return f"http://{host}:{self.settings.port}{self.route_prefix.rstrip('/')}"

    def preflight(self) -> Path:
        """Every check that needs no Ray: options, checkpoint, algorithm. Raises the
        user errors the CLI prints as one line."""
        from gogepo_ray.algorithms import takes_commands

        self.settings.check()
        path = ckpt.resolve(self.source, self.which)
        cfg = ckpt.config_of(read_progress(path))
        if not takes_commands(cfg):
            raise ConfigError(refuse_algorithm(cfg.algorithm))
        from gogepo_ray.envs import check_env_id

        check_env_id(cfg.env.id, cfg.env.kwargs)
        return path

    def start(self) -> str:
        import ray

        path = self.preflight()
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=False)
            else:
                if not _port_free(self.settings.host, self.settings.port):
                    raise ConfigError(
                        f"--port {self.settings.port}: {self.settings.host}:{self.settings.port} "
                        "is in use; pick another port"
                    )
                self.ingress_env = ingress_environment(self.settings.ingress)
                with _environ(self.ingress_env):
                    ray.init(
                        address="local",
                        include_dashboard=False,
                        log_to_driver=False,
                        configure_logging=False,
                    )
                self._started_ray = True
        status = serve.status()
        if self.app_name in status.applications:
            raise ConfigError(
                f"an application named {self.app_name!r} already runs on this cluster's Serve "
                "(another gogepo serve?); stop it first (serve shutdown, or Ctrl-C there)"
            )
        if not status.proxies:
            local = not self._started_ray and not os.environ.get("RAY_ADDRESS")
            if local and not _port_free(self.settings.host, self.settings.port):
                raise ConfigError(f"--port {self.settings.port} is in use; pick another port")
            serve.start(
                proxy_location="HeadOnly",
                http_options={"host": self.settings.host, "port": self.settings.port},
            )
            self._started_serve = True
        self._pin = _node_pin()
        self._deploy(path)
        self._wait_reachable()
        self._check_ingress()
        return self.url

    def _check_ingress(self) -> None:
        """Read what runs in front of the replicas off a replica (``/info``): the ingress is
        fixed where each Ray node starts, so a Ray this process did not start (a cluster in
        RAY_ADDRESS, an earlier ray.init) decides it. ``--ingress haproxy`` on one that runs
        Serve's Python proxy deletes the application again and raises."""
        client = Client(self.url, self.settings.token, timeout=10.0)
        try:
            self.ingress = client.info()["serving"]["ingress"]
        finally:
            client.close()
        if self.settings.ingress == "haproxy" and self.ingress != "haproxy":
            self.stop()
            raise ConfigError(
                "--ingress haproxy: the replicas' Ray runs Serve's Python proxy (its nodes were "
                f"started without {HAPROXY_ENV}=1, and the ingress is fixed where Ray starts); "
                f"start them with {HAPROXY_ENV}=1 (docs/serving.md), or leave --ingress out"
            )

    def _deploy(self, path: Path) -> None:
        version = (path, *stamp(path))  # before the replicas read it: a newer one redeploys
        app = application(path, self.settings, self._pin)
        serve.run(app, name=self.app_name, route_prefix=self.route_prefix)
        self.path, self.serving = path, version

    def _wait_reachable(self, timeout: float = 30.0) -> None:
        client = Client(self.url, self.settings.token, timeout=5.0)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.healthz()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"the application is running but {self.url} does not answer ({exc}): "
                        "Serve may already run on this cluster with other HTTP options "
                        "(`serve status`; `serve shutdown` stops it)"
                    ) from None
                time.sleep(0.2)
            finally:
                client.close()

    def poll(self) -> bool:
        """Redeploy when the checkpoint ``source``/``which`` points at has changed; True
        when it did. A checkpoint that cannot be read is left for the next poll."""
        try:
            path = ckpt.resolve(self.source, self.which)
            current = (path, *stamp(path))
        except (ckpt.CheckpointError, OSError):
            return False
        if current == self.serving:
            return False
        try:
            read_progress(path)
            self._deploy(path)
        except Exception as exc:  # noqa: BLE001 - the service goes on with what it serves
            print(f"warning: not reloading {path}: {exc}", file=sys.stderr)
            self.serving = current  # this version is broken; wait for the next one
            return False
        self.reloads += 1
        return True

    def follow(self, stop: threading.Event, poll_s: float = 2.0, log=None) -> None:
        """``--follow``: poll every ``poll_s`` seconds until ``stop`` is set."""
        while not stop.wait(poll_s):
            if self.poll() and log is not None:
                log(f"reloaded {self.path} ({time.strftime('%H:%M:%S')})")

    def stop(self) -> None:
        """Delete the application; shut Serve down if this service started it."""
        import ray

        with contextlib.suppress(Exception):
            serve.delete(self.app_name)
        if self._started_serve:
            with contextlib.suppress(Exception):
                serve.shutdown()
        if self._started_ray:
            ray.shutdown()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_cli(source: str, which: str | None, settings: ServeSettings, follow: bool) -> int:
    """``gogepo serve``: start, print the URL, follow or wait until Ctrl-C, shut down."""
    service = Service(source, which, settings)
    service.preflight()  # a mistake is one error line, before Ray starts
    try:
        url = service.start()
        # SIGTERM (docker stop, systemd) ends the service like Ctrl-C
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        print(url, flush=True)
        _say(
            f"serving {service.path} on {settings.replicas} replica(s): POST /policy, POST /act, "
            f"GET /info, GET /healthz; bearer token {'required' if settings.token else 'off'}"
            f"{'; following the run directory' if follow else ''}. Ctrl-C stops."
        )
        env = service.ingress_env
        if service.ingress == "haproxy" and env.get(HAPROXY_ENV) == "1":
            _say(
                "ingress: HAProxy; its stats page http://<host>:"
                f"{env['RAY_SERVE_HAPROXY_STATS_PORT']}/stats and Prometheus metrics on port "
                f"{env['RAY_SERVE_HAPROXY_METRICS_PORT']} listen on every interface"
            )
        elif service.ingress == "haproxy":  # a Ray this command did not start
            _say("ingress: HAProxy, with the stats and metrics ports its nodes were started with")
        if follow:
            service.follow(threading.Event(), poll_s=2.0, log=_say)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        _say("stopping")
    finally:
        service.stop()
    return 0


# ---------------------------------------------------------------------- client
class ServeRequestError(RuntimeError):
    """A non-2xx answer: ``status``, and the server's JSON error (``field``, ``error``)."""

    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body
        msg = body.get("error") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {msg}")


class Client:
    """A small keep-alive client of ``gogepo serve`` (one connection; one per thread).

    client = Client("http://127.0.0.1:8000", token="...")
    client.act(1000.0, [obs])      # (1, act_dim) actions
    policy = client.policy_module(1000.0)   # the exported nn.Sequential
    """

    def __init__(
        self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 30.0
    ) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.token, self.timeout = token, timeout
        self._conn: http.client.HTTPConnection | None = None
        self._info: dict | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        accept: str = "application/json",
        raw: bytes | None = None,
    ) -> tuple[int, Any, http.client.HTTPMessage]:
        """(status, parsed JSON or bytes, headers); reconnects once on a closed connection."""
        headers = {"Accept": accept}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, self.prefix + path, body=data, headers=headers)
                resp = self._conn.getresponse()
                payload = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
        if resp.getheader("Content-Type", "").startswith("application/json"):
            payload = json.loads(payload)
        return resp.status, payload, resp.headers

    def _ok(self, method: str, path: str, body: Any = None, **kw) -> Any:
        status, payload, _ = self.request(method, path, body, **kw)
        if status >= 300:
            raise ServeRequestError(status, payload)
        return payload

    def healthz(self) -> dict:
        return self._ok("GET", "/healthz")

    def info(self) -> dict:
        self._info = self._ok("GET", "/info")
        return self._info

    def policy(self, command: float, context=None) -> dict:
        """The policy as JSON: gogepo export's fields, tensors as nested lists."""
        return self._ok("POST", "/policy", _query(command, context))

    def policy_file(self, command: float, context=None) -> bytes:
        """The policy file exactly as ``gogepo export`` writes it."""
        return self._ok("POST", "/policy", _query(command, context), accept=PT_MEDIA)

    def policy_module(self, command: float, context=None):
        """The policy as the nn.Sequential ``gogepo_ray.export.load_policy`` builds."""
        from gogepo_ray.export import load_policy

        return load_policy(io.BytesIO(self.policy_file(command, context)))

    def act(self, command: float, observations, context=None) -> np.ndarray:
        """Actions for (n, obs_dim) observations -> (n, act_dim)."""
        body = _query(command, context) | {"observations": np.asarray(observations).tolist()}
        return np.asarray(self._ok("POST", "/act", body)["actions"])


def _query(command: float, context) -> dict:
    body: dict[str, Any] = {"command": float(command)}
    if context is not None:
        body["context"] = [float(v) for v in context]
    return body


class Episode(NamedTuple):
    ret: float
    length: int


def run_episode(
    client: Client,
    command: float,
    *,
    context=None,
    seed: int | None = None,
    max_steps: int | None = None,
) -> Episode:
    """One episode of the served env (made here, as /info describes it), every action
    asked of ``/act``: what a robot or a game loop does with the service."""
    from gogepo_ray.envs import make_env

    info = client._info or client.info()
    env = make_env(info["env"]["id"], info["env"]["kwargs"], info["env"]["max_episode_steps"])
    try:
        options = None if context is None else {"context": np.asarray(context, np.float64)}
        obs, _ = env.reset(seed=seed, options=options)
        ret, length = 0.0, 0
        while max_steps is None or length < max_steps:
            action = client.act(command, [obs], context)[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            ret += float(reward)
            length += 1
            if terminated or truncated:
                break
        return Episode(ret, length)
    finally:
        env.close()
