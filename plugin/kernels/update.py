"""Fused CPU kernels of the optimizer update rules (``update.cpp``), for taciturn.optim.functional.

The torch path of an update makes one pass over memory per op (AMSGrad: eight) and allocates a
temporary for the denominator; a kernel reads every tensor once and writes the state and the
parameter in the same pass. It rounds as the torch ops do, one for one, but for the square root:
correctly rounded here, within 1 ulp in torch (MKL's vsSqrt on x86 builds). The results do not
depend on the thread count.

Callers ask ``fits(*tensors)`` first: contiguous fp32 CPU tensors with one element count, and the
library built (see ``taciturn.kernels``); or CUDA ones, which go to the Triton kernels of
``triton_update.py`` when triton imports. The functions take the scalars as Python floats and
round them to fp32 as torch does for an fp32 tensor.
"""
from __future__ import annotations

import torch

from . import _threads, library, on_triton, usable


def fits(first: torch.Tensor, *others: torch.Tensor) -> bool:
    """True when the kernels may update these tensors: all contiguous fp32 on CPU (or all on CUDA),
    with as many elements as ``first``, and the library is built (triton imports)."""
    tensors = (first, *others)
    return (all(t.dtype == torch.float32 and t.numel() == first.numel() for t in tensors)
            and usable(*tensors))


def _numel(first: torch.Tensor, *others: torch.Tensor) -> int:
    """The element count the tensors share; ValueError when they do not."""
    n = first.numel()
    if any(t.numel() != n for t in others):
        raise ValueError(f"taciturn.kernels: update of tensors with {[t.numel() for t in (first, *others)]} "
                         "elements")
    return n


def amsgrad(param: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
            max_exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float) -> None:
    """taciturn.optim.functional.amsgrad_ in one pass."""
    n = _numel(param, g, exp_avg, exp_avg_sq, max_exp_avg_sq)
    if on_triton(param):
        from . import triton_update
        triton_update.amsgrad(param, g, exp_avg, exp_avg_sq, max_exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    else:
        library().tac_amsgrad(param.data_ptr(), g.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                              max_exp_avg_sq.data_ptr(), n, beta1, 1 - beta1, beta2, 1 - beta2, eps, -lr,
                              _threads(n))
    torch.autograd.graph.increment_version([param, exp_avg, exp_avg_sq, max_exp_avg_sq])


def adam(param: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, lr: float,
         beta1: float, beta2: float, eps: float, step: int, bias_correction: bool = True) -> None:
    """taciturn.optim.functional.adam_ in one pass (without bias correction v is divided by 1: exact)."""
    if bias_correction:
        c2, size = 1 - beta2 ** step, -lr / (1 - beta1 ** step)
    else:
        c2, size = 1.0, -lr
    n = _numel(param, g, exp_avg, exp_avg_sq)
    if on_triton(param):
        from . import triton_update
        triton_update.adam(param, g, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps, c2=c2, size=size)
    else:
        library().tac_adam(param.data_ptr(), g.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), n, beta1,
                           1 - beta1, beta2, 1 - beta2, c2, eps, size, _threads(n))
    torch.autograd.graph.increment_version([param, exp_avg, exp_avg_sq])


def momentum(g: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """taciturn.optim.functional.momentum_ (with a buffer) in one pass."""
    n = _numel(g, buf)
    out = torch.empty_like(g) if nesterov else None
    if on_triton(g):
        from . import triton_update
        triton_update.momentum(g, buf, momentum, out)
    else:
        library().tac_momentum(buf.data_ptr(), g.data_ptr(), None if out is None else out.data_ptr(), n, momentum,
                               _threads(n))
    torch.autograd.graph.increment_version(buf)
    return buf if out is None else out


def square_ema(v: torch.Tensor, g: torch.Tensor, beta: float) -> None:
    """v.mul_(beta).addcmul_(g, g, value=1 - beta) in one pass (CPU tensors only)."""
    n = _numel(v, g)
    library().tac_square_ema(v.data_ptr(), g.data_ptr(), n, beta, 1 - beta, _threads(n))
