"""Horovod's own path for a Horovod ``Compressor`` (``Compression.none``, ``fp16``,
``ScaledFP16Compressor``): each gradient's ``allreduce_async_`` of the compressed tensor, named by
its parameter and fused by Horovod, as ``hvd.DistributedOptimizer`` does; sparse gradients take
Horovod's sparse allreduce unless ``sparse_as_dense``. Stateless: nothing to save or agree on."""
from __future__ import annotations

from typing import Dict, List

import horovod.torch as hvd
import torch

from ...comm.horovod import wait
from .gradients import WireGradients


def check_arguments(compression, op, gradient_predivide_factor: float) -> None:
    """Horovod's own rules (checked by the wrapper for every compression)."""
    if op == hvd.Adasum:
        raise ValueError("op=hvd.Adasum is not supported by taciturn's DistributedOptimizer; use "
                         "hvd.DistributedOptimizer(..., op=hvd.Adasum)")
    if gradient_predivide_factor != 1.0 and op != hvd.Average:
        raise ValueError("gradient_predivide_factor is supported only with op=hvd.Average (as in Horovod)")


class HorovodPath:
    """Per-parameter allreduce of Horovod ``compression``'s output; see the module docstring."""

    def __init__(self, compression, params: List[torch.Tensor], names: List[str], prefix: str, process_set,
                 op, gradient_predivide_factor: float, sparse_as_dense: bool):
        self.compression = compression
        self._params = params
        self._names = {p: f"{prefix}.{n}" for p, n in zip(params, names)}
        self._process_set = process_set
        self._op = op
        if op == hvd.Average:
            self._scale = (1.0 / gradient_predivide_factor, gradient_predivide_factor)
        else:
            self._scale = (1.0, 1.0)
        self._sparse_as_dense = sparse_as_dense
        self._wire = WireGradients()
        self._handles: Dict[torch.Tensor, tuple] = {}

    @property
    def busy(self) -> bool:
        return bool(self._handles)

    def describe(self) -> str:
        return repr(self.compression)

    def grad_ready(self, p: torch.Tensor) -> None:
        self._handles[p] = self._allreduce_async(p)

    def _allreduce_async(self, p: torch.Tensor):
        name = self._names[p]
        if p.grad is not None and p.grad.is_sparse and not self._sparse_as_dense:
            # Horovod's sparse allreduce: allgather of indices and values (uncompressed).
            return hvd.sparse_allreduce_async(p.grad, name=name, op=self._op, process_set=self._process_set), None
        compressed, ctx = self.compression.compress(self._wire.dense(p))
        pre, post = self._scale
        handle = hvd.allreduce_async_(compressed, name=name, op=self._op, prescale_factor=pre,
                                      postscale_factor=post, process_set=self._process_set)
        return handle, ctx

    def finish(self) -> None:
        """Start what no hook started (parameters without a gradient), wait, write ``p.grad``."""
        for p in self._params:
            if p not in self._handles:
                self._handles[p] = self._allreduce_async(p)
        for p, (handle, ctx) in self._handles.items():
            if callable(handle):  # a sparse allreduce: its result is the averaged sparse gradient
                p.grad = handle()
                continue
            out = self.compression.decompress(wait(handle), ctx)
            if out is not p.grad:
                p.grad.copy_(out)
        self._wire.resparsify()

    def forget(self) -> None:
        self._handles = {}
        self._wire.forget()

    def drain(self) -> None:
        """Nothing runs outside Horovod's own background thread: forget the handles."""

    def rejoin(self, comm) -> None:
        """Parameter names address Horovod's tensors: nothing to rebuild."""

    # The compression state interface of the taciturn path: there is none here.
    def saved(self, state_dict, reset: bool):
        return None

    def restore(self, saved, reset: bool) -> None:
        pass

    def reset_state(self) -> None:
        pass

    def agree(self, root: int) -> None:
        pass
