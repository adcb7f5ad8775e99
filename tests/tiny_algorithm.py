"""A third algorithm, registered by the tests only: a (1+1) hill climber on the policy's
weights. It shows what adding an algorithm takes: a learner that implements the protocol
of ``gogepo_ray.algorithms`` and one ``register`` call; no other file changes."""

from __future__ import annotations

import numpy as np
import torch

from gogepo_ray.algorithms import Algorithm, register
from gogepo_ray.core.learner import StreamingLearner, training_return
from gogepo_ray.core.normalizer import ObsStats
from gogepo_ray.types import LearnerStats

ENTRY = Algorithm(
    name="hillclimb",
    learner="tests.tiny_algorithm:HillClimber",
    takes_commands=False,
    takes_contexts=False,
    rllib_name="GoGePoHillClimb",
    summary="a (1+1) hill climber on the policy weights (test only)",
)


def install() -> Algorithm:
    return register(ENTRY)


class HillClimber(StreamingLearner):
    """θ; each training policy is θ + σε (σ = ``exploration.param_noise``), and one whose
    training return beats θ's best replaces θ."""

    def __init__(self, cfg, spec) -> None:
        self.cfg, self.spec = cfg, spec
        self.rng = np.random.default_rng(cfg.run.seed)
        self.theta = np.zeros(spec.num_params)
        self.theta_return = -np.inf
        self.offers: dict[int, np.ndarray] = {}  # episode id -> the weights it ran
        self.obs_stats = ObsStats(spec.obs_dim)
        self.best_return: float | None = None
        self.env_steps = self.episodes = self.failed_episodes = 0
        self.next_id = {"train": 0, "eval": 0}
        self.learner_seconds = 0.0

    def _ids(self, kind: str, n: int) -> np.ndarray:
        ids = np.arange(self.next_id[kind], self.next_id[kind] + n, dtype=np.int64)
        self.next_id[kind] += n
        return ids

    def propose(self, n: int):
        ids = self._ids("train", n)
        params = self.theta + self.cfg.exploration.param_noise * self.rng.standard_normal(
            (n, self.spec.num_params)
        )
        self.offers.update(zip(ids.tolist(), params))
        return self.param_batch("train", ids, np.full(n, np.nan), params)

    def propose_eval(self, commands=None, episodes: int = 1, contexts=None):
        n = episodes * (1 if commands is None else len(commands))
        ids = self._ids("eval", n)
        return self.param_batch("eval", ids, np.full(n, np.nan), np.tile(self.theta, (n, 1)))

    def eval_command(self) -> float:
        return float("nan")

    def take_in(self, batch) -> int:
        self.obs_stats.merge(
            ObsStats(self.spec.obs_dim, batch.obs_count, batch.obs_mean, batch.obs_m2)
        )
        ok = 0
        for i, episode_id in enumerate(batch.episode_ids):
            params = self.offers.pop(int(episode_id))
            if batch.failures[i] is not None:
                self.failed_episodes += 1
                continue
            r = training_return(
                float(batch.returns[i]), int(batch.lengths[i]), self.cfg.env.survival_offset
            )
            if r > self.theta_return:
                self.theta, self.theta_return = params, r
            self.best_return = r if self.best_return is None else max(self.best_return, r)
            self.env_steps += int(batch.lengths[i])
            self.episodes += 1
            ok += 1
        return ok

    def learn(self) -> None:
        pass  # take_in already kept the better policy

    def stats(self, update_seconds: float = 0.0) -> LearnerStats:
        best = float("nan") if self.best_return is None else self.best_return
        return LearnerStats(
            self.env_steps,
            self.episodes,
            self.failed_episodes,
            best,
            best,
            self.learner_seconds,
            update_seconds,
            self.episodes,
            {"hill/theta_return": float(self.theta_return)},
        )

    def _nets_state(self) -> dict:
        return {"theta": torch.from_numpy(self.theta.copy())}

    def _load_nets_state(self, nets: dict) -> None:
        self.theta = nets["theta"].numpy().copy()

    def state_dict(self) -> dict:
        return {
            "theta": torch.from_numpy(self.theta.copy()),
            "theta_return": float(self.theta_return),
            "obs_stats": {k: torch.as_tensor(v) for k, v in self.obs_stats.state_dict().items()},
            "best_return": self.best_return,
            "counters": [self.env_steps, self.episodes, self.failed_episodes],
            "next_id": dict(self.next_id),
            **self._eval_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.theta = state["theta"].numpy().copy()
        self.theta_return = state["theta_return"]
        o = state["obs_stats"]
        self.obs_stats = ObsStats.from_state_dict(
            {"count": int(o["count"]), "mean": o["mean"].numpy(), "m2": o["m2"].numpy()}
        )
        self.best_return = state["best_return"]
        self.env_steps, self.episodes, self.failed_episodes = state["counters"]
        self.next_id = dict(state["next_id"])
        self._load_eval_state(state)
