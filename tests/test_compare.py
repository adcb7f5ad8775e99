"""`gogepo compare`: two tiny real runs of one config (seeds 0 and 1) and a third config,
plotted against env steps and wall-clock seconds; the CSV holds what is drawn. The reading
of older and resumed metrics files and the band maths are checked by hand."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gogepo_ray.analysis import compare
from gogepo_ray.analysis.plotting import fit_title
from tests.conftest import TINY, run_gogepo

ROOT = Path(__file__).resolve().parents[1]
IP = str(ROOT / "configs" / "inverted_pendulum.yaml")


def _evals(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/return_mean" in r]


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """Seeds 0 and 1 of one tiny config, trained; a third run, a copy of seed 0 whose config
    says another generator learning rate, stands for a second experiment."""
    from gogepo_ray.callbacks import JsonlMetrics
    from gogepo_ray.config import load_config
    from gogepo_ray.trainer import Trainer

    out = tmp_path_factory.mktemp("compare")
    dirs = []
    for seed in (0, 1):
        cfg = load_config(
            IP,
            [
                *TINY,
                "run.total_env_steps=400",
                "run.eval_every=150",
                "run.eval_episodes=1",
                "run.workers=1",
                "learner.updates_per_episode=0.25",  # learning is not what is tested
                "run.sweep_at_end=false",
                f"run.seed={seed}",
                f"run.output_dir={out}",
            ],
        )
        trainer = Trainer(cfg, run_dir=out / f"s{seed}", callbacks=[JsonlMetrics()])
        try:
            trainer.run_until(cfg.run.total_env_steps)
            trainer.finish()
        finally:
            trainer.shutdown()
        dirs.append(out / f"s{seed}")
    other = out / "lr"
    shutil.copytree(dirs[0], other)
    text = (other / "config.yaml").read_text()
    assert "  lr: 2.0e-06\n" in text
    (other / "config.yaml").write_text(text.replace("  lr: 2.0e-06\n", "  lr: 1.0e-05\n", 1))
    return [*dirs, other]


@pytest.mark.e2e
def test_eval_rows_carry_wall_clock_seconds(runs):
    for run_dir in runs[:2]:
        rows = _evals(run_dir)
        assert len(rows) >= 3  # two during training and the final one
        walls = [r["timers/wall_seconds"] for r in rows]
        assert all(w > 0 for w in walls) and walls == sorted(walls)


@pytest.mark.e2e
def test_compare_writes_png_and_csv_one_group_per_config(runs, tmp_path):
    out = tmp_path / "cmp" / "compare.png"
    proc = run_gogepo("compare", *map(str, runs), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with open(out.with_suffix(".csv"), newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == compare.CSV_COLUMNS
        rows = list(reader)
    labels = {r["group"]: r["label"] for r in rows}
    assert labels == {"0": "generator.lr=2e-06 (2 seeds)", "1": "generator.lr=1e-05"}
    assert {r["seeds"] for r in rows if r["group"] == "0"} == {"0;1"}
    assert {r["runs"] for r in rows if r["group"] == "1"} == {"lr"}

    # The seed group's steps panel: every step either seed was evaluated at, inside the
    # range both cover, mean and min-max of the two seeds interpolated there.
    curves = [compare.load_run(r) for r in runs[:2]]
    start = max(c.steps[0] for c in curves)
    end = min(c.steps[-1] for c in curves)
    grid = np.unique(np.concatenate([c.steps for c in curves]))
    grid = grid[(grid >= start) & (grid <= end)]
    steps = [r for r in rows if r["group"] == "0" and r["axis"] == "steps"]
    assert [float(r["x"]) for r in steps] == pytest.approx(grid.tolist())
    for r in steps:
        at = [np.interp(float(r["x"]), c.steps, c.returns) for c in curves]
        assert float(r["return_mean"]) == pytest.approx(np.mean(at), rel=1e-5)
        assert float(r["return_min"]) == pytest.approx(min(at), rel=1e-5)
        assert float(r["return_max"]) == pytest.approx(max(at), rel=1e-5)
        assert r["n_runs"] == "2"
    # the lone run of the other config: its own evaluations, as recorded
    lone = [r for r in rows if r["group"] == "1" and r["axis"] == "steps"]
    assert [float(r["x"]) for r in lone] == curves[0].steps.tolist()
    seconds = [float(r["x"]) for r in rows if r["group"] == "0" and r["axis"] == "seconds"]
    assert seconds and seconds == sorted(seconds) and seconds[0] > 0


@pytest.mark.e2e
def test_compare_bad_input_gives_one_error_line(runs, tmp_path):
    no_evals = tmp_path / "fresh"
    no_evals.mkdir()
    shutil.copy(runs[0] / "config.yaml", no_evals / "config.yaml")
    for args, needle in [
        ([str(tmp_path / "nope")], "not a run directory"),
        ([str(tmp_path)], "not a run directory (no config.yaml)"),
        ([str(runs[0]), str(no_evals)], "no evaluations recorded yet"),
    ]:
        proc = run_gogepo("compare", *args, "--out", str(tmp_path / "c.png"))
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not (tmp_path / "c.png").exists()


# ------------------------------------------------------------------ no Ray below


def _run_dir(path: Path, rows: list[dict], seed: int = 0) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"env:\n  id: InvertedPendulum-v5\nrun:\n  seed: {seed}\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_older_eval_rows_take_their_time_from_the_training_rows(tmp_path):
    rows = [
        {"train/env_steps": 100, "timers/wall_seconds": 10.0, "train/return": 1.0},
        {"train/env_steps": 200, "eval/return_mean": 5.0, "eval/return_std": 0.0},
        {"train/env_steps": 300, "timers/wall_seconds": 50.0, "train/return": 1.0},
        {"train/env_steps": 400, "eval/return_mean": 7.0, "eval/return_std": 0.0},
    ]
    run = compare.load_run(_run_dir(tmp_path / "old", rows))
    assert run.steps.tolist() == [200, 400]
    assert run.returns.tolist() == [5.0, 7.0]
    assert run.seconds[0] == pytest.approx(30.0)  # halfway between 10 s and 50 s
    assert np.isnan(run.seconds[1])  # after the last training row: not guessed


def test_a_resumed_run_keeps_the_evaluations_of_its_last_session(tmp_path):
    def ev(steps, mean, wall):
        return {"train/env_steps": steps, "eval/return_mean": mean, "timers/wall_seconds": wall}

    rows = [ev(100, 1, 10), ev(200, 2, 20), ev(300, 3, 30), ev(200, 20, 21), ev(300, 30, 31)]
    rows.insert(2, {"train/env_steps": 250, "eval/return_mean": "NaN"})  # all episodes failed
    run = compare.load_run(_run_dir(tmp_path / "resumed", rows))
    assert run.steps.tolist() == [100, 200, 300]
    assert run.returns.tolist() == [1, 20, 30]
    assert run.seconds.tolist() == [10, 21, 31]


def test_band_is_mean_and_range_on_the_common_grid():
    b = compare.band(
        [np.array([0.0, 10.0, 20.0]), np.array([5.0, 25.0])],
        [np.array([0.0, 10.0, 20.0]), np.array([10.0, 30.0])],
    )
    assert b.x.tolist() == [5.0, 10.0, 20.0]  # inside [5, 20], which both cover
    # run 1 at 5, 10, 20: 5, 10, 20; run 2: 10, 15, 25
    assert b.mean.tolist() == [7.5, 12.5, 22.5]
    assert b.low.tolist() == [5.0, 10.0, 20.0]
    assert b.high.tolist() == [10.0, 15.0, 25.0]
    assert b.n_runs.tolist() == [2, 2, 2]


def test_seeds_group_and_labels_name_the_difference(tmp_path):
    ev = [{"train/env_steps": 100, "eval/return_mean": 1.0, "timers/wall_seconds": 1.0}]
    a = compare.load_run(_run_dir(tmp_path / "a", ev, seed=0))
    b = compare.load_run(_run_dir(tmp_path / "b", ev, seed=1))
    c_dir = _run_dir(tmp_path / "c", ev, seed=2)
    (c_dir / "config.yaml").write_text("algorithm: ars\nrun:\n  seed: 2\n")
    c = compare.load_run(c_dir)
    groups = compare.group_runs([a, b, c])
    assert [len(g.runs) for g in groups] == [2, 1]
    assert [g.label for g in groups] == ["gogepo (2 seeds)", "ars"]


def test_long_titles_wrap_inside_the_width():
    env_id = "my_company_package.environments.locomotion:VeryLongHumanoidStandupEnvClass"
    text = f"{env_id}: command sweep (MAE 12.3)"
    wrapped = fit_title(text, 4.0, 12)
    width = int(4.0 * 72 / (0.6 * 12))
    assert all(len(line) <= width for line in wrapped.splitlines())
    assert len(wrapped.splitlines()) > 1
    assert wrapped.replace("\n", "").replace(" ", "") == text.replace(" ", "")
    assert fit_title("Hopper-v5", 4.0) == "Hopper-v5"
