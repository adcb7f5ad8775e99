"""Running generated policies in gymnasium envs: the body of a rollout worker.

A worker holds a few envs and runs one policy per env in lockstep, with one batched
policy forward per step for all envs still running. It is stateless apart from its envs:
every episode's reset seed comes with the ParamBatch, so re-issuing a batch replays it.

The per-step work other than ``env.step`` (checking the observations, recording them
for the statistics delta, merging them into the statistics the policies follow,
normalising, the MLP forward and the map onto the action bounds) is one compiled call
(numba), on buffers allocated once per batch. In Python each of those is a numpy call of
about a microsecond, and a 256×256 policy with 1 env spent most of a MuJoCo step's time
on them; see ``bench/throughput.py`` and README "Performance".
"""

from __future__ import annotations

import math
import time

import numba
import numpy as np

from gogepo_ray.core.normalizer import EPS, ObsStats
from gogepo_ray.core.policy import PolicySpec
from gogepo_ray.envs import make_env
from gogepo_ray.types import EpisodeBatch, ParamBatch

# tanh as the rational approximation used by Eigen's vectorised float32 tanh: within
# 3e-7 of the exact value everywhere (numpy's float32 tanh is within 6e-8), and unlike a
# libm call per unit it compiles to SIMD code. 512 libm tanh calls per step cost more
# than the 256×256 matrix-vector product.
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (
    4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
    -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16,
)  # fmt: skip
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)


@numba.njit(cache=True, fastmath={"contract"}, inline="always")
def _tanh(x):  # pragma: no cover - compiled
    f = np.float32
    x = min(max(x, f(-_TANH_CLAMP)), f(_TANH_CLAMP))
    x2 = x * x
    p = x2 * f(_TANH_P[6]) + f(_TANH_P[5])
    for c in (_TANH_P[4], _TANH_P[3], _TANH_P[2], _TANH_P[1], _TANH_P[0]):
        p = x2 * p + f(c)
    q = x2 * f(_TANH_Q[3]) + f(_TANH_Q[2])
    q = x2 * q + f(_TANH_Q[1])
    q = x2 * q + f(_TANH_Q[0])
    return x * p / q


@numba.njit(cache=True, fastmath={"reassoc", "contract"}, inline="always")
def _matvec(w, h, z):  # pragma: no cover - compiled
    """z = w @ h for w (n_out, n_in) float32, row-major. Four rows at a time share each
    load of h[i]; with reassociation LLVM vectorises the four dot products. On a 256×256
    layer this takes 4.3 µs where a BLAS sgemv call takes 7.0 (one AVX-512 core): a BLAS
    call's fixed costs are large at this size."""
    n_out, n_in = w.shape
    o = 0
    while o + 4 <= n_out:
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for i in range(n_in):
            hi = h[i]
            a0 += w[o, i] * hi
            a1 += w[o + 1, i] * hi
            a2 += w[o + 2, i] * hi
            a3 += w[o + 3, i] * hi
        z[o], z[o + 1], z[o + 2], z[o + 3] = a0, a1, a2, a3
        o += 4
    while o < n_out:
        acc = np.float32(0.0)
        for i in range(n_in):
            acc += w[o, i] * h[i]
        z[o] = acc
        o += 1


@numba.njit(cache=True, fastmath={"reassoc", "contract"})
def _mlp(params, sizes, x):  # pragma: no cover - compiled
    """tanh(z) of one policy on one normalised observation: the maths of
    ``core.policy.policy_actions`` before the map onto the bounds. params (D,) float32 in
    the flat layout of ``PolicySpec`` (per layer W (out, in) row-major, then b); x
    (obs_dim,) float32."""
    h = x
    offset = 0
    for layer in range(len(sizes) - 1):
        n_in, n_out = sizes[layer], sizes[layer + 1]
        bias = offset + n_out * n_in
        z = np.empty(n_out, np.float32)
        _matvec(params[offset:bias].reshape((n_out, n_in)), h, z)
        for o in range(n_out):
            z[o] = _tanh(z[o] + params[bias + o])
        h = z
        offset = bias + n_out
    return h


# Layout of the control array of ``_policy_step`` (few arguments: numba's dispatch cost
# grows with their number, and it is paid on every env step).
_FOLLOW, _NORMALISE, _N_ROWS, _COUNT, _SIZES = 0, 1, 2, 3, 4


@numba.njit(cache=True)
def _policy_step(params, running, obs, stats, ctl, rows, bounds, out):  # pragma: no cover
    """Everything a worker does per step before ``env.step``, for the running envs.

    params (n, D) float32; running (m,) rows of ``obs`` (n, obs_dim) to act on; stats
    (3, obs_dim): mean, M2 and std + eps the policies see; ctl int64: follow the
    statistics, normalise, recorded rows, statistics count, then the layer sizes; rows
    (cap, obs_dim + 1): observations kept for the statistics delta, env index last;
    bounds (2, act_dim): centre and half-width of the action box. Writes the actions to
    out[j, :act_dim] and 1.0 to out[j, act_dim] where an action is not finite.
    Returns -1 (and does nothing) when an observation is not finite, else the number of
    non-finite actions.
    """
    m, dim = len(running), obs.shape[1]
    sizes = ctl[_SIZES:]
    mean, m2, std = stats[0], stats[1], stats[2]
    for j in range(m):
        for k in range(dim):
            if not math.isfinite(obs[running[j], k]):
                return -1
    n_rows = ctl[_N_ROWS]
    if n_rows >= 0:  # training: keep the observations for the statistics delta
        for j in range(m):
            for k in range(dim):
                rows[n_rows + j, k] = obs[running[j], k]
            rows[n_rows + j, dim] = running[j]
        ctl[_N_ROWS] = n_rows + m
    if ctl[_FOLLOW]:  # merge each observation into the statistics the policies see (Chan)
        count = ctl[_COUNT]
        for j in range(m):
            total = count + 1
            for k in range(dim):
                d = obs[running[j], k] - mean[k]
                mean[k] += d * (1.0 / total)
                m2[k] += d * d * (count / total)
            count = total
        ctl[_COUNT] = count
        for k in range(dim):
            std[k] = math.sqrt(m2[k] / count) + EPS
    x = np.empty(dim, np.float32)
    act_dim = bounds.shape[1]
    n_bad = 0
    for j in range(m):
        for k in range(dim):
            v = obs[running[j], k]
            x[k] = (v - mean[k]) / std[k] if ctl[_NORMALISE] else v
        z = _mlp(params[running[j]], sizes, x)
        bad = 0.0
        for a in range(act_dim):
            out[j, a] = bounds[0, a] + bounds[1, a] * z[a]
            if not math.isfinite(out[j, a]):
                bad = 1.0
        out[j, act_dim] = bad
        n_bad += bad > 0
    return n_bad


def _action_box(spec: PolicySpec) -> np.ndarray:
    """(2, act_dim): centre and half-width of the action bounds, what tanh is mapped onto."""
    low, high = np.asarray(spec.action_low), np.asarray(spec.action_high)
    return np.stack([(high + low) / 2, (high - low) / 2])


def worker_actions(spec: PolicySpec, policy_params: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Actions of policy j on obs[j], raw observations (no statistics), through the worker's
    compiled per-step path: (B, D), (B, obs_dim) -> (B, act_dim)."""
    n = len(policy_params)
    obs = np.ascontiguousarray(obs, np.float64)
    ctl = np.array([0, 0, -1, 0, *spec.layer_sizes], np.int64)
    stats = np.stack([np.zeros(spec.obs_dim), np.zeros(spec.obs_dim), np.ones(spec.obs_dim)])
    out = np.empty((n, spec.act_dim + 1))
    params = np.ascontiguousarray(policy_params, np.float32)
    rows = np.empty((0, spec.obs_dim + 1))
    if _policy_step(params, np.arange(n), obs, stats, ctl, rows, _action_box(spec), out) < 0:
        raise ValueError("observations must be finite")
    return out[:, : spec.act_dim]


class Rollouts:
    def __init__(
        self,
        env_id: str,
        spec: PolicySpec,
        *,
        env_kwargs: dict | None = None,
        max_episode_steps: int | None = None,
    ) -> None:
        self.env_id, self.env_kwargs, self.max_episode_steps = (
            env_id,
            env_kwargs or {},
            max_episode_steps,
        )
        self.spec = spec
        self._bounds = _action_box(spec)
        self.envs: list = []

    def _env(self, i: int):
        while len(self.envs) <= i:
            self.envs.append(make_env(self.env_id, self.env_kwargs, self.max_episode_steps))
        return self.envs[i]

    def run(self, batch: ParamBatch) -> EpisodeBatch:
        """One episode per policy in ``batch``; returns true returns, lengths, obs-stat delta."""
        start = time.perf_counter()
        n, dim = len(batch.episode_ids), self.spec.obs_dim
        params = np.ascontiguousarray(batch.policy_params, dtype=np.float32)
        if params.shape != (n, self.spec.num_params):
            raise ValueError(
                f"batch policy_params is {params.shape}, expected ({n}, {self.spec.num_params})"
            )
        # Training policies see statistics that follow every step, as in the paper's code:
        # the master statistics plus this batch's observations so far, the current one
        # included. Evaluation uses the master statistics as they are; with none yet
        # (the first policies of a run) observations go in raw.
        master = batch.obs_stats()
        train = batch.kind == "train"
        ctl = np.array(
            [
                train and batch.follow_stats and master.count > 0,
                master.count > 0,
                0 if train else -1,
                master.count,
            ]
            + list(self.spec.layer_sizes),
            np.int64,
        )
        stats = np.stack([master.mean, master.m2, master.std + EPS])  # (3, obs_dim)
        rows = np.empty((4096 if train else 0, dim + 1), np.float64)
        returns = [0.0] * n
        lengths = [0] * n
        failures: list[str | None] = [None] * n
        obs = np.zeros((n, dim), np.float64)
        running: list[int] = []
        contexts = batch.contexts
        for i in range(n):
            try:
                options = None if contexts is None else {"context": contexts[i]}
                obs[i] = self._env(i).reset(seed=int(batch.seeds[i]), options=options)[0]
                running.append(i)
            except Exception as exc:  # noqa: BLE001 - a broken env must not kill the worker
                failures[i] = f"env reset raised {type(exc).__name__}: {exc}"
        envs = self.envs
        idx = np.asarray(running, np.int64)
        act_dim = self.spec.act_dim
        out = np.empty((n, act_dim + 1), np.float64)  # actions, then 1.0 where not finite
        actions = [out[j, :act_dim] for j in range(n)]  # views, made once
        room = len(rows)  # rows left before the block must grow
        while running:
            m = len(running)
            if train:
                room -= m
                if room < 0:
                    room += len(rows)
                    rows = np.concatenate([rows, np.empty_like(rows)])
            n_bad = _policy_step(params, idx, obs, stats, ctl, rows, self._bounds, out)
            if n_bad < 0:
                # an env returned a non-finite observation: drop those episodes
                for i in running:
                    if not np.isfinite(obs[i]).all():
                        failures[i] = "env returned a non-finite reward or observation"
                running = [i for i in running if failures[i] is None]
                idx = np.asarray(running, np.int64)
                continue
            still = []
            for j, i in enumerate(running):
                if n_bad and out[j, act_dim]:
                    failures[i] = "policy produced a non-finite action"
                    continue
                try:
                    o, r, terminated, truncated, _ = envs[i].step(actions[j])
                except Exception as exc:  # noqa: BLE001
                    failures[i] = f"env step raised {type(exc).__name__}: {exc}"
                    continue
                lengths[i] += 1
                r = float(r)
                returns[i] += r
                if not math.isfinite(r):
                    failures[i] = "env returned a non-finite reward or observation"
                    continue
                if terminated or truncated:
                    if not np.isfinite(o).all():
                        failures[i] = "env returned a non-finite reward or observation"
                    continue
                obs[i] = o  # checked for finiteness before the next forward
                still.append(i)
            if len(still) != m:
                idx = np.asarray(still, np.int64)
            running = still
        # Statistics delta: training steps of the episodes that did not fail.
        delta = ObsStats(dim)
        if train:
            ok = np.array([f is None for f in failures], dtype=bool)
            kept = rows[: ctl[_N_ROWS]]
            delta.update(kept[ok[kept[:, dim].astype(np.int64)], :dim])
        return EpisodeBatch(
            kind=batch.kind,
            episode_ids=batch.episode_ids,
            commands=batch.commands,
            policy_params=batch.policy_params,
            returns=np.asarray(returns, np.float64),
            lengths=np.asarray(lengths, np.int64),
            failures=tuple(failures),
            obs_count=delta.count,
            obs_mean=delta.mean,
            obs_m2=delta.m2,
            rollout_seconds=time.perf_counter() - start,
            contexts=contexts,
        )

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []
