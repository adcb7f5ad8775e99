"""Augmented Random Search V2-t (Mania, Guy and Recht 2018, "Simple random search provides
a competitive approach to reinforcement learning", arXiv 1803.07055, Algorithm 2): the
baseline of the GoGePo paper, as a second learner on the same workers.

One iteration k, with policy parameters θ_k and the master observation statistics (μ, Σ):
  1. Draw N directions δ_1..δ_N ~ N(0, I) (a pure function of the run seed and k).
  2. Run the 2N policies θ_k + νδ_j and θ_k − νδ_j, one episode each: returns r+_j, r−_j
     (training returns: the survival offset is added per step, ARS's "shift").
  3. Keep the b directions with the largest max(r+_j, r−_j); σ_R = std of their 2b returns.
  4. θ_{k+1} = θ_k + α / (b σ_R) · Σ_top (r+_j − r−_j) δ_j.
  5. V2: merge the observations of the iteration's steps into (μ, Σ).
Every policy of an iteration sees the statistics of its start, unchanged through its
episode (the paper's Algorithm 2: μ_j, Σ_j are fixed within iteration j), so a ± pair is
judged on the same normalisation. Statistics that follow each episode's own steps, as
GoGePo's training policies see them, left ARS on Hopper-v5 below 400 after 250k steps on
seeds 0 and 1, where fixed ones reached 2014 and 2704 (same code otherwise).
Evaluation runs θ_k itself. The command of a GoGePo proposal means nothing here: ARS
episodes carry NaN as their command, and ``commands`` passed for evaluation are ignored.

This implements the learner protocol the Trainer drives (``propose``, ``propose_eval``,
``step``, ``stats``, ``state_dict``); the episode id says which iteration, direction and
sign an episode ran, so results may arrive in any order and from any worker. A direction
whose + or − episode failed is left out of its iteration's step. numpy only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from gogepo_ray.core.learner import StreamingLearner, training_return
from gogepo_ray.core.normalizer import ObsStats
from gogepo_ray.core.policy import PolicySpec
from gogepo_ray.types import EpisodeBatch, Kind, LearnerStats, ParamBatch

if TYPE_CHECKING:
    from gogepo_ray.config import Config

_DIRECTION_STREAM = 2  # seed streams 0 and 1 are the train and eval episode seeds


def initial_policy_params(spec: PolicySpec, seed: int) -> np.ndarray:
    """θ_0. A linear policy starts at zero (the ARS paper). An MLP's hidden layers get
    weights N(0, 1/fan_in) so that its units differ; its output layer starts at zero, so
    θ_0 acts 0 (the middle of the action box) like the linear one."""
    rng = np.random.default_rng([seed, _DIRECTION_STREAM, 2**31])
    parts = []
    for idx, (n_out, n_in) in enumerate(spec.layer_shapes):
        last = idx == len(spec.layer_shapes) - 1
        w = np.zeros((n_out, n_in)) if last else rng.normal(0, 1 / math.sqrt(n_in), (n_out, n_in))
        parts += [w.ravel(), np.zeros(n_out)]
    return np.concatenate(parts)


def directions(seed: int, iteration: int, n: int, dim: int) -> np.ndarray:
    """δ_1..δ_n of one iteration: (n, dim) standard normal, from (seed, iteration) alone."""
    return np.random.default_rng([seed, _DIRECTION_STREAM, iteration]).standard_normal((n, dim))


def ars_step(
    deltas: np.ndarray, returns: np.ndarray, top: int, step_size: float
) -> tuple[np.ndarray, dict[str, float]]:
    """The update of ARS V2-t (step 3-4 above) from one iteration's results.

    deltas (N, D); returns (N, 2) training returns of θ + νδ_j and θ − νδ_j, NaN where the
    episode failed. Directions with a failed episode are left out, and b shrinks to the
    directions left. Returns the change of θ (D,) and the iteration's figures."""
    usable = np.flatnonzero(np.isfinite(returns).all(axis=1))
    if len(usable) == 0:
        return np.zeros(deltas.shape[1]), {"ars/directions_used": 0.0}
    b = min(top, len(usable))
    # stable sort: ties keep direction order, so the step is the same on every machine
    order = usable[np.argsort(-returns[usable].max(axis=1), kind="stable")[:b]]
    used = returns[order]  # (b, 2)
    sigma = float(used.std())
    diff = used[:, 0] - used[:, 1]
    change = (
        step_size / (b * sigma) * (diff @ deltas[order]) if sigma > 0 else np.zeros(deltas.shape[1])
    )
    figures = {
        "ars/directions_used": float(b),
        "ars/return_std": sigma,
        "ars/step_norm": float(np.linalg.norm(change)),
    }
    return change, figures


class ArsLearner(StreamingLearner):
    """θ, the current iteration's results and the master observation statistics."""

    def __init__(self, cfg: Config, spec: PolicySpec) -> None:
        self.cfg = cfg
        self.spec = spec
        torch.set_num_threads(1)  # nothing to parallelise: the update is one (b, D) product
        self.n = cfg.ars.directions
        self.policy_params = initial_policy_params(spec, cfg.run.seed)  # θ_k, (D,) float64
        self.iteration = 0
        self._new_iteration()
        self.obs_stats = ObsStats(spec.obs_dim)  # (μ, Σ) every policy of the iteration sees
        self.pending_stats = ObsStats(spec.obs_dim)  # this iteration's steps, merged at its end
        self.best_return: float | None = None
        self.env_steps = 0
        self.episodes = 0
        self.failed_episodes = 0
        self.next_eval_id = 0
        self.learner_seconds = 0.0
        self.last_return = float("nan")
        self.figures: dict[str, float] = {}

    def _new_iteration(self) -> None:
        self.deltas = directions(self.cfg.run.seed, self.iteration, self.n, self.spec.num_params)
        self.returns = np.full((self.n, 2), np.nan)  # (N, 2): r+, r−
        self.received = np.zeros((self.n, 2), dtype=bool)
        self.issued = 0  # episodes of this iteration handed out so far (of 2N)

    # ------------------------------------------------------------------ proposing policies
    def _batch(self, kind: Kind, ids: np.ndarray, params: np.ndarray) -> ParamBatch:
        # no commands (NaN); statistics fixed through the episode (see the module docstring)
        return self.param_batch(kind, ids, np.full(len(ids), np.nan), params, follow_stats=False)

    def propose(self, n: int) -> ParamBatch:
        """The next ``n`` (or fewer: what is left) perturbed policies of this iteration. Once
        all 2N are out the batch is empty, until the iteration's last result comes in."""
        take = max(0, min(n, 2 * self.n - self.issued))
        slots = np.arange(self.issued, self.issued + take)
        self.issued += take
        signs = np.where(slots % 2 == 0, 1.0, -1.0)[:, None]
        params = self.policy_params + signs * self.cfg.ars.noise * self.deltas[slots // 2]
        ids = (self.iteration * 2 * self.n + slots).astype(np.int64)
        return self._batch("train", ids, params)

    def eval_command(self) -> float:
        return float("nan")  # ARS policies take no command

    def propose_eval(
        self, commands: list[float] | None = None, episodes: int = 1, contexts=None
    ) -> ParamBatch:
        """``episodes`` copies of θ_k (one set per command given; the commands are ignored).
        ARS trains one policy for one task: it takes no context."""
        if contexts is not None:
            raise ValueError("an ARS run is not on a task family; it takes no context")
        n = episodes * (1 if commands is None else len(commands))
        ids = np.arange(self.next_eval_id, self.next_eval_id + n, dtype=np.int64)
        self.next_eval_id += n
        return self._batch("eval", ids, np.tile(self.policy_params, (n, 1)))

    def _nets_state(self) -> dict:
        return {"policy_params": torch.from_numpy(self.policy_params.copy())}

    def _load_nets_state(self, nets: dict) -> None:
        self.policy_params = nets["policy_params"].numpy().astype(np.float64)

    # ------------------------------------------------------------------ learning
    def take_in(self, batch: EpisodeBatch) -> int:
        """Record the returns of finished episodes of this iteration and keep their
        observation statistics for its end. Returns how many did not fail."""
        if batch.kind != "train":
            raise ValueError("only training episodes enter the learner")
        self.pending_stats.merge(
            ObsStats(self.spec.obs_dim, batch.obs_count, batch.obs_mean, batch.obs_m2)
        )
        ok = 0
        for i, episode_id in enumerate(batch.episode_ids):
            iteration, slot = divmod(int(episode_id), 2 * self.n)
            if iteration != self.iteration or slot >= self.issued:
                raise ValueError(
                    f"episode {episode_id} belongs to ARS iteration {iteration}, slot {slot}; "
                    f"the learner is at iteration {self.iteration} with {self.issued} slots out"
                )
            direction, sign = divmod(slot, 2)
            self.received[direction, sign] = True
            if batch.failures[i] is not None:
                self.failed_episodes += 1
                continue
            r = training_return(
                float(batch.returns[i]), int(batch.lengths[i]), self.cfg.env.survival_offset
            )
            self.returns[direction, sign] = r
            self.best_return = r if self.best_return is None else max(self.best_return, r)
            self.env_steps += int(batch.lengths[i])
            self.episodes += 1
            ok += 1
        return ok

    def update(self) -> bool:
        """Step θ once every episode of the iteration is in; then start the next one."""
        if not self.received.all():
            return False
        change, self.figures = ars_step(
            self.deltas, self.returns, self.cfg.ars.top_directions, self.cfg.ars.step_size
        )
        self.policy_params = self.policy_params + change
        finite = self.returns[np.isfinite(self.returns)]
        self.last_return = float(finite.mean()) if len(finite) else float("nan")
        self.obs_stats.merge(self.pending_stats)
        self.pending_stats = ObsStats(self.spec.obs_dim)
        self.iteration += 1
        self._new_iteration()
        return True

    def learn(self) -> None:
        """Step θ if the results taken in complete the iteration (``step`` then hands out
        the next perturbations; empty batches while the iteration's 2N are all out)."""
        self.update()

    def stats(self, update_seconds: float = 0.0) -> LearnerStats:
        return LearnerStats(
            env_steps=self.env_steps,
            episodes=self.episodes,
            failed_episodes=self.failed_episodes,
            best_return=float("nan") if self.best_return is None else self.best_return,
            last_return=self.last_return,
            learner_seconds=self.learner_seconds,
            update_seconds=update_seconds,
            rounds=self.iteration,
            metrics={
                "ars/policy_norm": float(np.linalg.norm(self.policy_params)),
                "eval/restores": self.restores,
            }
            | self.figures,
        )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """θ, the iteration in progress and the statistics, as tensors and plain values.
        The directions are not stored: they follow from the seed and the iteration."""

        def stats(s: ObsStats) -> dict:
            return {k: torch.as_tensor(v) for k, v in s.state_dict().items()}

        return {
            "algorithm": "ars",
            "policy_params": torch.from_numpy(self.policy_params.copy()),
            # returns of the iteration so far; NaN (not in, or failed) stored as 0 + mask
            "returns": torch.from_numpy(np.nan_to_num(self.returns, nan=0.0)),
            "returned": torch.from_numpy(np.isfinite(self.returns)),
            "received": torch.from_numpy(self.received.copy()),
            "obs_stats": stats(self.obs_stats),
            "pending_stats": stats(self.pending_stats),
            "best_return": self.best_return,
            "figures": dict(self.figures),
            **self._eval_state(),
            "counters": {
                "iteration": self.iteration,
                "issued": self.issued,
                "env_steps": self.env_steps,
                "episodes": self.episodes,
                "failed_episodes": self.failed_episodes,
                "next_eval_id": self.next_eval_id,
                "learner_seconds": self.learner_seconds,
                "last_return": self.last_return,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("algorithm") != "ars":
            raise ValueError("not an ARS learner state (a GoGePo checkpoint?)")
        params = state["policy_params"].numpy()
        if params.shape != (self.spec.num_params,):
            raise ValueError(
                f"policy_params has {params.shape[0]} entries, the policy needs {self.spec.num_params}"
            )
        c = state["counters"]
        self.iteration = int(c["iteration"])
        self._new_iteration()
        self.policy_params = params.astype(np.float64)
        self.returns = np.where(state["returned"].numpy(), state["returns"].numpy(), np.nan)
        self.received = state["received"].numpy().astype(bool)
        self.issued = int(c["issued"])

        def stats(d: dict) -> ObsStats:
            return ObsStats.from_state_dict(
                {"count": int(d["count"]), "mean": d["mean"].numpy(), "m2": d["m2"].numpy()}
            )

        self.obs_stats = stats(state["obs_stats"])
        self.pending_stats = stats(state["pending_stats"])
        self.best_return = state["best_return"]
        self.figures = {k: float(v) for k, v in state["figures"].items()}
        self._load_eval_state(state)
        self.env_steps, self.episodes = int(c["env_steps"]), int(c["episodes"])
        self.failed_episodes = int(c["failed_episodes"])
        self.next_eval_id = int(c["next_eval_id"])
        self.learner_seconds = float(c["learner_seconds"])
        self.last_return = float(c["last_return"])
