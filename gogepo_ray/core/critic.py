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
    ) -> None:
        super().__init__()
        self.spec = spec
        self.bf16 = bf16
        self.probing_states = nn.Parameter(torch.rand(probing_states, spec.obs_dim))  # (P, obs_dim)
        self.head = mlp([probing_states * spec.act_dim, *hidden, 1])

    def fingerprint(self, policy_params: torch.Tensor | Layers) -> torch.Tensor:
        """(B, D) flat or per-layer -> (B, P * act_dim): the policies' actions on the probing states."""
        states = self.probing_states
        autocast = (
            torch.autocast(device_type=states.device.type, dtype=torch.bfloat16)
            if self.bf16
            else nullcontext()
        )
        with autocast:
            actions = policy_actions(self.spec, policy_params, states)  # (B, P, act_dim)
        return actions.reshape(actions.shape[0], -1).float()

    def forward(self, policy_params: torch.Tensor | Layers) -> torch.Tensor:
        """(B, D) -> (B,) predicted returns."""
        return self.head(self.fingerprint(policy_params)).squeeze(-1)
