"""The two-level exchange of one bucket (ALGORITHMS.md, "Two-level exchange").

Nodes of L ranks: (1) inside each node the bucket is reduce-scattered in fp32 or bf16 (an
all_to_all of the L shards, each rank averaging its own shard in rank order, so the node mean
is the same bytes wherever it is used); shards are cut like two-way chunks, on unit
boundaries; (2) local rank l runs the one-level pipeline (``BucketExchange``) on shard l
among the N ranks that share its local rank: the node is the worker; (3) inside each node
the L results are all-gathered. Only step (2) is compressed.
"""
from __future__ import annotations

import time
from typing import Callable, List, Tuple, Union

import torch

from ..comm import Communicator
from ..compressors import Cast
from ..layout import BucketLayout
from ..segments import Segments
from ..wire import Pieces
from .bucket import BucketExchange, Workspace
from .direction import _fit


def shard_pieces(node: BucketLayout, cast: Cast) -> Tuple[List[Pieces], int]:
    """Each shard of a bucket as one piece of ``cast``, and the padded payload size of them all."""
    pieces = [Pieces.from_lengths([node.chunk_numel(k)]) for k in range(node.world_size)]
    return pieces, max(cast.nbytes(p) for p in pieces)


class TwoLevelBucket:
    """``node``: the bucket's layout over the L ranks of a node (its chunks are the shards);
    ``pieces``: each shard as one piece of ``cast``, whose payloads are padded to ``nbytes``
    (``shard_pieces``); ``inner``: builds the inter-node ``BucketExchange`` of this rank's shard
    from its node mean."""

    def __init__(self, x: Union[torch.Tensor, Segments], node: BucketLayout, pieces: List[Pieces], nbytes: int,
                 intra: Communicator, cast: Cast, inner: Callable[[torch.Tensor], BucketExchange], work: Workspace):
        self.x, self.node, self.pieces, self.nbytes = x, node, pieces, nbytes
        self.intra, self.cast, self.make_inner, self.work = intra, cast, inner, work
        self.ex: BucketExchange = None

    def _flat(self) -> torch.Tensor:
        x = self.x
        if isinstance(x, Segments):
            return x.flat(self.work.scratch("flat", self.node.numel, x.device)) if len(x.parts) > 1 else x.parts[0].float()
        return x.reshape(-1).float()

    def _encode(self, v: torch.Tensor, k: int) -> torch.Tensor:
        return _fit(self.cast.encode(v, self.pieces[k]), self.nbytes)

    def start(self) -> None:
        flat, me, t = self._flat(), self.intra.rank, time.perf_counter()
        chunks = [self._encode(flat[self.node.chunk(k)], k) for k in range(self.intra.world_size)]
        received = self.intra.all_to_all(chunks)
        mean = self.cast.decode_mean(received, self.pieces[me], 0,
                                     self.work.keep("node_mean", self.node.chunk_numel(me), flat.device))
        self.ex = self.make_inner(mean)
        spent = time.perf_counter() - t  # a collective's time, as the inner exchange counts its own
        self.ex.busy += spent
        self.ex.waiting += spent
        self.ex.start()
        self.sent = sum(c.numel() for c in chunks)

    def serve(self) -> None:
        self.ex.serve()

    def finish(self) -> torch.Tensor:
        shard = self.ex.finish()
        t = time.perf_counter()
        gathered = self.intra.all_gather(self._encode(shard, self.intra.rank))
        result = self.work.keep("full", self.node.numel, shard.device)
        for k in range(self.intra.world_size):
            self.cast.decode(gathered[k], self.pieces[k], out=result[self.node.chunk(k)])
        if self.ex.stats is not None:
            self.ex.stats.record(0, 0, 0, 0.0, time.perf_counter() - t, bytes_intra=self.sent + gathered.numel())
        return result
