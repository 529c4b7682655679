"""taciturn: two-way compressed communication for distributed PyTorch training.

Workers and the per-chunk "server" exchange 1-bit or sparse tensors with error feedback or
Markov compression in both directions, inside the allreduce.
"""
from .compressors import Compressor, list_compressors, make_compressor
from .comm import Communicator, LocalCommunicator, make_communicator
from .exchange import Exchange
from .feedback import make_feedback
from .layout import BucketLayout
from .metrics import CommStats
from .presets import PRESETS, Preset, preset
from .optim import (SAEFSGD, SGD, AMSGrad, Adam, CDAdam, CompressedAMSGrad, CompressedOptimizer, DistEFSGD,
                    EF21SGD, EFAMSGrad, NaiveAMSGrad, OneBitAdam, OneBitLamb, Signum, SparsAMS,
                    ZeroOneAdam)
from .registry import create_optimizer, list_optimizers
from .checkpoint import load_checkpoint, save_checkpoint
from .comm import CollectiveError

__version__ = "0.1.0"

__all__ = ["Compressor", "list_compressors", "make_compressor", "Communicator", "LocalCommunicator",
           "make_communicator", "make_feedback", "BucketLayout", "CommStats",
           "Exchange", "Preset", "PRESETS", "preset", "CompressedOptimizer", "CDAdam", "SparsAMS", "DistEFSGD", "SAEFSGD", "OneBitAdam", "ZeroOneAdam", "OneBitLamb", "AMSGrad",
           "Adam", "SGD", "EFAMSGrad", "NaiveAMSGrad", "CompressedAMSGrad", "EF21SGD", "Signum",
           "create_optimizer", "list_optimizers", "save_checkpoint", "load_checkpoint", "CollectiveError"]
