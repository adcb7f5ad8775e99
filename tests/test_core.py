"""Unit tests of the pure-torch core (gogepo_ray.core) and the Learner, without Ray and
without stepping any env. Small networks, one torch thread: the whole file runs in seconds.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gogepo_ray.core.buffer import ReplayBuffer
from gogepo_ray.core.critic import Critic
from gogepo_ray.core.generator import Generator
from gogepo_ray.core.learner import (
    Learner,
    critic_loss,
    exploration_command,
    generator_loss,
    training_return,
)
from gogepo_ray.core.normalizer import ObsStats
from gogepo_ray.core.policy import PolicySpec, policy_actions, policy_preactivation, to_sequential
from gogepo_ray.types import episode_seed
from tests.conftest import make_batch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]

LOW, HIGH = (0.0, -1.0), (2.0, 3.0)  # asymmetric action bounds


def make_spec(obs_dim=5, act_dim=2, hidden=(7, 3), low=LOW, high=HIGH) -> PolicySpec:
    return PolicySpec(obs_dim, act_dim, tuple(hidden), tuple(low), tuple(high))


def manual_sequential(spec: PolicySpec, flat: torch.Tensor) -> nn.Sequential:
    """nn.Sequential (Linear, Tanh)* from one flat vector, laid out W_l row-major then b_l,
    sliced here by hand (independent of PolicySpec.split)."""
    sizes = [spec.obs_dim, *spec.hidden, spec.act_dim]
    modules: list[nn.Module] = []
    off = 0
    for i in range(len(sizes) - 1):
        fan_in, out = sizes[i], sizes[i + 1]
        lin = nn.Linear(fan_in, out)
        with torch.no_grad():
            lin.weight.copy_(flat[off : off + out * fan_in].reshape(out, fan_in))
            off += out * fan_in
            lin.bias.copy_(flat[off : off + out])
            off += out
        modules += [lin, nn.Tanh()]
    assert off == flat.numel()
    return nn.Sequential(*modules)


def to_bounds(squashed: torch.Tensor, low, high) -> torch.Tensor:
    low, high = torch.tensor(low), torch.tensor(high)
    return low + (squashed + 1.0) / 2.0 * (high - low)


# ====================================================================== policy
@pytest.mark.parametrize("hidden", [(7, 3), (), (4,)])
def test_policy_actions_match_sequential_per_policy(hidden):
    torch.manual_seed(0)
    spec = make_spec(hidden=hidden)
    B, N = 4, 6
    params = torch.randn(B, spec.num_params)
    obs = torch.randn(B, N, spec.obs_dim) * 2
    shared = torch.randn(N, spec.obs_dim) * 2

    actions = policy_actions(spec, params, obs)
    actions_shared = policy_actions(spec, params, shared)
    assert actions.shape == (B, N, spec.act_dim)
    assert actions_shared.shape == (B, N, spec.act_dim)

    for b in range(B):
        seq = manual_sequential(spec, params[b])
        assert spec.num_params == sum(p.numel() for p in seq.parameters())
        with torch.no_grad():
            expected = to_bounds(seq(obs[b]), LOW, HIGH)
            expected_shared = to_bounds(seq(shared), LOW, HIGH)
            via_export = to_bounds(to_sequential(spec, params[b])(obs[b]), LOW, HIGH)
        torch.testing.assert_close(actions[b], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(actions_shared[b], expected_shared, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(via_export, expected, atol=1e-6, rtol=1e-5)

    # Actions lie within the (asymmetric) bounds and use both sides of the range.
    low, high = torch.tensor(LOW), torch.tensor(HIGH)
    assert torch.all(actions >= low) and torch.all(actions <= high)
    # A shared observation batch equals the same batch given to every policy explicitly.
    torch.testing.assert_close(
        actions_shared, policy_actions(spec, params, shared.expand(B, N, -1))
    )


def test_policy_preactivation_and_bound_mapping():
    """z -> low + (tanh(z)+1)/2 (high-low), checked at known points: z=0 gives the midpoint."""
    spec = make_spec(obs_dim=2, act_dim=2, hidden=())
    params = torch.zeros(1, spec.num_params)
    # W = 0, b = (0, large): actions (mid of dim 0, near high of dim 1).
    layers = spec.split(params)
    layers[0][1][0, 1] = 50.0
    acts = policy_actions(spec, params, torch.randn(3, 2))
    torch.testing.assert_close(acts[0, :, 0], torch.full((3,), 1.0))  # (0 + 2) / 2
    torch.testing.assert_close(acts[0, :, 1], torch.full((3,), 3.0))  # high of dim 1
    layers[0][1][0, 1] = -50.0
    acts = policy_actions(spec, params, torch.randn(3, 2))
    torch.testing.assert_close(acts[0, :, 1], torch.full((3,), -1.0))  # low of dim 1
    z = policy_preactivation(spec, params, torch.randn(3, 2))
    torch.testing.assert_close(z[0, :, 1], torch.full((3,), -50.0))


def test_policy_accepts_split_layers():
    torch.manual_seed(1)
    spec = make_spec()
    params = torch.randn(3, spec.num_params)
    obs = torch.randn(5, spec.obs_dim)
    torch.testing.assert_close(
        policy_actions(spec, spec.split(params), obs), policy_actions(spec, params, obs)
    )


def test_num_params_and_split_join_roundtrip():
    spec = make_spec(obs_dim=5, act_dim=2, hidden=(7, 3))
    assert spec.num_params == (5 * 7 + 7) + (7 * 3 + 3) + (3 * 2 + 2)
    assert spec.layer_shapes == [(7, 5), (3, 7), (2, 3)]
    flat = torch.arange(2 * spec.num_params, dtype=torch.float32).reshape(2, -1)
    layers = spec.split(flat)
    assert [tuple(w.shape) for w, _ in layers] == [(2, 7, 5), (2, 3, 7), (2, 2, 3)]
    assert [tuple(b.shape) for _, b in layers] == [(2, 7), (2, 3), (2, 2)]
    # Layout: W_0 row-major first, then b_0, then W_1 ...
    assert layers[0][0][0, 1, 0].item() == 5.0  # row 1, col 0 of W_0
    assert layers[0][1][0, 0].item() == 35.0  # first bias follows the 35 weights
    assert layers[1][0][1, 0, 0].item() == spec.num_params + 42.0
    torch.testing.assert_close(spec.join(layers), flat, rtol=0, atol=0)
    relayers = spec.split(spec.join(layers))
    for (w, b), (w2, b2) in zip(layers, relayers):
        assert torch.equal(w, w2) and torch.equal(b, b2)
    with pytest.raises(ValueError):
        spec.split(torch.zeros(1, spec.num_params + 1))
    with pytest.raises(ValueError):
        PolicySpec(3, 2, (4,), (0.0,), (1.0, 1.0))


# ====================================================================== generator
GEN_CASES = [
    # (obs_dim, act_dim, policy hidden, tile)
    (3, 2, (20, 7), 4),
    (3, 2, (20, 7), 16),
    (3, 2, (), 4),  # linear policy: one layer, written by the "input" hypernet
    (3, 2, (5, 6, 7), 4),  # three hidden layers: two share the "hidden" hypernet
    (4, 1, (8, 8), 4),  # sizes that are multiples of the tile
    (3, 2, (5,), 1),
]
COMMAND_SCALE = 200.0


def make_generator(spec, tile, output_scale=2.0, seed=0, hidden=(32, 32)) -> Generator:
    torch.manual_seed(seed)
    return Generator(
        spec, command_scale=COMMAND_SCALE, tile=tile, hidden=hidden, output_scale=output_scale
    )


def reference_generator(gen: Generator, spec: PolicySpec, commands: torch.Tensor) -> torch.Tensor:
    """Straightforward, loop-based implementation of the paper's generator, for comparison:
    per tile, net([e, c / scale]) -> k*k weights (row-major) + k biases, times s/sqrt(fan_in);
    the biases of one row of tiles are averaged; the padding is cropped."""
    k = gen.tile
    shapes = spec.layer_shapes
    n = len(shapes)
    rows = []
    for c in commands:
        parts = []
        for i, (o, fi) in enumerate(shapes):
            kind = "input" if i == 0 else "output" if i == n - 1 else "hidden"
            net = gen.hypernets[kind]
            t_out, t_in = math.ceil(o / k), math.ceil(fi / k)
            scale = gen.output_scale / math.sqrt(fi)
            W = torch.zeros(t_out * k, t_in * k)
            b = torch.zeros(t_out * k)
            for r in range(t_out):
                bias_sum = torch.zeros(k)
                for q in range(t_in):
                    e = gen.embeddings[i][r * t_in + q]
                    y = net(torch.cat([e, (c / COMMAND_SCALE).reshape(1)])) * scale
                    W[r * k : (r + 1) * k, q * k : (q + 1) * k] = y[: k * k].reshape(k, k)
                    bias_sum = bias_sum + y[k * k :]
                b[r * k : (r + 1) * k] = bias_sum / t_in
            parts += [W[:o, :fi].reshape(-1), b[:o]]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize("obs_dim,act_dim,hidden,tile", GEN_CASES)
def test_generator_shapes_and_layers(obs_dim, act_dim, hidden, tile):
    spec = make_spec(obs_dim, act_dim, hidden, low=(0.0,) * act_dim, high=(1.0,) * act_dim)
    gen = make_generator(spec, tile)
    c = torch.tensor([0.0, 100.0, 250.0])
    out = gen(c)
    assert out.shape == (3, spec.num_params)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    layers = gen.layers(c)
    assert len(layers) == len(spec.layer_shapes)
    for (w, b), (w2, b2), (o, fi) in zip(layers, spec.split(out), spec.layer_shapes):
        assert w.shape == (3, o, fi) and b.shape == (3, o)
        torch.testing.assert_close(w, w2, rtol=0, atol=0)
        torch.testing.assert_close(b, b2, rtol=0, atol=0)
    n_layers = len(spec.layer_shapes)
    expected_kinds = (
        {"input"}
        | ({"output"} if n_layers > 1 else set())
        | ({"hidden"} if n_layers > 2 else set())
    )
    assert set(gen.hypernets.keys()) == expected_kinds
    assert len(gen.embeddings) == n_layers
    for emb, (o, fi) in zip(gen.embeddings, spec.layer_shapes):
        assert emb.shape[0] == math.ceil(o / tile) * math.ceil(fi / tile)


@pytest.mark.parametrize("obs_dim,act_dim,hidden,tile", GEN_CASES)
def test_generator_matches_reference_implementation(obs_dim, act_dim, hidden, tile):
    """Tiling, tile placement, bias averaging over a row of tiles, s/sqrt(fan_in) scaling,
    command scaling and cropping, all against a loop-based reference."""
    spec = make_spec(obs_dim, act_dim, hidden, low=(0.0,) * act_dim, high=(1.0,) * act_dim)
    gen = make_generator(spec, tile, output_scale=1.7)
    c = torch.tensor([-30.0, 0.0, 120.0, 400.0])
    with torch.no_grad():
        torch.testing.assert_close(gen(c), reference_generator(gen, spec, c), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("obs_dim,act_dim,hidden,tile", GEN_CASES)
def test_generator_gradients_reach_every_parameter(obs_dim, act_dim, hidden, tile):
    spec = make_spec(obs_dim, act_dim, hidden, low=(0.0,) * act_dim, high=(1.0,) * act_dim)
    gen = make_generator(spec, tile)
    c = torch.tensor([0.0, 50.0, 300.0, 700.0])
    torch.manual_seed(123)
    weights = torch.randn(4, spec.num_params)
    (gen(c) * weights).sum().backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
    for i, emb in enumerate(gen.embeddings):
        per_tile = emb.grad.abs().sum(dim=1)
        assert torch.all(per_tile > 0), (
            f"embedding table {i}: tiles {torch.nonzero(per_tile == 0).flatten().tolist()} got no gradient"
        )
    e_dim = gen.embeddings[0].shape[1]
    for kind, net in gen.hypernets.items():
        assert net[0].weight.grad[:, e_dim].abs().sum() > 0, (
            f"command weights of {kind} got no gradient"
        )


def test_generator_commands_matter_and_scale_is_linear():
    spec = make_spec(3, 2, (20, 7), low=(0.0, 0.0), high=(1.0, 1.0))
    gen = make_generator(spec, 4, output_scale=1.0)
    with torch.no_grad():
        out = gen(torch.tensor([0.0, 100.0, 0.0]))
    assert (out[0] - out[1]).abs().max() > 1e-3
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=1e-7)  # same command -> same policy

    gen2 = make_generator(spec, 4, output_scale=2.0)  # same seed, same init
    with torch.no_grad():
        torch.testing.assert_close(
            gen2(torch.tensor([0.0, 100.0])), 2 * out[:2], atol=1e-6, rtol=1e-5
        )

    # s/sqrt(fan_in): a layer with a 4x larger fan-in, everything else identical, gets
    # outputs 2x smaller. Two tile-aligned layers written by the same "hidden" hypernet.
    spec_sq = make_spec(4, 4, (4, 4, 16, 4), low=(0.0,) * 4, high=(1.0,) * 4)
    gen_sq = make_generator(spec_sq, 4)
    with torch.no_grad():
        gen_sq.embeddings[3].copy_(
            gen_sq.embeddings[1].expand(4, -1)
        )  # layer 3 is (4, 16): 1x4 tiles
        layers = gen_sq.layers(torch.tensor([10.0]))
    w1, b1 = layers[1]  # (4, 4), fan_in 4
    w3, b3 = layers[3]  # (4, 16), fan_in 16; every tile uses layer 1's embedding
    for q in range(4):
        torch.testing.assert_close(w3[0, :, 4 * q : 4 * q + 4], w1[0] / 2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b3[0], b1[0] / 2, atol=1e-6, rtol=1e-5)  # mean of 4 equal chunks


def test_generator_rejects_bad_command_scale():
    with pytest.raises(ValueError):
        Generator(make_spec(), command_scale=0.0)


def test_generator_bf16_close_to_fp32():
    spec = make_spec(3, 2, (20, 7), low=(0.0, 0.0), high=(1.0, 1.0))
    torch.manual_seed(0)
    g32 = Generator(spec, command_scale=COMMAND_SCALE, tile=4, hidden=(32, 32))
    torch.manual_seed(0)
    g16 = Generator(spec, command_scale=COMMAND_SCALE, tile=4, hidden=(32, 32), bf16=True)
    c = torch.tensor([0.0, 200.0])
    # What the hypernetworks' inner layers compute in, seen from inside the forward.
    seen: dict[str, set] = {"fp32": set(), "bf16": set()}
    for name, g in (("fp32", g32), ("bf16", g16)):
        for module in g.hypernets.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, i, out, n=name: seen[n].add(out.dtype))
    with torch.no_grad():
        a, b = g32(c), g16(c)
    assert seen == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}, seen
    assert b.dtype == torch.float32 and b.shape == a.shape
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert not torch.equal(a, b)  # bf16 really ran: a no-op flag would give fp32's values
    # The layers the critic consumes stay bf16 (no round trip through fp32).
    assert all(w.dtype == torch.bfloat16 for w, _ in g16.layers(c))


def test_critic_bf16_fingerprint_close_to_fp32_and_returns_stay_fp32():
    spec = make_spec(3, 2, (20, 7), low=(0.0, -1.0), high=(1.0, 1.0))
    torch.manual_seed(0)
    c32 = Critic(spec, probing_states=9, hidden=(16,))
    c16 = Critic(spec, probing_states=9, hidden=(16,), bf16=True)
    c16.load_state_dict(c32.state_dict())
    params = torch.randn(4, spec.num_params) * 0.3
    f32, f16 = c32.fingerprint(params), c16.fingerprint(params)
    assert f16.dtype == torch.float32 and not torch.equal(f32, f16)
    assert (f32 - f16).abs().max() < 0.02
    v = c16(params)
    assert v.dtype == torch.float32
    v.sum().backward()  # gradients reach the fp32 probing states through the bf16 product
    assert c16.probing_states.grad is not None and c16.probing_states.grad.abs().sum() > 0


# ====================================================================== critic
def test_critic_fingerprint_shape_and_content():
    torch.manual_seed(0)
    spec = make_spec(obs_dim=3, act_dim=2, hidden=(8,))
    critic = Critic(spec, probing_states=7, hidden=(16,))
    params = torch.randn(5, spec.num_params) * 0.3
    fp = critic.fingerprint(params)
    assert fp.shape == (5, 7 * 2)
    acts = policy_actions(spec, params, critic.probing_states)  # (5, 7, 2)
    # [pi(s_1), ..., pi(s_P)] concatenated, state-major.
    assert torch.allclose(fp[:, 2 * 3 : 2 * 3 + 2], acts[:, 3, :])
    torch.testing.assert_close(fp, acts.reshape(5, -1))
    v = critic(params)
    assert v.shape == (5,)
    torch.testing.assert_close(critic(spec.split(params)), v)


def test_critic_probing_states_receive_gradients():
    torch.manual_seed(0)
    spec = make_spec(obs_dim=3, act_dim=2, hidden=(8,))
    critic = Critic(spec, probing_states=6, hidden=(16, 16))
    params = torch.randn(4, spec.num_params) * 0.3
    critic_loss(critic, params, torch.tensor([1.0, 2.0, 3.0, 4.0])).backward()
    g = critic.probing_states.grad
    assert g is not None and g.shape == (6, 3)
    assert torch.all(g.abs().sum(dim=1) > 0), "every probing state should get a gradient"
    for name, p in critic.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_critic_fits_synthetic_returns():
    torch.manual_seed(0)
    spec = make_spec(obs_dim=3, act_dim=2, hidden=(8,), low=(0.0, -1.0), high=(2.0, 1.0))
    params = torch.randn(32, spec.num_params) * 0.3
    # Deterministic function of the policies' behaviour on a few fixed states, in [0, 100].
    states = torch.randn(4, spec.obs_dim)
    with torch.no_grad():
        acts = policy_actions(spec, params, states)  # (32, 4, 2)
        targets = 50.0 * (acts[..., 0].mean(-1) / 2.0 + (acts[..., 1].mean(-1) + 1.0) / 2.0)
    assert targets.std() > 1.0  # a target worth fitting

    critic = Critic(spec, probing_states=10, hidden=(64, 64))
    opt = torch.optim.Adam(critic.parameters(), lr=5e-3)
    with torch.no_grad():
        initial = critic_loss(critic, params, targets).item()
    for _ in range(400):
        loss = critic_loss(critic, params, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = critic_loss(critic, params, targets).item()
    assert final < 0.1 * initial, (initial, final)
    # Better than predicting the mean target: it learned the dependence on the policy.
    assert final < 0.1 * targets.var(unbiased=False).item(), (final, targets.var().item())


# ====================================================================== observation statistics
def _stats_of(x: np.ndarray) -> ObsStats:
    s = ObsStats(x.shape[1])
    s.update(x)
    return s


def test_obs_stats_merge_equals_concatenation():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 2.0, size=(50, 4))
    b = rng.normal(-1.0, 0.5, size=(17, 4))
    s = _stats_of(a)
    s.merge(_stats_of(b))
    both = np.concatenate([a, b])
    assert s.count == 67
    assert np.allclose(s.mean, both.mean(0)) and np.allclose(s.var, both.var(0))
    assert np.allclose(s.std, both.std(0))

    chunks = [rng.normal(i, 1 + i, size=(n, 4)) for i, n in enumerate([0, 5, 0, 1, 30, 12])]
    master = ObsStats(4)
    for ch in chunks:
        master.merge(_stats_of(ch) if len(ch) else ObsStats(4))
    data = np.concatenate(chunks)
    assert master.count == len(data)
    assert np.allclose(master.mean, data.mean(0)) and np.allclose(master.var, data.var(0))

    # Merging into an empty master copies the other statistics.
    empty = ObsStats(4)
    empty.merge(_stats_of(a))
    assert np.allclose(empty.mean, a.mean(0)) and np.allclose(empty.var, a.var(0))
    with pytest.raises(ValueError):
        master.merge(ObsStats(3))


def test_obs_stats_update_in_pieces_and_normalizer():
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 3.0, size=(40, 3))
    one = _stats_of(x)
    pieces = ObsStats(3)
    for lo, hi in [(0, 1), (1, 1), (1, 13), (13, 40)]:
        pieces.update(x[lo:hi])
    assert pieces.count == one.count == 40
    assert np.allclose(pieces.mean, one.mean) and np.allclose(pieces.m2, one.m2)

    fresh = ObsStats(3)
    mean, std = fresh.normalizer()
    assert mean.dtype == np.float32 and std.dtype == np.float32
    assert np.array_equal(mean, np.zeros(3)) and np.array_equal(std, np.ones(3))
    mean, std = one.normalizer()
    assert np.allclose(mean, x.mean(0), rtol=1e-6) and np.allclose(std, x.std(0) + 1e-8, rtol=1e-6)


def test_obs_stats_state_dict_roundtrip():
    rng = np.random.default_rng(2)
    s = _stats_of(rng.normal(size=(9, 2)))
    state = s.state_dict()
    back = ObsStats.from_state_dict(state)
    assert back.dim == 2 and back.count == 9
    assert np.array_equal(back.mean, s.mean) and np.array_equal(back.m2, s.m2)


# ====================================================================== replay buffer
def _filled_buffer(capacity: int, n: int, D: int = 3, exponent: float = 1.1) -> ReplayBuffer:
    buf = ReplayBuffer(capacity, D, recency_exponent=exponent)
    for i in range(n):
        buf.add(torch.full((D,), float(i)), float(i))  # params identify the entry too
    return buf


def test_buffer_capacity_and_order():
    buf = ReplayBuffer(5, 3)
    for i in range(13):
        buf.add(torch.full((3,), float(i)), float(i))
        assert len(buf) == min(i + 1, 5)
        assert buf.returns_in_order() == [float(j) for j in range(max(0, i - 4), i + 1)]
    assert buf.total_added == 13
    state = buf.state_dict()
    assert torch.equal(state["params"][:, 0], torch.arange(8.0, 13.0))  # oldest first


def test_buffer_sample_probabilities():
    buf = _filled_buffer(10, 7)
    k = torch.arange(1, 8, dtype=torch.float64)
    expected = (1.0 / k) ** 1.1
    torch.testing.assert_close(buf.sample_probabilities(), expected / expected.sum())
    buf = _filled_buffer(10, 25)
    k = torch.arange(1, 11, dtype=torch.float64)
    expected = (1.0 / k) ** 1.1
    torch.testing.assert_close(buf.sample_probabilities(), expected / expected.sum())


@pytest.mark.parametrize("n_added", [6, 25])  # before and after wrap-around (capacity 10)
def test_buffer_empirical_sampling_by_age(n_added):
    capacity = 10
    buf = _filled_buffer(capacity, n_added)
    rng = torch.Generator().manual_seed(0)
    draws = 20_000
    params, returns, _ = buf.sample(draws, rng)
    assert params.shape == (draws, 3) and returns.shape == (draws,)
    assert torch.equal(params[:, 0], returns) and torch.equal(params[:, 2], returns)  # pairs intact
    ages = (n_added - returns).long()  # newest (return n_added-1) has age 1
    n = min(n_added, capacity)
    assert ages.min() >= 1 and ages.max() <= n, "sampled an entry that should have been overwritten"
    freq = torch.bincount(ages - 1, minlength=n).double() / draws
    probs = buf.sample_probabilities()
    assert torch.all((freq - probs).abs() < 0.012), (freq, probs)
    chi2 = (((freq - probs) * draws) ** 2 / (probs * draws)).sum().item()
    assert chi2 < 30.0  # 9 degrees of freedom: p < 1e-3 beyond ~28


def test_buffer_state_dict_roundtrip():
    buf = _filled_buffer(10, 25)
    state = buf.state_dict()
    f = io.BytesIO()
    torch.save(state, f)
    f.seek(0)
    state = torch.load(f, weights_only=True)
    back = ReplayBuffer(10, 3, recency_exponent=1.1)
    back.load_state_dict(state)
    assert back.returns_in_order() == buf.returns_in_order()
    assert back.total_added == 25
    a = buf.sample(500, torch.Generator().manual_seed(3))
    b = back.sample(500, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Both keep overwriting the oldest entry in step.
    for i in range(25, 32):
        buf.add(torch.full((3,), float(i)), float(i))
        back.add(torch.full((3,), float(i)), float(i))
        assert back.returns_in_order() == buf.returns_in_order()
    # A smaller buffer keeps the newest entries.
    small = ReplayBuffer(4, 3)
    small.load_state_dict(buf.state_dict())
    assert small.returns_in_order() == [28.0, 29.0, 30.0, 31.0]
    # An empty state loads as an empty buffer.
    empty = ReplayBuffer(4, 3)
    empty.load_state_dict(ReplayBuffer(4, 3).state_dict())
    assert len(empty) == 0
    with pytest.raises(ValueError):
        ReplayBuffer(10, 5).load_state_dict(buf.state_dict())


def test_buffer_errors():
    buf = ReplayBuffer(4, 3)
    with pytest.raises(RuntimeError):
        buf.sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        buf.add(torch.zeros(4), 1.0)
    with pytest.raises(ValueError):
        ReplayBuffer(0, 3)
    buf.add(torch.zeros(1, 3, dtype=torch.float64), 1.0)  # any (D,)-sized tensor, stored as float32
    params, _, _ = buf.sample(2, torch.Generator().manual_seed(0))
    assert params.dtype == torch.float32


# ====================================================================== learner
ENV_ID = "InvertedPendulum-v5"


@pytest.fixture(scope="module")
def cfg():
    from gogepo_ray.config import build_config

    return build_config(
        {
            "env": {"id": ENV_ID, "return_min": 0, "return_max": 1000, "survival_offset": -1},
            "policy": {"hidden": [16, 16]},
            "generator": {
                "hidden": [32, 32],
                "tile": 4,
                "batch_size": 8,
                "steps_per_episode": 2,
                "lr": 1e-3,
            },
            "critic": {
                "hidden": [32, 32],
                "probing_states": 10,
                "batch_size": 8,
                "steps_per_episode": 2,
            },
            "buffer": {"capacity": 50},
            "learner": {"num_threads": 1},
            "run": {"seed": 7},
        }
    )


@pytest.fixture(scope="module")
def spec(cfg):
    from gogepo_ray.envs import policy_spec

    return policy_spec(cfg.env.id, cfg.policy.hidden)


def test_loss_helpers_by_hand():
    assert exploration_command(None, 20.0) == 20.0
    assert exploration_command(35.0, 20.0) == 55.0
    assert training_return(100.0, 40, -1.0) == 60.0
    assert training_return(100.0, 40, 0.0) == 100.0

    torch.manual_seed(0)
    spec = PolicySpec(2, 1, (), (-2.0,), (4.0,))
    critic = Critic(spec, probing_states=3, hidden=(4,))
    params = torch.randn(2, spec.num_params)
    returns = torch.tensor([1.5, -0.5])

    def v_by_hand(theta: torch.Tensor) -> torch.Tensor:
        w, b = theta[:2], theta[2]
        s = critic.probing_states  # (3, 2)
        a = -2.0 + (torch.tanh(s @ w + b) + 1.0) / 2.0 * 6.0  # (3,)
        l1, l2 = critic.head[0], critic.head[2]
        return (l2.weight @ torch.relu(l1.weight @ a + l1.bias) + l2.bias)[0]

    with torch.no_grad():
        v = torch.stack([v_by_hand(p) for p in params])
        expected = ((v[0] - 1.5) ** 2 + (v[1] + 0.5) ** 2) / 2
        torch.testing.assert_close(critic_loss(critic, params, returns), expected)

        gen = Generator(spec, command_scale=10.0, tile=2, hidden=(8,))
        commands = torch.tensor([0.0, 3.0, 7.0])
        g = gen(commands)
        v = torch.stack([v_by_hand(p) for p in g])
        expected = ((v - commands) ** 2).mean()  # raw commands are the targets
        torch.testing.assert_close(generator_loss(gen, critic, commands), expected)


def test_saturation_penalty_is_the_excess_past_the_bound_squared():
    """generator_loss with a penalty adds penalty × mean(max(|z| − atanh(0.99), 0)²) of the
    output pre-activations on the given states, and nothing for policies inside the bound."""
    torch.manual_seed(1)
    spec = PolicySpec(2, 1, (), (-1.0,), (1.0,))
    critic = Critic(spec, probing_states=3, hidden=(4,))
    gen = Generator(spec, command_scale=10.0, tile=2, hidden=(8,), output_scale=20.0)
    commands = torch.tensor([0.0, 5.0])
    states = torch.randn(16, 2)
    with torch.no_grad():
        plain = generator_loss(gen, critic, commands)
        theta = gen(commands)  # (2, 3): w1, w2, b
        z = states @ theta[:, :2].T + theta[:, 2]  # (16, 2)
        excess = torch.relu(z.abs() - math.atanh(0.99))
        assert excess.gt(0).any()  # the large output scale pins some actions
        torch.testing.assert_close(
            generator_loss(gen, critic, commands, None, 3.0, states),
            plain + 3.0 * (excess**2).mean(),
        )
        small = Generator(spec, command_scale=10.0, tile=2, hidden=(8,), output_scale=0.1)
        torch.testing.assert_close(
            generator_loss(small, critic, commands, None, 3.0, states),
            generator_loss(small, critic, commands),
        )


def test_saturation_penalty_keeps_generated_actions_off_the_bounds(cfg):
    """generator.saturation_penalty: with a critic whose value rises with every action and a
    command beyond its reach, generator steps drive a linear policy's pre-activations on
    normalised observations far past the bound without the penalty; with it they stay
    near the bound, for almost the same value."""
    from gogepo_ray.envs import policy_spec

    def trained(penalty: float) -> tuple[float, float]:
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.policy.hidden = []
        run_cfg.generator.saturation_penalty = penalty
        linear = policy_spec(run_cfg.env.id, [])
        learner = Learner(run_cfg, linear)
        with torch.no_grad():  # V = a positive-weighted sum of the actions plus a constant
            for layer in learner.critic.head:
                if isinstance(layer, nn.Linear):
                    layer.weight.abs_()
                    layer.bias.copy_(3 * layer.weight.sum(1))  # no ReLU unit ever off
        for p in learner.propose(4).policy_params:
            learner.buffer.add(torch.as_tensor(p), 1e6)
        for _ in range(100):
            learner.generator_step()
        with torch.no_grad():
            g = learner.generator(torch.tensor([1e6]))
            z = policy_preactivation(linear, g, learner._noise_states)
            value = float(learner.critic(g))
        return float(torch.relu(z.abs() - math.atanh(0.99)).mean()), value

    (free, free_value), (bounded, bounded_value) = trained(0.0), trained(1.0)
    assert free > 10.0 and bounded < 1.0, (free, bounded)
    assert bounded_value > 0.95 * free_value, (free_value, bounded_value)


def test_learner_propose(cfg, spec):
    learner = Learner(cfg, spec)
    pb = learner.propose(8)
    assert pb.kind == "train"
    assert pb.policy_params.shape == (8, spec.num_params) and pb.policy_params.dtype == np.float32
    assert np.all(pb.commands == 20.0)  # best counts as 0 before any episode; drive 20
    assert pb.episode_ids.tolist() == list(range(8))
    assert pb.seeds.tolist() == [episode_seed(7, "train", i) for i in range(8)]
    assert len(set(pb.seeds.tolist())) == 8
    assert pb.obs_count == 0
    mean, std = pb.normalizer()
    assert np.array_equal(mean, np.zeros(spec.obs_dim)) and np.array_equal(
        std, np.ones(spec.obs_dim)
    )
    # Noise: exploration policies = G(c) + 0.1 eps.
    ev = learner.propose_eval([20.0])
    assert ev.kind == "eval" and ev.policy_params.shape == (1, spec.num_params)
    diff = pb.policy_params - ev.policy_params[0]
    assert abs(diff.std() - 0.1) < 0.01 and abs(diff.mean()) < 0.01
    assert np.all(np.abs(diff).max(axis=1) > 0)  # every policy got its own noise
    assert not np.allclose(pb.policy_params[0], pb.policy_params[1])
    # Noise-free eval policies are reproducible; ids keep counting per kind.
    ev2 = learner.propose_eval([20.0, 50.0], episodes=2)
    assert ev2.episode_ids.tolist() == [1, 2, 3, 4]
    assert ev2.commands.tolist() == [20.0, 20.0, 50.0, 50.0]
    assert np.array_equal(ev2.policy_params[0], ev.policy_params[0])
    assert np.array_equal(ev2.policy_params[0], ev2.policy_params[1])
    assert not np.array_equal(ev2.policy_params[1], ev2.policy_params[2])
    assert learner.propose(2).episode_ids.tolist() == [8, 9]
    assert learner.propose_eval().commands.tolist() == [0.0]


def test_learner_ingest(cfg, spec):
    learner = Learner(cfg, spec)
    pb = learner.propose(3)
    obs = np.random.default_rng(0).normal(2.0, 3.0, size=(70, spec.obs_dim))
    batch = make_batch(
        pb,
        returns=[100.0, 500.0, 30.0],
        lengths=[40, 20, 10],
        failures=(None, "worker died: env raised", None),
        obs=obs,
    )
    stats = learner.step([batch], [])[-1]
    # survival offset -1: training return = return - length; the failed episode is skipped.
    assert learner.buffer.returns_in_order() == [60.0, 20.0]
    buf_params = learner.buffer.state_dict()["params"].numpy()
    assert np.array_equal(buf_params, pb.policy_params[[0, 2]])
    assert learner.best_return == 60.0
    assert stats.best_return == 60.0 and stats.metrics["buffer/size"] == 2
    assert learner.env_steps == 50 and stats.env_steps == 50
    assert learner.episodes == 2 and stats.episodes == 2
    assert learner.failed_episodes == 1 and stats.failed_episodes == 1
    assert math.isfinite(stats.metrics["losses/critic"])
    assert math.isfinite(stats.metrics["losses/generator"])
    assert learner.obs_stats.count == 70
    assert np.allclose(learner.obs_stats.mean, obs.mean(0)) and np.allclose(
        learner.obs_stats.var, obs.var(0)
    )
    # The next policies ask for best + drive, and carry the merged statistics.
    pb2 = learner.propose(2)
    assert np.all(pb2.commands == 80.0)
    mean, std = pb2.normalizer()
    assert pb2.obs_count == 70
    assert np.allclose(mean, obs.mean(0), rtol=1e-5) and np.allclose(std, obs.std(0), rtol=1e-5)

    # A worse batch does not lower the best; statistics keep merging.
    obs2 = np.random.default_rng(1).normal(-1.0, 1.0, size=(30, spec.obs_dim))
    stats = learner.step([make_batch(pb2, returns=[10.0, 45.0], lengths=[5, 5], obs=obs2)], [])[-1]
    assert learner.buffer.returns_in_order() == [60.0, 20.0, 5.0, 40.0]
    assert learner.best_return == 60.0 and learner.env_steps == 60 and learner.episodes == 4
    both = np.concatenate([obs, obs2])
    assert learner.obs_stats.count == 100 and np.allclose(learner.obs_stats.mean, both.mean(0))
    assert math.isfinite(stats.metrics["losses/critic_fresh_error"])

    # All-failed batch: counted, nothing stored, statistics still merged (as sent).
    pb3 = learner.propose(2)
    learner.step([make_batch(pb3, returns=[0.0, 0.0], lengths=[3, 3], failures=("a", "b"))], [])
    assert learner.failed_episodes == 3 and learner.episodes == 4 and len(learner.buffer) == 4

    with pytest.raises(ValueError):
        learner.step([make_batch(pb3, [1.0, 1.0], [1, 1])._replace(kind="eval")], [])


def test_learner_first_best_return_can_be_negative(cfg, spec):
    learner = Learner(cfg, spec)
    pb = learner.propose(2)
    # training returns -5, -8
    learner.step([make_batch(pb, returns=[5.0, 2.0], lengths=[10, 10])], [])
    assert learner.best_return == -5.0
    assert np.all(learner.propose(1).commands == 15.0)


def _snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module: nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def test_learner_update_changes_generator_and_critic(cfg, spec):
    learner = Learner(cfg, spec)
    pb = learner.propose(4)
    learner.buffer.add(torch.as_tensor(pb.policy_params[0]), 10.0)
    learner.buffer.add(torch.as_tensor(pb.policy_params[1]), 200.0)
    g0, c0 = _snapshot(learner.generator), _snapshot(learner.critic)
    learner.update(1)
    assert set(_changed(g0, learner.generator)) == set(g0.keys())  # every generator tensor moved
    assert set(_changed(c0, learner.critic)) == set(c0.keys())  # incl. probing states
    assert all(
        p.requires_grad for p in learner.critic.parameters()
    )  # unfrozen after the generator steps

    # Generator steps alone leave the critic untouched, critic steps alone the generator.
    cfg_g = cfg.model_copy(deep=True)
    cfg_g.critic.steps_per_episode = 0
    learner.cfg = cfg_g
    g1, c1 = _snapshot(learner.generator), _snapshot(learner.critic)
    grads = {n: p.grad.clone() for n, p in learner.critic.named_parameters()}
    learner.update(1)
    assert _changed(c1, learner.critic) == [] and _changed(g1, learner.generator) != []
    # V is frozen during generator steps: no gradient accumulates in the critic.
    for n, p in learner.critic.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    cfg_c = cfg.model_copy(deep=True)
    cfg_c.generator.steps_per_episode = 0
    learner.cfg = cfg_c
    g2, c2 = _snapshot(learner.generator), _snapshot(learner.critic)
    learner.update(1)
    assert _changed(g2, learner.generator) == [] and _changed(c2, learner.critic) != []


def test_learner_steps_match_manual_adam_steps(cfg, spec):
    """critic_step / generator_step = one Adam step (configured lr) on the paper's loss over a
    batch of the configured size, drawn from the buffer with the learner's generator."""
    import copy

    learner = Learner(cfg, spec)
    pb = learner.propose(5)
    for p, r in zip(pb.policy_params, [10.0, 50.0, 100.0, 200.0, 0.0]):
        learner.buffer.add(torch.as_tensor(p), r)
    assert learner.critic_opt.param_groups[0]["lr"] == cfg.critic.lr
    assert learner.generator_opt.param_groups[0]["lr"] == cfg.generator.lr
    learner.critic_step()  # some optimiser state first
    learner.generator_step()

    critic = copy.deepcopy(
        learner.critic
    )  # optimiser state deep-copied: load_state_dict shares tensors
    c_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic.lr)
    c_opt.load_state_dict(copy.deepcopy(learner.critic_opt.state_dict()))
    rng = torch.Generator()
    rng.set_state(learner.rng.get_state())
    params, returns, _ = learner.buffer.sample(cfg.critic.batch_size, rng)
    loss = ((critic(params) - returns) ** 2).mean()
    c_opt.zero_grad()
    loss.backward()
    c_opt.step()
    assert learner.critic_step() == pytest.approx(loss.item(), rel=1e-6)
    for a, b in zip(learner.critic.parameters(), critic.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    gen = copy.deepcopy(learner.generator)
    g_opt = torch.optim.Adam(gen.parameters(), lr=cfg.generator.lr)
    g_opt.load_state_dict(copy.deepcopy(learner.generator_opt.state_dict()))
    rng.set_state(learner.rng.get_state())
    _, commands, _ = learner.buffer.sample(cfg.generator.batch_size, rng)
    assert commands.shape == (cfg.generator.batch_size,)
    frozen = copy.deepcopy(learner.critic).requires_grad_(False)
    loss = ((frozen(gen(commands)) - commands) ** 2).mean()
    g_opt.zero_grad()
    loss.backward()
    g_opt.step()
    assert learner.generator_step() == pytest.approx(loss.item(), rel=1e-5)
    for (n, a), b in zip(learner.generator.named_parameters(), gen.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_learner_generator_step_moves_toward_commands(cfg, spec):
    """With V frozen, generator steps reduce (V(G(c)) - c)^2 on the buffer's returns."""
    learner = Learner(cfg, spec)
    pb = learner.propose(4)
    for p, r in zip(pb.policy_params, [10.0, 50.0, 100.0, 200.0]):
        learner.buffer.add(torch.as_tensor(p), r)
    for _ in range(30):
        learner.critic_step()
    commands = torch.tensor([10.0, 50.0, 100.0, 200.0])
    learner.critic.requires_grad_(False)
    with torch.no_grad():
        before = generator_loss(learner.generator, learner.critic, commands).item()
    for _ in range(40):
        learner.generator_step()
    with torch.no_grad():
        after = generator_loss(learner.generator, learner.critic, commands).item()
    learner.critic.requires_grad_(True)
    assert after < before, (before, after)


def _run_a_bit(learner: Learner, rng: np.random.Generator, rounds: int = 2) -> None:
    obs_dim = learner.spec.obs_dim
    for _ in range(rounds):
        pb = learner.propose(3)
        learner.step(
            [
                make_batch(
                    pb,
                    returns=rng.uniform(0, 300, 3),
                    lengths=rng.integers(5, 50, 3),
                    obs=rng.normal(size=(20, obs_dim)),
                )
            ],
            [],
        )


def test_learner_state_dict_exact_resume(cfg, spec, tmp_path):
    a = Learner(cfg, spec)
    _run_a_bit(a, np.random.default_rng(0))
    path = tmp_path / "learner.pt"
    torch.save(a.state_dict(), path)
    state = torch.load(path, weights_only=True)

    b = Learner(cfg, spec)
    _run_a_bit(b, np.random.default_rng(5), rounds=1)  # b diverges first, then is overwritten
    b.load_state_dict(state)

    for x, y in [(a.generator, b.generator), (a.critic, b.critic)]:
        for (k, v), (k2, v2) in zip(x.state_dict().items(), y.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), k
    assert a.buffer.returns_in_order() == b.buffer.returns_in_order()
    sa, sb = a.stats(), b.stats()
    for f in (
        "env_steps",
        "episodes",
        "failed_episodes",
        "best_return",
        "learner_seconds",
    ):
        assert getattr(sa, f) == getattr(sb, f), f
    assert sa.metrics["buffer/size"] == sb.metrics["buffer/size"]
    assert a.next_id == b.next_id
    assert a.obs_stats.count == b.obs_stats.count and np.array_equal(
        a.obs_stats.mean, b.obs_stats.mean
    )

    # Identical futures: proposals (noise from the restored RNG), updates, parameters.
    pa, pb_ = a.propose(4), b.propose(4)
    for f in pa._fields:
        assert np.array_equal(getattr(pa, f), getattr(pb_, f)), f
    ra, rb = np.random.default_rng(11), np.random.default_rng(11)
    _run_a_bit(a, ra)
    _run_a_bit(b, rb)
    for x, y in [(a.generator, b.generator), (a.critic, b.critic)]:
        for (k, v), (_, v2) in zip(x.state_dict().items(), y.state_dict().items()):
            assert torch.equal(v, v2), k
    for oa, ob in [(a.generator_opt, b.generator_opt), (a.critic_opt, b.critic_opt)]:
        sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in sa[i]:
                assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    pa, pb_ = a.propose(4), b.propose(4)
    assert np.array_equal(pa.policy_params, pb_.policy_params)
    assert np.array_equal(pa.commands, pb_.commands) and np.array_equal(pa.seeds, pb_.seeds)


def test_optimiser_state_of_a_gpu_run_resumes_on_the_cpu(cfg, spec):
    """A GPU learner's Adam groups are saved with capturable=True (its steps are CUDA
    graphs); loaded on the CPU, where capturable steps are refused, the learner keeps its
    own settings and steps (tests/test_gpu.py covers the real GPU both ways)."""
    a = Learner(cfg, spec)
    _run_a_bit(a, np.random.default_rng(3))
    state = a.state_dict()
    for opt in ("generator_opt", "critic_opt"):
        for group in state[opt]["param_groups"]:
            group["capturable"] = True  # as written by a learner on a GPU
    b = Learner(cfg, spec)
    b.load_state_dict(state)
    assert not any(
        g["capturable"] for g in b.generator_opt.param_groups + b.critic_opt.param_groups
    )
    closs, gloss = b.update(1)
    assert np.isfinite(closs) and np.isfinite(gloss)


# ====================================================================== import boundary
def test_core_imports_no_heavy_frameworks():
    core = sorted(
        p.stem for p in (ROOT / "gogepo_ray" / "core").glob("*.py") if p.stem != "__init__"
    )
    assert {"buffer", "critic", "generator", "learner", "normalizer", "policy"} <= set(core)
    code = (
        "import sys, importlib\n"
        f"for m in {core!r}: importlib.import_module('gogepo_ray.core.' + m)\n"
        "import gogepo_ray.core, gogepo_ray.types\n"
        "bad = sorted(n for n in ('ray', 'gymnasium', 'mlflow', 'pydantic') if n in sys.modules)\n"
        "print('BAD=' + ','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "BAD=\n" in out.stdout, out.stdout


# ====================================================================== update schedule
def _schedule_cfg(cfg, upe: float):
    data = cfg.model_dump()
    data["learner"]["updates_per_episode"] = upe
    from gogepo_ray.config import build_config

    return build_config(data)


def _episode(learner, ret: float):
    pb = learner.propose(1)
    return make_batch(pb, returns=[ret], lengths=[10])


def test_step_with_one_round_per_episode_is_the_papers_sequence(cfg, spec):
    """``step`` (what the trainer calls) against the paper's loop written out by hand:
    episode in, one round (critic steps, then generator steps), next policy from the
    updated generator, in arrival order. Same updates, same policies, bit for bit."""
    a, b = Learner(cfg, spec), Learner(cfg, spec)
    first_a, first_b = a.propose(1), b.propose(1)
    np.testing.assert_array_equal(first_a.policy_params, first_b.policy_params)
    pa, pb = first_a, first_b
    for k, ret in enumerate([30.0, 80.0, 55.0, 120.0]):
        *proposed, stats = a.step([make_batch(pa, [ret], [10])], [1])
        pa = proposed[0]
        assert stats.rounds == k + 1 and stats.episodes == k + 1
        # by hand: take the episode in, one round, then propose
        b.take_in(make_batch(pb, [ret], [10]))
        b.update(1)
        pb = b.propose(1)
        np.testing.assert_array_equal(pa.policy_params, pb.policy_params)
    assert a.buffer.returns_in_order() == [20.0, 70.0, 45.0, 110.0]  # arrival order
    for x, y in zip(a.generator.parameters(), b.generator.parameters()):
        assert torch.equal(x, y)


def test_fractional_updates_per_episode_carry_over(cfg, spec):
    learner = Learner(_schedule_cfg(cfg, 0.25), spec)
    rounds = []
    for k in range(10):
        learner.step([_episode(learner, float(k))], [])
        rounds.append(learner.rounds)
    # one round at the 4th and the 8th episode; 2 episodes' worth (0.5) carried over
    assert rounds == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert learner.rounds_owed == Fraction(1, 2)
    # a group of episodes owes its rounds together: 0.5 + 6 x 0.25 = 2 rounds
    batches = [_episode(learner, 1.0) for _ in range(6)]
    *_, stats = learner.step(batches, [])
    assert stats.rounds == 4 and learner.rounds_owed == 0
    # 0.1 is exact too: 10 episodes are one round, not 0.999...
    tenth = Learner(_schedule_cfg(cfg, 0.1), spec)
    tenth.step([_episode(tenth, 1.0) for _ in range(10)], [])
    assert tenth.rounds == 1 and tenth.rounds_owed == 0


def test_rounds_owed_survive_a_checkpoint(cfg, spec):
    a = Learner(_schedule_cfg(cfg, 0.25), spec)
    for k in range(3):
        a.step([_episode(a, float(k))], [])
    b = Learner(_schedule_cfg(cfg, 0.25), spec)
    b.load_state_dict(a.state_dict())
    assert b.rounds_owed == a.rounds_owed == Fraction(3, 4) and b.rounds == 0
    a.step([_episode(a, 5.0)], [])
    b.step([_episode(b, 5.0)], [])
    assert a.rounds == b.rounds == 1


def test_several_updates_per_episode(cfg, spec):
    learner = Learner(_schedule_cfg(cfg, 2), spec)
    learner.step([_episode(learner, 1.0), _episode(learner, 2.0)], [1, 1])
    assert learner.rounds == 4


def test_policies_carry_the_training_steps_their_generator_learned_from(cfg, spec):
    """Evaluations are reported at the steps the generator had seen, not when scheduled."""
    learner = Learner(cfg, spec)
    assert learner.propose_eval().trained_env_steps == 0
    pb = learner.propose(2)
    learner.step([make_batch(pb, returns=[1.0, 2.0], lengths=[7, 5])], [])
    assert learner.propose_eval().trained_env_steps == 12
    assert learner.propose(1).trained_env_steps == 12
