"""taciturn's path for a preset (``Compression.cdadam``, ...): the core ``Exchange`` over Horovod's
alltoall/allgather, bucket by bucket on one communication thread, with the compression state
(``taciturn.state``) in the wrapped optimizer and Horovod's join semantics for uneven inputs.
On CUDA the communication thread queues its kernels on a side stream (``SideStream``), after an
event recorded when the bucket's gradients were ready, so they overlap backward's."""
from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import horovod.torch as hvd
import torch

from ...comm.base import gather_objects
from ...comm.horovod import wait
from ...exchange import Exchange, SideStream
from ...feedback import make_feedback
from ...metrics import CommStats
from ...state import CompressionState, mismatch
from ...topology import check_topology
from .gradients import WireGradients

STATE_KEY = "taciturn.horovod"


def check_arguments(compression, op, gradient_predivide_factor: float, op_name: str) -> None:
    """A preset averages or sums decoded fp32 values: other ops and predivision are refused."""
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError(f"op={op_name}: Compression.{compression.name} averages (hvd.Average) "
                         "or sums (hvd.Sum) gradients")
    if gradient_predivide_factor != 1.0:
        raise ValueError(f"gradient_predivide_factor={gradient_predivide_factor!r}: "
                         f"Compression.{compression.name} averages decoded fp32 values, which "
                         "cannot overflow; leave it at 1.0")


class TaciturnPath:
    """Buckets of ``params`` through the compressed exchange; see the module docstring.

    A bucket starts on the communication thread once all its gradients are ready and every
    bucket before it has started, so buckets run in the same order on every rank."""

    def __init__(self, compression, optimizer: torch.optim.Optimizer, params: List[torch.Tensor],
                 group_ids: List[int], names: List[str], prefix: str, process_set, comm, op,
                 bucket_cap_mb: float, stats: CommStats, topology=(1, "fp32")):
        self.compression = compression
        self._optimizer = optimizer
        self._params = params
        self._group_ids = group_ids
        self._names = names
        self._prefix = prefix
        self._process_set = process_set
        self._sum = op == hvd.Sum
        self._bucket_cap_mb = bucket_cap_mb
        self._stats = stats
        self._topology = topology  # (ranks_per_node as given, intra_node_dtype)
        self._wire = WireGradients()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taciturn-hvd")
        self._side = SideStream()
        self._build(comm)
        self._state.reset(step=0)
        self._everyone_here = True
        self.forget()

    def _build(self, comm) -> None:
        chosen = self.compression.preset
        self.comm = comm
        size, intra_dtype = self._topology
        if size != 1:
            size = check_topology(comm, size, "DistributedOptimizer")
        self.exchange = Exchange([p.numel() for p in self._params], chosen.make_compressor(),
                                 make_feedback(chosen.worker), make_feedback(chosen.server), comm,
                                 chosen.two_way, self._bucket_cap_mb, self._group_ids, ranks_per_node=size,
                                 intra_node_dtype=intra_dtype)
        self._state = CompressionState(self._optimizer, STATE_KEY, {"": self.exchange}, comm,
                                       self._params[0].device, "DistributedOptimizer", rank_bound=True)
        self._bucket_of = {self._params[i]: b for b, idx in enumerate(self.exchange.buckets) for i in idx}

    @property
    def state(self) -> dict:
        return self._optimizer.state[STATE_KEY]

    @property
    def busy(self) -> bool:
        return bool(self._futures)

    def describe(self) -> str:
        return self.compression.describe()

    # ------------------------------------------------------------------ one step's buckets
    def grad_ready(self, p: torch.Tensor) -> None:
        self._missing[self._bucket_of[p]] -= 1
        while self._next_bucket < len(self._missing) and self._missing[self._next_bucket] == 0:
            self._launch(self._next_bucket)

    def _launch(self, b: int) -> None:
        grads = [self._wire.dense(self._params[i]) for i in self.exchange.buckets[b]]
        ready = self._side.ready(grads[0].device)
        self._futures[b] = self._executor.submit(self._exchange_bucket, b, grads, self._state.bucket("", b),
                                                 self.state["step"], ready)
        self._next_bucket = b + 1

    def _exchange_bucket(self, b: int, grads: List[torch.Tensor], state: Dict[str, torch.Tensor],
                         step: int, ready: Optional[torch.cuda.Event]) -> List[torch.Tensor]:
        """(communication thread) Bucket ``b``'s average. Before the first bucket of a step the
        ranks count who is here (an allreduce, which Horovod's join supports: a rank inside
        ``hvd.join()`` adds 0). With everyone here the bucket goes through the compressed
        exchange; while some rank is joined, through ``_joined_average``. On CUDA either runs on
        the side stream, after ``ready`` (the event ``_launch`` recorded on backward's stream)."""
        if b == 0:
            here = wait(hvd.allreduce_async(torch.ones(1), name=f"{self._prefix}.here", op=hvd.Sum,
                                            process_set=self._process_set))
            self._everyone_here = int(here.item()) == self.comm.world_size
        with self._side.running(grads, after=ready):
            if self._everyone_here:
                return self.exchange.allreduce(grads, [state], buckets=[b], step=step, stats=self._stats)
            return self._joined_average(b, grads)

    def _joined_average(self, b: int, grads: List[torch.Tensor]) -> List[torch.Tensor]:
        """Horovod's join semantics for a step that some rank spends inside ``hvd.join()``: an
        fp32 allreduce, the joined ranks contributing zeros, averaged over all ranks. The joined
        ranks cannot run the compressed exchange (it needs every rank's alltoall and its server
        chunk), so the compression state is left as it is on every rank."""
        start = time.perf_counter()
        handles = [hvd.allreduce_async(g.float(), name=f"{self._prefix}.joined.{self._names[i]}", op=hvd.Average,
                                       process_set=self._process_set) for i, g in zip(self.exchange.buckets[b], grads)]
        averaged = [wait(h) for h in handles]
        fp32 = 4 * sum(g.numel() for g in grads)
        self._stats.record(fp32, fp32, fp32, 0.0, time.perf_counter() - start)
        return averaged

    def finish(self) -> None:
        """Start the buckets no hook started, wait for all of them, write the averages."""
        while self._next_bucket < len(self._missing):
            self._launch(self._next_bucket)
        outcomes, error = {}, None
        for b, future in self._futures.items():
            try:
                outcomes[b] = future.result()
            except BaseException as e:  # wait for every bucket before raising: none may run on
                error = error or e
        if error is not None:
            raise error
        factor = float(self.comm.world_size) if self._sum else 1.0
        self._side.join(self._params[0].device)
        for b, averaged in sorted(outcomes.items()):
            for i, g in zip(self.exchange.buckets[b], averaged):
                self._params[i].grad.copy_(g if factor == 1.0 else g * factor)
        self._wire.resparsify()
        self._stats.end_step()
        if self._everyone_here:
            self.state["step"] += 1

    def forget(self) -> None:
        self._futures: Dict[int, object] = {}
        self._missing = [len(idx) for idx in self.exchange.buckets]
        self._next_bucket = 0
        self._wire.forget()

    def drain(self) -> None:
        """Let any bucket already on the communication thread finish; cancel the others."""
        for future in self._futures.values():
            if not future.cancel():
                future.exception()

    def rejoin(self, comm) -> None:
        """A fresh exchange on ``comm``; a fresh compression state if this rank's place changed."""
        before = (self.comm.rank, self.comm.world_size)
        step = self.state["step"]
        self._build(comm)
        if (comm.rank, comm.world_size) != before:
            self._state.reset(step)
        self.forget()

    # ------------------------------------------------------------------ compression state
    def saved(self, state_dict, reset: bool):
        return self._state.saved(state_dict, reset)

    def restore(self, saved, reset: bool) -> None:
        self._state.restore(saved, reset)

    def reset_state(self) -> None:
        self._state.reset(step=self.state["step"])

    def _foreign(self, saved: dict) -> Optional[str]:
        """Why ``saved`` is not this rank's compression state for these settings (None if it is)."""
        return mismatch(saved, self.comm, self._state.signature())

    def agree(self, root: int) -> None:
        """Keep each rank's own state if all hold theirs for one step; otherwise zero everywhere
        (``root``: the root's rank in the communicator)."""
        mine = (self._foreign(self.state), int(self.state["step"]))
        everyone = gather_objects(self.comm, mine)
        steps = {step for _, step in everyone}
        problems = [f"rank {r}: {why}" for r, (why, _) in enumerate(everyone) if why]
        if not problems and len(steps) == 1:
            return
        root_step = everyone[root][1]
        if self.comm.rank == root:
            reason = "; ".join(problems) if problems else f"ranks hold compression state of steps {sorted(steps)}"
            warnings.warn(f"taciturn: compression state restarted from zero on every rank at step {root_step} "
                          f"({reason}). Per-rank errors and Markov sequences cannot be broadcast; to keep them, "
                          "every rank saves and loads its own optimizer.state_dict().")
        self._state.reset(root_step)
