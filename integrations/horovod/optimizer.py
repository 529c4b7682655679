"""The wrapper: ``DistributedOptimizer`` with Horovod's signature, its gradient hooks, buckets
and communication thread, over taciturn's exchange or Horovod's own allreduce."""
from __future__ import annotations

import functools
import hashlib
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Dict, List, Optional

import horovod.torch as hvd
import torch

from ...comm.base import gather_objects
from ...comm.horovod import HorovodCommunicator
from ...consistency import check_same
from ...exchange import Exchange
from ...feedback import make_feedback
from ...metrics import CommStats
from ...state import CompressionState, mismatch
from .compression import Compression, TaciturnCompression, _describe_compression, _resolve_compression

STATE_KEY = "taciturn.horovod"


_TOO_MANY_PASSES = ("Gradients were computed more than backward_passes_per_step times before call to step(). "
                    "Increase backward_passes_per_step to accumulate gradients locally.")


class _Wrapped:
    """An attribute of the wrapper that is the wrapped optimizer's, read and written through."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj._optimizer, self.name)

    def __set__(self, obj, value):
        setattr(obj._optimizer, self.name, value)


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
                                             self._params[0].device, "DistributedOptimizer", rank_bound=True)
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

    param_groups = _Wrapped()
    state = _Wrapped()
    defaults = _Wrapped()

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
