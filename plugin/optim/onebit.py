"""1-bit Adam (Tang et al. 2021), with CD-Adam as an optional compressed warm-up."""
from __future__ import annotations

import logging
import warnings

from .base import TACITURN_KEY, CompressedOptimizer, PipelineSpec, check_range, codec
from .functional import amsgrad_, frozen_adam_

#: per-parameter state after the freeze: True where the frozen variance is exactly 0
ZERO_VARIANCE_MASK = "zero_variance_mask"
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

    ``mask_zero_variance`` (default True): at the freeze, the elements whose frozen variance is
    exactly 0 (gradient always 0 during the warm-up: input features that are always 0, ReLU
    units that never fired, unused embedding rows) get their averaged momentum masked to 0 for
    the rest of the run, on top of any ``exp_avg_mask``. Without it the 1-bit momentum of such an
    element is +-scale, never 0, and the update moves it by about lr * scale / eps every step
    (DeepSpeed's behaviour, where ``exp_avg_mask`` is the only remedy). Tiny but non-zero
    variances are not masked and can still blow up the same way. The mask is a bool tensor
    ``state[p]["zero_variance_mask"]``, kept for the parameters that have such elements; loading
    a checkpoint re-derives it from the frozen variance under the running script's setting, as
    the running script's ``exp_avg_mask`` wins over the checkpoint's.

    At the freeze, ``warmup="cdadam"`` frees the warm-up's Markov sequences and running max.
    ``freeze_step`` may be changed on a live optimizer (``opt.freeze_step = n`` or in a param
    group); raised past the current step after the freeze, the warm-up resumes with its
    compression state restarted from zero, and the variance is frozen (and masked) again at the
    new ``freeze_step``.

    ``cuda_aware`` and ``comm_backend_name`` are accepted for DeepSpeed configs: "nccl" and
    "gloo" use torch.distributed, "mpi" the mpi4py communicator.
    """

    def __init__(self, params, lr=1e-3, freeze_step=100000, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 warmup="adam", compressor="block_sign", block_size=1024, ratio=None, k=None, compressor_options=None,
                 cuda_aware=False, comm_backend_name=None, amsgrad=False, bias_correction=False,
                 mask_zero_variance=True, **kwargs):
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
        name, opts = codec(compressor, block_size=block_size, ratio=ratio, k=k, options=compressor_options)
        warm = (PipelineSpec("identity", "none", "none", True) if warmup == "adam" else
                PipelineSpec("block_sign", "markov", "markov", True, (("block_size", block_size),)))
        pipelines = {"warmup": warm, "momentum": PipelineSpec(name, "ef", "ef", True, opts)}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, freeze_step=freeze_step,
                        mask_zero_variance=mask_zero_variance)
        self.warmup = warmup
        self.cuda_aware = cuda_aware
        super().__init__(params, defaults, pipelines, **kwargs)

    @property
    def freeze_step(self) -> int:
        return int(self.param_groups[0]["freeze_step"])

    @freeze_step.setter
    def freeze_step(self, value: int) -> None:
        for group in self.param_groups:
            group["freeze_step"] = int(value)

    def load_state_dict(self, state_dict, reset_compression_state: bool = False):
        """As DeepSpeed's OneBitAdam: the ``exp_avg_mask`` of the running script wins over the
        checkpoint's (masks change between training phases, e.g. BERT's 128 -> 512 tokens), and
        so does ``mask_zero_variance``: past the freeze, the zero-variance masks are re-derived
        from the loaded frozen variance (torch's loader casts the bool masks to the parameter's
        dtype). A checkpoint saved after the freeze holds no warm-up compression state."""
        groups = [dict(g) for g in state_dict["param_groups"]]
        for mine, saved in zip(self.param_groups, groups):
            saved["mask_zero_variance"] = mine["mask_zero_variance"]
            if "exp_avg_mask" in mine:
                saved["exp_avg_mask"] = mine["exp_avg_mask"]
            else:
                saved.pop("exp_avg_mask", None)
        super().load_state_dict({**state_dict, "param_groups": groups}, reset_compression_state)
        if self._frozen:
            self._mask_zero_variance()

    @property
    def _frozen(self) -> bool:
        """Whether the variance is frozen (set at the freeze, carried by checkpoints)."""
        return bool(self.state[TACITURN_KEY].get("frozen", False))

    def _step(self):
        if self.global_step < self.freeze_step:
            if self._frozen:
                self._thaw()
            self._warmup_step()
        else:
            if not self._frozen:
                self._freeze()
            self._compressed_step()

    def _freeze(self):
        """Before the first compressed step: freeze the variance (CD-Adam's running max with
        ``warmup="cdadam"``), mask its zeros and free the warm-up's compression state.
        Repeating it is harmless (a checkpoint without the ``frozen`` flag, a compression state
        reset): the frozen variance, hence the mask, does not change."""
        if self.warmup == "cdadam":
            for _, p in self._trainable:
                st = self.state[p]
                if "max_exp_avg_sq" in st:
                    self.param_state(p, "exp_avg_sq")[0].copy_(st.pop("max_exp_avg_sq"))
        masked = self._mask_zero_variance()
        self.free_compression_state("warmup")
        self.state[TACITURN_KEY]["frozen"] = True
        if masked:
            _log.info("OneBitAdam: variance frozen at step %d; the momentum of %d element(s) whose variance is 0 "
                      "is masked to 0 (mask_zero_variance=True)", self.global_step, masked)

    def _thaw(self):
        """Back to the warm-up after the freeze (``freeze_step`` raised): the warm-up's
        compression state restarts from zero; the masks are dropped until the next freeze."""
        flat = self.state[TACITURN_KEY]
        flat.update(self.zero_compression_state("warmup"))
        flat["frozen"] = False
        for _, p in self._trainable:
            self.state[p].pop(ZERO_VARIANCE_MASK, None)

    def _mask_zero_variance(self) -> int:
        """Set ``state[p]["zero_variance_mask"]`` where the frozen variance is exactly 0, in the
        groups with ``mask_zero_variance`` (dropped in the others); the number of masked elements."""
        masked = 0
        for gi, p in self._trainable:
            st = self.state[p]
            st.pop(ZERO_VARIANCE_MASK, None)
            if not self.param_groups[gi]["mask_zero_variance"]:
                continue
            zero = self.param_state(p, "exp_avg_sq")[0] == 0
            count = int(zero.sum())
            if count:
                st[ZERO_VARIANCE_MASK] = zero
                masked += count
        return masked

    def _warmup_step(self):
        grads = self.communicate("warmup", self.local_grads())
        for (gi, p), g in zip(self._trainable, grads):
            group = self.param_groups[gi]
            b1, b2 = group["betas"]
            m, v = self.param_state(p, "exp_avg", "exp_avg_sq")
            if self.warmup == "cdadam":
                vmax = self.param_state(p, "max_exp_avg_sq")[0]
                x = self.master(p)
                if group["weight_decay"]:
                    x.mul_(1 - group["lr"] * group["weight_decay"])
                amsgrad_(x, g, m, v, vmax, lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"])
                self.write_back(p, x)
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
        for (gi, p), m_avg in zip(self._trainable, self.communicate("momentum", local)):
            group = self.param_groups[gi]
            m, v = self.param_state(p, "exp_avg", "exp_avg_sq")
            m.copy_(m_avg)
            self._mask(p, m, group)
            self._apply(p, m, v, group)

    def _mask(self, p, m, group):
        """Zero the masked elements of the averaged momentum: the group's ``exp_avg_mask`` and
        the zero-variance mask made at the freeze."""
        mask = group.get("exp_avg_mask")
        if mask is not None:
            m.mul_(mask.to(device=m.device, dtype=m.dtype))
        zero = self.state[p].get(ZERO_VARIANCE_MASK)
        if zero is not None and group["mask_zero_variance"]:
            m.masked_fill_(zero, 0.0)

    def _apply(self, p, m, v, group):
        x = self.master(p)
        frozen_adam_(x, m, v, lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"])
        self.write_back(p, x)


def _backend(name: str):
    """Map DeepSpeed's ``comm_backend_name`` to a communicator spec available on this machine."""
    key = str(name).lower()
    if key == "mpi":
        return "mpi"
    if key in ("nccl", "gloo", "torch"):
        import torch.distributed as dist

        if key == "nccl" and dist.is_initialized() and dist.get_backend() != "nccl":
            warnings.warn(f"OneBitAdam: comm_backend_name='nccl' is not available here (the process group runs "
                          f"{dist.get_backend()}); using it instead", stacklevel=3)
        return None
    raise ValueError(f"OneBitAdam: comm_backend_name={name!r} must be 'nccl', 'gloo' or 'mpi'")
