"""Update rules as plain in-place functions (the class keeps the books, these do the maths).

Every function updates one parameter tensor from the communicated direction ``g`` (fp32) and
its fp32 state tensors. ``param`` is fp32 (the parameter itself or its fp32 master copy).
"""
from __future__ import annotations

from typing import Optional

import torch


def amsgrad_(param: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
             max_exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float) -> None:
    """AMSGrad as CD-Adam and SPARS-AMS write it: no bias correction, eps inside the root.

    m = b1 m + (1-b1) g ; v = b2 v + (1-b2) g^2 ; v^ = max(v^, v) ; x = x - lr m / sqrt(v^ + eps)
    """
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    param.addcdiv_(exp_avg, max_exp_avg_sq.add(eps).sqrt_(), value=-lr)


def adam_(param: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
          lr: float, beta1: float, beta2: float, eps: float, step: int, bias_correction: bool = True) -> None:
    """Adam (torch's form, eps outside the root); ``bias_correction=False`` is 1-bit Adam's form."""
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if bias_correction:
        c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
        denom = (exp_avg_sq / c2).sqrt_().add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / c1)
    else:
        param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr)


def momentum_(g: torch.Tensor, buf: Optional[torch.Tensor], momentum: float, nesterov: bool) -> torch.Tensor:
    """Heavy-ball buffer ``buf = mu buf + g`` (updated in place); returns the direction:
    ``buf`` or, with Nesterov, ``g + mu buf``. ``momentum == 0`` returns ``g``."""
    if momentum == 0 or buf is None:
        return g
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
