"""Feedback rules (ALGORITHMS.md): none, error feedback (EF) and Markov (EF21 / CD-Adam).

A rule is stateless; its state is a dict of fp32 tensors owned by the caller (an optimizer
puts them in ``optimizer.state`` so checkpoints carry them). Each side of the pipeline runs
``y = pre(x)``, compresses y to c, then ``post(y, c)``:

=========  ===============================  ===========================================
rule       worker (state per worker)        server (state per chunk it owns)
=========  ===============================  ===========================================
none       y = x                            y = a
ef         y = x + s*e ; e = y - c          y = a + s*e~ ; e~ = y - c~
markov     y = x - h ; h = h + c            H = H + a ; y = H - G   (G += c~ on all ranks)
=========  ===============================  ===========================================

``finish(r)`` turns what every rank decoded from the servers into the result: ``r`` itself,
or for Markov the shared sequence ``G = G + r``. In one-way mode there is no server
compression and ``accumulate(a)`` gives the result (Markov: ``H = H + a``).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

State = Dict[str, torch.Tensor]


class Fused(NamedTuple):
    """A worker rule in the form a fused kernel runs it (``Compressor.encode_fused``):
    y = x + alpha*h, then h updated in the same pass by ``update``: "markov" h += C(y),
    "ef" h = y - C(y), "none" (h is None) nothing."""

    h: Optional[torch.Tensor]
    alpha: float
    update: str

    def at(self, sl: slice) -> "Fused":
        return self if self.h is None else self._replace(h=self.h[sl])


class Feedback:
    name = "none"
    #: state names: full-length on every worker / one chunk on its server / full-length result
    worker_keys: Tuple[str, ...] = ()
    server_keys: Tuple[str, ...] = ()
    result_keys: Tuple[str, ...] = ()
    #: whether worker_post() / server_post() need the decoded compression (false lets the
    #: pipeline skip a decode)
    needs_decoded = False
    server_needs_decoded = False

    def init_state(self, numel: int, chunk_numel: int, two_way: bool, device=None) -> State:
        zeros = lambda n: torch.zeros(n, dtype=torch.float32, device=device)
        state = {k: zeros(numel) for k in self.worker_keys}
        if two_way:
            state.update({k: zeros(chunk_numel) for k in self.server_keys})
            state.update({k: zeros(numel) for k in self.result_keys})
        else:
            state.update({k: zeros(numel) for k in self.one_way_keys()})
        return state

    def one_way_keys(self) -> Tuple[str, ...]:
        return ()

    def worker_pre(self, x: torch.Tensor, st: State, s: float) -> torch.Tensor:
        return x

    def worker_post(self, y: torch.Tensor, c: torch.Tensor, st: State) -> None:
        pass

    def worker_fused(self, st: State, s: float) -> Optional[Fused]:
        """worker_pre + worker_post as one ``Fused`` step; None for a rule without that form."""
        return Fused(None, 0.0, "none") if type(self) is Feedback else None

    def server_pre(self, a: torch.Tensor, st: State, s: float, chunk: slice) -> torch.Tensor:
        return a

    def server_post(self, y: torch.Tensor, c: torch.Tensor, st: State) -> None:
        pass

    def finish(self, r: torch.Tensor, st: State) -> torch.Tensor:
        return r

    def accumulate(self, a: torch.Tensor, st: State) -> torch.Tensor:
        return a


class ErrorFeedback(Feedback):
    """EF with the error rescaled by s (s = lr_{t-1}/lr_t in dist-EF-SGD, 1 otherwise)."""

    name = "ef"
    worker_keys = ("worker_error",)
    server_keys = ("server_error",)
    needs_decoded = True
    server_needs_decoded = True

    def worker_pre(self, x, st, s):
        return x.add(st["worker_error"], alpha=s) if s != 0 else x.clone()

    def worker_post(self, y, c, st):
        torch.sub(y, c, out=st["worker_error"])

    def worker_fused(self, st, s):
        return Fused(st["worker_error"], s, "ef")

    def server_pre(self, a, st, s, chunk):
        return a.add(st["server_error"], alpha=s) if s != 0 else a.clone()

    def server_post(self, y, c, st):
        torch.sub(y, c, out=st["server_error"])


class MarkovFeedback(Feedback):
    """Markov compression sequences: workers send C(x - h), the server C(H - G)."""

    name = "markov"
    worker_keys = ("worker_markov",)
    server_keys = ("server_markov",)
    result_keys = ("result_markov",)
    needs_decoded = True

    def one_way_keys(self):
        return ("server_markov",)

    def worker_pre(self, x, st, s):
        return x - st["worker_markov"]

    def worker_post(self, y, c, st):
        st["worker_markov"].add_(c)

    def worker_fused(self, st, s):
        return Fused(st["worker_markov"], -1.0, "markov")

    def server_pre(self, a, st, s, chunk):
        h = st["server_markov"]
        h.add_(a)
        return h - st["result_markov"][chunk]

    def finish(self, r, st):
        return st["result_markov"].add_(r)

    def accumulate(self, a, st):
        return st["server_markov"].add_(a)


_RULES = {"none": Feedback(), "ef": ErrorFeedback(), "markov": MarkovFeedback()}


def make_feedback(name) -> Feedback:
    if isinstance(name, Feedback):
        return name
    key = str(name).lower()
    if key not in _RULES:
        raise ValueError(f"unknown feedback {name!r}; valid: {', '.join(sorted(_RULES))}")
    return _RULES[key]
