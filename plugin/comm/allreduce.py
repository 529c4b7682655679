"""The compressed allreduce of ALGORITHMS.md, on one flat bucket.

Pure: the bucket, its layout, the feedback state and the communicator come in as arguments;
the averaged (compressed) result comes out. Two-way mode:

1. worker: the payload C(y) of y = x + alpha*h is encoded chunk by chunk, h updated (``Fused``)
2. all_to_all: rank j receives chunk j of every worker's payload
3. server (rank j): a = mean_i decode(payload_i[j]); encode its own rule's C(y~), update its state
4. all_gather: every rank receives every server chunk
5. finish: decode all server chunks: the result (Markov: added to G, the result)

One-way mode all_gathers the workers' payloads and every rank averages them.

Full-size temporaries are taken from a ``Workspace`` kept between calls: a fresh CPU tensor
of 100 MB costs about 45 ms of page faults here, several times the pass over it.
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import torch

from ..compressors import Compressor
from ..feedback import Feedback, State
from ..layout import BucketLayout
from ..metrics import CommStats
from ..wire import Pieces
from .base import Communicator


class Workspace:
    """fp32 scratch tensors reused from call to call (not state: never checkpointed).

    ``scratch`` tensors live for one call and come from a pool that sibling workspaces
    (the buckets of one pipeline) share; ``keep`` tensors are this workspace's own, for a
    result that must outlive the calls on other buckets. A result is valid until the next
    call with the same workspace. Contents are undefined on return.
    """

    def __init__(self, pool: Optional[Dict[str, torch.Tensor]] = None):
        self._own: Dict[str, torch.Tensor] = {}
        self._pool: Dict[str, torch.Tensor] = pool if pool is not None else {}

    @staticmethod
    def _take(store: Dict[str, torch.Tensor], name: str, numel: int, device) -> torch.Tensor:
        t = store.get(name)
        if t is None or t.numel() < numel or t.device != torch.device(device):
            t = store[name] = torch.empty(numel, dtype=torch.float32, device=device)
        return t[:numel]

    def scratch(self, name: str, numel: int, device) -> torch.Tensor:
        return self._take(self._pool, name, numel, device)

    def keep(self, name: str, numel: int, device) -> torch.Tensor:
        return self._take(self._own, name, numel, device)

    def sibling(self) -> "Workspace":
        """A workspace with its own ``keep`` tensors and this one's scratch pool."""
        return Workspace(self._pool)


def _fit(payload: torch.Tensor, nbytes: int) -> torch.Tensor:
    if payload.numel() == nbytes:
        return payload
    out = payload.new_zeros(nbytes)
    out[:payload.numel()] = payload
    return out


def _seed(seed: int, side: int, j: int, n: int) -> int:
    return (seed * 2 + side) * (n + 1) + j


def _decode_sum(codec: Compressor, payloads: Sequence[torch.Tensor], pieces: Pieces, seed: int,
                out: torch.Tensor) -> torch.Tensor:
    """out = sum_i decode(payloads[i]), in order."""
    codec.decode(payloads[0], pieces, seed, out=out)
    for p in payloads[1:]:
        codec.decode_add(p, pieces, out, seed)
    return out


def compressed_allreduce(x: torch.Tensor, layout: BucketLayout, codec: Compressor,
                         worker: Feedback, server: Feedback, state: State, comm: Communicator, *,
                         two_way: bool = True, s: float = 1.0, seed: int = 0,
                         stats: Optional[CommStats] = None, work: Optional[Workspace] = None) -> torch.Tensor:
    """Average the flat fp32 ``x`` over ``comm``'s ranks through compression and feedback.

    ``s`` scales the stored errors (EF), ``seed`` drives random compressors (same on every
    rank), ``work`` keeps the scratch tensors between calls (a new one each call if None).
    Returns a tensor that may be a state tensor (Markov) or a workspace tensor: copy it, do
    not modify it, and do not keep it past the next call.
    """
    n = comm.world_size
    work = work if work is not None else Workspace()
    clock = time.perf_counter
    coll = 0.0
    t0 = clock()
    rule = worker.worker_fused(state, s)
    if not two_way:
        wseed = _seed(seed, 0, 0, n)
        payload = codec.encode_fused(x, layout.units, rule, seed=wseed)
        tc = clock()
        gathered = comm.all_gather(payload)
        coll += clock() - tc
        buffer = work.scratch if server.keeps_result else work.keep  # the average may be the result
        a = _decode_sum(codec, gathered, layout.units, wseed, buffer("sum", layout.numel, x.device))
        result = server.accumulate(a.div_(n), state)
        up, down = payload.numel(), gathered.numel()
    else:
        unit_scales = None
        if codec.unit_scales and not codec.chunk_aligned:
            unit_scales = codec.fused_scales(x, layout.units, rule)
        chunks = []
        for j in range(n):
            sl, pieces = layout.chunk(j), layout.chunk_pieces[j]
            scales = unit_scales[layout.piece_unit[j]] if unit_scales is not None else None
            payload = codec.encode_fused(x[sl], pieces, rule.at(sl), scales, _seed(seed, 0, j, n))
            chunks.append(_fit(payload, layout.chunk_nbytes))
        tc = clock()
        received = comm.all_to_all(chunks)
        coll += clock() - tc

        me, sl = comm.rank, layout.chunk(comm.rank)
        pieces, sseed = layout.chunk_pieces[me], _seed(seed, 1, me, n)
        a = _decode_sum(codec, received, pieces, _seed(seed, 0, me, n),
                        work.scratch("sum", layout.chunk_numel(me), x.device))
        xs, server_rule = server.server_fused(a.div_(n), state, s, sl)
        payload = _fit(codec.encode_fused(xs, pieces, server_rule, seed=sseed), layout.chunk_nbytes)
        tc = clock()
        gathered = comm.all_gather(payload)
        coll += clock() - tc
        target = server.result_target(state)
        result = target if target is not None else work.keep("result", layout.numel, x.device)
        for j in range(n):
            out, jpieces, jseed = result[layout.chunk(j)], layout.chunk_pieces[j], _seed(seed, 1, j, n)
            if target is not None:
                codec.decode_add(gathered[j], jpieces, out, jseed)
            else:
                codec.decode(gathered[j], jpieces, jseed, out=out)
        up, down = sum(ch.numel() for ch in chunks), gathered.numel()
    if stats is not None:
        total = clock() - t0
        stats.record(up, down, 4 * layout.numel, total - coll, coll)
    return result
