"""Hugging Face ``Trainer`` with taciturn's compressed communication.

Three ways, all under ``torchrun --nproc_per_node N``:

1. A taciturn optimizer, no DeepSpeed (one line)::

       trainer = TaciturnTrainer(model=model, args=training_arguments("out", ...), train_dataset=ds,
                                 taciturn_optimizer="cdadam", taciturn_kwargs={"lr": 1e-4})

   The optimizer averages the gradients (compressed) inside ``step()``, so the DDP wrapper that
   accelerate puts around the model is told to keep gradients local (``keep_gradients_local``:
   a comm hook that communicates nothing); otherwise DDP would first allreduce them in fp32.
   A taciturn optimizer given through ``optimizers=`` or ``optimizer_cls_and_kwargs=`` is
   detected the same way. ``max_grad_norm`` then clips each rank's local gradient before it is
   compressed (the average exists only inside ``step()``).

2. DDP comm hooks with any optimizer: ``TaciturnTrainer(..., comm_hook="markov_sign",
   comm_hook_kwargs={...})`` registers ``taciturn.integrations.ddp``'s hook on the DDP model;
   with ``optimizers=(taciturn.AMSGrad(model.parameters(), process_group="local"), None)`` that
   is CD-Adam exactly.

3. DeepSpeed (``TrainingArguments(deepspeed="configs/cdadam.json")``): the optimizer must come
   from the JSON (``"optimizer": {"type": "CDAdam", ...}``; Hugging Face refuses ``optimizers=``
   with DeepSpeed). ``TaciturnTrainer`` imports ``taciturn.integrations.deepspeed`` so the type
   resolves; a plain ``Trainer`` works too once that module is imported.

In every case ``TaciturnTrainer`` adds the communication metrics of the last step to the
Trainer's training logs (``taciturn/bytes_up``, ``taciturn/bytes_down``,
``taciturn/compression_ratio``, ``taciturn/compress_time``, ``taciturn/collective_time``,
``taciturn/total_bytes_up``...), so they reach ``log_history`` and every ``report_to``
integration; checkpoints hold each rank's compression state (``taciturn_rank<r>.pt`` next to
``optimizer.pt``, which Hugging Face writes from rank 0 only).

CPU machines: Hugging Face sees the ranks of a ``torchrun`` job only with ``use_cpu=True,
ddp_backend="gloo"`` (without them every rank trains alone on the whole data set);
``training_arguments()`` sets both when there is no CUDA, and ``TaciturnTrainer`` refuses
arguments that lost the ranks.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainingArguments

from taciturn.checkpoint import rank_path
from taciturn.optim.base import CompressedOptimizer
from taciturn.registry import create_optimizer, valid_kwargs, get_record

from .ddp import CompressionHookState, keep_gradients_local, register_compression_hook

__all__ = ["TaciturnTrainer", "training_arguments", "deepspeed_defaults", "find_taciturn_optimizer"]

RANK_FILE = "taciturn_rank{rank}.pt"  # existing checkpoints hold these names


def _launched_ranks() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


#: DeepSpeed JSON keys that Hugging Face requires to equal a TrainingArguments field
_DS_FIELDS = (
    ("train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
    ("gradient_accumulation_steps", "gradient_accumulation_steps"),
    ("gradient_clipping", "max_grad_norm"),
    ("optimizer.params.lr", "learning_rate"),
    ("scheduler.params.warmup_max_lr", "learning_rate"),
    ("optimizer.params.eps", "adam_epsilon"),
    ("optimizer.params.weight_decay", "weight_decay"),
    ("scheduler.params.warmup_num_steps", "warmup_steps"),
    ("scheduler.params.total_num_steps", "max_steps"),
    ("fp16.enabled", "fp16"),
    ("bf16.enabled", "bf16"),
)


def _load_deepspeed_config(config) -> dict:
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, dict):
        raise TypeError(f"deepspeed= must be a path to a JSON file or a dict, got {type(config).__name__}")
    return config


def deepspeed_defaults(config) -> dict:
    """The TrainingArguments values a DeepSpeed JSON (path or dict) fixes, by field name
    (``"auto"`` entries fix nothing); Hugging Face refuses arguments that differ from them."""
    config = _load_deepspeed_config(config)
    out = {}

    def value(key):
        node = config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return None if node == "auto" else node

    for key, field_name in _DS_FIELDS:
        v = value(key)
        if v is not None:
            out.setdefault(field_name, v)
    betas = value("optimizer.params.betas")
    if betas is not None:
        out["adam_beta1"], out["adam_beta2"] = betas
    return out


def training_arguments(output_dir: Optional[str] = None, **kwargs) -> TrainingArguments:
    """``TrainingArguments(output_dir, **kwargs)`` that work for multi-process CPU jobs and DeepSpeed JSONs.

    Without CUDA, in a job of several processes, ``use_cpu=True`` and ``ddp_backend="gloo"`` are
    set unless given (Hugging Face sees the ranks only then). With ``deepspeed=`` (a JSON path
    or dict; a missing ``zero_optimization`` section, which accelerate requires, is added as
    DeepSpeed's default stage 0), the values the JSON fixes (micro batch size, gradient accumulation and clipping,
    the optimizer's lr/betas/eps/weight_decay, WarmupLR's steps, fp16/bf16) become the defaults
    of the matching fields, so ``--deepspeed configs/cdadam.json`` runs as written; a field you
    pass explicitly wins, and Hugging Face reports any conflict with the JSON.
    """
    if _launched_ranks() > 1 and not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)
        kwargs.setdefault("ddp_backend", "gloo")
    if kwargs.get("deepspeed"):
        config = _load_deepspeed_config(kwargs["deepspeed"])
        # accelerate insists on the section; DeepSpeed's own default is stage 0 (what taciturn needs)
        kwargs["deepspeed"] = {"zero_optimization": {"stage": 0}, **config}
        for name, v in deepspeed_defaults(config).items():
            kwargs.setdefault(name, v)
    return TrainingArguments(output_dir, **kwargs)


def _unwrap(obj, cls: type, attr: str):
    """The first ``cls`` in the chain obj, obj.<attr>, obj.<attr>.<attr>... (at most 8 deep), or None."""
    for _ in range(8):
        if obj is None or isinstance(obj, cls):
            return obj
        obj = getattr(obj, attr, None)
    return None


def find_taciturn_optimizer(optimizer) -> Optional[CompressedOptimizer]:
    """The taciturn optimizer inside the wrappers of accelerate and DeepSpeed, or None."""
    return _unwrap(optimizer, CompressedOptimizer, "optimizer")


def _find_ddp(model) -> Optional[DistributedDataParallel]:
    return _unwrap(model, DistributedDataParallel, "module")


class TaciturnTrainer(Trainer):
    """``transformers.Trainer`` with taciturn's compressed communication (see the module docstring).

    ``taciturn_optimizer``: a registry name (``"cdadam"``, ``"onebit_adam"``...). Its learning
    rate, betas, eps and weight decay come from ``TrainingArguments`` (``learning_rate``,
    ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay``, decoupled as in AdamW; no decay on biases
    and norms, as Hugging Face groups them) unless ``taciturn_kwargs`` sets them; the Trainer's
    scheduler drives the learning rate. ``comm_hook``: a preset of
    ``taciturn.integrations.ddp.PRESETS`` (or a ready ``CompressionHookState``) for the DDP
    model, with ``comm_hook_kwargs``; the optimizer is then a normal one.
    """

    def __init__(self, *args, taciturn_optimizer: Optional[str] = None, taciturn_kwargs: Optional[dict] = None,
                 comm_hook=None, comm_hook_kwargs: Optional[dict] = None, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        deepspeed = getattr(training_args, "deepspeed", None)
        if taciturn_optimizer is not None:
            get_record(taciturn_optimizer)
            if deepspeed:
                raise ValueError("TaciturnTrainer: with DeepSpeed the optimizer comes from the JSON config "
                                 "(\"optimizer\": {\"type\": \"CDAdam\", \"params\": {...}}); drop "
                                 "taciturn_optimizer= or drop deepspeed= from TrainingArguments")
            if kwargs.get("optimizers", (None, None))[0] is not None or kwargs.get("optimizer_cls_and_kwargs"):
                raise ValueError("TaciturnTrainer: give the optimizer once, either taciturn_optimizer= or "
                                 "optimizers=/optimizer_cls_and_kwargs=")
        elif taciturn_kwargs:
            raise ValueError("TaciturnTrainer: taciturn_kwargs= given without taciturn_optimizer=")
        if comm_hook is not None and (taciturn_optimizer is not None or deepspeed):
            raise ValueError("TaciturnTrainer: comm_hook= compresses DDP's allreduce; it cannot be combined with "
                             "a taciturn optimizer (which communicates itself) or with DeepSpeed (no DDP)")
        if comm_hook_kwargs and comm_hook is None:
            raise ValueError("TaciturnTrainer: comm_hook_kwargs= given without comm_hook=")
        if deepspeed:
            import taciturn.integrations.deepspeed  # noqa: F401  (registers the JSON optimizer types)
        self.taciturn_optimizer = taciturn_optimizer
        self.taciturn_kwargs = dict(taciturn_kwargs or {})
        self.comm_hook = comm_hook
        self.comm_hook_kwargs = dict(comm_hook_kwargs or {})
        self.hook_state: Optional[CompressionHookState] = None
        self._pending_hook_state: Optional[dict] = None
        super().__init__(*args, **kwargs)
        if _launched_ranks() > 1 and self.args.world_size == 1:
            raise ValueError(f"TaciturnTrainer: this job was launched with WORLD_SIZE={_launched_ranks()} but the "
                             "TrainingArguments see one process, so every rank would train alone. On a machine "
                             "without CUDA pass use_cpu=True, ddp_backend=\"gloo\" (or build the arguments with "
                             "taciturn.integrations.transformers.training_arguments(...))")

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.taciturn_optimizer is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = [
            {"params": [p for n, p in opt_model.named_parameters() if n in decay and p.requires_grad],
             "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in opt_model.named_parameters() if n not in decay and p.requires_grad],
             "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        rec = get_record(self.taciturn_optimizer)
        accepted = valid_kwargs(rec.cls)
        defaults = {"lr": self.args.learning_rate, "betas": (self.args.adam_beta1, self.args.adam_beta2),
                    "eps": self.args.adam_epsilon, "weight_decay": self.args.weight_decay,
                    "decoupled_weight_decay": True}
        options = {k: v for k, v in defaults.items() if k in accepted}
        options.update(self.taciturn_kwargs)
        self.optimizer = create_optimizer(rec.name, groups, **options)
        return self.optimizer

    @property
    def compressed_optimizer(self) -> Optional[CompressedOptimizer]:
        """The taciturn optimizer being trained, if any (unwrapped from accelerate/DeepSpeed)."""
        return find_taciturn_optimizer(self.optimizer)

    # ------------------------------------------------------------------ DDP
    def _attach(self, model) -> None:
        ddp = _find_ddp(model)
        opt = self.compressed_optimizer
        if self.comm_hook is None:
            # an optimizer over one process (process_group="local") leaves the averaging to DDP
            if ddp is not None and opt is not None and opt.comm.world_size > 1:
                keep_gradients_local(ddp)
            return
        if self.hook_state is not None:
            return
        if opt is not None and opt.comm.world_size > 1:
            raise ValueError(f"TaciturnTrainer: comm_hook={self.comm_hook!r} already averages the gradients, and "
                             f"{type(opt).__name__} communicates over {opt.comm.world_size} ranks too; build it with "
                             "process_group=\"local\" (e.g. taciturn.AMSGrad(params, process_group=\"local\")) or "
                             "drop comm_hook=")
        if ddp is None:
            warnings.warn("TaciturnTrainer: comm_hook= given but the model is not wrapped in DistributedDataParallel "
                          "(one process?): nothing to compress", stacklevel=3)
            self.comm_hook = None
            return
        self.hook_state = register_compression_hook(ddp, self.comm_hook, **self.comm_hook_kwargs)
        if self._pending_hook_state is not None:
            self.hook_state.load_state_dict(self._pending_hook_state)
            self._pending_hook_state = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._attach(model)
        return super().training_step(model, inputs, num_items_in_batch)

    # ------------------------------------------------------------------ metrics
    def taciturn_metrics(self) -> dict:
        """The last step's communication metrics of the taciturn optimizer or comm hook."""
        source = self.hook_state if self.hook_state is not None else self.compressed_optimizer
        return source.metrics() if source is not None and source.stats.steps else {}

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if "loss" in logs or "train_runtime" in logs:
            logs = {**logs, **self.taciturn_metrics()}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        own = {}
        if self.compressed_optimizer is not None and not self.is_deepspeed_enabled:
            own["optimizer"] = self.compressed_optimizer.state_dict()
        if self.hook_state is not None:
            own["hook"] = self.hook_state.state_dict()
        if own:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(own, rank_path(output_dir, self.args.process_index, RANK_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.is_deepspeed_enabled:
            return
        path = rank_path(checkpoint, self.args.process_index, RANK_FILE)
        has_optimizer = os.path.isfile(os.path.join(checkpoint, "optimizer.pt"))
        wants_optimizer = self.compressed_optimizer is not None and has_optimizer
        if not os.path.isfile(path):
            if wants_optimizer or self.comm_hook is not None:
                raise FileNotFoundError(f"TaciturnTrainer: {path} is missing: the checkpoint holds no compression "
                                        "state for this rank (saved by another Trainer, or by another number of "
                                        "ranks). Resume from a checkpoint saved by TaciturnTrainer with the same "
                                        "ranks, or start training afresh without resume_from_checkpoint")
            return
        own = torch.load(path, map_location="cpu", weights_only=True)
        if self.compressed_optimizer is not None and "optimizer" in own:
            self.compressed_optimizer.load_state_dict(own["optimizer"])
        if "hook" in own:
            self._pending_hook_state = own["hook"]
