"""The compressed allreduce of ALGORITHMS.md, on one flat bucket.

Pure: the bucket, its layout, the feedback state and the communicator come in as arguments;
the averaged (compressed) result comes out. Two-way mode:

1. worker: y = worker_feedback(x); the payload C(y) is encoded chunk by chunk
2. all_to_all: rank j receives chunk j of every worker's payload
3. server (rank j): a = mean_i decode(payload_i[j]); z = server_feedback(a); encode C(z)
4. all_gather: every rank receives every server chunk
5. finish: r = decode(all server chunks); result = r (Markov: G = G + r)

One-way mode all_gathers the workers' payloads and every rank averages them.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from ..compressors import Compressor
from ..feedback import Feedback, State
from ..layout import BucketLayout
from ..metrics import CommStats
from .base import Communicator


def _fit(payload: torch.Tensor, nbytes: int) -> torch.Tensor:
    if payload.numel() == nbytes:
        return payload
    out = payload.new_zeros(nbytes)
    out[:payload.numel()] = payload
    return out


def _seed(seed: int, side: int, j: int, n: int) -> int:
    return (seed * 2 + side) * (n + 1) + j


def compressed_allreduce(x: torch.Tensor, layout: BucketLayout, codec: Compressor,
                         worker: Feedback, server: Feedback, state: State, comm: Communicator, *,
                         two_way: bool = True, s: float = 1.0, seed: int = 0,
                         stats: Optional[CommStats] = None) -> torch.Tensor:
    """Average the flat fp32 ``x`` over ``comm``'s ranks through compression and feedback.

    ``s`` scales the stored errors (EF), ``seed`` drives random compressors (same on every
    rank). Returns a tensor that may be a state tensor (Markov): copy it, do not modify it.
    """
    n = comm.world_size
    clock = time.perf_counter
    coll = 0.0
    t0 = clock()
    # A fused kernel (CPU sign codecs) runs pre, encode and post in one pass per chunk.
    fused = worker.worker_fused(state, s)
    fused = fused if fused is not None and codec.fuses(x, fused.h) else None
    y = x if fused is not None else worker.worker_pre(x, state, s)
    if not two_way:
        if fused is not None:
            payload = codec.encode_fused(x, layout.units, fused)
        else:
            payload = codec.encode(y, layout.units, _seed(seed, 0, 0, n))
            if worker.needs_decoded:
                worker.worker_post(y, codec.decode(payload, layout.units, _seed(seed, 0, 0, n)), state)
        tc = clock()
        gathered = comm.all_gather(payload)
        coll += clock() - tc
        a = torch.zeros_like(y)
        tmp = torch.empty_like(y)
        for i in range(n):
            codec.decode_add(gathered[i], layout.units, a, _seed(seed, 0, 0, n), tmp)
        result = server.accumulate(a.div_(n), state)
        up, down = payload.numel(), gathered.numel()
    else:
        unit_scales = None
        if codec.unit_scales and not codec.chunk_aligned:
            unit_scales = (codec.fused_scales(x, layout.units, fused) if fused is not None
                           else codec.scales(y, layout.units))
        chunks = []
        c = torch.empty_like(y) if worker.needs_decoded and fused is None else None
        for j in range(n):
            sl, pieces = layout.chunk(j), layout.chunk_pieces[j]
            scales = unit_scales[layout.piece_unit[j]] if unit_scales is not None else None
            if fused is not None:
                payload = codec.encode_fused(x[sl], pieces, fused.at(sl), scales)
            else:
                payload = codec.encode(y[sl], pieces, _seed(seed, 0, j, n), scales)
            if c is not None:
                codec.decode(payload, pieces, _seed(seed, 0, j, n), out=c[sl])
            chunks.append(_fit(payload, layout.chunk_nbytes))
        if c is not None:
            worker.worker_post(y, c, state)
        tc = clock()
        received = comm.all_to_all(chunks)
        coll += clock() - tc

        me, sl = comm.rank, layout.chunk(comm.rank)
        pieces, wseed = layout.chunk_pieces[me], _seed(seed, 0, me, n)
        a = torch.zeros(layout.chunk_numel(me), dtype=torch.float32, device=x.device)
        tmp = torch.empty_like(a)
        for i in range(n):
            codec.decode_add(received[i], pieces, a, wseed, tmp)
        z = server.server_pre(a.div_(n), state, s, sl)
        sseed = _seed(seed, 1, me, n)
        payload = _fit(codec.encode(z, pieces, sseed), layout.chunk_nbytes)
        if server.server_needs_decoded:
            server.server_post(z, codec.decode(payload, pieces, sseed, out=tmp), state)
        tc = clock()
        gathered = comm.all_gather(payload)
        coll += clock() - tc
        r = torch.empty_like(y)
        for j in range(n):
            codec.decode(gathered[j], layout.chunk_pieces[j], _seed(seed, 1, j, n), out=r[layout.chunk(j)])
        result = server.finish(r, state)
        up, down = sum(ch.numel() for ch in chunks), gathered.numel()
    if stats is not None:
        total = clock() - t0
        stats.record(up, down, 4 * layout.numel, total - coll, coll)
    return result
