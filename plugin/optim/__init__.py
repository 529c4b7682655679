"""The optimizers: presets over the one compressed pipeline."""
from .adaptive import AMSGrad, Adam, CDAdam, CompressedAMSGrad, EFAMSGrad, NaiveAMSGrad, SparsAMS
from .base import CompressedOptimizer, PipelineSpec
from .onebit import OneBitAdam
from .saef import SAEFSGD
from .sgd import SGD, DistEFSGD, EF21SGD, Signum

__all__ = ["CompressedOptimizer", "PipelineSpec", "CDAdam", "SparsAMS", "CompressedAMSGrad", "AMSGrad", "Adam",
           "EFAMSGrad", "NaiveAMSGrad", "DistEFSGD", "SGD", "EF21SGD", "Signum", "SAEFSGD", "OneBitAdam"]
