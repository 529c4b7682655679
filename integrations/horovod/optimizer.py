"""The wrapper: ``DistributedOptimizer`` with Horovod's signature, its gradient hooks, the
gradient accumulation count and the wrapped optimizer; the communication is one of two paths,
``taciturn_path`` (a preset) or ``passthrough`` (a Horovod Compressor), picked at construction."""
from __future__ import annotations

import functools
import hashlib
import warnings
import weakref
from contextlib import contextmanager
from typing import Dict, List

import horovod.torch as hvd
import torch

from ...comm.horovod import HorovodCommunicator
from ...consistency import check_same
from ...metrics import CommStats
from . import passthrough, taciturn_path
from .compression import Compression, TaciturnCompression, _describe_compression, _resolve_compression
from .taciturn_path import STATE_KEY


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
    ``ranks_per_node`` (an int, or ``"auto"``: ``hvd.local_size()``) > 1 runs a taciturn preset
    two-level (ALGORITHMS.md): ``intra_node_dtype`` (fp32 or bf16) inside each node of L
    consecutive ranks, the compressed pipeline between nodes, on Horovod process sets (set
    HOROVOD_DYNAMIC_PROCESS_SETS=1 for horovodrun, or ``hvd.init(process_sets="dynamic")``).
    ``param_groups``, ``state``, ``state_dict`` and every other attribute are the wrapped
    optimizer's.
    """

    def __init__(self, optimizer, named_parameters=None, compression=Compression.cdadam,
                 backward_passes_per_step: int = 1, op=None, gradient_predivide_factor: float = 1.0,
                 num_groups: int = 0, groups=None, sparse_as_dense: bool = False, process_set=None,
                 bucket_cap_mb: float = 25.0, ranks_per_node=1, intra_node_dtype: str = "fp32"):
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
        passthrough.check_arguments(self.compression, self.op, self.gradient_predivide_factor)
        if self.is_taciturn:
            taciturn_path.check_arguments(self.compression, self.op, self.gradient_predivide_factor,
                                          _op_name(self.op))
        if not self.is_taciturn and (ranks_per_node != 1 or intra_node_dtype != "fp32"):
            raise ValueError(f"ranks_per_node={ranks_per_node!r} / intra_node_dtype={intra_node_dtype!r} apply to "
                             f"taciturn's presets, not to a Horovod Compressor ({getattr(self.compression, '__name__', self.compression)}: "
                             "Horovod's allreduce is hierarchical with HOROVOD_HIERARCHICAL_ALLREDUCE=1); use e.g. "
                             "compression=Compression.cdadam, or leave them at their defaults")
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
        self._parameter_names = names  # Horovod's attribute (its tests read it)
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
        self.comm = None
        self._path = None
        self._should_synchronize = True
        self._synchronized = False
        self._hooks = []
        self._reset_pending()
        if not self._active:
            return
        self.comm = HorovodCommunicator(self.process_set, prefix=self._prefix)
        if self.is_taciturn:
            self._path = taciturn_path.TaciturnPath(
                self.compression, optimizer, self._params, [group_ids[i] for i in ranked], self._names,
                self._prefix, self.process_set, self.comm, self.op, bucket_cap_mb, self.stats,
                (ranks_per_node, intra_node_dtype))
        else:
            self._path = passthrough.HorovodPath(self.compression, self._params, self._names, self._prefix,
                                                 self.process_set, self.op, self.gradient_predivide_factor,
                                                 sparse_as_dense)
        self._check_consistency()
        ref = weakref.ref(self)
        for p in self._params:
            self._hooks.append(p.register_post_accumulate_grad_hook(functools.partial(_grad_ready, ref)))

    # ------------------------------------------------------------------ set-up
    @property
    def is_taciturn(self) -> bool:
        """True when the compression is a taciturn preset (compressed exchange, stateful)."""
        return isinstance(self.compression, TaciturnCompression)

    @property
    def exchange(self):
        """The core ``Exchange`` of a preset (None for a Horovod Compressor or outside the process set)."""
        return getattr(self._path, "exchange", None)

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

    def reset_compression_state(self) -> None:
        """Zero every error and Markov sequence on this rank (keeps the step). Call it on every rank."""
        if self._active:
            self._path.reset_state()

    # ------------------------------------------------------------------ hooks and communication
    def _reset_pending(self) -> None:
        self._delay = {p: self.backward_passes_per_step for p in self._params}
        self._touched = False
        if self._path is not None:
            self._path.forget()

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if self._delay[p] <= 0:
            raise AssertionError(_TOO_MANY_PASSES)
        self._touched = True
        self._delay[p] -= 1
        if self._delay[p] == 0:
            self._path.grad_ready(p)

    def synchronize(self) -> None:
        """Finish the communication of every gradient and write the averages into ``p.grad``."""
        if not self._active:
            self._synchronized = True
            return
        try:
            self._path.finish()
        finally:
            self._reset_pending()
        self._synchronized = True

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
        if self._touched or (self._path is not None and self._path.busy):
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
        saved = self._path.saved(state_dict, reset_compression_state) if self._active else None
        self._optimizer.load_state_dict(state_dict)
        if self._active:
            self._path.restore(saved, reset_compression_state)

    def _drain(self) -> None:
        """Forget the current step's communication (as Horovod's load_state_dict does), after
        letting any bucket already handed to the communication thread finish."""
        if self._active:
            self._path.drain()
            self._reset_pending()
        self._synchronized = False
        self._should_synchronize = True

    def _rejoin(self) -> None:
        """Fresh communicator names (and, for a preset, a fresh exchange, and a fresh compression
        state if this rank's place changed): Horovod was re-initialised (elastic) or ranks resynchronise."""
        self._drain()
        if not self._active:
            return
        self.comm = HorovodCommunicator(self.process_set, prefix=self._prefix)
        self._path.rejoin(self.comm)

    def _agree_on_compression_state(self, root_rank: int) -> None:
        """Keep each rank's own compression state if all hold theirs for one step; otherwise zero it everywhere."""
        self._path.agree(self.process_set.ranks.index(root_rank) if self.process_set.ranks else root_rank)

    def __getstate__(self):
        raise TypeError("DistributedOptimizer holds hooks, a communicator and a thread and cannot be pickled: save "
                        "optimizer.state_dict() (per rank) instead")

    def __repr__(self):
        what = self._path.describe() if self._path is not None else repr(self.compression)
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
