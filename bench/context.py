"""Task families: zero-shot against oracle and context-blind, on the held-out tasks.

    python bench/context.py configs/point_goal.yaml --seeds 2 --steps 400000 \
        --oracle-steps 100000 --patience 4 --oracle-seeds 1 --parallel 2 --reuse
    python bench/context.py configs/half_cheetah_vel.yaml --seeds 1 --steps 500000 \
        --oracle-steps 150000 --patience 3 --parallel 2

For every seed it trains, on one local Ray instance (``--parallel`` runs at a time, each
with a 1-thread learner on its own core):
  - **zero-shot**: the family run of the config (``--steps`` training env steps); its final
    evaluation gives G(best(x), x) on every held-out context x;
  - **context-blind**: the same run with ``context.blind=true`` (same budget): G and V see
    no context, one policy serves every task;
  - **oracle**: per held-out context, a returns-only GoGePo run on that single task (the
    env built with ``context=x``, no context section), trained until its evaluation stops
    improving (no new best by more than 1% of the return range in ``--patience``
    evaluations) or ``--oracle-steps``; its best evaluation is the upper bound.

With ``--reuse``, a run whose directory already holds a summary.json and the very same
config.yaml is read back instead of trained again (an interrupted bench goes on where
it stopped; oracle runs do not depend on the family settings).

Normalised score per held-out task: (zero-shot − blind) / (oracle − blind); 1 matches the
oracle, 0 is no better than one policy for every task. It is left undefined for a task
whose oracle beats blind by less than 1% of the return range (nothing learned to compare
with), it is at most 1 (an oracle below the zero-shot policy had not converged, so it was
no upper bound), and the mean is over the tasks where it is defined. Where the family
has an obvious hand-written controller (PointGoal: straight at the goal), its return is a
second yardstick that needs no training, and the score against it is reported beside.
Writes JSON (with the CPU flags) and a markdown table to ``bench/results/`` (or
``--out``). For HalfCheetahVel it also reports the mean forward velocity the zero-shot policy runs at, against v*.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray

from gogepo_ray.analysis.evaluation import context_label
from gogepo_ray.callbacks import JsonlMetrics
from gogepo_ray.config import load_config
from gogepo_ray.sysinfo import cpu_info
from gogepo_ray.trainer import Trainer

_print_lock = threading.Lock()


def say(text: str) -> None:
    with _print_lock:
        print(text, flush=True)


class _Evals:
    """Evaluation means as they arrive, and whether they have stopped improving."""

    def __init__(self, name: str, tol: float, patience: int) -> None:
        self.name, self.tol, self.patience = name, tol, patience
        self.history: list[tuple[int, float]] = []

    def on_start(self, trainer) -> None:
        pass

    def on_train(self, trainer, stats) -> None:
        pass

    def on_eval(self, trainer, env_steps: int, mean: float, std: float) -> None:
        self.history.append((env_steps, mean))
        say(
            f"  {self.name}: eval {mean:8.1f} at {env_steps:>7} steps ({trainer.wall_seconds:5.0f} s)"
        )

    def on_checkpoint(self, trainer, path) -> None:
        pass

    def on_end(self, trainer, summary) -> None:
        pass

    def plateaued(self) -> bool:
        means = [m for _, m in self.history if np.isfinite(m)]
        if len(means) <= self.patience:
            return False
        before = max(means[: -self.patience])
        return max(means[-self.patience :]) <= before + self.tol


def train(
    name: str, config: str, overrides: list[str], out: Path, patience: int | None, reuse: bool
) -> dict:
    cfg = load_config(
        config,
        [
            *overrides,
            "tracking.enabled=false",
            "run.workers=1",
            "learner.num_cpus=1",
            "learner.num_threads=1",
            "run.checkpoint_every=100000000",
        ],
    )
    run_dir = out / "runs" / name
    done = run_dir / "summary.json"
    if reuse and done.is_file() and (run_dir / "config.yaml").read_text() == cfg.to_yaml():
        summary = json.loads(done.read_text())
        say(f"reused {name}: {summary['env_steps']} steps, {summary['wall_seconds']:.0f} s")
        return result_row(name, summary, [(s, m) for s, m in summary["eval_history"]])
    tol = 0.01 * (cfg.env.return_max - cfg.env.return_min)
    evals = _Evals(name, tol, patience or 0)
    trainer = Trainer(cfg, run_dir=run_dir, callbacks=[evals, JsonlMetrics()])
    try:
        while trainer.progress.env_steps < cfg.run.total_env_steps:
            trainer.run_until(
                min(cfg.run.total_env_steps, trainer.progress.env_steps + cfg.run.eval_every)
            )
            if patience and evals.plateaued():
                break
        summary = trainer.finish()
    finally:
        trainer.shutdown()
    say(f"done {name}: {summary['env_steps']} steps, {summary['wall_seconds']:.0f} s")
    return result_row(name, summary, evals.history)


def result_row(name: str, summary: dict, history: list[tuple[int, float]]) -> dict:
    return {
        "name": name,
        "env_steps": summary["env_steps"],
        "wall_seconds": round(summary["wall_seconds"], 1),
        "final_eval_return": summary["final_eval_return"],
        "best_eval_return": max((m for _, m in history if np.isfinite(m)), default=None),
        "heldout": summary.get("heldout"),
        "eval_history": [[s, round(m, 2)] for s, m in history],
        "run_dir": summary["run_dir"],
    }


def scripted_return(env_id: str, context: np.ndarray) -> float | None:
    """A hand-written controller's return on one task, where the family has an obvious one:
    PointGoal's a = clip(goal − position, ±0.1) per axis, straight at the goal at full speed
    and then still (a deterministic env from a fixed start). Unlike a single-task oracle run
    it needs no training, so it cannot fall short of converging: a stricter yardstick for
    the zero-shot policy. None for families without one."""
    if not env_id.startswith("PointGoal"):
        return None
    import gymnasium as gym

    goal = np.asarray(context, np.float64)
    env = gym.make(env_id, context=goal.tolist())
    obs, _ = env.reset(seed=0)
    total, done = 0.0, False
    while not done:
        obs, r, term, trunc, _ = env.step(np.clip(goal - obs, -0.1, 0.1))
        total += float(r)
        done = term or trunc
    env.close()
    return total


def mean_velocity(run_dir: str, contexts: np.ndarray, episodes: int = 2) -> list[float]:
    """HalfCheetahVel: the mean forward velocity of G(best(v*), v*) on each held-out v*."""
    import gymnasium as gym
    import torch

    from gogepo_ray import checkpoint as ckpt
    from gogepo_ray.algorithms import make_learner
    from gogepo_ray.envs import policy_spec
    from gogepo_ray.export import build_policy

    payload = ckpt.load(Path(run_dir) / "checkpoints" / "final.pt")
    cfg = ckpt.config_of(payload)
    learner = make_learner(cfg, policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs))
    learner.load_state_dict(payload["learner"])
    out = []
    for x in contexts:
        policy, _ = build_policy(learner, learner.eval_command(x), x)
        env = gym.make(cfg.env.id, context=list(x))
        vel = []
        for ep in range(episodes):
            obs, _ = env.reset(seed=10_000 + ep)
            done = False
            while not done:
                with torch.no_grad():
                    act = policy(torch.as_tensor(obs, dtype=torch.float32)).numpy()
                obs, _, term, trunc, info = env.step(act)
                vel.append(info["x_velocity"])
                done = term or trunc
        env.close()
        out.append(float(np.mean(vel)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument(
        "--steps", type=int, required=True, help="training env steps of family and blind runs"
    )
    p.add_argument(
        "--oracle-steps", type=int, required=True, help="most env steps of an oracle run"
    )
    p.add_argument("--patience", type=int, default=4, help="oracle: evaluations without a new best")
    p.add_argument(
        "--oracle-seeds",
        type=int,
        default=None,
        help="seeds of each oracle (default: --seeds); a task's oracle is the mean of their best evaluations",
    )
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="output stem (default bench/results/context-<env>)")
    p.add_argument(
        "--reuse", action="store_true", help="read back finished runs of the same config"
    )
    args = p.parse_args()

    base = load_config(args.config, args.overrides)
    if base.context is None:
        raise SystemExit(f"{args.config} has no context section: not a task-family config")
    env_id = base.env.id
    stem = Path(args.out or f"bench/results/context-{env_id}")
    out_dir = stem.parent / (stem.name + "-runs")
    heldout = np.asarray(base.context.heldout, np.float64)
    labels = [context_label(x) for x in heldout]
    common = [*args.overrides]

    jobs = []
    oracle_seeds = args.seeds if args.oracle_seeds is None else args.oracle_seeds
    for s in range(max(args.seeds, oracle_seeds)):
        seed = [f"run.seed={s}"]
        budget = [f"run.total_env_steps={args.steps}"]
        if s < args.seeds:
            jobs.append((f"family-s{s}", common + seed + budget, None))
            jobs.append((f"blind-s{s}", common + seed + budget + ["context.blind=true"], None))
        for x, label in zip(heldout, labels):
            if s >= oracle_seeds:
                break
            oracle = [
                "context=null",
                f"env.kwargs={{context: {json.dumps(x.tolist())}}}",
                f"run.total_env_steps={args.oracle_steps}",
                "run.sweep_at_end=false",
            ]
            jobs.append((f"oracle-{label}-s{s}", common + seed + oracle, args.patience))

    ray.init(num_cpus=2 * args.parallel + 2, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {
            name: pool.submit(train, name, args.config, ov, out_dir, pat, args.reuse)
            for name, ov, pat in jobs
        }
        runs = {name: f.result() for name, f in futures.items()}
    ray.shutdown()

    tol = 0.01 * (base.env.return_max - base.env.return_min)
    table = []
    for s in range(args.seeds):
        fam, blind = runs[f"family-s{s}"], runs[f"blind-s{s}"]
        for x, label in zip(heldout, labels):
            z = fam["heldout"][f"eval/heldout/{label}"]
            b = blind["heldout"][f"eval/heldout/{label}"]
            oracles = [runs[f"oracle-{label}-s{k}"] for k in range(oracle_seeds)]
            o = float(np.mean([r["best_eval_return"] for r in oracles]))
            ref = scripted_return(env_id, x)
            row = {
                "seed": s,
                "context": x.tolist(),
                "zero_shot": z,
                "blind": b,
                "oracle": o,
                "oracle_steps": int(np.mean([r["env_steps"] for r in oracles])),
                # undefined where the oracle is no better than blind (by 1% of the return
                # range): the task was not learned, and the ratio would only amplify noise
                # and at most 1: an oracle that scored below the zero-shot policy was no upper
                # bound (it had not converged), the zero-shot policy is the best one known
                "normalised": min(1.0, (z - b) / (o - b)) if o - b > tol else None,
                "normalised_unclipped": (z - b) / (o - b) if o - b > tol else None,
                "scripted": ref,
                "normalised_vs_scripted": None if ref is None else (z - b) / (ref - b),
            }
            table.append(row)
    if env_id.startswith("HalfCheetahVel"):
        for s in range(args.seeds):
            vel = mean_velocity(runs[f"family-s{s}"]["run_dir"], heldout)
            for row, v in zip([r for r in table if r["seed"] == s], vel):
                row["mean_velocity"] = v

    per_seed = {
        s: float(
            np.mean(
                [r["normalised"] for r in table if r["seed"] == s and r["normalised"] is not None]
            )
        )
        for s in range(args.seeds)
    }
    vs_scripted = {
        s: float(np.mean([r["normalised_vs_scripted"] for r in table if r["seed"] == s]))
        for s in range(args.seeds)
        if all(r["scripted"] is not None for r in table)
    }
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "env_id": env_id,
        "seeds": args.seeds,
        "steps": args.steps,
        "oracle_max_steps": args.oracle_steps,
        "oracle_patience": args.patience,
        "oracle_seeds": oracle_seeds,
        "parallel": args.parallel,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "cpu": cpu_info(),
        "normalised_score_per_seed": per_seed,
        "normalised_score_mean": float(np.mean(list(per_seed.values()))),
        "normalised_score_mean_unclipped": float(
            np.mean(
                [r["normalised_unclipped"] for r in table if r["normalised_unclipped"] is not None]
            )
        ),
        "normalised_vs_scripted_per_seed": vs_scripted or None,
        "normalised_vs_scripted_mean": float(np.mean(list(vs_scripted.values())))
        if vs_scripted
        else None,
        "table": table,
        "runs": runs,
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = markdown(result, base.context.train, env_id)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}", file=sys.stderr)
    return 0


def markdown(result: dict, train, env_id: str) -> str:
    fam = [r for k, r in result["runs"].items() if k.startswith("family")]
    fam_seconds = ", ".join(f"{r['wall_seconds']:.0f} s" for r in fam)
    lines = [
        f"# {env_id}: zero-shot on held-out tasks",
        "",
        f"Family and blind runs: {result['steps']} training env steps each "
        f"({fam_seconds} for the family runs, "
        f"{result['parallel']} runs at a time on this machine). Oracles: single-task runs per "
        f"held-out context ({result['oracle_seeds']} seed(s), the mean of their best evaluations), "
        f"to a plateau or {result['oracle_max_steps']} steps. Training "
        f"contexts: {train.model_dump(exclude_none=True)}.",
        "",
    ]
    vel = "mean_velocity" in result["table"][0]
    scripted = result.get("normalised_vs_scripted_mean") is not None
    head = ["seed", "context", "zero-shot", "blind", "oracle (steps)", "normalised"]
    head += ["scripted", "vs scripted"] if scripted else []
    head += ["velocity (zero-shot)"] if vel else []
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in result["table"]:
        cells = [
            str(r["seed"]),
            " ".join(f"{v:g}" for v in r["context"]),
            f"{r['zero_shot']:.1f}",
            f"{r['blind']:.1f}",
            f"{r['oracle']:.1f} ({r['oracle_steps'] // 1000}k)",
            "-" if r["normalised"] is None else f"{r['normalised']:.2f}",
        ]
        if scripted:
            cells += [f"{r['scripted']:.1f}", f"{r['normalised_vs_scripted']:.2f}"]
        cells += [f"{r['mean_velocity']:.2f}"] if vel else []
        lines.append("| " + " | ".join(cells) + " |")
    scores = ", ".join(f"seed {s}: {v:.2f}" for s, v in result["normalised_score_per_seed"].items())
    defined = sum(r["normalised"] is not None for r in result["table"])
    lines += [
        "",
        f"Normalised score, mean over the held-out tasks where it is defined ({defined} of "
        f"{len(result['table'])} rows; undefined: the oracle beat blind by less than 1% of the "
        f"return range; at most 1): {scores}; mean over seeds **{result['normalised_score_mean']:.2f}** "
        f"({result['normalised_score_mean_unclipped']:.2f} without the cap at 1).",
    ]
    if scripted:
        per = ", ".join(
            f"seed {s}: {v:.2f}" for s, v in result["normalised_vs_scripted_per_seed"].items()
        )
        lines += [
            "",
            "Against the scripted controller instead of the oracle run, (zero-shot − blind) / "
            f"(scripted − blind) over all {len(result['table'])} rows: {per}; mean over seeds "
            f"**{result['normalised_vs_scripted_mean']:.2f}**.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
