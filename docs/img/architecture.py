"""Draws docs/img/architecture.png, the README's picture: python docs/img/architecture.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch


def box(ax, x, y, w, h, title, lines, colour):
    ax.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=colour, ec="#333", lw=1.2)
    )
    ax.text(x + w / 2, y + h - 0.07, title, ha="center", va="top", fontsize=11, weight="bold")
    ax.text(x + w / 2, y + h - 0.2, "\n".join(lines), ha="center", va="top", fontsize=8.5)


def arrow(ax, a, b, text, offset=(0, 0.04), both=False):
    ax.add_patch(
        FancyArrowPatch(a, b, arrowstyle="<|-|>" if both else "-|>", mutation_scale=14, lw=1.3)
    )
    ax.text((a[0] + b[0]) / 2 + offset[0], (a[1] + b[1]) / 2 + offset[1], text, ha="center",
            fontsize=8, style="italic")


fig, ax = plt.subplots(figsize=(10, 4.6))
ax.set_xlim(0, 10)
ax.set_ylim(0, 4.6)
ax.axis("off")
box(ax, 0.2, 3.2, 2.3, 1.2, "you", ["gogepo train / eval / sweep", "RLlib + Ray Tune", "ray job submit"], "#eef")
box(ax, 0.2, 0.4, 2.3, 2.4, "Trainer", ["the one training loop", "(driver process)", "", "evaluations, checkpoints", "best.pt / latest.pt", "command sweep", "summary.json"], "#ffe")
box(ax, 3.6, 1.6, 2.8, 2.8, "learner actor", ["generator G(c) -> policy weights θ", "critic V(θ) on probing states", "replay buffer of (θ, return)", "", "fits V(θ) ≈ R", "trains V(G(c)) = c", "proposes G(best + drive) + noise"], "#efe")
box(ax, 7.4, 2.4, 2.4, 2.0, "rollout workers", ["N Ray actors, 1 CPU each", "MuJoCo via gymnasium", "compiled policy step", "", "returns + observation stats"], "#fee")
box(ax, 7.4, 0.4, 2.4, 1.5, "MLflow · Ray Serve", ["params, metrics, artifacts", "POST /policy, /act", "for any command"], "#eee")
box(ax, 3.6, 0.2, 2.8, 1.0, "checkpoints/", ["best.pt  latest.pt  final.pt"], "#f4f4f4")
arrow(ax, (1.35, 3.2), (1.35, 2.85), "")
arrow(ax, (2.55, 2.2), (3.55, 2.6), "step / evaluate", offset=(-0.1, 0.12))
arrow(ax, (6.45, 3.6), (7.35, 3.6), "weights θ", offset=(0, 0.08))
arrow(ax, (7.35, 2.9), (6.45, 2.9), "returns", offset=(0, -0.22))
arrow(ax, (2.55, 0.8), (3.55, 0.7), "")
arrow(ax, (6.45, 0.7), (7.35, 1.0), "")
fig.tight_layout()
out = Path(__file__).with_suffix(".png")
fig.savefig(out, dpi=110)
print(f"wrote {out}")
