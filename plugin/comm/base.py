"""The communicator interface: the few collectives the compressed pipeline needs.

Implementations take and return tensors; they keep no compression state. ``all_to_all``
and ``all_gather`` move equal-sized uint8 payloads, ``broadcast`` and ``all_reduce`` serve
the rare full-precision syncs (initial parameters, SAEF's error averaging, checks). The
``*_async`` forms start a collective and return a ``Handle`` so that the exchange can
work on other buckets while the bytes travel; a backend without them runs the
collective at once.
"""
from __future__ import annotations

import importlib
from typing import Callable, List

import torch


class Handle:
    """A collective in flight: ``wait()`` blocks until it is done and returns its result."""

    def __init__(self, finish: Callable[[], torch.Tensor]):
        self._finish = finish

    @classmethod
    def ready(cls, result: torch.Tensor) -> "Handle":
        return cls(lambda: result)

    def wait(self) -> torch.Tensor:
        return self._finish()


class CollectiveError(RuntimeError):
    """A collective failed: a peer died, stalled past the timeout, or ran a different collective."""


class Communicator:
    rank: int = 0
    world_size: int = 1
    name: str = "base"
    #: where host-side metadata tensors must live for this backend's collectives
    device = torch.device("cpu")

    # A backend implements all_to_all and all_gather, or their async forms (each pair
    # defaults to the other).
    def all_to_all(self, chunks: List[torch.Tensor]) -> torch.Tensor:
        """Send ``chunks[j]`` to rank j; return ``(world_size, size)``: row i came from rank i."""
        return self.all_to_all_async(chunks).wait()

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Return ``(world_size, *t.shape)``: row i is rank i's ``t``."""
        return self.all_gather_async(t).wait()

    def all_to_all_async(self, chunks: List[torch.Tensor]) -> Handle:
        """``all_to_all`` started; every rank must start collectives in the same order."""
        return Handle.ready(self.all_to_all(chunks))

    def all_gather_async(self, t: torch.Tensor) -> Handle:
        """``all_gather`` started; every rank must start collectives in the same order."""
        return Handle.ready(self.all_gather(t))

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``t`` in place with rank ``src``'s and return it."""
        raise NotImplementedError

    def split(self, parts: List[List[int]]) -> "Communicator":
        """The communicator of the part of ``parts`` (a partition of this communicator's ranks,
        the same on every rank) that holds this rank; its ranks are numbered in part order.
        Every rank calls it with the same partitions in the same order."""
        raise NotImplementedError(f"the {self.name} communicator cannot make sub-groups")

    def sub(self, parts: List[List[int]]) -> "Communicator":
        """``split``, made once per partition: a later call with the same ``parts`` returns the
        same communicator (exchanges built one after another share their sub-groups)."""
        key = tuple(map(tuple, parts))
        made = self.__dict__.setdefault("_subs", {})
        if key not in made:
            made[key] = self.split(parts)
        return made[key]

    def _part(self, parts: List[List[int]]) -> List[int]:
        return next(p for p in parts if self.rank in p)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place reduction of ``t`` over ranks; ``op`` is ``sum``, ``max`` or ``min``."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


class LocalCommunicator(Communicator):
    """World size 1: every collective is the identity. Needs no process group."""

    name = "local"

    def all_to_all(self, chunks):
        return chunks[0].unsqueeze(0)

    def all_gather(self, t):
        return t.unsqueeze(0)

    def broadcast(self, t, src=0):
        return t

    def all_reduce(self, t, op="sum"):
        return t

    def split(self, parts):
        return self


def gather_objects(comm: Communicator, obj) -> list:
    """Every rank's picklable ``obj`` (small metadata only), through ``comm.all_gather``."""
    import pickle

    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=comm.device)
    sizes = comm.all_gather(size).view(-1).tolist()
    buf = torch.zeros(max(sizes), dtype=torch.uint8, device=comm.device)
    buf[:data.numel()] = data.to(comm.device)
    rows = comm.all_gather(buf).cpu()
    return [pickle.loads(rows[i, :sizes[i]].numpy().tobytes()) for i in range(comm.world_size)]


def backend_module(module: str, needs: str):
    """Import the library a communicator runs on, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(needs) from e


def reduce_in_place(t: torch.Tensor, op: str, reduce: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """``t`` reduced in place by ``reduce`` (which takes a contiguous fp32/fp64/int tensor):
    2-byte floats are reduced in fp32 (libraries without bf16 reductions), a non-contiguous
    ``t`` through a contiguous copy."""
    if op not in ("sum", "max", "min"):
        raise ValueError(f"all_reduce op={op!r}: valid ops are 'sum', 'max', 'min'")
    if t.dtype in (torch.bfloat16, torch.float16):
        wide = t.float()
        reduce(wide)
        return t.copy_(wide)
    buf = t if t.is_contiguous() else t.contiguous()
    reduce(buf)
    if buf is not t:
        t.copy_(buf)
    return t
