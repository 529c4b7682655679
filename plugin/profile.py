"""Magnitude profile: per-element decode weights for a scaled sign codec, shared by all ranks.

A scaled sign gives every element of a block the same magnitude s_b. Gradients are not flat
inside a block (a weight matrix's rows and columns differ by orders of magnitude), so the
profile spreads the block's magnitude by what the exchange has averaged so far:

    p  <- beta * p + (1 - beta) * r * r        after every exchange, r its result (all ranks)
    a  =  sqrt(p + FLOOR * mean_t(p))          mean_t: over the element's tensor
    w_j = a_j / norm_b(a)                      norm_b: the block's mean (l1 scale) or rms (l2)
    C_w(y)_j = w_j * s_b * sign(y_j)

so each block keeps the codec's l1 mass (or l2 energy) and its sign bits, and no byte more
travels: the encoder is the plain codec's, only decoding multiplies by w (``Weighted``). Every
rank holds the same r, hence the same p and w, and decodes every payload identically. p
starts at 0 and a block whose profile is still 0 gets w = 1 (the plain codec): the first
step is the plain codec, and since w is scale-free in p, starting p at 0 is starting it at
the first r * r. p is feedback state (``KEY``, in the optimizer's state: checkpoints carry it).

Detrended (``profile_detrend=a``): p follows the result's deviation from its own recent mean,

    d  =  r - r_bar ;   r_bar <- r_bar + (1 - a) * d ;   p <- beta * p + (1 - beta) * d * d

(r_bar from 0, feedback state ``TREND``). r * r measures each element's result, d * d how much
it changes from step to step. A Markov sequence sends the changes; tracking a momentum
(``track="momentum"``) they are (1-b1)(g - m), whose sizes per element differ from the
momentum's own, and v^ grows where the decoded changes exceed the true ones (README, Accuracy).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import kernels
from .compressors import Compressor
from .kernels.update import square_ema
from .layout import BucketLayout
from .wire import Pieces

KEY = "magnitude_profile"
#: the result's running mean that a detrended profile subtracts
TREND = "magnitude_profile_trend"
#: of the tensor's mean profile, added to every element's: elements that were ~0 so far still move
FLOOR = 0.01


def weights(p: torch.Tensor, layout: BucketLayout, scale: str, out: torch.Tensor) -> torch.Tensor:
    """w of the module docstring for a bucket with profile ``p``, written into ``out`` (on CPU by
    the fused kernel, equal to this torch path up to rounding)."""
    tensors = Pieces.from_lengths(layout.sizes)
    if kernels.usable(p, out, triton=False):
        return kernels.profile_weights(p, tensors, layout.units, layout.tensor_units, FLOOR, scale, out)
    floors = tensors.reduce(p, lambda v: v.mean(dim=1)).mul_(FLOOR)
    tensors.expand_into(out, floors, lambda view, f: view.copy_(f.expand_as(view)))
    out.add_(p).sqrt_()
    if scale == "l1":
        norms = layout.units.reduce(out, lambda v: v.mean(dim=1))
    else:
        norms = layout.units.reduce(out, lambda v: v.square().mean(dim=1).sqrt_())
    inverse = torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))
    flat = norms.eq(0).to(out.dtype)

    def spread(view, pair):
        view.mul_(pair[:, :, 0]).add_(pair[:, :, 1])

    return layout.units.expand_into(out, torch.stack([inverse, flat], dim=1), spread)


def update(state, result: torch.Tensor, beta: float, detrend: Optional[float] = None,
           scratch: Optional[torch.Tensor] = None) -> None:
    """The profile ``state[KEY]`` after an exchange whose result is ``result``: p <- beta * p +
    (1 - beta) * result^2, or with ``detrend`` the squared deviation from ``state[TREND]`` (module
    docstring; ``scratch`` holds the deviation). The square EMA runs in the fused CPU kernel where
    it can, rounding as these ops."""
    p = state[KEY]
    if detrend is not None:
        trend = state[TREND]
        result = torch.sub(result, trend, out=scratch)
        trend.add_(result, alpha=1.0 - detrend)
    if kernels.usable(p, result, triton=False):
        square_ema(p, result, beta)
        return
    p.mul_(beta).addcmul_(result, result, value=1.0 - beta)


class Weighted(Compressor):
    """``codec`` (a scaled sign) with its decoded values multiplied by ``w`` (one fp32 weight per
    element of the segment it is used on). Same payloads and bytes as ``codec``. On CPU the
    codec's fused kernels take the weights (``kernels.sign_*(weights=)``), rounding as the torch
    path does: (+-s) * w, then any sum; elsewhere (CUDA included) the torch path runs."""

    def __init__(self, codec: Compressor, w: torch.Tensor):
        self.codec, self.w = codec, w
        self.name = codec.name
        self.unit_scales = codec.unit_scales
        self.chunk_aligned = codec.chunk_aligned

    def _fused(self, *tensors) -> bool:
        return kernels.usable(*tensors, self.w, triton=False)

    def nbytes(self, pieces):
        return self.codec.nbytes(pieces)

    def encode(self, x, pieces, seed=0, scales=None):
        return self.codec.encode(x, pieces, seed, scales)

    def encode_fused(self, x, pieces, fused, scales=None, seed=0):
        if self._fused(x, fused.h):
            return self.codec.encode_fused(x, pieces, fused, scales, seed, weights=self.w)
        return super().encode_fused(x, pieces, fused, scales, seed)

    def serve_fused(self, payloads, pieces, acc, fused, scratch, seeds=(0, 0)):
        if self._fused(payloads, acc, fused.h) and kernels.serves(pieces, payloads):
            return self.codec.serve_fused(payloads, pieces, acc, fused, scratch, seeds, weights=self.w)
        return super().serve_fused(payloads, pieces, acc, fused, scratch, seeds)

    def decode(self, payload, pieces, seed=0, out=None):
        if self._fused(payload, out):
            return self.codec.decode(payload, pieces, seed, out, weights=self.w)
        return self.codec.decode(payload, pieces, seed, out).mul_(self.w)

    def decode_add(self, payload, pieces, acc, seed=0, tmp=None):
        if self._fused(payload, acc):
            return self.codec.decode_add(payload, pieces, acc, seed, tmp, weights=self.w)
        return super().decode_add(payload, pieces, acc, seed, tmp)

    def describe(self):
        return self.codec.describe()
