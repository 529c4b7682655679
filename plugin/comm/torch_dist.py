"""Communicator over a torch.distributed process group (gloo, nccl, or a sub-group)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .base import Communicator

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class TorchDistCommunicator(Communicator):
    name = "torch"

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistCommunicator needs an initialised torch.distributed process group: "
                               "call torch.distributed.init_process_group(...) first, or pass "
                               "process_group=None to an optimizer outside a distributed job")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def all_to_all(self, chunks):
        send = torch.stack(chunks) if len(chunks) > 1 else chunks[0].unsqueeze(0)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv.view(-1), send.view(-1), group=self.group)
        return recv

    def all_gather(self, t):
        out = t.new_empty((self.world_size,) + tuple(t.shape))
        dist.all_gather_into_tensor(out.view(-1), t.contiguous().view(-1), group=self.group)
        return out

    def broadcast(self, t, src=0):
        dist.broadcast(t, src=dist.get_global_rank(self.group, src) if self.group is not None else src,
                       group=self.group)
        return t

    def all_reduce(self, t, op="sum"):
        dist.all_reduce(t, op=_OPS[op], group=self.group)
        return t

    def __getstate__(self):
        raise TypeError("a communicator holds a live process group and cannot be pickled")
