"""Update rules as plain in-place functions (the class keeps the books, these do the maths).

Every function updates one parameter tensor from the communicated direction ``g`` (fp32) and
its fp32 state tensors. ``param`` is fp32 (the parameter itself or its fp32 master copy).

Contiguous fp32 CPU tensors go through the fused kernels of ``taciturn.kernels.update``: one
pass over memory per update, rounding as the torch path below does op for op but for the
square root (theirs is correctly rounded; torch's, MKL's on x86, may be 1 ulp off). Contiguous
fp32 CUDA tensors go through its Triton kernels when triton imports (rounding as torch's CUDA ops).
The torch path (other layouts, kernels off, no triton) updates in place; on CPU it works through pieces of
``_PIECE`` elements, so that its ops find their operands in cache and its denominator needs a
piece-sized scratch tensor, not a fresh full-size one (which costs more in page faults than the
update itself).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from ..kernels import update

#: elements per piece of the CPU torch path (1 MB per tensor: an AMSGrad piece stays in L3)
_PIECE = 1 << 18


def _pieces(*tensors: torch.Tensor) -> Iterator[Tuple[torch.Tensor, ...]]:
    """Matching pieces of ``tensors``, each followed by a scratch tensor shaped like its last one:
    flat pieces of ``_PIECE`` elements when all are contiguous CPU tensors with one element count
    above that, else the whole tensors (on CUDA a fresh temporary costs little)."""
    first = tensors[0]
    if first.numel() <= _PIECE or not all(t.device.type == "cpu" and t.is_contiguous()
                                          and t.numel() == first.numel() for t in tensors):
        yield (*tensors, torch.empty_like(tensors[-1]))
        return
    scratch = torch.empty(min(first.numel(), _PIECE), dtype=tensors[-1].dtype)
    for piece in zip(*(t.view(-1).split(_PIECE) for t in tensors)):
        yield (*piece, scratch[:piece[0].numel()])


def amsgrad_(param: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
             max_exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float) -> None:
    """AMSGrad as CD-Adam and SPARS-AMS write it: no bias correction, eps inside the root.

    m = b1 m + (1-b1) g ; v = b2 v + (1-b2) g^2 ; v^ = max(v^, v) ; x = x - lr m / sqrt(v^ + eps)
    """
    if update.fits(param, g, exp_avg, exp_avg_sq, max_exp_avg_sq):
        update.amsgrad(param, g, exp_avg, exp_avg_sq, max_exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
        return
    for x, gp, m, v, vmax, denom in _pieces(param, g, exp_avg, exp_avg_sq, max_exp_avg_sq):
        m.mul_(beta1).add_(gp, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(gp, gp, value=1 - beta2)
        torch.maximum(vmax, v, out=vmax)
        x.addcdiv_(m, torch.add(vmax, eps, out=denom).sqrt_(), value=-lr)


def recovered_gradient_(out: torch.Tensor, momentum: torch.Tensor, exp_avg: torch.Tensor, *,
                        beta1: float) -> torch.Tensor:
    """The gradient g that takes the momentum from ``exp_avg`` to ``momentum``: ``out`` =
    (momentum - b1 exp_avg) / (1 - b1), so that b1 exp_avg + (1 - b1) g = momentum."""
    return torch.sub(momentum, exp_avg, alpha=beta1, out=out).div_(1 - beta1)


def adam_(param: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
          lr: float, beta1: float, beta2: float, eps: float, step: int, bias_correction: bool = True) -> None:
    """Adam (torch's form, eps outside the root); ``bias_correction=False`` is 1-bit Adam's form."""
    if update.fits(param, g, exp_avg, exp_avg_sq):
        update.adam(param, g, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step,
                    bias_correction=bias_correction)
        return
    c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
    size = -lr / c1 if bias_correction else -lr
    for x, gp, m, v, denom in _pieces(param, g, exp_avg, exp_avg_sq):
        m.mul_(beta1).add_(gp, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(gp, gp, value=1 - beta2)
        root = torch.div(v, c2, out=denom).sqrt_() if bias_correction else torch.sqrt(v, out=denom)
        x.addcdiv_(m, root.add_(eps), value=size)


def frozen_adam_(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, lr: float, eps: float,
                 weight_decay: float = 0.0) -> None:
    """1-bit Adam's step after the freeze (v frozen, m the communicated momentum):
    x = x - lr (m / (sqrt(v) + eps) + wd x)."""
    for x, m, v, step in _pieces(param, exp_avg, exp_avg_sq):
        torch.div(m, torch.sqrt(v, out=step).add_(eps), out=step)
        if weight_decay:
            step.add_(x, alpha=weight_decay)
        x.add_(step, alpha=-lr)


def momentum_(g: torch.Tensor, buf: Optional[torch.Tensor], momentum: float, nesterov: bool) -> torch.Tensor:
    """Heavy-ball buffer ``buf = mu buf + g`` (updated in place); returns the direction:
    ``buf`` or, with Nesterov, ``g + mu buf``. ``momentum == 0`` returns ``g``."""
    if momentum == 0 or buf is None:
        return g
    if update.fits(g, buf):
        return update.momentum(g, buf, momentum, nesterov)
    buf.mul_(momentum).add_(g)
    return g.add(buf, alpha=momentum) if nesterov else buf


def weight_decay_(param: torch.Tensor, g: torch.Tensor, *, lr: float, weight_decay: float,
                  decoupled: bool) -> torch.Tensor:
    """L2 (``g + wd x``, before compression) or decoupled (``x = x - lr wd x``) weight decay.

    Returns the gradient to use."""
    if weight_decay == 0:
        return g
    if decoupled:
        param.mul_(1 - lr * weight_decay)
        return g
    return g.add(param, alpha=weight_decay)
