"""0/1 Adam written plainly after DeepSpeed 0.16.9's ``runtime/fp16/onebit/zoadam.py``, for n
simulated workers (the independent side of tests/unit/test_zeroone.py and
tests/distributed/test_zeroone_distributed.py; nothing here imports taciturn).

DeepSpeed's bookkeeping is kept as it is: ``s`` is its ``state['step']``, which its first
``step()`` call (buffer set-up, no update) leaves at 1, so a simulated step is DeepSpeed's call
s = k + 1; one worker error and one server error serve the 1-bit gradients and the 1-bit
momentum and are zeroed at the freeze; the synchronised model is recovered as x - u.
Vectors are flat fp32 tensors of every trainable element, lr a flat tensor (each group's lr).
"""
from __future__ import annotations

import torch

import reference as ref


class ZeroOneAdam(ref.CDAdam):
    def __init__(self, x0, n, C: ref.Compression, var_freeze_step, var_update_scaler, local_step_scaler,
                 local_step_clipper, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, mask=None, warmup="adam",
                 warmup_C: ref.Compression = None):
        super().__init__(x0, n, warmup_C, betas, eps, weight_decay, decoupled=True)  # the CD-Adam warm-up
        self.C1, self.eps, self.wd, self.mask, self.warmup = C, eps, weight_decay, mask, warmup
        self.var_freeze_step, self.var_update_scaler = var_freeze_step, var_update_scaler
        self.local_step_scaler, self.local_step_clipper = local_step_scaler, local_step_clipper
        self.s = 1                                        # after DeepSpeed's set-up call
        self.var_interval, self.var_counter = 1, 0
        self.local_step_interval, self.local_step_counter = 1, 0
        self.freeze_key = False
        self.worker_error = [self.zeros() for _ in range(n)]
        self.server_error = self.zeros()
        self.xs = self.ms = self.u = None                 # per worker, from the freeze on
        self.lrs = self.zeros()

    def points(self):
        return self.xs if self.freeze_key else [self.x] * self.n

    def compressed_allreduce(self, buffers):
        out, self.worker_error, self.server_error = ref.ef_allreduce(self.C1, buffers, self.worker_error,
                                                                     self.server_error)
        return out

    def masked(self, v):
        return v if self.mask is None else v * self.mask

    def step(self, g, lr):
        self.s += 1
        if not self.freeze_key and self.warmup == "cdadam":
            super().step(g, lr)
        elif not self.freeze_key:
            if self.s % self.var_interval == 0:
                g_avg = ref.mean(g)                       # the engine's fp32 allreduce
                self.v = self.b2 * self.v + (1 - self.b2) * g_avg * g_avg
                self.m = self.b1 * self.m + (1 - self.b1) * g_avg
            else:
                g_onebit = self.masked(self.compressed_allreduce(g))
                self.m = self.b1 * self.m + (1 - self.b1) * g_onebit
            update = self.m / (torch.sqrt(self.v) + self.eps) + self.wd * self.x
            self.x = self.x - lr * update
            if self.s % self.var_interval == 0:
                self.var_counter += 1
                if self.var_counter == self.var_update_scaler:
                    self.var_counter = 0
                    self.var_interval *= 2
        else:
            sq = torch.sqrt(self.v) + self.eps
            for i in range(self.n):
                self.ms[i] = self.b1 * self.ms[i] + (1 - self.b1) * g[i]
                update = self.ms[i] / sq + self.wd * self.xs[i]
                self.xs[i] = self.xs[i] - lr * update
                self.u[i] = self.u[i] - lr * update
            self.lrs = self.lrs + lr
            if self.s % self.local_step_interval == 0:
                for i in range(self.n):
                    self.xs[i] = self.xs[i] - self.u[i]
                    self.u[i] = self.u[i] * sq
                u_avg = self.masked(self.compressed_allreduce(self.u))
                for i in range(self.n):
                    self.ms[i] = -(u_avg / self.lrs)
                    self.xs[i] = self.xs[i] + u_avg / sq
                    self.u[i] = self.zeros()
                self.lrs = self.zeros()
                self.x = self.xs[0]
            self.local_step_counter += 1
            if self.local_step_counter == self.local_step_scaler:
                self.local_step_counter = 0
                self.local_step_interval = min(self.local_step_clipper, self.local_step_interval * 2)
        if not self.freeze_key and self.s > self.var_freeze_step:
            self.freeze_key = True
            if self.warmup == "cdadam":
                self.v = self.v_hat                       # CD-Adam's running max, frozen
            self.worker_error = [self.zeros() for _ in range(self.n)]
            self.server_error = self.zeros()
            self.xs = [self.x.clone() for _ in range(self.n)]
            self.ms = [self.m.clone() for _ in range(self.n)]
            self.u = [self.zeros() for _ in range(self.n)]
