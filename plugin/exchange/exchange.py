"""The exchange: tensors in, tensors averaged over the ranks through compression out.

An ``Exchange`` is built once from the sizes of the tensors it will carry (the parameters, in
order). It groups them into flat fp32 buckets of about ``bucket_cap_mb`` (``bucket_ranges``),
so small tensors do not each pay a collective's latency, and keeps one ``BucketLayout`` per
bucket. It owns no state: ``init_state`` makes the per-bucket feedback tensors for the caller
to keep (an optimizer puts them in its state). ``allreduce`` is the one entry of every caller:
the optimizers (all buckets at once), the Horovod wrapper (bucket by bucket, as gradients
become ready) and the DDP hook (an exchange of one bucket per DDP bucket).
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from ..comm import Communicator
from ..compressors import Compressor, make_compressor
from ..feedback import Feedback, State
from ..layout import BucketLayout
from ..metrics import CommStats
from ..segments import Segments
from ..topology import node_parts
from .bucket import BucketExchange, Workspace
from .direction import Sharded, direction, init_state
from .two_level import TwoLevelBucket, shard_pieces

#: ``downlink`` values of a sharded exchange: the model change compressed by the exchange's own
#: codec with error feedback on it, or cast to bf16 / sent in fp32 (exact ZeRO-1 semantics)
DOWNLINKS = ("1bit", "bf16", "fp32")


def _cast(precision: str) -> Compressor:
    """The cast codec of a full-precision leg: ``"fp32"`` or ``"bf16"``."""
    return make_compressor("identity" if precision == "fp32" else precision)


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


def bucket_seed(step: int, bucket: int, buckets: int) -> int:
    """The one seed rule of random compressors: bucket ``bucket`` of ``buckets`` at ``step``
    (the same on every rank, different for every bucket of every step)."""
    return step * buckets + bucket


class Exchange:
    """``bucket_cap_mb``: fp32 megabytes per bucket, or None for one bucket of everything.
    ``groups``: a group id per tensor; a bucket never spans two. ``workspace``: None gives every
    bucket its own results (the buckets of one call are alive together); a caller that copies
    each result out before the next bucket runs may share one workspace between exchanges.

    ``downlink`` (one of ``DOWNLINKS``; two-way only) makes the exchange sharded: rank j keeps
    the update rule's state ``owner_keys`` for its chunk, ``allreduce`` takes the update rule as
    ``owner_update`` and returns the model change instead of the average. The server rule then
    only accumulates (Markov's H); the model change gets error feedback unless the server
    rule is ``none`` or the downlink is a cast.

    ``ranks_per_node=L`` > 1 (checked by ``taciturn.topology.check_topology``) makes it two-level:
    each bucket is reduce-scattered inside the node in ``intra_node_dtype`` (fp32 or bf16), this
    rank's shard goes through the pipeline among the ranks of its local rank, and the results
    are all-gathered inside the node. ``layouts`` are then this rank's shards'; ``node_layouts``
    the buckets' over the node. With ``downlink`` too, the owners serve chunks of the shards (a
    rank keeps the rule's state for 1/n of each bucket) and the nodes all-gather the model change."""

    def __init__(self, sizes: Sequence[int], compressor: Compressor, worker: Feedback, server: Feedback,
                 comm: Communicator, two_way: bool = True, bucket_cap_mb: Optional[float] = 25.0,
                 groups: Optional[Sequence[int]] = None, workspace: Optional[Workspace] = None,
                 downlink: Optional[str] = None, owner_keys: Sequence[str] = (), ranks_per_node: int = 1,
                 intra_node_dtype: str = "fp32"):
        if bucket_cap_mb is not None and not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb={bucket_cap_mb!r} must be > 0 (megabytes of fp32 per bucket, "
                             "default 25)")
        self.sizes = [int(s) for s in sizes]
        self.compressor = compressor.bind(sum(self.sizes))
        self.worker, self.server = worker, server
        self.comm = comm
        self.two_way = two_way
        self.downlink = downlink
        if downlink is None:
            self.direction = direction(two_way)
        else:
            if downlink not in DOWNLINKS:
                raise ValueError(f"downlink={downlink!r} must be one of {DOWNLINKS}")
            if not two_way:
                raise ValueError("a sharded exchange needs the two-way pipeline (the chunk owners run the update rule)")
            if self.compressor.profile is not None:
                raise ValueError(f"{self.compressor!r}: a magnitude profile needs every rank to see the averaged "
                                 "gradient, which a sharded exchange sends only as the model change: "
                                 "drop profile=... or shard_state")
            codec = self.compressor if downlink == "1bit" else _cast(downlink)
            self.direction = Sharded(codec, downlink == "1bit" and server.name != "none", owner_keys)
        self.bucket_cap_mb = bucket_cap_mb
        cap = max(1, sum(self.sizes)) if bucket_cap_mb is None else max(1, int(bucket_cap_mb * 2 ** 20) // 4)
        self.groups = list(groups) if groups is not None else [0] * len(self.sizes)
        self.buckets = bucket_ranges(self.sizes, cap, self.groups)
        self.ranks_per_node = ranks_per_node
        if ranks_per_node > 1:
            if intra_node_dtype not in ("fp32", "bf16"):
                raise ValueError(f"intra_node_dtype={intra_node_dtype!r} must be 'fp32' or 'bf16'")
            nodes, locals_ = node_parts(comm.world_size, ranks_per_node)
            self.intra, self.inter = comm.sub(nodes), comm.sub(locals_)
            self.intra_cast = _cast(intra_node_dtype)
            self.node_layouts = [BucketLayout(tuple(self.sizes[i] for i in b), ranks_per_node, compressor)
                                 for b in self.buckets]
            self.shards = [shard_pieces(lay, self.intra_cast) for lay in self.node_layouts]
            self.layouts = [BucketLayout(self._shard_sizes(b, lay), self.inter.world_size, compressor)
                            for b, lay in zip(self.buckets, self.node_layouts)]
        else:
            self.intra, self.inter = None, comm
            self.layouts = [BucketLayout(tuple(self.sizes[i] for i in b), comm.world_size, compressor)
                            for b in self.buckets]
        self.intra_node_dtype = intra_node_dtype
        if workspace is None:
            scratch = Workspace()
            self.workspaces = [scratch.sibling() for _ in self.buckets]
        else:
            self.workspaces = [workspace] * len(self.buckets)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def _shard_sizes(self, bucket: range, node: BucketLayout) -> Tuple[int, ...]:
        """The lengths of the bucket's tensors' parts inside this rank's shard (its segments)."""
        lo, hi = node.cuts[self.intra.rank], node.cuts[self.intra.rank + 1]
        out, start = [], 0
        for i in bucket:
            a, b = max(lo, start), min(hi, start + self.sizes[i])
            if a < b:
                out.append(b - a)
            start += self.sizes[i]
        return tuple(out) or (0,)

    def init_state(self, device=None) -> List[State]:
        """Zero feedback state of every bucket, for this rank."""
        return [init_state(self.worker, self.server, lay, self.direction, self.inter.rank, device)
                for lay in self.layouts]

    def signature(self) -> tuple:
        """What a saved compression state must match: compressor, rules, direction, buckets."""
        sig = (repr(self.compressor), self.worker.name, self.server.name, self.two_way,
               [lay.numel for lay in self.layouts])
        if self.ranks_per_node > 1:
            sig += (f"ranks_per_node={self.ranks_per_node} intra={self.intra_node_dtype}",)
        return sig if self.downlink is None else sig + (f"sharded downlink={self.downlink}",)

    def wire_bytes(self) -> dict:
        """Exact bytes per step handed to the collectives by one rank, per direction (two-level:
        across nodes, and ``intra`` inside the node)."""
        up, down = self.direction.wire_bytes(self.layouts, self.inter.world_size)
        out = {"up": up, "down": down, "fp32": 4 * sum(lay.numel for lay in self.layouts)}
        if self.ranks_per_node > 1:  # each rank's L shards out, the L results in
            out["intra"] = sum(2 * self.ranks_per_node * nbytes for _, nbytes in self.shards)
        return out

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

    def allreduce(self, tensors: Sequence[torch.Tensor], states: Sequence[State], *, step: int = 0,
                  buckets: Optional[Sequence[int]] = None, error_scale: Union[float, Sequence[float]] = 1.0,
                  stats: Optional[CommStats] = None, seed_slot: Optional[Tuple[int, int]] = None,
                  owner_update: Optional[Callable] = None) -> List[torch.Tensor]:
        """Average ``tensors`` over the ranks; returns fp32 tensors of their shapes.

        ``tensors``: the tensors of ``buckets`` (default: all, in order), or one flat tensor per
        bucket. ``states``: those buckets' feedback states. ``step``: the caller's step count
        (the same on every rank), which with the bucket seeds random compressors
        (``bucket_seed``); ``seed_slot`` = (index, count) places a one-bucket exchange inside
        the caller's own bucketing. ``error_scale``: one float, or one per group id (EF's s).
        A call over all buckets closes the step in ``stats``; a caller issuing buckets one by
        one closes it with ``stats.end_step()``. Every rank issues buckets in the same order.
        The results may alias feedback state or scratch: read-only, used before the next call.

        A sharded exchange needs ``owner_update(bucket, chunk, g, state)``: the update rule on
        this rank's ``chunk`` (a slice of bucket ``bucket``) with the aggregate ``g``, its state in
        ``state`` (the bucket's); it returns the model change x_old - x_new there (chunk-length
        fp32). The results are then every rank's model change, the same bytes everywhere.
        """
        if (owner_update is None) != (self.downlink is None):
            raise ValueError("owner_update is required by a sharded exchange (downlink=...) and only by one")
        chosen = range(len(self.buckets)) if buckets is None else list(buckets)
        if len(states) != len(chosen):
            raise ValueError(f"{len(chosen)} buckets need {len(chosen)} states, got {len(states)}")
        inputs, shapes = self._inputs(tensors, chosen)
        exchanges = []
        for b, x, state in zip(chosen, inputs, states):
            scale = error_scale if isinstance(error_scale, (int, float)) else error_scale[self.groups[self.buckets[b][0]]]
            index, count = seed_slot if seed_slot is not None else (b, len(self.buckets))
            bucket = functools.partial(BucketExchange, layout=self.layouts[b], compressor=self.compressor,
                                       worker=self.worker, server=self.server, direction=self.direction, state=state,
                                       comm=self.inter, error_scale=scale, seed=bucket_seed(step, index, count),
                                       stats=stats, work=self.workspaces[b],
                                       owner=None if owner_update is None else self._owner(owner_update, b))
            exchanges.append(bucket(x) if self.intra is None else
                             TwoLevelBucket(x, self.node_layouts[b], *self.shards[b], self.intra, self.intra_cast,
                                            bucket, self.workspaces[b]))
        # Stage by stage over the buckets: every bucket is compressed and its all_to_all started
        # before the first server phase, and every server phase has started its all_gather
        # before the first result is decoded, so each collective travels while this rank works
        # on the other buckets. Every rank issues the collectives in this same order.
        for ex in exchanges:
            ex.start()
        for ex in exchanges:
            ex.serve()
        results = [ex.finish() for ex in exchanges]
        if stats is not None and buckets is None:
            stats.end_step()
        if shapes is None:
            return results
        out: List[torch.Tensor] = []
        for b, res, bucket_shapes in zip(chosen, results, shapes):
            out.extend(self._views(self.buckets[b], res, bucket_shapes))
        return out

    def _owner(self, owner_update: Callable, b: int) -> Callable:
        """Bucket ``b``'s update rule on a chunk given in the coordinates of the exchange's layout
        (two-level: of this rank's shard, moved here into the bucket's)."""
        if self.intra is None:
            return functools.partial(owner_update, b)
        at = self.node_layouts[b].chunk(self.intra.rank).start
        return lambda chunk, g, st: owner_update(b, slice(at + chunk.start, at + chunk.stop), g, st)

    def _inputs(self, tensors: Sequence[torch.Tensor], chosen):
        """Each chosen bucket's input (its tensors in place, or the flat tensor given) and the
        shapes of its results (None: flat)."""
        count = sum(len(self.buckets[b]) for b in chosen)
        if len(tensors) == count:
            inputs, shapes, at = [], [], 0
            for b in chosen:
                mine = tensors[at:at + len(self.buckets[b])]
                at += len(mine)
                inputs.append(Segments([t.reshape(-1) for t in mine]))
                shapes.append([t.shape for t in mine])
            return inputs, shapes
        numel = self.layouts if self.intra is None else self.node_layouts
        if len(tensors) == len(chosen) and all(t.numel() == numel[b].numel for b, t in zip(chosen, tensors)):
            return list(tensors), None
        raise ValueError(f"the exchange's buckets {list(chosen)} hold {count} tensors: pass those tensors, or one flat "
                         f"tensor per bucket; got {len(tensors)} tensors")
