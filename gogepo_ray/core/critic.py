"""The parameter-based critic V(θ) with policy fingerprinting (paper §3, "Critic").

V judges a policy by what it does, not by its raw weights: P learnable probing states
s_1..s_P are fed to the policy, and its actions on them, concatenated, form the policy's
*fingerprint*. An MLP maps the fingerprint to the predicted episode return:

    V(θ) = f([π_θ(s_1), ..., π_θ(s_P)])

The probing states live in the policy's input space (normalised observations); the
fingerprint holds the actions as the env would receive them (within the action bounds).
"""

from __future__ import annotations

import torch
from torch import nn

from gogepo_ray.core.generator import mlp
from gogepo_ray.core.policy import Layers, PolicySpec, policy_actions


class Critic(nn.Module):
    """V(policy_params) -> predicted return, batched over policies."""

    def __init__(
        self, spec: PolicySpec, *, probing_states: int = 200, hidden: tuple[int, ...] = (256, 256)
    ) -> None:
        super().__init__()
        self.spec = spec
        self.probing_states = nn.Parameter(torch.rand(probing_states, spec.obs_dim))  # (P, obs_dim)
        self.head = mlp([probing_states * spec.act_dim, *hidden, 1])

    def fingerprint(self, policy_params: torch.Tensor | Layers) -> torch.Tensor:
        """(B, D) flat or per-layer -> (B, P * act_dim): the policies' actions on the probing states."""
        actions = policy_actions(self.spec, policy_params, self.probing_states)  # (B, P, act_dim)
        return actions.reshape(actions.shape[0], -1)

    def forward(self, policy_params: torch.Tensor | Layers) -> torch.Tensor:
        """(B, D) -> (B,) predicted returns."""
        return self.head(self.fingerprint(policy_params)).squeeze(-1)
