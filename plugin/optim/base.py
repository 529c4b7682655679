"""The base of every taciturn optimizer: bookkeeping around one or more exchanges.

A method reads like a chain (ALGORITHMS.md): local transform of the gradient (momentum,
weight decay) -> compressor + worker feedback -> collective -> server feedback -> update rule.
The communication half is a ``Preset`` (``taciturn.presets``) per exchange; this class keeps
the books: the communicator, the exchanges, their compression state, fp32 master copies of
low-precision parameters, metrics, and state_dict round trips. Methods implement ``_step``
with the functional update rules in ``functional.py``.

State: per-parameter state (``exp_avg``, ``max_exp_avg_sq``, ``momentum_buffer``,
``master_param``...) lives in ``self.state[p]`` as in torch. The compression state (errors,
Markov sequences) lives in ``self.state[p]["taciturn"]`` of the first trainable parameter p
(``self.compression.flat``; every value of ``self.state`` stays a parameter's), with the step
counter and the rank and world size it was made for. It is per rank (each worker has its own
errors, each rank serves its own chunk): every rank saves and loads its own ``state_dict()``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

from ..comm import Communicator, make_communicator
from ..compressors.sign import DEFAULT_BLOCK_SIZE
from ..consistency import any_nonfinite, check_same, first_divergence
from ..exchange import DOWNLINKS, Exchange
from ..feedback import make_feedback
from ..metrics import CommStats
from ..presets import Preset
from ..state import CompressionState
from ..topology import check_topology

TACITURN_KEY = "taciturn"
_log = logging.getLogger("taciturn")


def check_range(name: str, value, lo: float, hi: float = float("inf"), lo_open=False, hi_open=False):
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"invalid {name}={value!r}: must be in {lb}{lo}, {hi}{rb}")


def check_betas(betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"invalid betas={betas!r}: give two floats in [0, 1), e.g. (0.9, 0.99)")
    for i, b in enumerate(betas):
        check_range(f"betas[{i}]", b, 0.0, 1.0, hi_open=True)


class CompressedOptimizer(Optimizer):
    """Base class; see the module docstring. Not used directly."""

    #: the update rule's per-element state, which the chunk owner keeps for its chunk under
    #: ``shard_state=True``; () when the method keeps none (the flag changes nothing), None when
    #: it has no sharded form (refused). ``unsharded_because`` says why, in either case.
    rule_state: Optional[Tuple[str, ...]] = None
    unsharded_because = "it has no sharded form"

    def __init__(self, params, defaults: dict, exchanges: Dict[str, Preset], *, process_group=None,
                 bucket_cap_mb: float = 25.0, broadcast_parameters: bool = True, check_consistency: bool = True,
                 nonfinite: str = "skip", check_divergence_every: Optional[int] = None,
                 timeout: Optional[float] = None, shard_state: bool = False, downlink: str = "1bit",
                 ranks_per_node=1, intra_node_dtype: str = "fp32"):
        """Options every preset takes:

        process_group: None (the initialised default torch.distributed group, else world size 1),
            a ProcessGroup, ``"mpi"`` (mpi4py), ``"local"`` or a Communicator.
        bucket_cap_mb: fp32 megabytes per flat bucket (default 25).
        broadcast_parameters: copy rank 0's parameters to every rank at construction.
        check_consistency: compare shapes, dtypes, hyper-parameters and codecs across ranks at
            construction and raise naming the first difference (before any collective can hang).
        nonfinite: ``"skip"`` (default, like DeepSpeed's fp16 overflow skip: when any rank's
            gradient holds a NaN/Inf every rank skips the step, no state is touched; the count is
            ``stats.skipped_steps`` and the warning is logged on the 1st, 2nd, 4th, 8th... skip),
            ``"raise"`` (every rank raises naming the ranks) or ``"off"`` (no check, one
            collective less per step).
        check_divergence_every: every N steps compare a checksum of the parameters across ranks
            and raise naming the first tensor that differs (default off; 1 when the environment
            sets TACITURN_DEBUG=1).
        timeout: seconds after which a collective with a dead or stalled peer fails with a
            CollectiveError (torch.distributed only; default: the process group's own timeout).
        shard_state: ZeRO-1 for the compressed optimizers (ALGORITHMS.md, "Sharded state"): rank
            j keeps the update rule's state (``rule_state``) for the chunk it serves only, runs
            the rule there on the aggregate and sends the model change down; per-rank state
            of CD-Adam 4 + 20/n bytes per parameter instead of 24. fp16/bf16 parameters keep
            their whole fp32 master copy on every rank.
        downlink: what a sharded step sends down: ``"1bit"`` (default) the model change
            compressed by the preset's codec with error feedback on it (none for presets
            without server feedback), ``"bf16"`` or ``"fp32"`` the model change itself (exact
            ZeRO-1: the unsharded trajectory up to rounding).
        ranks_per_node: L > 1 (or ``"auto"``: the launcher's local world size) runs the two-level
            exchange (ALGORITHMS.md): fp32 (``intra_node_dtype="bf16"``: bf16) reduce-scatter inside
            each node of L consecutive ranks, the compressed pipeline between nodes, all-gather
            inside; bad topologies are refused on every rank before any collective. With
            ``shard_state=True`` the owners serve chunks of the shards: 4/L + 20/n bytes per
            parameter for CD-Adam.
        """
        if nonfinite not in ("skip", "raise", "off"):
            raise ValueError(f"nonfinite={nonfinite!r} must be 'skip', 'raise' or 'off'")
        if check_divergence_every is None:
            check_divergence_every = 1 if os.environ.get("TACITURN_DEBUG", "") not in ("", "0") else 0
        if not isinstance(check_divergence_every, int) or check_divergence_every < 0:
            raise ValueError(f"check_divergence_every={check_divergence_every!r} must be an int >= 0 (0 = off)")
        self.nonfinite = nonfinite
        self.check_divergence_every = check_divergence_every
        check_range("lr", defaults.get("lr", 0.0), 0.0)
        check_range("weight_decay", defaults.get("weight_decay", 0.0), 0.0)
        if "eps" in defaults:
            check_range("eps", defaults["eps"], 0.0)
        if "betas" in defaults:
            check_betas(defaults["betas"])
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_range("lr", group["lr"], 0.0)
            if "betas" in group:
                check_betas(group["betas"])
        self.comm: Communicator = make_communicator(process_group, timeout=timeout)
        self.stats = CommStats()
        self._trainable: List[Tuple[int, torch.Tensor]] = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(f"{type(self).__name__}: complex parameters ({p.dtype}, shape {tuple(p.shape)}) "
                                    "are not supported; view them as real with torch.view_as_real")
                if p.requires_grad:
                    self._trainable.append((gi, p))
        if not self._trainable:
            raise ValueError(f"{type(self).__name__}: no parameter requires grad; pass the model's trainable "
                             "parameters, e.g. model.parameters()")
        sizes = [p.numel() for _, p in self._trainable]
        groups = [gi for gi, _ in self._trainable]
        self.sharded = self._check_sharding(shard_state, downlink, exchanges)
        if ranks_per_node != 1 or (check_consistency and self.comm.world_size > 1):
            ranks_per_node = check_topology(self.comm, ranks_per_node, type(self).__name__)
        self.exchanges: Dict[str, Exchange] = {
            name: Exchange(sizes, preset.make_compressor(), make_feedback(preset.worker), make_feedback(preset.server),
                           self.comm, preset.two_way, bucket_cap_mb, groups,
                           downlink=downlink if self.sharded else None,
                           owner_keys=self.rule_state if self.sharded else (), ranks_per_node=ranks_per_node,
                           intra_node_dtype=intra_node_dtype)
            for name, preset in exchanges.items()}
        _warn_oversized_blocks(self.exchanges.values(), max(sizes))
        if check_consistency and self.comm.world_size > 1:
            check_same(self.comm, type(self).__name__, self.signature(), "model and optimizer")
        if broadcast_parameters and self.comm.world_size > 1:
            for _, p in self._trainable:
                self.comm.broadcast(p.data, 0)
        self.compression = CompressionState(self, TACITURN_KEY, self.exchanges, self.comm,
                                            self._trainable[0][1].device, type(self).__name__,
                                            rank_bound=self.sharded, anchor=self._trainable[0][1])
        self.compression.reset()

    def _check_sharding(self, shard_state: bool, downlink: str, exchanges: Dict[str, Preset]) -> bool:
        """Whether this optimizer runs sharded; refuses what cannot be."""
        name = type(self).__name__
        if downlink not in DOWNLINKS:
            raise ValueError(f"{name}: downlink={downlink!r} must be one of {DOWNLINKS}")
        if not shard_state:
            if downlink != "1bit":
                raise ValueError(f"{name}: downlink={downlink!r} applies only with shard_state=True (unsharded, "
                                 "the downlink carries the compressed average)")
            return False
        if self.rule_state is None:
            raise ValueError(f"{name}: shard_state=True is not available: {self.unsharded_because}. Use "
                             "shard_state=False, or CDAdam(shard_state=True)")
        if not self.rule_state:
            warnings.warn(f"{name}: shard_state=True changes nothing: {self.unsharded_because}", stacklevel=4)
            return False
        one_way = [n for n, p in exchanges.items() if not p.two_way]
        if one_way:
            raise ValueError(f"{name}: shard_state=True needs the two-way pipeline, and this {name} is one-way: every "
                             "rank averages the workers' payloads itself and runs the update rule on the whole model, "
                             "so no rank owns a chunk to keep its state, and a sharded form would add a compressed "
                             "downlink that the method does not have. Use shard_state=False, or a two-way method "
                             "(CDAdam, EFAMSGrad) with shard_state=True")
        return True

    # ------------------------------------------------------------------ consistency
    def signature(self) -> dict:
        """What must be equal on every rank: parameter shapes and dtypes, hyper-parameters, codecs."""
        hp = [{k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, str, bool, tuple, type(None)))}
              for g in self.param_groups]
        return {
            "optimizer": type(self).__name__,
            "params": [(tuple(p.shape), str(p.dtype)) for _, p in self._trainable],
            "hyperparameters": hp,
            "exchanges": {n: repr(ex.compressor) + f" {ex.worker.name}/{ex.server.name} two_way={ex.two_way}"
                          f" downlink={ex.downlink}" for n, ex in self.exchanges.items()},
        }

    # ------------------------------------------------------------------ state
    @property
    def global_step(self) -> int:
        return self.compression.step

    def reset_compression_state(self) -> None:
        """Zero every error and Markov sequence (e.g. after changing world size)."""
        self._warn_sharded_reset()
        self.compression.reset(self.global_step)

    def _warn_sharded_reset(self) -> None:
        if self.sharded:
            warnings.warn(f"{type(self).__name__}: resetting the compression state of a sharded optimizer restarts "
                          f"the chunk owners' update-rule state ({', '.join(self.rule_state)}) from zero too",
                          stacklevel=3)

    def load_state_dict(self, state_dict, reset_compression_state: bool = False):
        if reset_compression_state:
            self._warn_sharded_reset()
        saved = self.compression.saved(state_dict, reset_compression_state)
        super().load_state_dict(state_dict)
        # torch casts per-parameter state to the parameter's dtype: restore the saved fp32
        # tensors themselves (casting back from fp16/bf16 would lose their low bits).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(pid, {}).items():
                if key in _FP32_KEYS and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
        self.compression.restore(saved, reset_compression_state)

    # ------------------------------------------------------------------ helpers for presets
    def local_grads(self) -> List[torch.Tensor]:
        """This rank's gradients in pipeline order, fp32; zeros for a parameter without grad."""
        out = []
        for _, p in self._trainable:
            if p.grad is None:
                out.append(torch.zeros(p.shape, dtype=torch.float32, device=p.device))
            elif p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__}: sparse gradients (shape {tuple(p.shape)}) are not "
                                   "supported; use nn.Embedding(sparse=False)")
            else:
                out.append(p.grad.float())
        return out

    def communicate(self, name: str, tensors: Sequence[torch.Tensor], error_scale=1.0,
                    owner_update=None) -> List[torch.Tensor]:
        """Send ``tensors`` (exchange order) through exchange ``name``; the averaged results (a
        sharded exchange, with its ``owner_update``: the model changes)."""
        return self.exchanges[name].allreduce(tensors, self.compression.buckets(name), step=self.global_step,
                                              error_scale=error_scale, stats=self.stats, owner_update=owner_update)

    def master(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 tensor to update for ``p``: p itself, or an fp32 master copy of a fp16/bf16 p."""
        if p.dtype == torch.float32:
            return p
        st = self.state[p]
        if "master_param" not in st:
            st["master_param"] = p.detach().float().clone()
        return st["master_param"]

    def write_back(self, p: torch.Tensor, master: torch.Tensor) -> None:
        if master is not p:
            p.copy_(master)

    def param_state(self, p: torch.Tensor, *keys: str) -> List[torch.Tensor]:
        """fp32 zero-initialised per-parameter state tensors, created on first use."""
        st = self.state[p]
        for k in keys:
            if k not in st:
                st[k] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return [st[k] for k in keys]

    def _advance(self) -> None:
        self.compression.step = self.global_step + 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nonfinite != "off" and self._skip_nonfinite():
            return loss
        self._step()
        self._advance()
        self._after_step()
        every = self.check_divergence_every
        if every and self.comm.world_size > 1 and self.global_step % every == 0:
            self.check_divergence()
        return loss

    def _skip_nonfinite(self) -> bool:
        grads = [p.grad for _, p in self._trainable if p.grad is not None and not p.grad.is_sparse]
        bad = any_nonfinite(self.comm, grads)
        if not bad:
            return False
        msg = (f"{type(self).__name__}: non-finite gradient (NaN/Inf) on rank(s) {bad} at step {self.global_step}")
        if self.nonfinite == "raise":
            raise FloatingPointError(msg + "; every rank raises. Use nonfinite='skip' to skip such steps.")
        self.stats.skipped_steps += 1
        skipped = self.stats.skipped_steps
        if skipped & (skipped - 1) == 0:  # 1st, 2nd, 4th, 8th... skipped step
            _log.warning("%s: every rank skips this step; compression state untouched (%d step(s) skipped so far; "
                         "next warning at %d)", msg, skipped, 2 * skipped)
        return True

    def with_running_config(self, state_dict: dict, keys: Sequence[str]) -> dict:
        """``state_dict`` with the running script's param-group ``keys`` in place of the
        checkpoint's (dropped where the running group has none): DeepSpeed's rule for the
        schedules and masks of its 1-bit optimizers."""
        groups = [dict(g) for g in state_dict["param_groups"]]
        for mine, saved in zip(self.param_groups, groups):
            for key in keys:
                if key in mine:
                    saved[key] = mine[key]
                else:
                    saved.pop(key, None)
        return {**state_dict, "param_groups": groups}

    def synced_tensors(self) -> List[torch.Tensor]:
        """The tensors that must be bit-identical on every rank after a step (the parameters)."""
        return [p for _, p in self._trainable]

    @contextlib.contextmanager
    def synced_weights(self):
        """Within the block the parameters hold the synced model (``synced_tensors()``, identical
        on every rank): a no-op where that is the parameters themselves; where each rank holds
        its own (SAEF's step ahead, 0/1 Adam between synchronisations) they are restored after."""
        pairs = [(p, s) for (_, p), s in zip(self._trainable, self.synced_tensors()) if s is not p]
        saved = [p.detach().clone() for p, _ in pairs]
        with torch.no_grad():
            for p, s in pairs:
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), v in zip(pairs, saved):
                    p.copy_(v)

    def check_divergence(self) -> None:
        """Raise if any rank's parameters differ from rank 0's, naming the first tensor."""
        names = []
        for gi, p in self._trainable:
            group = self.param_groups[gi]
            pnames = group.get("param_names")
            names.append(pnames[_index_of(group["params"], p)] if pnames else
                         f"#{len(names)} (group {gi})")
        problem = first_divergence(self.comm, self.synced_tensors(), names)
        if problem:
            raise RuntimeError(f"{type(self).__name__}: ranks diverged at step {self.global_step}: {problem}. "
                               "Check that every rank runs the same code, data types and deterministic kernels.")

    def _step(self) -> None:
        raise NotImplementedError

    def _after_step(self) -> None:
        """Work for the start of the next step (SAEF's step ahead). Default: none."""

    def metrics(self) -> dict:
        """The last step's communication metrics (bytes per direction, times, ratio)."""
        return self.stats.as_dict()


def _warn_oversized_blocks(exchanges, largest: int) -> None:
    """Warn when a block size the user chose (not the default) exceeds every tensor."""
    for ex in exchanges:
        block = getattr(ex.compressor, "block_size", None)
        if block is not None and block != DEFAULT_BLOCK_SIZE and block > largest:
            warnings.warn(f"block_size={block} is larger than every parameter tensor (the largest has {largest} "
                          "elements): every tensor is one block, the same as block_size=None", stacklevel=4)


def _index_of(params: list, p: torch.Tensor) -> int:
    return next(i for i, q in enumerate(params) if q is p)


_FP32_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_sq_fresh", "max_exp_avg_sq", "momentum_buffer", "master_param",
              "synced_param", "momentum_accumulator")
