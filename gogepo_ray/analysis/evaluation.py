"""Command sweeps and plots: how close the achieved return is to the commanded one."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gogepo_ray.analysis.plotting import fit_title

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
    return batch.returns[batch.ok()]


def choose_command(probe: EpisodeBatch) -> float:
    """The command of ``run.eval_command: sweep``: the one whose episode scored highest in
    the evaluation's small sweep (the highest command among equal scores); failed
    episodes do not count. With every episode failed, the highest command."""
    ok = probe.ok()
    score = np.where(ok, probe.returns, -np.inf)
    top = score.max()
    return (
        float(probe.commands[score == top].max())
        if np.isfinite(top)
        else float(probe.commands.max())
    )


def command_fidelity(commands: np.ndarray, achieved: np.ndarray, low: float, high: float) -> float:
    """How well commands mean what they say: mean |achieved − commanded| over the commands
    inside [low, high], the range of training returns seen, divided by (high − low). 0 is a
    perfect generator. Returns are training returns (the survival offset included), the
    scale commands are given on. NaN when no command lies in the range or it is empty."""
    commands = np.broadcast_to(np.asarray(commands, np.float64), np.shape(achieved))
    achieved = np.asarray(achieved, np.float64)
    inside = (commands >= low) & (commands <= high) & np.isfinite(achieved)
    if not high > low or not inside.any():
        return float("nan")
    return float(np.abs(achieved[inside] - commands[inside]).mean() / (high - low))


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
    # (C,) achieved *training* return (true return + survival offset × length), the scale
    # commands are given on; equal to ``mean`` for envs without a survival offset
    train_mean: np.ndarray | None = None

    @classmethod
    def from_batch(
        cls, batch: EpisodeBatch, n_commands: int, episodes: int, survival_offset: float = 0.0
    ) -> SweepResult:
        returns = batch.returns.reshape(n_commands, episodes)
        train = returns + survival_offset * batch.lengths.reshape(returns.shape)
        ok = batch.ok().reshape(returns.shape)
        mean, std = zip(*[mean_std(r[o]) for r, o in zip(returns, ok)])
        return cls(
            batch.commands.reshape(n_commands, episodes)[:, 0],
            np.array(mean),
            np.array(std),
            episodes,
            (~ok).sum(1),
            np.array([mean_std(r[o])[0] for r, o in zip(train, ok)]),
        )

    def fidelity(self, low: float, high: float) -> float:
        """``command_fidelity`` of this sweep over the training returns seen, [low, high]."""
        achieved = self.mean if self.train_mean is None else self.train_mean
        return command_fidelity(self.commands, achieved, low, high)

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
    """Evaluation return against training env steps, the best and the final evaluation
    marked (the final one is the last entry of the history)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(h[0], h[1]) for h in eval_history if np.isfinite(h[1])]
    if points:
        steps, means = zip(*points)
        ax.plot(steps, means, "o-", ms=3, label="evaluation")
        best = int(np.argmax(means))
        ax.plot(
            steps[best], means[best], "*", ms=13, color="tab:green", label=f"best {means[best]:.1f}"
        )
        ax.plot(
            steps[-1],
            means[-1],
            "s",
            ms=8,
            mfc="none",
            color="tab:red",
            label=f"final {means[-1]:.1f}",
        )
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("training env steps")
    ax.set_ylabel("evaluation return (G(best return), no noise)")
    ax.set_title(fit_title(title, 5.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- task families
def context_label(context) -> str:
    """A context as it appears in metric names and tables: values joined by ``_``, e.g.
    ``0.5_-1.2`` (MLflow metric names allow digits, ``.``, ``-`` and ``_``)."""
    return "_".join(f"{float(v):g}" for v in np.atleast_1d(context))


def per_context(batch: EpisodeBatch) -> dict[str, tuple[float, float, int]]:
    """{context label: (mean, std, failed episodes)} over a batch's finished episodes, in
    the order the contexts first appear."""
    out: dict[str, tuple[float, float, int]] = {}
    labels = [context_label(x) for x in batch.contexts]
    ok = batch.ok()
    for label in dict.fromkeys(labels):
        rows = np.array([lab == label for lab in labels])
        mean, std = mean_std(batch.returns[rows & ok])
        out[label] = (mean, std, int((rows & ~ok).sum()))
    return out


def heldout_metrics(batch: EpisodeBatch) -> dict[str, float]:
    """The metrics of an evaluation on held-out contexts: ``eval/heldout_return_mean`` (over
    the finished episodes of every context, each context weighing the same) and
    ``eval/heldout/<context>`` per context."""
    groups = per_context(batch)
    means = [m for m, _, _ in groups.values() if np.isfinite(m)]
    out = {"eval/heldout_return_mean": float(np.mean(means)) if means else float("nan")}
    return out | {f"eval/heldout/{label}": m for label, (m, _, _) in groups.items()}


@dataclass
class ContextSweep:
    """Achieved return over held-out contexts × commands, and the held-out table: each
    held-out context at its estimated best return, G(best(x), x)."""

    names: tuple[str, ...]  # context dimensions
    contexts: np.ndarray  # (H, k)
    commands: np.ndarray  # (C,)
    mean: np.ndarray  # (H, C), NaN where every episode failed
    failed: np.ndarray  # (H, C) int
    episodes: int
    best_commands: np.ndarray  # (H,) the estimated best return of each context
    best_mean: np.ndarray  # (H,) achieved at it
    best_std: np.ndarray  # (H,)
    best_failed: np.ndarray  # (H,) int
    train_mean: np.ndarray | None = None  # (H, C) achieved training return (see SweepResult)

    def fidelity(self, low: float, high: float) -> float:
        """``command_fidelity`` over every held-out context × command in [low, high]."""
        achieved = self.mean if self.train_mean is None else self.train_mean
        return command_fidelity(self.commands[None, :], achieved, low, high)

    @classmethod
    def run(
        cls, propose, run, names, contexts, commands, episodes: int, survival_offset: float = 0.0
    ) -> ContextSweep:
        """``propose(commands, episodes, contexts)`` -> ParamBatch (the learner's
        ``propose_eval``), ``run(ParamBatch)`` -> EpisodeBatch (workers or local rollouts)."""
        contexts = np.asarray(contexts, np.float64)
        commands = np.asarray(commands, np.float64)
        h, c = len(contexts), len(commands)
        grid = run(propose(np.tile(commands, h).tolist(), episodes, np.repeat(contexts, c, axis=0)))
        best = run(propose(None, episodes, contexts))
        ok = grid.ok().reshape(h, c, episodes)
        returns = grid.returns.reshape(h, c, episodes)
        train = returns + survival_offset * grid.lengths.reshape(h, c, episodes)

        def means(values: np.ndarray) -> np.ndarray:
            return np.array(
                [[mean_std(r[o])[0] for r, o in zip(rr, oo)] for rr, oo in zip(values, ok)]
            )

        mean = means(returns)
        b_ok = best.ok().reshape(h, episodes)
        b_ret = best.returns.reshape(h, episodes)
        b_stats = [mean_std(r[o]) for r, o in zip(b_ret, b_ok)]
        return cls(
            tuple(names),
            contexts,
            commands,
            mean,
            (~ok).sum(2),
            episodes,
            best.commands.reshape(h, episodes)[:, 0],
            np.array([m for m, _ in b_stats]),
            np.array([s for _, s in b_stats]),
            (~b_ok).sum(1),
            means(train),
        )

    @property
    def failed_episodes(self) -> int:
        return int(self.failed.sum() + self.best_failed.sum())

    def table_markdown(self) -> str:
        """The held-out table: context, the command G was given (its estimated best
        return) and the return achieved."""
        head = [*self.names, "command (best estimate)", "achieved return", "failed"]
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for x, cmd, m, s, f in zip(
            self.contexts, self.best_commands, self.best_mean, self.best_std, self.best_failed
        ):
            vals = [f"{v:g}" for v in x] + [f"{cmd:.1f}", f"{m:.1f} ± {s:.1f}", str(int(f))]
            lines.append("| " + " | ".join(vals) + " |")
        finite = self.best_mean[np.isfinite(self.best_mean)]
        mean = float(finite.mean()) if len(finite) else float("nan")
        lines.append(f"\nmean achieved return over held-out contexts: {mean:.1f}")
        return "\n".join(lines)

    def write(self, stem: Path, title: str) -> list[Path]:
        """``stem``.csv (the grid), ``stem``.png (its heatmap) and ``stem``-heldout.csv/.md
        (the held-out table)."""
        stem.parent.mkdir(parents=True, exist_ok=True)
        grid_csv, png = stem.with_suffix(".csv"), stem.with_suffix(".png")
        table_csv = stem.with_name(stem.name + "-heldout.csv")
        table_md = stem.with_name(stem.name + "-heldout.md")
        with open(grid_csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([*self.names, "command", "achieved_mean", "episodes", "failed"])
            for x, row, frow in zip(self.contexts, self.mean, self.failed):
                for cmd, m, f in zip(self.commands, row, frow):
                    w.writerow(
                        [*(f"{v:g}" for v in x), f"{cmd:.6g}", f"{m:.6g}", self.episodes - f, f]
                    )
        with open(table_csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(
                [*self.names, "command", "achieved_mean", "achieved_std", "episodes", "failed"]
            )
            for x, cmd, m, s, f in zip(
                self.contexts, self.best_commands, self.best_mean, self.best_std, self.best_failed
            ):
                w.writerow(
                    [
                        *(f"{v:g}" for v in x),
                        f"{cmd:.6g}",
                        f"{m:.6g}",
                        f"{s:.6g}",
                        self.episodes - f,
                        f,
                    ]
                )
        table_md.write_text(f"# {title}: held-out contexts\n\n{self.table_markdown()}\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h, c = self.mean.shape
        fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * c + 2.5), max(3.0, 0.35 * h + 1.8)))
        im = ax.imshow(self.mean, aspect="auto", cmap="viridis")
        ax.set_xticks(range(c), [f"{v:.0f}" for v in self.commands], rotation=90, fontsize=7)
        ax.set_yticks(range(h), [context_label(x) for x in self.contexts], fontsize=7)
        ax.set_xlabel("commanded return")
        ax.set_ylabel(f"held-out context ({', '.join(self.names)})")
        failed = f", {self.failed_episodes} episodes failed" if self.failed_episodes else ""
        ax.set_title(fit_title(f"{title}: achieved return{failed}", fig.get_figwidth() - 1.5))
        fig.colorbar(im, ax=ax, label="achieved return")
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
        return [grid_csv, png, table_csv, table_md]


def command_sweep(cfg: Config, propose, run, episodes: int = 1) -> SweepResult | ContextSweep:
    """The command sweep of a run: ``run.sweep_commands`` commands over [return_min,
    return_max], ``episodes`` each, achieved against commanded; for a task family over its
    held-out contexts × commands, with the held-out table. The one sweep that the Trainer
    (on its workers, at the end of a run) and ``gogepo sweep`` (in this process) both run:
    ``propose(commands, episodes, contexts)`` -> ParamBatch is the learner's
    ``propose_eval``, ``run(ParamBatch)`` -> EpisodeBatch runs the episodes."""
    commands = sweep_commands(cfg)
    if cfg.context is not None:
        from gogepo_ray.envs import family_of

        names = family_of(cfg.env.id, cfg.env.kwargs)[1]
        return ContextSweep.run(
            propose,
            run,
            names,
            cfg.context.heldout,
            commands,
            episodes,
            cfg.env.survival_offset,
        )
    result = run(propose(commands, episodes, None))
    return SweepResult.from_batch(result, len(commands), episodes, cfg.env.survival_offset)
