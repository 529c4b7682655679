"""Casts: fp32 (identity), fp16 and bf16. Summable, so Horovod's own allreduce can carry them."""
from __future__ import annotations

import torch

from ..wire import from_bytes, padded
from .base import Compressor

_DTYPES = {"identity": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Cast(Compressor):
    """C(x) = x cast to ``dtype`` and back. ``identity`` (fp32) is exact: delta = 1."""

    def __init__(self, name: str = "identity"):
        self.name = name
        self.dtype = _DTYPES[name]
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()

    def nbytes(self, pieces):
        return padded(self.itemsize * pieces.numel)

    def encode(self, x, pieces, seed=0, scales=None):
        out = torch.zeros(self.nbytes(pieces), dtype=torch.uint8, device=x.device)
        out[:self.itemsize * pieces.numel] = x.to(self.dtype).view(torch.uint8)
        return out

    def decode(self, payload, pieces, seed=0, out=None):
        values = from_bytes(payload, 0, pieces.numel, self.dtype)
        if out is None:
            return values.to(torch.float32)
        return out.copy_(values)
