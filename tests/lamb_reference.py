"""1-bit LAMB written plainly after DeepSpeed 0.16.9's ``runtime/fp16/onebit/lamb.py``, for n
simulated workers (the independent side of tests/unit/test_onebit_lamb.py and
tests/distributed/test_onebit_lamb_distributed.py; nothing here imports taciturn).

Steps are counted as taciturn counts them: ``t`` steps done, the warm-up while t < freeze_step
(DeepSpeed's first, set-up call is not simulated). One worker error per worker and one server
error serve the compressed momentum, zero at the freeze. Vectors are flat fp32 tensors of every
trainable element; ``sizes`` cuts them into the parameter tensors (each has its own LAMB
coefficient); lr is a flat tensor (each group's lr). ``C=None`` is the algorithm without
compression: the momentum is the exact mean, with no scaling coefficients.
"""
from __future__ import annotations

import math

import torch

import reference as ref


class OneBitLamb(ref.CDAdam):
    def __init__(self, x0, n, sizes, C: ref.Compression, freeze_step, warmup="lamb",
                 warmup_C: ref.Compression = None, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_coeff=10.0,
                 min_coeff=0.01, coeff_beta=0.9, factor_max=4.0, factor_min=0.5, factor_threshold=0.1, mask=None):
        super().__init__(x0, n, warmup_C, betas, eps)    # the Markov sequences of the CD-Adam warm-up
        self.C1, self.freeze_step, self.warmup, self.eps, self.wd = C, freeze_step, warmup, eps, weight_decay
        self.max_coeff, self.min_coeff, self.coeff_beta = max_coeff, min_coeff, coeff_beta
        self.factor_max, self.factor_min, self.factor_threshold = factor_max, factor_min, factor_threshold
        self.mask = mask
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.tensors = [(a, a + s) for a, s in zip(starts, sizes)]
        self.lamb_coeff_freeze = [0.0] * len(sizes)
        self.last_factor = [1.0] * len(sizes)
        self.scaling_coeff = None
        self.v_fresh = None
        self.worker_error = [self.zeros() for _ in range(n)]
        self.server_error = self.zeros()
        self.t = 0

    def compressed_allreduce(self, buffers):
        out, self.worker_error, self.server_error = ref.ef_allreduce(self.C1, buffers, self.worker_error,
                                                                     self.server_error)
        return out

    def step(self, g, lr):
        if self.t < self.freeze_step:
            if self.warmup == "cdadam":
                super().step(g, lr)                       # Markov-compressed gradient, then self.adapt
            else:
                self.adapt(ref.mean(g), lr)               # the fp32 allreduce
        else:
            if self.t == self.freeze_step:
                self.freeze()
            self.compressed_step(g, lr)
        self.t += 1

    def adapt(self, g, lr):
        """The warm-up: baseline LAMB (CD-Adam's running max of v with warmup="cdadam")."""
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        v = self.v
        if self.warmup == "cdadam":
            self.v_hat = torch.maximum(self.v_hat, self.v)
            v = self.v_hat
        new_x = self.x.clone()
        for k, (a, b) in enumerate(self.tensors):
            if a == b:
                continue
            x, m = self.x[a:b], self.m[a:b]
            weight_norm = x.pow(2).sum().sqrt()
            update = m / (v[a:b].sqrt() + self.eps)
            if self.wd > 0:
                update = update + self.wd * x
            update_norm = update.pow(2).sum().sqrt()
            lamb_coeff = 1.0
            if weight_norm != 0 and update_norm != 0:
                lamb_coeff = (weight_norm / update_norm).item()
                if lamb_coeff > self.max_coeff:
                    lamb_coeff = self.max_coeff
                if lamb_coeff < self.min_coeff:
                    lamb_coeff = self.min_coeff
            if lamb_coeff != 1.0:
                self.lamb_coeff_freeze[k] = (self.coeff_beta * self.lamb_coeff_freeze[k]
                                             + (1 - self.coeff_beta) * lamb_coeff)
            new_x[a:b] = x - lr[a].item() * lamb_coeff * update
        self.x = new_x

    def freeze(self):
        if self.warmup == "cdadam":
            self.v = self.v_hat
        self.v_fresh = self.v.clone()
        scales = [(self.m[a:b].pow(2).sum().sqrt() / math.sqrt(b - a)).item() if b > a else None
                  for a, b in self.tensors]
        present = [s for s in scales if s is not None]
        united = sum(present) / len(present)
        self.scaling_coeff = [united / s if s else 1.0 for s in scales]
        self.worker_error = [self.zeros() for _ in range(self.n)]
        self.server_error = self.zeros()

    def scaled(self, v, inverse=False):
        out = v.clone()
        for k, (a, b) in enumerate(self.tensors):
            out[a:b] = v[a:b] / self.scaling_coeff[k] if inverse else v[a:b] * self.scaling_coeff[k]
        return out

    def compressed_step(self, g, lr):
        m_last = self.m.clone()
        if self.C1 is None:
            self.m = self.b1 * self.m + (1 - self.b1) * ref.mean(g)
        else:
            local = [self.scaled(self.b1 * self.m + (1 - self.b1) * g[i]) for i in range(self.n)]
            self.m = self.scaled(self.compressed_allreduce(local), inverse=True)
        if self.mask is not None:
            self.m = self.m * self.mask
        grad_reconstruct = (self.m - m_last * self.b1) / (1 - self.b1)
        self.v_fresh = self.b2 * self.v_fresh + (1 - self.b2) * grad_reconstruct * grad_reconstruct
        new_x = self.x.clone()
        for k, (a, b) in enumerate(self.tensors):
            if a == b:
                continue
            x = self.x[a:b]
            denom = self.v[a:b].sqrt() + self.eps
            update_prelim = self.m[a:b] / denom
            update = update_prelim + self.wd * x if self.wd > 0 else update_prelim
            update_norm = update.pow(2).sum().sqrt()
            denom_real = self.v_fresh[a:b].sqrt() + self.eps
            factor = (denom / denom_real).max().item()
            if self.wd > 0:
                update_ratio = min(1.0, (update_prelim.pow(2).sum().sqrt() / update_norm).item())
                factor = factor * update_ratio + (1.0 - update_ratio)
            if factor > self.factor_max:
                factor = self.factor_max
            if factor < self.factor_min:
                factor = self.factor_min
            if factor > self.last_factor[k] * (1.0 + self.factor_threshold):
                factor = self.last_factor[k] * (1.0 + self.factor_threshold)
            if factor < self.last_factor[k] * (1.0 - self.factor_threshold):
                factor = self.last_factor[k] * (1.0 - self.factor_threshold)
            self.last_factor[k] = factor
            lamb_coeff = self.lamb_coeff_freeze[k] * factor
            new_x[a:b] = x - lr[a].item() * lamb_coeff * update
        self.x = new_x
