"""`gogepo serve` end to end: real Ray Serve on a real local Ray, HTTP on loopback.

A short InvertedPendulum-v5 run is trained once (tiny networks, every checkpoint kept),
and one service serves a copy of its run directory with ``--follow``; an untrained
PointGoal-v0 checkpoint (a task family) is served beside it under /family. The last test
replaces the followed checkpoint while a thread keeps asking for actions.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from gogepo_ray import checkpoint as ckpt
from gogepo_ray import cli
from gogepo_ray.export import load_policy
from gogepo_ray.integrations.serve import (
    Client,
    ServeSettings,
    Service,
    free_ports,
    run_episode,
)
from gogepo_ray.trainer import Callback
from gogepo_ray.types import episode_seed
from tests.conftest import ROOT, TINY, train_to_end

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-token"
STEPS = 1500
BODY_LIMIT = 16384


class KeepCheckpoints(Callback):
    """Copies every checkpoint the run writes (latest.pt is overwritten each time)."""

    def __init__(self, out: Path) -> None:
        self.out, self.paths = out, []

    def on_checkpoint(self, trainer, path: Path) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        dest = self.out / f"{len(self.paths)}-{path.name}"
        shutil.copy(path, dest)
        self.paths.append(dest)


def replace_atomically(src: Path, dest: Path) -> None:
    """As a training run writes a checkpoint: a temporary file renamed over it."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copy(src, tmp)
    os.replace(tmp, dest)


@pytest.fixture(scope="module")
def ray_local():
    import ray
    from ray import serve

    os.environ.pop("RAY_ADDRESS", None)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    serve.shutdown()
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    from gogepo_ray.config import load_config

    out = tmp_path_factory.mktemp("serve-run")
    cfg = load_config(
        ROOT / "configs" / "inverted_pendulum_fast.yaml",
        [
            *TINY,
            "run.workers=1",
            "learner.num_cpus=1",
            f"run.total_env_steps={STEPS}",
            "run.eval_every=500",
            "run.checkpoint_every=500",
            f"run.output_dir={out}",
        ],
    )
    kept = KeepCheckpoints(out / "kept")
    summary, _ = train_to_end(cfg, [kept])
    # the run directory being followed: latest.pt only, as in a run in progress
    served = out / "served"
    (served / "checkpoints").mkdir(parents=True)
    shutil.copy(
        Path(summary["run_dir"]) / "checkpoints" / "final.pt", served / "checkpoints" / "latest.pt"
    )
    return {"cfg": cfg, "served": served, "kept": kept.paths}


@pytest.fixture(scope="module")
def family_checkpoint(tmp_path_factory) -> Path:
    """An untrained task-family checkpoint: a learner's state saved as training saves it."""
    from gogepo_ray.algorithms import make_learner
    from gogepo_ray.config import load_config
    from gogepo_ray.envs import policy_spec

    cfg = load_config(ROOT / "configs" / "point_goal.yaml", TINY)
    learner = make_learner(cfg, policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs))
    path = tmp_path_factory.mktemp("family") / "checkpoints" / "latest.pt"
    return ckpt.save(path, ckpt.payload(cfg=cfg, learner=learner.state_dict(), progress={}))


@pytest.fixture(scope="module")
def service(trained, family_checkpoint):
    settings = ServeSettings(port=free_ports(1)[0], token=TOKEN, max_body_bytes=BODY_LIMIT)
    svc = Service(trained["served"], "latest", settings)
    url = svc.start()
    family = Service(family_checkpoint, None, settings, app_name="family", route_prefix="/family")
    family.start()
    stop = threading.Event()
    follower = threading.Thread(target=svc.follow, args=(stop, 0.5), daemon=True)
    follower.start()
    client = Client(url, TOKEN)
    yield {"svc": svc, "url": url, "client": client, "family": Client(family.url, TOKEN)}
    stop.set()
    follower.join(timeout=120)
    family.stop()
    svc.stop()


def export_cli(tmp_path: Path, source, command: float, *extra: str) -> Path:
    """`gogepo export`, as a user runs it (in this process: the same code path), to a file
    named policy.pt as the service's: torch.save records the file's stem in the zip."""
    out = tmp_path / f"export-{command:g}-{time.monotonic_ns()}" / "policy.pt"
    assert (
        cli.main(["export", str(source), "--command", str(command), *extra, "--out", str(out)]) == 0
    )
    return out


def test_policy_is_bit_equal_to_gogepo_export(service, trained, tmp_path):
    client = service["client"]
    info = client.info()
    command = info["command_range"]["eval_command"]
    exported = export_cli(tmp_path, trained["served"], command, "--checkpoint", "latest")
    assert client.policy_file(command) == exported.read_bytes()  # the very file
    blob = torch.load(exported, weights_only=True)
    got = client.policy(command)
    assert "warning" not in got
    for key, value in blob.items():
        if key == "state_dict":
            continue
        assert got[key] == value, key
    assert got["state_dict"].keys() == blob["state_dict"].keys()
    for name, tensor in blob["state_dict"].items():
        assert got["shapes"][name] == list(tensor.shape)
        assert torch.equal(torch.tensor(got["state_dict"][name], dtype=torch.float32), tensor), name
    assert len(got["obs_mean"]) == len(got["obs_std"]) == info["observation_space"]["shape"][0]
    assert got["action_low"] == info["action_space"]["low"] == [-3.0]


def test_info_describes_env_spaces_and_checkpoint(service, trained):
    info = service["client"].info()
    assert info["env"]["id"] == "InvertedPendulum-v5" and info["algorithm"] == "gogepo"
    assert info["observation_space"]["shape"] == [4] and info["action_space"]["shape"] == [1]
    low, high = info["command_range"]["trained"]
    assert low <= high and info["command_range"]["configured"] == [0.0, 1000.0]
    assert info["context"] is None
    c = info["checkpoint"]
    path = trained["served"] / "checkpoints" / "latest.pt"
    assert c["file"] == "latest.pt" and c["mtime_ns"] == path.stat().st_mtime_ns
    assert c["env_steps"] >= STEPS and c["eval_return"] is not None
    assert info["serving"]["host"] == "127.0.0.1" and info["serving"]["auth"] is True
    assert "token" not in json.dumps(info["serving"]).replace("token_sha256", "")


def test_out_of_range_command_is_served_with_a_warning(service):
    client = service["client"]
    high = client.info()["command_range"]["trained"][1]
    got = client.policy(high + 5000)
    assert "outside the returns seen in training" in got["warning"]
    status, body, _ = client.request(
        "POST", "/act", {"command": high + 5000, "observations": [[0.0] * 4]}
    )
    assert status == 200 and len(body["actions"]) == 1 and "warning" in body


def test_act_matches_the_exported_policy(service, trained, tmp_path):

    client = service["client"]
    command = client.info()["command_range"]["eval_command"]
    policy = load_policy(export_cli(tmp_path, trained["served"], command, "--checkpoint", "latest"))
    obs = np.random.default_rng(0).normal(0, 0.3, size=(64, 4)).astype(np.float32)
    with torch.no_grad():
        want = policy(torch.from_numpy(obs)).numpy()
    got = client.act(command, obs)
    assert got.shape == (64, 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # concurrent one-observation requests: batched on the replica, each its own answer
    before = client.info()["serving"]
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(16)

    def ask(i: int) -> None:
        c = Client(service["url"], TOKEN)
        barrier.wait()
        for j in range(i, 64, 16):
            results[j] = c.act(command, obs[j : j + 1])[0]
        c.close()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_allclose(np.stack([results[j] for j in range(64)]), want, rtol=0, atol=1e-6)
    after = client.info()["serving"]
    requests = after["act_requests"] - before["act_requests"]
    assert requests == 64 and after["act_batches"] - before["act_batches"] < requests
    assert after["cache_hits"] > before["cache_hits"]


def test_episode_through_act_scores_like_gogepo_eval(service, trained, capsys):

    client = service["client"]
    command = client.info()["command_range"]["eval_command"]
    episodes = 3
    capsys.readouterr()
    args = ["eval", str(trained["served"]), "--checkpoint", "latest", "--command", str(command)]
    assert cli.main([*args, "--episodes", str(episodes), "--json"]) == 0
    want = json.loads(capsys.readouterr().out)["return_mean"]
    # the reset seeds `gogepo eval` gave its episodes
    payload = ckpt.load(trained["served"], "latest")
    first = payload["learner"]["counters"]["next_eval_id"]
    seeds = [episode_seed(trained["cfg"].run.seed, "eval", first + i) for i in range(episodes)]
    got = np.mean([run_episode(client, command, seed=s).ret for s in seeds])
    # the same policy and start states: /act runs the torch module, eval the workers'
    # compiled path (actions within about 1e-6), and the episodes have matched step for
    # step; the margin allows an episode to end a step apart
    assert abs(got - want) <= 0.1 * abs(want) + 1, (got, want)


def test_family_context_is_checked_and_exported(service, family_checkpoint, tmp_path):
    client = service["family"]
    info = client.info()
    assert info["context"]["names"] and len(info["context"]["heldout"]) == 9
    context = info["context"]["heldout"][0]
    out = tmp_path / "family" / "policy.pt"
    args = ["export", str(family_checkpoint), "--command", "-20", "--context", *map(str, context)]
    assert cli.main([*args, "--out", str(out)]) == 0
    assert client.policy_file(-20.0, context) == out.read_bytes()
    got = client.policy(-20.0, context)
    assert "untrained" in got["warning"]  # no training episode in this checkpoint
    for body, field in [
        ({"command": -20.0}, "context"),
        ({"command": -20.0, "context": [5.0, 5.0]}, "context"),  # outside the family's space
        ({"command": -20.0, "context": [0.1]}, "context"),
        ({"command": -20.0, "context": [0.1, True]}, "context"),
    ]:
        status, err, _ = client.request("POST", "/policy", body)
        assert (status, err["field"]) == (400, field), (body, err)
    assert client.act(-20.0, [[0.0, 0.0]], context).shape == (1, 2)


BAD_ACT = [
    ({"observations": [[0.0] * 4]}, "command"),
    (b'{"command": NaN, "observations": [[0, 0, 0, 0]]}', "command"),
    (b'{"command": 1e999, "observations": [[0, 0, 0, 0]]}', "command"),
    ({"command": "high", "observations": [[0.0] * 4]}, "command"),
    ({"command": True, "observations": [[0.0] * 4]}, "command"),
    ({"command": 10.0}, "observations"),
    ({"command": 10.0, "observations": []}, "observations"),
    ({"command": 10.0, "observations": [[0.0] * 3]}, "observations"),  # obs_dim is 4
    ({"command": 10.0, "observations": [[0.0] * 4, [0.0] * 3]}, "observations"),
    ({"command": 10.0, "observations": [["a", 0, 0, 0]]}, "observations"),
    ({"command": 10.0, "observations": [0.0] * 4}, "observations"),
    (b'{"command": 10, "observations": [[0, NaN, 0, 0]]}', "observations"),
    ({"command": 10.0, "context": [0.5], "observations": [[0.0] * 4]}, "context"),
    ({"command": 10.0, "observations": [[0.0] * 4], "obs": 1}, "obs"),
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    ({"command": 10.0, "observations": [[0.0] * 4] * 2000}, "body"),  # > BODY_LIMIT bytes
]
BAD_POLICY = [
    ({}, "command"),
    (b'{"command": Infinity}', "command"),
    ({"command": [10.0]}, "command"),
    ({"command": 10.0, "context": [0.5]}, "context"),  # not a task family
    ({"comand": 10.0}, "comand"),
    (b"", "body"),
    (b'"command"', "body"),
    ({"command": 10.0, "pad": "x" * 2 * BODY_LIMIT}, "body"),
]


@pytest.mark.parametrize("path, cases", [("/act", BAD_ACT), ("/policy", BAD_POLICY)])
def test_bad_requests_get_400_naming_the_field_and_the_replica_survives(service, path, cases):
    client = service["client"]
    for body, field in cases:
        raw = body if isinstance(body, bytes) else None
        status, err, _ = client.request("POST", path, None if raw is not None else body, raw=raw)
        assert (status, err.get("field")) == (400, field), (path, body, status, err)
        assert err["error"]
        assert client.act(10.0, [[0.0] * 4]).shape == (1, 1)  # the next good one works


def test_a_token_is_needed_everywhere_but_healthz(service):

    for token in (None, "wrong"):
        c = Client(service["url"], token)
        for method, path, body in [
            ("GET", "/info", None),
            ("POST", "/policy", {"command": 10.0}),
            ("POST", "/act", {"command": 10.0, "observations": [[0.0] * 4]}),
        ]:
            status, err, headers = c.request(method, path, body)
            assert status == 401 and err["field"] == "Authorization", (token, path)
            assert headers["WWW-Authenticate"] == "Bearer"
        assert c.healthz() == {"status": "ok"}
        c.close()
    # nothing else answers without a token: no API docs on the service
    assert Client(service["url"]).request("GET", "/docs")[0] == 404


def test_a_second_service_does_not_replace_the_first(service, trained):
    from gogepo_ray.config import ConfigError

    settings = ServeSettings(port=service["svc"].settings.port)
    with pytest.raises(ConfigError, match="already runs"):
        Service(trained["served"], "latest", settings).start()
    assert service["client"].healthz() == {"status": "ok"}


def test_serve_cli_refuses_mistakes_before_starting_anything(trained, tmp_path, capsys):
    served = str(trained["served"])
    for args, words in [
        ([served, "--port", "0"], "--port"),
        ([served, "--replicas", "0"], "--replicas"),
        ([served, "--num-cpus", "0"], "--num-cpus"),
        ([served, "--token", ""], "--token"),
        ([served, "--ingress", "nginx"], "--ingress"),
        ([str(tmp_path / "nope")], "not found"),
        ([served, "--checkpoint", "best"], "no best checkpoint"),
    ]:
        capsys.readouterr()
        assert cli.main(["serve", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, (args, err)


class Cli(NamedTuple):
    proc: subprocess.Popen
    url: str
    stderr: list[str]  # its lines so far, read by a thread while it runs


def start_cli(served: Path, port: int, *extra: str) -> Cli:
    """`gogepo serve` in a new process, as a user runs it; its URL from stdout."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "GOGEPO_SERVE_TOKEN": TOKEN
    }
    args = [str(served), "--checkpoint", "latest", "--port", str(port), *extra]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gogepo_ray", "serve", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    try:
        url = lines.get(timeout=180).strip()
    except queue.Empty:
        url = ""
    if not url:
        proc.kill()
        proc.wait()
        pytest.fail(f"gogepo serve printed no URL: {''.join(err)[-3000:]}")
    return Cli(proc, url, err)


def haproxy_stats_port(cli: Cli) -> int:
    """The stats port `gogepo serve --ingress haproxy` says it gave HAProxy (stderr)."""
    deadline = time.monotonic() + 30
    while not (found := re.search(r":(\d+)/stats", "".join(cli.stderr))):
        assert time.monotonic() < deadline, "".join(cli.stderr)[-2000:]
        time.sleep(0.2)
    return int(found.group(1))


@pytest.mark.parametrize("ingress", ["proxy", "haproxy"])
def test_cli_serves_until_interrupted_and_shuts_down(trained, ingress):
    """`gogepo serve` as a user runs it: its own local Ray, the URL on stdout, the token
    from the environment, and Ctrl-C (SIGINT) stopping Serve and Ray with status 0. With
    HAProxy two services run side by side (Serve's fixed HAProxy stats and metrics ports
    would make the second crash), each with HAProxy's stats page on the port it printed."""
    count = 2 if ingress == "haproxy" else 1
    clis: list[Cli] = []
    try:
        for _ in range(count):
            port = free_ports(1)[0]
            clis.append(start_cli(trained["served"], port, "--ingress", ingress))
            assert clis[-1].url == f"http://127.0.0.1:{port}"
        for cli in clis:
            assert Client(cli.url).request("GET", "/info")[0] == 401
            info = Client(cli.url, TOKEN).info()
            assert info["checkpoint"]["file"] == "latest.pt"
            assert info["serving"]["ingress"] == ingress  # as the replica's Ray runs it
        if ingress == "haproxy":
            stats = [haproxy_stats_port(cli) for cli in clis]
            assert len(set(stats)) == count, stats
            for port in stats:  # HAProxy itself answers there
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as r:
                    assert r.status == 200 and b"HAProxy" in r.read()
        for cli in clis:
            cli.proc.send_signal(signal.SIGINT)
        for cli in clis:
            assert cli.proc.wait(timeout=120) == 0
    finally:
        for cli in clis:
            if cli.proc.poll() is None:
                cli.proc.kill()
                cli.proc.wait()
    time.sleep(0.5)  # the reader threads take the last lines
    for cli in clis:
        err = "".join(cli.stderr)
        assert "stopping" in err
        assert ("ingress: HAProxy" in err) == (ingress == "haproxy"), err[-2000:]
        with pytest.raises(OSError):  # nothing listens there any more
            Client(cli.url, TOKEN, timeout=5).healthz()


def test_haproxy_is_refused_where_the_replicas_run_the_proxy(service, trained):
    """The ingress is fixed where Ray starts and is read off a replica: --ingress haproxy on
    a Ray that runs Serve's Python proxy is an error that says so, the application it
    deployed is deleted again, and the service beside it goes on answering."""
    from ray import serve

    from gogepo_ray.config import ConfigError

    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        pytest.skip("the tests' Ray runs HAProxy")
    settings = ServeSettings(port=service["svc"].settings.port, token=TOKEN, ingress="haproxy")
    asked = Service(trained["served"], "latest", settings, app_name="asked", route_prefix="/asked")
    with pytest.raises(ConfigError, match="runs Serve's Python proxy"):
        asked.start()
    assert "asked" not in serve.status().applications
    assert service["client"].info()["serving"]["ingress"] == "proxy"


def test_follow_swaps_the_checkpoint_while_requests_continue(service, trained, tmp_path):

    client = service["client"]
    command = client.info()["command_range"]["eval_command"]
    target = trained["served"] / "checkpoints" / "latest.pt"
    old = client.info()["checkpoint"]
    answered, failed, stop = [], [], threading.Event()

    def keep_asking() -> None:
        c = Client(service["url"], TOKEN)
        while not stop.is_set():
            try:
                answered.append(c.act(command, [[0.01, 0.0, 0.0, 0.0]])[0, 0])
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                failed.append(repr(exc))
                c.close()
        c.close()

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        time.sleep(0.5)
        replace_atomically(trained["kept"][0], target)  # the run's first checkpoint
        new_mtime = target.stat().st_mtime_ns
        deadline = time.monotonic() + 120
        while client.info()["checkpoint"]["mtime_ns"] != new_mtime:
            assert time.monotonic() < deadline, "the new checkpoint was not picked up"
            time.sleep(0.25)
        before_stop = len(answered)
        time.sleep(1.0)
    finally:
        stop.set()
        asker.join(timeout=60)
    assert not failed, failed[:5]
    assert before_stop > 10 and len(answered) > before_stop
    while service["svc"].reloads == 0:  # the redeploy returns once the old replicas stop
        assert time.monotonic() < deadline, "the redeploy did not finish"
        time.sleep(0.25)
    assert service["svc"].reloads == 1
    new = client.info()["checkpoint"]
    assert new["env_steps"] < old["env_steps"] and new["mtime_ns"] == new_mtime
    # all answers come from the new checkpoint now, and it is what gogepo export writes
    exported = export_cli(tmp_path, trained["served"], command, "--checkpoint", "latest")
    assert client.policy_file(command) == exported.read_bytes()
