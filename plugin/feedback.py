"""Feedback rules (ALGORITHMS.md): none, error feedback (EF) and Markov (EF21 / CD-Adam).

A rule is stateless; its state is a dict of fp32 tensors owned by the caller (an optimizer
puts them in ``optimizer.state`` so checkpoints carry them). Each side of the pipeline
compresses y = x + alpha*h and then updates its state h from what it sent, c = C(y):

=========  ===============================  ===========================================
rule       worker (state per worker)        server (state per chunk it owns)
=========  ===============================  ===========================================
none       y = x                            y = a
ef         y = x + s*e ; e = y - c          y = a + s*e~ ; e~ = y - c~
markov     y = x - h ; h = h + c            H = H + a ; y = H - G   (G += c~ on all ranks)
=========  ===============================  ===========================================

Every rank then decodes what the servers sent into the result: that decoded vector itself,
or for Markov the shared sequence ``G = G + c~`` (``result_target``). In one-way mode there
is no server compression and ``accumulate(a)`` gives the result (Markov: ``H = H + a``); in
sharded mode ``accumulate(a)`` is what the chunk owner's update rule reads.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .names import Registry

State = Dict[str, torch.Tensor]


class FeedbackStep(NamedTuple):
    """One side's rule in the form a codec runs it (``Compressor.encode_fused``): compress
    y = x + alpha*h, then update h from c = C(y): "markov" h += c, "ef" h = y - c, "none"
    (h may be None) nothing. A fused kernel does it in one pass; ``input``/``apply`` are the
    same rule in torch ops."""

    h: Optional[torch.Tensor]
    alpha: float
    update: str

    def at(self, sl: slice) -> "FeedbackStep":
        return self if self.h is None else self._replace(h=self.h[sl])

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """y = x + alpha*h (x itself when alpha is 0)."""
        return x if self.h is None or self.alpha == 0 else x.add(self.h, alpha=self.alpha)

    def apply(self, y: torch.Tensor, c: torch.Tensor) -> None:
        """The state update from y and its decoded compression c."""
        if self.update == "markov":
            self.h.add_(c)
        elif self.update == "ef":
            torch.sub(y, c, out=self.h)


_NONE = FeedbackStep(None, 0.0, "none")


class Feedback:
    name = "none"
    #: state names: full-length on every worker / one chunk on its server / full-length result
    worker_keys: Tuple[str, ...] = ()
    server_keys: Tuple[str, ...] = ()
    result_keys: Tuple[str, ...] = ()
    #: state names of ``accumulate``: full-length in a one-way exchange (every rank averages
    #: itself), the owner's chunk in a sharded one (the aggregate before the update rule)
    accumulate_keys: Tuple[str, ...] = ()
    #: whether the result is one of this rule's state tensors (Markov) rather than the decoded average
    keeps_result = False

    def worker_step(self, st: State, error_scale: float) -> FeedbackStep:
        """The worker's rule on its local x (``error_scale`` rescales a stored error)."""
        return _NONE

    def server_step(self, st: State, error_scale: float, chunk: slice) -> Tuple[Optional[torch.Tensor], FeedbackStep]:
        """The server's rule for its chunk ``chunk`` as (acc, rule): with a the mean of the
        workers' chunks, x = a, or when ``acc`` is a tensor acc += a and x = acc (Markov's H);
        then ``rule`` on x (``Compressor.serve_fused``)."""
        return None, _NONE

    def result_target(self, st: State) -> Optional[torch.Tensor]:
        """The tensor the decoded server chunks are added to, which is then the result
        (Markov: G); None when the decoded chunks are the result."""
        return None

    def accumulate(self, a: torch.Tensor, st: State) -> torch.Tensor:
        return a


class ErrorFeedback(Feedback):
    """EF with the error rescaled by s = ``error_scale`` (lr_{t-1}/lr_t in dist-EF-SGD, 1 otherwise)."""

    name = "ef"
    worker_keys = ("worker_error",)
    server_keys = ("server_error",)

    def worker_step(self, st, error_scale):
        return FeedbackStep(st["worker_error"], error_scale, "ef")

    def server_step(self, st, error_scale, chunk):
        return None, FeedbackStep(st["server_error"], error_scale, "ef")


class MarkovFeedback(Feedback):
    """Markov compression sequences: workers send C(x - h), the server C(H - G)."""

    name = "markov"
    worker_keys = ("worker_markov",)
    server_keys = ("server_markov",)
    result_keys = ("result_markov",)
    accumulate_keys = ("server_markov",)
    keeps_result = True

    def worker_step(self, st, error_scale):
        return FeedbackStep(st["worker_markov"], -1.0, "markov")

    def server_step(self, st, error_scale, chunk):
        return st["server_markov"], FeedbackStep(st["result_markov"][chunk], -1.0, "none")

    def result_target(self, st):
        return st["result_markov"]

    def accumulate(self, a, st):
        return st["server_markov"].add_(a)


_RULES = Registry("feedback", {"ef": ErrorFeedback(), "markov": MarkovFeedback(), "none": Feedback()})


def make_feedback(name) -> Feedback:
    return name if isinstance(name, Feedback) else _RULES.get(name)
