"""Per-rank checkpoints of a model and a taciturn optimizer, safe for ``torch.load(weights_only=True)``.

Compression state is per rank, so each rank writes its own file: ``path`` with ``{rank}``
replaced, or ``path + ".rank<r>"``. Files are written to a temporary name and renamed, so a
crash never leaves a half-written checkpoint under the real name; a truncated or corrupted
file is reported as such.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

FORMAT = "taciturn-checkpoint-1"


def rank_path(path, rank: int, name: Optional[str] = None) -> str:
    """This rank's file, the one place per-rank names are made (the integrations call it too).

    Without ``name``: ``path`` with ``{rank}`` replaced, or ``path + ".rank<r>"``. With ``name``
    (e.g. ``"taciturn_rank{rank:05d}.pt"``): ``name`` formatted with ``rank`` inside the folder
    ``path``, whose own braces stay as they are (a framework's checkpoint folder is not a template).
    """
    path = os.fspath(path)
    if name is not None:
        return os.path.join(path, name.format(rank=rank))
    return path.format(rank=rank) if "{rank}" in path else f"{path}.rank{rank}"


def save_checkpoint(path, optimizer, model=None, extra=None) -> str:
    """Save ``model`` (the synced weights, for SAEF) and ``optimizer`` for this rank; returns the file."""
    rank, world = optimizer.comm.rank, optimizer.comm.world_size
    synced = getattr(optimizer, "synced_weights", None)
    with (synced() if synced is not None else contextlib.nullcontext()):
        model_state = model.state_dict() if model is not None else None
        payload = {"format": FORMAT, "rank": rank, "world_size": world, "optimizer": optimizer.state_dict(),
                   "model": model_state, "extra": extra}
        target = rank_path(path, rank)
        tmp = f"{target}.tmp{os.getpid()}"
        torch.save(payload, tmp)
    os.replace(tmp, target)
    return target


def read_checkpoint(path, rank: int, map_location=None) -> dict:
    """Load this rank's checkpoint file with ``weights_only=True``, with clear errors."""
    target = rank_path(path, rank)
    if not os.path.exists(target):
        raise FileNotFoundError(f"no checkpoint for rank {rank} at {target}; every rank saves its own file "
                                "(taciturn.save_checkpoint on every rank)")
    try:
        payload = torch.load(target, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for damaged zip archives
        raise ValueError(f"checkpoint {target} is truncated or corrupted and cannot be read ({e}); restore it "
                         "from a backup or start from an earlier checkpoint") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{target} is not a taciturn checkpoint (format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r}); "
                         "load plain torch checkpoints with optimizer.load_state_dict(torch.load(...))")
    return payload


def load_checkpoint(path, optimizer, model=None, reset_compression_state: bool = False, map_location=None):
    """Restore this rank's ``model`` and ``optimizer``; returns the ``extra`` that was saved."""
    rank = optimizer.comm.rank
    payload = read_checkpoint(path, rank, map_location)
    if payload["rank"] != rank and not reset_compression_state:
        raise ValueError(f"{rank_path(path, rank)} was written by rank {payload['rank']}, not rank {rank}")
    if model is not None:
        if payload["model"] is None:
            raise ValueError(f"{rank_path(path, rank)} holds no model state; save_checkpoint(path, opt, model)")
        model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"], reset_compression_state=reset_compression_state)
    return payload["extra"]
