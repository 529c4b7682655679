"""Wire format: bit packing, byte views and the piece layout of a flat segment.

Everything here is plain torch tensor ops, so it runs unchanged on CPU and CUDA.

A payload is one contiguous ``uint8`` tensor. Compressors put their 4-byte fields (scales,
values, indices) first and the packed sign bits last, so every field starts 4-byte aligned
and can be viewed in place; payload sizes are padded to a multiple of ``ALIGN`` bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

ALIGN = 8

# Multiplying 8 little-endian bytes, each 0 or 1, by this constant gathers them into the top
# byte of the product with byte i landing on bit i (bit 0 = first element).
_GATHER = 0x0102040810204080
_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


#: 16-bit indices (top-k's "bf16" encoding) count from the start of their window of this many elements
INDEX_WINDOW = 1 << 16


def index_windows(numel: int) -> int:
    """The 16-bit index windows of a segment of ``numel`` elements."""
    return -(-numel // INDEX_WINDOW)


#: the sparse payloads' encodings: fp32 values + int32 indices, or bf16 values + 16-bit indices
#: (one int32 count per index window in front)
SPARSE_ENCODINGS = ("fp32", "bf16")


def sparse_layout(numel: int, encoding: str, sends_indices: bool = True) -> tuple:
    """(bytes of the header, of one value, of one index) of a sparse payload of a segment of
    ``numel`` elements in ``encoding`` (no indices: the receivers draw them from a shared seed)."""
    if encoding == "fp32":
        return 0, 4, 4 if sends_indices else 0
    if not sends_indices:
        return 0, 2, 0
    return 4 * index_windows(numel), 2, 2


def padded(nbytes: int) -> int:
    """``nbytes`` rounded up to the payload alignment."""
    return -(-nbytes // ALIGN) * ALIGN


def packed_len(numel: int) -> int:
    """Bytes that ``pack_signs`` produces for ``numel`` elements."""
    return -(-numel // 8)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x >= 0`` (sign(0) = +1) into bits, 8 per byte, element i on bit i % 8."""
    n = x.numel()
    nbytes = packed_len(n)
    bits = torch.zeros(nbytes * 8, dtype=torch.uint8, device=x.device)
    torch.ge(x.reshape(-1), 0, out=bits[:n].view(torch.bool))
    words = bits.view(torch.int64)
    return ((words * _GATHER) >> 56).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_signs``: a bool tensor of ``numel`` elements (True = non-negative)."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    return packed.reshape(-1, 1).bitwise_and(weights).ne(0).reshape(-1)[:numel]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (no copy)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(buf: torch.Tensor, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` elements of ``dtype`` read from ``buf[offset:]``, a view when aligned."""
    size = torch.empty((), dtype=dtype).element_size()
    raw = buf[offset:offset + count * size]
    if (raw.storage_offset() % size) != 0:
        raw = raw.clone()
    return raw.view(dtype)


@dataclass(frozen=True)
class Pieces:
    """How a flat segment of ``numel`` elements splits into compression pieces.

    ``runs`` groups consecutive pieces of equal length as ``(start, count, length)``, so a
    per-piece reduction is one vectorised op on a ``(count, length)`` view per run (one run for
    all full blocks of a tensor, one for its shorter tail), never a loop over blocks.
    """

    numel: int
    runs: Tuple[Tuple[int, int, int], ...]

    @property
    def count(self) -> int:
        return sum(c for _, c, _ in self.runs)

    def lengths(self) -> List[int]:
        return [length for _, c, length in self.runs for _ in range(c)]

    @staticmethod
    def from_lengths(lengths: Sequence[int]) -> "Pieces":
        runs: List[Tuple[int, int, int]] = []
        start = 0
        for length in lengths:
            if length <= 0:
                continue
            if runs and runs[-1][2] == length:
                s, c, _ = runs[-1]
                runs[-1] = (s, c + 1, length)
            else:
                runs.append((start, 1, length))
            start += length
        return Pieces(start, tuple(runs))

    def reduce(self, x: torch.Tensor, fn) -> torch.Tensor:
        """Apply ``fn(view (count, length)) -> (count,)`` to every run; one value per piece."""
        if not self.runs:
            return x.new_zeros(0)
        parts = [fn(x[s:s + c * n].view(c, n)) for s, c, n in self.runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def expand_into(self, out: torch.Tensor, per_piece: torch.Tensor, fn) -> torch.Tensor:
        """Write ``fn(out_view (count, length), values (count, 1))`` into ``out`` run by run."""
        i = 0
        for s, c, n in self.runs:
            fn(out[s:s + c * n].view(c, n), per_piece[i:i + c].unsqueeze(1))
            i += c
        return out
