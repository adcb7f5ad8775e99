"""``gogepo compare``: evaluation return of several runs against training env steps and
against wall-clock seconds, with the plotted numbers in a CSV beside the plot.

A run directory holds its evaluations in ``metrics.jsonl`` (rows with ``eval/return_mean``
at ``train/env_steps``, and ``timers/wall_seconds`` since that column was added) and, once
finished, in ``summary.json`` (``eval_history``). For older rows without a wall-clock time
the time is interpolated from the training rows (``train/env_steps`` against
``timers/wall_seconds``), which the metrics file has always had.

Runs whose configs differ only in ``run.seed`` (and in where and under which name they were
written and tracked: ``run.output_dir``, ``run.name``, ``tracking.*``) are one group,
drawn as the mean over its runs with a band from the lowest to the highest run. The runs of
a group are interpolated linearly onto one x grid: every x at which one of them was
evaluated, within the range all of them cover.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gogepo_ray.analysis.plotting import fit_title

# Config keys that do not make two runs a different experiment.
SAME_EXPERIMENT = ("run.seed", "run.name", "run.output_dir")
SAME_EXPERIMENT_SECTIONS = ("tracking.",)
AXES = {"steps": "training env steps", "seconds": "wall-clock seconds"}
CSV_COLUMNS = [
    "group",
    "label",
    "seeds",
    "runs",
    "axis",
    "x",
    "return_mean",
    "return_min",
    "return_max",
    "n_runs",
]


class CompareError(ValueError):
    """A path that is not a run directory, or a run with nothing to plot yet."""


@dataclass
class RunCurve:
    """One run's evaluations, oldest first."""

    path: Path
    config: dict[str, Any]  # flat: {"env.id": ..., "run.seed": ...}
    steps: np.ndarray  # (E,) training env steps of each evaluation, increasing
    seconds: np.ndarray  # (E,) wall-clock seconds of the run when it came in; NaN: unknown
    returns: np.ndarray  # (E,) mean evaluation return

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed(self) -> Any:
        return self.config.get("run.seed")


def _flat(config: dict) -> dict[str, Any]:
    """{"env": {"id": x}} -> {"env.id": x}; one level deep, as ``Config.flat`` does."""
    out: dict[str, Any] = {}
    for section, value in config.items():
        if isinstance(value, dict) and value:
            for key, v in value.items():
                out[f"{section}.{key}"] = v
        else:
            out[section] = value
    return out


def _read_config(path: Path) -> dict[str, Any]:
    """The run's config with every default filled in where the current schema can read it
    (so that a run written before a key existed groups with one that states the default),
    else the file's own keys."""
    import yaml

    from gogepo_ray.config import Config

    try:
        raw = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CompareError(f"{path}: cannot read config.yaml ({exc})") from None
    if not isinstance(raw, dict):
        raise CompareError(f"{path}: config.yaml is not a mapping")
    try:
        return Config.model_validate(raw).flat()
    except ValueError:  # a key of another version: compare the file as written
        return _flat(raw)


def _keep_latest(rows: list[tuple[float, ...]]) -> list[tuple[float, ...]]:
    """Rows (steps, ...) in file order, minus those a resumed session superseded: a row
    whose steps are not above the previous one's starts again from a checkpoint, and the
    rows it replaces (steps at or above its own) go."""
    kept: list[tuple[float, ...]] = []
    for row in rows:
        while kept and kept[-1][0] >= row[0]:
            kept.pop()
        kept.append(row)
    return kept


def load_run(path: str | Path) -> RunCurve:
    """A run directory's evaluations. Raises CompareError."""
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"{path}: not a run directory (it does not exist or is a file)")
    if not (path / "config.yaml").is_file():
        raise CompareError(f"{path}: not a run directory (no config.yaml)")
    config = _read_config(path)
    evals: list[tuple[float, float, float]] = []  # steps, return, seconds
    trains: list[tuple[float, float]] = []  # steps, seconds
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
                steps = float(row["train/env_steps"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line, or a row of another kind
            wall = row.get("timers/wall_seconds")
            wall = float(wall) if isinstance(wall, (int, float)) else math.nan
            if "eval/return_mean" in row:
                mean = row["eval/return_mean"]
                if isinstance(mean, (int, float)) and math.isfinite(mean):
                    evals.append((steps, float(mean), wall))
            elif math.isfinite(wall):
                trains.append((steps, wall))
    if not evals and (path / "summary.json").is_file():
        try:
            history = json.loads((path / "summary.json").read_text()).get("eval_history") or []
            evals = [(float(h[0]), float(h[1]), math.nan) for h in history if math.isfinite(h[1])]
        except (ValueError, TypeError, IndexError, AttributeError):
            evals = []
    evals = _keep_latest(evals)
    if not evals:
        every = config.get("run.eval_every")
        when = f" (one is made every {every} training env steps)" if every else ""
        raise CompareError(f"{path}: no evaluations recorded yet{when}")
    steps, returns, seconds = (np.array(c, np.float64) for c in zip(*evals))
    missing = np.isnan(seconds)
    trains = _keep_latest(trains)
    if missing.any() and len(trains) >= 2:
        t_steps, t_walls = (np.array(c, np.float64) for c in zip(*trains))
        inside = missing & (steps >= t_steps[0]) & (steps <= t_steps[-1])
        seconds[inside] = np.interp(steps[inside], t_steps, t_walls)
    return RunCurve(path, config, steps, seconds, returns)


def experiment_key(config: dict[str, Any]) -> str:
    """The config without the keys that leave the experiment the same (seed, names)."""
    kept = {
        k: v
        for k, v in config.items()
        if k not in SAME_EXPERIMENT and not k.startswith(SAME_EXPERIMENT_SECTIONS)
    }
    return json.dumps(kept, sort_keys=True, default=str)


@dataclass
class Group:
    runs: list[RunCurve]
    label: str = ""

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config


def group_runs(runs: Sequence[RunCurve]) -> list[Group]:
    """Runs of one experiment (same config but the seed) together, in order of first
    appearance, each with a legend label."""
    groups: dict[str, Group] = {}
    for run in runs:
        groups.setdefault(experiment_key(run.config), Group([])).runs.append(run)
    out = list(groups.values())
    for group, label in zip(out, _labels(out)):
        group.label = label
    return out


def _short(value: Any, width: int = 24) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _labels(groups: list[Group]) -> list[str]:
    """The run name for a lone run; the env id for a lone group of seeds; else the config
    keys the groups differ in (``algorithm`` and ``env.id`` alone when the algorithm
    differs, as its other sections then differ too)."""
    if len(groups) == 1:
        g = groups[0]
        base = [g.runs[0].name if len(g.runs) == 1 else str(g.config.get("env.id"))]
    else:
        keys = sorted({k for g in groups for k in g.config})
        differ = [
            k
            for k in keys
            if k not in SAME_EXPERIMENT
            and not k.startswith(SAME_EXPERIMENT_SECTIONS)
            and len({json.dumps(g.config.get(k), default=str) for g in groups}) > 1
        ]

        def varies(k: str, among: list[Group]) -> bool:
            return len({json.dumps(g.config.get(k), default=str) for g in among}) > 1

        base = []
        for g in groups:
            if "algorithm" in differ:
                # the algorithm, then only what differs among the runs of that algorithm
                # (its other sections differ from the other algorithm's anyway)
                family = [
                    h for h in groups if h.config.get("algorithm") == g.config.get("algorithm")
                ]
                shown = ["algorithm"] + [
                    k for k in differ if k != "algorithm" and (k == "env.id" or varies(k, family))
                ]
            else:
                shown = differ
            parts = [
                f"{k}={_short(g.config.get(k))}" if k != "algorithm" else str(g.config.get(k))
                for k in shown[:3]
            ]
            base.append(", ".join(parts) + (", …" if len(shown) > 3 else ""))
        if len(set(base)) < len(base):  # could not tell them apart in a few keys
            base = [f"{b} ({g.runs[0].name})" for b, g in zip(base, groups)]
    return [
        b + (f" ({len(g.runs)} seeds)" if len(g.runs) > 1 else "") for b, g in zip(base, groups)
    ]


@dataclass
class Band:
    """One group's curve on one axis: mean over its runs, lowest and highest run."""

    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n_runs: np.ndarray  # runs that cover each x


def band(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> Band | None:
    """Runs (x increasing, y) onto one grid: every x of any run inside the range that all
    runs cover (every x of any run when they do not overlap), linear interpolation, and
    each run left out where the x is outside its own range."""
    pairs = [(x[np.isfinite(x)], y[np.isfinite(x)]) for x, y in zip(xs, ys)]
    pairs = [(x, y) for x, y in pairs if len(x)]
    if not pairs:
        return None
    grid = np.unique(np.concatenate([x for x, _ in pairs]))
    start, end = max(x[0] for x, _ in pairs), min(x[-1] for x, _ in pairs)
    if start <= end:
        grid = grid[(grid >= start) & (grid <= end)]
    values = np.full((len(pairs), len(grid)), np.nan)
    for i, (x, y) in enumerate(pairs):
        inside = (grid >= x[0]) & (grid <= x[-1])
        values[i, inside] = np.interp(grid[inside], x, y)
    n = np.isfinite(values).sum(0)
    with np.errstate(invalid="ignore"):
        return Band(
            grid,
            np.nanmean(values, 0),
            np.nanmin(values, 0),
            np.nanmax(values, 0),
            n,
        )


@dataclass
class Comparison:
    groups: list[Group]
    bands: dict[str, list[Band | None]]  # axis -> one per group
    png: Path
    csv: Path
    notes: list[str]  # runs left out of a panel, and why


def compare_runs(paths: Sequence[str | Path], out: str | Path, x: str = "both") -> Comparison:
    """Plot ``paths``' evaluation curves to ``out`` (PNG) and their numbers to the CSV beside
    it. ``x``: ``steps``, ``seconds`` or ``both`` (two panels). Raises CompareError."""
    if x not in (*AXES, "both"):
        raise CompareError(f"--x must be steps, seconds or both, got {x!r}")
    if not paths:
        raise CompareError("give at least one run directory")
    png = Path(out)
    if png.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise CompareError(f"the plot file must end in .png, .svg or .pdf, got {str(png)!r}")
    runs = [load_run(p) for p in paths]
    seen: dict[Path, str] = {}
    for run, p in zip(runs, paths):
        if run.path.resolve() in seen:
            raise CompareError(f"{p}: given twice (also as {seen[run.path.resolve()]})")
        seen[run.path.resolve()] = str(p)
    groups = group_runs(runs)
    axes = list(AXES) if x == "both" else [x]
    notes: list[str] = []
    bands: dict[str, list[Band | None]] = {}
    for axis in axes:
        bands[axis] = []
        for g in groups:
            xs = [r.steps if axis == "steps" else r.seconds for r in g.runs]
            if axis == "seconds":
                for r in g.runs:
                    if np.isnan(r.seconds).all():
                        notes.append(
                            f"{r.path}: no wall-clock time for its evaluations; left out of "
                            "the seconds panel"
                        )
            bands[axis].append(band(xs, [r.returns for r in g.runs]))
    result = Comparison(groups, bands, png, png.with_suffix(".csv"), notes)
    _write_csv(result)
    _plot(result)
    return result


def _write_csv(result: Comparison) -> None:
    result.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(result.csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for axis, per_group in result.bands.items():
            for k, (g, b) in enumerate(zip(result.groups, per_group)):
                if b is None:
                    continue
                seeds = ";".join(str(r.seed) for r in g.runs)
                names = ";".join(r.name for r in g.runs)
                for i in range(len(b.x)):
                    w.writerow(
                        [
                            k,
                            g.label,
                            seeds,
                            names,
                            axis,
                            f"{b.x[i]:.6g}",
                            f"{b.mean[i]:.6g}",
                            f"{b.low[i]:.6g}",
                            f"{b.high[i]:.6g}",
                            int(b.n_runs[i]),
                        ]
                    )


def _plot(result: Comparison) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.bands)
    width = 5.5 * n
    fig, axes = plt.subplots(1, n, figsize=(width, 4.4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (axis, per_group) in zip(axes[0], result.bands.items()):
        for k, (g, b) in enumerate(zip(result.groups, per_group)):
            if b is None:
                continue
            colour = colours[k % len(colours)]
            ax.plot(b.x, b.mean, "o-" if len(b.x) < 30 else "-", ms=3, color=colour, label=g.label)
            if len(g.runs) > 1:
                ax.fill_between(b.x, b.low, b.high, color=colour, alpha=0.2, lw=0)
        ax.set_xlabel(AXES[axis])
        ax.set_ylabel("evaluation return")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    rows = len(labels)  # below the panels, so that no label hides a curve
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=1, frameon=False)
    envs = sorted({str(g.config.get("env.id")) for g in result.groups})
    seeds = any(len(g.runs) > 1 for g in result.groups)
    title = f"{', '.join(envs)}: evaluation return" + (
        " (line: mean over seeds, band: lowest to highest seed)" if seeds else ""
    )
    fig.suptitle(fit_title(title, width * 0.95, 12), fontsize=12)
    legend_inches = 0.2 * rows + 0.2
    fig.set_size_inches(width, 4.4 + legend_inches)
    fig.tight_layout(rect=(0, legend_inches / (4.4 + legend_inches), 1, 1))
    result.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(result.png, dpi=120)
    plt.close(fig)
