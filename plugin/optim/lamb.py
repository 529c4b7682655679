"""1-bit LAMB (Li et al. 2021) as DeepSpeed 0.16's OnebitLamb runs it, with CD-Adam as an
optional compressed warm-up."""
from __future__ import annotations

import logging
import math
import warnings

import torch

from ..presets import preset
from .base import CompressedOptimizer, check_range
from .onebit import (ZERO_VARIANCE_MASK, _backend, _exp_avg_mask_views, _freeze_running_max, apply_masks,
                     check_floor, exp_avg_masks, floor_settings, floor_variance_, mask_zero_variance)

#: per-parameter state: the running average of the LAMB coefficient (frozen at the freeze),
#: the last step's factor on it, and the momentum's scale before compression (python floats)
LAMB_COEFF, LAST_FACTOR, SCALING_COEFF = "lamb_coeff_freeze", "last_factor", "scaling_coeff"
#: per-parameter state after the freeze: the variance re-estimated from the averaged momenta
FRESH = "exp_avg_sq_fresh"
#: param group keys taken from the running script, not the checkpoint, by load_state_dict
_RUNNING_CONFIG = ("freeze_step", "exp_avg_mask", "coeff_beta", "factor_max", "factor_min", "factor_threshold",
                   "mask_zero_variance", "variance_floor")
_log = logging.getLogger("taciturn")


class OneBitLamb(CompressedOptimizer):
    """1-bit LAMB: a LAMB warm-up of ``freeze_step`` steps that tracks each tensor's LAMB
    coefficient, then the variance and the coefficient are frozen and the momentum is averaged
    through two-way error-feedback compression, the coefficient rescaled each step by how far
    a fresh variance estimate has moved from the frozen one. No bias correction, as in DeepSpeed.

    Steps are counted as ``step()`` calls that ran (skipped non-finite steps do not count); the
    warm-up runs while the count before the step is < ``freeze_step``, so steps 1..freeze_step
    are warm-up steps and step freeze_step + 1 is the first compressed one (as ``OneBitAdam``).
    DeepSpeed spends its first ``step()`` call on setting up buffers (nothing moves) and counts
    it, so its warm-up runs freeze_step - 1 LAMB steps where taciturn's runs freeze_step. A
    parameter without a gradient on a rank counts as a zero gradient there (DeepSpeed's warm-up
    skips such a parameter, which a rank missing it alone would turn into diverged ranks).

    Per tensor x (its fp32 master), with lr, betas (b1, b2), eps, weight_decay (wd), max_coeff,
    min_coeff, coeff_beta, factor_min, factor_max, factor_threshold from its param group:

    Warm-up, ``warmup="lamb"`` (DeepSpeed's): g the fp32 mean gradient (uncompressed, 32 bits
    per element each way); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; u = m / (sqrt(v) + eps)
    + wd x; c = clamp(||x|| / ||u||, min_coeff, max_coeff), or 1 when ||x|| or ||u|| is 0;
    when c != 1, lamb_coeff_freeze = coeff_beta lamb_coeff_freeze + (1-coeff_beta) c (from 0,
    no bias correction: keep 1/(1 - coeff_beta) well under ``freeze_step``); x = x - lr c u.
    ``warmup="cdadam"``: g is CD-Adam's Markov-compressed mean gradient (about 1.03 bits per
    element each way with 1024-element blocks, from step 1) and the update takes CD-Adam's
    running max v^ = max(v^, v) in place of v (u = m / (sqrt(v^) + eps) + wd x, eps outside the
    root as in the rest of LAMB); at the freeze v^ becomes the frozen v and the warm-up's Markov
    state is freed.

    At the freeze (before the first compressed step): v is frozen; v_fresh = v; each tensor's
    s = mean over the non-empty tensors of (||m_k|| / sqrt(numel_k)), divided by its own
    ||m|| / sqrt(numel) (``scaling_coeff``, 1 for a tensor with empty or zero momentum), which
    puts the tensors on one scale before compression; lamb_coeff_freeze stops changing.

    Compressed steps: m_last = m; m = b1 m + (1-b1) g_local; m = EF-compressed average of m s
    (both directions, ``compressor``, default ``block_sign``; errors from zero at the freeze),
    divided by s, times the group's ``exp_avg_mask`` when present; g_rec = (m - b1 m_last) /
    (1-b1); v_fresh = b2 v_fresh + (1-b2) g_rec^2; p = m / (sqrt(v) + eps); u = p + wd x;
    f = max((sqrt(v) + eps) / (sqrt(v_fresh) + eps)); with wd > 0, r = min(1, ||p|| / ||u||)
    and f = f r + (1 - r); f is clamped to [factor_min, factor_max], then to [last_factor
    (1 - factor_threshold), last_factor (1 + factor_threshold)]; last_factor = f (from 1);
    x = x - lr lamb_coeff_freeze f u. An empty tensor keeps its last_factor.

    Frozen variances that are 0 or tiny: the 1-bit momentum gives every element of a block
    +-its scale, never 0, so m / (sqrt(v) + eps) moves such an element by about
    lr coeff scale / sqrt(v) per step (with the LAMB warm-up the model diverged within a few steps
    of the freeze on Fashion-MNIST, ``scripts/bench_tta.py --lamb``). As ``OneBitAdam``:
    ``mask_zero_variance`` (default True) zeroes the averaged momentum where the frozen v is
    exactly 0 (the mask ``state[p]["zero_variance_mask"]``, made once at the freeze and re-derived
    on load), and ``variance_floor`` (default 0.1; 0 with ``compressor="identity"``) raises every
    non-zero v, at the freeze, to at least that fraction of its block's mean (the momentum
    compressor's blocks), before v_fresh starts from it. ``mask_zero_variance=False,
    variance_floor=0`` is DeepSpeed's exact form.

    Ranks are bit-identical after every step (parameters, m, v, v_fresh and the coefficients):
    the warm-up updates from the same averaged gradient, the compressed steps from the same
    averaged momentum, and every coefficient is computed from those alone. Where DeepSpeed
    compresses nothing on one rank (n = 1), taciturn runs the same compressed exchange as on n.

    State: ``exp_avg``, ``exp_avg_sq`` and the python floats ``lamb_coeff_freeze`` and
    ``last_factor`` per parameter; from the freeze on ``exp_avg_sq_fresh`` and the float
    ``scaling_coeff``; with ``warmup="cdadam"`` the warm-up's ``max_exp_avg_sq``. All of it and
    the compression state are in ``state_dict()``, so a resumed run is bit-identical before
    and after the freeze (each rank saves and loads its own ``state_dict()``; DeepSpeed instead
    drops the errors on load, and zeroes lamb_coeff_freeze when it loads a warm-up checkpoint).
    ``load_state_dict`` keeps the running script's ``freeze_step`` and ``exp_avg_mask`` (as
    DeepSpeed does) and ``coeff_beta``, ``factor_max``, ``factor_min``, ``factor_threshold``
    (DeepSpeed reads those from the running script too); the other hyper-parameters come from
    the checkpoint, as in torch. ``freeze_step`` may be changed on a live optimizer
    (``opt.freeze_step = n``) or by the loading script: the variance is frozen exactly while
    the step count is >= ``freeze_step``. Raised past the step after the freeze, the warm-up
    resumes from the frozen variance with lamb_coeff_freeze = 0, last_factor = 1 and no
    scaling_coeff (DeepSpeed's load does the same), the errors restarted from zero.

    ``exp_avg_mask`` (a param group key) takes the group's parameters' shape or one element per
    element of the group's parameters concatenated in order (``OneBitAdam``'s rule).
    ``cuda_aware`` and ``comm_backend_name`` are accepted for DeepSpeed configs and mapped as
    ``OneBitAdam`` maps them. ``max_grad_norm`` is accepted and unused, as in DeepSpeed (a
    value > 0 warns: clip with the engine's ``gradient_clipping``); ``eps_inside_sqrt`` and
    ``bias_correction``, which DeepSpeed accepts and ignores, are refused when True.
    ``lamb_coeffs`` / ``get_lamb_coeffs()`` hold the coefficients of the last step (c in the
    warm-up, lamb_coeff_freeze f after), as DeepSpeed's.
    """

    unsharded_because = ("1-bit LAMB averages the momentum, not the gradient, and scales each tensor's update by a "
                         "coefficient computed from the whole tensor (its norm and its frozen LAMB coefficient), so "
                         "neither the momentum nor the update rule can live on one chunk owner")

    def __init__(self, params, lr=1e-3, freeze_step=100000, betas=(0.9, 0.999), eps=1e-8, eps_inside_sqrt=False,
                 weight_decay=0.0, max_grad_norm=0.0, max_coeff=10.0, min_coeff=0.01, amsgrad=False,
                 cuda_aware=False, comm_backend_name=None, coeff_beta=0.9, factor_max=4.0, factor_min=0.5,
                 factor_threshold=0.1, warmup="lamb", compressor="block_sign", block_size=1024, ratio=None, k=None,
                 compressor_options=None, bias_correction=False, mask_zero_variance=True, variance_floor=None,
                 **kwargs):
        if amsgrad:
            raise ValueError("OneBitLamb: amsgrad=True is not supported (1-bit LAMB freezes the variance); remove "
                             "it, or use CDAdam for AMSGrad with compression")
        if bias_correction:
            raise ValueError("OneBitLamb: bias_correction=True is not supported (1-bit LAMB has none; DeepSpeed's "
                             "OnebitLamb accepts the key and ignores it); remove it")
        if eps_inside_sqrt:
            raise ValueError("OneBitLamb: eps_inside_sqrt=True is not supported (DeepSpeed's OnebitLamb accepts it "
                             "and ignores it: eps is added outside the square root); remove it")
        if warmup not in ("lamb", "cdadam"):
            raise ValueError(f"OneBitLamb: warmup={warmup!r} must be 'lamb' (DeepSpeed's: uncompressed LAMB) or "
                             "'cdadam' (CD-Adam's compressed gradients into LAMB from step 1)")
        _check_freeze_step(freeze_step)
        check_range("eps", eps, 0.0)
        check_range("max_grad_norm", max_grad_norm or 0.0, 0.0)
        if max_grad_norm:
            warnings.warn(f"OneBitLamb: max_grad_norm={max_grad_norm!r} is unused, as in DeepSpeed's OnebitLamb: "
                          "clip with the engine's gradient_clipping or torch.nn.utils.clip_grad_norm_", stacklevel=2)
        check_range("min_coeff", min_coeff, 0.0)
        _check_order("max_coeff", max_coeff, "min_coeff", min_coeff, "the LAMB coefficient")
        check_range("coeff_beta", coeff_beta, 0.0, 1.0, hi_open=True)
        check_range("factor_min", factor_min, 0.0, lo_open=True)
        _check_order("factor_max", factor_max, "factor_min", factor_min, "the factor on the frozen LAMB coefficient")
        check_range("factor_threshold", factor_threshold, 0.0)
        if not isinstance(mask_zero_variance, bool):
            raise ValueError(f"OneBitLamb: mask_zero_variance={mask_zero_variance!r} must be True or False")
        if comm_backend_name is not None and "process_group" not in kwargs:
            kwargs["process_group"] = _backend(comm_backend_name, "OneBitLamb")
        warm = preset("identity") if warmup == "lamb" else preset("cdadam").configure(block_size=block_size)
        momentum = preset("dist_ef_block_sign").configure(compressor, block_size=block_size, ratio=ratio, k=k,
                                                          options=compressor_options)
        variance_floor, self._floor_block = floor_settings(variance_floor, momentum, "OneBitLamb")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                        max_coeff=max_coeff, min_coeff=min_coeff, freeze_step=freeze_step, coeff_beta=coeff_beta,
                        factor_max=factor_max, factor_min=factor_min, factor_threshold=factor_threshold,
                        mask_zero_variance=mask_zero_variance, variance_floor=variance_floor)
        self.warmup = warmup
        self.cuda_aware = cuda_aware
        self.lamb_coeffs = []
        super().__init__(params, defaults, {"warmup": warm, "momentum": momentum}, **kwargs)
        for _, p in self._trainable:
            self._coefficients(p)

    # ------------------------------------------------------------------ configuration
    @property
    def freeze_step(self) -> int:
        return int(self.param_groups[0]["freeze_step"])

    @freeze_step.setter
    def freeze_step(self, value: int) -> None:
        _check_freeze_step(value)
        for group in self.param_groups:
            group["freeze_step"] = int(value)

    @property
    def lamb_freeze_key(self) -> bool:
        """DeepSpeed's name for whether the variance is frozen (set at the freeze, carried by checkpoints)."""
        return bool(self.compression.flat.get("frozen", False))

    def get_lamb_coeffs(self) -> list:
        """The last step's LAMB coefficients, one per trainable parameter (DeepSpeed's)."""
        return self.lamb_coeffs

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _exp_avg_mask_views(self.param_groups[-1], len(self.param_groups) - 1, "OneBitLamb")
        check_floor(self.param_groups[-1].get("variance_floor", 0.0), len(self.param_groups) - 1, "OneBitLamb")

    def load_state_dict(self, state_dict, reset_compression_state: bool = False):
        """The checkpoint's state, with the running script's ``freeze_step``, ``exp_avg_mask``
        and coefficient settings (see the class docstring); then frozen or thawed to match the
        loaded step count and the running ``freeze_step``."""
        super().load_state_dict(self.with_running_config(state_dict, _RUNNING_CONFIG), reset_compression_state)
        for _, p in self._trainable:
            self._coefficients(p)
        if self.lamb_freeze_key:
            self.compression.free("warmup")  # a compression reset brings it back as zeros
            mask_zero_variance(self)
        self._follow_freeze_step()

    # ------------------------------------------------------------------ the freeze
    def _coefficients(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        st.setdefault(LAMB_COEFF, 0.0)
        st.setdefault(LAST_FACTOR, 1.0)
        return st

    def _follow_freeze_step(self) -> None:
        frozen = self.global_step >= self.freeze_step
        if frozen and not self.lamb_freeze_key:
            self._freeze()
        elif not frozen and self.lamb_freeze_key:
            self._thaw()

    def _freeze(self):
        """Freeze v (CD-Adam's running max with ``warmup="cdadam"``), start v_fresh from it, set
        each tensor's scaling_coeff and free the warm-up's compression state. What a parameter
        already has (a checkpoint loaded with a compression reset) is kept."""
        if self.warmup == "cdadam":
            _freeze_running_max(self)
        missing = [p for _, p in self._trainable if SCALING_COEFF not in self.state[p]]
        if missing:
            scales = {}
            for _, p in self._trainable:
                m = self.param_state(p, "exp_avg")[0]
                if m.numel():
                    scales[p] = (torch.linalg.vector_norm(m) / math.sqrt(m.numel())).item()
            united = sum(scales.values()) / len(scales) if scales else 1.0
            for p in missing:
                scale = scales.get(p, 0.0)
                self.state[p][SCALING_COEFF] = united / scale if scale > 0 and united > 0 else 1.0
        for gi, p in self._trainable:
            st = self.state[p]
            if FRESH not in st:
                v = self.param_state(p, "exp_avg_sq")[0]
                if self.param_groups[gi]["variance_floor"] > 0:
                    floor_variance_(v, self.param_groups[gi]["variance_floor"], self._floor_block)
                st[FRESH] = v.clone()
        mask_zero_variance(self)
        self.compression.free("warmup")
        self.compression.flat["frozen"] = True
        _log.info("OneBitLamb: variance and LAMB coefficients frozen at step %d; compressed momentum from here on",
                  self.global_step)

    def _thaw(self):
        """Back to the warm-up (``freeze_step`` raised past the step): as DeepSpeed's load does,
        lamb_coeff_freeze restarts from 0, last_factor from 1, scaling_coeff and v_fresh are
        dropped; the compression state of both exchanges restarts from zero; ``warmup="cdadam"``
        restarts its running max from the frozen variance."""
        self.compression.flat = {**self.compression.flat, **self.compression.zeros("warmup"),
                                 **self.compression.zeros("momentum"), "frozen": False}
        for _, p in self._trainable:
            st = self.state[p]
            st[LAMB_COEFF], st[LAST_FACTOR] = 0.0, 1.0
            st.pop(SCALING_COEFF, None)
            st.pop(FRESH, None)
            st.pop(ZERO_VARIANCE_MASK, None)
            if self.warmup == "cdadam" and "exp_avg_sq" in st:
                st["max_exp_avg_sq"] = st["exp_avg_sq"].clone()

    # ------------------------------------------------------------------ steps
    def _step(self):
        self._follow_freeze_step()
        self.lamb_coeffs = []
        if self.lamb_freeze_key:
            self._compressed_step()
        else:
            self._warmup_step()

    def _warmup_step(self):
        for (gi, p), g in zip(self._trainable, self.communicate("warmup", self.local_grads())):
            group = self.param_groups[gi]
            b1, b2 = group["betas"]
            m, v = self.param_state(p, "exp_avg", "exp_avg_sq")
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if self.warmup == "cdadam":
                vmax = self.param_state(p, "max_exp_avg_sq")[0]
                torch.maximum(vmax, v, out=vmax)
                v = vmax
            x = self.master(p)
            update = _lamb_direction(x, m, v, group)
            coeff = _trust_ratio(x, update, group)
            st = self._coefficients(p)
            if coeff != 1.0:
                st[LAMB_COEFF] = group["coeff_beta"] * st[LAMB_COEFF] + (1 - group["coeff_beta"]) * coeff
            self.lamb_coeffs.append(coeff)
            x.add_(update, alpha=-group["lr"] * coeff)
            self.write_back(p, x)

    def _compressed_step(self):
        last, local = [], []
        for (gi, p), g in zip(self._trainable, self.local_grads()):
            b1 = self.param_groups[gi]["betas"][0]
            m = self.param_state(p, "exp_avg")[0]
            last.append(m.clone())
            local.append(m.mul_(b1).add_(g, alpha=1 - b1).mul_(self.state[p][SCALING_COEFF]))
        masks = exp_avg_masks(self.param_groups, "OneBitLamb")
        averaged = self.communicate("momentum", local)
        for (gi, p), m_avg, m_last in zip(self._trainable, averaged, last):
            group = self.param_groups[gi]
            b1, b2 = group["betas"]
            st = self.state[p]
            m, v, fresh = st["exp_avg"], st["exp_avg_sq"], st[FRESH]
            m.copy_(m_avg).div_(st[SCALING_COEFF])
            apply_masks(self, p, m, masks.get(p), group)
            g_rec = (m - m_last * b1) / (1 - b1)
            fresh.mul_(b2).addcmul_(g_rec, g_rec, value=1 - b2)
            x = self.master(p)
            denom = v.sqrt().add_(group["eps"])
            prelim = m / denom
            update = prelim + group["weight_decay"] * x if group["weight_decay"] > 0 else prelim
            if p.numel():
                factor = _factor(denom, fresh, prelim, update, st[LAST_FACTOR], group)
            else:
                factor = st[LAST_FACTOR]
            st[LAST_FACTOR] = factor
            coeff = st[LAMB_COEFF] * factor
            self.lamb_coeffs.append(coeff)
            x.add_(update, alpha=-group["lr"] * coeff)
            self.write_back(p, x)


def _lamb_direction(x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, group: dict) -> torch.Tensor:
    """u = m / (sqrt(v) + eps) + wd x (a new tensor)."""
    update = m / (v.sqrt() + group["eps"])
    if group["weight_decay"] > 0:
        update.add_(x, alpha=group["weight_decay"])
    return update


def _trust_ratio(x: torch.Tensor, update: torch.Tensor, group: dict) -> float:
    """LAMB's coefficient ||x|| / ||u|| clamped to [min_coeff, max_coeff]; 1 when either norm is 0."""
    weight_norm = torch.linalg.vector_norm(x)
    update_norm = torch.linalg.vector_norm(update)
    if weight_norm == 0 or update_norm == 0:
        return 1.0
    return min(max((weight_norm / update_norm).item(), group["min_coeff"]), group["max_coeff"])


def _factor(denom: torch.Tensor, fresh: torch.Tensor, prelim: torch.Tensor, update: torch.Tensor,
            last_factor: float, group: dict) -> float:
    """The factor on the frozen LAMB coefficient: how much smaller the fresh variance's
    denominator got than the frozen one, at most (weighted towards 1 by the share of the
    weight decay in the update), clamped to [factor_min, factor_max] and to within
    factor_threshold of ``last_factor``."""
    factor = (denom / fresh.sqrt().add_(group["eps"])).max().item()
    if group["weight_decay"] > 0:
        update_norm = torch.linalg.vector_norm(update)
        ratio = min(1.0, (torch.linalg.vector_norm(prelim) / update_norm).item()) if update_norm > 0 else 1.0
        factor = factor * ratio + (1.0 - ratio)
    factor = min(max(factor, group["factor_min"]), group["factor_max"])
    threshold = group["factor_threshold"]
    return min(max(factor, last_factor * (1.0 - threshold)), last_factor * (1.0 + threshold))


def _check_freeze_step(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"OneBitLamb: freeze_step={value!r} must be an int >= 1 (the LAMB coefficients are "
                         "averaged during the warm-up; frozen before any step they would be 0 and nothing would move)")


def _check_order(hi_name: str, hi, lo_name: str, lo, what: str) -> None:
    if not hi >= lo:
        raise ValueError(f"OneBitLamb: {hi_name}={hi!r} must be >= {lo_name}={lo!r} ({what} is clamped to "
                         f"[{lo_name}, {hi_name}]); raise {hi_name} or lower {lo_name}")
