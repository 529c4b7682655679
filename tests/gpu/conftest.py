"""tests/gpu: the Triton kernels against the torch path, compiled on CUDA tensors when there is a
GPU, else under Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton decorates a kernel, that is before
taciturn.kernels.triton_sign is first imported: pytest imports this file before it collects the
tests, so it is set here at import. Nothing else in the suite launches a Triton kernel, so the
other tests in the same process are not affected.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
