"""Command sweeps and plots: how close the achieved return is to the commanded one."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gogepo_ray.plotting import fit_title

if TYPE_CHECKING:
    from gogepo_ray.config import Config
    from gogepo_ray.types import EpisodeBatch


def sweep_commands(cfg: Config) -> list[float]:
    """``run.sweep_commands`` commands evenly spread over [return_min, return_max]."""
    return np.linspace(cfg.env.return_min, cfg.env.return_max, cfg.run.sweep_commands).tolist()


def failure_rows(batch: EpisodeBatch, **extra: str) -> list[dict]:
    """One failures.jsonl row per failed episode of ``batch`` (the rows training writes),
    with ``extra`` fields added, e.g. ``source="gogepo eval"``."""
    return [
        {
            "kind": batch.kind,
            "episode_id": int(batch.episode_ids[i]),
            "command": float(batch.commands[i]) if np.isfinite(batch.commands[i]) else None,
            "length": int(batch.lengths[i]),
            "reason": reason,
            **extra,
        }
        for i, reason in enumerate(batch.failures)
        if reason is not None
    ]


def finished_returns(batch: EpisodeBatch) -> np.ndarray:
    """Returns of the episodes that finished. A failed episode's partial return (or the 0
    of an env whose reset raised) is no result, so it never enters a mean."""
    ok = np.array([f is None for f in batch.failures], dtype=bool)
    return batch.returns[ok]


def mean_std(returns: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation; NaN for both when no episode finished."""
    if len(returns) == 0:
        return float("nan"), float("nan")
    return float(returns.mean()), float(returns.std())


@dataclass
class SweepResult:
    commands: np.ndarray  # (C,)
    mean: np.ndarray  # (C,) achieved return over the episodes that finished; NaN: none did
    std: np.ndarray  # (C,)
    episodes: int  # episodes run per command
    failed: np.ndarray  # (C,) int, episodes of a command that failed: not in mean and std

    @classmethod
    def from_batch(cls, batch: EpisodeBatch, n_commands: int, episodes: int) -> SweepResult:
        returns = batch.returns.reshape(n_commands, episodes)
        ok = np.array([f is None for f in batch.failures], dtype=bool).reshape(returns.shape)
        mean, std = zip(*[mean_std(r[o]) for r, o in zip(returns, ok)])
        return cls(
            batch.commands.reshape(n_commands, episodes)[:, 0],
            np.array(mean),
            np.array(std),
            episodes,
            (~ok).sum(1),
        )

    @property
    def failed_episodes(self) -> int:
        return int(self.failed.sum())

    @property
    def mean_abs_error(self) -> float:
        """Mean |achieved − commanded| over the commands with a finished episode (NaN: none)."""
        err = np.abs(self.mean - self.commands)
        err = err[np.isfinite(err)]
        return float(err.mean()) if len(err) else float("nan")

    def write(self, stem: Path, title: str) -> tuple[Path, Path]:
        """``stem``.csv and ``stem``.png (achieved vs commanded, with the identity line)."""
        stem.parent.mkdir(parents=True, exist_ok=True)
        csv_path, png_path = stem.with_suffix(".csv"), stem.with_suffix(".png")
        with open(csv_path, "w", newline="") as fh:
            w = csv.writer(fh)
            # episodes: those in the mean; failed: those left out (details in failures.jsonl)
            w.writerow(["command", "achieved_mean", "achieved_std", "episodes", "failed"])
            for c, m, s, f in zip(self.commands, self.mean, self.std, self.failed):
                w.writerow([f"{c:.6g}", f"{m:.6g}", f"{s:.6g}", self.episodes - int(f), int(f)])
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4.5))
        lo, hi = float(self.commands.min()), float(self.commands.max())
        ax.plot([lo, hi], [lo, hi], "--", color="grey", label="identity (achieved = commanded)")
        ax.errorbar(
            self.commands,
            self.mean,
            yerr=self.std,
            fmt="o-",
            ms=4,
            capsize=2,
            label="generated policy",
        )
        ax.set_xlabel("commanded return")
        ax.set_ylabel("achieved return")
        failed = f", {self.failed_episodes} episodes failed" if self.failed_episodes else ""
        # a long env id (pkg.module:Class) wraps to the axes width instead of running off the figure
        ax.set_title(
            fit_title(f"{title}: command sweep (MAE {self.mean_abs_error:.1f}{failed})", 4.0)
        )
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(png_path, dpi=120)
        plt.close(fig)
        return csv_path, png_path


def plot_learning_curve(eval_history: list[list[float]], path: Path, title: str) -> Path:
    """Evaluation return against training env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if eval_history:
        steps, means = zip(*[(h[0], h[1]) for h in eval_history])
        ax.plot(steps, means, "o-", ms=3)
    ax.set_xlabel("training env steps")
    ax.set_ylabel("evaluation return (G(best return), no noise)")
    ax.set_title(fit_title(title, 5.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
