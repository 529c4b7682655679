"""State sync: ``broadcast_optimizer_state`` for the wrapper (compression state stays per rank)
and the ``hvd.elastic.TorchState`` handler that commits, restores and syncs it."""
from __future__ import annotations

import copy

import horovod.torch as hvd
import torch
from horovod.torch.elastic import state as _elastic_state

from .optimizer import DistributedOptimizer
from .taciturn_path import STATE_KEY


broadcast_parameters = hvd.broadcast_parameters


def broadcast_optimizer_state(optimizer, root_rank: int = 0, model=None) -> None:
    """``hvd.broadcast_optimizer_state`` for taciturn's DistributedOptimizer (other optimizers are
    passed to Horovod's). Call it on every rank of the optimizer's process set.

    The wrapped optimizer's whole state dict (per-parameter state, hyper-parameters) is
    broadcast from ``root_rank`` (a Horovod rank, as in Horovod) and loaded on the others.
    A wrapped optimizer without state is first given it as Horovod does (``_initialize_state``:
    zero gradients, one local step), so that every rank holds the state after the call.
    Compression state is per rank and is never broadcast: each rank keeps its own when every
    rank holds its own for the same step (fresh optimizers; each rank loaded its own
    checkpoint or elastic commit); otherwise every rank restarts it from zero, with a warning.
    """
    if not isinstance(optimizer, DistributedOptimizer):
        return hvd.broadcast_optimizer_state(optimizer, root_rank, model)
    ranks = optimizer.process_set.ranks
    if ranks and root_rank not in ranks:
        raise ValueError(f"root_rank={root_rank} is not in the optimizer's {optimizer.process_set}: pass one of "
                         f"its Horovod ranks {ranks}")
    optimizer._rejoin()
    if not optimizer._active:
        return
    inner = optimizer.optimizer
    _initialize_state(inner, model)
    sd = inner.state_dict()
    own = sd["state"].get(STATE_KEY)
    shared = {**sd, "state": {k: v for k, v in sd["state"].items() if k != STATE_KEY}}
    shared = hvd.broadcast_object(shared, root_rank, name=f"{optimizer._prefix}.state",
                                  process_set=optimizer.process_set)
    if hvd.rank() != root_rank:
        inner.load_state_dict(shared)
        if own is not None:
            inner.state[STATE_KEY] = own
    optimizer._agree_on_compression_state(root_rank)


def _initialize_state(optimizer: torch.optim.Optimizer, model=None) -> None:
    """Horovod's first broadcast: an optimizer without per-parameter state gets zero gradients
    (sparse ones for SparseAdam, and for SGD on the sparse embeddings of ``model``) and one step
    of its own update rule, so its state exists; the zero gradients stay in ``p.grad``.

    Unlike Horovod, the step runs with ``weight_decay`` 0 (restored after): on zero gradients
    the update of taciturn's and torch's optimizers (but ASGD, whose ``lambd`` decays too) is
    then zero and no parameter moves. Horovod's step lets weight decay move them, on the ranks
    without state only, which desynchronises the model when only the root loaded a checkpoint.
    It is the wrapped optimizer's local step: no collective, no compression state."""
    if any(key != STATE_KEY for key in optimizer.state):
        return
    sparse = set() if model is None else {id(p) for m in model.modules()
                                          if isinstance(m, torch.nn.Embedding) and m.sparse for p in m.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
                if isinstance(optimizer, torch.optim.SparseAdam) or (isinstance(optimizer, torch.optim.SGD)
                                                                     and id(p) in sparse):
                    p.grad = p.grad.to_sparse()
    decays = {i: group["weight_decay"] for i, group in enumerate(optimizer.param_groups) if "weight_decay" in group}
    for i in decays:
        optimizer.param_groups[i]["weight_decay"] = 0.0
    try:
        optimizer.step()
    finally:
        for i, decay in decays.items():
            optimizer.param_groups[i]["weight_decay"] = decay


class OptimizerStateHandler(_elastic_state.StateHandler):
    """``hvd.elastic.TorchState``'s handler for a DistributedOptimizer: commits a deep copy of
    the state dict (compression state included), restores a copy of it (so training never
    writes into the commit) and syncs through ``broadcast_optimizer_state``."""

    def __init__(self, optimizer):
        super().__init__(optimizer)
        self._saved = copy.deepcopy(optimizer.state_dict())

    def save(self):
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self):
        self.value.load_state_dict(copy.deepcopy(self._saved))

    def sync(self):
        broadcast_optimizer_state(self.value, root_rank=0)


def _register_elastic_handler() -> None:
    registry = _elastic_state.get_handler_registry()
    if not any(kind is DistributedOptimizer for kind, _ in registry):
        _elastic_state.set_handler_registry([(DistributedOptimizer, OptimizerStateHandler)] + list(registry))


_register_elastic_handler()
