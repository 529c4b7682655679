"""The optimizers: update rules over the one exchange, each with its preset."""
from .adaptive import AMSGrad, Adam, CDAdam, CompressedAMSGrad, EFAMSGrad, NaiveAMSGrad, SparsAMS
from .base import CompressedOptimizer
from .lamb import OneBitLamb
from .onebit import OneBitAdam
from .saef import SAEFSGD
from .sgd import SGD, DistEFSGD, EF21SGD, Signum
from .zeroone import ZeroOneAdam

__all__ = ["CompressedOptimizer", "CDAdam", "SparsAMS", "CompressedAMSGrad", "AMSGrad", "Adam",
           "EFAMSGrad", "NaiveAMSGrad", "DistEFSGD", "SGD", "EF21SGD", "Signum", "SAEFSGD", "OneBitAdam",
           "ZeroOneAdam", "OneBitLamb"]
