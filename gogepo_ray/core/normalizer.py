"""Running observation statistics with a merge of deltas (parallel Welford / Chan et al.).

Workers accumulate statistics over the training steps they just ran and send them as a
*delta*; the learner merges every delta into its master copy and ships the merged mean
and std with the next policies. Policies see (obs − mean) / (std + 1e-8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EPS = 1e-8


@dataclass
class ObsStats:
    """count, mean and M2 (sum of squared deviations) of a stream of observations."""

    dim: int
    count: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.dim, dtype=np.float64)
        if self.m2 is None:
            self.m2 = np.zeros(self.dim, dtype=np.float64)

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.count if self.count > 0 else np.ones(self.dim)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    def update(self, obs: np.ndarray) -> None:
        """Add a batch of observations, (N, dim)."""
        obs = np.asarray(obs, dtype=np.float64).reshape(-1, self.dim)
        if obs.shape[0] == 0:
            return
        batch_mean = obs.mean(axis=0)
        batch_m2 = ((obs - batch_mean) ** 2).sum(axis=0)
        self.merge(ObsStats(self.dim, obs.shape[0], batch_mean, batch_m2))

    def merge(self, other: ObsStats) -> None:
        """Fold another set of statistics in, as if its data had been seen here."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / total)
        self.count = total

    def normalizer(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std + eps) as float32, what a policy divides by; identity before any data."""
        if self.count == 0:
            return np.zeros(self.dim, np.float32), np.ones(self.dim, np.float32)
        return self.mean.astype(np.float32), (self.std + EPS).astype(np.float32)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean.copy(), "m2": self.m2.copy()}

    @classmethod
    def from_state_dict(cls, state: dict) -> ObsStats:
        mean = np.asarray(state["mean"], dtype=np.float64)
        return cls(
            mean.shape[0], int(state["count"]), mean, np.asarray(state["m2"], dtype=np.float64)
        )
