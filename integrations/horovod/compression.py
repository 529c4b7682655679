"""Compression choices of the Horovod wrapper: Horovod's summable compressors, passed through to
Horovod's allreduce, and taciturn's presets (``taciturn.presets``), which only the wrapper runs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import horovod.torch as hvd
from horovod.torch.compression import Compressor as HorovodCompressor

from ...names import Registry
from ...presets import Preset, preset

_FP16_MAX = 65504.0


@dataclass(frozen=True)
class TaciturnCompression:
    """A taciturn compression preset: codec + worker and server feedback + direction.

    Stateful (errors, Markov sequences) and not summable, so it runs only inside
    ``taciturn.integrations.horovod.DistributedOptimizer``; Horovod's own optimizer, which
    sums what ``compress`` returns, gets a TypeError from ``compress``.
    Call it to change compressor options: ``Compression.cdadam(block_size=256)``.
    """

    name: str
    preset: Preset

    def __call__(self, **compressor_options) -> "TaciturnCompression":
        return TaciturnCompression(self.name, self.preset.configure(options=compressor_options))

    def describe(self) -> str:
        return f"{self.name}: {self.preset.describe()}"

    def compress(self, tensor):
        raise TypeError(self._refusal())

    def decompress(self, tensor, ctx):
        raise TypeError(self._refusal())

    def _refusal(self) -> str:
        why = ("Horovod 0.28.1 has no bfloat16 collectives" if self.preset.compressor == "bf16" else
               "it keeps per-rank error/Markov state and its payload (sign bits, top-k indices) cannot be "
               "summed, while hvd.DistributedOptimizer allreduces (sums) what Compressor.compress returns")
        return (f"Compression.{self.name} cannot run inside hvd.DistributedOptimizer: {why}. Use "
                f"taciturn.integrations.horovod.DistributedOptimizer(optimizer, named_parameters=..., "
                f"compression=Compression.{self.name}) instead, or a summable Horovod compressor "
                "(Compression.none, Compression.fp16, ScaledFP16Compressor) with hvd.DistributedOptimizer")


def _taciturn(name: str) -> TaciturnCompression:
    return TaciturnCompression(name, preset(name))


class ScaledFP16Compressor(HorovodCompressor):
    """fp16 on the wire with a fixed scale, for ``hvd.DistributedOptimizer`` or this module's.

    Summable: every rank multiplies by the same ``scale`` before the cast and divides after
    the sum, so Horovod's allreduce of the compressed tensors is exact up to fp16 rounding.
    A scale > 1 keeps small gradients out of fp16's subnormal range (below 6.1e-5); a scale
    < 1 (e.g. ``1 / hvd.size()``) keeps the sum of large ones below 65504. Values beyond the
    range saturate at +-65504 instead of becoming inf.
    """

    def __init__(self, scale: float = 1.0):
        scale = float(scale)
        if not (scale > 0 and scale != float("inf")):
            raise ValueError(f"ScaledFP16Compressor(scale={scale!r}): the scale must be a finite number > 0, "
                             "the same on every rank")
        self.scale = scale

    def compress(self, tensor):
        if not tensor.dtype.is_floating_point:
            return tensor, None
        return tensor.float().mul(self.scale).clamp_(-_FP16_MAX, _FP16_MAX).half(), tensor.dtype

    def decompress(self, tensor, ctx):
        if ctx is None:
            return tensor
        return tensor.float().div_(self.scale).to(ctx)

    def __repr__(self):
        return f"ScaledFP16Compressor(scale={self.scale!r})"


class Compression:
    """Compression choices for ``DistributedOptimizer`` (Horovod's names plus taciturn presets)."""

    #: fp32 allreduce (Horovod's NoneCompressor)
    none = hvd.Compression.none
    #: fp16 cast, allreduce, cast back (Horovod's FP16Compressor)
    fp16 = hvd.Compression.fp16
    #: bf16 both ways through alltoall/allgather, averaged in fp32 (Horovod has no bf16 allreduce)
    bf16 = _taciturn("bf16")
    #: CD-Adam's: Markov both ways, 1-bit signs with one l1 scale per 1024-element block
    cdadam = _taciturn("cdadam")
    #: dist-EF-blockSGD's: error feedback both ways (s = 1), blockwise scaled sign
    dist_ef_block_sign = _taciturn("dist_ef_block_sign")
    #: SPARS-AMS's: top-k (1%) with worker error feedback, one-way (all_gather of indices + values)
    sparsams_topk = _taciturn("sparsams_topk")
    #: error feedback both ways, one l1 scale per tensor
    ef_sign = _taciturn("ef_sign")
    #: CD-Adam's preset under the DDP hook's name (``markov_sign(block_size=None)``: one scale
    #: per tensor, the paper's form)
    markov_sign = _taciturn("markov_sign")

    @staticmethod
    def names() -> List[str]:
        return ["none", "fp16", "bf16", "cdadam", "dist_ef_block_sign", "sparsams_topk", "ef_sign", "markov_sign"]


_NAMES = Registry("compression", dict.fromkeys(Compression.names()))


def _resolve_compression(compression):
    if isinstance(compression, str):
        return getattr(Compression, _NAMES.canonical(compression))
    if isinstance(compression, TaciturnCompression):
        return compression
    if callable(getattr(compression, "compress", None)) and callable(getattr(compression, "decompress", None)):
        return compression
    raise TypeError(f"compression={compression!r}: pass a Compression.<name> ({', '.join(Compression.names())}) "
                    "or a Horovod Compressor (an object with compress(tensor) and decompress(tensor, ctx))")


def _describe_compression(compression) -> str:
    """The same text on every rank for the same compression (no object addresses)."""
    if isinstance(compression, TaciturnCompression):
        return compression.describe()
    if isinstance(compression, type) or type(compression).__repr__ is not object.__repr__:
        return repr(compression)
    return type(compression).__qualname__
