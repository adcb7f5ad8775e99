"""Export one generated policy as a standalone file that plain torch can load.

The file is a ``torch.save`` of tensors and plain values (loads with weights_only=True).
The observation normaliser is folded into the first layer and the action bounds into a
final affine layer, so the policy is a single ``nn.Sequential``: raw observation in,
action within the env's bounds out. Loading needs only torch:

    import torch
    from torch import nn

    def load_policy(path):
        blob = torch.load(path, weights_only=True)
        sizes = blob["layer_sizes"]                      # [obs_dim, *hidden, act_dim]
        layers = []
        for i in range(len(sizes) - 1):
            layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.Tanh()]
        layers.append(nn.Linear(sizes[-1], sizes[-1]))   # tanh output -> action bounds
        policy = nn.Sequential(*layers)
        policy.load_state_dict(blob["state_dict"])
        return policy.eval()

    policy = load_policy("policy.pt")
    action = policy(torch.as_tensor(obs, dtype=torch.float32))
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gogepo_ray.core.learner import Learner
from gogepo_ray.core.policy import to_sequential

FORMAT = "gogepo-policy-v1"


def build_policy(
    learner: Learner, command: float | None, context=None
) -> tuple[nn.Sequential, dict]:
    """G(command[, context]) with the normaliser and action bounds folded in, as an
    nn.Sequential. For a learner whose policy takes no command (ARS) ``command`` is None;
    ``context`` (the task, a task-family run only) is None elsewhere."""
    spec = learner.spec
    batch = learner.propose_eval(
        None if command is None else [command], 1, None if context is None else [list(context)]
    )
    params = torch.from_numpy(batch.policy_params[0])
    seq = to_sequential(spec, params)
    mean, std = (torch.from_numpy(a) for a in batch.normalizer())
    first: nn.Linear = seq[0]
    with torch.no_grad():
        # W ((x − m) / s) + b  =  (W / s) x + (b − (W / s) m)
        w = first.weight / std
        first.weight.copy_(w)
        first.bias.sub_(w @ mean)
    low = torch.tensor(spec.action_low, dtype=torch.float32)
    high = torch.tensor(spec.action_high, dtype=torch.float32)
    bounds = nn.Linear(spec.act_dim, spec.act_dim)
    with torch.no_grad():
        bounds.weight.copy_(torch.diag((high - low) / 2))
        bounds.bias.copy_((high + low) / 2)
    policy = nn.Sequential(*seq, bounds).eval()
    meta = {
        "command": None if command is None else float(command),
        "context": None if context is None else [float(v) for v in context],
        "layer_sizes": list(spec.layer_sizes),
    }
    return policy, meta


def export_policy(learner: Learner, command: float | None, path: str | Path, context=None) -> Path:
    """Write G(command[, context]) to ``path``; ``context`` is one task, (k,)."""
    policy, meta = build_policy(learner, command, context)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": FORMAT,
            "env_id": learner.cfg.env.id,
            "command": meta["command"],
            "context": meta["context"],  # the task (task-family runs), else None
            "layer_sizes": meta["layer_sizes"],
            "action_low": list(learner.spec.action_low),
            "action_high": list(learner.spec.action_high),
            "state_dict": policy.state_dict(),
        },
        path,
    )
    return path


def load_policy(path: str | Path) -> nn.Sequential:
    """The documented loader (also in this module's docstring, to copy without gogepo)."""
    blob = torch.load(path, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not an exported gogepo policy ({FORMAT})")
    sizes = blob["layer_sizes"]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.Tanh()]
    layers.append(nn.Linear(sizes[-1], sizes[-1]))
    policy = nn.Sequential(*layers)
    policy.load_state_dict(blob["state_dict"])
    return policy.eval()
