"""Communicator over a torch.distributed process group (gloo, nccl, or a sub-group)."""
from __future__ import annotations

import contextlib
import datetime
import time

import torch
import torch.distributed as dist

from .base import CollectiveError, Communicator

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class TorchDistCommunicator(Communicator):
    name = "torch"

    def __init__(self, group=None, timeout: float = None):
        """``timeout`` (seconds): collectives run on a new group over the same ranks with that
        timeout, so a dead or stalled peer ends this rank with a CollectiveError in bounded time."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistCommunicator needs an initialised torch.distributed process group: "
                               "call torch.distributed.init_process_group(...) first, or pass "
                               "process_group=None to an optimizer outside a distributed job")
        if timeout is not None:
            if timeout <= 0:
                raise ValueError(f"timeout={timeout!r} must be > 0 seconds")
            ranks = dist.get_process_group_ranks(group) if group is not None else None
            group = dist.new_group(ranks=ranks, timeout=datetime.timedelta(seconds=timeout))
        self.timeout = timeout
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    @contextlib.contextmanager
    def _guard(self, what: str):
        start = time.monotonic()
        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            limit = f" (timeout {self.timeout:g} s)" if self.timeout else ""
            raise CollectiveError(
                f"taciturn: {what} over {self.world_size} ranks failed on rank {self.rank} after "
                f"{time.monotonic() - start:.1f} s{limit}: a peer rank died, stalled, or ran a different "
                f"collective. Check the other ranks' logs; pass timeout= (seconds) to the optimizer to bound "
                f"the wait. Cause: {e}") from e

    def all_to_all(self, chunks):
        send = torch.stack(chunks) if len(chunks) > 1 else chunks[0].unsqueeze(0)
        recv = torch.empty_like(send)
        with self._guard("all_to_all"):
            dist.all_to_all_single(recv.view(-1), send.view(-1), group=self.group)
        return recv

    def all_gather(self, t):
        out = t.new_empty((self.world_size,) + tuple(t.shape))
        with self._guard("all_gather"):
            dist.all_gather_into_tensor(out.view(-1), t.contiguous().view(-1), group=self.group)
        return out

    def broadcast(self, t, src=0):
        with self._guard("broadcast"):
            dist.broadcast(t, src=dist.get_global_rank(self.group, src) if self.group is not None else src,
                           group=self.group)
        return t

    def all_reduce(self, t, op="sum"):
        with self._guard("all_reduce"):
            dist.all_reduce(t, op=_OPS[op], group=self.group)
        return t

    def __getstate__(self):
        raise TypeError("a communicator holds a live process group and cannot be pickled")
