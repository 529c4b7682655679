"""Bucket layout: where tensors, compression units and two-way chunks sit in a flat buffer.

Glossary (the words for sub-ranges of one flat buffer, used so everywhere):

- bucket: consecutive tensors exchanged together as one flat fp32 vector;
- segment: one tensor's range inside a bucket (``Segments`` reads a bucket's tensors in place);
- unit: what the compressor scales as one (a block of ``block_size`` elements, or a whole tensor);
- chunk: rank j's share of a bucket in a two-way exchange, which rank j serves;
- piece: a unit, or the part of a unit inside one chunk: what is encoded with one scale;
- run: consecutive pieces of equal length, reduced as one ``(count, length)`` view (``Pieces``).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import torch

from .compressors import Compressor
from .wire import Pieces


def _cut_points(bounds: Sequence[int], total: int, n: int) -> List[int]:
    """n+1 chunk boundaries near k*total/n, each snapped to one of the allowed ``bounds``."""
    cuts = [0]
    for k in range(1, n):
        target = (k * total) // n
        i = bisect.bisect_left(bounds, target)
        candidates = [b for b in bounds[max(0, i - 1):i + 1]]
        best = min(candidates, key=lambda b: (abs(b - target), b)) if candidates else total
        cuts.append(max(best, cuts[-1]))
    cuts.append(total)
    return cuts


def _units_per_tensor(sizes: Sequence[int], unit_lengths: Sequence[int]) -> List[int]:
    """How many of the consecutive ``unit_lengths`` make up each non-empty tensor of ``sizes``."""
    counts, units = [], iter(unit_lengths)
    for size in sizes:
        if size > 0:
            count, covered = 0, 0
            while covered < size:
                covered, count = covered + next(units), count + 1
            counts.append(count)
    return counts


@dataclass
class BucketLayout:
    """Everything about one bucket that does not change between steps.

    ``sizes`` are the element counts of the bucket's tensors, in order. The worker compresses
    ``units`` (blocks or whole tensors). In two-way mode chunk j of the buffer is owned by
    rank j; ``chunk_pieces[j]`` are the units cut at the chunk's edges, and ``piece_unit[j]``
    maps each of those pieces back to its unit (the worker's scale of a sign codec is the
    whole unit's). ``chunk_nbytes`` is the padded payload size of every chunk, the same on all
    ranks, so the collectives move equal-sized buffers. ``tensor_units`` counts the units of
    every non-empty tensor, in order (the magnitude profile's floors are per tensor).
    """

    sizes: Tuple[int, ...]
    world_size: int
    compressor: Compressor
    numel: int = 0
    units: Pieces = field(init=False)
    tensor_units: torch.Tensor = field(init=False)
    cuts: List[int] = field(init=False)
    chunk_pieces: List[Pieces] = field(init=False)
    piece_unit: List[torch.Tensor] = field(init=False)
    chunk_nbytes: int = field(init=False)
    full_nbytes: int = field(init=False)

    def __post_init__(self):
        self.numel = sum(self.sizes)
        unit_lengths = self.compressor.units(self.sizes)
        self.units = Pieces.from_lengths(unit_lengths)
        self.tensor_units = torch.tensor(_units_per_tensor(self.sizes, unit_lengths), dtype=torch.long)
        unit_bounds = [0]
        for length in unit_lengths:
            unit_bounds.append(unit_bounds[-1] + length)
        if self.compressor.chunk_aligned:
            self.cuts = _cut_points(unit_bounds, self.numel, self.world_size)
        else:
            self.cuts = [(k * self.numel) // self.world_size for k in range(self.world_size + 1)]
        self.chunk_pieces, self.piece_unit = [], []
        for j in range(self.world_size):
            lo, hi = self.cuts[j], self.cuts[j + 1]
            lengths, owners = [], []
            u = max(0, bisect.bisect_right(unit_bounds, lo) - 1)
            while lo < hi:
                end = min(hi, unit_bounds[u + 1])
                lengths.append(end - lo)
                owners.append(u)
                lo, u = end, u + 1
            self.chunk_pieces.append(Pieces.from_lengths(lengths))
            self.piece_unit.append(torch.tensor(owners, dtype=torch.long))
        self.chunk_nbytes = max(self.compressor.nbytes(p) for p in self.chunk_pieces)
        self.full_nbytes = self.compressor.nbytes(self.units)

    def chunk(self, j: int) -> slice:
        return slice(self.cuts[j], self.cuts[j + 1])

    def chunk_numel(self, j: int) -> int:
        return self.cuts[j + 1] - self.cuts[j]
