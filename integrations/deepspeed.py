"""DeepSpeed integration: taciturn optimizers as JSON ``"optimizer"`` types.

    import taciturn.integrations.deepspeed        # registers; idempotent (or call register())
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, config="configs/cdadam.json",
                                                           model_parameters=model.parameters())

With ``{"optimizer": {"type": "CDAdam", "params": {...}}}`` the engine builds taciturn's CDAdam
(names case-insensitive, params checked like ``create_optimizer``: a misspelled one is refused
with the valid list) over the engine's data-parallel group, and switches the engine's own
gradient allreduce off, so the compressed collective is the only gradient communication of
a step. A type that DeepSpeed or torch.optim builds itself (``Adam``, ``AdamW``, ``SGD``,
``Lamb``...) stays DeepSpeed's; ``OneBitAdam``, ``ZeroOneAdam`` and ``OneBitLamb`` are always
taciturn's once this module is imported (the import is the opt-in: DeepSpeed removed its own in
0.19.7, and 0.16's are GPU-only: their compressed backends need cupy or NCCL); to run DeepSpeed
0.16's own on a GPU, do not import this module.

Semantics inside the engine:
- one compressed communication per optimizer step (``gradient_accumulation_steps`` micro
  batches accumulate locally first);
- ``gradient_clipping`` clips each rank's local, pre-compression gradient (with the engine's
  allreduce off there is no averaged gradient before the optimizer step): in fp32 DeepSpeed
  averages the local norms over the data-parallel ranks and applies one coefficient
  everywhere, under fp16/bf16 its wrapper uses each rank's own norm;
- fp16/bf16: DeepSpeed's mixed-precision wrapper keeps fp32 master weights, unscales, clips
  and skips overflow steps; the taciturn optimizer is built over the wrapper's fp32 tensors.
  An overflow (agreed over the data-parallel ranks by DeepSpeed's check) skips the step on
  every rank before the optimizer runs, so the compression state is untouched;
- ``"zero_optimization": {"stage": 1}`` or ``{"stage": 2}`` builds taciturn's sharded mode
  (``shard_state=True``, ALGORITHMS.md "Sharded state") instead of DeepSpeed's ZeRO optimizer:
  each rank keeps the update rule's state for the chunk it serves, and the engine runs as a
  stage-0 engine around it (``engine.zero_optimization_stage()`` then reads 0; the stage asked
  for is ``taciturn_zero_stage(engine)``). ``"downlink"`` in the optimizer params picks what is
  sent down ("1bit", "bf16", "fp32"). Stage 2's promise, gradients not kept whole, is not
  kept: DeepSpeed's stage-0 path hands the optimizer every whole ``.grad`` after backward, so
  the gradient memory is a stage-0 engine's; the optimizer state is what shrinks by n. Methods
  without a sharded form (OneBitAdam, SparsAMS) are refused under stage 1/2 with the reason;
  stage 3, ``offload_optimizer`` and ``offload_param`` are refused naming what to use;
- a bf16 pipeline engine, for which DeepSpeed builds its BF16_Optimizer (it partitions the
  optimizer like ZeRO-1), runs DeepSpeed 0.19's whole-weight bf16 wrapper around taciturn's
  sharded mode instead; on 0.16, which builds BF16_Optimizer for every bf16 engine, bf16 is
  refused naming the release that has the wrapper. MoE layers and sequence parallelism are
  refused;
- checkpoints: the compression state is per rank (worker errors, the chunk each rank serves,
  worker-local momenta), while DeepSpeed stage 0 saves rank 0's optimizer only, so
  ``save_checkpoint`` also writes ``taciturn_rank<r>.pt`` per rank into the tag directory and
  ``load_checkpoint`` restores each rank's own; a resumed job continues bit-identically;
- with a monitor enabled (``csv_monitor``, ``tensorboard``...), every step writes
  ``Train/Samples/taciturn_{bytes_up,bytes_down,compress_time,collective_time,compression_ratio}``.

DeepSpeed has no optimizer registry, so ``register()`` wraps a few methods of
``DeepSpeedEngine`` (all listed in ``_PATCHES``; each delegates to DeepSpeed's own unless
the optimizer is taciturn's) after checking the installed version is in
``SUPPORTED_VERSIONS`` and has them and the ones taciturn calls (``_CALLED``).
"""
from __future__ import annotations

import functools
import os
import weakref
from typing import Optional

import torch

from ..checkpoint import rank_path
from ..optim import CompressedOptimizer, OneBitAdam, OneBitLamb, ZeroOneAdam
from ..registry import check_kwargs, get_record, is_taciturn_optimizer

try:
    import deepspeed
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("taciturn.integrations.deepspeed needs DeepSpeed: pip install 'taciturn[deepspeed]' "
                      "(DeepSpeed 0.16.x to 0.19.x)") from err
from deepspeed.runtime import constants as _constants
from deepspeed.runtime.constants import BFLOAT16

#: (min, max) major.minor of DeepSpeed, inclusive; tested on 0.16.9 and 0.19.8.
SUPPORTED_VERSIONS = ((0, 16), (0, 19))
#: the JSON params key the engine fills in itself
_ENGINE_OWNED = ("process_group",)
#: events written to DeepSpeed's monitor after each compressed step
_MONITOR_KEYS = ("bytes_up", "bytes_down", "compress_time", "collective_time", "compression_ratio")

#: DeepSpeedEngine methods taciturn calls without wrapping them (which wrapper the engine builds)
_CALLED = ("_do_optimizer_sanity_check",)

_ORIGINAL = {}


def _version() -> tuple:
    parts = deepspeed.__version__.split("+")[0].split(".")
    return tuple(int(p) for p in parts[:2] if p.isdigit())


def check_version() -> None:
    """Raise a RuntimeError naming the supported range if the installed DeepSpeed is outside it."""
    lo, hi = SUPPORTED_VERSIONS
    if not lo <= _version() <= hi:
        raise RuntimeError(f"taciturn.integrations.deepspeed supports DeepSpeed {lo[0]}.{lo[1]}.x to "
                           f"{hi[0]}.{hi[1]}.x (tested on 0.16.9 and 0.19.8); found {deepspeed.__version__}. "
                           f"Install a supported release: pip install 'deepspeed>={lo[0]}.{lo[1]},"
                           f"<{hi[0]}.{hi[1] + 1}'")


def taciturn_optimizer(engine) -> Optional[CompressedOptimizer]:
    """The taciturn optimizer inside ``engine`` (under any fp16/bf16 wrapper), or None."""
    opt = getattr(engine, "basic_optimizer", None)
    return opt if isinstance(opt, CompressedOptimizer) else None


# ---------------------------------------------------------------------------- which types are ours
def _record(name):
    try:
        return get_record(name)
    except ValueError:
        return None


#: types taciturn builds even where DeepSpeed has its own (0.16's are GPU-only)
_ALWAYS_OURS = (OneBitAdam, ZeroOneAdam, OneBitLamb)


def _claims(engine, name) -> bool:
    """True when the JSON type ``name`` is built by taciturn rather than by DeepSpeed."""
    if engine.client_optimizer or not is_taciturn_optimizer(name):
        return False
    rec = _record(name)
    if rec is not None and rec.cls in _ALWAYS_OURS:
        return True
    return not _ORIGINAL["_is_supported_optimizer"](engine, name)


def _is_supported_optimizer(self, optimizer_name):
    """DeepSpeed 0.19 asserts on this before building anything: accept taciturn's types and
    answer an unknown one with the valid names instead of a bare assertion."""
    if _claims(self, optimizer_name) or _ORIGINAL["_is_supported_optimizer"](self, optimizer_name):
        return True
    try:
        get_record(optimizer_name)
    except ValueError as err:
        raise ValueError(f"optimizer type {optimizer_name!r} is neither built into DeepSpeed / torch.optim nor a "
                         f"taciturn optimizer: {err}") from None
    return False


# ---------------------------------------------------------------------------- building the optimizer
class _Placeholder(torch.optim.Optimizer):
    """A stand-in optimizer that holds the param groups while DeepSpeed wraps it for fp16/bf16.

    The wrapper swaps the groups' parameters for fp32 master copies and runs one step with
    zero gradients to initialise state; the taciturn optimizer is built afterwards, over the
    swapped parameters, so it neither sees that step nor the low-precision tensors.
    """

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def _dp_group(engine):
    """The data-parallel group the engine would allreduce gradients over."""
    if engine.pipeline_parallelism:
        return engine.mpu.get_data_parallel_group()
    return engine.data_parallel_group


#: the engine attribute holding the ZeRO stage a taciturn job asked for (run as sharded state)
_ASKED_STAGE = "_taciturn_zero_stage"
#: DeepSpeed 0.19's whole-weight bf16 wrapper (absent in 0.16)
_DDP_BFLOAT16 = getattr(_constants, "DDP_BFLOAT16", None)


def taciturn_zero_stage(engine) -> int:
    """The ZeRO stage the config asked for (1 or 2 run as taciturn's sharded state; else 0)."""
    return getattr(engine, _ASKED_STAGE, 0)


def _refuse_zero(engine, name: str) -> None:
    stage = engine.zero_optimization_stage()
    if stage >= 3:
        raise ValueError(f"taciturn's {name} cannot run under ZeRO stage {stage}: stage 3 partitions the parameters "
                         "themselves, while taciturn's chunk owners update a model every rank holds whole. Use "
                         "\"zero_optimization\": {\"stage\": 2} (or 1), which runs taciturn's sharded optimizer "
                         "state, or stage 0")
    offload = [k for k in ("offload_optimizer", "offload_param")
               if getattr(engine._config.zero_config, k, None) is not None]
    if stage >= 1 and offload:
        raise ValueError(f"taciturn's {name} does not offload ({', '.join(offload)} in zero_optimization): its "
                         "sharded state stays on the device. Remove the offload section; stage "
                         f"{stage} then runs taciturn's sharded state, at 4 + 20/n bytes per parameter for CDAdam")


def _to_sharded(engine, kwargs: dict, name: str, reason: str) -> None:
    """Run the engine as stage 0 around taciturn's sharded state."""
    if kwargs.get("shard_state") is False:
        raise ValueError(f"{name}: {reason}, which taciturn runs as shard_state=True; remove \"shard_state\": false "
                         "from the optimizer params, or use \"zero_optimization\": {\"stage\": 0}")
    kwargs["shard_state"] = True
    setattr(engine, _ASKED_STAGE, engine.zero_optimization_stage())
    engine._config.zero_enabled = False
    engine._config.zero_optimization_stage = 0


def _bf16_partitioned(engine) -> bool:
    return engine.bfloat16_enabled() and engine._do_optimizer_sanity_check(None) == BFLOAT16


def _refuse_unsupported(engine, name: str) -> None:
    if engine.zero_optimization_stage() >= 1:
        raise ValueError(f"a {name} passed as optimizer= cannot run under ZeRO stage {engine.zero_optimization_stage()}"
                         f": name it in the JSON config (\"optimizer\": {{\"type\": \"{name}\", ...}}), where "
                         "stages 1 and 2 run taciturn's sharded optimizer state, or use stage 0")
    if engine.has_moe_layers:
        raise ValueError(f"taciturn's {name} does not support MoE layers (expert parameters need expert-parallel "
                         "groups); use a DeepSpeed optimizer for MoE models")
    if getattr(engine, "sequence_parallel_size", 1) > 1:
        raise ValueError(f"taciturn's {name} does not support sequence parallelism (sequence_parallel_size="
                         f"{engine.sequence_parallel_size}); use data parallelism, optionally with pipeline stages")
    if _bf16_partitioned(engine):
        if engine.pipeline_parallelism:
            which, fix = "bf16 pipeline engines", "name it in the JSON config, where it runs as sharded state"
        else:
            which = f"every bf16 engine without ZeRO in DeepSpeed {deepspeed.__version__}"
            fix = ("use DeepSpeed 0.19 (pip install 'deepspeed>=0.19,<0.20'), whose bf16 engine keeps the whole "
                   "fp32 master weights on every rank, or fp16 / fp32 on this release")
        raise ValueError(f"taciturn's {name} cannot run under DeepSpeed's BF16_Optimizer, which DeepSpeed builds for "
                         f"{which}: it partitions the fp32 master weights and optimizer state across the "
                         "data-parallel ranks (as ZeRO stage 1 does), while taciturn compresses every rank's whole "
                         f"gradient. Fix: {fix}.")


def _kwargs(engine, name: str):
    """The optimizer's record and keyword arguments: the JSON params plus the engine's process group."""
    params = dict(engine.optimizer_params() or {})
    owned = [k for k in _ENGINE_OWNED if k in params]
    if owned:
        raise ValueError(f"{name}: remove {owned} from the JSON params: the DeepSpeed engine passes its own "
                         "data-parallel group")
    rec = check_kwargs(name, params)
    group = _dp_group(engine)
    backend = params.get("comm_backend_name")
    if backend is not None:
        if torch.distributed.get_world_size(group) == torch.distributed.get_world_size():
            return rec, params  # OneBitAdam maps it: nccl, compressed -> torch.distributed; mpi -> mpi4py
        if str(backend).lower() == "mpi":
            raise ValueError(f"{name}: comm_backend_name='mpi' communicates over MPI COMM_WORLD, but this engine's "
                             "data-parallel group is smaller than the world (pipeline or model parallelism); use "
                             "'nccl' or 'gloo' (torch.distributed)")
    params["process_group"] = group
    return rec, params


def _configure_optimizer(self, client_optimizer, model_parameters):
    name = self.optimizer_name()
    if isinstance(client_optimizer, CompressedOptimizer):
        _check_client(self, client_optimizer)
    if client_optimizer is not None or not _claims(self, name):
        _ORIGINAL["_configure_optimizer"](self, client_optimizer, model_parameters)
        if isinstance(client_optimizer, CompressedOptimizer):
            _handshake(self, client_optimizer)
        return
    _refuse_zero(self, name)
    rec, kwargs = _kwargs(self, name)
    asked = self.zero_optimization_stage()
    if asked in (1, 2):
        _to_sharded(self, kwargs, rec.name, f"\"zero_optimization\": {{\"stage\": {asked}}} partitions the "
                                            "optimizer state")
    if self.pipeline_parallelism and _DDP_BFLOAT16 is not None and _bf16_partitioned(self):
        _to_sharded(self, kwargs, rec.name, "a bf16 pipeline engine partitions the optimizer state (BF16_Optimizer)")
        self._do_optimizer_sanity_check = lambda basic_optimizer: _DDP_BFLOAT16  # the whole-weight bf16 wrapper
    _refuse_unsupported(self, name)
    placeholder = _Placeholder(model_parameters)
    numel = sum(p.numel() for g in placeholder.param_groups for p in g["params"] if p.requires_grad)
    _ORIGINAL["_configure_optimizer"](self, placeholder, model_parameters)
    wrapper = self.optimizer
    held = sum(p.numel() for g in placeholder.param_groups for p in g["params"] if p.requires_grad)
    if held != numel or not (wrapper is placeholder or getattr(wrapper, "optimizer", None) is placeholder):
        raise ValueError(f"taciturn's {rec.name} cannot run under DeepSpeed's {type(wrapper).__name__}: it hands the "
                         f"optimizer {held} of the {numel} parameter elements (it partitions them across "
                         "data-parallel ranks); taciturn needs every rank's whole gradient: use fp32, fp16 or bf16 "
                         "without ZeRO.")
    try:
        opt = rec.cls(placeholder.param_groups, **kwargs)
    except ValueError as err:
        if not kwargs.get("shard_state"):
            raise
        raise ValueError(f"{err} (this engine asks for partitioned optimizer state: ZeRO stage "
                         f"{taciturn_zero_stage(self) or 1}; use \"zero_optimization\": {{\"stage\": 0}} for "
                         f"{rec.name})") from err
    _check_group(self, opt, "mpirun to launch a comm_backend_name='mpi' job, or comm_backend_name 'nccl' / 'gloo'")
    self.basic_optimizer = opt
    if wrapper is placeholder:
        self.optimizer = opt
    else:
        wrapper.optimizer = opt
    _handshake(self, opt)


def _check_client(engine, opt: CompressedOptimizer) -> None:
    """A taciturn optimizer passed as ``optimizer=``: fine in fp32 over the data-parallel group."""
    name = type(opt).__name__
    _refuse_unsupported(engine, name)
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        raise ValueError(f"a {name} passed as optimizer= cannot run under fp16/bf16: DeepSpeed's wrapper replaces "
                         "the parameters it was built over with fp32 copies; name it in the JSON config instead "
                         f"(\"optimizer\": {{\"type\": \"{name}\", \"params\": {{...}}}})")
    _check_group(engine, opt, "process_group= that group, or name it in the JSON config")


def _check_group(engine, opt: CompressedOptimizer, fix: str) -> None:
    """The optimizer must average over exactly the engine's data-parallel ranks (the engine's own
    allreduce is off: a smaller group, e.g. mpi4py's COMM_WORLD of 1 under torchrun, would
    silently train each rank alone)."""
    dp = torch.distributed.get_world_size(_dp_group(engine))
    if opt.comm.world_size != dp:
        raise ValueError(f"{type(opt).__name__} communicates over {opt.comm.world_size} rank(s) "
                         f"({type(opt.comm).__name__}) but the engine's data-parallel group has {dp}; use {fix}")


def _handshake(engine, opt: CompressedOptimizer) -> None:
    """The compressed collective replaces the engine's gradient allreduce; metrics go to the monitor."""
    engine.enable_backward_allreduce = False
    ref = weakref.ref(engine)
    opt.register_step_post_hook(lambda optimizer, args, kwargs: _write_metrics(ref(), optimizer))


def _write_metrics(engine, opt: CompressedOptimizer) -> None:
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not monitor.enabled or engine.global_rank != 0:
        return
    metrics = opt.metrics()
    samples = engine.global_samples + engine.train_batch_size()  # the value DeepSpeed logs after this step
    monitor.write_events([(f"Train/Samples/taciturn_{k}", float(metrics[f"taciturn/{k}"]), samples)
                          for k in _MONITOR_KEYS])


def _pipeline_init(self, *args, **kwargs):
    _ORIGINAL["PipelineEngine.__init__"](self, *args, **kwargs)
    if taciturn_optimizer(self) is not None:
        self.pipeline_enable_backward_allreduce = False


# ---------------------------------------------------------------------------- checkpoints
RANK_FILE = "taciturn_rank{rank:05d}.pt"  # existing checkpoints hold these names


def _rank_file(directory: str) -> str:
    return rank_path(directory, torch.distributed.get_rank(), RANK_FILE)


def _save_checkpoint(self, save_dir, tag=None, *args, **kwargs):
    opt = taciturn_optimizer(self)
    if opt is None:
        return _ORIGINAL["save_checkpoint"](self, save_dir, tag, *args, **kwargs)
    tag = str(tag) if tag is not None else f"global_step{self.global_steps}"
    directory = os.path.join(save_dir, tag)
    os.makedirs(directory, exist_ok=True)
    torch.save({"world_size": torch.distributed.get_world_size(), "optimizer": opt.state_dict()},
               _rank_file(directory))
    return _ORIGINAL["save_checkpoint"](self, save_dir, tag, *args, **kwargs)


def _load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                     load_lr_scheduler_states=True, load_module_only=False, *args, **kwargs):
    opt = taciturn_optimizer(self)
    bound = opt is not None and opt.compression.rank_bound
    if bound:  # DeepSpeed loads rank 0's optimizer on every rank; each rank's own replaces it below
        opt.compression.rank_bound = False
    try:
        result = _ORIGINAL["load_checkpoint"](self, load_dir, tag, load_module_strict, load_optimizer_states,
                                              load_lr_scheduler_states, load_module_only, *args, **kwargs)
    finally:
        if bound:
            opt.compression.rank_bound = True
    load_path = result[0]
    if opt is None or load_path is None or not load_optimizer_states or load_module_only:
        return result
    path = _rank_file(os.path.dirname(load_path))
    world = torch.distributed.get_world_size()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: taciturn saves each rank's compression state next to the "
                                f"DeepSpeed checkpoint, and this rank ({torch.distributed.get_rank()} of {world}) has "
                                "none (saved by a smaller job, or without taciturn?). Resume with the same number "
                                "of ranks, or pass load_optimizer_states=False to restart the optimizer")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved["world_size"] != world:
        raise ValueError(f"{path} was saved by a job of {saved['world_size']} ranks and this one has {world}: "
                         "per-rank compression state cannot be carried over; pass load_optimizer_states=False")
    opt.load_state_dict(saved["optimizer"])
    _sync_low_precision(self.optimizer)
    return result


def _sync_low_precision(wrapper) -> None:
    """Copy fp32 master weights into the model's fp16/bf16 weights (an optimizer such as SAEF
    places different weights on each rank, and DeepSpeed loaded rank 0's into the model)."""
    lp_groups, hp_groups = getattr(wrapper, "fp16_groups", None), getattr(wrapper, "fp32_groups", None)
    if lp_groups is None or hp_groups is None:
        return
    with torch.no_grad():
        for lp_group, hp_group in zip(lp_groups, hp_groups):
            for lp, hp in zip(lp_group, hp_group):
                lp.copy_(hp)


# ---------------------------------------------------------------------------- registration
_PATCHES = (
    ("DeepSpeedEngine", "_is_supported_optimizer", _is_supported_optimizer),
    ("DeepSpeedEngine", "_configure_optimizer", _configure_optimizer),
    ("DeepSpeedEngine", "save_checkpoint", _save_checkpoint),
    ("DeepSpeedEngine", "load_checkpoint", _load_checkpoint),
    ("PipelineEngine", "__init__", _pipeline_init),
)


def register() -> None:
    """Make every taciturn optimizer a DeepSpeed JSON optimizer type. Idempotent."""
    if _ORIGINAL:
        return
    check_version()
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine

    classes = {"DeepSpeedEngine": DeepSpeedEngine, "PipelineEngine": PipelineEngine}
    missing = [f"{c}.{m}" for c, m, _ in _PATCHES if m not in vars(classes[c])]
    missing += [f"DeepSpeedEngine.{m}" for m in _CALLED if m not in vars(DeepSpeedEngine)]
    if missing:
        raise RuntimeError(f"DeepSpeed {deepspeed.__version__} lacks {', '.join(missing)}, which "
                           "taciturn.integrations.deepspeed adapts; use a release in "
                           f"{SUPPORTED_VERSIONS[0]}..{SUPPORTED_VERSIONS[1]} (major, minor)")
    for cls_name, method, wrapper in _PATCHES:
        cls = classes[cls_name]
        original = vars(cls)[method]
        key = method if cls_name == "DeepSpeedEngine" else f"{cls_name}.{method}"
        _ORIGINAL[key] = original
        setattr(cls, method, functools.wraps(original)(wrapper))


def is_registered() -> bool:
    return bool(_ORIGINAL)


register()

__all__ = ["register", "is_registered", "check_version", "taciturn_optimizer", "taciturn_zero_stage",
           "SUPPORTED_VERSIONS"]
