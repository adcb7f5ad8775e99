"""The parameter-based critic V(θ) with policy fingerprinting (paper §3, "Critic").

V judges a policy by what it does, not by its raw weights: P learnable probing states
s_1..s_P are fed to the policy, and its actions on them, concatenated, form the policy's
*fingerprint*. An MLP maps the fingerprint to the predicted episode return:

    V(θ) = f([π_θ(s_1), ..., π_θ(s_P)])

The probing states live in the policy's input space (normalised observations); the
fingerprint holds the actions as the env would receive them (within the action bounds).

With ``bf16`` the fingerprint (B policies on P probing states: the critic's large
product) runs under bf16 autocast, like the generator's hypernetworks; the head and the
predicted return stay fp32, where a return of 1000 keeps its units.

Task families (``core.context``): V(θ, x) = f([fingerprint, x]), the normalised context
concatenated with the fingerprint, so the same policy can be worth different returns in
different tasks. Without a context (``context_dim`` 0) the critic is the paper's.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from gogepo_ray.core.generator import mlp
from gogepo_ray.core.policy import Layers, PolicySpec, policy_actions


class Critic(nn.Module):
    """V(policy_params) -> predicted return, batched over policies."""

    def __init__(
        self,
        spec: PolicySpec,
        *,
        probing_states: int = 200,
        hidden: tuple[int, ...] = (256, 256),
        bf16: bool = False,
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.bf16 = bf16
        self.context_dim = context_dim
        self.probing_states = nn.Parameter(torch.rand(probing_states, spec.obs_dim))  # (P, obs_dim)
        self.head = mlp([probing_states * spec.act_dim + context_dim, *hidden, 1])
        # on the critic's device, outside its state dict (they are the env's, not learned)
        self.register_buffer("action_low", torch.tensor(spec.action_low), persistent=False)
        self.register_buffer("action_high", torch.tensor(spec.action_high), persistent=False)

    def fingerprint(self, policy_params: torch.Tensor | Layers) -> torch.Tensor:
        """(B, D) flat or per-layer -> (B, P * act_dim): the policies' actions on the probing states."""
        states = self.probing_states
        autocast = (
            torch.autocast(device_type=states.device.type, dtype=torch.bfloat16)
            if self.bf16
            else nullcontext()
        )
        with autocast:
            actions = policy_actions(
                self.spec, policy_params, states, (self.action_low, self.action_high)
            )  # (B, P, act_dim)
        return actions.reshape(actions.shape[0], -1).float()

    def forward(
        self, policy_params: torch.Tensor | Layers, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, D)[, context (B, k) normalised] -> (B,) predicted returns."""
        features = self.fingerprint(policy_params)
        if self.context_dim:
            if context is None or context.shape != (features.shape[0], self.context_dim):
                got = None if context is None else tuple(context.shape)
                raise ValueError(
                    f"expected a context of shape ({features.shape[0]}, {self.context_dim}), got {got}"
                )
            features = torch.cat([features, context.to(features.dtype)], dim=1)
        return self.head(features).squeeze(-1)
