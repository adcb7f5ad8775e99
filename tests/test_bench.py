"""The benches run on the real parts (Learner, Rollouts, Trainer on a local Ray) and write
what they print. Tiny sizes and seconds: these check behaviour, not speed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learner_step_bench_writes_json(tmp_path, capsys):
    bench = _load("learner_step")
    out = tmp_path / "learner.json"
    tiny = [
        "policy.hidden=[16,16]",
        "generator.hidden=[16,16]",
        "critic.hidden=[16,16]",
        "critic.probing_states=8",
    ]
    rc = bench.main(
        [
            str(ROOT / "configs" / "inverted_pendulum.yaml"),
            "--threads",
            "1",
            "--precision",
            "fp32",
            "bf16",
            "--fill",
            "20",
            "--warmup",
            "0",
            "--repeats",
            "2",
            "--out",
            str(out),
            *[a for o in tiny for a in ("--set", o)],
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert {r["env_id"] for r in result["rows"]} == {"InvertedPendulum-v5"}
    assert "bf16_flags" in result["cpu"]
    # the threads torch ran with and the precision the learner resolved, read back from them
    assert [(r["threads"], r["precision"]) for r in result["rows"]] == [(1, "fp32"), (1, "bf16")]
    for row in result["rows"]:
        # optimiser steps per timed update, counted by the optimisers: the reference defaults
        assert row["critic_steps"] == 4 and row["generator_steps"] == 19
        assert 0 < row["seconds_per_episode_min"] <= row["seconds_per_episode_median"]
    assert "s/episode" in capsys.readouterr().out


def test_throughput_bench_measures_raw_and_worker_rates(tmp_path, capsys):
    bench = _load("throughput")
    out = tmp_path / "throughput.json"
    rc = bench.main(
        ["--env", "Pendulum-v1", "--envs", "1", "2", "--hidden", "8", "--rounds", "3",
         "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert [r["envs_per_worker"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        # Pendulum-v1 episodes are 200 steps: every worker batch ran envs_per_worker episodes
        assert row["worker_batch_steps"] == [200 * row["envs_per_worker"]] * 3, row
        raw, worker, replay = row["raw_rounds"], row["worker_rounds"], row["replay_rounds"]
        assert len(raw) == len(worker) == len(replay) == 3
        assert min(raw) > 0 and min(worker) > 0 and min(replay) > 0
        # ratios pair each round's worker with the same round's raw and replay
        to_raw = sorted(w / r for w, r in zip(worker, raw))
        to_replay = sorted(w / r for w, r in zip(worker, replay))
        assert row["ratio"] == pytest.approx(to_raw[1], abs=2e-3)
        assert row["ratio_range"] == pytest.approx([to_raw[0], to_raw[-1]], abs=2e-3)
        assert row["ratio_to_replay"] == pytest.approx(to_replay[1], abs=2e-3)
        assert row["ratio_of_best"] == pytest.approx(max(worker) / max(raw), abs=2e-3)
        assert row["worker_steps_per_second"] == sorted(worker)[1]
    assert "model" in result["cpu"] and "ratio" in capsys.readouterr().out


def test_learning_bench_profiles_parse_and_plot(tmp_path):
    bench = _load("learning")
    assert bench.parse_profile("paper=") == ("paper", [])
    assert bench.parse_profile("fast=policy.hidden=[] learner.updates_per_episode=0.25") == (
        "fast",
        ["policy.hidden=[]", "learner.updates_per_episode=0.25"],
    )
    with pytest.raises(SystemExit):
        bench.parse_profile("no-equals-sign")
    result = {
        "env_id": "pkg.module_with_a_long_name:SomeVeryLongEnvironmentClassName",
        "threshold": 100.0,
        "profiles": [
            {"name": n, "seeds": [{"seed": 0, "eval_history": [[0, 1.0, 2.0], [100, 50.0, 9.0]]}]}
            for n in ("paper", "fast")
        ],
    }
    png = bench.plot_profiles(result, tmp_path / "curves.png")
    assert png.stat().st_size > 10_000
    # --merge: profiles run by separate invocations, one table and one plot
    parts = []
    for profile in result["profiles"]:
        part = tmp_path / f"{profile['name']}.json"
        part.write_text(json.dumps({**result, "profiles": [profile]}))
        parts.append(str(part))
    assert bench.main(["--merge", *parts, "--out", str(tmp_path / "both.json")]) == 0
    both = json.loads((tmp_path / "both.json").read_text())
    assert [p["name"] for p in both["profiles"]] == ["paper", "fast"]
    assert (tmp_path / "both.png").stat().st_size > 10_000
    # more seeds of a profile, run later under another time cap, join that profile
    later = tmp_path / "fast-more.json"
    more = {**result["profiles"][1], "seeds": [{**result["profiles"][1]["seeds"][0], "seed": 1}]}
    later.write_text(json.dumps({**result, "max_minutes": 5, "profiles": [more]}))
    assert bench.main(["--merge", *parts, str(later), "--out", str(tmp_path / "all.json")]) == 0
    merged = json.loads((tmp_path / "all.json").read_text())
    assert [p["name"] for p in merged["profiles"]] == ["paper", "fast"]
    fast = merged["profiles"][1]["seeds"]
    assert [(s["seed"], s["max_minutes"]) for s in fast] == [(0, None), (1, 5)]


def test_context_bench_scripted_reference_reaches_the_goal():
    """The PointGoal yardstick: straight at the goal at full speed, then still; far better
    than standing still (return −100·distance), and none for families without one."""
    bench = _load("context")
    near = bench.scripted_return("PointGoal-v0", [0.3, 0.7])
    far = bench.scripted_return("PointGoal-v0", [-1.15, 1.15])
    assert -3.0 < near < -1.0  # 8 steps of travel, then 0 per step
    assert far < near
    assert far > -100 * (1.15**2 + 1.15**2) ** 0.5 / 5
    assert bench.scripted_return("HalfCheetahVel-v0", [1.0]) is None


@pytest.mark.e2e
def test_scaling_bench_runs_the_trainer_on_the_slow_env(tmp_path, ray_session):
    bench = _load("scaling")
    rows = [
        bench.measure(
            str(ROOT / "configs" / "slow_env.yaml"),
            ["env.kwargs.step_seconds=0.001", "env.kwargs.episode_steps=50", *TINY],
            w,
            0.25,
            3.0,
            str(tmp_path),
        )
        for w in (1, 2)
    ]
    for row in rows:
        assert row["env_steps"] > 0 and row["env_steps_per_second"] > 0
        assert 0 <= row["learner_busy"] <= 1.05
        # a quarter of a round per episode, give or take the group in flight at the ends
        assert row["rounds"] <= row["env_steps"] / 50 * 0.25 + 2
