"""1-bit Adam (Tang et al. 2021), with CD-Adam as an optional compressed warm-up."""
from __future__ import annotations

import logging

import torch

from ..presets import preset
from .base import CompressedOptimizer, check_range
from .functional import amsgrad_, frozen_adam_

#: per-parameter state after the freeze: True where the frozen variance is exactly 0
ZERO_VARIANCE_MASK = "zero_variance_mask"
#: per-parameter state after the freeze: the variance floor fraction applied to it (a float)
VARIANCE_FLOORED = "variance_floored"
#: default ``variance_floor`` (scripts/bench_accuracy.py, BENCHMARKS.md "Accuracy parity")
DEFAULT_VARIANCE_FLOOR = 0.1
_log = logging.getLogger("taciturn")


class OneBitAdam(CompressedOptimizer):
    """1-bit Adam: a warm-up of ``freeze_step`` steps, then the variance is frozen and the
    momentum is averaged through two-way error-feedback compression.

    ``warmup="adam"`` (Tang et al.): uncompressed Adam during the warm-up (fp32 allreduce of
    the gradients, 32 bits per element per direction). ``warmup="cdadam"``: CD-Adam during
    the warm-up (Markov-compressed gradients from step 1, about 1.03 bits per element per
    direction with 1024-element blocks, so the warm-up costs ~31x fewer bytes); at the freeze
    the variance CD-Adam built (its running max) becomes the frozen variance.

    After the freeze, every step: m = b1 m + (1-b1) g_local; m = EF-compressed average of m
    (both directions, ``compressor``, default ``block_sign``); m is masked by the group's
    ``exp_avg_mask`` when present; x = x - lr (m / (sqrt(v) + eps) + weight_decay x).
    No bias correction, as in DeepSpeed's OneBitAdam.

    ``exp_avg_mask`` (a param group key, multiplied into the averaged momentum) takes either
    shape: the shape of the group's parameters (every parameter of the group has it; the mask
    applies to each), or one element per element of the group's parameters concatenated in
    group order, in any shape with that many elements (DeepSpeed's ``torch.flatten(mask)``,
    made for its flattened fp16 groups). Any other size is refused when the group is added,
    naming both accepted sizes.

    ``variance_floor`` (default None: 0.1, or 0 with ``compressor="identity"``, so that the
    identity compressor still gives the uncompressed algorithm, Adam with a frozen variance;
    the group then holds the number used): at the freeze, every non-zero frozen variance is raised
    to at least ``variance_floor`` times the mean variance of its block, the blocks of the
    momentum's compressor (``block_size`` elements inside each tensor for ``block_sign``, the
    last one shorter; the whole tensor for the other compressors):
    v = max(v, variance_floor * mean_b(v)) where v > 0 (the mean over the block's elements,
    zeros included; exact zeros are left to ``mask_zero_variance``). Why: the 1-bit momentum
    gives every element of a block +-the block's scale, so an element whose variance is tiny but
    not zero (a weight reading from a ReLU unit that rarely fired in the warm-up) moves by about
    lr * scale / sqrt(v) per step; with uncompressed Adam's warm-up these steps blow the model up
    within a few steps of the freeze (scripts/bench_tta.py, BENCHMARKS.md "Accuracy parity").
    The floor bounds every step by about lr / sqrt(variance_floor) times the block's ratio of
    scale to root-mean variance. ``variance_floor=0`` is Tang et al.'s (and DeepSpeed's)
    exact form. The floor is applied once per freeze (``state[p]["variance_floored"]`` records
    the fraction used, so a repeated freeze leaves v alone); the floored variance is the frozen
    ``exp_avg_sq``, saved in checkpoints as it is.

    ``mask_zero_variance`` (default True): at the freeze, the elements whose frozen variance is
    exactly 0 (gradient always 0 during the warm-up: input features that are always 0, ReLU
    units that never fired, unused embedding rows) get their averaged momentum masked to 0 for
    the rest of the run, on top of any ``exp_avg_mask``. Without it the 1-bit momentum of such an
    element is +-scale, never 0, and the update moves it by about lr * scale / eps every step
    (DeepSpeed's behaviour, where ``exp_avg_mask`` is the only remedy). Tiny but non-zero
    variances are not masked: ``variance_floor`` is their remedy. The mask is a bool tensor
    ``state[p]["zero_variance_mask"]``, kept for the parameters that have such elements; loading
    a checkpoint re-derives it from the frozen variance under the running script's setting, as
    the running script's ``exp_avg_mask`` wins over the checkpoint's.

    At the freeze, ``warmup="cdadam"`` frees the warm-up's Markov sequences and running max.
    ``freeze_step`` may be changed on a live optimizer (``opt.freeze_step = n`` or in a param
    group) or by the script that loads a checkpoint (the running value wins, as in DeepSpeed):
    the variance is frozen exactly while the step count is >= ``freeze_step``. Raised past the
    current step after the freeze, the warm-up resumes from the frozen variance (CD-Adam's
    running max restarts from it) with its compression state, and the momentum's error
    feedback, restarted from zero; the variance is frozen (and masked) again at the new
    ``freeze_step``. Every rank decides from the same step and ``freeze_step``.

    ``cuda_aware`` and ``comm_backend_name`` are accepted for DeepSpeed configs: "nccl",
    "compressed" and "gloo" use torch.distributed (its process group's backend, whatever it
    is: "nccl" on a gloo job logs a warning on rank 0), "mpi" the mpi4py communicator.
    """

    unsharded_because = ("1-bit Adam averages the momentum, not the gradient: every worker updates its own momentum "
                         "from its local gradient before compression, so the momentum cannot live on one chunk "
                         "owner, and a sharded frozen-variance phase would send the model change instead of the "
                         "momentum, which is no longer 1-bit Adam")

    def __init__(self, params, lr=1e-3, freeze_step=100000, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 warmup="adam", compressor="block_sign", block_size=1024, ratio=None, k=None, compressor_options=None,
                 cuda_aware=False, comm_backend_name=None, amsgrad=False, bias_correction=False,
                 mask_zero_variance=True, variance_floor=None, **kwargs):
        if amsgrad:
            raise ValueError("OneBitAdam: amsgrad=True is not supported (1-bit Adam freezes the variance)")
        if bias_correction:
            raise ValueError("OneBitAdam: bias_correction=True is not supported (1-bit Adam has none)")
        if warmup not in ("adam", "cdadam"):
            raise ValueError(f"OneBitAdam: warmup={warmup!r} must be 'adam' (uncompressed, Tang et al.) or "
                             "'cdadam' (CD-Adam compressed from step 1)")
        if not isinstance(freeze_step, int) or freeze_step < 0:
            raise ValueError(f"OneBitAdam: freeze_step={freeze_step!r} must be an int >= 0")
        if not isinstance(mask_zero_variance, bool):
            raise ValueError(f"OneBitAdam: mask_zero_variance={mask_zero_variance!r} must be True or False")
        check_range("eps", eps, 0.0)
        if comm_backend_name is not None and "process_group" not in kwargs:
            kwargs["process_group"] = _backend(comm_backend_name)
        warm = preset("identity") if warmup == "adam" else preset("cdadam").configure(block_size=block_size)
        momentum = preset("dist_ef_block_sign").configure(compressor, block_size=block_size, ratio=ratio, k=k,
                                                          options=compressor_options)
        exchanges = {"warmup": warm, "momentum": momentum}
        variance_floor, self._floor_block = floor_settings(variance_floor, momentum, "OneBitAdam")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, freeze_step=freeze_step,
                        mask_zero_variance=mask_zero_variance, variance_floor=variance_floor)
        self.warmup = warmup
        self.cuda_aware = cuda_aware
        super().__init__(params, defaults, exchanges, **kwargs)

    @property
    def freeze_step(self) -> int:
        return int(self.param_groups[0]["freeze_step"])

    @freeze_step.setter
    def freeze_step(self, value: int) -> None:
        for group in self.param_groups:
            group["freeze_step"] = int(value)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        check_floor(self.param_groups[-1].get("variance_floor", 0.0), len(self.param_groups) - 1)
        _exp_avg_mask_views(self.param_groups[-1], len(self.param_groups) - 1)

    def load_state_dict(self, state_dict, reset_compression_state: bool = False):
        """As DeepSpeed's OneBitAdam: the running script's ``freeze_step`` and ``exp_avg_mask``
        win over the checkpoint's (a phase resumes with a new ``freeze_step``, masks change
        between phases, e.g. BERT's 128 -> 512 tokens), and so does ``mask_zero_variance``. The
        other hyper-parameters come from the checkpoint, as in torch. The variance is then
        frozen or thawed to match the loaded step count and the running ``freeze_step``; past
        the freeze, the zero-variance masks are re-derived from the loaded frozen variance
        (torch's loader casts the bool masks to the parameter's dtype). A checkpoint saved
        after the freeze holds no warm-up compression state."""
        super().load_state_dict(self.with_running_config(state_dict, _RUNNING_CONFIG), reset_compression_state)
        if self._frozen and self.global_step >= self.freeze_step:
            mask_zero_variance(self)
        self._follow_freeze_step()

    @property
    def _frozen(self) -> bool:
        """Whether the variance is frozen (set at the freeze, carried by checkpoints)."""
        return bool(self.compression.flat.get("frozen", False))

    @property
    def adam_freeze_key(self) -> bool:
        """DeepSpeed's OneBitAdam name for whether the variance is frozen (read-only here: the
        freeze follows step vs ``freeze_step``), for the scripts and tests that read it."""
        return self._frozen

    def _follow_freeze_step(self) -> None:
        """Freeze or thaw so that the variance is frozen exactly when step >= ``freeze_step``."""
        frozen = self.global_step >= self.freeze_step
        if frozen and not self._frozen:
            self._freeze()
        elif not frozen and self._frozen:
            self._thaw()

    def _step(self):
        self._follow_freeze_step()
        if self._frozen:
            self._compressed_step()
        else:
            self._warmup_step()

    def _freeze(self):
        """Before the first compressed step: freeze the variance (CD-Adam's running max with
        ``warmup="cdadam"``), mask its zeros and free the warm-up's compression state.
        Repeating it is harmless (a checkpoint without the ``frozen`` flag, a compression state
        reset): the frozen variance, hence the mask, does not change."""
        if self.warmup == "cdadam":
            _freeze_running_max(self)
        self._floor_variance()
        masked = mask_zero_variance(self)
        self.compression.free("warmup")
        self.compression.flat["frozen"] = True
        if masked:
            _log.info("OneBitAdam: variance frozen at step %d; the momentum of %d element(s) whose variance is 0 "
                      "is masked to 0 (mask_zero_variance=True)", self.global_step, masked)

    def _thaw(self):
        """Back to the warm-up after the freeze (``freeze_step`` raised): the warm-up's
        compression state and the momentum's error feedback (made for the momenta of the
        phase that ends) restart from zero; ``warmup="cdadam"`` restarts its running max from
        the frozen variance (which was that max); the masks are dropped until the next freeze."""
        self.compression.flat = {**self.compression.flat, **self.compression.zeros("warmup"),
                                    **self.compression.zeros("momentum"), "frozen": False}
        for _, p in self._trainable:
            st = self.state[p]
            st.pop(ZERO_VARIANCE_MASK, None)
            st.pop(VARIANCE_FLOORED, None)
            if self.warmup == "cdadam" and "exp_avg_sq" in st:
                st["max_exp_avg_sq"] = st["exp_avg_sq"].clone()

    def _floor_variance(self) -> None:
        """``variance_floor`` on the frozen variance of every parameter not floored yet in this
        freeze (``state[p]["variance_floored"]`` is then the fraction used)."""
        for gi, p in self._trainable:
            st = self.state[p]
            if VARIANCE_FLOORED in st:
                continue
            fraction = float(self.param_groups[gi].get("variance_floor", 0.0))
            if fraction > 0:
                floor_variance_(self.param_state(p, "exp_avg_sq")[0], fraction, self._floor_block)
            st[VARIANCE_FLOORED] = fraction

    def _warmup_step(self):
        grads = self.communicate("warmup", self.local_grads())
        for (gi, p), g in zip(self._trainable, grads):
            group = self.param_groups[gi]
            b1, b2 = group["betas"]
            m, v = self.param_state(p, "exp_avg", "exp_avg_sq")
            if self.warmup == "cdadam":
                _cdadam_update(self, p, g, group)
            else:
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                self._apply(p, m, v, group)

    def _compressed_step(self):
        local = []
        for (gi, p), g in zip(self._trainable, self.local_grads()):
            b1 = self.param_groups[gi]["betas"][0]
            m = self.param_state(p, "exp_avg")[0]
            local.append(m.mul_(b1).add_(g, alpha=1 - b1))
        masks = exp_avg_masks(self.param_groups, "OneBitAdam")
        for (gi, p), m_avg in zip(self._trainable, self.communicate("momentum", local)):
            group = self.param_groups[gi]
            m, v = self.param_state(p, "exp_avg", "exp_avg_sq")
            m.copy_(m_avg)
            apply_masks(self, p, m, masks.get(p), group)
            self._apply(p, m, v, group)

    def _apply(self, p, m, v, group):
        x = self.master(p)
        frozen_adam_(x, m, v, lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"])
        self.write_back(p, x)


def _cdadam_update(opt: CompressedOptimizer, p: torch.Tensor, g: torch.Tensor, group: dict) -> None:
    """One CD-Adam warm-up step of ``p`` from its Markov-compressed gradient ``g``: decoupled
    weight decay, then AMSGrad (``exp_avg``, ``exp_avg_sq``, running max ``max_exp_avg_sq``)."""
    b1, b2 = group["betas"]
    m, v, vmax = opt.param_state(p, "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    x = opt.master(p)
    if group["weight_decay"]:
        x.mul_(1 - group["lr"] * group["weight_decay"])
    amsgrad_(x, g, m, v, vmax, lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"])
    opt.write_back(p, x)


def mask_zero_variance(opt: CompressedOptimizer) -> int:
    """Set ``state[p]["zero_variance_mask"]`` where the frozen variance ``exp_avg_sq`` is exactly
    0, in the groups with ``mask_zero_variance`` (dropped in the others); the number of masked
    elements (one host read, at the freeze or a load, never per step)."""
    masked = 0
    for gi, p in opt._trainable:
        st = opt.state[p]
        st.pop(ZERO_VARIANCE_MASK, None)
        if not opt.param_groups[gi]["mask_zero_variance"]:
            continue
        zero = opt.param_state(p, "exp_avg_sq")[0] == 0
        count = int(zero.sum())
        if count:
            st[ZERO_VARIANCE_MASK] = zero
            masked += count
    return masked


def apply_masks(opt: CompressedOptimizer, p: torch.Tensor, m: torch.Tensor, mask, group: dict) -> None:
    """Zero the masked elements of the averaged momentum ``m``: ``mask`` (p's part of the group's
    ``exp_avg_mask``, or None) and the zero-variance mask made at the freeze."""
    if mask is not None:
        m.mul_(mask.to(device=m.device, dtype=m.dtype))
    zero = opt.state[p].get(ZERO_VARIANCE_MASK)
    if zero is not None and group["mask_zero_variance"]:
        m.masked_fill_(zero, 0.0)


def floor_variance_(v: torch.Tensor, fraction: float, block_size=None) -> torch.Tensor:
    """In place: v = max(v, fraction * mean_b(v)) where v > 0, b the block of ``block_size``
    elements of the flattened ``v`` holding the element (the last block shorter; None: one
    block), the mean over all of the block's elements. Zeros stay 0. Returns ``v``."""
    flat = v.view(-1)
    d = flat.numel()
    if d == 0 or fraction <= 0:
        return v
    size = d if block_size is None else min(int(block_size), d)
    full = d // size * size
    floor = torch.empty_like(flat)
    if full:
        body = flat[:full].view(-1, size)
        floor[:full].view(-1, size).copy_(body.mean(dim=1, keepdim=True).expand_as(body))
    if full < d:
        floor[full:] = flat[full:].mean()
    floor.mul_(fraction)
    flat.copy_(torch.where(flat > 0, torch.maximum(flat, floor), flat))
    return v


def floor_settings(variance_floor, momentum, owner: str) -> tuple:
    """(the ``variance_floor`` fraction, the floor's block size) of an optimizer whose frozen
    variance divides the 1-bit values of the ``momentum`` preset: None is the default, 0.1, or 0
    with ``compressor="identity"`` (the floor is a remedy of lossy values; identity stays the
    uncompressed algorithm); the blocks are the compressor's (``block_sign``), else whole tensors."""
    if variance_floor is None:
        variance_floor = 0.0 if momentum.compressor == "identity" else DEFAULT_VARIANCE_FLOOR
    check_floor(variance_floor, owner=owner)
    block = dict(momentum.options).get("block_size") if momentum.compressor == "block_sign" else None
    return float(variance_floor), block


def exp_avg_masks(param_groups, owner: str) -> dict:
    """Each masked parameter's part of its group's ``exp_avg_mask`` (``_exp_avg_mask_views``)."""
    masks = {}
    for gi, group in enumerate(param_groups):
        views = _exp_avg_mask_views(group, gi, owner)
        if views is not None:
            masks.update(zip(group["params"], views))
    return masks


def check_floor(value, group=None, owner: str = "OneBitAdam") -> None:
    """Refuse a ``variance_floor`` outside [0, 1] (of ``group``, when given), naming ``owner``."""
    where = "" if group is None else f" (param group {group})"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{owner}: variance_floor={value!r}{where} must be a number in [0, 1] (a fraction of "
                         "the block's mean variance; 0 = DeepSpeed's and Tang et al.'s exact form)")


def _freeze_running_max(opt: CompressedOptimizer) -> None:
    """At the end of a CD-Adam warm-up: its running max becomes the frozen ``exp_avg_sq`` (and
    is freed). Parameters without a running max (already frozen) are left as they are."""
    for _, p in opt._trainable:
        st = opt.state[p]
        if "max_exp_avg_sq" in st:
            opt.param_state(p, "exp_avg_sq")[0].copy_(st.pop("max_exp_avg_sq"))


#: param group keys taken from the running script, not the checkpoint, by load_state_dict
_RUNNING_CONFIG = ("freeze_step", "exp_avg_mask", "mask_zero_variance", "variance_floor")


def _exp_avg_mask_views(group: dict, index: int, owner: str = "OneBitAdam"):
    """The group's ``exp_avg_mask`` as one tensor per parameter of the group (None without a
    mask): the mask itself when it has the shape of every parameter, else the parameters'
    slices of the flat mask. Any other size is a ValueError (from ``owner``) naming the two
    accepted ones."""
    mask = group.get("exp_avg_mask")
    if mask is None:
        return None
    params = group["params"]
    if not torch.is_tensor(mask):
        raise ValueError(f"{owner}: param group {index}'s exp_avg_mask is a {type(mask).__name__}; give a tensor "
                         "of 0s and 1s")
    if all(mask.shape == p.shape for p in params):
        return [mask] * len(params)
    sizes = [p.numel() for p in params]
    if mask.numel() == sum(sizes):
        return [piece.view(p.shape) for piece, p in zip(mask.reshape(-1).split(sizes), params)]
    shapes = dict.fromkeys(tuple(p.shape) for p in params)  # in group order, once each
    raise ValueError(f"{owner}: param group {index}'s exp_avg_mask has shape {tuple(mask.shape)} "
                     f"({mask.numel()} elements), which fits neither the shape of the group's parameters "
                     f"({', '.join(map(str, shapes))}) nor the group's {len(params)} parameter(s) flattened and "
                     f"concatenated in order ({sum(sizes)} elements, e.g. torch.flatten(mask) of a one-parameter "
                     "group); give one of those")


def _backend(name: str, owner: str = "OneBitAdam"):
    """Map DeepSpeed's ``comm_backend_name`` to a communicator spec available on this machine
    (``owner`` names the optimizer in the messages)."""
    key = str(name).lower()
    if key == "mpi":
        return "mpi"
    if key in ("nccl", "compressed", "gloo", "torch"):
        import torch.distributed as dist

        running = dist.get_backend() if dist.is_initialized() else None
        if key == "nccl" and running not in (None, "nccl") and dist.get_rank() == 0:
            _log.warning("%s: comm_backend_name='nccl' (optimizer.params.comm_backend_name in a DeepSpeed "
                         "config) names NCCL, but this job's torch.distributed process group runs %s: %s "
                         "communicates through that %s group. Set comm_backend_name to %r to silence this.",
                         owner, running, owner, running, running)
        return None
    raise ValueError(f"{owner}: comm_backend_name={name!r} must be 'nccl', 'compressed', 'gloo' (torch.distributed) "
                     "or 'mpi' (mpi4py)")
