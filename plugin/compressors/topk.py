"""Sparsification: top-k and random-k, their values (and top-k's indices) on the wire.

Two encodings. ``"fp32"`` (the papers'): k fp32 values, then k int32 indices from the start
of the segment, 8 bytes per kept entry. ``"bf16"``: the entries in index order, k bf16 values
and k uint16 indices within 65,536-element windows of the segment, after one int32 count per
window: 4 bytes per kept entry, so twice the entries for the same bytes. Feedback keeps what
bf16 rounds off (EF's error, Markov's sequence are updated from the decoded values).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional, Union

import torch

from .. import kernels
from ..kernels.topk import topk_decode, topk_encode
from ..wire import INDEX_WINDOW, SPARSE_ENCODINGS, Pieces, from_bytes, padded, sparse_layout
from .base import Compressor


def exact_ratio(ratio: Union[float, Fraction]) -> Fraction:
    """``ratio`` as an exact fraction: a float is read as the decimal it prints as (0.07 -> 7/100),
    so ceil(ratio * length) is not pushed up by binary rounding (float 0.07 * 100 > 7)."""
    return ratio if isinstance(ratio, Fraction) else Fraction(repr(float(ratio)))


def keep_count(length: int, ratio: Union[float, Fraction]) -> int:
    """Entries kept of a piece: ceil(ratio * length) computed exactly, at least 1 for a non-empty piece."""
    return min(length, max(1, math.ceil(exact_ratio(ratio) * length))) if length else 0


class _Sparse(Compressor):
    """Shared layout of sparse payloads (the module's two encodings)."""

    sends_indices = True

    def __init__(self, ratio: Optional[float] = None, k: Optional[int] = None, name: str = "",
                 encoding: str = "fp32"):
        if (ratio is None) == (k is None):
            if ratio is None:
                ratio = 0.01
            else:
                raise ValueError(f"{name}: give ratio or k, not both (ratio={ratio!r}, k={k!r})")
        if ratio is not None and not (0 < float(ratio) <= 1):
            raise ValueError(f"{name}: ratio={ratio!r} must be in (0, 1]; e.g. ratio=0.01 keeps 1%")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"{name}: k={k!r} must be a positive int")
        if encoding not in SPARSE_ENCODINGS:
            raise ValueError(f"{name}: encoding={encoding!r} must be one of {SPARSE_ENCODINGS}: 'fp32' sends fp32 values "
                             f"(and int32 indices), 'bf16' bf16 values (and 16-bit indices)")
        self.encoding = encoding
        self._value_dtype = torch.float32 if encoding == "fp32" else torch.bfloat16
        self.ratio = None if ratio is None else float(ratio)
        self._exact_ratio = None if ratio is None else exact_ratio(ratio)
        self.k = k
        self.name = name

    def _options(self) -> dict:
        """Constructor options other than ``ratio``/``k`` (kept by ``bind``)."""
        return {"encoding": self.encoding}

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

    def _layout(self, pieces: Pieces):
        """(entries, bytes of the header, of one value, of one index) of a payload."""
        return (sum(self.counts(pieces)), *sparse_layout(pieces.numel, self.encoding, self.sends_indices))

    def nbytes(self, pieces):
        total, header, value, index = self._layout(pieces)
        return padded(header + (value + index) * total)

    def indices(self, x: torch.Tensor, pieces: Pieces, seed: int):
        raise NotImplementedError

    def encode(self, x, pieces, seed=0, scales=None):
        idx = self.indices(x, pieces, seed)
        total, header, value, index = self._layout(pieces)
        if header:
            idx = idx.sort().values
        out = torch.zeros(self.nbytes(pieces), dtype=torch.uint8, device=x.device)
        out[header:header + value * total] = x[idx].to(self._value_dtype).view(torch.uint8)
        at = header + value * total
        if index == 4:
            out[at:at + 4 * total] = idx.to(torch.int32).view(torch.uint8)
        elif index == 2:
            per_window = torch.zeros(header // 4, dtype=torch.int32, device=x.device)  # no bincount: no host sync
            per_window.index_add_(0, idx // INDEX_WINDOW, torch.ones_like(idx, dtype=torch.int32))
            out[:header] = per_window.view(torch.uint8)
            low = idx % INDEX_WINDOW  # as int16 with the same bits (torch < 2.3 has no uint16)
            low = torch.where(low < 2 ** 15, low, low - INDEX_WINDOW).to(torch.int16)
            out[at:at + 2 * total] = low.view(torch.uint8)
        return out

    def _entries(self, payload: torch.Tensor, pieces: Pieces, seed: int):
        """The values (fp32) a payload carries and their indices."""
        total, header, value, index = self._layout(pieces)
        values = from_bytes(payload, header, total, self._value_dtype).to(torch.float32)
        at = header + value * total
        if index == 4:
            return values, from_bytes(payload, at, total, torch.int32)
        if index == 2:
            per_window = from_bytes(payload, 0, header // 4, torch.int32).to(torch.int64)
            starts = torch.arange(0, pieces.numel, INDEX_WINDOW, dtype=torch.int64, device=payload.device)
            low = from_bytes(payload, at, total, torch.int16).to(torch.int64) % INDEX_WINDOW
            return values, starts.repeat_interleave(per_window, output_size=total) + low
        return values, self.indices(None, pieces, seed).to(payload.device)

    def _kernel_decodes(self, payload: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether the CPU kernel writes the entries (payloads with indices, CPU fp32 out)."""
        return self.sends_indices and kernels.usable(payload, out, triton=False)

    def decode(self, payload, pieces, seed=0, out=None):
        if out is None:
            out = torch.empty(pieces.numel, dtype=torch.float32, device=payload.device)
        if self._kernel_decodes(payload, out):
            return topk_decode(payload, sum(self.counts(pieces)), out, encoding=self.encoding)
        values, idx = self._entries(payload, pieces, seed)
        return out.zero_().index_put_((idx,), values)

    def decode_add(self, payload, pieces, acc, seed=0, tmp=None):
        """``acc += decode(payload)`` at the kept entries only (no full-size temporary; ``tmp`` unused)."""
        if self._kernel_decodes(payload, acc):
            return topk_decode(payload, sum(self.counts(pieces)), acc, encoding=self.encoding, accumulate=True)
        values, idx = self._entries(payload, pieces, seed)
        return acc.index_add_(0, idx, values)

    def describe(self):
        return {"name": self.name, "ratio": self.ratio, "k": self.k, "encoding": self.encoding}


class TopK(_Sparse):
    """Keep the ceil(ratio * d_b) largest-magnitude entries of every piece b.

    On CPU (where ``taciturn.kernels.usable``) both modes run the fused top-k kernel: exact,
    without a sort, and among entries as large as the k-th largest it keeps the lowest indices.
    Elsewhere ``mode="exact"`` (default) uses ``torch.topk``, and ``mode="sampled"`` estimates the
    threshold from a 1% random sample (seeded, so it is the same on every rank) set a little low,
    and runs the exact top-k only on the entries above it (all of them when the sample set it too
    high): the same entries as exact top-k, faster on large tensors (pieces of 100k elements or
    more). The two paths may keep different entries among equal magnitudes. ``encoding``: "fp32"
    or "bf16" (the module's two payload layouts; in "bf16" both paths write the same bytes).
    """

    def __init__(self, ratio=None, k=None, mode: str = "exact", encoding: str = "fp32"):
        super().__init__(ratio, k, "topk", encoding)
        if mode not in ("exact", "sampled"):
            raise ValueError(f"topk: mode={mode!r} must be 'exact' or 'sampled'")
        self.mode = mode

    def _options(self):
        return {**super()._options(), "mode": self.mode}

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
        return topk_encode(x, pieces, self.counts(pieces), out, h=h, alpha=alpha, update=update,
                           encoding=self.encoding)

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

    def __init__(self, ratio=None, k=None, seed: int = 0, encoding: str = "fp32"):
        super().__init__(ratio, k, "randk", encoding)
        self.seed = int(seed)

    def _options(self):
        return {**super()._options(), "seed": self.seed}

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
