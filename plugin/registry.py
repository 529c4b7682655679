"""Optimizer registry: small records behind ``create_optimizer`` and ``list_optimizers``.

Names follow the one rule of ``taciturn.names`` (case, ``_`` and ``-`` do not count), so the
JSON ``type`` strings (``"CDAdam"``, ``"OneBitAdam"``) and snake case (``"onebit_adam"``) both work.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import List

from . import optim
from .names import Registry


@dataclass(frozen=True)
class OptimizerRecord:
    name: str
    cls: type
    description: str
    aliases: tuple = ()


_RECORDS: List[OptimizerRecord] = [
    OptimizerRecord("CDAdam", optim.CDAdam, "CD-Adam: Markov sign compression both ways + AMSGrad, no warm-up",
                    ("cd_adam",)),
    OptimizerRecord("SparsAMS", optim.SparsAMS, "SPARS-AMS: top-k with worker error feedback (one-way) + AMSGrad",
                    ("spars_ams",)),
    OptimizerRecord("DistEFSGD", optim.DistEFSGD, "dist-EF-SGD / blockSGDM: two-way EF, lr-ratio rescaled errors",
                    ("dist_ef_sgd", "dist_ef_blocksgd", "dist_ef_blocksgdm")),
    OptimizerRecord("SAEFSGD", optim.SAEFSGD, "SAEF: step-ahead error feedback on the model difference",
                    ("saef",)),
    OptimizerRecord("OneBitAdam", optim.OneBitAdam, "1-bit Adam (Tang et al.), warm-up 'adam' or 'cdadam'",
                    ("onebit_adam", "1bitadam")),
    OptimizerRecord("ZeroOneAdam", optim.ZeroOneAdam,
                    "0/1 Adam (DeepSpeed's): thinning variance updates, then local steps between 1-bit syncs; "
                    "warm-up 'adam' or 'cdadam'", ("zero_one_adam", "01adam", "zoadam")),
    OptimizerRecord("OneBitLamb", optim.OneBitLamb,
                    "1-bit LAMB (DeepSpeed's): LAMB warm-up, then frozen variance and coefficients, 1-bit momentum; "
                    "warm-up 'lamb' or 'cdadam'", ("onebit_lamb", "1bitlamb")),
    OptimizerRecord("AMSGrad", optim.AMSGrad, "baseline: uncompressed AMSGrad (CD-Adam's update rule)"),
    OptimizerRecord("Adam", optim.Adam, "baseline: uncompressed Adam (torch's form)"),
    OptimizerRecord("SGD", optim.SGD, "baseline: uncompressed SGD(M)"),
    OptimizerRecord("EFAMSGrad", optim.EFAMSGrad, "baseline: error feedback + AMSGrad", ("ef_amsgrad",)),
    OptimizerRecord("NaiveAMSGrad", optim.NaiveAMSGrad, "baseline: compression without feedback + AMSGrad",
                    ("naive_amsgrad",)),
    OptimizerRecord("CompressedAMSGrad", optim.CompressedAMSGrad,
                    "AMSGrad over any compressor/feedback/direction (e.g. Markov one-way)"),
    OptimizerRecord("EF21SGD", optim.EF21SGD, "baseline: EF21 two-way (Markov) + SGD", ("ef21_sgd", "ef21")),
    OptimizerRecord("Signum", optim.Signum, "baseline: signum with majority vote", ("signsgd",)),
]

BASE_KWARGS = tuple(n for n, p in inspect.signature(optim.CompressedOptimizer.__init__).parameters.items()
                    if p.kind == p.KEYWORD_ONLY)


_OPTIMIZERS = Registry("taciturn optimizer", {r.name: r for r in _RECORDS},
                       aliases={alias: r.name for r in _RECORDS for alias in r.aliases})


def list_optimizers() -> List[str]:
    return _OPTIMIZERS.names()


def is_taciturn_optimizer(name) -> bool:
    return name in _OPTIMIZERS


def get_record(name: str) -> OptimizerRecord:
    return _OPTIMIZERS.get(name)


def valid_kwargs(cls) -> List[str]:
    names = [n for n, p in inspect.signature(cls.__init__).parameters.items()
             if n not in ("self", "params") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return names + [k for k in BASE_KWARGS if k not in names]


def check_kwargs(name: str, kwargs: dict) -> OptimizerRecord:
    """The record for ``name``; raises naming every unknown keyword and the valid ones."""
    rec = get_record(name)
    valid = valid_kwargs(rec.cls)
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{rec.name} does not take {', '.join(hints)}; valid parameters: {', '.join(valid)}")
    return rec


def create_optimizer(name: str, params, **kwargs):
    """Build the taciturn optimizer called ``name`` (case-insensitive) over ``params``."""
    return check_kwargs(name, kwargs).cls(params, **kwargs)
