"""Communicator over Horovod's collectives (``hvd.alltoall`` / ``allgather`` / ``broadcast_`` /
``allreduce_``), for jobs launched with ``horovodrun`` (MPI or Gloo controller).

Horovod matches collectives across ranks by name, not by call order. Every operation of a
``HorovodCommunicator`` is named ``<prefix>.<kind>.<n>`` with ``n`` counting its own calls, so
two communicators never collide and each one's calls must simply come in the same order on
every rank of its process set (the compressed pipeline guarantees that). The default prefix
counts communicators built in this process: build them in the same order on every rank, or
pass ``prefix=``.

CPU tensors (this Horovod build moves CPU memory; its torch binding has no bfloat16, so
2-byte floats are broadcast as int16 and reduced in fp32).
"""
from __future__ import annotations

import itertools
import time

import torch

from .base import Communicator, Handle, backend_module, reduce_in_place

_INSTANCES = itertools.count()
#: pause between polls of a pending Horovod operation
POLL_S = 1e-4


def _hvd():
    return backend_module("horovod.torch", "the 'horovod' communicator needs Horovod built with PyTorch support: "
                          "run scripts/install_horovod.sh")


def wait(handle):
    """``hvd.synchronize(handle)`` once the operation is done. Horovod's own wait spins on
    ``sched_yield`` with the GIL released: on a host with more ranks than free cores, the ranks'
    waiting threads take the cores from the background threads that do the communication
    (4 ranks on 2 cores: 4 steps of a two-level exchange took 11.6 s instead of 0.7 s)."""
    hvd = _hvd()
    while not hvd.poll(handle):
        time.sleep(POLL_S)
    return hvd.synchronize(handle)


class HorovodCommunicator(Communicator):
    """``process_set``: a ``hvd.ProcessSet`` this rank belongs to (default: all ranks)."""

    name = "horovod"

    def __init__(self, process_set=None, prefix: str = None):
        hvd = _hvd()
        if not hvd.is_initialized():
            raise RuntimeError("HorovodCommunicator needs Horovod: call hvd.init() first (and launch with horovodrun)")
        self.process_set = process_set if process_set is not None else hvd.global_process_set
        if self.process_set.process_set_id is None:
            raise ValueError(f"{self.process_set} is not registered with Horovod: pass it to "
                             "hvd.init(process_sets=[...]) or hvd.add_process_set(...) first")
        if not self.process_set.included():
            raise ValueError(f"rank {hvd.rank()} is not in {self.process_set}: build the communicator only on "
                             "the ranks of its process set")
        self.rank = self.process_set.rank()
        self.world_size = self.process_set.size()
        self.prefix = prefix if prefix is not None else f"taciturn.{next(_INSTANCES)}"
        self._calls = itertools.count()
        self._ops = {"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}

    def split(self, parts):
        """A Horovod process set per part (``hvd.add_process_set``, which needs
        ``hvd.init(process_sets="dynamic")`` or HOROVOD_DYNAMIC_PROCESS_SETS=1 in horovodrun's
        environment); every rank adds every part."""
        hvd = _hvd()
        ranks = self.process_set.ranks if self.process_set.ranks is not None else list(range(hvd.size()))
        try:
            sets = [_process_set(hvd, [ranks[r] for r in part]) for part in parts]
        except ValueError as err:
            raise ValueError(f"Horovod refused a process set for the two-level exchange ({err}): launch with "
                             "HOROVOD_DYNAMIC_PROCESS_SETS=1 in horovodrun's environment, or call "
                             "hvd.init(process_sets=\"dynamic\")") from err
        return HorovodCommunicator(sets[parts.index(self._part(parts))], prefix=f"{self.prefix}.split{next(self._calls)}")

    def _name(self, kind: str) -> str:
        return f"{self.prefix}.{kind}.{next(self._calls)}"

    def all_to_all_async(self, chunks):
        hvd = _hvd()
        send = torch.stack(chunks).contiguous()
        handle = hvd.alltoall_async(send, name=self._name("alltoall"), process_set=self.process_set)
        return Handle(lambda: wait(handle)[0].view(self.world_size, -1))

    def all_gather_async(self, t):
        hvd = _hvd()
        handle = hvd.allgather_async(t.contiguous().unsqueeze(0), name=self._name("allgather"),
                                     process_set=self.process_set)
        return Handle(lambda: wait(handle))

    def broadcast(self, t, src=0):
        hvd = _hvd()
        buf = t if t.is_contiguous() else t.contiguous()
        wire = buf.view(torch.int16) if buf.dtype == torch.bfloat16 else buf
        root = self.process_set.ranks[src] if self.process_set.ranks else src
        wait(hvd.broadcast_async_(wire, root, name=self._name("broadcast"), process_set=self.process_set))
        if buf is not t:
            t.copy_(buf)
        return t

    def all_reduce(self, t, op="sum"):
        hvd = _hvd()
        return reduce_in_place(t, op, lambda buf: wait(hvd.allreduce_async_(
            buf, name=self._name("allreduce"), op=self._ops[op], process_set=self.process_set)))

    def __getstate__(self):
        raise TypeError("a communicator holds a live Horovod process set and cannot be pickled")


def _process_set(hvd, ranks):
    """Horovod's process set of ``ranks``: the one that exists (Horovod refuses to add a second
    of the same ranks, e.g. for another optimizer's two-level exchange), else a new one."""
    from horovod.common import process_sets

    for set_id, members in process_sets._basics._get_process_set_ids_and_ranks().items():
        if list(members) == ranks:
            found = hvd.ProcessSet(ranks)
            found.process_set_id = set_id
            return found
    return hvd.add_process_set(ranks)
