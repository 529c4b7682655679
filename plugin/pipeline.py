"""Bucketing over the compressed allreduce: tensors in, averaged tensors out.

A ``Pipeline`` is built once from the sizes of the tensors it will carry (the parameters, in
order). It groups them into flat fp32 buckets of about ``bucket_cap_mb`` (see
``bucket_ranges``), so small tensors do not each pay a collective's latency, and keeps one
``BucketLayout`` per bucket. It owns no state: ``init_state`` makes the
per-bucket feedback tensors for the caller to keep (an optimizer puts them in its state).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from .comm import Communicator
from .comm.allreduce import BucketExchange, Workspace
from .compressors import Compressor
from .feedback import Feedback, State
from .layout import BucketLayout
from .metrics import CommStats
from .segments import Segments


def bucket_ranges(sizes: Sequence[int], cap_elems: int, groups: Optional[Sequence[int]] = None) -> List[range]:
    """Consecutive tensor index ranges that never span two ``groups`` (param groups may scale
    their feedback differently). A range is closed before a tensor that would take it past
    ``cap_elems``, unless it holds less than half of that: then the tensor joins it, so the
    small tensors between two large ones (a bias between two weight matrices) do not make a
    bucket of their own, with a collective's latency and nothing to overlap it with."""
    groups = groups if groups is not None else [0] * len(sizes)
    out, start, acc = [], 0, 0
    for i, n in enumerate(sizes):
        if acc and ((acc + n > cap_elems and 2 * acc >= cap_elems) or groups[i] != groups[start]):
            out.append(range(start, i))
            start, acc = i, 0
        acc += n
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


class Pipeline:
    def __init__(self, sizes: Sequence[int], compressor: Compressor, worker: Feedback, server: Feedback,
                 comm: Communicator, two_way: bool = True, bucket_cap_mb: float = 25.0,
                 groups: Optional[Sequence[int]] = None):
        if not bucket_cap_mb or bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb={bucket_cap_mb!r} must be > 0 (megabytes of fp32 per bucket, "
                             "default 25)")
        self.sizes = [int(s) for s in sizes]
        self.compressor = compressor.bind(sum(self.sizes))
        self.worker, self.server = worker, server
        self.comm = comm
        self.two_way = two_way
        self.bucket_cap_mb = bucket_cap_mb
        cap = max(1, int(bucket_cap_mb * 2 ** 20) // 4)
        self.groups = list(groups) if groups is not None else [0] * len(self.sizes)
        self.buckets = bucket_ranges(self.sizes, cap, self.groups)
        self.layouts = [BucketLayout(tuple(self.sizes[i] for i in b), comm.world_size, compressor)
                        for b in self.buckets]
        scratch = Workspace()
        self.workspaces = [scratch.sibling() for _ in self.buckets]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def init_state(self, device=None) -> List[State]:
        return [self.worker_state(lay, device) for lay in self.layouts]

    def worker_state(self, lay: BucketLayout, device) -> State:
        chunk = lay.chunk_numel(self.comm.rank)
        state = self.worker.init_state(lay.numel, chunk, self.two_way, device)
        for k, v in self.server.init_state(lay.numel, chunk, self.two_way, device).items():
            if k not in self.worker.worker_keys:
                state[k] = v
        return state

    def wire_bytes(self) -> dict:
        """Exact bytes per step handed to the collectives by one rank, per direction."""
        n = self.comm.world_size
        if self.two_way:
            up = sum(n * lay.chunk_nbytes for lay in self.layouts)
            down = up
        else:
            up = sum(lay.full_nbytes for lay in self.layouts)
            down = n * up
        return {"up": up, "down": down, "fp32": 4 * self.numel}

    def _views(self, idx: range, flat: torch.Tensor, shapes) -> List[torch.Tensor]:
        out, offset = [], 0
        for i, shape in zip(idx, shapes):
            out.append(flat[offset:offset + self.sizes[i]].view(shape))
            offset += self.sizes[i]
        return out

    def split(self, flats: Sequence[torch.Tensor], shapes: Sequence[torch.Size]) -> List[torch.Tensor]:
        """Per-tensor views into per-bucket flat tensors (e.g. a feedback state)."""
        out: List[torch.Tensor] = []
        for idx, flat in zip(self.buckets, flats):
            out.extend(self._views(idx, flat, [shapes[i] for i in idx]))
        return out

    def allreduce(self, tensors: Sequence[torch.Tensor], states: Sequence[State], *,
                  s: Union[float, Sequence[float]] = 1.0, seed: int = 0,
                  stats: Optional[CommStats] = None) -> List[torch.Tensor]:
        """Average ``tensors`` (shapes as given at construction) over the ranks. Returns fp32
        tensors of the same shapes; they may alias feedback state or the pipeline's scratch, so
        treat them as read-only and use them before the next call.
        ``s`` (EF error scale) is one float, or one per group id."""
        if len(tensors) != len(self.sizes):
            raise ValueError(f"pipeline built for {len(self.sizes)} tensors, got {len(tensors)}")
        # Stage by stage over all buckets: every bucket is compressed and its all_to_all started
        # before the first server phase, and every server phase has started its all_gather
        # before the first result is decoded, so each collective travels while this rank works
        # on the other buckets. Every rank issues the collectives in this same order.
        exchanges = [self._exchange(b, [tensors[i] for i in idx], st, s, seed, stats)
                     for b, (idx, st) in enumerate(zip(self.buckets, states))]
        for ex in exchanges:
            ex.start()
        for ex in exchanges:
            ex.serve()
        results = [ex.finish() for ex in exchanges]
        if stats is not None:
            stats.end_step()
        out: List[torch.Tensor] = []
        for idx, res in zip(self.buckets, results):
            out.extend(self._views(idx, res, [tensors[i].shape for i in idx]))
        return out

    def allreduce_bucket(self, b: int, tensors: Sequence[torch.Tensor], state: State, *,
                         s: Union[float, Sequence[float]] = 1.0, seed: int = 0,
                         stats: Optional[CommStats] = None) -> List[torch.Tensor]:
        """``allreduce`` of bucket ``b`` alone (``tensors``: that bucket's, in order), for callers
        that start each bucket when its gradients are ready. Buckets must be issued in the same
        order on every rank; the caller closes the step with ``stats.end_step()``."""
        ex = self._exchange(b, tensors, state, s, seed, stats)
        ex.start()
        ex.serve()
        return self._views(self.buckets[b], ex.finish(), [t.shape for t in tensors])

    def _exchange(self, b: int, tensors: Sequence[torch.Tensor], state: State, s, seed: int,
                  stats: Optional[CommStats]) -> "_LazyExchange":
        idx = self.buckets[b]
        if len(tensors) != len(idx):
            raise ValueError(f"bucket {b} holds {len(idx)} tensors, got {len(tensors)}")
        return _LazyExchange(self, b, tensors, state, s if isinstance(s, (int, float)) else s[self.groups[idx[0]]],
                             seed * len(self.buckets) + b, stats)


class _LazyExchange(BucketExchange):
    """A bucket's exchange whose input is assembled only when it starts: its tensors in place
    (``Segments``) for a codec that reads them so, else one flat copy into a scratch tensor
    that the buckets of a pipeline share (a started bucket no longer reads it)."""

    def __init__(self, pipe: Pipeline, b: int, tensors: Sequence[torch.Tensor], state: State, s: float,
                 seed: int, stats: Optional[CommStats]):
        super().__init__(None, pipe.layouts[b], pipe.compressor, pipe.worker, pipe.server, state, pipe.comm,
                         two_way=pipe.two_way, s=s, seed=seed, stats=stats, work=pipe.workspaces[b])
        self.tensors = tensors

    def input(self):
        x = Segments([t.reshape(-1) for t in self.tensors])
        self.tensors = None
        if len(x.parts) == 1:
            self.x = x.parts[0].float()
        elif self.codec.reads_segments and all(p.dtype == torch.float32 for p in x.parts):
            self.x = x
        else:
            self.x = x.flat(self.work.scratch("flat", self.layout.numel, x.device))
        return self.x
