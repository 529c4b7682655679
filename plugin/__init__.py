"""taciturn: two-way compressed communication for distributed PyTorch training.

Workers and the per-chunk "server" exchange 1-bit or sparse tensors with error feedback or
Markov compression in both directions, inside the allreduce.
"""
from .compressors import Compressor, list_compressors, make_compressor
from .comm import Communicator, LocalCommunicator, make_communicator
from .comm.allreduce import compressed_allreduce
from .feedback import make_feedback
from .layout import BucketLayout
from .metrics import CommStats
from .pipeline import Pipeline

__version__ = "0.1.0"

__all__ = ["Compressor", "list_compressors", "make_compressor", "Communicator", "LocalCommunicator",
           "make_communicator", "compressed_allreduce", "make_feedback", "BucketLayout", "CommStats",
           "Pipeline"]
