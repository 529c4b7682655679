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
from typing import Dict, Optional

import torch

from ..compressors import Compressor
from ..feedback import Feedback, State
from ..layout import BucketLayout
from ..metrics import CommStats
from .base import Communicator, Pending


class Workspace:
    """fp32 scratch tensors reused from call to call (not state: never checkpointed).

    ``scratch`` tensors live for one stage of one bucket's exchange (``BucketExchange``) and
    come from a pool that sibling workspaces (the buckets of one pipeline) share; ``keep``
    tensors are this workspace's own, for a result that must outlive the other buckets' stages. A result is valid until the next
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


class BucketExchange:
    """One bucket's compressed allreduce in three stages, so that a caller can interleave the
    stages of several buckets and compress one bucket while another's bytes travel:

    - ``start()``: worker compression, the all_to_all (one-way: all_gather) started;
    - ``serve()``: the server phase, the all_gather started (one-way: nothing);
    - ``finish()``: the decoded result.

    Every rank must call the stages of all its buckets in the same order (the collectives are
    matched by order). Arguments as for ``compressed_allreduce``.
    """

    def __init__(self, x: torch.Tensor, layout: BucketLayout, codec: Compressor, worker: Feedback,
                 server: Feedback, state: State, comm: Communicator, *, two_way: bool = True, s: float = 1.0,
                 seed: int = 0, stats: Optional[CommStats] = None, work: Optional[Workspace] = None):
        self.x, self.layout, self.codec, self.comm = x, layout, codec, comm
        self.worker, self.server, self.state = worker, server, state
        self.two_way, self.s, self.seed, self.stats = two_way, s, seed, stats
        self.work = work if work is not None else Workspace()
        self.n = comm.world_size
        self.busy = 0.0  # seconds in the stages, waits for collectives included
        self.waiting = 0.0  # of which waiting for collectives
        self.up = self.down = 0
        self._pending: Optional[Pending] = None

    def _wait(self) -> torch.Tensor:
        t = time.perf_counter()
        out = self._pending.wait()
        self.waiting += time.perf_counter() - t
        return out

    def _timed(stage):
        def run(self):
            t = time.perf_counter()
            try:
                return stage(self)
            finally:
                self.busy += time.perf_counter() - t
        run.__doc__ = stage.__doc__
        return run

    def input(self):
        """The flat input x (a subclass may assemble it here, inside the timed stage)."""
        return self.x

    @_timed
    def start(self) -> None:
        x, lay, codec, n = self.input(), self.layout, self.codec, self.n
        rule = self.worker.worker_fused(self.state, self.s)
        if not self.two_way:
            payload = codec.encode_fused(x, lay.units, rule, seed=_seed(self.seed, 0, 0, n))
            self.up = payload.numel()
            self._pending = self.comm.all_gather_async(payload)
            return
        unit_scales = None
        if codec.unit_scales and not codec.chunk_aligned:
            unit_scales = codec.fused_scales(x, lay.units, rule)
        chunks = []
        for j in range(n):
            sl, pieces = lay.chunk(j), lay.chunk_pieces[j]
            scales = unit_scales[lay.piece_unit[j]] if unit_scales is not None else None
            payload = codec.encode_fused(x[sl], pieces, rule.at(sl), scales, _seed(self.seed, 0, j, n))
            chunks.append(_fit(payload, lay.chunk_nbytes))
        self.up = sum(ch.numel() for ch in chunks)
        self._pending = self.comm.all_to_all_async(chunks)

    @_timed
    def serve(self) -> None:
        if not self.two_way:
            return
        lay, codec, n, me = self.layout, self.codec, self.n, self.comm.rank
        received = self._wait()
        sl, pieces = lay.chunk(me), lay.chunk_pieces[me]
        acc, rule = self.server.server_form(self.state, self.s, sl)
        payload = codec.serve_fused(received, pieces, acc, rule,
                                    self.work.scratch("sum", lay.chunk_numel(me), self.x.device),
                                    (_seed(self.seed, 0, me, n), _seed(self.seed, 1, me, n)))
        self._pending = self.comm.all_gather_async(_fit(payload, lay.chunk_nbytes))

    @_timed
    def _finish(self) -> torch.Tensor:
        lay, codec, n, device = self.layout, self.codec, self.n, self.x.device
        gathered = self._wait()
        self.down = gathered.numel()
        if not self.two_way:
            buffer = self.work.scratch if self.server.keeps_result else self.work.keep  # the average may be the result
            a = codec.decode_mean(gathered, lay.units, _seed(self.seed, 0, 0, n), buffer("sum", lay.numel, device))
            return self.server.accumulate(a, self.state)
        target = self.server.result_target(self.state)
        result = target if target is not None else self.work.keep("result", lay.numel, device)
        for j in range(n):
            out, pieces, seed = result[lay.chunk(j)], lay.chunk_pieces[j], _seed(self.seed, 1, j, n)
            if target is not None:
                codec.decode_add(gathered[j], pieces, out, seed)
            else:
                codec.decode(gathered[j], pieces, seed, out=out)
        return result

    def finish(self) -> torch.Tensor:
        """The averaged result (see ``compressed_allreduce``); records the bucket in ``stats``."""
        result = self._finish()
        if self.stats is not None:
            self.stats.record(self.up, self.down, 4 * self.layout.numel, self.busy - self.waiting, self.waiting)
        return result

    del _timed


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
    ex = BucketExchange(x, layout, codec, worker, server, state, comm, two_way=two_way, s=s, seed=seed,
                        stats=stats, work=work)
    ex.start()
    ex.serve()
    return ex.finish()
