"""Memory benchmark: peak RSS of the learner actor and of a rollout worker over a run.

    python bench/memory.py configs/hopper.yaml --steps 50000

Runs the real trainer (the same path as ``gogepo train``) for ``--steps`` training env
steps on one seed, then prints and writes as JSON the peak resident set size of the
learner and of the largest rollout worker, the replay buffer's size and its payload.
The buffer is the learner's one growing structure: capacity × policy parameters × 4 bytes
at most (Hopper, reference sizes: 10 000 × 69 635 × 4 B ≈ 2.8 GB once full).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import run_seed  # noqa: E402

from gogepo_ray.config import load_config  # noqa: E402
from gogepo_ray.envs import policy_spec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/hopper.yaml")
    ap.add_argument("--steps", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    overrides = [*args.overrides, f"run.total_env_steps={args.steps}"]
    cfg = load_config(args.config, overrides)
    spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    row = run_seed(
        args.config, overrides, args.seed, threshold=float("inf"), max_minutes=None, out_dir=out_dir
    )
    result = {
        "config": args.config,
        "env_id": cfg.env.id,
        "env_steps": row["env_steps"],
        "episodes": row["episodes"],
        "workers": cfg.run.workers,
        "policy_params": spec.num_params,
        "buffer_entries": row["buffer_size"],
        "buffer_payload_mib": round(row["buffer_size"] * spec.num_params * 4 / 2**20, 1),
        "learner_peak_rss_mib": row["learner_peak_rss_mib"],
        "worker_peak_rss_mib": row["worker_peak_rss_mib"],
        "wall_seconds": row["wall_seconds"],
    }
    out = (
        Path(args.out)
        if args.out
        else out_dir / f"memory-{cfg.env.id}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.write_text(json.dumps(result, indent=2))
    for k, v in result.items():
        print(f"{k:>22}: {v}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
