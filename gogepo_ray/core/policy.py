"""Deterministic MLP policies held as flat parameter vectors (``policy_params``).

GoGePo works in parameter space (paper §2): a policy is the flat vector θ of an MLP's
weights. This module lays the vector out and runs many policies on many observations in
one batched call, which the critic (fingerprints), the rollout workers and the export all
share.

Layout of θ, layer by layer: ``W_l`` (out, in) row-major, then ``b_l`` (out,). Hidden units
are tanh; the output is tanh mapped affinely onto the action bounds, so asymmetric bounds
such as [0, 2] work: ``a = low + (tanh(z) + 1) / 2 * (high - low)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PolicySpec:
    """Shape of a policy MLP and the action bounds its output is mapped onto."""

    obs_dim: int
    act_dim: int
    hidden: tuple[int, ...]
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.action_low) != self.act_dim or len(self.action_high) != self.act_dim:
            raise ValueError("action bounds must have act_dim entries")

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (self.obs_dim, *self.hidden, self.act_dim)

    @property
    def layer_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of every weight matrix, input layer first."""
        sizes = self.layer_sizes
        return [(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1)]

    @property
    def num_params(self) -> int:
        return sum(o * i + o for o, i in self.layer_shapes)

    def split(self, policy_params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views of (W, b) per layer; ``policy_params`` is (B, D) -> W (B, out, in), b (B, out)."""
        if policy_params.shape[-1] != self.num_params:
            raise ValueError(
                f"policy_params has {policy_params.shape[-1]} entries, the policy needs {self.num_params}"
            )
        lead = policy_params.shape[:-1]
        out, offset = [], 0
        for o, i in self.layer_shapes:
            w = policy_params[..., offset : offset + o * i].reshape(*lead, o, i)
            offset += o * i
            b = policy_params[..., offset : offset + o]
            offset += o
            out.append((w, b))
        return out

    def join(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Inverse of :meth:`split`: per-layer (W (B, out, in), b (B, out)) -> (B, D)."""
        parts = []
        for w, b in layers:
            parts += [w.flatten(-2), b]
        return torch.cat(parts, dim=-1)


Layers = list[tuple[torch.Tensor, torch.Tensor]]


def policy_preactivation(
    spec: PolicySpec, policy_params: torch.Tensor | Layers, obs: torch.Tensor
) -> torch.Tensor:
    """Output-layer pre-activation z of B policies on N observations each.

    policy_params (B, D) flat, or already split per layer as [(W (B, out, in), b (B, out))];
    obs (B, N, obs_dim), or (N, obs_dim) shared by all policies -> (B, N, act_dim).
    """
    layers = spec.split(policy_params) if isinstance(policy_params, torch.Tensor) else policy_params
    x = obs
    if x.dim() == 2:
        x = x.unsqueeze(0).expand(layers[0][0].shape[0], -1, -1)  # (B, N, obs_dim)
    for idx, (w, b) in enumerate(layers):
        x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))  # (B, N, out)
        if idx < len(layers) - 1:
            x = torch.tanh(x)
    return x


def policy_actions(
    spec: PolicySpec,
    policy_params: torch.Tensor | Layers,
    obs: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Actions within the env's bounds: (B, D), (B, N, obs_dim) -> (B, N, act_dim).

    ``bounds``: the action bounds as (low, high) tensors already on the device, which a
    caller on a GPU passes (the critic does): made from ``spec`` here they are a host to
    device copy on every call, which a CUDA graph cannot hold."""
    squashed = torch.tanh(policy_preactivation(spec, policy_params, obs))
    if bounds is None:
        bounds = (torch.tensor(spec.action_low), torch.tensor(spec.action_high))
    low, high = (b.to(squashed) for b in bounds)
    return low + (squashed + 1.0) * 0.5 * (high - low)


def to_sequential(spec: PolicySpec, policy_params: torch.Tensor) -> nn.Sequential:
    """An ``nn.Sequential`` holding one policy's weights; its output is tanh(z), before bounds."""
    modules: list[nn.Module] = []
    layers = spec.split(policy_params.detach().reshape(1, -1))
    for w, b in layers:
        lin = nn.Linear(w.shape[2], w.shape[1])
        with torch.no_grad():
            lin.weight.copy_(w[0])
            lin.bias.copy_(b[0])
        modules += [lin, nn.Tanh()]
    return nn.Sequential(*modules)
