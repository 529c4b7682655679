"""SAEF: step-ahead error feedback on the model difference (Xu et al., Algorithm 1)."""
from __future__ import annotations

import time

import torch

from ..presets import preset
from .base import CompressedOptimizer, check_range
from .functional import momentum_, weight_decay_


class SAEFSGD(CompressedOptimizer):
    """Momentum SGD whose model difference is compressed with error feedback.

    Worker k: m_k = mu m_k + grad(x - e_k); Delta_k = e_k + lr m_k; sends C(Delta_k) and keeps
    e_k = Delta_k - C(Delta_k). Server (``two_way=True``, DC): Delta = e + mean C(Delta_k),
    sends C(Delta), keeps e = Delta - C(Delta); single-way (SC) sends the mean itself. Every
    worker applies x = x - C(Delta) to the synced model x, kept in ``state[p]["synced_param"]``.

    ``step_ahead=True`` (SAEF): after each step the parameters the forward pass sees are
    x - e_k, different on every rank; ``step_ahead=False`` is plain local EF (they hold x).
    ``error_avg_period=p`` (SAEF only, as in Algorithm 1) averages the worker errors in full
    precision at the start of step t when (t + 1) mod p = 0 (t from 0), before the step ahead;
    ``None`` never does.

    Evaluate and save the synced model inside ``with opt.synced_weights():``.
    """

    rule_state = ()
    unsharded_because = ("its downlink already carries the model change, and its state (momentum, errors, the "
                         "synced model) is each worker's own")

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0, compressor="topk", ratio=None, k=None,
                 block_size=1024, compressor_options=None, error_avg_period=None, two_way=True, step_ahead=True,
                 **kwargs):
        check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
        if error_avg_period is not None and (not isinstance(error_avg_period, int) or error_avg_period < 1):
            raise ValueError(f"error_avg_period={error_avg_period!r} must be a positive int (or None for never)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        delta = preset("saef_topk").configure(compressor, block_size=block_size, ratio=ratio, k=k,
                                              options=compressor_options, server="ef" if two_way else "none",
                                              two_way=two_way)
        self.error_avg_period = error_avg_period
        self.step_ahead = step_ahead
        super().__init__(params, defaults, {"delta": delta}, **kwargs)
        for _, p in self._trainable:
            self.state[p]["synced_param"] = p.detach().float().clone()
        self._after_step()

    def worker_errors(self):
        """Per-parameter views of this worker's error e_k."""
        flats = [st["worker_error"] for st in self.compression.buckets("delta")]
        return self.exchanges["delta"].split(flats, [p.shape for _, p in self._trainable])

    def _step(self):
        grads = self.local_grads()
        deltas = []
        for (gi, p), g in zip(self._trainable, grads):
            group = self.param_groups[gi]
            g = weight_decay_(p.float(), g, lr=group["lr"], weight_decay=group["weight_decay"], decoupled=False)
            buf = self.param_state(p, "momentum_buffer")[0]
            m = momentum_(g, buf, group["momentum"], False)
            deltas.append(m * group["lr"])
        for (_, p), d in zip(self._trainable, self.communicate("delta", deltas)):
            self.state[p]["synced_param"].sub_(d)

    def _after_step(self):
        t = self.global_step
        if (self.step_ahead and self.error_avg_period and (t + 1) % self.error_avg_period == 0
                and self.comm.world_size > 1):
            start = time.perf_counter()
            nbytes = 0
            for st in self.compression.buckets("delta"):
                e = st["worker_error"]
                self.comm.all_reduce(e).div_(self.comm.world_size)
                nbytes += 4 * e.numel()
            self.stats.record(nbytes, nbytes, 0, 0.0, time.perf_counter() - start)
        self._place_params()

    @torch.no_grad()
    def _place_params(self):
        errors = self.worker_errors() if self.step_ahead else [None] * len(self._trainable)
        for (_, p), e in zip(self._trainable, errors):
            x = self.state[p]["synced_param"]
            p.copy_(x - e if e is not None else x)

    def load_state_dict(self, state_dict, reset_compression_state: bool = False):
        super().load_state_dict(state_dict, reset_compression_state)
        self._place_params()

    def synced_tensors(self):
        return [self.state[p]["synced_param"] for _, p in self._trainable]
