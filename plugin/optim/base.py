"""The base of every taciturn optimizer: bookkeeping around one or more compressed pipelines.

A preset reads like a chain (ALGORITHMS.md): local transform of the gradient (momentum,
weight decay) -> compressor + worker feedback -> collective -> server feedback -> update rule.
This class keeps the books: the communicator, the pipelines, their feedback state, fp32
master copies of low-precision parameters, metrics, and state_dict round trips. Presets
implement ``_step`` with the functional update rules in ``functional.py``.

State: per-parameter state (``exp_avg``, ``max_exp_avg_sq``, ``momentum_buffer``,
``master_param``...) lives in ``self.state[p]`` as in torch. The compression state (errors,
Markov sequences) is per bucket of the flat pipeline and lives in
``self.state["taciturn"]["<pipeline>.<bucket>.<name>"]``, with the step counter and the
world size it was made for. It is per rank (each worker has its own errors, each rank serves
its own chunk): every rank saves and loads its own ``state_dict()``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.optim import Optimizer

from ..comm import Communicator, make_communicator
from ..comm.base import gather_objects
from ..compressors import Compressor, make_compressor
from ..compressors.sign import DEFAULT_BLOCK_SIZE
from ..feedback import make_feedback
from ..guards import any_nonfinite, first_divergence
from ..metrics import CommStats
from ..pipeline import Pipeline

TACITURN_KEY = "taciturn"
_log = logging.getLogger("taciturn")


@dataclass(frozen=True)
class PipelineSpec:
    """One compressed collective of an optimizer: codec, the two feedback rules, direction."""

    compressor: Union[str, Compressor]
    worker: str = "none"
    server: str = "none"
    two_way: bool = True
    compressor_options: Tuple[Tuple[str, object], ...] = ()


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

    def __init__(self, params, defaults: dict, pipelines: Dict[str, PipelineSpec], *, process_group=None,
                 bucket_cap_mb: float = 25.0, broadcast_parameters: bool = True, check_consistency: bool = True,
                 nonfinite: str = "skip", check_divergence_every: Optional[int] = None,
                 timeout: Optional[float] = None):
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
        self.pipelines: Dict[str, Pipeline] = {}
        self._specs = dict(pipelines)
        for name, spec in pipelines.items():
            codec = make_compressor(spec.compressor, **dict(spec.compressor_options))
            self.pipelines[name] = Pipeline(sizes, codec, make_feedback(spec.worker), make_feedback(spec.server),
                                            self.comm, spec.two_way, bucket_cap_mb, groups)
        _warn_oversized_blocks(self.pipelines.values(), max(sizes))
        if check_consistency and self.comm.world_size > 1:
            self._check_consistency()
        if broadcast_parameters and self.comm.world_size > 1:
            for _, p in self._trainable:
                self.comm.broadcast(p.data, 0)
        self._init_compression_state()

    # ------------------------------------------------------------------ consistency
    def signature(self) -> dict:
        """What must be equal on every rank: parameter shapes and dtypes, hyper-parameters, codecs."""
        hp = [{k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, str, bool, tuple, type(None)))}
              for g in self.param_groups]
        return {
            "optimizer": type(self).__name__,
            "params": [(tuple(p.shape), str(p.dtype)) for _, p in self._trainable],
            "hyperparameters": hp,
            "pipelines": {n: repr(p.compressor) + f" {p.worker.name}/{p.server.name} two_way={p.two_way}"
                          for n, p in self.pipelines.items()},
        }

    def _check_consistency(self) -> None:
        mine = self.signature()
        digest = hashlib.sha256(repr(mine).encode()).hexdigest()
        theirs = gather_objects(self.comm, (digest, mine))
        for rank, (d, sig) in enumerate(theirs):
            if d == digest:
                continue
            for key in mine:
                if sig[key] != mine[key]:
                    detail = _first_difference(key, sig[key], mine[key])
                    raise RuntimeError(f"{type(self).__name__}: rank {rank} and rank {self.comm.rank} disagree on "
                                       f"{key}: {detail}. Every rank must build the same model and optimizer.")

    # ------------------------------------------------------------------ state
    def _init_compression_state(self) -> None:
        flat: Dict[str, object] = {"step": 0, "world_size": self.comm.world_size, "signature": self._state_signature()}
        for name in self.pipelines:
            flat.update(self.zero_compression_state(name))
        self.state[TACITURN_KEY] = flat

    def zero_compression_state(self, name: str) -> Dict[str, torch.Tensor]:
        """Fresh (zero) compression state of pipeline ``name``, keyed ``<name>.<bucket>.<key>``."""
        device = self._trainable[0][1].device
        return {f"{name}.{b}.{key}": t for b, st in enumerate(self.pipelines[name].init_state(device))
                for key, t in st.items()}

    def free_compression_state(self, name: str) -> None:
        """Drop pipeline ``name``'s compression state (one that will not run again), returning its
        memory. The state dict is replaced, not edited, so a ``state_dict()`` taken earlier keeps it."""
        prefix = f"{name}."
        self.state[TACITURN_KEY] = {k: v for k, v in self.state[TACITURN_KEY].items() if not k.startswith(prefix)}

    def _state_signature(self) -> str:
        return repr({n: (repr(p.compressor), p.worker.name, p.server.name, p.two_way, [lay.numel for lay in p.layouts])
                     for n, p in self.pipelines.items()})

    def bucket_states(self, name: str) -> List[Dict[str, torch.Tensor]]:
        flat = self.state[TACITURN_KEY]
        pipe = self.pipelines[name]
        out = []
        for b in range(len(pipe.layouts)):
            prefix = f"{name}.{b}."
            out.append({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)})
        return out

    @property
    def global_step(self) -> int:
        return int(self.state[TACITURN_KEY]["step"])

    def reset_compression_state(self) -> None:
        """Zero every error and Markov sequence (e.g. after changing world size)."""
        step = self.global_step
        self._init_compression_state()
        self.state[TACITURN_KEY]["step"] = step

    def load_state_dict(self, state_dict, reset_compression_state: bool = False):
        saved = state_dict.get("state", {}).get(TACITURN_KEY)
        if saved is None:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the checkpoint holds no taciturn compression "
                             "state (was it saved by another optimizer?); pass reset_compression_state=True to "
                             "start the compression state from zero")
        problem = None
        if saved.get("world_size") != self.comm.world_size:
            problem = (f"it was saved with world size {saved.get('world_size')} and this job has "
                       f"{self.comm.world_size} ranks")
        elif saved.get("signature") != self._state_signature():
            problem = (f"it was saved with different compression settings ({saved.get('signature')}) than this "
                       f"optimizer's ({self._state_signature()})")
        if problem and not reset_compression_state:
            raise ValueError(f"{type(self).__name__}.load_state_dict: refusing the checkpoint: {problem}. Per-rank "
                             "errors and Markov sequences cannot be carried over; pass reset_compression_state=True "
                             "to load the rest and restart compression from zero")
        super().load_state_dict(state_dict)
        # torch casts per-parameter state to the parameter's dtype: restore the saved fp32
        # tensors themselves (casting back from fp16/bf16 would lose their low bits).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(pid, {}).items():
                if key in _FP32_KEYS and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
        if problem or reset_compression_state:
            step = int(saved.get("step", 0))
            self._init_compression_state()
            self.state[TACITURN_KEY]["step"] = step
        else:
            device = self._trainable[0][1].device
            restored = dict(self.state[TACITURN_KEY])
            for k, v in restored.items():
                if torch.is_tensor(v):
                    restored[k] = v.to(device=device, dtype=torch.float32)
            self.state[TACITURN_KEY] = restored

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

    def communicate(self, name: str, tensors: Sequence[torch.Tensor], s=1.0) -> List[torch.Tensor]:
        """Send ``tensors`` (pipeline order) through pipeline ``name``; the averaged results."""
        return self.pipelines[name].allreduce(tensors, self.bucket_states(name), s=s, seed=self.global_step,
                                              stats=self.stats)

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
        self.state[TACITURN_KEY]["step"] = self.global_step + 1

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

    def synced_tensors(self) -> List[torch.Tensor]:
        """The tensors that must be bit-identical on every rank after a step (the parameters)."""
        return [p for _, p in self._trainable]

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


def _warn_oversized_blocks(pipelines, largest: int) -> None:
    """Warn when a block size the user chose (not the default) exceeds every tensor."""
    for pipe in pipelines:
        block = getattr(pipe.compressor, "block_size", None)
        if block is not None and block != DEFAULT_BLOCK_SIZE and block > largest:
            warnings.warn(f"block_size={block} is larger than every parameter tensor (the largest has {largest} "
                          "elements): every tensor is one block, the same as block_size=None", stacklevel=4)


def _index_of(params: list, p: torch.Tensor) -> int:
    return next(i for i, q in enumerate(params) if q is p)


_FP32_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "master_param", "synced_param")


def _first_difference(key: str, a, b) -> str:
    if key == "params":
        if len(a) != len(b):
            return f"{len(a)} vs {len(b)} trainable parameters"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"parameter #{i} is {x[0]} {x[1]} on one and {y[0]} {y[1]} on the other"
    return f"{a!r} vs {b!r}"


def codec(compressor: Union[str, Compressor] = "block_sign", *, block_size=1024, ratio=None, k=None,
          options: dict = None) -> Tuple[Union[str, Compressor], Tuple[Tuple[str, object], ...]]:
    """The (compressor, options) of a PipelineSpec from a preset's keyword arguments.

    ``block_size`` goes to ``block_sign``; ``ratio``/``k`` to ``topk``/``randk``; ``options``
    (a dict) to whichever compressor is named. ``make_compressor`` rejects what it cannot take.
    """
    opts = dict(options or {})
    if isinstance(compressor, Compressor):
        return compressor, ()
    name = str(compressor).lower()
    if name == "block_sign":
        opts.setdefault("block_size", block_size)
    if ratio is not None:
        opts["ratio"] = ratio
    if k is not None:
        opts["k"] = k
    if name in ("topk", "randk") and "ratio" not in opts and "k" not in opts:
        opts["ratio"] = 0.01
    make_compressor(name, **opts)  # validate now, with the compressor's own message
    return name, tuple(sorted(opts.items()))
