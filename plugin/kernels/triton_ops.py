"""What the Triton kernels (``triton_sign.py``, ``triton_update.py``) share: launching with the
rounding of the torch path, and torch's division by a Python scalar on each device.

A kernel must round as the torch ops it replaces do, op for op. Triton fuses ``a * b + c`` into
one fma by default: the kernels are launched with that off (``launch``) and write every fma they
mean with ``tl.fma``. Dividing a tensor by a Python scalar rounds differently by device: torch's
CPU op divides, its CUDA op multiplies by the fp32 reciprocal (``div_scalar``). Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors and round as torch's CPU ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def on_cuda(t: torch.Tensor) -> bool:
    """Whether ``t`` is a CUDA tensor: the kernels then round as torch's CUDA ops, else as its CPU ops."""
    return t.device.type == "cuda"


def reciprocal(d: float) -> float:
    """fp32(1 / fp32(d)): the factor torch's CUDA division by the Python scalar ``d`` multiplies by."""
    return (torch.ones((), dtype=torch.float32) / torch.tensor(d, dtype=torch.float32)).item()


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` without fma contraction."""
    kernel[grid](*args, **meta, enable_fp_fusion=False)


@triton.jit
def div_scalar(v, d, inv, RECIPROCAL: tl.constexpr):
    """v / d as torch rounds a tensor divided by a Python scalar: v * inv on CUDA (inv the
    fp32 reciprocal, ``reciprocal(d)``), the correctly rounded quotient on CPU."""
    if RECIPROCAL:
        return v * inv
    return tl.div_rn(v, d)
