"""Communicator over mpi4py, for jobs launched with plain ``mpirun`` (torch's pip wheels have no
MPI backend). CPU tensors only: buffers are handed to MPI through their numpy views."""
from __future__ import annotations

import torch

from .base import Communicator, backend_module, reduce_in_place


def _mpi():
    return backend_module("mpi4py.MPI", "the 'mpi' communicator needs mpi4py and an MPI library: "
                          "apt-get install libopenmpi-dev openmpi-bin && pip install mpi4py")


class MPICommunicator(Communicator):
    name = "mpi"

    def __init__(self, comm=None):
        MPI = _mpi()
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()

    def split(self, parts):
        mine = self._part(parts)
        return MPICommunicator(self.comm.Split(parts.index(mine), mine.index(self.rank)))

    @staticmethod
    def _np(t: torch.Tensor):
        if t.device.type != "cpu":
            raise ValueError(f"the mpi communicator moves CPU tensors only, got one on {t.device}; "
                             "use the torch.distributed communicator (nccl) for GPU tensors")
        return t.numpy() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy()

    def all_to_all(self, chunks):
        send = torch.stack(chunks).contiguous()
        recv = torch.empty_like(send)
        self.comm.Alltoall(self._np(send), self._np(recv))
        return recv

    def all_gather(self, t):
        t = t.contiguous()
        out = t.new_empty((self.world_size,) + tuple(t.shape))
        self.comm.Allgather(self._np(t), self._np(out))
        return out

    def broadcast(self, t, src=0):
        buf = t if t.is_contiguous() else t.contiguous()
        self.comm.Bcast(self._np(buf), root=src)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_reduce(self, t, op="sum"):
        return reduce_in_place(t, op, lambda buf: self.comm.Allreduce(_mpi().IN_PLACE, self._np(buf),
                                                                      op=self._ops[op]))
