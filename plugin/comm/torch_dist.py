"""Communicator over a torch.distributed process group (gloo, nccl, or a sub-group)."""
from __future__ import annotations

import atexit
import contextlib
import datetime
import time
import weakref

import torch
import torch.distributed as dist

from .base import CollectiveError, Communicator, Handle

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
# Gloo sends one large message in a single direction at a time: above this many bytes per rank
# a collective is split into column pieces issued together, so both directions stay busy
# (measured at 1 Gbit: a 100 MB all_to_all takes 0.84-1.0 s whole, 0.53 s in pieces).
GLOO_PIECE_BYTES = 4 << 20
#: The tensors handed to completed collectives until the backend lets go of them. A gloo worker
#: thread drops its work (and with it these tensors' Python objects, under the GIL) only after
#: ``wait()`` has returned; if the interpreter is finalizing by then, that thread exits inside a
#: noexcept destructor and the process aborts ("terminate called without an active exception")
#: after a job that ran to its end. ``_drain`` holds the exit until every one is freed.
_RELEASING = weakref.WeakSet()
#: at most this long: only a work that a live Python object still holds (an exception's
#: traceback) keeps its tensors past the backend's release
EXIT_DRAIN_S = 5.0


@atexit.register
def _drain() -> None:
    deadline = time.monotonic() + EXIT_DRAIN_S
    while _RELEASING and time.monotonic() < deadline:
        time.sleep(1e-3)  # lets the worker threads take the GIL


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

    def split(self, parts):
        """A new group over this rank's part (only its members synchronise, so other parts, or
        other groups of a larger job, may build theirs at their own pace)."""
        mine = self._part(parts)
        ranks = dist.get_process_group_ranks(self.group) if self.group is not None else list(range(self.world_size))
        kwargs = {"timeout": datetime.timedelta(seconds=self.timeout)} if self.timeout is not None else {}
        sub = TorchDistCommunicator(dist.new_group(ranks=[ranks[r] for r in mine], use_local_synchronization=True,
                                                   **kwargs))
        sub.timeout = self.timeout
        return sub

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

    def _pieces(self, row_bytes: int):
        """Column ranges of a (world_size, row_bytes) uint8 exchange, one per collective call."""
        if self.backend != "gloo" or row_bytes * self.world_size <= GLOO_PIECE_BYTES:
            return [(0, row_bytes)]
        step = max(8, GLOO_PIECE_BYTES // self.world_size // 8 * 8)
        return [(a, min(a + step, row_bytes)) for a in range(0, row_bytes, step)]

    def _start(self, what: str, calls, assemble) -> Handle:
        """Issue ``calls`` ((collective, output, input), each async) now; ``wait()`` waits for
        them, then ``assemble()``. Pass views made for the call: ``_drain`` waits for them at exit."""
        with self._guard(what):
            works = [fn(out, inp, group=self.group, async_op=True) for fn, out, inp in calls]

        def finish():
            with self._guard(what):
                for w in works:
                    w.wait()
            _RELEASING.update(t for _, out, inp in calls for t in (out, inp))
            return assemble()
        return Handle(finish)

    def all_to_all_async(self, chunks):
        send = torch.stack(chunks) if len(chunks) > 1 else chunks[0].unsqueeze(0)
        recv = torch.empty_like(send)
        pieces = self._pieces(send.shape[1]) if send.dtype == torch.uint8 else [(0, send.shape[1])]
        if len(pieces) == 1:
            return self._start("all_to_all", [(dist.all_to_all_single, recv.view(-1), send.view(-1))], lambda: recv)
        parts = [(send[:, a:b].contiguous(), torch.empty(self.world_size, b - a, dtype=send.dtype), a, b)
                 for a, b in pieces]

        def assemble():
            for _, r, a, b in parts:
                recv[:, a:b] = r
            return recv
        return self._start("all_to_all", [(dist.all_to_all_single, r.view(-1), s.view(-1)) for s, r, _, _ in parts],
                           assemble)

    def all_gather_async(self, t):
        # torch >= 2.13 renamed all_gather_into_tensor (which now warns) to all_gather_single.
        _all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        t = t.contiguous()
        out = t.new_empty((self.world_size,) + tuple(t.shape))
        flat_in, flat_out = t.view(-1), out.view(self.world_size, -1)
        pieces = self._pieces(flat_in.numel()) if t.dtype == torch.uint8 else [(0, flat_in.numel())]
        if len(pieces) == 1:
            return self._start("all_gather", [(_all_gather, out.view(-1), flat_in.view(-1))], lambda: out)
        parts = [(torch.empty(self.world_size, b - a, dtype=t.dtype), a, b) for a, b in pieces]

        def assemble():
            for r, a, b in parts:
                flat_out[:, a:b] = r
            return out
        return self._start("all_gather", [(_all_gather, r.view(-1), flat_in[a:b]) for r, a, b in parts], assemble)

    def _sync(self, what: str, fn, t, **kwargs):
        """``fn`` on a view of ``t`` made for the call (``_drain`` waits for it at exit)."""
        view = t.view_as(t)
        with self._guard(what):
            fn(view, group=self.group, **kwargs)
        _RELEASING.add(view)
        return t

    def broadcast(self, t, src=0):
        return self._sync("broadcast", dist.broadcast, t,
                          src=dist.get_global_rank(self.group, src) if self.group is not None else src)

    def all_reduce(self, t, op="sum"):
        return self._sync("all_reduce", dist.all_reduce, t, op=_OPS[op])

    def __getstate__(self):
        raise TypeError("a communicator holds a live process group and cannot be pickled")
