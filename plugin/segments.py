"""A flat fp32 vector held as consecutive 1-D tensors, without copying them into one."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


class Segments:
    """A bucket's tensors read as one flat vector (element i of tensor k is element
    ``starts[k] + i``). Codecs that read it in place (``Compressor.reads_segments``) skip
    the copy of the bucket into one tensor; ``flat()`` makes that copy for the others."""

    def __init__(self, parts: Sequence[torch.Tensor], starts: Optional[Sequence[int]] = None,
                 device: Optional[torch.device] = None):
        self.parts: List[torch.Tensor] = list(parts)
        if starts is None:
            starts, total = [], 0
            for p in self.parts:
                starts.append(total)
                total += p.numel()
        self.starts: List[int] = list(starts)
        self._numel = self.starts[-1] + self.parts[-1].numel() if self.parts else 0
        self.device = device if device is not None else self.parts[0].device

    def numel(self) -> int:
        return self._numel

    def __getitem__(self, sl: slice) -> "Segments":
        lo, hi, _ = sl.indices(self._numel)
        parts, starts = [], []
        for p, start in zip(self.parts, self.starts):
            a, b = max(lo, start), min(hi, start + p.numel())
            if a < b:
                parts.append(p[a - start:b - start])
                starts.append(a - lo)
        return Segments(parts, starts, self.device)

    def flat(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One fp32 tensor of the elements (into ``out`` when given)."""
        if len(self.parts) == 1 and out is None:
            return self.parts[0].float()
        if not self.parts:
            return torch.empty(0, dtype=torch.float32, device=self.device)
        return torch.cat(self.parts, out=out if out is not None else
                         torch.empty(self._numel, dtype=torch.float32, device=self.device))
