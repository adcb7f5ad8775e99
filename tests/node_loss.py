"""Node-loss scenarios on a real multi-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``: one raylet per node), run by tests/test_node_loss.py as

    python -m tests.node_loss CASE OUT_DIR

in a process of its own: a Cluster needs a process without Ray, and the test bounds the
whole scenario with a timeout, so a hang fails the test instead of stalling CI. The
scenario writes ``OUT_DIR/result.json`` with what the test asserts.

Topology: the head node has no CPUs (the driver only). The learner's node ``L`` has one
CPU and is added first, so the learner (``learner.num_cpus=1``) can only go there; each
worker node has one CPU and is added once the learner runs, so each holds one rollout
worker. A node is killed without warning (``allow_graceful=False``), as a spot reclaim
does; the head's fast health checks notice within about 2 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from tests.conftest import ROOT, TINY

IP = str(ROOT / "configs" / "inverted_pendulum.yaml")
SETTINGS = [
    *TINY,
    "learner.num_cpus=1",
    "run.total_env_steps=3000",
    "run.checkpoint_every=1000",
    "run.eval_every=1000",
    "run.eval_episodes=2",
    "run.worker_placement_timeout_s=4",
]
HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
}


def start_cluster() -> tuple[Cluster, object]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": HEALTH},
    )
    learner_node = cluster.add_node(num_cpus=1)
    return cluster, learner_node


def kill(cluster: Cluster, node) -> None:
    cluster.remove_node(node, allow_graceful=False)


def learner_counters(trainer) -> dict:
    state = ray.get(trainer.learner.state_dict.remote())
    return state["counters"] | {
        "buffer_total_added": int(state["buffer"]["total_added"]),
        "buffer_size": len(state["buffer"]["returns"]),
        "obs_count": int(state["obs_stats"]["count"]),
    }


def in_process(case: str, out: Path) -> dict:
    """A Trainer in this process; the node goes at the first checkpoint after step 0."""
    from gogepo_ray.config import load_config
    from gogepo_ray.errors import TrainingError
    from gogepo_ray.trainer import Trainer

    cluster, learner_node = start_cluster()
    ray.init(address=cluster.address, log_to_driver=False)
    workers = 1 if case in ("learner_node", "no_worker_left") else 2
    # The learner's restart waits run.worker_placement_timeout_s for the new actor to be
    # placed and built (a process start and the torch import: several seconds on a slow
    # 2-core machine); the worker cases keep 4 s, the wait they are about.
    wait = ["run.worker_placement_timeout_s=60"] if case == "learner_node" else []
    cfg = load_config(IP, [*SETTINGS, f"run.workers={workers}", f"run.output_dir={out}", *wait])
    events: list[str] = []

    checkpoints: list[int] = []

    class KillAfterFirstCheckpoint:
        """A worker's node goes at the first checkpoint after step 0; the learner's node 300
        steps later, so that the episodes taken in since the checkpoint are lost."""

        def on_checkpoint(self, trainer, path):
            if trainer.progress.env_steps > 0:
                checkpoints.append(trainer.progress.env_steps)
            if case != "learner_node":
                self._kill(trainer)

        def on_train(self, trainer, stats):
            if (
                case == "learner_node"
                and checkpoints
                and trainer.progress.env_steps >= checkpoints[0] + 300
            ):
                self._kill(trainer)

        def _kill(self, trainer):
            if not checkpoints or events:
                return
            events.append(
                f"checkpoint at {checkpoints[0]}, node killed at {trainer.progress.env_steps}"
            )
            if case in ("spare_node", "learner_node"):
                cluster.add_node(num_cpus=1)
            kill(cluster, learner_node if case == "learner_node" else worker_nodes[-1])

        def __getattr__(self, event):  # every other event: nothing
            return lambda *args: None

    trainer = Trainer(cfg, run_dir=out / "run", callbacks=[KillAfterFirstCheckpoint()])
    worker_nodes = [cluster.add_node(num_cpus=1) for _ in range(workers)]
    result: dict = {"events": events}
    try:
        trainer.run_until(cfg.run.total_env_steps)
        result["summary"] = trainer.finish()
        result["learner"] = learner_counters(trainer)
    except TrainingError as exc:
        result["error"] = str(exc)
    finally:
        trainer.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return result


def cli(out: Path) -> dict:
    """`gogepo train` attached to the cluster through RAY_ADDRESS with
    run.max_learner_restarts=0; the learner's node goes once a checkpoint after step 0 is on
    disk. Then `gogepo train --resume` on the cluster with a new node."""
    from gogepo_ray import checkpoint as ckpt

    cluster, learner_node = start_cluster()
    env = os.environ | {"RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT)}
    run_dir = out / "run"
    sets = [*SETTINGS, "run.workers=1", "run.max_learner_restarts=0", f"run.output_dir={out}"]
    train = [sys.executable, "-m", "gogepo_ray", "train", "--no-progress"]
    first = subprocess.Popen(
        [*train, "--run-dir", str(run_dir), IP, *[x for s in sets for x in ("--set", s)]],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    result: dict = {}
    try:
        # the learner runs on L once the run directory has its step-0 checkpoint
        latest = run_dir / "checkpoints" / "latest.pt"
        deadline = time.monotonic() + 60
        while not latest.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        cluster.add_node(num_cpus=1)  # the worker's node
        while time.monotonic() < deadline:
            if latest.exists() and ckpt.load(latest)["progress"]["env_steps"] > 0:
                break
            time.sleep(0.1)
        result["checkpoint_steps"] = ckpt.load(latest)["progress"]["env_steps"]
        kill(cluster, learner_node)
        _, stderr = first.communicate(timeout=60)
        result["first"] = {"returncode": first.returncode, "stderr": stderr}
        cluster.add_node(num_cpus=1)  # room for a new learner
        second = subprocess.run(
            [*train, "--resume", str(run_dir)],
            cwd=out,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        result["resumed"] = {"returncode": second.returncode, "stderr": second.stderr[-3000:]}
        summary = run_dir / "summary.json"
        result["summary"] = json.loads(summary.read_text()) if summary.exists() else None
    finally:
        if first.poll() is None:
            first.kill()
        cluster.shutdown()
    return result


def main() -> None:
    case, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    result = cli(out) if case == "cli_learner_node" else in_process(case, out)
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
