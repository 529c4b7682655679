"""AMSGrad-family methods: CD-Adam, SPARS-AMS and the AMSGrad baselines over the same exchange."""
from __future__ import annotations

from typing import List

import torch

from ..exchange import Workspace
from ..presets import preset
from ..segments import Segments
from .base import CompressedOptimizer
from .functional import adam_, amsgrad_, recovered_gradient_, weight_decay_

#: what the Markov sequences (or the errors) of a CompressedAMSGrad follow: ``track=``
TRACKS = ("gradient", "momentum")


class CompressedAMSGrad(CompressedOptimizer):
    """AMSGrad (eps inside the root, no bias correction) on a compressed average of the gradients.

    The gradient goes through the exchange of the class's ``preset`` (``taciturn.presets``;
    here CD-Adam's), with any part replaced: ``compressor`` and its options,
    ``worker_feedback`` / ``server_feedback`` (``none``, ``ef``, ``markov``), ``two_way``
    (None: the preset's); then every rank runs AMSGrad on the identical result. The named
    classes below fix these choices.

    Weight decay: ``decoupled_weight_decay=False`` adds ``weight_decay * x`` to the local
    gradient before compression (L2); ``True`` shrinks x directly (AdamW style).

    ``track``: what goes through the exchange. ``"gradient"`` (the paper's): each rank's
    gradient g_i; the result is AMSGrad's g. ``"momentum"``: each rank's own momentum
    m_i = b1 m_i + (1-b1) g_i (``worker_exp_avg`` in the state), whose changes are about
    (1-b1) times the gradient's, so 1-bit Markov sequences follow it with far less error; the
    result M is AMSGrad's m, and the rule takes the gradient that leads to it,
    g = (M - b1 m) / (1-b1), so with C = identity it is AMSGrad on the averaged gradient.

    ``momentum_correction=True`` (with one-way error feedback, SPARS-AMS's exchange): Deep
    Gradient Compression's momentum correction and momentum factor masking (Lin et al. 2018,
    ICLR). Each rank keeps its own momentum u_i = b1 u_i + (1-b1) g_i (``worker_exp_avg``), sends
    C(u_i + e_i) with the error feedback, then zeroes u_i where it sent; every rank takes the
    average M as the step: v = b2 v + (1-b2) M^2, v^ = max(v^, v), x = x - lr M / sqrt(v^ + eps)
    (the rule with b1 = 0). An entry kept after T steps carries its T steps' momentum at once;
    the mask drops the momentum it had already sent. The same bytes. With C = identity every u_i
    is zeroed each step and M = (1-b1) mean g: AMSGrad with b1 = 0 and eps / (1-b1)^2.

    ``shard_state=True``: the chunk owner keeps m, v, v^ for its chunk and runs the same rule
    there on the aggregate before server compression (Markov's H, else the decoded mean); every
    rank subtracts the model change it receives.
    """

    preset = "cdadam"
    rule_state = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, compressor=None, block_size=1024, ratio=None, k=None,
                 compressor_options=None, worker_feedback=None, server_feedback=None, two_way=None,
                 track="gradient", momentum_correction=False, **kwargs):
        if track not in TRACKS:
            raise ValueError(f"{type(self).__name__}: track={track!r} must be one of {TRACKS}: 'gradient' compresses "
                             "each rank's gradient (the paper's), 'momentum' each rank's momentum b1 m + (1-b1) g")
        if not isinstance(momentum_correction, bool):
            raise ValueError(f"{type(self).__name__}: momentum_correction={momentum_correction!r} must be True or False")
        if momentum_correction and track != "gradient":
            raise ValueError(f"{type(self).__name__}: momentum_correction=True already sends each rank's momentum "
                             f"(with error feedback); drop track={track!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, track=track,
                        momentum_correction=momentum_correction)
        grad = preset(self.preset).configure(compressor, block_size=block_size, ratio=ratio, k=k,
                                             options=compressor_options, worker=worker_feedback,
                                             server=server_feedback, two_way=two_way)
        super().__init__(params, defaults, {"grad": grad}, **kwargs)
        if momentum_correction:
            self._check_momentum_correction()
        # scratch: the sharded step's copies of x on the owner's chunk ("old", "new"), the
        # gradient recovered from a tracked momentum ("g")
        self._work = Workspace()

    def _step(self):
        grads = self.local_grads()
        for i, (gi, p) in enumerate(self._trainable):
            group = self.param_groups[gi]
            if group["weight_decay"] and not group["decoupled_weight_decay"]:
                grads[i] = weight_decay_(self.master(p), grads[i], lr=group["lr"],
                                         weight_decay=group["weight_decay"], decoupled=False)
            if group["track"] == "momentum" or group["momentum_correction"]:
                (m,) = self.param_state(p, "worker_exp_avg")
                grads[i] = m.mul_(group["betas"][0]).add_(grads[i], alpha=1 - group["betas"][0])
        if self.sharded:
            changes = self.communicate("grad", grads, owner_update=self._owner_update)
            for (_, p), change in zip(self._trainable, changes):
                x = self.master(p)
                self.write_back(p, x.sub_(change))
            return
        correcting = any(group["momentum_correction"] for group in self.param_groups)
        inputs = self._compressed_inputs(grads) if correcting else None
        avg = self.communicate("grad", grads)
        if inputs is not None:
            self._mask_sent(grads, inputs)
        for (gi, p), g in zip(self._trainable, avg):
            x = self.master(p)
            self.apply_rule(x, g, dict(zip(self.rule_state, self.param_state(p, *self.rule_state))),
                            self.param_groups[gi])
            self.write_back(p, x)

    def apply_rule(self, x, g, st, group):
        """The update rule on x (fp32, in place) with direction g and state tensors ``st``."""
        if group["decoupled_weight_decay"]:
            weight_decay_(x, g, lr=group["lr"], weight_decay=group["weight_decay"], decoupled=True)
        self.update(x, g, st, group)

    def update(self, x, g, st, group):
        b1, b2 = group["betas"]
        if group["momentum_correction"]:
            b1 = 0.0
        elif group["track"] == "momentum":
            g = recovered_gradient_(self._work.scratch("g", g.numel(), g.device).view(g.shape), g,
                                    st["exp_avg"], beta1=b1)
        amsgrad_(x, g, st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"], lr=group["lr"], beta1=b1, beta2=b2,
                 eps=group["eps"])

    def _check_momentum_correction(self) -> None:
        ex = self.exchanges["grad"]
        if ex.worker.name != "ef" or ex.two_way or ex.ranks_per_node != 1:  # shard_state needs two_way
            raise ValueError(f"{type(self).__name__}: momentum_correction=True masks the momentum each rank sent "
                             "through one-way error feedback (SPARS-AMS's exchange); this one is "
                             f"{ex.worker.name}/{ex.server.name}, two_way={ex.two_way}, shard_state={self.sharded}, "
                             f"ranks_per_node={ex.ranks_per_node}: use SparsAMS's exchange without shard_state "
                             "and ranks_per_node, or drop momentum_correction")

    def _compressed_inputs(self, grads) -> List[torch.Tensor]:
        """Per bucket, half the magnitude of what the error feedback compresses this step (its
        error plus the inputs), in bf16: the mask compares with it, and needs no more precision."""
        ex = self.exchanges["grad"]
        return [torch.cat([grads[i].reshape(-1) for i in idx]).add_(st["worker_error"]).abs_().mul_(0.5)
                .to(torch.bfloat16) for idx, st in zip(ex.buckets, self.compression.buckets("grad"))]

    def _mask_sent(self, grads, inputs) -> None:
        """Momentum factor masking: zero each rank's momentum where it sent an entry. Sent entries
        are where the error fell below half the input (EF keeps the whole input where it sends
        nothing, and at most the value's rounding, 2^-8 of it in bf16, where it sends one)."""
        sent = [st["worker_error"].abs() < half for st, half in zip(self.compression.buckets("grad"), inputs)]
        masks = self.exchanges["grad"].split(sent, [p.shape for _, p in self._trainable])
        for (gi, _), u, mask in zip(self._trainable, grads, masks):
            if self.param_groups[gi]["momentum_correction"]:
                u.masked_fill_(mask, 0.0)

    def reset_compression_state(self) -> None:
        super().reset_compression_state()
        self._restart_tracked_momenta()

    def load_state_dict(self, state_dict, reset_compression_state: bool = False):
        super().load_state_dict(state_dict, reset_compression_state)
        for group in self.param_groups:  # checkpoints from before ``track`` / ``momentum_correction`` existed
            group.setdefault("track", self.defaults["track"])
            group.setdefault("momentum_correction", self.defaults["momentum_correction"])
        if reset_compression_state:
            self._restart_tracked_momenta()

    def _restart_tracked_momenta(self) -> None:
        """With ``track="momentum"`` the rule's m is the Markov sequences' sum: when those restart
        from zero, so do m and the workers' momenta (else the first recovered gradients would be
        about -b1 m / (1-b1), and AMSGrad's max would keep their squares)."""
        for gi, p in self._trainable:
            if self.param_groups[gi]["track"] == "momentum":
                for key in ("worker_exp_avg", "exp_avg"):
                    if key in self.state[p]:
                        self.state[p][key].zero_()

    def _owner_update(self, bucket, chunk, g, st):
        """The sharded step's rule on this rank's chunk of ``bucket``: x_old - x_new there."""
        ex = self.exchanges["grad"]
        idx = ex.buckets[bucket]
        x = Segments([self.master(self._trainable[i][1]).reshape(-1) for i in idx])[chunk]
        old = x.flat(self._work.scratch("old", g.numel(), g.device))
        new = self._work.scratch("new", g.numel(), g.device).copy_(old)
        self.apply_rule(new, g, st, self.param_groups[ex.groups[idx[0]]])
        return old.sub_(new)


class CDAdam(CompressedAMSGrad):
    """CD-Adam (Wang et al., Algorithm 1): Markov compression both ways, AMSGrad on the workers.

    Compressed from step 1, no warm-up. Default compressor: ``block_sign`` with 1024-element
    blocks (1 bit per element + one fp32 scale per block, about 31x fewer bytes than fp32 per
    direction); ``compressor="scaled_sign"`` is the paper's per-tensor form. ``track="momentum"``
    compresses each rank's momentum instead of its gradient (CompressedAMSGrad): the same bytes,
    closer to uncompressed AMSGrad (README, Accuracy).
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, compressor="block_sign", block_size=1024, ratio=None, k=None,
                 compressor_options=None, track="gradient", **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay, compressor, block_size,
                         ratio, k, compressor_options, track=track, **kwargs)


class SparsAMS(CompressedAMSGrad):
    """SPARS-AMS (Algorithms 1 and 2): workers send TopK(g + e) with error feedback, one-way;
    every rank averages and runs AMSGrad. With no process group it is Algorithm 2 (n = 1).
    ``momentum_correction=True``: each rank sends TopK(u + e) of its own momentum u, masked where
    sent, and the average is the step (DGC's momentum correction; CompressedAMSGrad, README
    Accuracy): the same bytes, closer to uncompressed AMSGrad."""

    preset = "sparsams_topk"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, compressor="topk", ratio=None, k=None, compressor_options=None,
                 block_size=1024, momentum_correction=False, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay, compressor, block_size,
                         ratio, k, compressor_options, momentum_correction=momentum_correction, **kwargs)


class AMSGrad(CompressedAMSGrad):
    """Uncompressed AMSGrad baseline (fp32 both ways, the same update rule as CD-Adam)."""

    preset = "identity"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, **kwargs):
        # the preset's parts, named so that a compressor or feedback given here is refused
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay, None,
                         worker_feedback=None, server_feedback=None, two_way=None, **kwargs)


class _BlockSignAMSGrad(CompressedAMSGrad):
    """A baseline whose preset fixes the feedback rules; one-way drops the server's."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, compressor="block_sign", block_size=1024, ratio=None, k=None,
                 compressor_options=None, two_way=True, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay, compressor, block_size,
                         ratio, k, compressor_options, None, None if two_way else "none", two_way, **kwargs)


class EFAMSGrad(_BlockSignAMSGrad):
    """Baseline: error feedback on both sides (s = 1) + AMSGrad."""

    preset = "dist_ef_block_sign"


class NaiveAMSGrad(_BlockSignAMSGrad):
    """Baseline: compression without any feedback (both ways by default) + AMSGrad."""

    preset = "naive_block_sign"


class Adam(AMSGrad):
    """Uncompressed Adam baseline in torch's form (bias correction, eps outside the root)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay, **kwargs)

    rule_state = ("exp_avg", "exp_avg_sq")

    def update(self, x, g, st, group):
        b1, b2 = group["betas"]
        adam_(x, g, st["exp_avg"], st["exp_avg_sq"], lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"],
              step=self.global_step + 1)
