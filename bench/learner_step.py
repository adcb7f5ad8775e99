"""Learner benchmark: seconds of learner work per finished episode, without envs or Ray.

    python bench/learner_step.py configs/inverted_pendulum.yaml --threads 1 2 --precision fp32 bf16

Builds the real ``Learner`` for the config's env and network sizes, fills its buffer with
``--fill`` random policies, and times ``update(1)`` (the configured critic steps, then the
generator steps) ``--repeats`` times after ``--warmup`` untimed ones, for every
combination of thread count and precision. Prints a table and writes JSON to
``bench/results/`` (or ``--out``). ``bench/learning.py`` measures the same quantity inside
a whole run; this one isolates the arithmetic so precisions and thread counts compare
on a quiet machine. It runs with the learner actor's malloc settings (``LEARNER_ENV``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from gogepo_ray.config import load_config
from gogepo_ray.core.learner import Learner
from gogepo_ray.distributed.actors import LEARNER_ENV
from gogepo_ray.envs import policy_spec


def time_updates(
    config: str,
    overrides: list[str],
    threads: int,
    precision: str,
    fill: int,
    warmup: int,
    repeats: int,
) -> dict:
    cfg = load_config(
        config, [*overrides, f"learner.num_threads={threads}", f"learner.precision={precision}"]
    )
    spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
    learner = Learner(cfg, spec)
    gen = torch.Generator().manual_seed(0)
    for i in range(fill):
        learner.buffer.add(0.1 * torch.randn(spec.num_params, generator=gen), float(i % 1000))
    for _ in range(warmup):
        learner.update(1)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        learner.update(1)
        times.append(time.perf_counter() - t)
    return {
        "threads": threads,
        "precision": precision,
        "policy_params": spec.num_params,
        "critic_steps": cfg.critic.steps_per_episode,
        "generator_steps": cfg.generator.steps_per_episode,
        "seconds_per_episode_median": round(statistics.median(times), 4),
        "seconds_per_episode_min": round(min(times), 4),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    if argv is None and any(os.environ.get(k) != v for k, v in LEARNER_ENV.items()):
        # glibc reads these at start-up: re-run with the learner actor's malloc settings,
        # so that the figures are the ones the learner actor gets.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **LEARNER_ENV})
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/inverted_pendulum.yaml")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--fill", type=int, default=200, help="random policies put in the buffer first")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = [
        time_updates(args.config, args.overrides, t, p, args.fill, args.warmup, args.repeats)
        for t in args.threads
        for p in args.precision
    ]
    cfg = load_config(args.config, args.overrides)
    result = {
        "config": args.config,
        "env_id": cfg.env.id,
        "overrides": args.overrides,
        "cpu_flags_bf16": _bf16_flags(),
        "rows": rows,
    }
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = (
        Path(args.out)
        if args.out
        else out_dir / f"learner-{cfg.env.id}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.write_text(json.dumps(result, indent=2))
    print(f"{'threads':>7} {'precision':>9} {'s/episode (median)':>19} {'min':>7}")
    for r in rows:
        print(
            f"{r['threads']:>7} {r['precision']:>9} {r['seconds_per_episode_median']:>19.3f} "
            f"{r['seconds_per_episode_min']:>7.3f}"
        )
    print(f"wrote {out}")
    return 0


def _bf16_flags() -> list[str]:
    """The CPU's bf16-related feature flags (Linux), which decide whether bf16 pays off."""
    try:
        words = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({w for w in words if w in ("avx512_bf16", "amx_bf16", "amx_tile")})


if __name__ == "__main__":
    sys.exit(main())
