"""The compressor contract: a pure encode/decode pair over the pieces of a flat segment."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..wire import Pieces


class Compressor:
    """Base class. Subclasses are stateless: state (errors, Markov sequences) lives in feedback.

    ``encode(x, pieces, seed)`` turns a flat fp32 segment into one contiguous uint8 payload of
    exactly ``nbytes(pieces)`` bytes; ``decode(payload, pieces, seed)`` gives back C(x) as fp32.
    Decoding the same payload is bit-identical on every rank. ``seed`` matters only to random
    compressors; every rank passes the same one.
    """

    name: str = ""
    #: True when two-way chunks must be cut on unit boundaries (blockwise sign). Otherwise a
    #: unit (a whole tensor) may be split between chunks and each piece is compressed alone.
    chunk_aligned: bool = False
    #: Whether the worker's scale may span a whole unit split between chunks (sign codecs).
    unit_scales: bool = False
    #: Whether encode_fused / fused_scales take a ``taciturn.segments.Segments`` as x (the
    #: tensors of a bucket read in place; no piece straddles two of them).
    reads_segments: bool = False
    #: The EMA decay of the magnitude profile (``taciturn.profile``) an exchange keeps for this
    #: codec and decodes with; None: no profile.
    profile = None
    #: With a profile: the EMA decay of the result's mean that the profile's squares are taken
    #: around (``taciturn.profile``, detrended); None: the squares of the result itself.
    profile_detrend = None

    def units(self, sizes: Sequence[int]) -> List[int]:
        """Unit lengths for consecutive tensors of the given sizes (default: one per tensor)."""
        return [s for s in sizes if s > 0]

    def bind(self, numel: int) -> "Compressor":
        """This codec for a buffer of ``numel`` elements in all (an absolute top-k ``k`` becomes
        a ratio of it). Default: itself."""
        return self

    def nbytes(self, pieces: Pieces) -> int:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, pieces: Pieces, seed: int = 0,
               scales: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, payload: torch.Tensor, pieces: Pieces, seed: int = 0,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def decode_add(self, payload: torch.Tensor, pieces: Pieces, acc: torch.Tensor, seed: int = 0,
                   tmp: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``acc += decode(payload)`` (``tmp``: optional scratch the size of ``acc``); returns acc."""
        return acc.add_(self.decode(payload, pieces, seed, out=tmp))

    def fuses(self, *tensors: Optional[torch.Tensor]) -> bool:
        """Whether ``encode_fused`` runs a fused kernel on these tensors (else its torch ops)."""
        return False

    def encode_fused(self, x: torch.Tensor, pieces: Pieces, fused, scales: Optional[torch.Tensor] = None,
                     seed: int = 0) -> torch.Tensor:
        """``encode(y)`` of y = x + alpha*h, with the feedback state h updated from C(y) as
        ``fused`` (a ``taciturn.feedback.FeedbackStep``) says. Here in torch ops; codecs with a fused
        kernel do it in one pass over memory without full-size temporaries."""
        y = fused.input(x)
        payload = self.encode(y, pieces, seed, scales)
        if fused.update != "none":
            fused.apply(y, self.decode(payload, pieces, seed))
        return payload

    def decode_mean(self, payloads: Sequence[torch.Tensor], pieces: Pieces, seed: int,
                    out: torch.Tensor) -> torch.Tensor:
        """out = (decode(payloads[0]) + ... + decode(payloads[n-1])) / n, added in that order."""
        self.decode(payloads[0], pieces, seed, out=out)
        for p in payloads[1:]:
            self.decode_add(p, pieces, out, seed)
        return out.div_(len(payloads))

    def serve_fused(self, payloads: torch.Tensor, pieces: Pieces, acc: Optional[torch.Tensor], fused,
                    scratch: torch.Tensor, seeds=(0, 0)) -> torch.Tensor:
        """The server phase of a two-way chunk: a = the mean of the workers' ``payloads`` (rows,
        decoded with ``seeds[0]``); x = a, or ``acc += a`` and x = acc; then
        ``encode_fused(x, pieces, fused, seed=seeds[1])``. ``scratch`` (``pieces.numel`` fp32)
        may hold a. Codecs with a fused kernel do it in one pass."""
        a = self.decode_mean(payloads, pieces, seeds[0], scratch)
        x = acc.add_(a) if acc is not None else a
        return self.encode_fused(x, pieces, fused, seed=seeds[1])

    def compress(self, x: torch.Tensor, pieces: Optional[Pieces] = None, seed: int = 0) -> torch.Tensor:
        """C(x) for a flat tensor: decode(encode(x)) (what every receiver reconstructs)."""
        flat = x.reshape(-1).float()
        pieces = pieces or Pieces.from_lengths(self.units([flat.numel()]))
        return self.decode(self.encode(flat, pieces, seed), pieces, seed).view_as(x)

    def describe(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({args})"
