"""The one difference between one-way and two-way exchanges, in one place.

Two-way (ALGORITHMS.md): workers send chunk j of their payload to rank j (all_to_all), rank j
serves chunk j (averages, applies the server rule, recompresses) and every rank gathers the
servers' chunks (all_gather). One-way: every rank gathers every worker's whole payload and
averages it; there is no server compression.

Sharded (ALGORITHMS.md, "Sharded state"): the uplink of two-way; rank j keeps the update
rule's state for chunk j, runs the rule on the aggregate before any server compression and
gathers the model change, compressed with error feedback on it (or cast to fp32 / bf16).

A direction lays out the feedback state of a bucket, counts its wire bytes and runs the three
stages of ``BucketExchange`` (``start``, ``serve``, ``finish``).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..comm import Handle
from ..compressors import Compressor
from ..feedback import Feedback, FeedbackStep, State
from ..layout import BucketLayout
from ..profile import KEY as PROFILE, TREND


def _fit(payload: torch.Tensor, nbytes: int) -> torch.Tensor:
    if payload.numel() == nbytes:
        return payload
    out = payload.new_zeros(nbytes)
    out[:payload.numel()] = payload
    return out


class TwoWay:
    two_way = True

    @staticmethod
    def state_lengths(worker: Feedback, server: Feedback, layout: BucketLayout, rank: int) -> Dict[str, int]:
        lengths = {k: layout.numel for k in worker.worker_keys}
        lengths.update({k: layout.chunk_numel(rank) for k in server.server_keys})
        lengths.update({k: layout.numel for k in server.result_keys})
        return lengths

    @staticmethod
    def wire_bytes(layouts: List[BucketLayout], n: int) -> Tuple[int, int]:
        up = sum(n * lay.chunk_nbytes for lay in layouts)
        return up, up

    @staticmethod
    def start(ex, x) -> Tuple[int, Handle]:
        lay, compressor, n = ex.layout, ex.compressor, ex.n
        rule = ex.worker.worker_step(ex.state, ex.error_scale)
        unit_scales = None
        if compressor.unit_scales and not compressor.chunk_aligned:
            unit_scales = compressor.fused_scales(x, lay.units, rule)
        chunks = []
        for j in range(n):
            sl, pieces = lay.chunk(j), lay.chunk_pieces[j]
            scales = unit_scales[lay.piece_unit[j]] if unit_scales is not None else None
            payload = ex.codec(sl).encode_fused(x[sl], pieces, rule.at(sl), scales, ex.seed_for(0, j))
            chunks.append(_fit(payload, lay.chunk_nbytes))
        return sum(ch.numel() for ch in chunks), ex.comm.all_to_all_async(chunks)

    @staticmethod
    def serve(ex) -> Handle:
        lay, me = ex.layout, ex.comm.rank
        received = ex.wait()
        sl, pieces = lay.chunk(me), lay.chunk_pieces[me]
        acc, rule = ex.server.server_step(ex.state, ex.error_scale, sl)
        payload = ex.codec(sl).serve_fused(received, pieces, acc, rule,
                                            ex.work.scratch("sum", lay.chunk_numel(me), ex.device),
                                            (ex.seed_for(0, me), ex.seed_for(1, me)))
        return ex.comm.all_gather_async(_fit(payload, lay.chunk_nbytes))

    @staticmethod
    def finish(ex, gathered: torch.Tensor) -> torch.Tensor:
        lay = ex.layout
        target = ex.server.result_target(ex.state)
        result = target if target is not None else ex.work.keep("result", lay.numel, ex.device)
        for j in range(ex.n):
            out, pieces, seed = result[lay.chunk(j)], lay.chunk_pieces[j], ex.seed_for(1, j)
            compressor = ex.codec(lay.chunk(j))
            if target is not None:
                compressor.decode_add(gathered[j], pieces, out, seed)
            else:
                compressor.decode(gathered[j], pieces, seed, out=out)
        return result


class OneWay:
    two_way = False

    @staticmethod
    def state_lengths(worker: Feedback, server: Feedback, layout: BucketLayout, rank: int) -> Dict[str, int]:
        return {k: layout.numel for k in worker.worker_keys + server.accumulate_keys}

    @staticmethod
    def wire_bytes(layouts: List[BucketLayout], n: int) -> Tuple[int, int]:
        up = sum(lay.full_nbytes for lay in layouts)
        return up, n * up

    @staticmethod
    def start(ex, x) -> Tuple[int, Handle]:
        rule = ex.worker.worker_step(ex.state, ex.error_scale)
        payload = ex.codec().encode_fused(x, ex.layout.units, rule, seed=ex.seed_for(0, 0))
        return payload.numel(), ex.comm.all_gather_async(payload)

    @staticmethod
    def serve(ex) -> Handle:
        return ex.pending

    @staticmethod
    def finish(ex, gathered: torch.Tensor) -> torch.Tensor:
        lay = ex.layout
        buffer = ex.work.scratch if ex.server.keeps_result else ex.work.keep  # the average may be the result
        a = ex.codec().decode_mean(gathered, lay.units, ex.seed_for(0, 0), buffer("sum", lay.numel, ex.device))
        return ex.server.accumulate(a, ex.state)


class Sharded:
    """``downlink``: the codec of the model change; ``error_feedback``: keep the owner's error
    on it (``downlink_error``); ``owner_keys``: the update rule's state, kept for the chunk.
    The stages call ``ex.update(chunk, aggregate)``, which runs the update rule on the owner's
    chunk and returns the model change (x_old - x_new) there."""

    two_way = True
    start = staticmethod(TwoWay.start)

    def __init__(self, downlink: Compressor, error_feedback: bool, owner_keys: Tuple[str, ...]):
        self.downlink, self.error_feedback, self.owner_keys = downlink, error_feedback, tuple(owner_keys)

    def state_lengths(self, worker: Feedback, server: Feedback, layout: BucketLayout, rank: int) -> Dict[str, int]:
        chunk = layout.chunk_numel(rank)
        lengths = {k: layout.numel for k in worker.worker_keys}
        lengths.update({k: chunk for k in server.accumulate_keys + self.owner_keys})
        if self.error_feedback:
            lengths["downlink_error"] = chunk
        return lengths

    def chunk_nbytes(self, layout: BucketLayout) -> int:
        return max(self.downlink.nbytes(p) for p in layout.chunk_pieces)

    def wire_bytes(self, layouts: List[BucketLayout], n: int) -> Tuple[int, int]:
        return (sum(n * lay.chunk_nbytes for lay in layouts),
                sum(n * self.chunk_nbytes(lay) for lay in layouts))

    def serve(self, ex) -> Handle:
        lay, me = ex.layout, ex.comm.rank
        received = ex.wait()
        sl, pieces = lay.chunk(me), lay.chunk_pieces[me]
        a = ex.compressor.decode_mean(received, pieces, ex.seed_for(0, me),
                                      ex.work.scratch("sum", lay.chunk_numel(me), ex.device))
        delta = ex.update(sl, ex.server.accumulate(a, ex.state))
        rule = FeedbackStep(ex.state["downlink_error"], 1.0, "ef") if self.error_feedback else FeedbackStep(None, 0.0, "none")
        payload = self.downlink.encode_fused(delta, pieces, rule, seed=ex.seed_for(1, me))
        return ex.comm.all_gather_async(_fit(payload, self.chunk_nbytes(lay)))

    def finish(self, ex, gathered: torch.Tensor) -> torch.Tensor:
        lay = ex.layout
        result = ex.work.keep("result", lay.numel, ex.device)
        for j in range(ex.n):
            self.downlink.decode(gathered[j], lay.chunk_pieces[j], ex.seed_for(1, j), out=result[lay.chunk(j)])
        return result


def direction(two_way: bool):
    return TwoWay if two_way else OneWay


def init_state(worker: Feedback, server: Feedback, layout: BucketLayout, way, rank: int,
               device=None) -> State:
    """Zero fp32 feedback state of one bucket for this rank: the worker rule's tensors
    (full-length), the server rule's (the rank's chunk in two-way mode) and the codec's
    magnitude profile and its trend (full-length). ``way``: two-way (a bool) or a direction."""
    way = direction(way) if isinstance(way, bool) else way
    lengths = way.state_lengths(worker, server, layout, rank)
    if layout.compressor.profile is not None:
        lengths[PROFILE] = layout.numel
    if layout.compressor.profile_detrend is not None:
        lengths[TREND] = layout.numel
    return {k: torch.zeros(n, dtype=torch.float32, device=device) for k, n in lengths.items()}
