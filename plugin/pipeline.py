"""Bucketing over the compressed allreduce: tensors in, averaged tensors out.

A ``Pipeline`` is built once from the sizes of the tensors it will carry (the parameters, in
order). It groups them into flat fp32 buckets of at most ``bucket_cap_mb`` (a tensor larger
than the cap gets a bucket of its own), so small tensors do not each pay a collective's
latency, and keeps one ``BucketLayout`` per bucket. It owns no state: ``init_state`` makes the
per-bucket feedback tensors for the caller to keep (an optimizer puts them in its state).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from .comm import Communicator
from .comm.allreduce import Workspace, compressed_allreduce
from .compressors import Compressor
from .feedback import Feedback, State
from .layout import BucketLayout
from .metrics import CommStats


def bucket_ranges(sizes: Sequence[int], cap_elems: int, groups: Optional[Sequence[int]] = None) -> List[range]:
    """Consecutive tensor index ranges whose total size stays within ``cap_elems`` and that
    never span two ``groups`` (param groups may scale their feedback differently)."""
    groups = groups if groups is not None else [0] * len(sizes)
    out, start, acc = [], 0, 0
    for i, n in enumerate(sizes):
        if acc and (acc + n > cap_elems or groups[i] != groups[start]):
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
        out: List[torch.Tensor] = []
        for b, (idx, st) in enumerate(zip(self.buckets, states)):
            out.extend(self.allreduce_bucket(b, [tensors[i] for i in idx], st, s=s, seed=seed, stats=stats))
        if stats is not None:
            stats.end_step()
        return out

    def allreduce_bucket(self, b: int, tensors: Sequence[torch.Tensor], state: State, *,
                         s: Union[float, Sequence[float]] = 1.0, seed: int = 0,
                         stats: Optional[CommStats] = None) -> List[torch.Tensor]:
        """``allreduce`` of bucket ``b`` alone (``tensors``: that bucket's, in order), for callers
        that start each bucket when its gradients are ready. Buckets must be issued in the same
        order on every rank; the caller closes the step with ``stats.end_step()``."""
        idx, lay = self.buckets[b], self.layouts[b]
        if len(tensors) != len(idx):
            raise ValueError(f"bucket {b} holds {len(idx)} tensors, got {len(tensors)}")
        parts = [t.reshape(-1) for t in tensors]
        work = self.workspaces[b]
        flat = torch.cat(parts, out=work.scratch("flat", lay.numel, parts[0].device)) if len(parts) > 1 \
            else parts[0].float()
        scale = s if isinstance(s, (int, float)) else s[self.groups[idx[0]]]
        res = compressed_allreduce(flat, lay, self.compressor, self.worker, self.server, state, self.comm,
                                   two_way=self.two_way, s=scale, seed=seed * len(self.buckets) + b, stats=stats,
                                   work=work)
        return self._views(idx, res, [t.shape for t in tensors])
