"""Learning benchmark: how fast GoGePo reaches a return, per seed, on the real runtime.

    python bench/learning.py configs/inverted_pendulum.yaml --seeds 3 --threshold 950 \
        --set run.total_env_steps=10000
    python bench/learning.py configs/hopper.yaml --seeds 1 --max-minutes 30

For each seed: training env steps and wall seconds to the first evaluation whose mean is
at or above ``--threshold``, the final evaluation, the learner and rollout seconds and the
learner seconds per finished episode. Printed as a table and written as JSON to
``bench/results/`` (or ``--out``). Runs go through the same ``Trainer`` as ``gogepo train``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gogepo_ray.callbacks import JsonlMetrics
from gogepo_ray.config import load_config
from gogepo_ray.trainer import Trainer


class _EvalClock:
    """Wall seconds at which each evaluation result arrived."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.arrivals: list[tuple[int, float, float]] = []  # (env_steps, mean, wall)

    def on_start(self, trainer: Trainer) -> None:
        self.t0 = time.perf_counter()

    def on_train(self, trainer, stats) -> None:
        pass

    def on_eval(self, trainer, env_steps: int, mean: float, std: float) -> None:
        self.arrivals.append((env_steps, mean, time.perf_counter() - self.t0))
        print(
            f"  seed {trainer.cfg.run.seed}: eval {mean:8.1f} at {env_steps:>8} steps "
            f"({time.perf_counter() - self.t0:6.0f} s)",
            flush=True,
        )

    def on_checkpoint(self, trainer, path) -> None:
        pass

    def on_end(self, trainer, summary) -> None:
        pass


def run_seed(
    config: str,
    overrides: list[str],
    seed: int,
    threshold: float,
    max_minutes: float | None,
    out_dir: Path,
) -> dict:
    cfg = load_config(
        config,
        [
            *overrides,
            f"run.seed={seed}",
            "tracking.enabled=false",
            f"run.output_dir={out_dir / 'runs'}",
        ],
    )
    clock = _EvalClock()
    trainer = Trainer(cfg, callbacks=[clock, JsonlMetrics()])
    deadline = None if max_minutes is None else time.perf_counter() + 60 * max_minutes
    try:
        while trainer.progress.env_steps < cfg.run.total_env_steps:
            chunk = min(cfg.run.total_env_steps, trainer.progress.env_steps + cfg.run.eval_every)
            trainer.run_until(chunk)
            if deadline is not None and time.perf_counter() > deadline:
                break
        summary = trainer.finish()
        memory = trainer.memory()
    finally:
        trainer.shutdown()
    mib = 1024 * 1024
    workers = [m for k, m in memory.items() if k.startswith("worker_")]
    hit = next(((s, m, w) for s, m, w in clock.arrivals if m >= threshold), None)
    return {
        "seed": seed,
        "threshold": threshold,
        "steps_to_threshold": hit[0] if hit else None,
        "wall_seconds_to_threshold": round(hit[2], 1) if hit else None,
        "final_eval_return": summary["final_eval_return"],
        "best_train_return": summary["best_train_return"],
        "env_steps": summary["env_steps"],
        "episodes": summary["episodes"],
        "eval_env_steps": summary["eval_env_steps"],
        "wall_seconds": round(summary["wall_seconds"], 1),
        "learner_seconds": round(summary["learner_seconds"], 1),
        "rollout_seconds": round(summary["rollout_seconds"], 1),
        "learner_seconds_per_episode": round(summary["learner_seconds_per_episode"], 4),
        "learner_peak_rss_mib": round(memory["learner"]["peak_rss_bytes"] / mib, 1),
        "worker_peak_rss_mib": round(max(m["peak_rss_bytes"] for m in workers) / mib, 1),
        "buffer_size": summary["episodes"]
        if summary["episodes"] < cfg.buffer.capacity
        else cfg.buffer.capacity,
        "eval_history": [[s, round(m, 1), round(w, 1)] for s, m, w in clock.arrivals],
        "run_dir": summary["run_dir"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=None, help="default: 95%% of env.return_max")
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="stop each seed after this much wall time"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    threshold = args.threshold if args.threshold is not None else 0.95 * cfg.env.return_max
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        print(f"{cfg.env.id} seed {seed}", flush=True)
        rows.append(
            run_seed(args.config, args.overrides, seed, threshold, args.max_minutes, out_dir)
        )
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "env_id": cfg.env.id,
        "workers": cfg.run.workers,
        "total_env_steps": cfg.run.total_env_steps,
        "max_minutes": args.max_minutes,
        "threshold": threshold,
        "seeds": rows,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else out_dir / f"learning-{cfg.env.id}-{stamp}.json"
    out.write_text(json.dumps(result, indent=2))

    head = (
        f"{'seed':>4} {'steps≥thr':>10} {'wall≥thr s':>10} {'final eval':>10} {'env steps':>9} "
        f"{'episodes':>8} {'wall s':>7} {'learner s':>9} {'rollout s':>9} {'learner s/ep':>12}"
    )
    print(f"\n{cfg.env.id}, threshold {threshold:g}")
    print(head)
    for r in rows:
        print(
            f"{r['seed']:>4} {str(r['steps_to_threshold']):>10} {str(r['wall_seconds_to_threshold']):>10} "
            f"{r['final_eval_return']:>10.1f} {r['env_steps']:>9} {r['episodes']:>8} {r['wall_seconds']:>7.0f} "
            f"{r['learner_seconds']:>9.0f} {r['rollout_seconds']:>9.0f} {r['learner_seconds_per_episode']:>12.3f}"
        )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
