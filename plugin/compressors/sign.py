"""Scaled sign compressors: 1 bit per element plus one fp32 scale per piece."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import kernels
from ..segments import Segments
from ..wire import Pieces, from_bytes, pack_signs, packed_len, padded, unpack_signs
from .base import Compressor


DEFAULT_BLOCK_SIZE = 1024


def l1_scales(x: torch.Tensor, pieces: Pieces) -> torch.Tensor:
    """Mean absolute value of every piece: ||x_b||_1 / d_b (the papers' scale)."""
    return pieces.reduce(x, lambda v: v.abs().mean(dim=1))


def l2_scales(x: torch.Tensor, pieces: Pieces) -> torch.Tensor:
    """||x_b||_2 / sqrt(d_b) (the scale DeepSpeed's 1-bit Adam used)."""
    return pieces.reduce(x, lambda v: v.square().sum(dim=1).div_(v.shape[1]).sqrt_())


def _fill_signed(view: torch.Tensor, scale: torch.Tensor) -> None:
    torch.where(view.ne(0), scale, -scale, out=view)


def _flat(x):
    return x.flat() if isinstance(x, Segments) else x


class ScaledSign(Compressor):
    """C(x) = s_b * sign(x_b) per piece b, sign(0) = +1, s_b = ||x_b||_1/d_b (or l2/sqrt(d_b))."""

    unit_scales = True
    reads_segments = True

    _NAMES = {"l1": "scaled_sign", "l2": "scaled_sign_l2", "none": "sign"}

    def __init__(self, scale: str = "l1"):
        if scale not in self._NAMES:
            raise ValueError(f"scaled sign: scale={scale!r} is not one of 'l1' (mean |x|, the papers'), 'l2' "
                             "or 'none' (plain sign, +-1)")
        self.scale = scale
        self.name = self._NAMES[scale]
        self.unit_scales = scale != "none"

    def scales(self, x: torch.Tensor, pieces: Pieces) -> torch.Tensor:
        if self.scale == "none":
            return x.new_ones(pieces.count)
        return (l1_scales if self.scale == "l1" else l2_scales)(x, pieces)

    def _head(self, pieces: Pieces) -> int:
        return 0 if self.scale == "none" else 4 * pieces.count

    def nbytes(self, pieces: Pieces) -> int:
        return padded(self._head(pieces) + packed_len(pieces.numel))

    def fuses(self, *tensors):
        return kernels.usable(*tensors)

    def fused_scales(self, x, pieces, fused):
        """``scales(y)`` of y = x + alpha*h, ``fused`` as in ``encode_fused`` (h is not changed)."""
        if kernels.usable(x, fused.h):
            return kernels.sign_scales(x, pieces, self.scale, fused.h, fused.alpha)
        return self.scales(fused.input(_flat(x)), pieces)

    # ``weights`` (the kernel paths only; ``taciturn.profile.Weighted`` passes them where
    # ``kernels.usable`` takes them): every decoded element is (+-s) * its weight.
    def encode_fused(self, x, pieces, fused, scales=None, seed=0, weights=None):
        if not kernels.usable(x, fused.h):
            return super().encode_fused(_flat(x), pieces, fused, scales, seed)
        out = torch.zeros(self.nbytes(pieces), dtype=torch.uint8, device=x.device)
        return kernels.sign_encode(x, pieces, self.scale, out, self._head(pieces), h=fused.h, alpha=fused.alpha,
                                   update=fused.update, scales=scales, weights=weights)

    def serve_fused(self, payloads, pieces, acc, fused, scratch, seeds=(0, 0), weights=None):
        if not kernels.serves(pieces, payloads, acc, fused.h):
            return super().serve_fused(payloads, pieces, acc, fused, scratch, seeds)
        out = torch.zeros(self.nbytes(pieces), dtype=torch.uint8, device=payloads.device)
        return kernels.sign_serve(payloads, pieces, self.scale, self._head(pieces), out, acc=acc, h=fused.h,
                                  alpha=fused.alpha, update=fused.update, weights=weights)

    def encode(self, x, pieces, seed=0, scales=None):
        out = torch.zeros(self.nbytes(pieces), dtype=torch.uint8, device=x.device)
        head = self._head(pieces)
        if kernels.usable(x):
            return kernels.sign_encode(x, pieces, self.scale, out, head, scales=scales)
        if head:
            out[:head] = (scales if scales is not None else self.scales(x, pieces)).to(torch.float32).view(torch.uint8)
        out[head:head + packed_len(pieces.numel)] = pack_signs(x)
        return out

    def decode(self, payload, pieces, seed=0, out=None, weights=None):
        head = self._head(pieces)
        if kernels.usable(payload, out):
            return kernels.sign_decode(payload, pieces, self.scale, head, out, weights=weights)
        scales = from_bytes(payload, 0, pieces.count, torch.float32) if head else \
            torch.ones(pieces.count, dtype=torch.float32, device=payload.device)
        bits = unpack_signs(payload[head:head + packed_len(pieces.numel)], pieces.numel)
        if out is None:
            out = torch.empty(pieces.numel, dtype=torch.float32, device=payload.device)
        out.copy_(bits)
        return pieces.expand_into(out, scales, _fill_signed)

    def decode_add(self, payload, pieces, acc, seed=0, tmp=None, weights=None):
        if kernels.usable(payload, acc):
            return kernels.sign_decode(payload, pieces, self.scale, self._head(pieces), acc, accumulate=True,
                                       weights=weights)
        return super().decode_add(payload, pieces, acc, seed, tmp)

    def describe(self):
        return {"name": self.name, "scale": self.scale}


def _decay(name: str, value, what: str, example: float) -> float:
    """``value`` as an EMA decay in [0, 1), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"block_sign: {name}={value!r} must be {what} in [0, 1), e.g. {example}, or None (off)")
    return float(value)


class BlockSign(ScaledSign):
    """Scaled sign with one scale per block of ``block_size`` elements inside each tensor.

    The last block of a tensor is shorter. ``block_size=None`` gives one block per tensor.
    ``profile=beta`` (0 <= beta < 1; None: off) decodes with the magnitude profile of
    ``taciturn.profile``, an EMA with decay beta of the exchange's squared results that the
    exchange keeps in the feedback state: same bytes, the block's magnitude spread per element.
    ``profile_detrend=a`` (with a profile; 0 <= a < 1) takes the squares around the results'
    own EMA with decay a: the profile then follows how much each element changes from step to
    step, which is what a Markov sequence of a momentum sends (``track="momentum"``).
    """

    def __init__(self, block_size: Optional[int] = DEFAULT_BLOCK_SIZE, scale: str = "l1",
                 profile: Optional[float] = None, profile_detrend: Optional[float] = None):
        super().__init__(scale)
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_sign: block_size={block_size!r} must be a positive int or None "
                             "(None = one block per tensor)")
        if profile_detrend is not None and profile is None:
            raise ValueError(f"block_sign: profile_detrend={profile_detrend!r} shapes a magnitude profile; give "
                             "profile=... too (e.g. profile=0.99, profile_detrend=0.5) or drop it")
        if profile is not None:
            profile = _decay("profile", profile, "the profile's EMA decay", 0.99)
            if profile_detrend is not None:
                profile_detrend = _decay("profile_detrend", profile_detrend, "the EMA decay of the results' mean", 0.5)
            if block_size is None or scale == "none":
                raise ValueError("block_sign: profile needs a block_size and scale 'l1' or 'l2' (the weights keep "
                                 "each block's scale); got "
                                 f"block_size={block_size!r}, scale={scale!r}")
        self.block_size = block_size
        self.profile = profile
        self.profile_detrend = profile_detrend
        self.name = "block_sign"
        self.chunk_aligned = block_size is not None

    def units(self, sizes: Sequence[int]) -> List[int]:
        if self.block_size is None:
            return super().units(sizes)
        out: List[int] = []
        for s in sizes:
            full, tail = divmod(s, self.block_size)
            out.extend([self.block_size] * full)
            if tail:
                out.append(tail)
        return out

    def describe(self):
        out = {"name": self.name, "block_size": self.block_size, "scale": self.scale}
        if self.profile is not None:
            out["profile"] = self.profile
        if self.profile_detrend is not None:
            out["profile_detrend"] = self.profile_detrend
        return out
