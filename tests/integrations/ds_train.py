"""Scenarios of the DeepSpeed integration, run by test_deepspeed.py under torchrun (gloo, CPU).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 ds_train.py --out DIR SCENARIO [SCENARIO ...]

Every rank writes ``DIR/<scenario>.rank<r>.json`` with what the scenario measured (or the
error it raised); the test asserts on those files. The model is a tiny MLP regressing a fixed
random teacher; each rank draws its own batches from a generator seeded by (step, rank).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import os
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import deepspeed
import taciturn
import taciturn.integrations.deepspeed as tds

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs")
DIM_IN, DIM_HIDDEN, DIM_OUT = 16, 32, 4
#: overrides that fit the configs' schedules to runs of tens of steps (freeze_step 400 -> 10)
SHORT_RUN = {"onebit_adam_cdadam_warmup.json": {"freeze_step": 10}, "onebit_adam.json": {"freeze_step": 10},
             "zero_one_adam.json": {"var_freeze_step": 10, "var_update_scaler": 2, "local_step_scaler": 8,
                                    "local_step_clipper": 4},
             "onebit_lamb_bert.json": {"freeze_step": 10, "lr": 0.01}}
#: top-level keys of configs made for large clusters, scaled to these 60-step 2-rank runs (None: removed)
SHORT_CONFIG = {"onebit_lamb_bert.json": {
    "train_batch_size": None, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 5,
                                                 "warmup_type": "linear"}}}}
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_gather_single", "all_gather", "all_to_all_single", "all_to_all", "broadcast",
               "reduce_scatter_tensor", "reduce_scatter", "reduce", "gather", "scatter", "send", "recv", "isend",
               "irecv", "batch_isend_irecv")


# ---------------------------------------------------------------------------- helpers
def load_config(name: str, **params) -> dict:
    with open(os.path.join(CONFIGS, name)) as f:
        cfg = json.load(f)
    for key, value in SHORT_CONFIG.get(name, {}).items():
        cfg.pop(key) if value is None else cfg.__setitem__(key, value)
    cfg["optimizer"]["params"].update(SHORT_RUN.get(name, {}))
    cfg["optimizer"]["params"].update(params)
    return cfg


def teacher():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(DIM_IN, DIM_OUT, generator=g) / DIM_IN ** 0.5


TEACHER = teacher()


def batch(step: int, micro: int, size: int, rank: int = None):
    rank = dist.get_rank() if rank is None else rank
    g = torch.Generator().manual_seed(100003 * step + 1009 * micro + rank)
    x = torch.randn(size, DIM_IN, generator=g)
    y = torch.tanh(x @ TEACHER) * 2 + 0.01 * torch.randn(size, DIM_OUT, generator=g)
    return x, y


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM_IN, DIM_HIDDEN), nn.Tanh(), nn.Linear(DIM_HIDDEN, DIM_OUT))


def build(cfg: dict, model=None, params=None):
    model = model if model is not None else mlp()
    with fp16_allowed(cfg):
        engine, _, _, _ = deepspeed.initialize(model=model, config=copy.deepcopy(cfg),
                                               model_parameters=params if params is not None else model.parameters())
    return engine


def model_dtype(engine):
    return next(engine.module.parameters()).dtype


def train_step(engine, inject_inf: bool = False) -> float:
    """One optimizer step (gradient_accumulation_steps micro batches); the mean micro loss."""
    losses = []
    for micro in range(engine.gradient_accumulation_steps()):
        x, y = batch(engine.global_steps, micro, engine.train_micro_batch_size_per_gpu())
        out = engine(x.to(model_dtype(engine)))
        loss = nn.functional.mse_loss(out.float(), y)
        engine.backward(loss)
        if inject_inf:
            next(engine.module.parameters()).grad[0, 0] = float("inf")
        losses.append(loss.item())
        engine.step()
    return sum(losses) / len(losses)


def eval_loss(engine) -> float:
    """The loss on a fixed held-out batch of 512 (the same on every rank)."""
    x, y = batch(step=10 ** 6, micro=0, size=512, rank=0)
    with torch.no_grad():
        return nn.functional.mse_loss(engine.module(x.to(model_dtype(engine))).float(), y).item()


def falls(losses) -> dict:
    """First and last sixth of the training losses (pipeline engines, which hold part of the model)."""
    k = max(3, len(losses) // 6)
    return {"losses": losses, "first": sum(losses[:k]) / k, "last": sum(losses[-k:]) / k}


def params_of(engine):
    return [p.detach().float().clone() for p in engine.module.parameters()]


def compression_state(opt):
    return {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in opt.compression.flat.items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                        for k in a)


def wire(opt, pipeline: str) -> dict:
    return opt.exchanges[pipeline].wire_bytes()


class CollectiveLog:
    """Records every torch.distributed collective (name, dtype, bytes of each tensor argument)
    while active, by wrapping the module's functions (DeepSpeed and taciturn both call them)."""

    def __init__(self):
        self.calls = []
        self._saved = {}

    def __enter__(self):
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def recorded(*args, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
            self.calls.append({"op": name, "tensors": [[str(t.dtype), t.numel() * t.element_size()] for t in tensors]})
            return fn(*args, **kwargs)
        return recorded


@contextlib.contextmanager
def fp16_allowed(cfg: dict):
    """DeepSpeed refuses fp16 on a CPU without mkldnn fp16 kernels; torch runs fp16 Linear
    layers on CPU, so for a config with fp16 enabled override that capability check only, to
    exercise the same wrapper a GPU takes."""
    from deepspeed.accelerator import get_accelerator

    if not cfg.get("fp16", {}).get("enabled"):
        yield
        return
    accelerator = get_accelerator()
    supported = accelerator.is_fp16_supported
    accelerator.is_fp16_supported = lambda: True
    try:
        yield
    finally:
        accelerator.is_fp16_supported = supported


@contextlib.contextmanager
def taciturn_logs():
    """The messages of the ``taciturn`` logger while active."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("taciturn")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


#: the schedule params of DeepSpeed's own tests of each type (tests/unit/runtime/half_precision/onebit/test_onebit.py)
UPSTREAM_SCHEDULES = {"OneBitAdam": {"freeze_step": 2},
                      "ZeroOneAdam": {"var_freeze_step": 4, "var_update_scaler": 1, "local_step_scaler": 1,
                                      "local_step_clipper": 2},
                      "OneBitLamb": {"max_coeff": 0.3, "min_coeff": 0.01, "freeze_step": 2, "coeff_beta": 0.9,
                                     "factor_max": 1.0, "factor_min": 0.5, "factor_threshold": 0.1}}


#: the config of DeepSpeed's own 1-bit Adam / 0/1 Adam tests
def upstream_onebit_config(precision: str, optimizer: str = "OneBitAdam", **params) -> dict:
    from deepspeed.accelerator import get_accelerator

    return {"train_batch_size": 2, "steps_per_print": 1000, "gradient_clipping": 1.0,
            "optimizer": {"type": optimizer, "params": {
                "lr": 0.00015, "weight_decay": 0.01, **UPSTREAM_SCHEDULES[optimizer], "cuda_aware": False,
                "comm_backend_name": get_accelerator().communication_backend_name(), **params}},
            "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
            "bf16": {"enabled": precision == "bf16"}}


def first_row_mask(weight):
    """DeepSpeed's test mask: the first row of the weight kept, flattened."""
    mask = torch.zeros_like(weight)
    mask[0] = 1.0
    return torch.flatten(mask)


def masked_groups(model, mask):
    """DeepSpeed's test groups: the first weight (with ``mask`` unless None), the rest."""
    first = model[0].weight
    head = {"params": [first], "weight_decay": 0.01}
    if mask is not None:
        head["exp_avg_mask"] = mask
    return [head, {"params": [p for p in model.parameters() if p is not first], "weight_decay": 0.01}]


# ---------------------------------------------------------------------------- scenarios
def scenario_train(name: str, steps: int = 60) -> dict:
    cfg = load_config(name)
    engine = build(cfg)
    opt = tds.taciturn_optimizer(engine)
    before = eval_loss(engine)
    losses, lrs, bytes_up = [], [], []
    for _ in range(steps):
        losses.append(train_step(engine))
        lrs.append([opt.param_groups[0]["lr"], engine.get_lr()[0]])
        bytes_up.append(opt.metrics()["taciturn/bytes_up"])
    return {"losses": losses, "first": before, "last": eval_loss(engine), "optimizer": type(opt).__name__,
            "lrs": lrs, "bytes_up": bytes_up,
            "fp32_bytes": 4 * sum(p.numel() for p in engine.module.parameters()),
            "backward_allreduce": engine.enable_backward_allreduce, "global_samples": engine.global_samples,
            "train_batch_size": engine.train_batch_size()}


def scenario_bytes(config: str = "cdadam.json", **params) -> dict:
    """Collectives of one optimizer step (the second) with a taciturn type and DeepSpeed's AdamW."""
    out = {}
    for label, cfg in (("taciturn", load_config(config, **params)),
                       ("adamw", {**load_config(config), "optimizer": {"type": "AdamW",
                                                                        "params": {"lr": 1e-3, "torch_adam": True}}})):
        engine = build(cfg)
        train_step(engine)
        with CollectiveLog() as log:
            train_step(engine)
        opt = tds.taciturn_optimizer(engine)
        out[label] = {"calls": log.calls, "numel": sum(p.numel() for p in engine.module.parameters()),
                      "wire": {n: wire(opt, n) for n in opt.exchanges} if opt else None,
                      "metrics": opt.metrics() if opt else None}
    return out


def scenario_grad_accum() -> dict:
    cfg = load_config("cdadam.json")
    cfg.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=3)
    engine = build(cfg)
    opt = tds.taciturn_optimizer(engine)
    before = eval_loss(engine)
    losses = [train_step(engine) for _ in range(2)]
    with CollectiveLog() as log:
        losses.append(train_step(engine))
    losses += [train_step(engine) for _ in range(17)]
    return {"losses": losses, "first": before, "last": eval_loss(engine), "calls": log.calls, "wire": wire(opt, "grad"),
            "train_batch_size": engine.train_batch_size(), "global_steps": engine.global_steps,
            "global_samples": engine.global_samples, "taciturn_steps": opt.global_step}


def scenario_clipping() -> dict:
    cfg = load_config("cdadam.json")
    cfg["gradient_clipping"] = 0.05
    engine = build(cfg)
    opt = tds.taciturn_optimizer(engine)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(
        torch.norm(torch.stack([p.grad.norm() for g in o.param_groups for p in g["params"]])).item()))
    raw = []
    for _ in range(3):
        x, y = batch(engine.global_steps, 0, engine.train_micro_batch_size_per_gpu())
        engine.backward(nn.functional.mse_loss(engine(x), y))
        raw.append(torch.norm(torch.stack([p.grad.norm() for p in engine.module.parameters()])).item())
        engine.step()
    return {"clip": cfg["gradient_clipping"], "raw_norms": raw, "clipped_norms": seen}


def scenario_bf16() -> dict:
    """bf16: trains through DeepSpeed's wrapper; an inf gradient on rank 1 only skips the step everywhere."""
    cfg = load_config("cdadam.json")
    cfg["bf16"] = {"enabled": True}
    engine = build(cfg)
    opt = tds.taciturn_optimizer(engine)
    first = eval_loss(engine)
    losses = [train_step(engine) for _ in range(3)]
    before, params, steps = compression_state(opt), params_of(engine), opt.global_step
    train_step(engine, inject_inf=dist.get_rank() == 1)
    skipped = {"skipped_steps": engine.skipped_steps, "state_unchanged": same_state(before, compression_state(opt)),
               "params_unchanged": all(torch.equal(a, b) for a, b in zip(params, params_of(engine))),
               "taciturn_step_before": steps, "taciturn_step_after": opt.global_step}
    losses += [train_step(engine) for _ in range(25)]
    return {"losses": losses, "first": first, "last": eval_loss(engine), **skipped,
            "wrapper": type(engine.optimizer).__name__, "param_dtype": str(model_dtype(engine)),
            "optimizer_param_dtype": str(opt.param_groups[0]["params"][0].dtype)}


def scenario_fp16() -> dict:
    """fp16 with dynamic loss scaling (the FP16_UnfusedOptimizer path a GPU takes)."""
    cfg = load_config("cdadam.json")
    cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
    engine = build(cfg)
    opt = tds.taciturn_optimizer(engine)
    first = eval_loss(engine)
    losses = [train_step(engine) for _ in range(3)]
    before, params, steps = compression_state(opt), params_of(engine), opt.global_step
    scale = engine.optimizer.loss_scale
    train_step(engine, inject_inf=dist.get_rank() == 1)
    skipped = {"skipped_steps": engine.skipped_steps, "state_unchanged": same_state(before, compression_state(opt)),
               "params_unchanged": all(torch.equal(a, b) for a, b in zip(params, params_of(engine))),
               "taciturn_step_before": steps, "taciturn_step_after": opt.global_step,
               "loss_scale_before": scale, "loss_scale_after": engine.optimizer.loss_scale}
    losses += [train_step(engine) for _ in range(25)]
    return {"losses": losses, "first": first, "last": eval_loss(engine), **skipped,
            "wrapper": type(engine.optimizer).__name__, "param_dtype": str(model_dtype(engine))}


def scenario_onebit_stranded() -> dict:
    """DeepSpeed's documented 1-bit Adam params, exp_avg_mask, freeze_step changed live."""
    cfg = load_config("onebit_adam.json", freeze_step=1000)
    model = mlp()
    first = model[0].weight
    mask = torch.ones_like(first)
    mask[:4] = 0.0
    groups = [{"params": [first], "exp_avg_mask": mask}, {"params": [p for p in model.parameters() if p is not first]}]
    with warnings.catch_warnings(record=True) as caught, taciturn_logs() as logs:
        warnings.simplefilter("always")
        engine = build(cfg, model, groups)
    opt = tds.taciturn_optimizer(engine)
    before = eval_loss(engine)
    losses, bytes_up = [], []
    for step in range(30):
        if step == 8:
            opt.freeze_step = 10
        if step == 10:
            masked_rows = first.detach()[:4].clone()
        losses.append(train_step(engine))
        bytes_up.append(opt.metrics()["taciturn/bytes_up"])
    return {"losses": losses, "first": before, "last": eval_loss(engine), "bytes_up": bytes_up,
            "freeze_step": opt.freeze_step,
            "nccl_warnings": [str(w.message) for w in caught if "nccl" in str(w.message)],
            "nccl_logs": [r.getMessage() for r in logs if "nccl" in r.getMessage()],
            "masked_rows_unchanged": torch.equal(masked_rows, first.detach()[:4]),
            "other_rows_changed": not torch.equal(first.detach()[4:], mlp()[0].weight.detach()[4:]),
            "numel": sum(p.numel() for p in model.parameters())}


def sent_bytes(engine, steps: int) -> list:
    """Train ``steps`` steps; [taciturn step, bytes up] of each the optimizer ran (fp16 loss
    scaling skips the first ones that overflow)."""
    opt = tds.taciturn_optimizer(engine)
    sent = []
    for _ in range(steps):
        before = opt.global_step
        train_step(engine)
        if opt.global_step > before:
            sent.append([before, opt.metrics()["taciturn/bytes_up"]])
    return sent


def finite(engine) -> bool:
    return all(torch.isfinite(p).all().item() for p in params_of(engine))


def frozen(opt) -> bool:
    """DeepSpeed's flag of the compressed phase: OneBitAdam's adam_freeze_key, ZeroOneAdam's
    freeze_key, OneBitLamb's lamb_freeze_key."""
    for name in ("freeze_key", "lamb_freeze_key", "adam_freeze_key"):
        if hasattr(opt, name):
            return getattr(opt, name)
    raise TypeError(f"{type(opt).__name__} has no compressed phase")


def digest(tensors) -> str:
    return hashlib.sha256(b"".join(t.detach().float().cpu().numpy().tobytes() for t in tensors)).hexdigest()


def scenario_onebit_basic(precision: str, optimizer: str = "OneBitAdam", steps: int = 25) -> dict:
    """DeepSpeed's TestOneBitAdamBasic / TestZeroOneAdamBasic (fp32, fp16; bf16 too): its config, 25 steps."""
    engine = build(upstream_onebit_config(precision, optimizer))
    opt = tds.taciturn_optimizer(engine)
    before = eval_loss(engine)
    sent = sent_bytes(engine, steps)
    return {"first": before, "last": eval_loss(engine), "sent": sent, "frozen": frozen(opt),
            "synced": digest(opt.synced_tensors()), "finite": finite(engine), "skipped_steps": engine.skipped_steps,
            "global_steps": engine.global_steps, "taciturn_steps": opt.global_step,
            "wrapper": type(engine.optimizer).__name__, "param_dtype": str(model_dtype(engine)),
            "fp32_bytes": 4 * sum(p.numel() for p in engine.module.parameters())}


def scenario_onebit_mask(precision: str = "fp16", steps: int = 25) -> dict:
    """DeepSpeed's TestOneBitAdamExpAvgMask: a flat mask for the first weight's group."""
    model = mlp()
    mask = first_row_mask(model[0].weight)
    engine = build(upstream_onebit_config(precision), model, masked_groups(model, mask))
    opt = tds.taciturn_optimizer(engine)
    for _ in range(steps):
        train_step(engine)
    master = opt.param_groups[0]["params"][0]  # the wrapper's fp32 copy of the first weight
    exp_avg = opt.state[master]["exp_avg"]
    flat = exp_avg.flatten()  # DeepSpeed 0.16's fused fp16 wrapper hands the optimizer flat groups
    # the upstream test's own loop: every value of optimizer.state is a parameter's, with its exp_avg
    upstream = all(torch.allclose(v["exp_avg"], v["exp_avg"].mul(mask) if v["exp_avg"].numel() == mask.numel()
                                  and v["exp_avg"].dim() == 1 else v["exp_avg"], atol=1e-7)
                   for v in engine.optimizer.state.values())
    return {"masked_exp_avg_zero": torch.equal(flat * mask, flat), "kept_row_moves": bool(flat[mask.bool()].all()),
            "frozen": opt.compression.flat["frozen"], "finite": finite(engine), "upstream_state_loop": upstream}


def scenario_onebit_checkpoint(precision: str = "fp16") -> dict:
    """DeepSpeed's TestOneBitAdamCheckpointing: the mask and freeze_step of the running script
    win over the checkpoint's; a job resumed before its (new) freeze_step goes back to warm-up."""
    directory = os.path.join(ARGS.out, f"ckpt_onebit_{precision}")
    model = mlp()
    mask1, mask2 = first_row_mask(model[0].weight), first_row_mask(model[0].weight).roll(DIM_IN)
    first = build(upstream_onebit_config(precision), model, masked_groups(model, mask1))
    for _ in range(5):
        train_step(first)
    saved = tds.taciturn_optimizer(first)
    out = {"saved_frozen": saved.compression.flat["frozen"], "saved_step": saved.global_step}
    first.save_checkpoint(directory, tag="five")
    out["mask_kept_after_save"] = torch.equal(first.optimizer.param_groups[0]["exp_avg_mask"], mask1)

    second = build(upstream_onebit_config(precision), model, masked_groups(model, mask2))
    second.load_checkpoint(directory, tag="five")
    opt = tds.taciturn_optimizer(second)
    out.update(mask_running_after_load=torch.equal(opt.param_groups[0]["exp_avg_mask"], mask2),
               resumed_frozen=opt.compression.flat["frozen"], resumed_step=opt.global_step)

    # the case: a later phase resumes the step-5 checkpoint with freeze_step 20
    third = build(upstream_onebit_config(precision, freeze_step=20), model, masked_groups(model, None))
    for _ in range(25):
        train_step(third)
    opt = tds.taciturn_optimizer(third)
    out["third_frozen_before_load"] = opt.compression.flat["frozen"]
    third.load_checkpoint(directory, tag="five")
    out.update(third_freeze_step=opt.freeze_step, third_frozen_after_load=opt.compression.flat["frozen"],
               third_mask=any("exp_avg_mask" in g for g in opt.param_groups))
    out.update(sent_after_load=sent_bytes(third, 21 - opt.global_step), fp32_bytes=4 * sum(p.numel() for p in model.parameters()),
               finite=finite(third))
    return out


def scenario_onebit_overflow(precision: str = "fp16", optimizer: str = "OneBitAdam") -> dict:
    """DeepSpeed's TestOneBitAdam / TestZeroOneAdam ...test_overflow: overflowing steps on rank 0
    only after the freeze, a checkpoint after every step; the skipped steps touch no state on any rank."""
    directory = os.path.join(ARGS.out, f"ckpt_overflow_{optimizer}_{precision}")
    engine = build(upstream_onebit_config(precision, optimizer))
    opt = tds.taciturn_optimizer(engine)
    injected = []
    for step in range(12):
        overflow = 4 <= step < 7
        before, params, skipped = compression_state(opt), params_of(engine), engine.skipped_steps
        train_step(engine, inject_inf=overflow and dist.get_rank() == 0)
        if overflow:
            injected.append(engine.skipped_steps == skipped + 1 and same_state(before, compression_state(opt)) and
                            all(torch.equal(a, b) for a, b in zip(params, params_of(engine))))
        engine.save_checkpoint(directory, tag="every_step")
    resumed = build(upstream_onebit_config(precision, optimizer), mlp(seed=5))
    resumed.load_checkpoint(directory, tag="every_step")
    return {"skipped_steps": engine.skipped_steps, "injected_skipped_untouched": injected,
            "taciturn_steps": opt.global_step, "frozen": frozen(opt), "finite": finite(engine),
            "resumed_state_equal": same_state(compression_state(opt), compression_state(tds.taciturn_optimizer(resumed)))}


def scenario_zoadam_mask(precision: str = "fp16", steps: int = 25) -> dict:
    """DeepSpeed's TestZeroOneAdamExpAvgMask: a flat mask for the first weight's group. The mask
    applies to what the ranks exchange, so the momentum is masked right after each
    synchronisation (a local step adds the local gradient to it), and the masked weights stay
    at their x_sync from one synchronisation to the next."""
    model = mlp()
    mask = first_row_mask(model[0].weight)
    engine = build(upstream_onebit_config(precision, "ZeroOneAdam"), model, masked_groups(model, mask))
    opt = tds.taciturn_optimizer(engine)
    master = opt.param_groups[0]["params"][0]
    masked_after_sync, frozen_rows = [], []
    for _ in range(steps):
        before = opt.global_step
        train_step(engine)
        if opt.freeze_key and opt.global_step > before and opt.metrics()["taciturn/bytes_up"] > 0:
            flat = opt.state[master]["exp_avg"].flatten()
            masked_after_sync.append(torch.equal(flat * mask, flat))
            frozen_rows.append(master.detach().flatten()[~mask.bool()].clone())
    upstream = all(torch.allclose(v["exp_avg"], v["exp_avg"] * mask.view_as(v["exp_avg"])
                                  if v["exp_avg"].numel() == mask.numel() else v["exp_avg"], atol=1e-7)
                   for v in engine.optimizer.state.values())
    return {"masked_after_sync": masked_after_sync, "finite": finite(engine), "frozen": opt.freeze_key,
            "masked_weights_fixed": all(torch.equal(frozen_rows[0], r) for r in frozen_rows),
            "upstream_state_loop": upstream}


def scenario_zoadam_checkpoint(precision: str = "fp16") -> dict:
    """DeepSpeed's TestZeroOneAdamCheckpointing: the running script's mask wins on load (a
    script without one loads none), no DeepSpeed error buffers appear in the state; then the
    resumed job keeps training."""
    directory = os.path.join(ARGS.out, f"ckpt_zoadam_{precision}")
    model = mlp()
    mask1, mask2 = first_row_mask(model[0].weight), first_row_mask(model[0].weight).roll(DIM_IN)
    config = upstream_onebit_config(precision, "ZeroOneAdam")
    first = build(config, model, masked_groups(model, mask1))
    for _ in range(5):
        train_step(first)
    saved = tds.taciturn_optimizer(first)
    out = {"saved_step": saved.global_step, "saved_frozen": saved.freeze_key}
    first.save_checkpoint(directory, tag="five")
    out["mask_kept_after_save"] = torch.equal(first.optimizer.param_groups[0]["exp_avg_mask"], mask1)

    def no_error_buffers(engine):
        return not any(k in v for v in engine.optimizer.state.values() for k in ("worker_error", "server_error"))

    second = build(config, model, masked_groups(model, mask2))
    second.load_checkpoint(directory, tag="five")
    opt = tds.taciturn_optimizer(second)
    out.update(mask_running_after_load=torch.equal(opt.param_groups[0]["exp_avg_mask"], mask2),
               resumed_step=opt.global_step, resumed_frozen=opt.freeze_key, second_clean=no_error_buffers(second))
    third = build(config, model, masked_groups(model, None))
    third.optimizer.freeze_step = 20  # the upstream test sets it (a OneBitAdam name): harmless here
    for _ in range(25):
        train_step(third)
    third.load_checkpoint(directory, tag="five")
    opt = tds.taciturn_optimizer(third)
    out.update(third_mask=any("exp_avg_mask" in g for g in opt.param_groups), third_clean=no_error_buffers(third),
               third_step=opt.global_step)
    sent = sent_bytes(third, 10)
    out.update(sent_after_load=sent, synced=digest(opt.synced_tensors()), finite=finite(third),
               fp32_bytes=4 * sum(p.numel() for p in model.parameters()))
    return out


def scenario_lamb_checkpoint(precision: str = "fp16") -> dict:
    """DeepSpeed's TestOneBitLambCheckpointing: per-tensor scaling_coeff in every state value
    after the freeze, carried by the checkpoint; the running mask wins; a job resumed before its
    (new) freeze_step goes back to the warm-up with the coefficients reset as DeepSpeed does."""
    directory = os.path.join(ARGS.out, f"ckpt_lamb_{precision}")
    model = mlp()
    mask1, mask2 = torch.zeros_like(model[0].weight), torch.zeros_like(model[0].weight)
    mask1[0], mask2[1] = 1.0, 1.0  # the upstream test's masks, in the weight's shape
    config = upstream_onebit_config(precision, "OneBitLamb")

    def coefficients(engine):
        return sorted(v["scaling_coeff"] for v in engine.optimizer.state.values() if "scaling_coeff" in v)

    def every_state_has(engine, key):
        return all(key in v for v in engine.optimizer.state.values())

    first = build(config, model, masked_groups(model, mask1))
    for _ in range(5):
        train_step(first)
    out = {"saved_frozen": tds.taciturn_optimizer(first).lamb_freeze_key,
           "saved_coeffs": every_state_has(first, "scaling_coeff")}
    saved_coeffs = coefficients(first)
    first.save_checkpoint(directory, tag="five")
    second = build(config, model, masked_groups(model, mask2))
    second.load_checkpoint(directory, tag="five")
    opt = tds.taciturn_optimizer(second)
    out.update(mask_running_after_load=torch.equal(opt.param_groups[0]["exp_avg_mask"], mask2),
               coeffs_loaded=coefficients(second) == saved_coeffs and bool(saved_coeffs),
               resumed_frozen=opt.lamb_freeze_key)
    third = build(config, model, masked_groups(model, None))
    opt = tds.taciturn_optimizer(third)
    opt.freeze_step = 20
    for _ in range(25):
        train_step(third)
    out["third_frozen_before_load"] = opt.lamb_freeze_key
    third.load_checkpoint(directory, tag="five")
    states = list(third.optimizer.state.values())
    out.update(third_mask=any("exp_avg_mask" in g for g in opt.param_groups), third_frozen=opt.lamb_freeze_key,
               third_reset=all(v["lamb_coeff_freeze"] == 0.0 and v["last_factor"] == 1.0 and "scaling_coeff" not in v
                               for v in states),
               fp32_bytes=4 * sum(p.numel() for p in model.parameters()))
    out.update(sent_after_load=sent_bytes(third, 21 - opt.global_step), finite=finite(third))
    return out


def scenario_lamb_empty(precision: str = "fp16") -> dict:
    """DeepSpeed's TestOneBitLambEmptyParameters: a parameter of 0 elements in its own group."""
    model = mlp()
    model.register_parameter("empty", nn.Parameter(torch.empty(0, DIM_IN)))
    groups = [{"params": [p for n, p in model.named_parameters() if n != "empty"], "weight_decay": 0.01},
              {"params": [model.empty], "weight_decay": 0.0}]
    engine = build(upstream_onebit_config(precision, "OneBitLamb"), model, groups)
    before = eval_loss(engine)
    for _ in range(8):
        train_step(engine)
    opt = tds.taciturn_optimizer(engine)
    return {"first": before, "last": eval_loss(engine), "finite": finite(engine), "frozen": opt.lamb_freeze_key,
            "state_finite": all(torch.isfinite(torch.as_tensor(v)).all().item() for st in opt.state.values()
                                for v in st.values() if torch.is_tensor(v) or isinstance(v, float))}


def scenario_checkpoint(name: str, steps: int = 6) -> dict:
    """Train 2*steps uninterrupted vs steps, save, a fresh engine loads, steps more."""
    # 1-bit Adam: the CD-Adam warm-up one freezes after the resume (the warm-up state must carry
    # over), the other before the save (the error-feedback state must)
    # 0/1 Adam: frozen at step 4, synchronising every step until the interval doubles after step 5,
    # saved after the local step 6 (each rank's own model and momentum, which DeepSpeed does not save)
    freeze = {"onebit_adam_cdadam_warmup.json": {"freeze_step": steps + 2},
              "onebit_adam.json": {"freeze_step": steps - 2},
              "zero_one_adam.json": {"var_freeze_step": steps - 3, "local_step_scaler": 2, "local_step_clipper": 4}}
    cfg = load_config(name, **freeze.get(name, {}))
    directory = os.path.join(ARGS.out, f"ckpt_{name}")
    straight = build(cfg)
    full = [train_step(straight) for _ in range(2 * steps)]
    first = build(cfg)
    head = [train_step(first) for _ in range(steps)]
    first.save_checkpoint(directory, tag="mid")
    resumed = build(cfg, mlp(seed=99))
    path, _ = resumed.load_checkpoint(directory)
    tail = [train_step(resumed) for _ in range(steps)]
    a, b = tds.taciturn_optimizer(straight), tds.taciturn_optimizer(resumed)
    files = sorted(f for f in os.listdir(os.path.join(directory, "mid")) if f.startswith("taciturn_"))
    return {"full": full, "resumed": head + tail, "loaded": path,
            "params_equal": all(torch.equal(x, y) for x, y in zip(params_of(straight), params_of(resumed))),
            "state_equal": same_state(compression_state(a), compression_state(b)), "files": files}


def scenario_monitor() -> dict:
    cfg = load_config("cdadam.json")
    log_dir = os.path.join(ARGS.out, "monitor")
    cfg["csv_monitor"] = {"enabled": True, "output_path": log_dir, "job_name": "taciturn"}
    engine = build(cfg)
    opt = tds.taciturn_optimizer(engine)
    for _ in range(4):
        train_step(engine)
    return {"dir": os.path.join(log_dir, "taciturn"), "wire": wire(opt, "grad"), "metrics": opt.metrics(),
            "train_batch_size": engine.train_batch_size()}


def scenario_refusals() -> dict:
    """Each of these must fail at initialize with a clear message."""
    out = {}
    cases = {
        "zero3": {**load_config("cdadam.json"), "zero_optimization": {"stage": 3}},
        "offload": {**load_config("cdadam.json"), "zero_optimization": {"stage": 2, "offload_optimizer":
                                                                         {"device": "cpu"}}},
        "onebit_zero1": {**load_config("onebit_adam.json"), "zero_optimization": {"stage": 1}},
        "unsharded_zero2": {**load_config("cdadam.json", shard_state=False), "zero_optimization": {"stage": 2}},
        "unknown_type": {**load_config("cdadam.json"), "optimizer": {"type": "CDAdma", "params": {"lr": 1e-3}}},
        "misspelled_param": load_config("cdadam.json", betass=[0.9, 0.99]),
        "engine_group": load_config("cdadam.json", process_group="local"),
    }
    if tds._version() < (0, 19):  # 0.16 wraps every bf16 optimizer in its partitioning BF16_Optimizer
        cases["bf16"] = {**load_config("cdadam.json"), "bf16": {"enabled": True}}
    for label, cfg in cases.items():
        try:
            build(cfg)
            out[label] = None
        except Exception as err:  # the message is what the test checks
            out[label] = f"{type(err).__name__}: {err}"
    return out


def scenario_client() -> dict:
    """A taciturn optimizer object passed as optimizer=: the same handshake; refused under bf16."""
    cfg = load_config("cdadam.json")
    params = cfg.pop("optimizer")["params"]
    model = mlp()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=taciturn.create_optimizer("CDAdam",
                                           model.parameters(), **params), config=cfg)
    opt = tds.taciturn_optimizer(engine)
    before = eval_loss(engine)
    losses = [train_step(engine)]
    with CollectiveLog() as log:
        losses.append(train_step(engine))
    losses += [train_step(engine) for _ in range(28)]
    model = mlp()
    try:
        deepspeed.initialize(model=model, optimizer=taciturn.CDAdam(model.parameters()),
                             config={**cfg, "bf16": {"enabled": True}})
        refused = None
    except ValueError as err:
        refused = str(err)
    return {"losses": losses, "first": before, "last": eval_loss(engine), "calls": log.calls,
            "wire": wire(opt, "grad"), "backward_allreduce": engine.enable_backward_allreduce, "bf16": refused}


def scenario_mpi_backend() -> dict:
    """comm_backend_name='mpi' under torchrun: mpi4py's COMM_WORLD holds one rank, which would
    train each rank alone with the engine's allreduce off; refused."""
    try:
        build(load_config("onebit_adam.json", comm_backend_name="mpi"))
    except ValueError as err:
        return {"refused": str(err)}
    return {"refused": None}


def scenario_zero0() -> dict:
    cfg = load_config("cdadam.json")
    cfg["zero_optimization"] = {"stage": 0}
    engine = build(cfg)
    before = eval_loss(engine)
    losses = [train_step(engine) for _ in range(20)]
    return {"losses": losses, "first": before, "last": eval_loss(engine),
            "optimizer": type(tds.taciturn_optimizer(engine)).__name__}


def state_bytes(opt) -> float:
    """Bytes per parameter of every tensor the optimizer keeps between steps on this rank."""
    tensors = [t for t in opt.compression.flat.values() if torch.is_tensor(t)]
    tensors += [t for st in opt.state.values() if isinstance(st, dict) and st is not opt.compression.flat
                for t in st.values() if torch.is_tensor(t)]
    numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return sum(t.numel() * t.element_size() for t in tensors) / numel


def scenario_zero(arg: str) -> dict:
    """``stage`` or ``stage-precision``: a CDAdam JSON with that ZeRO stage runs taciturn's sharded state."""
    stage, _, precision = arg.partition("-")
    cfg = load_config("cdadam.json")
    cfg["zero_optimization"] = {"stage": int(stage)}
    if precision:
        cfg[precision] = {"enabled": True, **({"loss_scale": 0, "initial_scale_power": 8} if precision == "fp16" else {})}
    engine = build(cfg)
    opt = tds.taciturn_optimizer(engine)
    ex = opt.exchanges["grad"]
    owned = sum(lay.chunk_numel(opt.comm.rank) for lay in ex.layouts)
    before = eval_loss(engine)
    losses = [train_step(engine) for _ in range(2)]
    with CollectiveLog() as log:
        losses.append(train_step(engine))
    losses += [train_step(engine) for _ in range(25)]
    out = {"losses": losses, "first": before, "last": eval_loss(engine), "calls": log.calls,
           "wire": wire(opt, "grad"), "sharded": opt.sharded, "asked_stage": tds.taciturn_zero_stage(engine),
           "engine_stage": engine.zero_optimization_stage(), "state_bytes": state_bytes(opt),
           "formula": 4 + 20 * owned / ex.numel,
           "wrapper": type(engine.optimizer).__name__, "backward_allreduce": engine.enable_backward_allreduce,
           "params": [p.detach().float().sum().item() for p in engine.module.parameters()]}
    if precision:
        params, steps = params_of(engine), opt.global_step
        train_step(engine, inject_inf=dist.get_rank() == 1)
        out.update(skipped_untouched=all(torch.equal(a, b) for a, b in zip(params, params_of(engine))),
                   steps_after_overflow=opt.global_step - steps)
    return out


def scenario_pipeline(stages: int, cfg: dict = None, pipeline: str = "grad") -> dict:
    """A PipelineModule engine (CDAdam by default); the collectives of its third step, which
    must be pipeline ``pipeline``'s payloads."""
    from deepspeed.pipe import PipelineModule

    cfg = copy.deepcopy(cfg or load_config("cdadam.json"))
    cfg.pop("train_batch_size", None)
    cfg.update(train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    pipe = PipelineModule(layers=[nn.Linear(DIM_IN, DIM_HIDDEN), nn.Tanh(), nn.Linear(DIM_HIDDEN, DIM_OUT)],
                          num_stages=stages, loss_fn=lambda out, y: nn.functional.mse_loss(out.float(), y))
    with fp16_allowed(cfg):
        engine, _, _, _ = deepspeed.initialize(model=pipe, config=cfg, model_parameters=pipe.parameters())
    opt = tds.taciturn_optimizer(engine)
    dp_rank = engine.grid.get_data_parallel_rank()
    dtype = next(engine.module.parameters()).dtype

    def data(step):
        for micro in range(engine.gradient_accumulation_steps()):
            x, y = batch(step, micro, engine.train_micro_batch_size_per_gpu(), rank=dp_rank)
            yield x.to(dtype), y

    losses = [engine.train_batch(data(s)).item() for s in range(2)]
    with CollectiveLog() as log:
        losses.append(engine.train_batch(data(2)).item())
    losses += [engine.train_batch(data(s)).item() for s in range(3, 30)]
    return {**falls(losses), "calls": log.calls, "wire": wire(opt, pipeline), "optimizer": type(opt).__name__,
            "sharded": opt.sharded, "wrapper": type(engine.optimizer).__name__,
            "dp_size": engine.grid.get_data_parallel_world_size(), "comm_size": opt.comm.world_size,
            "pipeline_allreduce": engine.pipeline_enable_backward_allreduce,
            "numel": sum(p.numel() for p in engine.module.parameters())}


def scenario_pipeline_bf16() -> dict:
    """bf16 pipeline engines, for which DeepSpeed builds its partitioning BF16_Optimizer: taciturn's
    sharded state inside DeepSpeed 0.19's whole-weight bf16 wrapper."""
    cfg = load_config("cdadam.json")
    cfg["bf16"] = {"enabled": True}
    return scenario_pipeline(1, cfg)


def scenario_version() -> dict:
    tds.register()  # idempotent
    return {"deepspeed": deepspeed.__version__, "taciturn": taciturn.__version__, "registered": tds.is_registered()}


SCENARIOS = {
    "version": scenario_version,
    "bytes": scenario_bytes,
    "bytes_sparsams": lambda: scenario_bytes("sparsams_topk.json"),
    "grad_accum": scenario_grad_accum,
    "clipping": scenario_clipping,
    "bf16": scenario_bf16,
    "fp16": scenario_fp16,
    "onebit_stranded": scenario_onebit_stranded,
    "monitor": scenario_monitor,
    "refusals": scenario_refusals,
    "zero0": scenario_zero0,
    "client": scenario_client,
    "mpi_backend": scenario_mpi_backend,
    "pipeline_1x2": lambda: scenario_pipeline(1),
    "pipeline_2x1": lambda: scenario_pipeline(2),
    "pipeline_bf16": scenario_pipeline_bf16,
    # DeepSpeed's TestOneBitAdamFP16Pipeline (there 2 stages x 2 data-parallel ranks, freeze_step 200 of 100 steps)
    "pipeline_onebit_fp16": lambda: scenario_pipeline(1, upstream_onebit_config("fp16"), "momentum"),
}
#: scenarios named ``kind:argument`` (a config file or a precision)
PARAMETRISED = {
    "train": scenario_train,
    "checkpoint": scenario_checkpoint,
    "zero": scenario_zero,
    "onebit_basic": scenario_onebit_basic,
    "onebit_mask": scenario_onebit_mask,
    "onebit_checkpoint": scenario_onebit_checkpoint,
    "onebit_overflow": scenario_onebit_overflow,
    "zoadam_basic": lambda precision: scenario_onebit_basic(precision, "ZeroOneAdam"),
    "zoadam_mask": scenario_zoadam_mask,
    "zoadam_checkpoint": scenario_zoadam_checkpoint,
    "zoadam_overflow": lambda precision: scenario_onebit_overflow(precision, "ZeroOneAdam"),
    "lamb_basic": lambda precision: scenario_onebit_basic(precision, "OneBitLamb"),
    "lamb_checkpoint": scenario_lamb_checkpoint,
    "lamb_empty": scenario_lamb_empty,
    "lamb_overflow": lambda precision: scenario_onebit_overflow(precision, "OneBitLamb"),
}


def run(name: str):
    kind, _, arg = name.partition(":")
    if kind in PARAMETRISED:
        return PARAMETRISED[kind](arg)
    return SCENARIOS[name]()


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)  # passed by the `deepspeed` launcher
    parser.add_argument("scenarios", nargs="+")
    ARGS = parser.parse_args()
    # a scenario that fails on one rank only leaves its peer in a collective: fail it in 2 minutes, not 30
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    for name in ARGS.scenarios:
        try:
            result = run(name)
        except Exception:
            result = {"error": traceback.format_exc()}
        with open(os.path.join(ARGS.out, f"{name.replace(':', '_')}.rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()


if __name__ == "__main__":
    main()
