"""Learner benchmark: seconds of learner work per finished episode, without envs or Ray.

    python bench/learner_step.py configs/inverted_pendulum.yaml --threads 1 2 --precision fp32 bf16
    python bench/learner_step.py configs/inverted_pendulum.yaml configs/hopper.yaml \
        --baseline /tmp/old-checkout        # the same figures for another checkout, side by side
    python bench/learner_step.py configs/hopper.yaml --device cuda --threads 1   # a GPU learner

Builds the real ``Learner`` for the config's env and network sizes, fills its buffer with
``--fill`` random policies, and times ``update(1)`` (the configured critic steps, then the
generator steps) ``--repeats`` times after ``--warmup`` untimed ones, for every
combination of thread count and precision. Prints a table and writes JSON to
``bench/results/`` (or ``--out``). ``bench/learning.py`` measures the same quantity inside
a whole run; this one isolates the arithmetic so precisions and thread counts compare
on a quiet machine. It runs with the learner actor's malloc settings (``LEARNER_ENV``).

``--baseline DIR`` times a second checkout of the repository (say, the commit before a
change) in a child process that imports ``gogepo_ray`` from DIR, with the same settings,
one after the other in the same invocation, and prints old and new side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gogepo_ray.config import load_config
from gogepo_ray.core.learner import Learner
from gogepo_ray.envs import policy_spec
from gogepo_ray.sysinfo import LEARNER_ENV


def _optimiser_steps(optimizer: torch.optim.Optimizer) -> int:
    """Steps an Adam optimiser has taken (its per-parameter step count)."""
    return max((int(state["step"]) for state in optimizer.state.values()), default=0)


def time_updates(
    config: str,
    overrides: list[str],
    threads: int,
    precision: str,
    fill: int,
    warmup: int,
    repeats: int,
    device: str = "cpu",
) -> dict:
    cfg = load_config(
        config,
        [
            *overrides,
            f"learner.num_threads={threads}",
            f"learner.precision={precision}",
            f"learner.device={device}",
        ],
    )
    spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
    learner = Learner(cfg, spec)
    gen = torch.Generator().manual_seed(0)
    for i in range(fill):
        learner.buffer.add(0.1 * torch.randn(spec.num_params, generator=gen), float(i % 1000))
    # update() reads its last losses back, which waits for the GPU anyway; the synchronize
    # makes the end of a round explicit rather than a side effect.
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        learner.update(1)
    sync()
    steps_before = _optimiser_steps(learner.critic_opt), _optimiser_steps(learner.generator_opt)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        learner.update(1)
        sync()
        times.append(time.perf_counter() - t)
    # what the timed updates ran, read back from the learner rather than from the config
    critic_steps = (_optimiser_steps(learner.critic_opt) - steps_before[0]) / repeats
    generator_steps = (_optimiser_steps(learner.generator_opt) - steps_before[1]) / repeats
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "precision": learner.precision,
        "policy_params": spec.num_params,
        "critic_steps": critic_steps,
        "generator_steps": generator_steps,
        "seconds_per_episode_median": round(statistics.median(times), 4),
        "seconds_per_episode_min": round(min(times), 4),
        "repeats": repeats,
    }


def measure_all(args) -> list[dict]:
    rows = []
    for config in args.config:
        env_id = load_config(config, args.overrides).env.id
        for t in args.threads:
            for p in args.precision:
                row = time_updates(
                    config,
                    args.overrides,
                    t,
                    p,
                    args.fill,
                    args.warmup,
                    args.repeats,
                    args.device,
                )
                rows.append({"config": config, "env_id": env_id, **row})
    return rows


def measure_baseline(directory: str, argv: list[str]) -> list[dict]:
    """The same measurements with ``gogepo_ray`` imported from another checkout."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        path = [str(Path(directory).resolve()), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
        subprocess.run(
            [sys.executable, __file__, *argv, "--rows-only", "--out", str(out)], env=env, check=True
        )
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    malloc_env = "--no-malloc-env" not in raw_argv
    if malloc_env and argv is None and any(os.environ.get(k) != v for k, v in LEARNER_ENV.items()):
        # glibc reads these at start-up: re-run with the learner actor's malloc settings,
        # so that the figures are the ones the learner actor gets.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **LEARNER_ENV})
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="*", default=["configs/inverted_pendulum.yaml"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu", help="learner device: cpu, cuda or cuda:N")
    ap.add_argument("--fill", type=int, default=200, help="random policies put in the buffer first")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None)
    ap.add_argument("--baseline", default=None, metavar="DIR", help="another checkout to time too")
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--no-malloc-env",
        action="store_true",
        help="run with glibc's default malloc settings instead of the learner actor's",
    )
    args = ap.parse_args(raw_argv)
    rows = measure_all(args)
    if args.rows_only:  # the child of --baseline: imports nothing newer than DIR has
        Path(args.out).write_text(json.dumps(rows))
        return 0
    from gogepo_ray.sysinfo import cpu_info

    child_argv = [a for a in raw_argv if a not in ("--baseline", args.baseline, "--out", args.out)]
    baseline = measure_baseline(args.baseline, child_argv) if args.baseline else None
    result = {
        "bench": "learner_step",
        "configs": args.config,
        "overrides": args.overrides,
        "cpu": cpu_info(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
        "torch": torch.__version__,
        "malloc_env": {k: os.environ.get(k) for k in LEARNER_ENV},
        "rows": rows,
        "baseline_dir": args.baseline,
        "baseline_rows": baseline,
    }
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else out_dir / f"learner-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    head = f"{'config':>22} {'device':>6} {'threads':>7} {'precision':>9} {'s/episode (median)':>19} {'min':>7}"
    print(head + (f" {'baseline median':>15} {'speed-up':>8}" if baseline else ""))
    for k, r in enumerate(rows):
        line = (
            f"{Path(r['config']).stem:>22} {r['device']:>6} {r['threads']:>7} {r['precision']:>9} "
            f"{r['seconds_per_episode_median']:>19.3f} {r['seconds_per_episode_min']:>7.3f}"
        )
        if baseline:
            old = baseline[k]["seconds_per_episode_median"]
            line += f" {old:>15.3f} {old / r['seconds_per_episode_median']:>7.2f}x"
        print(line)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
