"""Compressor registry: one name per codec, used by JSON configs, Horovod presets and the CLI."""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Union

from .base import Compressor
from .identity import Cast
from .sign import BlockSign, ScaledSign
from .topk import RandK, TopK

_REGISTRY: Dict[str, Callable[..., Compressor]] = {
    "scaled_sign": lambda: ScaledSign("l1"),
    "scaled_sign_l2": lambda: ScaledSign("l2"),
    "sign": lambda: ScaledSign("none"),
    "block_sign": BlockSign,
    "topk": TopK,
    "randk": RandK,
    "identity": lambda: Cast("identity"),
    "fp16": lambda: Cast("fp16"),
    "bf16": lambda: Cast("bf16"),
}


def list_compressors():
    return sorted(_REGISTRY)


def make_compressor(spec: Union[str, Compressor], **kwargs) -> Compressor:
    """A compressor from its name (case-insensitive) and keyword arguments, or one given as is."""
    if isinstance(spec, Compressor):
        if kwargs:
            raise ValueError(f"compressor options {sorted(kwargs)} given with a ready compressor {spec!r}")
        return spec
    key = str(spec).lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown compressor {spec!r}; valid names: {', '.join(list_compressors())}")
    factory = _REGISTRY[key]
    allowed = set(inspect.signature(factory).parameters)
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"compressor {key!r} does not take {sorted(unknown)}; "
                         f"it takes {sorted(allowed) or 'no options'}")
    return factory(**kwargs)


__all__ = ["Compressor", "ScaledSign", "BlockSign", "TopK", "RandK", "Cast",
           "make_compressor", "list_compressors"]
