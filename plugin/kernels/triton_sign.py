"""Fused Triton kernels of the sign codecs, for CUDA tensors (``taciturn.kernels`` dispatches here).

The same contract as the C++ kernels of ``sign.cpp`` (the functions of ``taciturn.kernels``):
the payload the torch path of ``taciturn.compressors.ScaledSign`` writes, fp32 scales first, then
one bit per element (y >= 0; element i on bit i % 8 of byte i / 8, ``taciturn.wire.pack_signs``),
and the feedback state h updated in the same pass. One program per piece of at most ``_ITEM``
elements: it sums |y| (or y^2) over the piece, a tile of ``_BLOCK`` elements at a time (fp32
within a tile, fp64 across tiles), then makes a second pass over the piece, still in cache, for
the signs and h. A longer piece is cut into items of ``_ITEM`` elements: their partial sums, then
the scales, then the signs, one launch each. Tiles start on multiples of 32 elements, so a
program builds whole 32-bit words of signs: it stores a word that lies inside its item and ORs
(atomically) one that it shares with a neighbour, into zeroed bits. Payloads are read and
written as int32 words (their rows a multiple of 4 bytes long).

x is a tensor, fp32 or bf16 (read as fp32), or a ``Segments`` (a bucket's fp32 tensors, read in
place through a table of addresses, one per item); h, acc and the decoded values are fp32. Every element rounds
as the torch path's ops do (``triton_ops``): the signs, h and the decoded values are bit for bit
those of the torch path given the same scales; a scale is the piece's sum in another order, so it
may differ from torch's in its last bits (the same on every rank for the same pieces).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..segments import Segments
from ..wire import Pieces, packed_len
from .triton_ops import div_scalar, launch, on_cuda, reciprocal

_SCALES = {"none": 0, "l1": 1, "l2": 2}
_UPDATES = {"none": 0, "markov": 1, "ef": 2}
_BLOCK = 1024  # elements per tile (a multiple of 32)
_ITEM = 1 << 14  # longest run of a piece that one program takes


class _Layout(NamedTuple):
    """Pieces cut into items of at most ``_ITEM`` elements, the work of one program each.
    ``items``: (3, n_items) int64, the piece, start and end of every item; ``spans``: (2, count),
    the first item and the number of items of every piece; ``long``: whether a piece has more
    than one item."""

    items: torch.Tensor
    n_items: int
    spans: torch.Tensor
    long: bool


@functools.lru_cache(maxsize=1024)
def _layout(pieces: Pieces, device: torch.device) -> _Layout:
    items, spans, index, base = [], [], 0, 0
    for start, count, length in pieces.runs:
        cuts = -(-length // _ITEM)  # items per piece
        j = torch.arange(count * cuts, dtype=torch.int64)
        k, cut = j // cuts, j % cuts
        lo = start + k * length + cut * _ITEM
        items.append(torch.stack([index + k, lo, torch.minimum(lo + _ITEM, start + (k + 1) * length)]))
        spans.append(torch.stack([base + torch.arange(count, dtype=torch.int64) * cuts,
                                  torch.full((count,), cuts, dtype=torch.int64)]))
        index, base = index + count, base + count * cuts
    table = lambda parts, rows: (torch.cat(parts, dim=1) if parts else torch.zeros(rows, 1, dtype=torch.int64))
    return _Layout(table(items, 3).contiguous().to(device), base, table(spans, 2).contiguous().to(device),
                   base > index)


@functools.lru_cache(maxsize=1024)
def _item_parts(pieces: Pieces, device: torch.device, starts: Tuple[int, ...]) -> torch.Tensor:
    """The part (of a ``Segments`` whose parts start at ``starts``) that holds every item."""
    items = _layout(pieces, device).items
    return torch.searchsorted(torch.tensor(starts, dtype=torch.int64, device=device), items[1], right=True) - 1


def _source(x, pieces: Pieces):
    """(x as the kernels read it, whether it is a table of addresses): a tensor itself; a
    ``Segments`` of one part that part; of several fp32 parts, read in place, the address per item
    of element 0 of the part that holds it (items never straddle parts); else its fp32 copy."""
    if not isinstance(x, Segments):
        return x, False
    if len(x.parts) == 1:
        return x.parts[0], False
    if any(p.dtype != torch.float32 for p in x.parts):
        return x.flat(), False
    origins = torch.tensor([p.data_ptr() - 4 * s for p, s in zip(x.parts, x.starts)], dtype=torch.int64)
    return origins.to(x.device)[_item_parts(pieces, x.device, tuple(x.starts))], True


def _words(payload: torch.Tensor, head: int, numel: int) -> torch.Tensor:
    """The payload (one, or one per row) as int32 words: scales at word p, bits from word head / 4."""
    size = head + 4 * -(-packed_len(numel) // 4)
    if payload.dtype != torch.uint8 or not payload.is_contiguous() or payload.shape[-1] < size \
            or payload.shape[-1] % 4 and payload.dim() > 1 or payload.data_ptr() % 4:
        raise ValueError(f"taciturn.kernels: the Triton kernels want contiguous, 4-byte aligned uint8 payloads "
                         f"of at least {size} bytes (rows of a multiple of 4 bytes)")
    return (payload[:size] if payload.dim() == 1 else payload).view(torch.int32)


@triton.jit
def _tile(t0, start, end, BLOCK: tl.constexpr):
    """Element indices of the tile at t0 and the mask of those inside [start, end)."""
    idx = t0 + tl.arange(0, BLOCK)
    return idx, (idx >= start) & (idx < end)


@triton.jit
def _item(items_ptr, n_items):
    """(piece, start, end) of this program's item."""
    i = tl.program_id(0)
    return tl.load(items_ptr + i), tl.load(items_ptr + n_items + i), tl.load(items_ptr + 2 * n_items + i)


@triton.jit
def _x(x_ptr, SEGMENTS: tl.constexpr):
    """The pointer to x's element 0: x_ptr, or (SEGMENTS) the address that x_ptr holds for this item."""
    if SEGMENTS:
        x_ptr = tl.load(x_ptr + tl.program_id(0)).to(tl.pointer_type(tl.float32))
    return x_ptr


@triton.jit
def _input(x_ptr, h_ptr, alpha, idx, mask, HAS_H: tl.constexpr):
    """y = x + alpha * h (torch's x.add(h, alpha=alpha): one rounding), or y = x."""
    y = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_H:
        y = tl.fma(tl.load(h_ptr + idx, mask=mask, other=0.0), alpha, y)
    return y


@triton.jit
def _sum(x_ptr, h_ptr, alpha, start, end, SCALE: tl.constexpr, HAS_H: tl.constexpr, BLOCK: tl.constexpr):
    """The fp64 sum of |y| (SCALE 1) or y^2 (SCALE 2) over [start, end)."""
    total = tl.zeros((), dtype=tl.float64)
    for t0 in range(start // 32 * 32, end, BLOCK):
        idx, mask = _tile(t0, start, end, BLOCK)
        y = _input(x_ptr, h_ptr, alpha, idx, mask, HAS_H)
        if SCALE == 1:
            y = tl.abs(y)
        else:
            y = y * y
        total += tl.sum(y, axis=0).to(tl.float64)
    return total


@triton.jit
def _scale(total, length, SCALE: tl.constexpr):
    """mean |y| (SCALE 1) or sqrt(mean y^2) (SCALE 2) in fp32 from the fp64 sum over the piece."""
    mean = total / length
    if SCALE == 2:
        mean = tl.sqrt(mean)  # fp64: correctly rounded
    return mean.to(tl.float32)


@triton.jit
def _partial_kernel(x_ptr, h_ptr, alpha, items_ptr, n_items, out_ptr, SCALE: tl.constexpr, HAS_H: tl.constexpr,
                    SEGMENTS: tl.constexpr, BLOCK: tl.constexpr):
    _, start, end = _item(items_ptr, n_items)
    tl.store(out_ptr + tl.program_id(0), _sum(_x(x_ptr, SEGMENTS), h_ptr, alpha, start, end, SCALE, HAS_H, BLOCK))


@triton.jit
def _combine_kernel(partial_ptr, items_ptr, n_items, spans_ptr, count, out_ptr, SCALE: tl.constexpr):
    p = tl.program_id(0)
    first = tl.load(spans_ptr + p)
    last = first + tl.load(spans_ptr + count + p) - 1
    total = tl.zeros((), dtype=tl.float64)
    for i in range(first, last + 1):  # in order: the scale does not depend on the launch
        total += tl.load(partial_ptr + i)
    length = tl.load(items_ptr + 2 * n_items + last) - tl.load(items_ptr + n_items + first)
    tl.store(out_ptr + p, _scale(total, length, SCALE))


@triton.jit
def _encode_kernel(x_ptr, h_ptr, alpha, items_ptr, n_items, scales_ptr, words_ptr, head_words,
                   SCALE: tl.constexpr, GIVEN: tl.constexpr, HAS_H: tl.constexpr, UPDATE: tl.constexpr,
                   SEGMENTS: tl.constexpr, BLOCK: tl.constexpr):
    """The scale of the piece (word p of the head), the signs of y over the item and h updated:
    UPDATE 1 (Markov) h += C(y), 2 (EF) h = y - C(y), 0 h untouched."""
    p, start, end = _item(items_ptr, n_items)
    x_ptr = _x(x_ptr, SEGMENTS)
    if SCALE == 0:
        s = tl.full((), 1.0, tl.float32)
    else:
        if GIVEN:
            s = tl.load(scales_ptr + p)
        else:  # the item is the whole piece
            s = _scale(_sum(x_ptr, h_ptr, alpha, start, end, SCALE, HAS_H, BLOCK), end - start, SCALE)
        tl.store(words_ptr + p, s.to(tl.int32, bitcast=True))
    for t0 in range(start // 32 * 32, end, BLOCK):
        idx, mask = _tile(t0, start, end, BLOCK)
        y = _input(x_ptr, h_ptr, alpha, idx, mask, HAS_H)
        positive = y >= 0
        c = tl.where(positive, s, -s)
        if UPDATE == 1:
            tl.store(h_ptr + idx, tl.load(h_ptr + idx, mask=mask) + c, mask=mask)
        elif UPDATE == 2:
            tl.store(h_ptr + idx, y - c, mask=mask)
        bits = (positive & mask).to(tl.int32) << (idx & 31).to(tl.int32)
        word = tl.sum(tl.reshape(bits, (BLOCK // 32, 32)), axis=1)  # distinct bits: the sum is their OR
        w = t0 // 32 + tl.arange(0, BLOCK // 32)
        inside = (w * 32 >= start) & (w * 32 + 32 <= end)
        shared = (w * 32 < end) & (w * 32 + 32 > start) & ~inside
        tl.store(words_ptr + head_words + w, word, mask=inside)
        tl.atomic_or(words_ptr + head_words + w, word, mask=shared, sem="relaxed")


@triton.jit
def _decoded(words_ptr, row, p, idx, mask, head_words, SCALE: tl.constexpr):
    """C of the elements idx of piece p from the payload at words_ptr + row."""
    if SCALE == 0:
        s = tl.full((), 1.0, tl.float32)
    else:
        s = tl.load(words_ptr + row + p).to(tl.float32, bitcast=True)
    word = tl.load(words_ptr + row + head_words + idx // 32, mask=mask, other=0)
    return tl.where(((word >> (idx & 31).to(tl.int32)) & 1) != 0, s, -s)


@triton.jit
def _decode_kernel(words_ptr, items_ptr, n_items, out_ptr, head_words, SCALE: tl.constexpr,
                   ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    p, start, end = _item(items_ptr, n_items)
    for t0 in range(start // 32 * 32, end, BLOCK):
        idx, mask = _tile(t0, start, end, BLOCK)
        c = _decoded(words_ptr, 0, p, idx, mask, head_words, SCALE)
        if ACCUMULATE:
            c = tl.load(out_ptr + idx, mask=mask) + c
        tl.store(out_ptr + idx, c, mask=mask)


@triton.jit
def _mean_kernel(rows_ptr, n, row_words, n_float, inv_n, items_ptr, n_items, acc_ptr, h_ptr, alpha, y_ptr,
                 head_words, SCALE: tl.constexpr, HAS_ACC: tl.constexpr, HAS_H: tl.constexpr,
                 RECIPROCAL: tl.constexpr, BLOCK: tl.constexpr):
    """y = a + alpha * h, a the mean of the n rows' decoded values (acc += a and a = acc with HAS_ACC)."""
    p, start, end = _item(items_ptr, n_items)
    for t0 in range(start // 32 * 32, end, BLOCK):
        idx, mask = _tile(t0, start, end, BLOCK)
        a = _decoded(rows_ptr, 0, p, idx, mask, head_words, SCALE)
        for j in range(1, n):  # added in row order, then divided, as Compressor.decode_mean
            a += _decoded(rows_ptr, j * row_words, p, idx, mask, head_words, SCALE)
        a = div_scalar(a, n_float, inv_n, RECIPROCAL)
        if HAS_ACC:
            a = tl.load(acc_ptr + idx, mask=mask) + a
            tl.store(acc_ptr + idx, a, mask=mask)
        if HAS_H:
            a = tl.fma(tl.load(h_ptr + idx, mask=mask), alpha, a)
        tl.store(y_ptr + idx, a, mask=mask)


def piece_scales(x, pieces: Pieces, scale: str, h: Optional[torch.Tensor] = None,
                 alpha: float = 0.0) -> torch.Tensor:
    """``taciturn.kernels.sign_scales``."""
    if scale == "none" or not pieces.count:
        return torch.ones(pieces.count, dtype=torch.float32, device=x.device)
    layout, (source, segments) = _layout(pieces, x.device), _source(x, pieces)
    partial = torch.empty(layout.n_items, dtype=torch.float64, device=x.device)
    launch(_partial_kernel, (layout.n_items,), source, h, alpha, layout.items, layout.n_items, partial,
           SCALE=_SCALES[scale], HAS_H=h is not None and alpha != 0, SEGMENTS=segments, BLOCK=_BLOCK)
    out = torch.empty(pieces.count, dtype=torch.float32, device=x.device)
    launch(_combine_kernel, (pieces.count,), partial, layout.items, layout.n_items, layout.spans, pieces.count, out,
           SCALE=_SCALES[scale])
    return out


def encode(x, pieces: Pieces, scale: str, payload: torch.Tensor, head: int, *,
           h: Optional[torch.Tensor] = None, alpha: float = 0.0, update: str = "none",
           scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``taciturn.kernels.sign_encode``."""
    words = _words(payload, head, pieces.numel)
    payload[head:head + packed_len(pieces.numel)].zero_()
    if not pieces.count:
        return payload
    layout = _layout(pieces, x.device)
    if scales is not None:
        scales = scales.to(device=x.device, dtype=torch.float32).contiguous()
    elif layout.long and scale != "none":
        scales = piece_scales(x, pieces, scale, h, alpha)
    source, segments = _source(x, pieces)
    launch(_encode_kernel, (layout.n_items,), source, h, alpha, layout.items, layout.n_items, scales, words,
           head_words=head // 4, SCALE=_SCALES[scale], GIVEN=scales is not None, HAS_H=h is not None and alpha != 0,
           UPDATE=_UPDATES[update], SEGMENTS=segments, BLOCK=_BLOCK)
    return payload


def decode(payload: torch.Tensor, pieces: Pieces, scale: str, head: int, out: torch.Tensor,
           accumulate: bool = False) -> torch.Tensor:
    """``taciturn.kernels.sign_decode`` into ``out``."""
    if pieces.count:
        layout = _layout(pieces, out.device)
        launch(_decode_kernel, (layout.n_items,), _words(payload, head, pieces.numel), layout.items, layout.n_items,
               out, head_words=head // 4, SCALE=_SCALES[scale], ACCUMULATE=accumulate, BLOCK=_BLOCK)
    return out


def serve(payloads: torch.Tensor, pieces: Pieces, scale: str, head: int, out: torch.Tensor, *,
          acc: Optional[torch.Tensor] = None, h: Optional[torch.Tensor] = None, alpha: float = 0.0,
          update: str = "none") -> torch.Tensor:
    """``taciturn.kernels.sign_serve`` (any piece length): y into a scratch tensor, then its payload."""
    rows = _words(payloads, head, pieces.numel)
    y = torch.empty(pieces.numel, dtype=torch.float32, device=out.device)
    if pieces.count:
        layout, n = _layout(pieces, out.device), payloads.shape[0]
        launch(_mean_kernel, (layout.n_items,), rows, n, rows.shape[1], float(n), reciprocal(n), layout.items,
               layout.n_items, acc, h, alpha, y, head_words=head // 4, SCALE=_SCALES[scale], HAS_ACC=acc is not None,
               HAS_H=h is not None and alpha != 0, RECIPROCAL=on_cuda(out), BLOCK=_BLOCK)
    return encode(y, pieces, scale, out, head, h=h, update=update)
