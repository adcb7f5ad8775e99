"""Learning benchmark: how fast GoGePo reaches a return, per seed, on the real runtime.

    python bench/learning.py configs/inverted_pendulum.yaml --seeds 3 --threshold 950 \
        --set run.total_env_steps=10000
    python bench/learning.py configs/hopper.yaml --seeds 1 --max-minutes 30
    python bench/learning.py configs/hopper.yaml --seeds 2 --max-minutes 30 --threshold 1000 \
        --profile paper= --profile "fast=policy.hidden=[] learner.updates_per_episode=0.25"

A profile is a named group of ``--set`` overrides (``NAME=KEY=VALUE KEY=VALUE ...``; an empty
group is the config as it is). Every profile runs every seed, one run at a time, and the
plots show eval return against wall-clock seconds and against training env steps, one
line per profile and seed (``<out>.png`` beside the JSON).

For each seed: training env steps and wall seconds to the first evaluation whose mean is
at or above ``--threshold``, the final evaluation, the learner and rollout seconds and the
learner seconds per finished episode. Printed as a table and written as JSON to
``bench/results/`` (or ``--out``). Runs go through the same ``Trainer`` as ``gogepo train``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

from gogepo_ray.analysis.plotting import fit_title
from gogepo_ray.callbacks import JsonlMetrics
from gogepo_ray.config import load_config
from gogepo_ray.envs import policy_spec
from gogepo_ray.sysinfo import cpu_info, resolve_precision
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
    stop_at: float | None = None,
) -> dict:
    """One run of ``config`` with ``seed``, to its total_env_steps, or until ``max_minutes``
    have passed, or until an evaluation reaches ``stop_at``."""
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
            if stop_at is not None and any(m >= stop_at for _, m, _ in clock.arrivals):
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
        "learner_busy": round(summary["learner_seconds"] / max(summary["wall_seconds"], 1e-9), 3),
        "best_eval_return": max((m for _, m, _ in clock.arrivals), default=None),
        "best_eval_env_steps": summary.get("best_eval_env_steps"),
        "final_eval_env_steps": summary.get("final_eval_env_steps"),
        "command_fidelity": summary.get("command_fidelity"),
        "restores": summary.get("restores"),
        "exploration_restarts": summary.get("exploration_restarts"),
        "learner_peak_rss_mib": round(memory["learner"]["peak_rss_bytes"] / mib, 1),
        "worker_peak_rss_mib": round(max(m["peak_rss_bytes"] for m in workers) / mib, 1),
        "buffer_size": summary["episodes"]
        if summary["episodes"] < cfg.buffer.capacity
        else cfg.buffer.capacity,
        "eval_history": [[s, round(m, 1), round(w, 1)] for s, m, w in clock.arrivals],
        "run_dir": summary["run_dir"],
    }


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summarise(profile: dict, threshold: float) -> dict:
    """Per profile: seeds whose final (and best) evaluation reached the threshold, the median
    steps to the first evaluation at it, and the median command fidelity."""
    import statistics

    rows = profile["seeds"]
    hits = [r["steps_to_threshold"] for r in rows if r["steps_to_threshold"] is not None]
    fid = [r["command_fidelity"] for r in rows if r.get("command_fidelity") is not None]
    return {
        "seeds": len(rows),
        "final_at_threshold": sum(r["final_eval_return"] >= threshold for r in rows),
        "best_at_threshold": sum((r["best_eval_return"] or -math.inf) >= threshold for r in rows),
        # seeds that never reach it count as never (infinite steps)
        "median_steps_to_threshold": statistics.median(
            [r["steps_to_threshold"] or math.inf for r in rows]
        )
        if rows
        else None,
        "reached": len(hits),
        "median_command_fidelity": statistics.median(fid) if fid else None,
    }


def parse_profile(text: str) -> tuple[str, list[str]]:
    """``NAME=KEY=VALUE KEY=VALUE`` -> (NAME, [overrides])."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--profile {text!r}: expected NAME=KEY=VALUE ... (or NAME= for none)")
    return name.strip(), shlex.split(rest)


def plot_profiles(result: dict, path: Path) -> Path:
    """Eval return against wall-clock seconds and against env steps, a line per profile+seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_steps) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, profile in enumerate(result["profiles"]):
        for j, row in enumerate(profile["seeds"]):
            hist = row["eval_history"]
            if not hist:
                continue
            steps, means, walls = zip(*hist)
            style = dict(color=colours[k % len(colours)], ls=["-", "--", ":", "-."][j % 4], lw=1.4)
            label = f"{profile['name']} s{row['seed']}"
            by_time.plot(walls, means, label=label, **style)
            by_steps.plot(steps, means, label=label, **style)
    for ax, xlabel in ((by_time, "wall-clock seconds"), (by_steps, "training env steps")):
        ax.axhline(result["threshold"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval return (10 episodes)")
        ax.grid(alpha=0.3)
    by_steps.legend(fontsize=7, loc="upper left")
    fig.suptitle(fit_title(f"{result['env_id']}: eval return by profile", 10.5, 11), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _policy_params(cfg) -> int:
    return policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs).num_params


def merge(paths: list[str], out: str | None) -> int:
    """One result (and one plot) from several invocations on the same env, e.g. profiles
    that were run one after the other so that each had the machine to itself."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    if len({r["env_id"] for r in results}) != 1:
        raise SystemExit("--merge: the result files are for different envs")
    # A profile run in several invocations (more seeds later, say) becomes one profile:
    # same config, name and overrides. Each seed keeps the time cap it ran under.
    profiles: list[dict] = []
    for r in results:
        for p in r["profiles"]:
            config = p.get("config", r.get("config"))
            seeds = [{"max_minutes": r.get("max_minutes"), **s} for s in p["seeds"]]
            same = next(
                (
                    q
                    for q in profiles
                    if (q["config"], q["name"], q.get("overrides"))
                    == (config, p["name"], p.get("overrides"))
                ),
                None,
            )
            if same is None:
                profiles.append({**p, "config": config, "seeds": seeds})
            else:
                same["seeds"] = sorted(same["seeds"] + seeds, key=lambda s: s["seed"])
    merged = {**results[0], "profiles": profiles}
    merged["merged_from"] = paths
    target = (
        Path(out) if out else Path(paths[0]).with_name(f"learning-{merged['env_id']}-merged.json")
    )
    target.write_text(json.dumps(merged, indent=2))
    png = plot_profiles(merged, target.with_suffix(".png"))
    print(f"wrote {target} and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", help="run config (not needed with --merge)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=None, help="default: 95%% of env.return_max")
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="stop each seed after this much wall time"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE ...",
        help="a named group of overrides on top of --set; repeat to compare profiles",
    )
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="run nothing: merge the profiles of earlier result files into --out and plot them",
    )
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.config is None:
        ap.error("a config is needed (or --merge)")
    profiles = [parse_profile(p) for p in args.profile] or [("config", [])]

    cfg = load_config(args.config, args.overrides)
    threshold = args.threshold if args.threshold is not None else 0.95 * cfg.env.return_max
    # One local Ray instance serves every profile: size it for the largest one, or the
    # extra workers of a later profile are never placed and its run waits for them.
    import os

    import ray

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        need = max(
            load_config(args.config, [*args.overrides, *sets]).run.workers
            + math.ceil(load_config(args.config, [*args.overrides, *sets]).learner.num_cpus)
            for _, sets in profiles
        )
        ray.init(
            num_cpus=max(os.cpu_count() or 1, need),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name, sets in profiles:
        overrides = [*args.overrides, *sets]
        pcfg = load_config(args.config, overrides)
        rows = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            print(f"{cfg.env.id} profile {name} seed {seed}", flush=True)
            rows.append(
                run_seed(args.config, overrides, seed, threshold, args.max_minutes, out_dir)
            )
        results.append(
            {
                "name": name,
                "config": args.config,
                "overrides": sets,
                "precision": resolve_precision(
                    pcfg.learner.precision, pcfg.learner.device, _policy_params(pcfg)
                ),
                "workers": pcfg.run.workers,
                "seeds": rows,
            }
        )
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "env_id": cfg.env.id,
        "total_env_steps": cfg.run.total_env_steps,
        "max_minutes": args.max_minutes,
        "threshold": threshold,
        "cpu": cpu_info(),
        "profiles": results,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else out_dir / f"learning-{cfg.env.id}-{stamp}.json"
    out.write_text(json.dumps(result, indent=2))
    png = plot_profiles(result, out.with_suffix(".png"))

    head = (
        f"{'profile':>10} {'seed':>4} {'steps≥thr':>10} {'wall≥thr s':>10} {'best eval':>9} "
        f"{'final eval':>10} {'fidelity':>8} {'env steps':>9} {'episodes':>8} {'wall s':>7} "
        f"{'learner busy':>12} {'learner s/ep':>12}"
    )
    print(f"\n{cfg.env.id}, threshold {threshold:g}")
    print(head)
    for profile in results:
        for r in profile["seeds"]:
            print(
                f"{profile['name']:>10} {r['seed']:>4} {str(r['steps_to_threshold']):>10} "
                f"{str(r['wall_seconds_to_threshold']):>10} {r['best_eval_return'] or float('nan'):>9.1f} "
                f"{r['final_eval_return']:>10.1f} {_num(r.get('command_fidelity')):>8} "
                f"{r['env_steps']:>9} {r['episodes']:>8} "
                f"{r['wall_seconds']:>7.0f} {r['learner_busy']:>12.2f} "
                f"{r['learner_seconds_per_episode']:>12.3f}"
            )
    for profile in results:
        profile["summary"] = summarise(profile, threshold)
        print(f"{profile['name']}: {json.dumps(profile['summary'])}")
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
