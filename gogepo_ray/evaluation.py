"""Command sweeps and plots: how close the achieved return is to the commanded one."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gogepo_ray.config import Config
    from gogepo_ray.types import EpisodeBatch


def sweep_commands(cfg: Config) -> list[float]:
    """``run.sweep_commands`` commands evenly spread over [return_min, return_max]."""
    return np.linspace(cfg.env.return_min, cfg.env.return_max, cfg.run.sweep_commands).tolist()


@dataclass
class SweepResult:
    commands: np.ndarray  # (C,)
    mean: np.ndarray  # (C,) achieved return, mean over episodes
    std: np.ndarray  # (C,)
    episodes: int

    @classmethod
    def from_batch(cls, batch: EpisodeBatch, n_commands: int, episodes: int) -> SweepResult:
        returns = batch.returns.reshape(n_commands, episodes)
        return cls(
            batch.commands.reshape(n_commands, episodes)[:, 0],
            returns.mean(1),
            returns.std(1),
            episodes,
        )

    @property
    def mean_abs_error(self) -> float:
        return float(np.abs(self.mean - self.commands).mean())

    def write(self, stem: Path, title: str) -> tuple[Path, Path]:
        """``stem``.csv and ``stem``.png (achieved vs commanded, with the identity line)."""
        stem.parent.mkdir(parents=True, exist_ok=True)
        csv_path, png_path = stem.with_suffix(".csv"), stem.with_suffix(".png")
        with open(csv_path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["command", "achieved_mean", "achieved_std", "episodes"])
            for c, m, s in zip(self.commands, self.mean, self.std):
                w.writerow([f"{c:.6g}", f"{m:.6g}", f"{s:.6g}", self.episodes])
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
        ax.set_title(f"{title}: command sweep (MAE {self.mean_abs_error:.1f})")
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
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
