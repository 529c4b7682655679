"""Compressor registry: one name per codec, used by JSON configs, presets and the CLI."""
from __future__ import annotations

import inspect
from typing import Callable, Union

from ..names import Registry
from .base import Compressor
from .identity import Cast
from .sign import BlockSign, ScaledSign
from .topk import RandK, TopK

_FACTORIES = {
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
_REGISTRY: Registry[Callable[..., Compressor]] = Registry("compressor", dict(sorted(_FACTORIES.items())))


def list_compressors():
    return _REGISTRY.names()


def compressor_name(spec: Union[str, Compressor]) -> str:
    """The registry name of a compressor name (any spelling) or of a ready Compressor."""
    return spec.name if isinstance(spec, Compressor) else _REGISTRY.canonical(spec)


def make_compressor(spec: Union[str, Compressor], **kwargs) -> Compressor:
    """A compressor from its name and keyword arguments, or one given as is."""
    if isinstance(spec, Compressor):
        if kwargs:
            raise ValueError(f"compressor options {sorted(kwargs)} given with a ready compressor {spec!r}")
        return spec
    key = _REGISTRY.canonical(spec)
    factory = _REGISTRY.get(key)
    allowed = set(inspect.signature(factory).parameters)
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"compressor {key!r} does not take {sorted(unknown)}; "
                         f"it takes {sorted(allowed) or 'no options'}")
    return factory(**kwargs)


__all__ = ["Compressor", "ScaledSign", "BlockSign", "TopK", "RandK", "Cast",
           "make_compressor", "compressor_name", "list_compressors"]
