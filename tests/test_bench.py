"""bench/learner_step.py runs on the real Learner and writes what it prints."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
    assert result["env_id"] == "InvertedPendulum-v5"
    assert [(r["threads"], r["precision"]) for r in result["rows"]] == [(1, "fp32"), (1, "bf16")]
    for row in result["rows"]:
        assert row["critic_steps"] == 4 and row["generator_steps"] == 19  # the reference defaults
        assert 0 < row["seconds_per_episode_min"] <= row["seconds_per_episode_median"]
    assert "s/episode" in capsys.readouterr().out
