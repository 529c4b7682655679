"""The cross-rank checks, once: the construction signature, non-finite gradients and silent
parameter divergence.

Each makes every rank take the same decision: it ends in one small collective whose result
is identical everywhere, so no rank skips, raises or continues alone.
"""
from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence

import torch

from .comm import Communicator
from .comm.base import gather_objects


def check_same(comm: Communicator, owner: str, signature: dict, what: str) -> None:
    """Raise on every rank, naming the first entry that differs, unless every rank's
    ``signature`` (a dict of picklable values) equals this one. Called before any collective
    whose shape depends on it, so a mismatch is an error instead of a hang."""
    digest = hashlib.sha256(repr(signature).encode()).hexdigest()
    for rank, (theirs, sig) in enumerate(gather_objects(comm, (digest, signature))):
        if theirs == digest:
            continue
        for key in list(signature) + [k for k in sig if k not in signature]:
            mine = signature.get(key)
            if sig.get(key) != mine:
                raise RuntimeError(f"{owner}: rank {rank} and rank {comm.rank} disagree on {key}: "
                                   f"{first_difference(key, sig.get(key), mine)}. Every rank must build the same {what}.")


def first_difference(key: str, a, b) -> str:
    """Where two values of signature entry ``key`` differ: the first differing element of two
    lists (of parameters: their name, shape, dtype), else both values."""
    if isinstance(a, list) and isinstance(b, list):
        noun, nouns = ("parameter", "parameters") if key in ("params", "parameters") else ("entry", "entries")
        if len(a) != len(b):
            return f"{len(a)} vs {len(b)} {nouns}"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                show = lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else repr(v)
                return f"{noun} #{i} is {show(x)} on one and {show(y)} on the other"
    return f"{a!r} vs {b!r}"


def any_nonfinite(comm: Communicator, tensors: Sequence[torch.Tensor]) -> List[int]:
    """Ranks whose ``tensors`` hold a NaN or Inf (the same list on every rank).

    The flag stays on the tensors' device until the reduced flags are read: one host sync per
    call (the decision to skip is the host's), none per tensor."""
    flags = torch.zeros(comm.world_size, dtype=torch.float32, device=comm.device)
    if tensors:
        sums = torch.stack([t.sum(dtype=torch.float32).to(comm.device) for t in tensors])
        flags[comm.rank] = (~torch.isfinite(sums)).any()
    comm.all_reduce(flags, "sum")
    return [r for r, f in enumerate(flags.tolist()) if f]


def checksums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(len(tensors), 2) float64: the sum and the position-weighted sum of every tensor.

    Bit-identical tensors give identical rows; any differing element changes a row (up to
    cancellations that the second, position-weighted sum makes practically impossible)."""
    rows = []
    for t in tensors:
        flat = t.detach().reshape(-1).double()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        rows.append(torch.stack([flat.sum(), (flat * weights).sum()]))
    return torch.stack(rows)


def first_divergence(comm: Communicator, tensors: Sequence[torch.Tensor],
                     names: Optional[Sequence[str]] = None) -> Optional[str]:
    """A message naming the first tensor that differs between ranks, or None if all agree."""
    mine = checksums(tensors).to(comm.device)
    everyone = comm.all_gather(mine).cpu()
    for i in range(len(tensors)):
        rows = everyone[:, i]
        differ = [r for r in range(comm.world_size) if not torch.equal(rows[r], rows[0])]
        if differ:
            name = names[i] if names else f"#{i}"
            return (f"parameter {name} (shape {tuple(tensors[i].shape)}) differs between rank 0 and rank(s) "
                    f"{differ}")
    return None
