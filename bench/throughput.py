"""Rollout throughput: a worker's env steps/s against the env's own zero-action rate.

    python bench/throughput.py                       # HalfCheetah-v5 and Hopper-v5, 1 and 4 envs
    python bench/throughput.py --env Hopper-v5 --envs 1 2 8 --hidden 256 256 --rounds 100

For every env, one process on one core (torch and BLAS pinned to 1 thread) measures:
  - raw:    ``gym.make(id).step(zeros)`` in a loop, resetting when an episode ends;
  - worker: ``Rollouts.run`` (the rollout actor's body) on training batches of
            ``envs`` random policies, with observation statistics following every step,
            exactly as a worker runs them during training;
  - replay: the same plain env stepping through the actions the worker's first policy
            took in one episode, from the same reset seed: the worker's own trajectory
            and physics, with no policy and no worker around it (a moving body does not
            cost what one lying still does: on HalfCheetah it measured cheaper).
The target is worker / raw; worker / replay is the worker's own overhead on its own
trajectory. The three are measured in short rounds: one worker batch (``envs`` episodes),
then as many raw and replay steps as that batch took, in a rotating order. A ratio is the
median over rounds of that round's ratio. This machine's speed moves by up to 2× within a
minute, and rounds of a few hundred milliseconds put both sides of a ratio in the same
patch. (The previous design, 9 rounds of 1.5 s, measured HalfCheetah at 0.89 with 1 env
and 0.82 with 4 in one run, on code where the two do the same work per step.) The spread
of the per-round ratios is reported with it, and so is the ratio of the best rates (best
worker / best raw). All use the same env kwargs. Hopper is built with
``terminate_when_unhealthy=False`` so that episodes are long (1000 steps) whatever the
policy does: the figure is the per-step cost, not the reset cost. Prints a table and
writes JSON (with the CPU's flags) to ``bench/results/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from gogepo_ray.core.normalizer import ObsStats  # noqa: E402
from gogepo_ray.envs import make_env, policy_spec  # noqa: E402
from gogepo_ray.rollout import Rollouts  # noqa: E402
from gogepo_ray.sysinfo import cpu_info  # noqa: E402
from gogepo_ray.types import ParamBatch  # noqa: E402

LONG_EPISODES = {"Hopper-v5": {"terminate_when_unhealthy": False}}


class Raw:
    """Zero-action ``env.step`` calls on a plain ``gym.make`` env, resetting when an
    episode ends; the episode goes on from one round to the next."""

    def __init__(self, env_id: str, kwargs: dict) -> None:
        self.env = gym.make(env_id, **kwargs)
        self.action = np.zeros(self.env.action_space.shape, self.env.action_space.dtype)
        self.env.reset(seed=0)

    def rate(self, steps: int) -> float:
        env, action = self.env, self.action
        start = time.perf_counter()
        for _ in range(steps):
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        return steps / (time.perf_counter() - start)


class Replay(Raw):
    """The same plain env stepping through ``actions`` from a reset with ``seed``, over
    and over."""

    def __init__(self, env_id: str, kwargs: dict, seed: int, actions: list) -> None:
        super().__init__(env_id, kwargs)
        self.seed, self.actions, self.at = seed, actions, 0

    def rate(self, steps: int) -> float:
        env, actions, at = self.env, self.actions, self.at
        start = time.perf_counter()
        for _ in range(steps):
            if at == 0:
                env.reset(seed=self.seed)
            env.step(actions[at])
            at = (at + 1) % len(actions)
        self.at = at
        return steps / (time.perf_counter() - start)


def _worker(env_id: str, kwargs: dict, hidden: list[int], envs: int):
    """A worker's ``Rollouts`` with its envs built and compiled code loaded, and the
    training batch it runs: ``envs`` random policies (weights scaled by 1/sqrt(fan_in), as a
    fresh generator writes them) following master statistics from a short zero-action run."""
    spec = policy_spec(env_id, hidden, kwargs)
    rng = np.random.default_rng(0)
    parts = []
    for out, inp in spec.layer_shapes:
        parts += [rng.normal(0, 1 / np.sqrt(inp), (envs, out * inp)), np.zeros((envs, out))]
    params = np.concatenate(parts, axis=1).astype(np.float32)
    env = make_env(env_id, kwargs)
    obs = [env.reset(seed=0)[0]]
    for _ in range(99):
        obs.append(env.step(np.zeros(spec.act_dim, np.float32))[0])
    env.close()
    stats = ObsStats(spec.obs_dim)
    stats.update(np.stack(obs))
    rollouts = Rollouts(env_id, spec, env_kwargs=kwargs)

    def batch(i: int) -> ParamBatch:
        ids = np.arange(i, i + envs)
        return ParamBatch(
            "train", ids, ids, np.zeros(envs), params, stats.count, stats.mean, stats.m2
        )

    rollouts.run(batch(0))  # untimed: envs built, compiled code loaded
    return rollouts, batch


def worker_trajectory(env_id: str, kwargs: dict, hidden: list[int], envs: int) -> tuple:
    """(reset seed, actions) of the worker's first policy in one episode, for
    :class:`Replay`: the policy and reset seed of the first batch :func:`measure_row` runs."""
    rollouts, batch = _worker(env_id, kwargs, hidden, envs)
    actions: list[np.ndarray] = []

    class Record(gym.Wrapper):
        def step(self, action):
            actions.append(np.array(action))
            return self.env.step(action)

    rollouts.env = Record(rollouts.env)  # episodes run one after another: the first's come first
    first = batch(envs)
    length = int(rollouts.run(first).lengths[0])
    rollouts.close()
    return int(first.seeds[0]), actions[:length]


def measure_row(env_id: str, envs: int, hidden: list[int], rounds: int) -> dict:
    """``rounds`` rounds of one worker batch, then as many zero-action and replay steps
    as the batch took (order rotated each round), for one env and worker width; rates as
    medians, ratios as medians of per-round ratios."""
    kwargs = LONG_EPISODES.get(env_id, {})
    trajectory = worker_trajectory(env_id, kwargs, hidden, envs)  # the same every round
    rollouts, batch = _worker(env_id, kwargs, hidden, envs)
    meters = {"raw": Raw(env_id, kwargs), "replay": Replay(env_id, kwargs, *trajectory)}
    meters["raw"].rate(1000)  # untimed warm-up, as the worker had
    meters["replay"].rate(1000)
    raw, worker, replay, batch_steps = [], [], [], []
    steps = 0  # of the last worker batch; the first round's are measured first
    for k in range(rounds):
        got: dict[str, float] = {}
        for what in np.roll(["worker", "raw", "replay"], k):  # the worker first in round 0
            if what == "worker":
                start = time.perf_counter()
                steps = int(rollouts.run(batch(envs * (k + 1))).lengths.sum())
                got["worker"] = steps / (time.perf_counter() - start)
                batch_steps.append(steps)
            else:
                got[what] = meters[what].rate(steps)
        raw.append(got["raw"])
        worker.append(got["worker"])
        replay.append(got["replay"])
    rollouts.close()
    to_raw = [w / r for w, r in zip(worker, raw)]
    to_replay = [w / r for w, r in zip(worker, replay)]
    return {
        "env_id": env_id,
        "env_kwargs": kwargs,
        "envs_per_worker": envs,
        "raw_steps_per_second": round(statistics.median(raw), 1),
        "worker_steps_per_second": round(statistics.median(worker), 1),
        "replay_steps_per_second": round(statistics.median(replay), 1),
        "ratio": round(statistics.median(to_raw), 3),
        "ratio_range": [round(min(to_raw), 3), round(max(to_raw), 3)],
        "ratio_of_best": round(max(worker) / max(raw), 3),
        "ratio_to_replay": round(statistics.median(to_replay), 3),
        "ratio_to_replay_range": [round(min(to_replay), 3), round(max(to_replay), 3)],
        "raw_rounds": [round(r, 1) for r in raw],
        "worker_rounds": [round(w, 1) for w in worker],
        "replay_rounds": [round(r, 1) for r in replay],
        "worker_batch_steps": batch_steps,  # env steps of each round's worker batch
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", nargs="+", default=["HalfCheetah-v5", "Hopper-v5"])
    ap.add_argument("--envs", type=int, nargs="+", default=[1, 4], help="envs per worker")
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    ap.add_argument(
        "--rounds",
        type=int,
        default=60,
        help="rounds of one worker batch and as many raw and replay steps, in rotating order",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [
        measure_row(env_id, n, args.hidden, args.rounds) for env_id in args.env for n in args.envs
    ]
    result = {
        "bench": "throughput",
        "hidden": args.hidden,
        "rounds": args.rounds,
        "threads": 1,
        "cpu": cpu_info(),
        "rows": rows,
    }
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = (
        Path(args.out)
        if args.out
        else out_dir / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.write_text(json.dumps(result, indent=2))
    print(
        f"policy hidden {args.hidden}, 1 core, {args.rounds} rounds of one worker batch and "
        "as many zero-action and replay steps; ratios: median of the per-round ratios "
        "[lowest, highest round]"
    )
    print(
        f"{'env':>16} {'envs':>4} {'raw steps/s':>12} {'worker steps/s':>15} "
        f"{'worker/raw':>19} {'best/best':>9} {'replay steps/s':>15} {'worker/replay':>19}"
    )
    for r in rows:
        lo, hi = r["ratio_range"]
        lo2, hi2 = r["ratio_to_replay_range"]
        print(
            f"{r['env_id']:>16} {r['envs_per_worker']:>4} {r['raw_steps_per_second']:>12.0f} "
            f"{r['worker_steps_per_second']:>15.0f} "
            f"{r['ratio']:>6.2f} [{lo:.2f}, {hi:.2f}] {r['ratio_of_best']:>9.2f} "
            f"{r['replay_steps_per_second']:>15.0f} {r['ratio_to_replay']:>6.2f} [{lo2:.2f}, {hi2:.2f}]"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
