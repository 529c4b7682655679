"""1-bit Adam (Tang et al. 2021), with CD-Adam as an optional compressed warm-up."""
from __future__ import annotations

import warnings

import torch

from .base import CompressedOptimizer, PipelineSpec, check_range, codec
from .functional import amsgrad_


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
    No bias correction, as in DeepSpeed's OneBitAdam. ``freeze_step`` may be changed on a live
    optimizer (``opt.freeze_step = n`` or in a param group).

    ``cuda_aware`` and ``comm_backend_name`` are accepted for DeepSpeed configs: "nccl" and
    "gloo" use torch.distributed, "mpi" the mpi4py communicator.
    """

    def __init__(self, params, lr=1e-3, freeze_step=100000, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 warmup="adam", compressor="block_sign", block_size=1024, ratio=None, k=None, compressor_options=None,
                 cuda_aware=False, comm_backend_name=None, amsgrad=False, bias_correction=False, **kwargs):
        if amsgrad:
            raise ValueError("OneBitAdam: amsgrad=True is not supported (1-bit Adam freezes the variance)")
        if bias_correction:
            raise ValueError("OneBitAdam: bias_correction=True is not supported (1-bit Adam has none)")
        if warmup not in ("adam", "cdadam"):
            raise ValueError(f"OneBitAdam: warmup={warmup!r} must be 'adam' (uncompressed, Tang et al.) or "
                             "'cdadam' (CD-Adam compressed from step 1)")
        if not isinstance(freeze_step, int) or freeze_step < 0:
            raise ValueError(f"OneBitAdam: freeze_step={freeze_step!r} must be an int >= 0")
        check_range("eps", eps, 0.0)
        if comm_backend_name is not None and "process_group" not in kwargs:
            kwargs["process_group"] = _backend(comm_backend_name)
        name, opts = codec(compressor, block_size=block_size, ratio=ratio, k=k, options=compressor_options)
        warm = (PipelineSpec("identity", "none", "none", True) if warmup == "adam" else
                PipelineSpec("block_sign", "markov", "markov", True, (("block_size", block_size),)))
        pipelines = {"warmup": warm, "momentum": PipelineSpec(name, "ef", "ef", True, opts)}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, freeze_step=freeze_step)
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
        checkpoint's (masks change between training phases, e.g. BERT's 128 -> 512 tokens)."""
        groups = [dict(g) for g in state_dict["param_groups"]]
        for mine, saved in zip(self.param_groups, groups):
            if "exp_avg_mask" in mine:
                saved["exp_avg_mask"] = mine["exp_avg_mask"]
            else:
                saved.pop("exp_avg_mask", None)
        super().load_state_dict({**state_dict, "param_groups": groups}, reset_compression_state)

    def _step(self):
        if self.global_step < self.freeze_step:
            self._warmup_step()
        else:
            self._compressed_step()

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
        if self.warmup == "cdadam":
            for _, p in self._trainable:
                st = self.state[p]
                if "max_exp_avg_sq" in st:
                    st["exp_avg_sq"].copy_(st.pop("max_exp_avg_sq"))
        local = []
        for (gi, p), g in zip(self._trainable, self.local_grads()):
            b1 = self.param_groups[gi]["betas"][0]
            m = self.param_state(p, "exp_avg")[0]
            local.append(m.mul_(b1).add_(g, alpha=1 - b1))
        for (gi, p), m_avg in zip(self._trainable, self.communicate("momentum", local)):
            group = self.param_groups[gi]
            m, v = self.param_state(p, "exp_avg", "exp_avg_sq")
            m.copy_(m_avg)
            mask = group.get("exp_avg_mask")
            if mask is not None:
                m.mul_(mask.to(device=m.device, dtype=m.dtype))
            self._apply(p, m, v, group)

    def _apply(self, p, m, v, group):
        x = self.master(p)
        update = m / (v.sqrt() + group["eps"])
        if group["weight_decay"]:
            update.add_(x, alpha=group["weight_decay"])
        x.add_(update, alpha=-group["lr"])
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
