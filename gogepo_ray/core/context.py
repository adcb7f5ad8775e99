"""Task contexts: one generator for a whole family of tasks.

A task family (``gogepo_ray.envs.families``) is an env whose task is set by a context vector x:
a goal position, a target velocity, a direction. The command to the generator becomes
[R, x], and the critic becomes V(θ, x) (fingerprint concatenated with x), so one generator
learns from episode returns alone to write a policy for any task of the family and any
return, including tasks it never trained on. The method's losses are unchanged, with x
carried along: the buffer holds (θ, x, R), and

    critic:     min_V  mean (V(θ_i, x_i) − R_i)²
    generator:  min_G  mean (V(G(R_i, x_i), x_i) − R_i)²,   V frozen.

G and V see x normalised to the training distribution's box: x̂ = (x − centre) / half-width,
about [−1, 1] inside it, a little beyond for held-out tasks just outside it.

**The best return of a context.** Exploration asks for "the best return seen for this task
+ drive", and evaluation for "the best return seen for this task". A context drawn from a
continuous distribution is never seen twice, so the best return of x is estimated as the
highest return among the ``neighbours`` buffer entries whose contexts are nearest to x
(Euclidean distance in x̂). We chose nearest neighbours over
  - bins: their number grows exponentially with the context's dimensions, and a held-out
    task outside the training range has no bin;
  - a learned upper envelope: a third network to train and tune, which lags behind the
    buffer, and whose errors become the commands;
nearest neighbours need no training, work in any number of dimensions and at any point
(outside the range, the nearest tasks at its edge answer), and follow the buffer as it
improves. Their bias: max over k entries from slightly different tasks is a little
optimistic where the return changes fast with x; with a buffer of thousands of entries
the neighbours are close (k = 50 of 3 000 uniform 2-D contexts lie within about 7% of
the box's width). Too few neighbours miss the best: the buffer holds episodes from the
whole run, mostly early and poor ones, and the max of a handful of them often holds no
recent episode. On PointGoal (seed 0, 300k steps, final generator) the held-out mean was
−31.1 with k = 10, −27.3 with 25, −23.8 with 50 and −23.2 with 100 (k chosen after
seeing the k = 10 run; the measured seeds since use 50).

**Context-blind** (``blind``): episodes still run on sampled tasks, but G and V see no
context, so one policy serves every task: the baseline that shows what the context buys.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class TaskContexts:
    """The context side of a family run: training distribution, held-out tasks, the
    normalisation G and V see, and the best-return estimate of any context."""

    def __init__(
        self,
        dim: int,
        *,
        heldout: Sequence[Sequence[float]],
        train_low: Sequence[float] | None = None,
        train_high: Sequence[float] | None = None,
        train_points: Sequence[Sequence[float]] | None = None,
        neighbours: int = 50,
        blind: bool = False,
    ) -> None:
        if (train_points is None) == (train_low is None or train_high is None):
            raise ValueError("give the training contexts as a box (low, high) or as points")
        self.dim = dim
        self.points = None if train_points is None else np.asarray(train_points, np.float64)
        if self.points is not None:
            low, high = self.points.min(0), self.points.max(0)
        else:
            low, high = np.asarray(train_low, np.float64), np.asarray(train_high, np.float64)
        self.low, self.high = low.reshape(dim), high.reshape(dim)
        self.centre = (self.low + self.high) / 2
        half = (self.high - self.low) / 2
        self.half_width = np.where(half > 0, half, 1.0)  # a single point or a flat side: 1
        self.heldout = np.asarray(heldout, np.float64).reshape(-1, dim)
        self.neighbours = neighbours
        self.blind = blind

    @classmethod
    def from_config(cls, cfg) -> TaskContexts | None:
        """The contexts of ``cfg.context`` (validated by the config), None without one."""
        c = getattr(cfg, "context", None)
        if c is None:
            return None
        return cls(
            c.dim,
            heldout=c.heldout,
            train_low=c.train.low,
            train_high=c.train.high,
            train_points=c.train.points,
            neighbours=c.neighbours,
            blind=c.blind,
        )

    @property
    def cond_dim(self) -> int:
        """Context dimensions G and V see: 0 for a context-blind run."""
        return 0 if self.blind else self.dim

    def sample(self, n: int, rng: torch.Generator) -> np.ndarray:
        """n training contexts (n, dim): uniform in the box, or uniform over the points."""
        if self.points is not None:
            idx = torch.randint(len(self.points), (n,), generator=rng).numpy()
            return self.points[idx].copy()
        u = torch.rand((n, self.dim), generator=rng, dtype=torch.float64).numpy()
        return self.low + u * (self.high - self.low)

    def normalise(self, contexts: np.ndarray) -> torch.Tensor:
        """Raw contexts (n, dim) -> what G and V see, (n, cond_dim) float32."""
        x = np.asarray(contexts, np.float64).reshape(-1, self.dim)
        if self.blind:
            return torch.zeros(len(x), 0)
        return torch.from_numpy((x - self.centre) / self.half_width).float()

    def best(self, contexts: np.ndarray, stored: torch.Tensor, returns: torch.Tensor) -> np.ndarray:
        """Estimated best return of each context (m, dim): the highest return among the
        ``neighbours`` stored entries nearest to it (``stored`` (n, cond_dim) normalised,
        ``returns`` (n,)). Context-blind: the best stored return for every context. NaN
        when nothing is stored."""
        m = len(np.asarray(contexts).reshape(-1, self.dim))
        if len(returns) == 0:
            return np.full(m, np.nan)
        if self.blind:
            return np.full(m, float(returns.max()))
        query = self.normalise(contexts)
        k = min(self.neighbours, len(returns))
        near = torch.cdist(query, stored).topk(k, dim=1, largest=False).indices  # (m, k)
        return returns[near].max(dim=1).values.numpy()
