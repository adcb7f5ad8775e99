"""A user's mistakes: one clear `error:` line naming the problem, a non-zero exit, no
traceback, and no Ray cluster started. Checkpoints load without executing pickled code,
and a crash while writing one leaves the previous one intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gogepo_ray import checkpoint as ckpt
from gogepo_ray.config import load_config
from gogepo_ray.core.learner import Learner
from gogepo_ray.envs import policy_spec
from tests.conftest import ROOT, TINY

IP = str(ROOT / "configs" / "inverted_pendulum.yaml")

# `python -m gogepo_ray`, except that the first `import ray` replaces ray.init and Ray's
# Node (what every start of, or connection to, a Ray instance goes through, ray.init's
# automatic calls included) with a stop: exit status 86 and a line that says so.
NO_RAY = """
import importlib.abc, importlib.machinery, os, runpy, sys

def ray_started(*args, **kwargs):
    sys.stderr.write("NO_RAY guard: the command started or joined Ray\\n")
    sys.stderr.flush()
    os._exit(86)

class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "ray":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            import ray._private.node
            module.init = ray_started
            ray._private.node.Node.__init__ = ray_started

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, NoRay())
runpy.run_module("gogepo_ray", run_name="__main__", alter_sys=True)
"""


def gogepo(
    *args: str, cwd: Path, no_ray: bool = True, pythonpath: str = str(ROOT)
) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; with ``no_ray`` any start of Ray ends it (status 86)."""
    start = ["-c", NO_RAY] if no_ray else ["-m", "gogepo_ray"]
    return subprocess.run(
        [sys.executable, *start, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONPATH": pythonpath},
    )


def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert "NO_RAY guard" not in res.stderr, res.stderr[-2000:]  # rejected before Ray started
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert res.stderr.startswith("error:") or "\nerror:" in res.stderr, res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)
    assert "Traceback" not in res.stderr


def test_no_ray_guard_stops_a_command_that_starts_ray(tmp_path):
    """The guard above catches a real start: a valid `gogepo train` gets as far as ray.init."""
    sets = [a for s in [*TINY, f"run.output_dir={tmp_path}"] for a in ("--set", s)]
    res = gogepo("train", IP, *sets, "--no-progress", cwd=tmp_path)
    assert res.returncode == 86, (res.returncode, res.stderr[-2000:])
    assert "NO_RAY guard: the command started or joined Ray" in res.stderr


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("generator.lrr=1e-5", ["generator.lrr", "unknown key"]),
        ("run.workers=-1", ["run.workers", "greater than or equal to 1"]),
        ("run.workers=two", ["run.workers", "integer"]),
        ("generator.batch_size=0", ["generator.batch_size"]),
        ("critic.lr=0", ["critic.lr", "greater than 0"]),
        ("generator.lr=-1e-6", ["generator.lr"]),
        ("env.id=NoSuchEnv-v9", ["env.id 'NoSuchEnv-v9'", "unknown env id"]),
        (
            "env.id=CartPole-v1",
            ["env.id 'CartPole-v1'", "action space must be a Box, got Discrete"],
        ),
        ("env.id=tests.fault_envs:Missing", ["has no attribute 'Missing'"]),
        ("env.return_max=-500", ["return_max must be greater than return_min"]),
        ("nonsense", ["must look like section.key=value"]),
    ],
)
def test_bad_config_values(override, needles, tmp_path):
    assert_user_error(gogepo("train", IP, "--set", override, cwd=tmp_path), *needles)


def test_dict_observation_space_is_rejected(tmp_path):
    (tmp_path / "dict_env.py").write_text(
        "import gymnasium as gym, numpy as np\n"
        "class DictEnv(gym.Env):\n"
        "    observation_space = gym.spaces.Dict({'a': gym.spaces.Box(-1, 1, (2,))})\n"
        "    action_space = gym.spaces.Box(-1, 1, (1,))\n"
    )
    res = gogepo(
        "train",
        IP,
        "--set",
        "env.id=dict_env:DictEnv",
        cwd=tmp_path,
        pythonpath=f"{tmp_path}{os.pathsep}{ROOT}",
    )
    assert_user_error(res, "observation space must be a Box, got Dict")


def test_malformed_yaml_and_missing_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("env:\n  id: Hopper-v5\n   return_max: [1,\n")
    assert_user_error(gogepo("train", str(bad), cwd=tmp_path), "bad.yaml is not valid YAML")
    assert_user_error(
        gogepo("train", str(tmp_path / "nope.yaml"), cwd=tmp_path), "config file not found"
    )
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert_user_error(
        gogepo("train", str(tmp_path / "list.yaml"), cwd=tmp_path), "must hold a mapping"
    )


def test_binary_config_file(tmp_path):
    """A file that is not text (a checkpoint passed by mistake, say): one error line."""
    blob = tmp_path / "model.pt"
    blob.write_bytes(b"PK\x03\x04\x00\x00\xff\xfe\x80" + bytes(range(256)))
    res = gogepo("train", str(blob), cwd=tmp_path)
    assert_user_error(res, "model.pt is not a text file", "YAML")
    assert "UnicodeDecodeError" not in res.stderr


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint written by the Learner (no Ray needed)."""
    out = tmp_path_factory.mktemp("ck")
    cfg = load_config(IP, TINY)
    learner = Learner(cfg, policy_spec(cfg.env.id, cfg.policy.hidden))
    state = ckpt.payload(cfg=cfg, learner=learner.state_dict(), progress={"env_steps": 0})
    return ckpt.save(out / "checkpoints" / "final.pt", state)


def test_checkpoint_errors(small_checkpoint, tmp_path):
    assert_user_error(
        gogepo("eval", str(tmp_path / "missing.pt"), cwd=tmp_path), "checkpoint not found"
    )
    assert_user_error(gogepo("eval", str(tmp_path), cwd=tmp_path), "no checkpoint in")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(small_checkpoint.read_bytes()[:5000])
    assert_user_error(gogepo("eval", str(truncated), cwd=tmp_path), "not a readable checkpoint")
    # a checkpoint whose weights belong to another architecture than its config says
    payload = ckpt.load(small_checkpoint)
    payload["config"]["policy"]["hidden"] = [24, 24]
    other = ckpt.save(tmp_path / "other.pt", payload)
    assert_user_error(
        gogepo(
            "export", str(other), "--command", "1", "--out", str(tmp_path / "p.pt"), cwd=tmp_path
        ),
        "does not match its env/architecture",
    )
    # and one for another env
    payload = ckpt.load(small_checkpoint)
    payload["config"]["env"]["id"] = "Hopper-v5"
    other_env = ckpt.save(tmp_path / "hopper.pt", payload)
    assert_user_error(
        gogepo("eval", str(other_env), cwd=tmp_path), "does not match its env/architecture"
    )
    assert_user_error(
        gogepo("train", "--resume", str(tmp_path / "no-such-run"), cwd=tmp_path),
        "run directory not found",
    )


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "x": Evil()}, path)
    with pytest.raises(ckpt.CheckpointError, match="not a readable checkpoint"):
        ckpt.load(path)
    assert not (tmp_path / "pwned").exists()


def test_crash_while_writing_keeps_the_previous_checkpoint(small_checkpoint, tmp_path, monkeypatch):
    target = tmp_path / "latest.pt"
    good = ckpt.load(small_checkpoint)
    ckpt.save(target, good)

    def crash(obj, fh, *a, **k):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        ckpt.save(target, good)
    monkeypatch.undo()
    again = ckpt.load(target)
    assert torch.equal(
        again["learner"]["generator"]["embeddings.0"], good["learner"]["generator"]["embeddings.0"]
    )


def test_cuda_learner_without_a_gpu_stops_instead_of_waiting(tmp_path):
    """Ray would queue a GPU actor forever on a machine without one: the run stops at once
    with one error line naming the missing GPU (this check needs Ray up to count GPUs)."""
    sets = [a for s in TINY for a in ("--set", s)]
    res = gogepo(
        "train", IP, *sets, "--set", "learner.device=cuda", "--set", f"run.output_dir={tmp_path}",
        "--no-progress", cwd=tmp_path, no_ray=False,
    )  # fmt: skip
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "error: learner.device=cuda needs a GPU" in res.stderr, res.stderr[-2000:]
    assert "0 GPUs" in res.stderr and "learner.device=cpu" in res.stderr
    assert "Traceback" not in res.stderr


def test_checkpoint_of_a_gpu_learner_is_used_on_a_machine_without_one(small_checkpoint, tmp_path):
    """A run trained with learner.device=cuda is exported and evaluated on a laptop: the
    local learner falls back to the CPU instead of failing in torch. The checkpoint is
    written as a GPU learner writes one: tensors on the CPU (tests/test_gpu.py checks that)
    and Adam groups saved with capturable=True, which a CPU step refuses."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the checkpoint's device is usable as it is")
    payload = ckpt.load(small_checkpoint)
    payload["config"]["learner"]["device"] = "cuda"
    for opt in ("generator_opt", "critic_opt"):
        for group in payload["learner"][opt]["param_groups"]:
            group["capturable"] = True
    gpu_run = ckpt.save(tmp_path / "gpu.pt", payload)
    out = tmp_path / "policy.pt"
    res = gogepo("export", str(gpu_run), "--command", "1", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.is_file()


# On a Ray instance that declares one GPU (real or not): the GPU is taken by another actor,
# so the learner actor can only wait, and its pending request shows what it asked Ray for;
# then the GPU is freed and the learner starts, or on a machine without CUDA fails in torch.
CUDA_LEARNER_ON_A_DECLARED_GPU = """
import json, sys, time
import ray
from ray.autoscaler.v2.sdk import get_cluster_status
from gogepo_ray.config import load_config
from gogepo_ray.distributed.actors import check_learner_gpu, learner_actor
from gogepo_ray.envs import policy_spec

cfg = load_config(sys.argv[1], sys.argv[2:])
ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
         configure_logging=False)
check_learner_gpu(cfg, local=True)  # a GPU is declared: no error

@ray.remote(num_gpus=1, num_cpus=0)
class HoldsTheGPU:
    def ready(self):
        return True

holder = HoldsTheGPU.remote()
ray.get(holder.ready.remote())
learner = learner_actor(cfg, policy_spec(cfg.env.id, cfg.policy.hidden))
pending, deadline = [], time.monotonic() + 90
while not pending and time.monotonic() < deadline:
    demand = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands
    pending = [dict(r.bundle) for d in demand.ray_task_actor_demand for r in d.bundles_by_count]
    time.sleep(0.5)
ray.kill(holder)
try:
    ray.get(learner.pid.remote(), timeout=180)
    outcome = "started"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {exc}"
print(json.dumps({"pending": pending, "outcome": outcome}))
"""


def test_cuda_learner_asks_ray_for_one_gpu(tmp_path):
    sets = [*TINY, "learner.device=cuda", "learner.num_cpus=2"]
    res = subprocess.run(
        [sys.executable, "-c", CUDA_LEARNER_ON_A_DECLARED_GPU, IP, *sets],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # While the GPU was taken, Ray held exactly the learner's request: its CPUs and one GPU.
    assert out["pending"] == [{"CPU": 2.0, "GPU": 1.0}], out
    # Once the GPU was free Ray placed the learner: it runs on a CUDA machine; elsewhere the
    # error is torch's, about CUDA, not Ray's about resources.
    if not torch.cuda.is_available():
        assert "ActorDiedError" in out["outcome"] and "CUDA" in out["outcome"], out["outcome"]
    else:
        assert out["outcome"] == "started", out["outcome"]
