"""`gogepo serve` under load on loopback: latency and rate of /act and /policy, beside a
direct in-process call of the same policy, so that what Serve adds is visible.

    python bench/serve.py                              # an untrained configs/hopper.yaml checkpoint
    python bench/serve.py runs/<run> --duration 30     # a run's checkpoint (best.pt where it has one)
    python bench/serve.py --duration 3                 # smoke: seconds, not figures

Starts `gogepo serve`'s application (``gogepo_ray.integrations.serve.Service``) on a local Ray and
measures, each phase for ``--duration`` seconds:
  - act_rate: /act at a fixed open-loop rate (``--rate``, default 200 requests/s, one
    observation each, one command): requests go out on a schedule from a pool of client
    threads, so a slow answer does not slow the offered load (no coordinated omission).
    ``latency_ms`` is from send to answer, ``schedule_latency_ms`` from the scheduled send
    time (it adds the wait for a free client thread); achieved_rps is answers / second.
  - act_direct: the exported policy (``load_policy`` of the same file) called in this
    process on one observation: the floor under act_rate.
  - policy_uncached: /policy with a new command every request (a cache miss each time),
    closed loop, as JSON and as the .pt file; policy_direct: the same generation in
    process (``Served.generate``: export_policy and load_policy).
  - act_batches: /act closed loop from ``--concurrency`` clients at each of ``--batch-sizes``
    observations per request: requests/s and observations/s, beside the direct call's
    observations/s at the same batch size.
The client threads share the machine with Serve's proxy and replica: on a 2-core laptop
the figures include that contention, as a co-located client would see it. Prints a table
and writes JSON (with the CPU's flags) to ``bench/results/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from gogepo_ray import checkpoint as ckpt
from gogepo_ray.integrations.serve import Client, Served, ServeSettings, Service, free_ports
from gogepo_ray.sysinfo import cpu_info

ROOT = Path(__file__).resolve().parents[1]


def pct(samples_s: list[float]) -> dict:
    """p50/p95/p99/max of latencies in seconds, as milliseconds."""
    if not samples_s:
        return {"p50": None, "p95": None, "p99": None, "max": None, "n": 0}
    ms = np.asarray(samples_s) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": p50, "p95": p95, "p99": p99, "max": ms.max(), "n": len(ms)}


def untrained_checkpoint(config: str, overrides: list[str], out: Path) -> Path:
    """A learner's state saved as training saves it: the serving cost of a generator does
    not depend on what it has learned."""
    from gogepo_ray.algorithms import make_learner
    from gogepo_ray.config import load_config
    from gogepo_ray.envs import policy_spec

    cfg = load_config(config, overrides)
    learner = make_learner(cfg, policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs))
    path = out / "checkpoints" / "latest.pt"
    return ckpt.save(path, ckpt.payload(cfg=cfg, learner=learner.state_dict(), progress={}))


def act_at_rate(
    url: str, token, command: float, obs: list, rate: float, duration: float, threads: int
) -> dict:
    """Open loop: request i is due at start + i / rate; ``threads`` clients take them."""
    n = int(rate * duration)
    start = time.perf_counter() + 0.2
    due = [start + i / rate for i in range(n)]
    lock, next_i = threading.Lock(), [0]
    sent_lat, sched_lat, errors, done_at = [], [], [], []

    def worker() -> None:
        client = Client(url, token)
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= n:
                break
            wait = due[i] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            t0 = time.perf_counter()
            try:
                client.act(command, obs)
            except Exception as exc:  # noqa: BLE001 - counted, reported
                errors.append(repr(exc))
                client.close()
                continue
            t1 = time.perf_counter()
            sent_lat.append(t1 - t0)
            sched_lat.append(t1 - due[i])
            done_at.append(t1)
        client.close()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    span = (max(done_at) - start) if done_at else float("nan")
    return {
        "target_rps": rate,
        "achieved_rps": len(done_at) / span if done_at else 0.0,
        "requests": n,
        "answered": len(done_at),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "client_threads": threads,
        "latency_ms": pct(sent_lat),
        "schedule_latency_ms": pct(sched_lat),
    }


def closed_loop(fn, duration: float, concurrency: int = 1) -> dict:
    """``fn(client_index, i)`` as fast as answers come, from ``concurrency`` threads."""
    lat, errors = [], []
    stop_at = time.perf_counter() + duration

    def worker(k: int) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                fn(k, i)
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
            lat.append(time.perf_counter() - t0)
            i += 1

    t_start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - t_start
    return {
        "requests": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "requests_per_s": len(lat) / wall,
        "latency_ms": pct(lat),
    }


def direct(fn, duration: float) -> dict:
    lat = []
    stop_at = time.perf_counter() + duration
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return {"calls": len(lat), "calls_per_s": len(lat) / duration, "latency_ms": pct(lat)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "run", nargs="?", help="run directory or checkpoint (default: untrained --config)"
    )
    ap.add_argument("--config", default=str(ROOT / "configs" / "hopper.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    ap.add_argument("--rate", type=float, default=200.0, help="/act requests per second")
    ap.add_argument("--client-threads", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8, help="clients of the batch phase")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--num-cpus", type=float, default=0.25)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=1.0)
    ap.add_argument(
        "--ingress", choices=["proxy", "haproxy"], default="proxy", help="gogepo serve --ingress"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from gogepo_ray.export import load_policy

    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    source = args.run or untrained_checkpoint(args.config, args.overrides, Path(tmp.name))
    (port,) = free_ports(1)
    settings = ServeSettings(
        port=port,
        replicas=args.replicas,
        num_cpus=args.num_cpus,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        ingress=args.ingress,
    )
    os.environ.pop("RAY_ADDRESS", None)
    service = Service(source, None, settings)  # starts the local Ray, as gogepo serve does
    try:
        url = service.start()
        client = Client(url)
        info = client.info()
        obs_dim = info["observation_space"]["shape"][0]
        command = float(info["command_range"]["eval_command"])
        rng = np.random.default_rng(0)
        obs1 = rng.normal(0, 0.3, size=(1, obs_dim)).astype(np.float32)
        client.act(command, obs1)  # generate and cache the policy, warm the path

        # the direct calls: the same file, the same module, in this process, with the torch
        # threads a replica has (the Learner that Served builds sets them, as in a replica)
        served = Served(service.path)
        policy = load_policy(io.BytesIO(client.policy_file(command)))
        x1 = torch.from_numpy(obs1)

        def policy_call(x):
            with torch.inference_mode():
                return policy(x).numpy()

        before = client.info()["serving"]
        act_rate = act_at_rate(
            url, None, command, obs1.tolist(), args.rate, args.duration, args.client_threads
        )
        after = client.info()["serving"]
        batches = after["act_batches"] - before["act_batches"]
        served_n = max(1, after["act_requests"] - before["act_requests"])
        for name in ("handler", "body"):  # inside the replica: the rest is Serve's path
            key = f"act_{name}_seconds"
            act_rate[f"server_{name}_ms"] = 1000 * (after[key] - before[key]) / served_n
        act_rate["server_mean_batch"] = served_n / max(1, batches)
        act_direct = direct(lambda: policy_call(x1), min(args.duration, 5.0))

        counter = iter(range(10**9))
        clients = [Client(url) for _ in range(max(args.concurrency, 1))]
        policy_json = closed_loop(
            lambda k, i: clients[0].policy(command + 1e-3 * (1 + next(counter))), args.duration / 2
        )
        policy_pt = closed_loop(
            lambda k, i: clients[0].policy_file(command - 1e-3 * (1 + next(counter))),
            args.duration / 2,
        )
        gen_dir = Path(tmp.name) / "gen"
        gen_dir.mkdir(exist_ok=True)
        policy_direct = direct(
            lambda: served.generate(command + 0.5 + 1e-3 * next(counter), None, gen_dir),
            min(args.duration, 5.0),
        )

        rows = []
        for b in args.batch_sizes:
            obs = rng.normal(0, 0.3, size=(b, obs_dim)).astype(np.float32)
            body = obs.tolist()
            r = closed_loop(
                lambda k, i, body=body: clients[k].act(command, body),
                args.duration / len(args.batch_sizes),
                args.concurrency,
            )
            x = torch.from_numpy(obs)
            d = direct(lambda x=x: policy_call(x), 1.0)
            rows.append(
                {
                    "observations_per_request": b,
                    "concurrency": args.concurrency,
                    **r,
                    "observations_per_s": r["requests_per_s"] * b,
                    "direct_observations_per_s": d["calls_per_s"] * b,
                    "direct_latency_ms": d["latency_ms"],
                }
            )
        for c in clients:
            c.close()
    finally:
        service.stop()
    result = {
        "bench": "serve",
        "cpu": cpu_info(),
        "checkpoint": str(
            args.run or f"untrained {args.config} {' '.join(args.overrides)}".strip()
        ),
        "env_id": info["env"]["id"],
        "policy_layer_sizes": info["policy"]["layer_sizes"],
        "policy_params": info["policy"]["num_params"],
        "command": command,
        "duration_s": args.duration,
        "torch_threads": torch.get_num_threads(),
        # Serve's ingress in front of the replica, as the replica sees it
        "ingress": info["serving"]["ingress"],
        "settings": {
            k: v for k, v in info["serving"].items() if k in ServeSettings.__dataclass_fields__
        },
        "targets": {"act_p99_ms": 10.0, "act_rate_rps": 200.0, "policy_uncached_p99_ms": 50.0},
        "act_rate": act_rate,
        "act_direct": act_direct,
        "policy_uncached": {"json": policy_json, "pt": policy_pt},
        "policy_direct": policy_direct,
        "act_batches": rows,
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else out_dir / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))

    def p(d: dict) -> str:
        q = d["latency_ms"]
        return "-" if q["p50"] is None else f"{q['p50']:.2f} / {q['p95']:.2f} / {q['p99']:.2f}"

    print(
        f"{result['env_id']}, policy {result['policy_layer_sizes']} ({result['policy_params']} params); {cpu_info()['model']}"
    )
    print(f"{'phase':<34} {'rate':>10} {'p50 / p95 / p99 ms':>24} {'errors':>6}")
    print(
        f"{'/act at ' + str(args.rate) + ' req/s, 1 obs':<34} {act_rate['achieved_rps']:>10.1f} {p(act_rate):>24} {act_rate['errors']:>6}"
    )
    print(
        f"  mean server batch {act_rate['server_mean_batch']:.2f}; in the replica per request: "
        f"{act_rate['server_handler_ms']:.2f} ms, of which {act_rate['server_body_ms']:.2f} ms "
        "reading the body (fetched from the proxy)"
    )
    print(
        f"{'direct policy call, 1 obs':<34} {act_direct['calls_per_s']:>10.0f} {p(act_direct):>24}"
    )
    print(
        f"{'/policy uncached, JSON':<34} {policy_json['requests_per_s']:>10.1f} {p(policy_json):>24} {policy_json['errors']:>6}"
    )
    print(
        f"{'/policy uncached, .pt':<34} {policy_pt['requests_per_s']:>10.1f} {p(policy_pt):>24} {policy_pt['errors']:>6}"
    )
    print(
        f"{'direct generate (export + load)':<34} {policy_direct['calls_per_s']:>10.1f} {p(policy_direct):>24}"
    )
    print(
        f"{'obs/request':>11} {'req/s':>9} {'obs/s':>10} {'direct obs/s':>13} {'p50 / p95 / p99 ms':>24}"
    )
    for r in rows:
        print(
            f"{r['observations_per_request']:>11} {r['requests_per_s']:>9.1f} {r['observations_per_s']:>10.0f} {r['direct_observations_per_s']:>13.0f} {p(r):>24}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
