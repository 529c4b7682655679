"""The gradient that goes on the wire: ``p.grad`` dense (zeros where this rank computed none),
and made sparse again after the exchange where it arrived sparse. Both paths of the wrapper use it."""
from __future__ import annotations

from typing import Set

import torch


class WireGradients:
    """Densifies ``p.grad`` for the wire and re-sparsifies it once averaged (as Horovod's
    ``sparse_as_dense`` does), so sparse optimizers (SparseAdam) still get a sparse gradient."""

    def __init__(self):
        self._sparse: Set[torch.Tensor] = set()

    def dense(self, p: torch.Tensor) -> torch.Tensor:
        """``p.grad`` as the dense tensor that goes on the wire, densified in place."""
        if p.grad is None:
            # Not computed here (e.g. a branch unused on this rank), maybe computed elsewhere:
            # every rank must take part, with zeros (as Horovod does).
            p.grad = torch.zeros_like(p)
        if p.grad.is_sparse:
            self._sparse.add(p)
            p.grad = p.grad.to_dense()
        return p.grad

    def resparsify(self) -> None:
        """Make every gradient that arrived sparse sparse again (after the averages are written)."""
        for p in self._sparse:
            p.grad = p.grad.to_sparse()
        self._sparse.clear()

    def forget(self) -> None:
        self._sparse.clear()
