"""Horovod: a compressed ``DistributedOptimizer`` for ``horovodrun`` jobs (MPI or Gloo controller).

Two lines of a Horovod script change::

    import horovod.torch as hvd
    from taciturn.integrations import horovod as thvd

    hvd.init()
    opt = thvd.DistributedOptimizer(taciturn.AMSGrad(model.parameters(), lr=1e-4, process_group="local"),
                                    named_parameters=model.named_parameters(),
                                    compression=thvd.Compression.cdadam)      # = CD-Adam
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    thvd.broadcast_optimizer_state(opt, root_rank=0)

The signature and behaviour are ``hvd.DistributedOptimizer``'s: gradient hooks start the
communication of a bucket as soon as all its gradients are ready, during ``backward()``;
``step()`` waits for it, writes the averages into ``p.grad`` and runs the wrapped optimizer;
``synchronize()`` / ``skip_synchronize()`` let users clip in between; ``backward_passes_per_step``
accumulates locally and communicates once.

Compression:

- a taciturn preset (``Compression.cdadam``, ``dist_ef_block_sign``, ``sparsams_topk``, ``ef_sign``,
  ``markov_sign``, ``bf16``) runs the core ``Exchange`` (``taciturn.exchange``: worker feedback,
  all_to_all of chunks, server feedback and recompression, all_gather) over Horovod's alltoall
  and allgather. The wrapped optimizer receives the two-way-compressed average in ``p.grad``;
  with ``taciturn.AMSGrad(..., process_group="local")`` on top, ``Compression.cdadam`` is
  ``taciturn.CDAdam``. A preset takes compressor options: ``Compression.cdadam(block_size=256)``,
  ``Compression.sparsams_topk(ratio=0.05)``. Buckets (``bucket_cap_mb``, parameters in reverse
  order, the order gradients arrive) run one after the other on one communication thread, in
  the same order on every rank.
- a Horovod ``Compressor`` (``Compression.none``, ``Compression.fp16``, ``ScaledFP16Compressor``)
  is Horovod's path: per-parameter ``allreduce_async_`` of the compressed tensor, named by the
  parameter, fused by Horovod.

Sparse gradients (``nn.Embedding(sparse=True)``): with a Horovod ``Compressor`` they take
Horovod's paths, the sparse allreduce (allgather of indices and values) or, with
``sparse_as_dense=True``, a dense allreduce; the presets always exchange them dense (the codecs
are dense). Either way ``p.grad`` is sparse again after ``synchronize()``, for SparseAdam.

Uneven inputs (``hvd.join()``): a rank that runs out of data calls ``hvd.join()``, as with
Horovod's optimizer. A Horovod ``Compressor`` runs Horovod's allreduce, which joined ranks feed
with zeros. A preset first counts the ranks present each step (a one-float allreduce, which a
joined rank answers with 0); while some rank is joined, the step's gradients go through an
uncompressed fp32 allreduce instead (Horovod's join semantics: joined ranks add zeros, the
average divides by all ranks) and the compression state stays as it is on every rank, so
compressed steps resume in step once every rank has joined. ``hvd.join()`` returns the last rank
to join: broadcast the model from it, as with Horovod.

Compression state (errors, Markov sequences, step) lives in the wrapped optimizer's state under
``optimizer.state["taciturn.horovod"]``, so ``optimizer.state_dict()`` carries it. It is per rank
(each worker's feedback, each rank's server chunk): every rank saves and loads its own state
dict, and ``load_state_dict`` refuses another rank's or another world size's unless
``reset_compression_state=True``. ``broadcast_optimizer_state`` (use this one, not
``hvd.broadcast_optimizer_state``) broadcasts the wrapped optimizer's state from the root and
keeps every rank's own compression state when all ranks hold theirs for the same step; when
they do not (only the root loaded a checkpoint, a rank joined, the world changed) it restarts
compression from zero on every rank, the only state all ranks can agree on. Importing this
module registers a handler so ``hvd.elastic.TorchState`` commits, restores and syncs the
optimizer this way.

Horovod 0.28.1's torch binding has no bfloat16 collectives, so there is no bf16 Compressor for
``hvd.DistributedOptimizer``; ``Compression.bf16`` carries bf16 through this module's optimizer
(alltoall/allgather of bf16 bytes, averaged in fp32).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

try:
    import horovod.torch as hvd
    from horovod.torch.compression import Compressor as HorovodCompressor
    from horovod.torch.elastic import state as _elastic_state
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError("taciturn.integrations.horovod needs Horovod built with PyTorch support "
                      "(Horovod 0.28.1 must be built from source for torch >= 2.1): run scripts/install_horovod.sh") from _e

from ..comm.base import gather_objects
from ..comm.horovod import HorovodCommunicator
from ..consistency import check_same
from ..exchange import Exchange
from ..feedback import make_feedback
from ..metrics import CommStats
from ..names import Registry
from ..presets import Preset, preset
from ..state import CompressionState, mismatch

STATE_KEY = "taciturn.horovod"
_FP16_MAX = 65504.0


# ----------------------------------------------------------------------------- compression

@dataclass(frozen=True)
class TaciturnCompression:
    """A taciturn compression preset: codec + worker and server feedback + direction.

    Stateful (errors, Markov sequences) and not summable, so it runs only inside
    ``taciturn.integrations.horovod.DistributedOptimizer``; Horovod's own optimizer, which
    sums what ``compress`` returns, gets a TypeError from ``compress``.
    Call it to change compressor options: ``Compression.cdadam(block_size=256)``.
    """

    name: str
    preset: Preset

    def __call__(self, **compressor_options) -> "TaciturnCompression":
        return TaciturnCompression(self.name, self.preset.configure(options=compressor_options))

    def describe(self) -> str:
        return f"{self.name}: {self.preset.describe()}"

    def compress(self, tensor):
        raise TypeError(self._refusal())

    def decompress(self, tensor, ctx):
        raise TypeError(self._refusal())

    def _refusal(self) -> str:
        why = ("Horovod 0.28.1 has no bfloat16 collectives" if self.preset.compressor == "bf16" else
               "it keeps per-rank error/Markov state and its payload (sign bits, top-k indices) cannot be "
               "summed, while hvd.DistributedOptimizer allreduces (sums) what Compressor.compress returns")
        return (f"Compression.{self.name} cannot run inside hvd.DistributedOptimizer: {why}. Use "
                f"taciturn.integrations.horovod.DistributedOptimizer(optimizer, named_parameters=..., "
                f"compression=Compression.{self.name}) instead, or a summable Horovod compressor "
                "(Compression.none, Compression.fp16, ScaledFP16Compressor) with hvd.DistributedOptimizer")


def _taciturn(name: str) -> TaciturnCompression:
    return TaciturnCompression(name, preset(name))


class ScaledFP16Compressor(HorovodCompressor):
    """fp16 on the wire with a fixed scale, for ``hvd.DistributedOptimizer`` or this module's.

    Summable: every rank multiplies by the same ``scale`` before the cast and divides after
    the sum, so Horovod's allreduce of the compressed tensors is exact up to fp16 rounding.
    A scale > 1 keeps small gradients out of fp16's subnormal range (below 6.1e-5); a scale
    < 1 (e.g. ``1 / hvd.size()``) keeps the sum of large ones below 65504. Values beyond the
    range saturate at +-65504 instead of becoming inf.
    """

    def __init__(self, scale: float = 1.0):
        scale = float(scale)
        if not (scale > 0 and scale != float("inf")):
            raise ValueError(f"ScaledFP16Compressor(scale={scale!r}): the scale must be a finite number > 0, "
                             "the same on every rank")
        self.scale = scale

    def compress(self, tensor):
        if not tensor.dtype.is_floating_point:
            return tensor, None
        return tensor.float().mul(self.scale).clamp_(-_FP16_MAX, _FP16_MAX).half(), tensor.dtype

    def decompress(self, tensor, ctx):
        if ctx is None:
            return tensor
        return tensor.float().div_(self.scale).to(ctx)

    def __repr__(self):
        return f"ScaledFP16Compressor(scale={self.scale!r})"


class Compression:
    """Compression choices for ``DistributedOptimizer`` (Horovod's names plus taciturn presets)."""

    #: fp32 allreduce (Horovod's NoneCompressor)
    none = hvd.Compression.none
    #: fp16 cast, allreduce, cast back (Horovod's FP16Compressor)
    fp16 = hvd.Compression.fp16
    #: bf16 both ways through alltoall/allgather, averaged in fp32 (Horovod has no bf16 allreduce)
    bf16 = _taciturn("bf16")
    #: CD-Adam's: Markov both ways, 1-bit signs with one l1 scale per 1024-element block
    cdadam = _taciturn("cdadam")
    #: dist-EF-blockSGD's: error feedback both ways (s = 1), blockwise scaled sign
    dist_ef_block_sign = _taciturn("dist_ef_block_sign")
    #: SPARS-AMS's: top-k (1%) with worker error feedback, one-way (all_gather of indices + values)
    sparsams_topk = _taciturn("sparsams_topk")
    #: error feedback both ways, one l1 scale per tensor
    ef_sign = _taciturn("ef_sign")
    #: CD-Adam's preset under the DDP hook's name (``markov_sign(block_size=None)``: one scale
    #: per tensor, the paper's form)
    markov_sign = _taciturn("markov_sign")

    @staticmethod
    def names() -> List[str]:
        return ["none", "fp16", "bf16", "cdadam", "dist_ef_block_sign", "sparsams_topk", "ef_sign", "markov_sign"]


def _resolve_compression(compression):
    if isinstance(compression, str):
        return getattr(Compression, Registry("compression", dict.fromkeys(Compression.names())).canonical(compression))
    if isinstance(compression, TaciturnCompression):
        return compression
    if callable(getattr(compression, "compress", None)) and callable(getattr(compression, "decompress", None)):
        return compression
    raise TypeError(f"compression={compression!r}: pass a Compression.<name> ({', '.join(Compression.names())}) "
                    "or a Horovod Compressor (an object with compress(tensor) and decompress(tensor, ctx))")


# ----------------------------------------------------------------------------- the optimizer

_TOO_MANY_PASSES = ("Gradients were computed more than backward_passes_per_step times before call to step(). "
                    "Increase backward_passes_per_step to accumulate gradients locally.")


class DistributedOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` (composition, not a generated subclass): see the module docstring.

    Arguments as ``hvd.DistributedOptimizer``'s, plus ``bucket_cap_mb`` (fp32 megabytes per
    compressed bucket, default 25). ``op``: ``hvd.Average`` (default) or ``hvd.Sum`` for the
    taciturn presets (any Horovod op for a Horovod Compressor, except Adasum).
    ``groups`` (an int, or lists of parameters) keeps each group in buckets of its own.
    ``param_groups``, ``state``, ``state_dict`` and every other attribute are the wrapped
    optimizer's.
    """

    def __init__(self, optimizer, named_parameters=None, compression=Compression.cdadam,
                 backward_passes_per_step: int = 1, op=None, gradient_predivide_factor: float = 1.0,
                 num_groups: int = 0, groups=None, sparse_as_dense: bool = False, process_set=None,
                 bucket_cap_mb: float = 25.0):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DistributedOptimizer):
            raise TypeError("the optimizer is already a DistributedOptimizer; wrap the inner optimizer once")
        if STATE_KEY in optimizer.state:
            raise ValueError(f"the optimizer already holds '{STATE_KEY}' state: another DistributedOptimizer wraps it")
        _refuse_communicating(optimizer)
        if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step={backward_passes_per_step!r} must be an int >= 1")
        self._optimizer = optimizer
        self.compression = _resolve_compression(compression)
        self.op = hvd.Average if op is None else op
        self.gradient_predivide_factor = float(gradient_predivide_factor)
        self.sparse_as_dense = sparse_as_dense
        self.backward_passes_per_step = backward_passes_per_step
        self._check_op()
        if num_groups:
            warnings.warn("num_groups is deprecated (as in Horovod): use groups=", DeprecationWarning, stacklevel=2)
            groups = num_groups if groups is None else groups

        names = _parameter_names(optimizer, named_parameters)
        trainable = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not trainable:
            raise ValueError("DistributedOptimizer: no parameter of the optimizer requires grad")
        # Reverse order, the order backward produces gradients in, kept together by group.
        order = list(reversed(trainable))
        group_ids = _group_ids(order, groups, names)
        first = {}
        for g in group_ids:
            first.setdefault(g, len(first))
        ranked = sorted(range(len(order)), key=lambda i: first[group_ids[i]])
        self._params: List[torch.Tensor] = [order[i] for i in ranked]
        self._group_ids = [group_ids[i] for i in ranked]
        self._parameter_names = names
        self._names = [names[p] for p in self._params]
        # Every argument is checked above, without Horovod (as in Horovod); from here on it must run.
        if not hvd.is_initialized():
            raise RuntimeError("DistributedOptimizer needs Horovod: call hvd.init() first (and launch with horovodrun)")
        self.process_set = process_set if process_set is not None else hvd.global_process_set
        digest = hashlib.sha1("\0".join(self._names).encode()).hexdigest()[:10]
        self._prefix = f"taciturn.hvd.{self.process_set.process_set_id}.{digest}"
        self.bucket_cap_mb = bucket_cap_mb
        self.stats = CommStats()

        self._active = bool(self.process_set.included())
        self.comm: Optional[HorovodCommunicator] = None
        self.exchange: Optional[Exchange] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._should_synchronize = True
        self._synchronized = False
        self._hooks = []
        self._reset_pending()
        if not self._active:
            return
        self.comm = HorovodCommunicator(self.process_set, prefix=self._prefix)
        if self.is_taciturn:
            self._build_exchange()
            self._init_compression_state(step=0)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taciturn-hvd")
        self._check_consistency()
        self._reset_pending()
        ref = weakref.ref(self)
        for p in self._params:
            self._hooks.append(p.register_post_accumulate_grad_hook(functools.partial(_grad_ready, ref)))

    # ------------------------------------------------------------------ set-up
    @property
    def is_taciturn(self) -> bool:
        """True when the compression is a taciturn preset (compressed pipeline, stateful)."""
        return isinstance(self.compression, TaciturnCompression)

    def _check_op(self) -> None:
        if self.op == hvd.Adasum:
            raise ValueError("op=hvd.Adasum is not supported by taciturn's DistributedOptimizer; use "
                             "hvd.DistributedOptimizer(..., op=hvd.Adasum)")
        if self.gradient_predivide_factor != 1.0 and self.op != hvd.Average:
            raise ValueError("gradient_predivide_factor is supported only with op=hvd.Average (as in Horovod)")
        if self.is_taciturn:
            if self.op not in (hvd.Average, hvd.Sum):
                raise ValueError(f"op={_op_name(self.op)}: Compression.{self.compression.name} averages (hvd.Average) "
                                 "or sums (hvd.Sum) gradients")
            if self.gradient_predivide_factor != 1.0:
                raise ValueError(f"gradient_predivide_factor={self.gradient_predivide_factor!r}: "
                                 f"Compression.{self.compression.name} averages decoded fp32 values, which "
                                 "cannot overflow; leave it at 1.0")

    def _build_exchange(self) -> None:
        chosen = self.compression.preset
        self.exchange = Exchange([p.numel() for p in self._params], chosen.make_compressor(),
                                 make_feedback(chosen.worker), make_feedback(chosen.server), self.comm,
                                 chosen.two_way, self.bucket_cap_mb, self._group_ids)
        self._compression = CompressionState(self._optimizer, STATE_KEY, {"": self.exchange}, self.comm,
                                             self._params[0].device, "DistributedOptimizer")
        self._bucket_of = {}
        for b, idx in enumerate(self.exchange.buckets):
            for i in idx:
                self._bucket_of[self._params[i]] = b

    def _check_consistency(self) -> None:
        check_same(self.comm, f"DistributedOptimizer on {self.process_set}", {
            "parameters": [(n, tuple(p.shape), str(p.dtype)) for n, p in zip(self._names, self._params)],
            "compression": _describe_compression(self.compression),
            "op": _op_name(self.op), "backward_passes_per_step": self.backward_passes_per_step,
            "bucket_cap_mb": self.bucket_cap_mb}, "model and optimizer")

    # ------------------------------------------------------------------ compression state
    @property
    def compression_state(self) -> dict:
        """The flat compression state in the wrapped optimizer: ``"<bucket>.<name>"`` -> fp32
        tensor, plus ``step``, ``rank``, ``world_size`` and ``signature``."""
        return self._optimizer.state[STATE_KEY]

    def _init_compression_state(self, step: int) -> None:
        self._compression.reset(step)

    def _foreign_state(self, saved: dict) -> Optional[str]:
        """Why ``saved`` is not this rank's compression state for these settings (None if it is)."""
        return mismatch(saved, self.comm, self._compression.signature())

    def reset_compression_state(self) -> None:
        """Zero every error and Markov sequence on this rank (keeps the step). Call it on every rank."""
        if self.is_taciturn and self._active:
            self._init_compression_state(step=self.compression_state["step"])

    # ------------------------------------------------------------------ hooks and communication
    def _reset_pending(self) -> None:
        self._delay = {p: self.backward_passes_per_step for p in self._params}
        self._touched = False
        self._handles = {}
        self._futures: Dict[int, object] = {}
        self._sparse = set()
        self._everyone_here = True
        if self.exchange is not None:
            self._missing = [len(idx) for idx in self.exchange.buckets]
            self._next_bucket = 0

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if self._delay[p] <= 0:
            raise AssertionError(_TOO_MANY_PASSES)
        self._touched = True
        self._delay[p] -= 1
        if self._delay[p] > 0:
            return
        if self.is_taciturn:
            self._missing[self._bucket_of[p]] -= 1
            while self._next_bucket < len(self._missing) and self._missing[self._next_bucket] == 0:
                self._launch_bucket(self._next_bucket)
        else:
            self._handles[p] = self._allreduce_async(p)

    def _wire_grad(self, p: torch.Tensor) -> torch.Tensor:
        """``p.grad`` as the dense tensor that goes on the wire (zeros if missing). A sparse
        gradient is densified in place and made sparse again once averaged (``_resparsify``),
        as Horovod's ``sparse_as_dense`` does, so sparse optimizers (SparseAdam) still get one."""
        if p.grad is None:
            # Not computed here (e.g. a branch unused on this rank), maybe computed elsewhere:
            # every rank must take part, with zeros (as Horovod does).
            p.grad = torch.zeros_like(p)
        if p.grad.is_sparse:
            self._sparse.add(p)
            p.grad = p.grad.to_dense()
        return p.grad

    def _resparsify(self) -> None:
        for p in self._sparse:
            p.grad = p.grad.to_sparse()

    def _launch_bucket(self, b: int) -> None:
        grads = [self._wire_grad(self._params[i]) for i in self.exchange.buckets[b]]
        self._futures[b] = self._executor.submit(self._exchange_bucket, b, grads, self._compression.bucket("", b),
                                                 self.compression_state["step"])
        self._next_bucket = b + 1

    def _exchange_bucket(self, b: int, grads: List[torch.Tensor], state: Dict[str, torch.Tensor],
                         step: int) -> List[torch.Tensor]:
        """(communication thread) Bucket ``b``'s average. Before the first bucket of a step the
        ranks count who is here (an allreduce, which Horovod's join supports: a rank inside
        ``hvd.join()`` adds 0). With everyone here the bucket goes through the compressed
        pipeline; while some rank is joined, through ``_joined_average``."""
        if b == 0:
            here = hvd.allreduce(torch.ones(1), name=f"{self._prefix}.here", op=hvd.Sum, process_set=self.process_set)
            self._everyone_here = int(here.item()) == self.comm.world_size
        if self._everyone_here:
            return self.exchange.allreduce(grads, [state], buckets=[b], step=step, stats=self.stats)
        return self._joined_average(b, grads)

    def _joined_average(self, b: int, grads: List[torch.Tensor]) -> List[torch.Tensor]:
        """Horovod's join semantics for a step that some rank spends inside ``hvd.join()``: an
        fp32 allreduce, the joined ranks contributing zeros, averaged over all ranks. The joined
        ranks cannot run the compressed pipeline (it needs every rank's alltoall and its server
        chunk), so the compression state is left as it is on every rank."""
        start = time.perf_counter()
        handles = [hvd.allreduce_async(g.float(), name=f"{self._prefix}.joined.{self._names[i]}", op=hvd.Average,
                                       process_set=self.process_set) for i, g in zip(self.exchange.buckets[b], grads)]
        averaged = [hvd.synchronize(h) for h in handles]
        fp32 = 4 * sum(g.numel() for g in grads)
        self.stats.record(fp32, fp32, fp32, 0.0, time.perf_counter() - start)
        return averaged

    def _allreduce_async(self, p: torch.Tensor):
        name = f"{self._prefix}.{self._parameter_names[p]}"
        if p.grad is not None and p.grad.is_sparse and not self.sparse_as_dense:
            # Horovod's sparse allreduce: allgather of indices and values (uncompressed).
            return hvd.sparse_allreduce_async(p.grad, name=name, op=self.op, process_set=self.process_set), None
        compressed, ctx = self.compression.compress(self._wire_grad(p))
        if self.op == hvd.Average:
            pre, post = 1.0 / self.gradient_predivide_factor, self.gradient_predivide_factor
        else:
            pre, post = 1.0, 1.0
        handle = hvd.allreduce_async_(compressed, name=name, op=self.op, prescale_factor=pre,
                                      postscale_factor=post, process_set=self.process_set)
        return handle, ctx

    def synchronize(self) -> None:
        """Finish the communication of every gradient and write the averages into ``p.grad``."""
        if not self._active:
            self._synchronized = True
            return
        try:
            if self.is_taciturn:
                self._finish_buckets()
            else:
                self._finish_allreduces()
        finally:
            self._reset_pending()
        self._synchronized = True

    def _finish_buckets(self) -> None:
        while self._next_bucket < len(self._missing):
            self._launch_bucket(self._next_bucket)
        outcomes, error = {}, None
        for b, future in self._futures.items():
            try:
                outcomes[b] = future.result()
            except BaseException as e:  # wait for every bucket before raising: none may run on
                error = error or e
        if error is not None:
            raise error
        factor = float(self.comm.world_size) if self.op == hvd.Sum else 1.0
        for b, averaged in sorted(outcomes.items()):
            for i, g in zip(self.exchange.buckets[b], averaged):
                self._params[i].grad.copy_(g if factor == 1.0 else g * factor)
        self._resparsify()
        self.stats.end_step()
        if self._everyone_here:
            self.compression_state["step"] += 1

    def _finish_allreduces(self) -> None:
        for p in self._params:
            if p not in self._handles:
                self._handles[p] = self._allreduce_async(p)
        for p, (handle, ctx) in self._handles.items():
            if callable(handle):  # a sparse allreduce: its result is the averaged sparse gradient
                p.grad = handle()
                continue
            out = self.compression.decompress(hvd.synchronize(handle), ctx)
            if out is not p.grad:
                p.grad.copy_(out)
        self._resparsify()

    @contextmanager
    def skip_synchronize(self):
        """``step()`` inside this context does not synchronize (call ``synchronize()`` before)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(): the gradients are communicated twice. Use "
                              "`with optimizer.skip_synchronize(): optimizer.step()` after synchronize().")
            self.synchronize()
        self._synchronized = False
        return self._optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True):
        if self._touched or self._futures or self._handles:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before optimizer.step() "
                                 "or optimizer.synchronize(). This is prohibited as it can cause a race condition.")
        return self._optimizer.zero_grad(set_to_none=set_to_none)

    def set_backward_passes_per_step(self, passes: int) -> None:
        if not isinstance(passes, int) or passes < 1:
            raise ValueError(f"backward_passes_per_step={passes!r} must be an int >= 1")
        self.backward_passes_per_step = passes
        self._delay = {p: passes for p in self._params}

    def metrics(self) -> dict:
        """The last step's communication metrics (bytes per direction, times, ratio)."""
        return self.stats.as_dict()

    # ------------------------------------------------------------------ the wrapped optimizer
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    @property
    def param_groups(self):
        return self._optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self._optimizer.param_groups = value

    @property
    def state(self):
        return self._optimizer.state

    @state.setter
    def state(self, value):
        self._optimizer.state = value

    @property
    def defaults(self):
        return self._optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self._optimizer.defaults = value

    def __getattr__(self, name):
        # Only called for attributes this object lacks: the wrapped optimizer's (and the
        # torch.optim.Optimizer internals its hook methods use).
        if name.startswith("__") or name == "_optimizer":
            raise AttributeError(name)
        return getattr(self._optimizer, name)

    def add_param_group(self, param_group):
        raise ValueError("DistributedOptimizer cannot take a parameter group after construction (its hooks and "
                         "buckets are fixed): add the group to the wrapped optimizer before wrapping it")

    def state_dict(self):
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict, reset_compression_state: bool = False):
        """Load the wrapped optimizer's state and this rank's compression state.

        The compression state must be this rank's, for this world size and these settings;
        otherwise it is refused unless ``reset_compression_state=True`` (every rank then
        restarts compression from zero, so pass it on every rank).
        """
        self._drain()
        taciturn = self.is_taciturn and self._active
        saved = self._compression.saved(state_dict, reset_compression_state) if taciturn else None
        self._optimizer.load_state_dict(state_dict)
        if taciturn:
            self._compression.restore(saved, reset_compression_state)

    def _drain(self) -> None:
        """Forget the current step's communication (as Horovod's load_state_dict does), after
        letting any bucket already handed to the communication thread finish."""
        for future in self._futures.values():
            if not future.cancel():
                future.exception()
        if self._active:
            self._reset_pending()
        self._synchronized = False
        self._should_synchronize = True

    def _rejoin(self) -> None:
        """Fresh communicator names (and a fresh pipeline and compression state if this rank's
        place changed): Horovod was re-initialised (elastic) or ranks resynchronise."""
        self._drain()
        if not self._active:
            return
        before = (self.comm.rank, self.comm.world_size)
        self.comm = HorovodCommunicator(self.process_set, prefix=self._prefix)
        if self.is_taciturn:
            step = self.compression_state["step"]
            self._build_exchange()
            if (self.comm.rank, self.comm.world_size) != before:
                self._init_compression_state(step)
            self._reset_pending()

    def _agree_on_compression_state(self, root_rank: int) -> None:
        """Keep each rank's own state if all hold theirs for one step; otherwise zero everywhere."""
        st = self.compression_state
        mine = (self._foreign_state(st), int(st["step"]))
        everyone = gather_objects(self.comm, mine)
        root = self.process_set.ranks.index(root_rank) if self.process_set.ranks else root_rank
        steps = {step for _, step in everyone}
        problems = [f"rank {r}: {why}" for r, (why, _) in enumerate(everyone) if why]
        if not problems and len(steps) == 1:
            return
        root_step = everyone[root][1]
        if self.comm.rank == root:
            reason = "; ".join(problems) if problems else f"ranks hold compression state of steps {sorted(steps)}"
            warnings.warn(f"taciturn: compression state restarted from zero on every rank at step {root_step} "
                          f"({reason}). Per-rank errors and Markov sequences cannot be broadcast; to keep them, "
                          "every rank saves and loads its own optimizer.state_dict().")
        self._init_compression_state(root_step)

    def __getstate__(self):
        raise TypeError("DistributedOptimizer holds hooks, a communicator and a thread and cannot be pickled: save "
                        "optimizer.state_dict() (per rank) instead")

    def __repr__(self):
        what = self.compression.describe() if self.is_taciturn else repr(self.compression)
        return f"DistributedOptimizer({self._optimizer!r}, compression={what}, process_set={self.process_set})"


def _describe_compression(compression) -> str:
    """The same text on every rank for the same compression (no object addresses)."""
    if isinstance(compression, TaciturnCompression):
        return compression.describe()
    if isinstance(compression, type) or type(compression).__repr__ is not object.__repr__:
        return repr(compression)
    return type(compression).__qualname__


def _op_name(op) -> str:
    names = {hvd.Average: "hvd.Average", hvd.Sum: "hvd.Sum", hvd.Adasum: "hvd.Adasum", hvd.Min: "hvd.Min",
             hvd.Max: "hvd.Max", hvd.Product: "hvd.Product"}
    return names.get(op, repr(op))


def _grad_ready(ref, p: torch.Tensor) -> None:
    """The post-accumulate-grad hook; holds the optimizer weakly, so a discarded one stops."""
    optimizer = ref()
    if optimizer is not None:
        optimizer._on_grad_ready(p)


def _refuse_communicating(optimizer) -> None:
    comm = getattr(optimizer, "comm", None)
    if comm is not None and getattr(comm, "world_size", 1) > 1:
        raise ValueError(f"{type(optimizer).__name__} communicates itself ({comm!r}); inside DistributedOptimizer "
                         "the wrapped optimizer must run its update rule locally: build it with "
                         "process_group='local', broadcast_parameters=False")


def _parameter_names(optimizer, named_parameters) -> Dict[torch.Tensor, str]:
    if named_parameters is None:
        named = [(f"allreduce.noname.{i}.{j}", v) for i, g in enumerate(optimizer.param_groups)
                 for j, v in enumerate(g["params"])]
    else:
        named = list(named_parameters)
    if any(not isinstance(p, tuple) for p in named):
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually produced by "
                         "model.named_parameters().")
    seen, dups = set(), set()
    for k, _ in named:
        (dups if k in seen else seen).add(k)
    if dups:
        raise ValueError(f"Parameter names in named_parameters must be unique. Found duplicates: {', '.join(sorted(dups))}")
    by_id = {id(v): k for k, v in named}
    missing = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in by_id]
    if missing:
        raise ValueError(f"named_parameters was specified, but {len(missing)} parameter(s) of the optimizer were not "
                         f"named (shapes {[tuple(p.shape) for p in missing][:5]}); pass model.named_parameters() of the "
                         "model whose parameters the optimizer holds")
    return {p: by_id[id(p)] for g in optimizer.param_groups for p in g["params"]}


def _group_ids(order: List[torch.Tensor], groups, names) -> List[int]:
    """A group id per parameter: Horovod's ``groups`` (an int k: k consecutive groups; lists of
    parameters: each list one group, any other parameter alone), or one group for all."""
    if groups is None or groups == 0:
        return [0] * len(order)
    if isinstance(groups, int):
        if groups < 0:
            raise ValueError(f"groups={groups!r} must be a non-negative int or a list of lists of parameters")
        per = -(-len(order) // groups)
        return [i // per for i in range(len(order))]
    if not isinstance(groups, list):
        raise ValueError("groups should be a non-negative integer or a list of list of torch.Tensor.")
    ids: Dict[int, int] = {}
    for gi, group in enumerate(groups):
        for p in group:
            if not isinstance(p, torch.Tensor):
                raise ValueError("groups must consist of torch.Tensor.")
            if id(p) in ids:
                raise ValueError(f"A parameter can only appear once in groups ({names.get(p, tuple(p.shape))}).")
            ids[id(p)] = gi
    return [ids.get(id(p), len(groups) + i) for i, p in enumerate(order)]


# ----------------------------------------------------------------------------- state sync

broadcast_parameters = hvd.broadcast_parameters


def broadcast_optimizer_state(optimizer, root_rank: int = 0, model=None) -> None:
    """``hvd.broadcast_optimizer_state`` for taciturn's DistributedOptimizer (other optimizers are
    passed to Horovod's). Call it on every rank of the optimizer's process set.

    The wrapped optimizer's whole state dict (per-parameter state, hyper-parameters) is
    broadcast from ``root_rank`` (a Horovod rank, as in Horovod) and loaded on the others.
    A wrapped optimizer without state is first given it as Horovod does (``_initialize_state``:
    zero gradients, one local step), so that every rank holds the state after the call.
    Compression state is per rank and is never broadcast: each rank keeps its own when every
    rank holds its own for the same step (fresh optimizers; each rank loaded its own
    checkpoint or elastic commit); otherwise every rank restarts it from zero, with a warning.
    """
    if not isinstance(optimizer, DistributedOptimizer):
        return hvd.broadcast_optimizer_state(optimizer, root_rank, model)
    ranks = optimizer.process_set.ranks
    if ranks and root_rank not in ranks:
        raise ValueError(f"root_rank={root_rank} is not in the optimizer's {optimizer.process_set}: pass one of "
                         f"its Horovod ranks {ranks}")
    optimizer._rejoin()
    if not optimizer._active:
        return
    inner = optimizer.optimizer
    _initialize_state(inner, model)
    sd = inner.state_dict()
    own = sd["state"].get(STATE_KEY)
    shared = {**sd, "state": {k: v for k, v in sd["state"].items() if k != STATE_KEY}}
    shared = hvd.broadcast_object(shared, root_rank, name=f"{optimizer._prefix}.state",
                                  process_set=optimizer.process_set)
    if hvd.rank() != root_rank:
        inner.load_state_dict(shared)
        if own is not None:
            inner.state[STATE_KEY] = own
    if optimizer.is_taciturn:
        optimizer._agree_on_compression_state(root_rank)


def _initialize_state(optimizer: torch.optim.Optimizer, model=None) -> None:
    """Horovod's first broadcast: an optimizer without per-parameter state gets zero gradients
    (sparse ones for SparseAdam, and for SGD on the sparse embeddings of ``model``) and one step
    of its own update rule, so its state exists; the zero gradients stay in ``p.grad``.

    Unlike Horovod, the step runs with ``weight_decay`` 0 (restored after): on zero gradients
    the update of taciturn's and torch's optimizers (but ASGD, whose ``lambd`` decays too) is
    then zero and no parameter moves. Horovod's step lets weight decay move them, on the ranks
    without state only, which desynchronises the model when only the root loaded a checkpoint.
    It is the wrapped optimizer's local step: no collective, no compression state."""
    if any(key != STATE_KEY for key in optimizer.state):
        return
    sparse = set() if model is None else {id(p) for m in model.modules()
                                          if isinstance(m, torch.nn.Embedding) and m.sparse for p in m.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
                if isinstance(optimizer, torch.optim.SparseAdam) or (isinstance(optimizer, torch.optim.SGD)
                                                                     and id(p) in sparse):
                    p.grad = p.grad.to_sparse()
    decays = {i: group["weight_decay"] for i, group in enumerate(optimizer.param_groups) if "weight_decay" in group}
    for i in decays:
        optimizer.param_groups[i]["weight_decay"] = 0.0
    try:
        optimizer.step()
    finally:
        for i, decay in decays.items():
            optimizer.param_groups[i]["weight_decay"] = decay


class OptimizerStateHandler(_elastic_state.StateHandler):
    """``hvd.elastic.TorchState``'s handler for a DistributedOptimizer: commits a deep copy of
    the state dict (compression state included), restores a copy of it (so training never
    writes into the commit) and syncs through ``broadcast_optimizer_state``."""

    def __init__(self, optimizer):
        super().__init__(optimizer)
        self._saved = copy.deepcopy(optimizer.state_dict())

    def save(self):
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self):
        self.value.load_state_dict(copy.deepcopy(self._saved))

    def sync(self):
        broadcast_optimizer_state(self.value, root_rank=0)


def _register_elastic_handler() -> None:
    registry = _elastic_state.get_handler_registry()
    if not any(kind is DistributedOptimizer for kind, _ in registry):
        _elastic_state.set_handler_registry([(DistributedOptimizer, OptimizerStateHandler)] + list(registry))


_register_elastic_handler()

__all__ = ["Compression", "TaciturnCompression", "ScaledFP16Compressor", "DistributedOptimizer",
           "broadcast_parameters", "broadcast_optimizer_state", "OptimizerStateHandler", "STATE_KEY"]
