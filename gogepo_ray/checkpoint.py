"""Checkpoint files: the whole learning state, written atomically, loaded without pickle.

A checkpoint is a ``torch.save`` of tensors and plain Python containers only, so it loads
with ``torch.load(weights_only=True)``: opening a checkpoint never executes code.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from gogepo_ray.config import Config, ConfigError, build_config

FORMAT = "gogepo-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or belongs to another env/architecture."""


def payload(
    *, cfg: Config, learner: dict, progress: dict, inflight: list[dict] | None = None
) -> dict:
    """A checkpoint's content: config, the learner's whole state, the driver's counters,
    and the policies handed to workers whose episodes had not finished."""
    return {
        "format": FORMAT,
        "config": cfg.model_dump(mode="json"),
        "learner": learner,
        "progress": progress,
        "inflight": inflight or [],
    }


def save(path: str | os.PathLike, state: dict) -> Path:
    """Write to a temporary file, fsync, then rename over ``path``: a crash mid-write
    leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


WHICH = ("best", "latest")


def resolve(path: str | os.PathLike, which: str | None = None) -> Path:
    """A checkpoint file, a run directory, or an RLlib checkpoint directory of the GoGePo
    algorithm (its gogepo.pt). In a run directory ``which`` picks the checkpoint: ``best``
    (checkpoints/best.pt, the networks of the best evaluation), ``latest`` (final.pt, else
    latest.pt), or None: best.pt where the run has one, else the latest."""
    p = Path(path)
    if which is not None and which not in WHICH:
        raise CheckpointError(f"--checkpoint must be one of {', '.join(WHICH)}, got {which!r}")
    if which is not None and p.is_file():
        raise CheckpointError(
            f"--checkpoint {which} picks a checkpoint of a run directory; {p} is a file already "
            "(give the run directory, or leave --checkpoint out)"
        )
    if p.is_dir() and which == "best":
        cand = p / "checkpoints" / "best.pt"
        if cand.is_file():
            return cand
        raise CheckpointError(
            f"no best checkpoint in {p} (checkpoints/best.pt is written at the run's first "
            "evaluation); use --checkpoint latest"
        )
    if p.is_dir():
        names = ("final.pt", "latest.pt", "gogepo.pt")
        if which is None:
            names = ("best.pt", *names)
        for name in names:
            for cand in (p / "checkpoints" / name, p / name):
                if cand.is_file():
                    return cand
        raise CheckpointError(
            f"no checkpoint in {p} (looked for checkpoints/final.pt and latest.pt)"
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load(path: str | os.PathLike, which: str | None = None) -> dict[str, Any]:
    p = resolve(path, which)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        EOFError,
        OSError,
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        ValueError,
        KeyError,
    ) as exc:
        raise CheckpointError(
            f"{p} is not a readable checkpoint (truncated or not a gogepo checkpoint): {exc}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a gogepo checkpoint (format {FORMAT!r} expected)")
    return payload


def config_of(payload: dict) -> Config:
    try:
        return build_config(payload["config"], "checkpoint config")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
