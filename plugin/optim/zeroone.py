"""0/1 Adam (Lu et al. 2022) as DeepSpeed 0.16's ZeroOneAdam runs it, with CD-Adam as an
optional compressed warm-up."""
from __future__ import annotations

from typing import Optional

import torch

from ..presets import preset
from .base import CompressedOptimizer, check_range
from .onebit import (ZERO_VARIANCE_MASK, _backend, _cdadam_update, _exp_avg_mask_views, _freeze_running_max,
                     check_floor, exp_avg_masks, floor_settings, floor_variance_, mask_zero_variance)

#: the schedule (variance and local-step intervals, their counters, whether frozen), a dict of
#: ints and a bool in the first trainable parameter's state
SCHEDULE = "zero_one_schedule"
#: per-parameter state of the local-step phase: u, the model change since the last
#: synchronisation (DeepSpeed's name), the model at the last synchronisation, and lrs, the sum
#: of the learning rates since then (a float)
ACCUMULATOR, SYNCED, LR_SUM = "momentum_accumulator", "synced_param", "lrs"
_START = dict(var_interval=1, var_counter=0, local_step_interval=1, local_step_counter=0, frozen=False)
#: param group keys taken from the running script, not the checkpoint, by load_state_dict
_RUNNING_CONFIG = ("var_freeze_step", "var_update_scaler", "local_step_scaler", "local_step_clipper", "exp_avg_mask",
                   "mask_zero_variance", "variance_floor")


class ZeroOneAdam(CompressedOptimizer):
    """0/1 Adam: Adam whose variance is updated on an exponentially thinning schedule and then
    frozen, whose gradients go 1-bit in between, and whose ranks then take local steps between
    1-bit synchronisations of the model change. No bias correction, as in DeepSpeed.

    Steps are counted from 1 (step k is the k-th ``step()`` that ran; skipped non-finite steps
    do not count). DeepSpeed spends its first ``step()`` call on setting up its communication
    buffers (the gradient is dropped, nothing moves); taciturn has no such call, so its step k
    is DeepSpeed's call k + 1 and every schedule below is DeepSpeed's, shifted by that one call
    (s = k + 1 is DeepSpeed's ``state['step']``).

    Variance phase, steps k <= ``var_freeze_step``, ranks bit-identical after every step:
    when s % var_interval == 0, the fp32 mean gradient g (uncompressed, 32 bits per element
    each way) updates v = b2 v + (1-b2) g^2 and m = b1 m + (1-b1) g, and var_counter += 1;
    after ``var_update_scaler`` such steps var_interval doubles (1, 2, 4...). Every other step
    sends the gradient through two-way error-feedback 1-bit compression (``compressor``,
    default ``block_sign``) and updates m only, from that average times the group's
    ``exp_avg_mask``. Every step then: x = x - lr (m / (sqrt(v) + eps) + weight_decay x).

    ``warmup="cdadam"`` runs CD-Adam instead through those steps (Markov-compressed gradients
    from step 1, about 1.03 bits per element each way with 1024-element blocks; AMSGrad with
    eps inside the root and decoupled weight decay, as ``OneBitAdam(warmup="cdadam")``), so no
    step sends fp32 and ``var_update_scaler`` is not used; at the freeze its running max
    becomes the frozen variance and its Markov state is freed. ``exp_avg_mask`` then applies
    from the freeze on.

    Local-step phase, steps k > ``var_freeze_step``, v frozen for good (raising
    ``var_freeze_step`` later changes nothing, as DeepSpeed's ``freeze_key`` never thaws):
    every rank takes a local step m = b1 m + (1-b1) g_local; d = m / (sqrt(v) + eps) +
    weight_decay x; u = u - lr d; x = x_sync + u; lrs = lrs + lr. When s % local_step_interval
    == 0 the ranks synchronise: u (times sqrt(v) + eps) goes through the error-feedback 1-bit
    exchange (errors restarted from zero at the freeze, as DeepSpeed does) to its average
    u_avg, times ``exp_avg_mask``; m = -u_avg / lrs (0 if every lr since the last
    synchronisation was 0); x = x_sync + u_avg / (sqrt(v) + eps), the new x_sync; u = 0,
    lrs = 0. Steps between send nothing. After every step of this phase local_step_counter
    += 1; after ``local_step_scaler`` steps local_step_interval doubles, up to
    ``local_step_clipper``.

    Where the variance is 0 or tiny, a 1-bit value (+-its block's scale, never 0) divided by
    sqrt(v) + eps moves the weight by about lr * scale / eps: in the variance phase the 1-bit
    gradients enter m, in the local-step phase the synchronised u_avg is divided by it. On
    Fashion-MNIST (an MLP, ReLU units that rarely fire) DeepSpeed's form diverges within 30
    steps. Two defaults of taciturn's, both off in DeepSpeed's exact form
    (``mask_zero_variance=False, variance_floor=0``): ``mask_zero_variance`` (default True):
    elements whose v is exactly 0 (no variance step ever saw a gradient there) take no step and
    their u_avg is 0 (in the local-step phase the mask is ``state[p]["zero_variance_mask"]``, made
    once at the freeze and re-derived on load); ``variance_floor`` (default 0.1; 0 with
    ``compressor="identity"``): after each variance update (and at the freeze, for
    ``warmup="cdadam"``), every non-zero v is raised to at least that fraction of the mean v of its block (the 1-bit compressor's blocks: ``OneBitAdam``'s rule,
    ``taciturn.optim.onebit.floor_variance_``), in place, so the floored v is what the variance
    phase's average continues from and what freezes.

    When the ranks are identical: after every step of the variance phase, and after each
    synchronising step of the local-step phase (parameters, ``exp_avg``, ``exp_avg_sq``); between
    synchronisations each rank holds its own parameters and momentum. ``x_sync``
    (``state[p]["synced_param"]``) is identical on every rank after every step of the
    local-step phase; ``synced_tensors()`` returns it there, so ``check_divergence_every``
    compares the parameters before the freeze and x_sync after it, and ``with
    opt.synced_weights():`` evaluates (or saves, as ``taciturn.save_checkpoint`` does) x_sync. DeepSpeed moves x by each
    local step and restores x_sync as x - u, which is the same up to rounding and can leave the
    ranks a few ulps apart; taciturn keeps x_sync and derives x = x_sync + u, so each rank's
    model is a function of its state: ``load_state_dict`` puts it back into the parameters
    (a DeepSpeed checkpoint holds rank 0's module only).

    Per-parameter state: ``exp_avg``, ``exp_avg_sq``, and from the freeze on
    ``momentum_accumulator`` (u), ``synced_param`` (x_sync) and ``lrs``; the variance phase with
    ``warmup="cdadam"`` also ``max_exp_avg_sq``. The schedule (var_interval, var_counter,
    local_step_interval, local_step_counter, frozen) is ``state[p]["zero_one_schedule"]`` of the
    first trainable parameter, next to the compression state; so ``state_dict()`` holds
    everything and a resumed run is bit-identical, between synchronisations too (each rank
    saves and loads its own ``state_dict()``). DeepSpeed instead restarts the schedule and drops
    u and the errors on load. ``load_state_dict`` keeps the running script's
    ``var_freeze_step``, ``var_update_scaler``, ``local_step_scaler``, ``local_step_clipper`` and
    ``exp_avg_mask`` (DeepSpeed reads them from the running script too); the other
    hyper-parameters come from the checkpoint, as in torch.

    ``exp_avg_mask`` (a param group key) takes the group's parameters' shape or one element per
    element of the group's parameters concatenated in order (``OneBitAdam``'s rule).
    ``cuda_aware`` and ``comm_backend_name`` are accepted for DeepSpeed configs and mapped as
    ``OneBitAdam`` maps them. Where DeepSpeed compresses nothing on one rank (n = 1), taciturn
    runs the same compressed exchange as on n ranks. ``stats`` / ``metrics()`` count a local step
    as a step of 0 bytes against its fp32 cost, so ``stats.fp32_bytes / stats.bytes_up`` is the
    saving over the run.
    """

    unsharded_because = ("0/1 Adam's ranks take local steps on their own momentum and model between "
                         "synchronisations, so no chunk owner can hold the update rule's state")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, var_freeze_step=100000,
                 var_update_scaler=16, local_step_scaler=32678, local_step_clipper=16, warmup="adam",
                 compressor="block_sign", block_size=1024, ratio=None, k=None, compressor_options=None,
                 cuda_aware=False, comm_backend_name=None, amsgrad=False, mask_zero_variance=True,
                 variance_floor=None, **kwargs):
        if amsgrad:
            raise ValueError("ZeroOneAdam: amsgrad=True is not supported (0/1 Adam has no AMSGrad variant); "
                             "remove it, or use CDAdam for AMSGrad with compression")
        if warmup not in ("adam", "cdadam"):
            raise ValueError(f"ZeroOneAdam: warmup={warmup!r} must be 'adam' (DeepSpeed's: fp32 on the variance "
                             "steps, 1-bit between) or 'cdadam' (CD-Adam compressed from step 1)")
        _check_int("var_freeze_step", var_freeze_step, 1)
        for name, value in (("var_update_scaler", var_update_scaler), ("local_step_scaler", local_step_scaler),
                            ("local_step_clipper", local_step_clipper)):
            _check_int(name, value, 1)
        check_range("eps", eps, 0.0)
        if not isinstance(mask_zero_variance, bool):
            raise ValueError(f"ZeroOneAdam: mask_zero_variance={mask_zero_variance!r} must be True or False")
        if comm_backend_name is not None and "process_group" not in kwargs:
            kwargs["process_group"] = _backend(comm_backend_name, "ZeroOneAdam")
        one_bit = preset("dist_ef_block_sign").configure(compressor, block_size=block_size, ratio=ratio, k=k,
                                                         options=compressor_options)
        variance_floor, self._floor_block = floor_settings(variance_floor, one_bit, "ZeroOneAdam")
        if warmup == "adam":
            exchanges = {"exact": preset("identity"), "grad": one_bit, "momentum": one_bit}
        else:
            exchanges = {"warmup": preset("cdadam").configure(block_size=block_size), "momentum": one_bit}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        var_freeze_step=var_freeze_step, var_update_scaler=var_update_scaler,
                        local_step_scaler=local_step_scaler, local_step_clipper=local_step_clipper,
                        mask_zero_variance=mask_zero_variance, variance_floor=variance_floor)
        self.warmup = warmup
        self.cuda_aware = cuda_aware
        super().__init__(params, defaults, exchanges, **kwargs)
        self.state[self.compression.anchor][SCHEDULE] = dict(_START)

    # ------------------------------------------------------------------ configuration
    @property
    def var_freeze_step(self) -> int:
        return int(self.param_groups[0]["var_freeze_step"])

    @var_freeze_step.setter
    def var_freeze_step(self, value: int) -> None:
        _check_int("var_freeze_step", value, 1)
        for group in self.param_groups:
            group["var_freeze_step"] = value

    @property
    def schedule(self) -> dict:
        """The schedule's counters (the dict itself: saved with the optimizer's state)."""
        return self.state[self.compression.anchor][SCHEDULE]

    @property
    def freeze_key(self) -> bool:
        """DeepSpeed's name for whether the variance is frozen (the local-step phase)."""
        return self.schedule["frozen"]

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _exp_avg_mask_views(self.param_groups[-1], len(self.param_groups) - 1, "ZeroOneAdam")
        check_floor(self.param_groups[-1].get("variance_floor", 0.0), len(self.param_groups) - 1, "ZeroOneAdam")

    def load_state_dict(self, state_dict, reset_compression_state: bool = False):
        """The checkpoint's state and schedule, with the running script's schedule settings and
        ``exp_avg_mask`` (see the class docstring)."""
        super().load_state_dict(self.with_running_config(state_dict, _RUNNING_CONFIG), reset_compression_state)
        self.state[self.compression.anchor].setdefault(SCHEDULE, dict(_START))
        if self.freeze_key:
            mask_zero_variance(self)
        self._drop_warmup_state()
        self._place_params()

    @torch.no_grad()
    def _place_params(self) -> None:
        """In the local-step phase each rank's model is x_sync + u (its own between
        synchronisations): write it into the parameters."""
        if self.freeze_key:
            for _, p in self._trainable:
                st = self.state[p]
                x = self.master(p)
                torch.add(st[SYNCED], st[ACCUMULATOR], out=x)
                self.write_back(p, x)

    def reset_compression_state(self) -> None:
        super().reset_compression_state()
        self._drop_warmup_state()

    def synced_tensors(self):
        if self.freeze_key:
            return [self.state[p][SYNCED] for _, p in self._trainable]
        return super().synced_tensors()

    # ------------------------------------------------------------------ steps
    def _step(self):
        if not self.freeze_key and self.global_step >= self.var_freeze_step:
            self._freeze()
        if self.freeze_key:
            self._local_step()
        elif self.warmup == "cdadam":
            for (gi, p), g in zip(self._trainable, self.communicate("warmup", self.local_grads())):
                _cdadam_update(self, p, g, self.param_groups[gi])
        else:
            self._variance_phase_step()

    def _freeze(self):
        """Before the first local step: freeze v (CD-Adam's running max with ``warmup="cdadam"``),
        free the variance phase's compression state, start u, x_sync and lrs."""
        if self.warmup == "cdadam":
            _freeze_running_max(self)
            for gi, p in self._trainable:
                self._floor(p, self.param_groups[gi])
        self.schedule["frozen"] = True
        self._drop_warmup_state()
        for _, p in self._trainable:
            st = self.state[p]
            self.param_state(p, "exp_avg", "exp_avg_sq", ACCUMULATOR)
            st[SYNCED] = self.master(p).detach().clone()
            st[LR_SUM] = 0.0
        mask_zero_variance(self)

    def _drop_warmup_state(self):
        """After the freeze, the variance phase's exchanges never run again: free their state
        (also when a checkpoint or a compression reset brings it back as zeros)."""
        if self.freeze_key:
            for name in self.exchanges:
                if name != "momentum":
                    self.compression.free(name)

    def _floor(self, p: torch.Tensor, group: dict) -> None:
        """``variance_floor`` on p's variance, in place (see the class docstring)."""
        if group["variance_floor"] > 0:
            floor_variance_(self.state[p]["exp_avg_sq"], group["variance_floor"], self._floor_block)

    def _variance_phase_step(self):
        schedule = self.schedule
        variance_step = (self.global_step + 2) % schedule["var_interval"] == 0
        averaged = self.communicate("exact" if variance_step else "grad", self.local_grads())
        masks = {} if variance_step else exp_avg_masks(self.param_groups, "ZeroOneAdam")
        for (gi, p), g in zip(self._trainable, averaged):
            group = self.param_groups[gi]
            b1, b2 = group["betas"]
            m, v = self.param_state(p, "exp_avg", "exp_avg_sq")
            if variance_step:
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                self._floor(p, group)
            elif p in masks:
                g = g * masks[p].to(device=g.device, dtype=g.dtype)
            m.mul_(b1).add_(g, alpha=1 - b1)
            x = self.master(p)
            x.add_(_adam_step(x, m, *_denominator(v, group), group))
            self.write_back(p, x)
        if variance_step:
            schedule["var_counter"] += 1
            if schedule["var_counter"] >= self.param_groups[0]["var_update_scaler"]:
                schedule["var_counter"] = 0
                schedule["var_interval"] *= 2

    def _local_step(self):
        schedule = self.schedule
        denominators = []
        for (gi, p), g in zip(self._trainable, self.local_grads()):
            group = self.param_groups[gi]
            st = self.state[p]
            m = st["exp_avg"]
            m.mul_(group["betas"][0]).add_(g, alpha=1 - group["betas"][0])
            st[LR_SUM] += group["lr"]
            denominators.append(_denominator(st["exp_avg_sq"], group, st))
            x = self.master(p)
            u = st[ACCUMULATOR].add_(_adam_step(x, m, *denominators[-1], group))
            torch.add(st[SYNCED], u, out=x)
            self.write_back(p, x)
        if (self.global_step + 2) % schedule["local_step_interval"] == 0:
            self._synchronise(denominators)
        else:
            self.stats.record(0, 0, 4 * sum(p.numel() for _, p in self._trainable), 0.0, 0.0)
            self.stats.end_step()
        schedule["local_step_counter"] += 1
        if schedule["local_step_counter"] >= self.param_groups[0]["local_step_scaler"]:
            schedule["local_step_counter"] = 0
            schedule["local_step_interval"] = min(self.param_groups[0]["local_step_clipper"],
                                                  2 * schedule["local_step_interval"])

    def _synchronise(self, denominators):
        """The synchronisation after this step's local step, with its (sqrt(v) + eps, v == 0) per parameter."""
        scaled = [self.state[p][ACCUMULATOR].mul_(denominator) for (_, p), (denominator, _) in
                  zip(self._trainable, denominators)]
        masks = exp_avg_masks(self.param_groups, "ZeroOneAdam")
        for (_, p), u_avg, (denominator, zero) in zip(self._trainable, self.communicate("momentum", scaled),
                                                      denominators):
            st = self.state[p]
            if p in masks:
                u_avg = u_avg * masks[p].to(device=u_avg.device, dtype=u_avg.dtype)
            if zero is not None:
                u_avg = u_avg.masked_fill(zero, 0.0)
            if st[LR_SUM]:
                st["exp_avg"].copy_(u_avg).div_(-st[LR_SUM])
            else:
                st["exp_avg"].zero_()
            x = self.master(p)
            x.copy_(st[SYNCED]).add_(u_avg / denominator)
            st[SYNCED].copy_(x)
            self.write_back(p, x)
            st[ACCUMULATOR].zero_()
            st[LR_SUM] = 0.0


def _denominator(v: torch.Tensor, group: dict, frozen: Optional[dict] = None) -> tuple:
    """(sqrt(v) + eps, where v is 0 under ``mask_zero_variance`` (else None)). In the local-step
    phase (``frozen``: the parameter's state) v is frozen and its zeros are the mask made at the
    freeze (none stored when v has no zero), not compared again every step."""
    if not group["mask_zero_variance"]:
        zero = None
    elif frozen is not None:
        zero = frozen.get(ZERO_VARIANCE_MASK)
    else:
        zero = v == 0
    return v.sqrt().add_(group["eps"]), zero


def _adam_step(x: torch.Tensor, m: torch.Tensor, denominator: torch.Tensor, zero, group: dict) -> torch.Tensor:
    """-lr (m / (sqrt(v) + eps) + weight_decay x), op for op as DeepSpeed's ZeroOneAdam rounds it,
    from ``_denominator``'s pair; 0 where ``zero``."""
    update = m / denominator
    if group["weight_decay"] > 0:
        update += group["weight_decay"] * x
    step = -group["lr"] * update
    return step if zero is None else step.masked_fill_(zero, 0.0)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        why = (" (the variance phase runs steps 1..var_freeze_step; DeepSpeed too runs at least one: a variance "
               "frozen before any step would be 0)" if name == "var_freeze_step" else "")
        raise ValueError(f"ZeroOneAdam: {name}={value!r} must be an int >= {low}{why}")
