"""The generator G(c): a weight-sharing hypernetwork that writes a policy for a command.

Paper §3 ("Generator"): each weight matrix of the policy is cut into k×k tiles. Every tile
owns a learned embedding e. One small MLP per layer *kind* (input layer, hidden layers,
output layer) maps [e, c] to the tile's k×k weights plus a k-vector of bias. The bias
chunks of one output block (a row of tiles) are averaged over that row. All outputs of a
layer are scaled by s/√fan_in, so that a freshly initialised generator writes policies
with sensible activations whatever the layer sizes.

Sizes that are not multiples of k: a layer of shape (out, in) is padded up to
(⌈out/k⌉·k, ⌈in/k⌉·k), tiled, generated, and cropped back to (out, in). The padded
weights are simply never used, so any observation, action or hidden size works; the cost
is at most one partial row and one partial column of tiles per layer.

The command enters G divided by ``command_scale`` = return_max − return_min of the env.

Task families (``core.context``): the command is [return, context]. The context, already
normalised to about [−1, 1], enters the first layer of every hypernetwork beside the
return, so G([R, x]) writes a policy specialised to task x. Without a context (``context_dim``
0) the generator is the paper's, parameter for parameter.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn import functional as F

from gogepo_ray.core.policy import PolicySpec


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers with ``activation`` between them and a linear output."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """G(command[, context]) -> policy_params, for every command in a batch at once."""

    KINDS = ("input", "hidden", "output")

    def __init__(
        self,
        spec: PolicySpec,
        *,
        command_scale: float,
        tile: int = 16,
        embedding_dim: int = 8,
        hidden: tuple[int, ...] = (256, 256),
        output_scale: float = 2.0,
        bf16: bool = False,
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        if command_scale <= 0:
            raise ValueError("command_scale (return_max - return_min) must be positive")
        self.spec = spec
        self.tile = tile
        self.command_scale = float(command_scale)
        self.bf16 = bf16
        self.context_dim = context_dim
        shapes = spec.layer_shapes
        n_layers = len(shapes)
        # Which hypernetwork writes each layer. A single-layer (linear) policy uses "input".
        self.layer_kind = [
            "input" if i == 0 else "output" if i == n_layers - 1 else "hidden"
            for i in range(n_layers)
        ]
        self.tiling = [
            (math.ceil(o / tile), math.ceil(i / tile)) for o, i in shapes
        ]  # (T_out, T_in)
        self.fan_in = [i for _, i in shapes]
        # One embedding table per layer; per kind, the layers' tiles are run as one batch.
        self.embeddings = nn.ParameterList(
            [nn.Parameter(torch.randn(t_out * t_in, embedding_dim)) for t_out, t_in in self.tiling]
        )  # per layer (T_out * T_in, e), row-major over (T_out, T_in)
        used = sorted(set(self.layer_kind), key=self.KINDS.index)
        self.hypernets = nn.ModuleDict(
            {
                kind: mlp([embedding_dim + 1 + context_dim, *hidden, tile * tile + tile])
                for kind in used
            }
        )
        self.output_scale = output_scale

    def _autocast(self, device_type: str):
        if self.bf16:
            return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        return nullcontext()

    def layers(
        self, command: torch.Tensor, context: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """command (B,) raw returns, context (B, context_dim) normalised (None without one)
        -> per policy layer (W (B, out, in), b (B, out)).

        Under bf16 the layers stay bf16: the critic consumes them under the same autocast,
        and a round trip through fp32 would only add copies (the values are bf16 either
        way). :meth:`forward` returns fp32 parameters."""
        c = (command.reshape(-1, 1) / self.command_scale).to(self.embeddings[0].dtype)  # (B, 1)
        batch, k = c.shape[0], self.tile
        e_dim = self.embeddings[0].shape[1]
        if self.context_dim:
            if context is None or context.shape != (batch, self.context_dim):
                got = None if context is None else tuple(context.shape)
                raise ValueError(
                    f"expected a context of shape ({batch}, {self.context_dim}), got {got}"
                )
            x = context.to(c.dtype)  # (B, k)
        elif context is not None and context.numel():
            raise ValueError("this generator takes no context")
        out_layers = []
        for i, kind in enumerate(self.layer_kind):
            net = self.hypernets[kind]
            first, last = net[0], net[-1]
            t_out, t_in = self.tiling[i]
            scale = self.output_scale / math.sqrt(self.fan_in[i])
            with self._autocast(c.device.type):
                # First layer on [e, c] without materialising the concatenation: the
                # embedding part is shared by every command in the batch.
                h = F.linear(self.embeddings[i], first.weight[:, :e_dim], first.bias)  # (T, H)
                h = h.unsqueeze(0) + c.unsqueeze(1) * first.weight[:, e_dim]  # (B, T, H)
                if self.context_dim:  # the task's share, one (H,) row per policy
                    h = h + F.linear(x, first.weight[:, e_dim + 1 :]).unsqueeze(1)
                h = torch.relu(h)
                for module in net[2:-1]:
                    h = module(h)
                # s/sqrt(fan_in) folded into the output layer (scales a (k*k+k, H) matrix,
                # not the (B, T, k*k+k) output); weights and bias as two products so that
                # the backward never slices a large output.
                w = F.linear(
                    h, last.weight[: k * k] * scale, last.bias[: k * k] * scale
                )  # (B, T, k*k)
                b = F.linear(
                    h, last.weight[k * k :] * scale, last.bias[k * k :] * scale
                )  # (B, T, k)
            w = w.reshape(batch, t_out, t_in, k, k)
            w = w.permute(0, 1, 3, 2, 4).reshape(batch, t_out * k, t_in * k)
            b = b.float().reshape(batch, t_out, t_in, k).mean(dim=2).to(w.dtype)
            b = b.reshape(batch, t_out * k)
            o, fi = self.spec.layer_shapes[i]
            if (o, fi) != (t_out * k, t_in * k):  # crop the padding (only when sizes need it)
                w, b = w[:, :o, :fi], b[:, :o]
            out_layers.append((w, b))
        return out_layers

    def forward(self, command: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """command (B,) raw returns[, context (B, k)] -> policy_params (B, D), float32."""
        return self.spec.join(self.layers(command, context)).float()
