"""Top-k sparsification: k fp32 values and k int32 indices per piece."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional, Union

import torch

from .. import kernels
from ..kernels.topk import topk_encode
from ..wire import Pieces, from_bytes, padded
from .base import Compressor


def exact_ratio(ratio: Union[float, Fraction]) -> Fraction:
    """``ratio`` as an exact fraction: a float is read as the decimal it prints as (0.07 -> 7/100),
    so ceil(ratio * length) is not pushed up by binary rounding (float 0.07 * 100 > 7)."""
    return ratio if isinstance(ratio, Fraction) else Fraction(repr(float(ratio)))


def keep_count(length: int, ratio: Union[float, Fraction]) -> int:
    """Entries kept of a piece: ceil(ratio * length) computed exactly, at least 1 for a non-empty piece."""
    return min(length, max(1, math.ceil(exact_ratio(ratio) * length))) if length else 0


class _Sparse(Compressor):
    """Shared layout of sparse payloads: per piece, k values (fp32) then k indices (int32)."""

    sends_indices = True

    def __init__(self, ratio: Optional[float] = None, k: Optional[int] = None, name: str = ""):
        if (ratio is None) == (k is None):
            if ratio is None:
                ratio = 0.01
            else:
                raise ValueError(f"{name}: give ratio or k, not both (ratio={ratio!r}, k={k!r})")
        if ratio is not None and not (0 < float(ratio) <= 1):
            raise ValueError(f"{name}: ratio={ratio!r} must be in (0, 1]; e.g. ratio=0.01 keeps 1%")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"{name}: k={k!r} must be a positive int")
        self.ratio = None if ratio is None else float(ratio)
        self._exact_ratio = None if ratio is None else exact_ratio(ratio)
        self.k = k
        self.name = name

    def _options(self) -> dict:
        """Constructor options other than ``ratio``/``k`` (kept by ``bind``)."""
        return {}

    def bind(self, numel: int) -> "_Sparse":
        """Resolve an absolute ``k`` against the total number of elements it applies to: the
        result keeps exactly k of ``numel`` (pieces of it keep k proportionally)."""
        if self.k is None:
            return self
        if self.k > numel:
            raise ValueError(f"{self.name}: k={self.k} is larger than the {numel} elements it compresses; "
                             f"use k <= {numel} or ratio=")
        return type(self)(ratio=Fraction(self.k, numel), **self._options())

    def counts(self, pieces: Pieces):
        """Entries kept per piece. An unbound absolute ``k`` applies to the whole segment."""
        if self.k is not None:
            return self.bind(pieces.numel).counts(pieces) if pieces.numel else []
        return [keep_count(n, self._exact_ratio) for n in pieces.lengths()]

    def nbytes(self, pieces):
        return padded(8 * sum(self.counts(pieces)))

    def indices(self, x: torch.Tensor, pieces: Pieces, seed: int):
        raise NotImplementedError

    def encode(self, x, pieces, seed=0, scales=None):
        idx = self.indices(x, pieces, seed)
        total = idx.numel()
        out = torch.zeros(self.nbytes(pieces), dtype=torch.uint8, device=x.device)
        out[:4 * total] = x[idx].to(torch.float32).view(torch.uint8)
        if self.sends_indices:
            out[4 * total:8 * total] = idx.to(torch.int32).view(torch.uint8)
        return out

    def _entries(self, payload: torch.Tensor, pieces: Pieces, seed: int):
        """The values a payload carries and their indices (views of the payload where it sends them)."""
        total = sum(self.counts(pieces))
        values = from_bytes(payload, 0, total, torch.float32)
        if self.sends_indices:
            return values, from_bytes(payload, 4 * total, total, torch.int32)
        return values, self.indices(None, pieces, seed).to(payload.device)

    def decode(self, payload, pieces, seed=0, out=None):
        values, idx = self._entries(payload, pieces, seed)
        if out is None:
            out = torch.empty(pieces.numel, dtype=torch.float32, device=payload.device)
        return out.zero_().index_put_((idx,), values)

    def decode_add(self, payload, pieces, acc, seed=0, tmp=None):
        """``acc += decode(payload)`` at the kept entries only (no full-size temporary; ``tmp`` unused)."""
        values, idx = self._entries(payload, pieces, seed)
        return acc.index_add_(0, idx, values)

    def describe(self):
        return {"name": self.name, "ratio": self.ratio, "k": self.k}


class TopK(_Sparse):
    """Keep the ceil(ratio * d_b) largest-magnitude entries of every piece b.

    On CPU (where ``taciturn.kernels.usable``) both modes run the fused top-k kernel: exact,
    without a sort, and among entries as large as the k-th largest it keeps the lowest indices.
    Elsewhere ``mode="exact"`` (default) uses ``torch.topk``, and ``mode="sampled"`` estimates the
    threshold from a 1% random sample (seeded, so it is the same on every rank) set a little low,
    and runs the exact top-k only on the entries above it (all of them when the sample set it too
    high): the same entries as exact top-k, faster on large tensors (pieces of 100k elements or
    more). The two paths may keep different entries among equal magnitudes.
    """

    def __init__(self, ratio=None, k=None, mode: str = "exact"):
        super().__init__(ratio, k, "topk")
        if mode not in ("exact", "sampled"):
            raise ValueError(f"topk: mode={mode!r} must be 'exact' or 'sampled'")
        self.mode = mode

    def _options(self):
        return {"mode": self.mode}

    def _piece_topk(self, v: torch.Tensor, k: int, seed: int) -> torch.Tensor:
        mag = v.abs()
        if self.mode == "exact" or v.numel() < 100_000:
            return mag.topk(k, sorted=False).indices
        gen = torch.Generator(device="cpu").manual_seed(seed)
        sample = torch.randint(0, v.numel(), (max(1000, v.numel() // 100),), generator=gen).to(v.device)
        frac = min(1.0, 1.5 * k / v.numel())
        threshold = mag[sample].quantile(1.0 - frac) if frac < 1 else mag.new_zeros(())
        above = (mag >= threshold).nonzero().squeeze(1)
        if above.numel() >= k:
            return above[mag[above].topk(k, sorted=False).indices]
        return mag.topk(k, sorted=False).indices

    def fuses(self, *tensors):
        return kernels.usable(*tensors, triton=False)

    def encode_fused(self, x, pieces, fused, scales=None, seed=0):
        if not kernels.usable(x, fused.h, triton=False):
            return super().encode_fused(x, pieces, fused, scales, seed)
        return self._kernel_encode(x, pieces, fused.h, fused.alpha, fused.update)

    def encode(self, x, pieces, seed=0, scales=None):
        if kernels.usable(x, triton=False):
            return self._kernel_encode(x, pieces)
        return super().encode(x, pieces, seed, scales)

    def _kernel_encode(self, x: torch.Tensor, pieces: Pieces, h: Optional[torch.Tensor] = None, alpha: float = 0.0,
                       update: str = "none") -> torch.Tensor:
        """The payload of y = x + alpha*h from the CPU kernel, h updated as ``update`` says."""
        out = torch.zeros(self.nbytes(pieces), dtype=torch.uint8)
        return topk_encode(x, pieces, self.counts(pieces), out, h=h, alpha=alpha, update=update)

    def indices(self, x, pieces, seed):
        parts = []
        start = 0
        for n, k in zip(pieces.lengths(), self.counts(pieces)):
            parts.append(self._piece_topk(x[start:start + n], k, seed) + start)
            start += n
        if not parts:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        return torch.cat(parts)

    def describe(self):
        return {**super().describe(), "mode": self.mode}


class RandK(_Sparse):
    """Keep ceil(ratio * d_b) entries per piece chosen by a seeded generator.

    Every rank derives the same indices from ``seed`` (the pipeline passes the step and bucket),
    so only the values go on the wire. Unscaled: C(x) keeps x's entries (delta = k/d).
    """

    sends_indices = False

    def __init__(self, ratio=None, k=None, seed: int = 0):
        super().__init__(ratio, k, "randk")
        self.seed = int(seed)

    def _options(self):
        return {"seed": self.seed}

    def nbytes(self, pieces):
        return padded(4 * sum(self.counts(pieces)))

    def indices(self, x, pieces, seed):
        gen = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + seed) % (2 ** 63))
        parts = []
        start = 0
        for n, k in zip(pieces.lengths(), self.counts(pieces)):
            parts.append(torch.randperm(n, generator=gen)[:k] + start)
            start += n
        idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return idx if x is None else idx.to(x.device)

    def describe(self):
        return {**super().describe(), "seed": self.seed}
