"""DDP communication hooks that average gradients through taciturn's compressed allreduce.

``model.register_comm_hook(state, hook)`` is DDP's extension point: DDP hands each ready bucket
(a flat buffer of local gradients) to ``hook(state, bucket)`` and waits for the returned future
to hold the averaged buffer. Here the hook runs the core's exchange on the bucket (the entry the
optimizers use, with the same presets, layouts and feedback rules), so no algorithm lives in
this file::

    from taciturn.integrations.ddp import register_compression_hook
    model = DistributedDataParallel(net)
    hook_state = register_compression_hook(model, "markov_sign")   # CD-Adam's communication
    opt = taciturn.AMSGrad(model.parameters(), lr=1e-4, process_group="local")

Presets (``PRESETS``, names of ``taciturn.presets``): ``markov_sign`` (Markov both ways,
blockwise scaled sign: CD-Adam's), ``ef_sign`` (error feedback both ways, per-tensor scaled
sign: dist-EF-SGD's), ``block_sign`` (error feedback both ways, blockwise: dist-EF-blockSGD's),
``topk`` (top-k with worker error feedback, one-way: SPARS-AMS's) and ``identity`` (fp32 over
the same path, a byte-counted baseline). Every ingredient can be overridden (``compressor=``,
``block_size=``, ``ratio=``...).

What runs on top: the hook gives every rank the same averaged gradient, so any optimizer
works. ``markov_sign`` + ``taciturn.AMSGrad(params, process_group="local")`` (CD-Adam's update
rule applied locally) is exactly ``taciturn.CDAdam``; with ``torch.optim.Adam(amsgrad=True)`` on
top it is CD-Adam up to eps placement (torch adds eps outside the square root, CD-Adam inside)
and torch's bias correction. EF presets use the error scale s = 1 (a hook does not see the
learning rate; ``taciturn.DistEFSGD`` rescales by lr_{t-1}/lr_t).

State is keyed by parameter, not by ``bucket.index()``: DDP rebuilds its buckets after the first
iteration (and a restored job starts from its initial buckets). Worker-side state is stored
per bucket as flat tensors, with each parameter's slice known; when a bucket of a new
composition appears, its state is assembled from the slices where they live now, and the
server state (each rank holds only its chunk of a bucket) is reassembled with one fp32
all_reduce of that bucket, so the result is exactly what the old buckets would have produced.
``static_graph=True`` (buckets rebuilt after the second iteration) is followed the same way.
Two-level (``ranks_per_node=L``): a rank's worker state is its shard of the bucket, reassembled
with one fp32 all_reduce inside the node; its server state, a chunk of that shard, with one
over the world.

Checkpoints: ``state_dict()`` / ``load_state_dict()``, and the state pickles without its process
group and model (like PowerSGD's); a state loaded from a pickle is re-attached with
``register_compression_hook(model, state)`` or ``state.bind(model)``. The state is per rank
(each worker's feedback, each rank's server chunk): every rank saves and restores its own.

The state covers what DDP's reducer averages: parameters DDP ignores
(``DDP._set_params_and_buffers_to_ignore_for_model``) or that were frozen when it was built are
left out, one frozen later is kept (DDP reduces its zeros), a complex one is compressed as the
real view DDP buckets. ``with ddp.join():`` (uneven inputs) works: DDP's shadow backward passes
on a rank that ran out of data call the hook on zero gradients, so every rank issues the same
collectives and its feedback state advances as if it had computed zeros.

Limits: hooks run their collectives synchronously, bucket after bucket, in DDP's bucket order
(the same on every rank; on CUDA their kernels are queued on a side stream, beside backward's,
``taciturn.exchange.SideStream``); sparse gradients (``nn.Embedding(sparse=True)``) are refused.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel

from taciturn.comm import Communicator, make_communicator
from taciturn.consistency import check_same
from taciturn.exchange import Exchange, SideStream, Workspace
from taciturn.feedback import make_feedback
from taciturn.metrics import CommStats
from taciturn.names import Registry
from taciturn.presets import Preset, preset as lookup_preset
from taciturn.state import mismatch, refusal
from taciturn.topology import check_topology

__all__ = ["PRESETS", "CompressionHookState", "compressed_hook", "register_compression_hook",
           "keep_gradients_local"]

STATE_FORMAT = "taciturn-ddp-hook-1"


#: the hook's presets: records of ``taciturn.presets`` under the names DDP users know
PRESETS: Dict[str, Preset] = {name: lookup_preset(name)
                              for name in ("markov_sign", "ef_sign", "block_sign", "topk", "identity")}
_HOOK_PRESETS = Registry("hook preset", PRESETS)


@dataclass
class _Slot:
    """The feedback state of one bucket composition: its exchange (one bucket), flat tensors and
    each parameter's offset."""

    names: Tuple[str, ...]
    exchange: Exchange
    state: Dict[str, torch.Tensor]
    offsets: Dict[str, int]

    @property
    def numel(self) -> int:
        return self.exchange.numel


def _reduced_parameters(model: DistributedDataParallel) -> List[Tuple[str, torch.Tensor]]:
    """(name, parameter) of each parameter DDP's reducer averages, in the module's order.

    The reducer's buckets are the truth: they leave out what DDP ignores and what was frozen
    when DDP was built, and keep a parameter frozen later (DDP reduces its zeros). DDP's
    ``join()`` reads them the same way (``_get_zeros_like_grad_buckets``: zero copies, dropped
    here at once)."""
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"taciturn's DDP hook needs a DistributedDataParallel model, got {type(model).__name__}: "
                        "wrap it first, DistributedDataParallel(model), and pass the wrapper (its reducer decides "
                        "which parameters are averaged)")
    sparse = [n for n, m in model.module.named_modules()
              if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse]
    if sparse:  # DDP buckets their gradients sparse (and cannot show those buckets before a backward)
        raise ValueError(f"taciturn's DDP hooks need dense gradients, and {sparse[0]!r} makes sparse ones: build it "
                         "with sparse=False (nn.Embedding / nn.EmbeddingBag)")
    reduced = {id(p) for bucket in model.reducer._get_zeros_like_grad_buckets() for p in bucket.parameters()}
    return [(n, p) for n, p in model.module.named_parameters() if id(p) in reduced]


class CompressionHookState:
    """The state of ``compressed_hook``: compressor, feedback rules, communicator and
    per-parameter feedback state for one DDP model.

    ``model``: the DDP model; the state covers the parameters its reducer averages (not those
    DDP ignores or that were frozen when it was built; complex ones as their real views), named
    as in the module it wraps.
    ``preset``: a name in ``PRESETS``; ``compressor``, ``worker_feedback``, ``server_feedback``
    and ``two_way`` override its parts; ``block_size`` (block_sign), ``ratio``/``k`` (topk,
    randk) and ``compressor_options`` configure the compressor. ``process_group``: None = the DDP
    model's group, a ProcessGroup, or a taciturn Communicator. ``ranks_per_node`` (an int, or
    ``"auto"``: the launcher's local world size) > 1 runs the two-level exchange, with
    ``intra_node_dtype`` (``"fp32"``/``"bf16"``) inside the nodes, as the optimizers do.
    ``check_consistency``: compare the configuration and parameters across ranks once, now.
    """

    def __init__(self, model, preset: str = "markov_sign", *, process_group=None, compressor=None,
                 block_size: Optional[int] = 1024, ratio: Optional[float] = None, k: Optional[int] = None,
                 compressor_options: Optional[dict] = None, worker_feedback: Optional[str] = None,
                 server_feedback: Optional[str] = None, two_way: Optional[bool] = None,
                 ranks_per_node=1, intra_node_dtype: str = "fp32", check_consistency: bool = True):
        chosen = _HOOK_PRESETS.get(preset).configure(compressor, block_size=block_size, ratio=ratio, k=k,
                                                     options=compressor_options, worker=worker_feedback,
                                                     server=server_feedback, two_way=two_way)
        self.config = {
            "preset": _HOOK_PRESETS.canonical(preset),
            "compressor": chosen.compressor,
            "compressor_options": chosen.options,
            "worker_feedback": chosen.worker,
            "server_feedback": chosen.server,
            "two_way": chosen.two_way,
            "ranks_per_node": ranks_per_node,
            "intra_node_dtype": intra_node_dtype,
        }
        self._reset_runtime()
        self.bind(model, process_group, check_consistency=check_consistency)

    # ------------------------------------------------------------------ setup
    def _reset_runtime(self) -> None:
        self.worker = make_feedback(self.config["worker_feedback"])
        self.server = make_feedback(self.config["server_feedback"])
        self.two_way = self.config["two_way"]
        #: state keys that hold one rank's chunk of a bucket (the rest are full-length, per element)
        self.chunk_keys = tuple(self.server.server_keys) if self.two_way else ()
        self.comm = None
        self.ranks_per_node = 1
        self.compressor = None
        self.stats = CommStats()
        #: scratch of the hook's exchanges, shared by the buckets (each result is copied out at once)
        self.work = Workspace()
        #: the CUDA stream the hook's exchanges run on, beside backward (nothing on CPU)
        self.side = SideStream()
        #: fp32 bytes this rank sent to reassemble server state after DDP changed its buckets
        self.rebucket_bytes = 0
        self.step = 0
        self._params: Dict[str, torch.Tensor] = {}
        self._names: Dict[int, str] = {}
        self._slots: Dict[Tuple[str, ...], _Slot] = {}
        self._owner: Dict[str, _Slot] = {}
        self._pending: Optional[dict] = None

    def bind(self, model: DistributedDataParallel, process_group=None,
             check_consistency: bool = True) -> "CompressionHookState":
        """Attach the state to ``model``'s parameters and a communicator (done by the constructor;
        call it again after unpickling a state, or use ``register_compression_hook``)."""
        named = _reduced_parameters(model)
        if not named:
            raise ValueError("CompressionHookState: DDP averages no parameter of this model (all are ignored or "
                             "frozen), so there is nothing for the hook to compress")
        self.comm = make_communicator(model.process_group if process_group is None else process_group)
        # DDP buckets a complex parameter as its real view: so does the state
        self._params = {n: torch.view_as_real(p) if p.is_complex() else p for n, p in named}
        self._names = {id(p): n for n, p in named}
        chosen = Preset(self.config["compressor"], options=self.config["compressor_options"])
        # bound to the whole model: an absolute top-k k counts all of its elements
        self.compressor = chosen.make_compressor().bind(sum(p.numel() for _, p in named))
        if self.config["ranks_per_node"] != 1 or (check_consistency and self.comm.world_size > 1):
            self.ranks_per_node = check_topology(self.comm, self.config["ranks_per_node"], "CompressionHookState")
        if check_consistency and self.comm.world_size > 1:
            check_same(self.comm, "CompressionHookState", self._signature(), "model and hook")
        if self._pending is not None:
            saved, self._pending = self._pending, None
            self.load_state_dict(saved)
        return self

    def _signature(self) -> dict:
        return {"hook configuration": self.config,
                "parameters": [(n, tuple(p.shape)) for n, p in self._params.items()]}

    # ------------------------------------------------------------------ buckets
    @property
    def buckets(self) -> List[Tuple[str, ...]]:
        """Parameter names of the bucket compositions whose state is live, in creation order."""
        return [names for names, slot in self._slots.items() if any(self._owner.get(n) is slot for n in names)]

    def _new_slot(self, names: Tuple[str, ...], device) -> _Slot:
        sizes = [self._params[n].numel() for n in names]
        exchange = Exchange(sizes, self.compressor, self.worker, self.server, self.comm, self.two_way,
                            bucket_cap_mb=None, workspace=self.work, ranks_per_node=self.ranks_per_node,
                            intra_node_dtype=self.config["intra_node_dtype"])
        offsets, at = {}, 0
        for n, size in zip(names, sizes):
            offsets[n] = at
            at += size
        return _Slot(names, exchange, exchange.init_state(device)[0], offsets)

    def _names_of(self, bucket) -> Tuple[str, ...]:
        if self.comm is None:
            raise RuntimeError("this CompressionHookState is not attached to a model (it was unpickled): call "
                               "register_compression_hook(ddp_model, state) or state.bind(ddp_model) first")
        try:
            return tuple(self._names[id(p)] for p in bucket.parameters())
        except KeyError:
            raise RuntimeError(f"DDP bucket {bucket.index()} holds a parameter that this hook state was not built "
                               "for: the state belongs to another DDP model. Build or bind the state from the DDP "
                               "model you train (register_compression_hook(ddp_model, ...)).") from None

    def slot_for(self, bucket) -> _Slot:
        """The state of ``bucket``'s composition, assembled from where its parameters' state lives."""
        names = self._names_of(bucket)
        slot = self._slots.get(names)
        if slot is not None and all(self._owner.get(n) is slot for n in names):
            return slot
        return self._rebucket(names, bucket.buffer().device)

    def _spans(self, slot: _Slot) -> Dict[str, Tuple[slice, Optional[Communicator]]]:
        """Per state key: the part of the bucket this rank's tensor holds, and the communicator
        whose ranks hold the other parts between them, each element once (None: the tensor is
        the whole bucket). Worker state covers the bucket (two-level: this rank's shard of it,
        the node holds the rest); server state covers this rank's chunk (of its shard), and
        the world serves the rest."""
        ex = slot.exchange
        shard, node = (slice(0, slot.numel), None) if ex.intra is None else \
            (ex.node_layouts[0].chunk(ex.intra.rank), ex.intra)
        chunk = ex.layouts[0].chunk(ex.inter.rank)
        served = slice(shard.start + chunk.start, shard.start + chunk.stop)
        return {key: (served, self.comm) if key in self.chunk_keys else (shard, node) for key in slot.state}

    def _rebucket(self, names: Tuple[str, ...], device) -> _Slot:
        slot = self._new_slot(names, device)
        moved = [n for n in names if n in self._owner]
        if moved:
            spans = self._spans(slot)
            old_spans = {id(self._owner[n]): self._spans(self._owner[n]) for n in moved}
            for key, t in slot.state.items():
                whole = torch.zeros(slot.numel, dtype=torch.float32, device=device)
                for n in moved:
                    old, size = self._owner[n], self._params[n].numel()
                    held = old_spans[id(old)][key][0]
                    lo_old, lo_new = old.offsets[n], slot.offsets[n]
                    start, stop = max(lo_old, held.start), min(lo_old + size, held.stop)
                    if start < stop:
                        whole[lo_new + start - lo_old:lo_new + stop - lo_old].copy_(
                            old.state[key][start - held.start:stop - held.start])
                span, group = spans[key]
                if group is not None:  # each element was held by exactly one of its ranks: the sum is it
                    group.all_reduce(whole, "sum")
                    self.rebucket_bytes += 4 * slot.numel
                t.copy_(whole[span])
        previous = {id(self._owner[n]): self._owner[n] for n in moved}
        for n in names:
            self._owner[n] = slot
        self._slots[names] = slot
        for old in previous.values():
            if not any(self._owner.get(n) is old for n in old.names) and self._slots.get(old.names) is old:
                del self._slots[old.names]
        return slot

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's feedback state (per-rank: save one per rank), the step and the configuration."""
        if self._pending is not None:
            return self._pending
        live = [self._slots[names] for names in self.buckets]
        index = {id(s): i for i, s in enumerate(live)}
        return {
            "format": STATE_FORMAT,
            "config": dict(self.config),
            "world_size": self.comm.world_size,
            "rank": self.comm.rank,
            "step": self.step,
            "buckets": [{"params": list(s.names), "state": dict(s.state)} for s in live],
            "owner": {n: index[id(s)] for n, s in self._owner.items() if id(s) in index},
        }

    def load_state_dict(self, state_dict: dict, reset_compression_state: bool = False) -> None:
        """Restore what ``state_dict()`` saved on this rank. ``reset_compression_state=True`` keeps
        only the step (e.g. after a change of world size) and restarts feedback from zero."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError("CompressionHookState.load_state_dict: not a taciturn DDP hook state (save it with "
                             "state.state_dict())")
        if state_dict["config"] != self.config:
            raise ValueError(f"CompressionHookState.load_state_dict: the checkpoint was saved with hook "
                             f"configuration {state_dict['config']} and this state has {self.config}; build the state "
                             "with the same preset and options")
        problem = mismatch(state_dict, self.comm)
        if problem and not reset_compression_state:
            raise refusal("CompressionHookState", problem)
        self._slots, self._owner = {}, {}
        self.step = int(state_dict["step"])
        if reset_compression_state:
            return
        device = next(iter(self._params.values())).device
        slots = []
        for entry in state_dict["buckets"]:
            names = tuple(entry["params"])
            unknown = [n for n in names if n not in self._params]
            if unknown:
                raise ValueError(f"CompressionHookState.load_state_dict: the checkpoint holds state for parameters "
                                 f"{unknown[:3]} that this model does not have (or that do not require grad)")
            slot = self._new_slot(names, device)
            for key, t in slot.state.items():
                saved = entry["state"].get(key)
                if saved is None or saved.numel() != t.numel():
                    raise ValueError(f"CompressionHookState.load_state_dict: state {key!r} of the bucket holding "
                                     f"{names[0]}... does not fit this model (saved "
                                     f"{None if saved is None else saved.numel()} elements, need {t.numel()})")
                t.copy_(saved)
            slots.append(slot)
            self._slots[names] = slot
        for n, i in state_dict["owner"].items():
            self._owner[n] = slots[i]

    def __getstate__(self):
        return {"config": self.config, "saved": self.state_dict()}

    def __setstate__(self, d):
        self.config = d["config"]
        self._reset_runtime()
        self._pending = d["saved"]

    # ------------------------------------------------------------------ reporting
    def metrics(self) -> dict:
        """The last iteration's communication metrics (bytes per direction, times, ratio)."""
        return self.stats.as_dict()

    def __repr__(self):
        comm = self.comm if self.comm is not None else "unbound"
        return f"CompressionHookState({self.config['preset']}, {self.compressor!r}, {comm})"


def compressed_hook(state: "CompressionHookState", bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP comm hook: average ``bucket``'s gradients through ``state``'s compressed allreduce.

    Runs synchronously and returns a completed future holding the bucket buffer, overwritten
    with the (decompressed) average, in the buffer's dtype. On CUDA the exchange is queued on
    the state's side stream, so its kernels overlap the rest of backward, and the future is a
    CUDA one: its result is set with the side stream current, and DDP's wait on it makes DDP's
    stream wait for the side stream's work."""
    buf = bucket.buffer()
    slot = state.slot_for(bucket)
    if buf.numel() != slot.numel:
        raise RuntimeError(f"DDP bucket {bucket.index()} holds {buf.numel()} elements but its parameters have "
                           f"{slot.numel}: taciturn cannot follow this bucket layout (padded or "
                           "non-contiguous gradients); report it with your DDP settings")
    fut = torch.futures.Future(devices=[buf.device]) if buf.is_cuda else torch.futures.Future()
    with state.side.running([buf]):
        avg = slot.exchange.allreduce([buf], [slot.state], buckets=[0], step=state.step, stats=state.stats,
                                      seed_slot=(bucket.index(), len(state._params)))[0]
        buf.copy_(avg)
        fut.set_result(buf)
    if bucket.is_last():
        state.stats.end_step()
        state.step += 1
    return fut


def register_compression_hook(model: DistributedDataParallel, preset="markov_sign", **kwargs) -> CompressionHookState:
    """One line: build a ``CompressionHookState`` for ``model`` (or bind a given/unpickled one),
    register ``compressed_hook`` on it and return the state."""
    if isinstance(preset, CompressionHookState):
        if kwargs.keys() - {"process_group"}:
            raise ValueError(f"options {sorted(kwargs)} given with a ready hook state; only process_group= applies")
        state = preset.bind(model, kwargs.get("process_group"))
    else:
        state = CompressionHookState(model, preset, **kwargs)
    model.register_comm_hook(state, compressed_hook)
    return state


def keep_gradients_local(model: DistributedDataParallel) -> DistributedDataParallel:
    """Make DDP communicate nothing (torch's ``noop_hook``; registered once) and return ``model``.

    For a taciturn optimizer on a DDP model: the optimizer averages (compressed) inside
    ``step()``, so DDP must not allreduce the same gradients in fp32 first."""
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"keep_gradients_local needs a DistributedDataParallel model, got {type(model).__name__}")
    if not getattr(model, "_taciturn_local_gradients", False):
        model.register_comm_hook(None, noop_hook)
        model._taciturn_local_gradients = True
    return model
