"""Scaling: training env steps/s against the number of rollout workers, per update schedule.

    python bench/scaling.py                          # W = 1 2 4 8, updates_per_episode 1 0.25 0.0625
    python bench/scaling.py --workers 1 4 --upe 0.25 --seconds 20 --set env.kwargs.step_seconds=0.005

Runs the real ``Trainer`` on a local Ray with the slow stand-in simulator of
``configs/slow_env.yaml`` (``gogepo_ray.envs.slow_env:SlowEnv``: it sleeps per step, so 8
workers fit on 2 cores; Ray's CPUs are over-committed for them). For every schedule and
worker count: a warm-up, then ``--seconds`` of measurement, giving

  - training env steps/s,
  - learner busy fraction (learner seconds / wall seconds),
  - parallel efficiency E(W) = rate(W) / (W · rate(1)) at the same schedule.

Evaluation, checkpoints and tracking are off: the figure is the runtime's. Prints a table
and writes JSON (with the CPU's flags) to ``bench/results/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import ray

from gogepo_ray.config import load_config
from gogepo_ray.envs import policy_spec
from gogepo_ray.sysinfo import cpu_info, resolve_precision
from gogepo_ray.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def measure(
    config: str, overrides: list[str], workers: int, upe: float, seconds: float, out_dir: str
) -> dict:
    cfg = load_config(
        config,
        [
            *overrides,
            f"run.workers={workers}",
            f"learner.updates_per_episode={upe}",
            "run.eval_every=1000000000",
            "run.checkpoint_every=1000000000",
            "run.total_env_steps=1000000000",
            "run.sweep_at_end=false",
            "tracking.enabled=false",
            f"run.output_dir={out_dir}",
        ],
    )
    trainer = Trainer(cfg)
    episode_steps = int(cfg.env.kwargs.get("episode_steps", 200))
    try:
        # Warm-up: every worker through a few episodes, compiled code loaded, buffer started.
        trainer.run_until(4 * workers * episode_steps)

        def snapshot() -> tuple[float, int, float, int]:
            stats = ray.get(trainer.learner.stats.remote())
            return (
                time.perf_counter(),
                trainer.progress.env_steps,
                stats.learner_seconds,
                stats.rounds,
            )

        start = snapshot()
        while time.perf_counter() - start[0] < seconds:
            trainer.run_until(trainer.progress.env_steps + workers * episode_steps)
        end = snapshot()
    finally:
        trainer.shutdown()
    wall, steps = end[0] - start[0], end[1] - start[1]
    return {
        "workers": workers,
        "updates_per_episode": upe,
        "env_steps": steps,
        "wall_seconds": round(wall, 2),
        "env_steps_per_second": round(steps / wall, 1),
        "learner_busy": round((end[2] - start[2]) / wall, 3),
        "rounds": end[3] - start[3],
    }


def _policy_params(cfg) -> int:
    return policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs).num_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "slow_env.yaml"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--upe", type=float, nargs="+", default=[1.0, 0.25, 0.0625])
    ap.add_argument("--seconds", type=float, default=30.0, help="measured wall time per point")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    ray.init(
        num_cpus=max(args.workers) + int(cfg.learner.num_cpus),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for upe in args.upe:
            for w in args.workers:
                row = measure(args.config, args.overrides, w, upe, args.seconds, tmp)
                rows.append(row)
                print(
                    f"  upe {upe:g}, {w} workers: {row['env_steps_per_second']:.0f} steps/s, "
                    f"learner busy {row['learner_busy']:.2f}",
                    flush=True,
                )
    ray.shutdown()
    for upe in args.upe:
        base = next(
            (r for r in rows if r["updates_per_episode"] == upe and r["workers"] == 1), None
        )
        for r in rows:
            if r["updates_per_episode"] == upe and base is not None:
                r["efficiency"] = round(
                    r["env_steps_per_second"] / (r["workers"] * base["env_steps_per_second"]), 3
                )
    step_seconds = cfg.env.kwargs.get("step_seconds")
    result = {
        "bench": "scaling",
        "config": args.config,
        "overrides": args.overrides,
        "env_id": cfg.env.id,
        "env_kwargs": cfg.env.kwargs,
        "precision": resolve_precision(
            cfg.learner.precision, cfg.learner.device, _policy_params(cfg)
        ),
        "learner_num_cpus": cfg.learner.num_cpus,
        "seconds_per_point": args.seconds,
        "cpu": cpu_info(),
        "rows": rows,
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else out_dir / f"scaling-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(
        f"\n{cfg.env.id} {cfg.env.kwargs} (sleep {step_seconds} s/step), precision {result['precision']}"
    )
    print(f"{'upe':>7} {'workers':>7} {'steps/s':>9} {'learner busy':>12} {'efficiency':>10}")
    for r in rows:
        print(
            f"{r['updates_per_episode']:>7g} {r['workers']:>7} {r['env_steps_per_second']:>9.0f} "
            f"{r['learner_busy']:>12.2f} {r.get('efficiency', float('nan')):>10.2f}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
