"""The rollout worker's body on real gymnasium envs: which observation statistics a policy
sees at each step, and what the worker sends back."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from gogepo_ray.core.normalizer import ObsStats
from gogepo_ray.core.policy import PolicySpec, policy_actions
from gogepo_ray.envs import policy_spec
from gogepo_ray.rollout import Rollouts, worker_actions
from gogepo_ray.types import ParamBatch

ENV = "Pendulum-v1"  # 200 steps always, reward depends on every action


def _batch(kind, spec, stats: ObsStats, n=2, seed=0):
    rng = np.random.default_rng(seed)
    params = rng.normal(0, 0.3, size=(n, spec.num_params)).astype(np.float32)
    return ParamBatch(
        kind,
        np.arange(n),
        np.arange(100, 100 + n),
        np.zeros(n),
        params,
        stats.count,
        stats.mean.copy(),
        stats.m2.copy(),
    )


def _replay(spec, batch, follow: bool):
    """The batch's episodes written out step by step, one after another, the statistics
    following every observation of the batch so far (the earlier episodes' and this
    one's): what the worker must match."""
    env = gym.make(ENV)
    stats = ObsStats(spec.obs_dim, batch.obs_count, batch.obs_mean.copy(), batch.obs_m2.copy())
    mean, std = batch.normalizer()
    totals = []
    for seed, params in zip(batch.seeds, torch.from_numpy(batch.policy_params)):
        obs, total = env.reset(seed=int(seed))[0].astype(np.float32), 0.0
        for _ in range(200):  # Pendulum-v1 always runs 200 steps
            if follow:
                stats.update(obs[None])
                mean, std = stats.normalizer()
            x = torch.from_numpy((obs - mean) / std)[None, None]
            action = policy_actions(spec, params[None], x)[0, 0].numpy()
            obs, reward = env.step(action)[:2]
            obs, total = obs.astype(np.float32), total + reward
        totals.append(total)
    return np.asarray(totals)


def _master(spec):
    stats = ObsStats(spec.obs_dim)
    stats.update(
        np.random.default_rng(3).normal([0.5, 0.2, 1.0], [0.3, 0.5, 2.0], size=(40, spec.obs_dim))
    )
    return stats


def test_training_policies_see_statistics_that_follow_every_step():
    spec = policy_spec(ENV, [16, 16])
    batch = _batch("train", spec, _master(spec))
    result = Rollouts(ENV, spec).run(batch)
    follow, frozen = _replay(spec, batch, True), _replay(spec, batch, False)
    assert np.all(np.abs(follow - frozen) > 1e-3)  # the test can tell the two apart
    assert np.allclose(result.returns, follow, rtol=1e-5), (result.returns, follow, frozen)
    # The delta sent back holds this batch's observations only, not the master's.
    assert result.obs_count == int(result.lengths.sum()) == 400


def test_evaluation_uses_the_master_statistics_unchanged():
    spec = policy_spec(ENV, [16, 16])
    batch = _batch("eval", spec, _master(spec))
    result = Rollouts(ENV, spec).run(batch)
    assert np.allclose(result.returns, _replay(spec, batch, False), rtol=1e-5)
    assert result.obs_count == 0


def test_first_policies_of_a_run_see_raw_observations():
    spec = policy_spec(ENV, [16, 16])
    batch = _batch("train", spec, ObsStats(spec.obs_dim))  # no statistics yet
    result = Rollouts(ENV, spec).run(batch)
    assert np.allclose(result.returns, _replay(spec, batch, False), rtol=1e-5)
    assert result.obs_count == 400


@pytest.mark.parametrize(
    "obs_dim,act_dim,hidden",
    [(3, 1, (16, 16)), (11, 3, (256, 256)), (17, 6, (64,)), (5, 2, ())],
)
def test_worker_forward_gives_the_torch_policys_actions(obs_dim, act_dim, hidden):
    """The worker's compiled per-step forward against ``core.policy.policy_actions`` (the
    torch maths the critic and export use): same actions within float32 rounding, for
    deep, shallow and linear policies and asymmetric action bounds."""
    rng = np.random.default_rng(obs_dim)
    low = tuple(rng.uniform(-2, 0, act_dim))
    high = tuple(np.asarray(low) + rng.uniform(0.5, 3, act_dim))
    spec = PolicySpec(obs_dim, act_dim, hidden, low, high)
    parts = []
    for out, inp in spec.layer_shapes:
        parts += [rng.normal(0, 1.5 / np.sqrt(inp), (6, out * inp)), rng.normal(0, 0.3, (6, out))]
    params = np.concatenate(parts, axis=1).astype(np.float32)  # (6, D)
    obs = rng.normal(0, 2, (6, obs_dim))
    expected = policy_actions(
        spec, torch.from_numpy(params), torch.from_numpy(obs.astype(np.float32))[:, None]
    )[:, 0].numpy()
    got = worker_actions(spec, params, obs)
    assert got.shape == expected.shape == (6, act_dim)
    span = np.asarray(high) - np.asarray(low)
    assert np.all(np.abs(got - expected) <= 2e-5 * span), np.abs(got - expected).max()
    assert np.all(got >= np.asarray(low)) and np.all(got <= np.asarray(high))
