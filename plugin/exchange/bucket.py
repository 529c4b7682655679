"""One bucket's compressed allreduce (ALGORITHMS.md), in three stages.

1. ``start``: the worker compresses y = x + alpha*h chunk by chunk (two-way) or whole
   (one-way), updates its feedback state in the same pass, and starts the all_to_all
   (one-way: the all_gather);
2. ``serve`` (two-way): rank j averages the workers' chunk j, applies its server rule,
   recompresses and starts the all_gather;
3. ``finish``: every rank decodes what it gathered into the averaged result.

What differs between one-way and two-way lives in ``direction.py``. Full-size temporaries
come from a ``Workspace`` kept between calls: a fresh CPU tensor of 100 MB costs about 45 ms
of page faults here, several times the pass over it.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Union

import torch

from .. import profile
from ..comm import Communicator, Handle
from ..compressors import Compressor
from ..feedback import Feedback, State
from ..layout import BucketLayout
from ..metrics import CommStats
from ..segments import Segments


class Workspace:
    """fp32 scratch tensors reused from call to call (not state: never checkpointed).

    ``scratch`` tensors live for one stage of one bucket's exchange and come from a pool that
    sibling workspaces (the buckets of one exchange) share; ``keep`` tensors are this
    workspace's own, for a result that must outlive the other buckets' stages. A result is
    valid until the next call with the same workspace. Contents are undefined on return.
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


class BucketExchange:
    """One bucket's exchange. ``x``: the bucket as one flat tensor, or its tensors in place
    (``Segments``), assembled into the input only when ``start`` runs. Every rank must run the
    stages of all its buckets in the same order (the collectives are matched by order); a
    caller interleaves them so that one bucket's bytes travel while another is compressed.
    ``seed`` (the same on every rank) drives random compressors: each chunk and side draws its
    own from it. The result may alias feedback state or the workspace: read-only, valid until
    the next call with that workspace."""

    def __init__(self, x: Union[torch.Tensor, Segments], layout: BucketLayout, compressor: Compressor,
                 worker: Feedback, server: Feedback, direction, state: State, comm: Communicator, *,
                 error_scale: float, seed: int, stats: Optional[CommStats], work: Workspace,
                 owner: Optional[Callable] = None):
        self.x, self.layout, self.compressor, self.comm = x, layout, compressor, comm
        self.worker, self.server, self.direction, self.state = worker, server, direction, state
        self.error_scale, self.seed, self.stats, self.work = error_scale, seed, stats, work
        self.owner = owner  # a sharded exchange's update rule on this rank's chunk
        self.updating = 0.0  # of the stages' time, in ``owner``
        self.n = comm.world_size
        self.device = x.device
        self.busy = 0.0  # seconds in the stages, waits for collectives included
        self.waiting = 0.0  # of which waiting for collectives
        self.up = self.down = 0
        self.pending: Optional[Handle] = None
        self.weights: Optional[torch.Tensor] = None  # the magnitude profile's, from ``start`` on

    def codec(self, sl: slice = slice(None)) -> Compressor:
        """The codec of the bucket's range ``sl``: the compressor, decoding with the weights of
        its magnitude profile there when it has one."""
        return self.compressor if self.weights is None else profile.Weighted(self.compressor, self.weights[sl])

    def seed_for(self, side: int, chunk: int) -> int:
        """The seed of one side (0 worker, 1 server) of one chunk."""
        return (self.seed * 2 + side) * (self.n + 1) + chunk

    def update(self, chunk: slice, g: torch.Tensor) -> torch.Tensor:
        """The owner's update rule on its chunk (sharded exchanges): the model change there."""
        t = time.perf_counter()
        out = self.owner(chunk, g, self.state)
        self.updating += time.perf_counter() - t
        return out

    def wait(self) -> torch.Tensor:
        t = time.perf_counter()
        out = self.pending.wait()
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

    def _input(self):
        """The flat input: the tensors read in place by a compressor that can, else one fp32
        copy into a scratch tensor that the buckets share (a started bucket no longer reads it)."""
        x = self.x
        if not isinstance(x, Segments):
            return x.reshape(-1).float()
        if len(x.parts) == 1:
            return x.parts[0].float()
        if self.compressor.reads_segments and self.compressor.profile is None and \
                all(p.dtype == torch.float32 for p in x.parts):
            return x
        return x.flat(self.work.scratch("flat", self.layout.numel, x.device))

    @_timed
    def start(self) -> None:
        self.x = self._input()
        if self.compressor.profile is not None:
            self.weights = profile.weights(self.state[profile.KEY], self.layout, self.compressor.scale,
                                           self.work.keep("weights", self.layout.numel, self.device))
        self.up, self.pending = self.direction.start(self, self.x)

    @_timed
    def serve(self) -> None:
        self.pending = self.direction.serve(self)

    @_timed
    def _finish(self) -> torch.Tensor:
        gathered = self.wait()
        self.down = gathered.numel()
        result = self.direction.finish(self, gathered)
        if self.weights is not None:
            detrend = self.compressor.profile_detrend
            scratch = None if detrend is None else self.work.scratch("deviation", self.layout.numel, result.device)
            profile.update(self.state, result, self.compressor.profile, detrend, scratch)
        return result

    def finish(self) -> torch.Tensor:
        """The averaged result; records the bucket in ``stats``."""
        result = self._finish()
        if self.stats is not None:
            self.stats.record(self.up, self.down, 4 * self.layout.numel, self.busy - self.waiting - self.updating,
                              self.waiting, self.updating)
        return result

    del _timed
