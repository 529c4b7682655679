"""Fused Triton kernels of the optimizer update rules, for CUDA tensors (``taciturn.kernels.update``
dispatches here): what ``update.cpp`` does on CPU, one pass over memory per update.

Each element rounds as the torch path of ``taciturn.optim.functional`` does on the tensors'
device, op for op (``triton_ops``): ``mul_(b)`` one rounding, ``add_(g, alpha=a)`` fma(a, g, x),
``maximum`` propagating NaN, a correctly rounded square root (torch's on CUDA; on CPU torch's may
be 1 ulp off, as update.py says); ``addcmul_(g, g, value=c)``, the division by the Python scalar
c2 and ``addcdiv_(m, d, value=s)`` as on CUDA fma(c, g * g, v), v * fp32(1 / c2) and
fma(s, m / d, x), as on CPU fma(c * g, g, v), v / c2 and x + (s * m) / d. g may be fp32 or bf16 (read as fp32);
the parameter (an fp32 master copy of a bf16 one) and the state are fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_ops import div_scalar, launch, on_cuda, reciprocal

_BLOCK = 1024


@triton.jit
def _descend(x_ptr, idx, mask, m, d, step, CUDA: tl.constexpr):
    """x.addcdiv_(m, d, value=step)."""
    x = tl.load(x_ptr + idx, mask=mask)
    if CUDA:
        x = tl.fma(step, tl.div_rn(m, d), x)
    else:
        x = x + tl.div_rn(step * m, d)
    tl.store(x_ptr + idx, x, mask=mask)


@triton.jit
def _moments(g_ptr, m_ptr, v_ptr, idx, mask, b1, a1, b2, a2, CUDA: tl.constexpr):
    """m = b1 m + a1 g and v = b2 v + a2 g^2 as torch rounds them, stored; returns (m, v)."""
    g = tl.load(g_ptr + idx, mask=mask).to(tl.float32)
    m = tl.fma(a1, g, tl.load(m_ptr + idx, mask=mask) * b1)
    v = tl.load(v_ptr + idx, mask=mask) * b2
    if CUDA:
        v = tl.fma(a2, g * g, v)
    else:
        v = tl.fma(a2 * g, g, v)
    tl.store(m_ptr + idx, m, mask=mask)
    tl.store(v_ptr + idx, v, mask=mask)
    return m, v


@triton.jit
def _amsgrad_kernel(x_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, n, b1, a1, b2, a2, eps, step, CUDA: tl.constexpr,
                    BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    m, v = _moments(g_ptr, m_ptr, v_ptr, idx, mask, b1, a1, b2, a2, CUDA)
    top = tl.maximum(tl.load(vmax_ptr + idx, mask=mask), v, propagate_nan=tl.PropagateNan.ALL)
    tl.store(vmax_ptr + idx, top, mask=mask)
    _descend(x_ptr, idx, mask, m, tl.sqrt_rn(top + eps), step, CUDA)


@triton.jit
def _adam_kernel(x_ptr, g_ptr, m_ptr, v_ptr, n, b1, a1, b2, a2, c2, inv_c2, eps, step, CUDA: tl.constexpr,
                 BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    m, v = _moments(g_ptr, m_ptr, v_ptr, idx, mask, b1, a1, b2, a2, CUDA)
    _descend(x_ptr, idx, mask, m, tl.sqrt_rn(div_scalar(v, c2, inv_c2, CUDA)) + eps, step, CUDA)


@triton.jit
def _momentum_kernel(buf_ptr, g_ptr, out_ptr, n, mu, NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    g = tl.load(g_ptr + idx, mask=mask).to(tl.float32)
    buf = tl.load(buf_ptr + idx, mask=mask) * mu + g  # mul_ then add_: two roundings
    tl.store(buf_ptr + idx, buf, mask=mask)
    if NESTEROV:
        tl.store(out_ptr + idx, tl.fma(mu, buf, g), mask=mask)


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


def amsgrad(param: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
            max_exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float) -> None:
    """``taciturn.kernels.update.amsgrad``."""
    n = param.numel()
    if n:
        launch(_amsgrad_kernel, _grid(n), param, g, exp_avg, exp_avg_sq, max_exp_avg_sq, n, beta1, 1 - beta1, beta2,
               1 - beta2, eps, -lr, CUDA=on_cuda(param), BLOCK=_BLOCK)


def adam(param: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, beta1: float,
         beta2: float, eps: float, c2: float, size: float) -> None:
    """``taciturn.kernels.update.adam``: v / c2 under the root (c2 = 1 without bias correction), step ``size``."""
    n = param.numel()
    if n:
        launch(_adam_kernel, _grid(n), param, g, exp_avg, exp_avg_sq, n, beta1, 1 - beta1, beta2, 1 - beta2, c2,
               reciprocal(c2), eps, size, CUDA=on_cuda(param), BLOCK=_BLOCK)


def momentum(g: torch.Tensor, buf: torch.Tensor, mu: float, out=None) -> None:
    """``taciturn.kernels.update.momentum``: buf = mu buf + g; with ``out``, out = g + mu buf."""
    n = g.numel()
    if n:
        launch(_momentum_kernel, _grid(n), buf, g, out, n, mu, NESTEROV=out is not None, BLOCK=_BLOCK)
