"""Running generated policies in gymnasium envs: the body of a rollout worker.

A worker holds a few envs and runs one policy per env in lockstep, with one batched
policy forward per step for all envs still running. It is stateless apart from its envs:
every episode's reset seed comes with the ParamBatch, so re-issuing a batch replays it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from gogepo_ray.core.normalizer import ObsStats
from gogepo_ray.core.policy import PolicySpec, policy_preactivation
from gogepo_ray.envs import make_env
from gogepo_ray.types import EpisodeBatch, ParamBatch


class Rollouts:
    def __init__(
        self,
        env_id: str,
        spec: PolicySpec,
        *,
        env_kwargs: dict | None = None,
        max_episode_steps: int | None = None,
    ) -> None:
        torch.set_num_threads(1)
        self.env_id, self.env_kwargs, self.max_episode_steps = (
            env_id,
            env_kwargs or {},
            max_episode_steps,
        )
        self.spec = spec
        # tanh output -> action bounds, precomputed once instead of on every env step
        low, high = (
            np.asarray(spec.action_low, np.float32),
            np.asarray(spec.action_high, np.float32),
        )
        self._act_mid, self._act_half = (high + low) / 2, (high - low) / 2
        self.envs: list = []

    def _env(self, i: int):
        while len(self.envs) <= i:
            self.envs.append(make_env(self.env_id, self.env_kwargs, self.max_episode_steps))
        return self.envs[i]

    def run(self, batch: ParamBatch) -> EpisodeBatch:
        """One episode per policy in ``batch``; returns true returns, lengths, obs-stat delta."""
        start = time.perf_counter()
        n = len(batch.episode_ids)
        params = torch.from_numpy(np.ascontiguousarray(batch.policy_params, dtype=np.float32))
        # Training policies see statistics that follow every step, as in the paper's code:
        # the master statistics plus this batch's observations so far, the current one
        # included. Evaluation uses the master statistics as they are; with none yet
        # (the first policies of a run) observations go in raw.
        stats = batch.obs_stats()
        mean, std = stats.normalizer()
        train = batch.kind == "train"
        follow = train and stats.count > 0
        returns = np.zeros(n, np.float64)
        lengths = np.zeros(n, np.int64)
        failures: list[str | None] = [None] * n
        obs = np.zeros((n, self.spec.obs_dim), np.float32)
        seen: list[list[np.ndarray]] = [[] for _ in range(n)]
        running = []
        for i in range(n):
            try:
                o, _ = self._env(i).reset(seed=int(batch.seeds[i]))
                obs[i] = o
                if train:
                    seen[i].append(np.asarray(o, np.float64))
                running.append(i)
            except Exception as exc:  # noqa: BLE001 - a broken env must not kill the worker
                failures[i] = f"env reset raised {type(exc).__name__}: {exc}"
        with torch.inference_mode():
            while running:
                idx = np.asarray(running)
                if follow:
                    stats.update(obs[idx])
                    mean, std = stats.normalizer()
                x = torch.from_numpy((obs[idx] - mean) / std).unsqueeze(1)  # (m, 1, obs_dim)
                z = policy_preactivation(self.spec, params[idx], x)[:, 0].numpy()  # (m, act_dim)
                acts = self._act_mid + self._act_half * np.tanh(z)
                still = []
                for j, i in enumerate(running):
                    a = acts[j]
                    if not np.all(np.isfinite(a)):
                        failures[i] = "policy produced a non-finite action"
                        continue
                    try:
                        o, r, terminated, truncated, _ = self.envs[i].step(a)
                    except Exception as exc:  # noqa: BLE001
                        failures[i] = f"env step raised {type(exc).__name__}: {exc}"
                        continue
                    lengths[i] += 1
                    returns[i] += float(r)
                    if not (np.isfinite(r) and np.all(np.isfinite(o))):
                        failures[i] = "env returned a non-finite reward or observation"
                        continue
                    if terminated or truncated:
                        continue
                    obs[i] = o
                    if train:
                        seen[i].append(np.asarray(o, np.float64))
                    still.append(i)
                running = still
        delta = ObsStats(self.spec.obs_dim)  # training steps only: ``seen`` is empty for eval
        for i in range(n):
            if failures[i] is None and seen[i]:
                delta.update(np.stack(seen[i]))
        return EpisodeBatch(
            kind=batch.kind,
            episode_ids=batch.episode_ids,
            commands=batch.commands,
            policy_params=batch.policy_params,
            returns=returns,
            lengths=lengths,
            failures=tuple(failures),
            obs_count=delta.count,
            obs_mean=delta.mean,
            obs_m2=delta.m2,
            rollout_seconds=time.perf_counter() - start,
        )

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []
