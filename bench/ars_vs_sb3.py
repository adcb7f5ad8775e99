"""Peer check: gogepo-ray's ARS against sb3-contrib's ARS on Hopper-v5, one after the
other in one invocation, same settings (the ARS paper's Hopper V2-t: N=8, b=4, α=0.01,
ν=0.025, alive bonus removed, linear policy, observation statistics), same evaluation
(``--eval-episodes`` noise-free episodes every ``--eval-every`` training env steps).

    pip install -e ".[bench]"        # sb3-contrib, a bench extra only
    python bench/ars_vs_sb3.py --seeds 2 --max-minutes 15

For each implementation and seed: training env steps per wall-clock second, and env steps
and wall seconds to the first evaluation at or above each ``--thresholds`` value. A run
stops at the highest threshold or after ``--max-minutes``. Ours runs on a local Ray with
``--workers`` rollout workers; sb3-contrib's runs in this process on one core (torch and
BLAS limited to one thread, as in the ARS paper's single-process use of it). Wall clocks
start when training starts (after Ray and the actors are up, after sb3's model is built).
Evaluation time counts in both. Printed as a table and written as JSON (cpu flags
included) to bench/results/ or ``--out``; a plot of both curves goes beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from learning import run_seed  # noqa: E402  (bench/learning.py)

from gogepo_ray.sysinfo import cpu_info  # noqa: E402

ENV_ID = "Hopper-v5"
CONFIG = str(BENCH.parent / "configs" / "ars_hopper.yaml")


def first_at(curve: list[list[float]], threshold: float) -> tuple[int | None, float | None]:
    """(env steps, wall seconds) of the first evaluation of ``curve`` [[steps, mean, wall]]
    at or above ``threshold``."""
    hit = next((row for row in curve if row[1] >= threshold), None)
    return (int(hit[0]), round(hit[2], 1)) if hit else (None, None)


def run_ours(seed: int, args: argparse.Namespace) -> dict:
    row = run_seed(
        CONFIG,
        [
            f"run.workers={args.workers}",
            f"run.eval_every={args.eval_every}",
            f"run.eval_episodes={args.eval_episodes}",
            "run.total_env_steps=100000000",
            "run.checkpoint_every=100000000",
        ],
        seed,
        threshold=max(args.thresholds),
        max_minutes=args.max_minutes,
        out_dir=BENCH / "results",
        stop_at=max(args.thresholds),
    )
    import ray

    ray.shutdown()  # leave the cores to the next run
    return {
        "env_steps": row["env_steps"],
        "wall_seconds": row["wall_seconds"],
        "curve": row["eval_history"],
    }


def run_sb3(seed: int, args: argparse.Namespace) -> dict:
    import torch
    from sb3_contrib import ARS
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(1)
    env = VecNormalize(make_vec_env(ENV_ID, n_envs=1, seed=seed), norm_obs=True, norm_reward=False)
    eval_env = VecNormalize(
        make_vec_env(ENV_ID, n_envs=1, seed=seed + 10_000),
        training=False,
        norm_obs=True,
        norm_reward=False,
    )
    model = ARS(
        "LinearPolicy",
        env,
        n_delta=8,
        n_top=4,
        learning_rate=0.01,
        delta_std=0.025,
        alive_bonus_offset=-1,
        seed=seed,
        verbose=0,
    )
    curve: list[list[float]] = []
    goal = max(args.thresholds)
    # learn() in chunks of eval_every steps with an evaluation between them (ARS's learn
    # ignores a callback's request to stop; each chunk ends at a whole iteration)
    start = time.perf_counter()
    while True:
        model.learn(total_timesteps=args.eval_every, reset_num_timesteps=False)
        eval_env.obs_rms = copy.deepcopy(env.obs_rms)
        mean, _ = evaluate_policy(
            model, eval_env, n_eval_episodes=args.eval_episodes, deterministic=True
        )
        wall = time.perf_counter() - start
        curve.append([int(model.num_timesteps), round(float(mean), 1), round(wall, 1)])
        print(
            f"  sb3 seed {seed}: eval {mean:8.1f} at {model.num_timesteps:>8} steps ({wall:6.0f} s)",
            flush=True,
        )
        if mean >= goal or wall > 60 * args.max_minutes:
            break
    return {
        "env_steps": int(model.num_timesteps),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "curve": curve,
    }


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_steps) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"gogepo-ray ARS": "tab:blue", "sb3-contrib ARS": "tab:orange"}
    for row in result["rows"]:
        if not row["curve"]:
            continue
        steps, means, walls = zip(*row["curve"])
        label = f"{row['implementation']} s{row['seed']}"
        style = "-" if row["seed"] == result["seeds"][0] else "--"
        colour = colours.get(row["implementation"])
        by_time.plot(walls, means, style, color=colour, label=label)
        by_steps.plot(steps, means, style, color=colour, label=label)
    for ax, xlabel in ((by_time, "wall-clock seconds"), (by_steps, "training env steps")):
        for t in result["thresholds"]:
            ax.axhline(t, color="grey", lw=0.6, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("evaluation return")
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=7)
    fig.suptitle(
        f"ARS V2-t on {ENV_ID}: gogepo-ray ({result['workers']} workers) vs sb3-contrib (1 core)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=15.0, help="per run")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[1000.0, 3000.0])
    ap.add_argument("--eval-every", type=int, default=20_000)
    ap.add_argument("--eval-episodes", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2, help="our rollout workers")
    ap.add_argument("--only", choices=["ours", "sb3"], default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    rows = []
    runners = {"gogepo-ray ARS": run_ours, "sb3-contrib ARS": run_sb3}
    for seed in range(args.seeds):
        for name, fn in runners.items():
            if args.only and not name.startswith({"ours": "gogepo", "sb3": "sb3"}[args.only]):
                continue
            print(f"{name}, seed {seed}", flush=True)
            out = fn(seed, args)
            row = {
                "implementation": name,
                "seed": seed,
                "env_steps": out["env_steps"],
                "wall_seconds": out["wall_seconds"],
                "env_steps_per_second": round(out["env_steps"] / max(out["wall_seconds"], 1e-9)),
                "curve": out["curve"],
            }
            for t in args.thresholds:
                steps, wall = first_at(out["curve"], t)
                row[f"steps_to_{t:g}"], row[f"seconds_to_{t:g}"] = steps, wall
            rows.append(row)
    result = {
        "bench": "ars_vs_sb3",
        "env_id": ENV_ID,
        "config": "configs/ars_hopper.yaml (sb3: n_delta=8 n_top=4 learning_rate=0.01 delta_std=0.025 alive_bonus_offset=-1, VecNormalize obs)",
        "workers": args.workers,
        "seeds": list(range(args.seeds)),
        "thresholds": args.thresholds,
        "eval_every": args.eval_every,
        "eval_episodes": args.eval_episodes,
        "max_minutes": args.max_minutes,
        "cpu": cpu_info(),
        "rows": rows,
    }
    print(f"\n{'implementation':<18}{'seed':>5}{'steps/s':>9}", end="")
    for t in args.thresholds:
        print(f"{f'steps≥{t:g}':>12}{f's≥{t:g}':>9}", end="")
    print()
    for row in rows:
        print(
            f"{row['implementation']:<18}{row['seed']:>5}{row['env_steps_per_second']:>9}", end=""
        )
        for t in args.thresholds:
            steps, wall = row[f"steps_to_{t:g}"], row[f"seconds_to_{t:g}"]
            print(
                f"{steps if steps is not None else '-':>12}{wall if wall is not None else '-':>9}",
                end="",
            )
        print()
    out = (
        Path(args.out)
        if args.out
        else BENCH / "results" / f"ars_vs_sb3-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    png = plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
