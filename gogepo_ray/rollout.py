"""Running generated policies in gymnasium envs: the body of a rollout worker.

A worker holds one env and runs the policies of a batch one after another, each for one
episode. It is stateless apart from its env: every episode's reset seed comes with the
ParamBatch, so re-issuing a batch replays it. (Episodes in lockstep over several envs
bought nothing once the forward was per policy, and cost cache: between two calls of one
policy the other policies' weights, 1 MB for four 256×256 policies, pushed it out.)

The per-step work other than ``env.step`` (checking the observation, recording it for
the statistics delta, merging it into the statistics the policy follows, normalising,
the MLP forward and the map onto the action bounds) is one compiled call (numba), on
buffers allocated once per batch. In Python each of those is a numpy call of about a
microsecond, and a 256×256 policy spent most of a MuJoCo step's time on them; see
``bench/throughput.py`` and docs/benchmarks.md "Rollout workers".
"""

from __future__ import annotations

import math
import time

import gymnasium as gym
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


@numba.njit(cache=True, fastmath={"reassoc", "contract"}, error_model="numpy")
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


# error_model="numpy": a float division is not checked for a zero divisor (which in
# Python raises). The check is a branch per division that keeps LLVM from vectorising
# the tanh over a layer's units: 2.0 µs against 0.2 µs for 512 units. A zero divisor
# cannot occur here (std carries + EPS, counts are positive); were it to, the inf or NaN
# it gives is caught by the finiteness checks like any other.
@numba.njit(cache=True, error_model="numpy")
def _policy_step(params, obs, stats, ctl, rows, bounds, out):  # pragma: no cover - compiled
    """Everything a worker does per step before ``env.step``, for one policy.

    params (D,) float32: the episode's policy; obs (obs_dim,) float64; stats (3, obs_dim):
    mean, M2 and std + eps the policy sees; ctl int64: follow the statistics, normalise,
    recorded rows, statistics count, then the layer sizes; rows (cap, obs_dim):
    observations kept for the statistics delta; bounds (2, act_dim): centre and
    half-width of the action box. Writes the action to out
    (act_dim,). Returns -1 (and does nothing) when the observation is not finite, 1 when
    the action is not, else 0.
    """
    dim = obs.shape[0]
    sizes = ctl[_SIZES:]
    mean, m2, std = stats[0], stats[1], stats[2]
    for k in range(dim):
        if not math.isfinite(obs[k]):
            return -1
    n_rows = ctl[_N_ROWS]
    if n_rows >= 0:  # training: keep the observation for the statistics delta
        for k in range(dim):
            rows[n_rows, k] = obs[k]
        ctl[_N_ROWS] = n_rows + 1
    if ctl[_FOLLOW]:  # merge the observation into the statistics the policy sees (Chan)
        count = ctl[_COUNT]
        total = count + 1
        for k in range(dim):
            d = obs[k] - mean[k]
            mean[k] += d * (1.0 / total)
            m2[k] += d * d * (count / total)
            std[k] = math.sqrt(m2[k] / total) + EPS
        ctl[_COUNT] = total
    x = np.empty(dim, np.float32)
    for k in range(dim):
        x[k] = (obs[k] - mean[k]) / std[k] if ctl[_NORMALISE] else obs[k]
    z = _mlp(params, sizes, x)
    bad = 0
    for a in range(bounds.shape[1]):
        out[a] = bounds[0, a] + bounds[1, a] * z[a]
        if not math.isfinite(out[a]):
            bad = 1
    return bad


def _action_box(spec: PolicySpec) -> np.ndarray:
    """(2, act_dim): centre and half-width of the action bounds, what tanh is mapped onto."""
    low, high = np.asarray(spec.action_low), np.asarray(spec.action_high)
    return np.stack([(high + low) / 2, (high - low) / 2])


def worker_actions(spec: PolicySpec, policy_params: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Actions of policy j on obs[j], raw observations (no statistics), through the worker's
    compiled per-step path: (B, D), (B, obs_dim) -> (B, act_dim)."""
    obs = np.ascontiguousarray(obs, np.float64)
    ctl = np.array([0, 0, -1, 0, *spec.layer_sizes], np.int64)
    stats = np.stack([np.zeros(spec.obs_dim), np.zeros(spec.obs_dim), np.ones(spec.obs_dim)])
    out = np.empty((len(policy_params), spec.act_dim))
    params = np.ascontiguousarray(policy_params, np.float32)
    rows, box = np.empty((0, spec.obs_dim)), _action_box(spec)
    for j in range(len(params)):
        if _policy_step(params[j], obs[j], stats, ctl, rows, box, out[j]) < 0:
            raise ValueError("observations must be finite")
    return out


# Wrappers that only count steps or check the call order: a worker does both itself and
# steps the env inside them, which saves about 2 µs of Python per step (HalfCheetah-v5:
# 97 µs through ``gym.make``'s TimeLimit and OrderEnforcing, 95 µs without). Any other
# wrapper (a user's, the video recorder's) stays in the path.
_PASS_THROUGH = (gym.wrappers.TimeLimit, gym.wrappers.OrderEnforcing)


def _inner_step(env: gym.Env) -> tuple:
    """(step function, step limit or None): ``env.step`` with the pass-through wrappers
    on the outside peeled off, and the smallest TimeLimit among them."""
    limit = None
    while type(env) in _PASS_THROUGH:
        if type(env) is gym.wrappers.TimeLimit:
            steps = env._max_episode_steps
            limit = steps if limit is None else min(limit, steps)
        env = env.env
    return env.step, limit


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
        self.env: gym.Env | None = None  # made on the first batch; render.py sets its own

    def _env(self) -> gym.Env:
        if self.env is None:
            self.env = make_env(self.env_id, self.env_kwargs, self.max_episode_steps)
        return self.env

    def run(self, batch: ParamBatch) -> EpisodeBatch:
        """One episode per policy in ``batch``, one after another on the worker's env;
        returns true returns, lengths and the observation-statistics delta."""
        start = time.perf_counter()
        n, dim = len(batch.episode_ids), self.spec.obs_dim
        params = np.ascontiguousarray(batch.policy_params, dtype=np.float32)
        if params.shape != (n, self.spec.num_params):
            raise ValueError(
                f"batch policy_params is {params.shape}, expected ({n}, {self.spec.num_params})"
            )
        # Training policies see statistics that follow every step, as in the paper's code:
        # the master statistics plus this batch's observations so far (earlier episodes'
        # and this one's, the current observation included). Evaluation uses the master
        # statistics as they are; with none yet (the first policies of a run)
        # observations go in raw.
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
        # Observations of training episodes for the statistics delta, one block per
        # episode in order; a failed episode's block is given back.
        rows = np.empty((4096 if train else 0, dim), np.float64)
        returns = np.zeros(n, np.float64)
        lengths = np.zeros(n, np.int64)
        failures: list[str | None] = [None] * n
        obs = np.zeros(dim, np.float64)
        action = np.empty(self.spec.act_dim, np.float64)
        bounds, contexts = self._bounds, batch.contexts
        env = self._env()
        step, limit = _inner_step(env)
        for i in range(n):
            try:
                options = None if contexts is None else {"context": contexts[i]}
                obs[:] = env.reset(seed=int(batch.seeds[i]), options=options)[0]
            except Exception as exc:  # noqa: BLE001 - a broken env must not kill the worker
                failures[i] = f"env reset raised {type(exc).__name__}: {exc}"
                continue
            policy, first_row = params[i], int(ctl[_N_ROWS])
            room = len(rows) - first_row  # rows left before the block must grow
            ret, length, failure = 0.0, 0, None
            while True:
                if train:
                    if room == 0:
                        room = len(rows)
                        rows = np.concatenate([rows, np.empty_like(rows)])
                    room -= 1
                n_bad = _policy_step(policy, obs, stats, ctl, rows, bounds, action)
                if n_bad:
                    failure = (
                        "env returned a non-finite reward or observation"
                        if n_bad < 0
                        else "policy produced a non-finite action"
                    )
                    break
                try:
                    o, r, terminated, truncated, _ = step(action)
                except Exception as exc:  # noqa: BLE001
                    failure = f"env step raised {type(exc).__name__}: {exc}"
                    break
                length += 1
                r = float(r)
                ret += r
                if not math.isfinite(r):
                    failure = "env returned a non-finite reward or observation"
                    break
                if terminated or truncated or length == limit:
                    if not np.isfinite(o).all():
                        failure = "env returned a non-finite reward or observation"
                    break
                obs[:] = o  # checked for finiteness by the next forward
            returns[i], lengths[i], failures[i] = ret, length, failure
            if failure is not None and train:
                ctl[_N_ROWS] = first_row  # its observations stay out of the delta
        # Statistics delta: training steps of the episodes that did not fail.
        delta = ObsStats(dim)
        if train:
            delta.update(rows[: ctl[_N_ROWS]])
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
            contexts=contexts,
        )

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
        self.env = None
