"""Typed records that cross actor boundaries. numpy and the maths core only: no Ray."""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

from gogepo_ray.core.normalizer import ObsStats

Kind = Literal["train", "eval"]


class ParamBatch(NamedTuple):
    """Policies for a worker to run, one episode each."""

    kind: Kind
    episode_ids: np.ndarray  # (n,) int64, unique per kind within a run
    seeds: np.ndarray  # (n,) int64, env reset seed of each episode
    commands: np.ndarray  # (n,) float64, the command each policy was generated for
    policy_params: np.ndarray  # (n, D) float32
    # The learner's master observation statistics when the batch was made (count 0: none
    # yet, or normalisation off; policies then see raw observations).
    obs_count: int
    obs_mean: np.ndarray  # (obs_dim,) float64
    obs_m2: np.ndarray  # (obs_dim,) float64, sum of squared deviations
    # Training env steps the generator had learned from when it wrote these policies: an
    # evaluation is reported at this step, not at the step it was scheduled for.
    trained_env_steps: int = -1
    # Training policies see statistics that follow their own steps (the paper's code); False
    # keeps the master statistics fixed through the episode (ARS: a ± pair sees the same ones).
    follow_stats: bool = True
    # Task families: (n, k) float64, the task of each episode, given to the env at reset
    # (``reset(options={"context": ...})``); None for an env that is not a family.
    contexts: np.ndarray | None = None

    def obs_stats(self) -> ObsStats:
        """The master statistics this batch carries, as an ObsStats of its own."""
        return ObsStats(
            len(self.obs_mean), int(self.obs_count), self.obs_mean.copy(), self.obs_m2.copy()
        )

    def normalizer(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std + eps) as float32 from the master statistics; identity when count is 0."""
        return self.obs_stats().normalizer()


class EpisodeBatch(NamedTuple):
    """What a worker sends back for a ParamBatch."""

    kind: Kind
    episode_ids: np.ndarray  # (n,)
    commands: np.ndarray  # (n,)
    policy_params: np.ndarray  # (n, D), echoed so the learner needs no pending state
    returns: np.ndarray  # (n,) float64, the env's true undiscounted return
    lengths: np.ndarray  # (n,) int64, env steps of each episode
    failures: tuple[str | None, ...]  # per episode: None, or why it was dropped
    obs_count: int  # statistics delta over this batch's training steps
    obs_mean: np.ndarray  # (obs_dim,)
    obs_m2: np.ndarray  # (obs_dim,)
    rollout_seconds: float
    contexts: np.ndarray | None = None  # (n, k) echoed from the ParamBatch; None: no family

    def ok(self) -> np.ndarray:
        """(n,) bool: the episodes that finished (did not fail)."""
        return np.fromiter((f is None for f in self.failures), bool, len(self.failures))


class LearnerStats(NamedTuple):
    """A learner's counters after an update, and its own metrics by their logged names."""

    env_steps: int
    episodes: int
    failed_episodes: int
    best_return: float  # best training return taken in (survival offset included)
    last_return: float  # mean training return of the episodes the last update learned from
    learner_seconds: float
    update_seconds: float  # this call's update time
    rounds: int  # updates so far: GoGePo critic+generator rounds, ARS iterations
    # The algorithm's own figures, e.g. {"losses/critic": 1.2, "buffer/size": 40}; a figure
    # that does not exist yet (no update so far) is left out rather than given as NaN.
    metrics: dict[str, float]


def episode_seed(run_seed: int, kind: Kind, episode_id: int) -> int:
    """Env reset seed of one episode, derived from the run seed only."""
    stream = 0 if kind == "train" else 1
    return int(np.random.SeedSequence([run_seed, stream, episode_id]).generate_state(1)[0])
