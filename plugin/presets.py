"""The compression presets: one record type, one table.

A ``Preset`` is the communication half of a method in ALGORITHMS.md: a compressor with its
options, the worker's and the server's feedback rule, and the direction (two-way: the chunk
owners recompress the average; one-way: every rank averages the workers' payloads). The
optimizers, the DDP hooks and the Horovod wrapper look their presets up here, under the names
their users know (aliases of one record, never copies); ``configure`` changes parts of one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

from .compressors import Compressor, compressor_name, make_compressor
from .compressors.sign import DEFAULT_BLOCK_SIZE
from .feedback import make_feedback
from .names import Registry

_KEEP = object()
_BLOCK = (("block_size", DEFAULT_BLOCK_SIZE),)


@dataclass(frozen=True)
class Preset:
    compressor: Union[str, Compressor]
    worker: str = "none"
    server: str = "none"
    two_way: bool = True
    options: Tuple[Tuple[str, object], ...] = ()
    description: str = ""

    def configure(self, compressor=None, *, block_size=_KEEP, ratio: Optional[float] = None,
                  k: Optional[int] = None, options: Optional[dict] = None, worker: Optional[str] = None,
                  server: Optional[str] = None, two_way: Optional[bool] = None) -> "Preset":
        """This preset with parts replaced.

        ``compressor`` (a name or a Compressor) replaces the compressor; the preset's options
        are kept only while the compressor stays. ``options`` (a dict) go to the compressor,
        ``block_size`` to ``block_sign`` (unless ``options`` sets it), ``ratio`` or ``k`` to
        ``topk``/``randk`` (replacing the preset's other one; 1 % when neither is set). The
        compressor checks its options now, with its own message."""
        parts = dict(worker=make_feedback(worker or self.worker).name,
                     server=make_feedback(server or self.server).name,
                     two_way=self.two_way if two_way is None else bool(two_way))
        if isinstance(compressor, Compressor):
            return replace(self, compressor=compressor, options=(), **parts)
        if compressor is None and isinstance(self.compressor, Compressor):
            return replace(self, **parts)
        name = compressor_name(self.compressor if compressor is None else compressor)
        given = dict(options or {})
        if ratio is not None:
            given["ratio"] = ratio
        if k is not None:
            given["k"] = k
        opts = dict(self.options) if name == self.compressor else {}
        if ("ratio" in given) != ("k" in given):
            opts.pop("k" if "ratio" in given else "ratio", None)
        opts.update(given)
        if name == "block_sign" and block_size is not _KEEP and "block_size" not in (options or {}):
            opts["block_size"] = block_size
        if name in ("topk", "randk") and "ratio" not in opts and "k" not in opts:
            opts["ratio"] = 0.01
        make_compressor(name, **opts)
        return replace(self, compressor=name, options=tuple(sorted(opts.items())), **parts)

    def make_compressor(self) -> Compressor:
        return make_compressor(self.compressor, **dict(self.options))

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        return (f"{self.compressor}({opts}) worker={self.worker} server={self.server} "
                f"{'two-way' if self.two_way else 'one-way'}")


PRESETS = Registry("preset", {
    "cdadam": Preset("block_sign", "markov", "markov", True, _BLOCK,
                     "CD-Adam's (and EF21's): Markov compression both ways, 1-bit signs with one l1 scale "
                     "per 1024-element block"),
    "dist_ef_block_sign": Preset("block_sign", "ef", "ef", True, _BLOCK,
                                 "dist-EF-blockSGD's: error feedback both ways, blockwise scaled sign"),
    "ef_sign": Preset("scaled_sign", "ef", "ef", True, (),
                      "dist-EF-SGD's: error feedback both ways, one l1 scale per tensor"),
    "sparsams_topk": Preset("topk", "ef", "none", False, (("ratio", 0.01),),
                            "SPARS-AMS's: top-k (1 %) with worker error feedback, one-way (all_gather)"),
    "saef_topk": Preset("topk", "ef", "ef", True, (("ratio", 0.01),),
                        "SAEF's: top-k (1 %) of the model difference with error feedback both ways"),
    "naive_block_sign": Preset("block_sign", "none", "none", True, _BLOCK,
                               "blockwise scaled sign both ways without feedback (a baseline)"),
    "sign_vote": Preset("sign", "none", "none", True, (),
                        "signum's: 1-bit signs without scale, the chunk owner's majority vote sent back"),
    "identity": Preset("identity", "none", "none", True, (),
                       "fp32 both ways through the same path (an uncompressed, byte-counted baseline)"),
    "bf16": Preset("bf16", "none", "none", True, (), "bf16 both ways, averaged in fp32"),
}, aliases={"markov_sign": "cdadam", "block_sign": "dist_ef_block_sign", "topk": "sparsams_topk"})


def preset(name) -> Preset:
    """The preset called ``name`` (any spelling of it or of an alias)."""
    return PRESETS.get(name)
