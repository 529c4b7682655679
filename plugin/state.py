"""Compression state: the per-rank feedback tensors of one or more exchanges, and the rules
for saving, checking and restoring them.

The state is per rank (each worker's errors or Markov sequences, each rank's server chunk),
so a saved state is valid only for the rank that saved it, in a world of the same size, with
the same compression settings; anything else is refused with the reason and the fix. The
optimizers keep it as one flat dict in ``optimizer.state[p][key]`` of their first trainable
parameter p, the Horovod wrapper in ``optimizer.state[key]``
(``"<exchange>.<bucket>.<name>"`` -> fp32 tensor, plus ``step``, ``world_size``, ``signature``
and, for the Horovod wrapper, ``rank``), so ``optimizer.state_dict()`` carries it; the DDP hook keeps its per-bucket
tensors in its own state object and checks them with ``mismatch``.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .comm import Communicator
from .exchange import Exchange

RESET_HINT = ("Each rank's errors, Markov sequences and server chunk are its own: load the state this rank "
              "saved, or pass reset_compression_state=True on every rank to restart compression from zero")


def mismatch(saved: dict, comm: Communicator, signature: Optional[str] = None, rank: bool = True) -> Optional[str]:
    """Why ``saved`` (with ``world_size``, ``rank`` when ``rank``, and maybe ``signature``) is
    not this rank's state for these settings; None when it is."""
    if saved.get("world_size") != comm.world_size:
        return f"it was saved with world size {saved.get('world_size')} and this job has {comm.world_size} ranks"
    if rank and saved.get("rank") != comm.rank:
        return f"it was saved by rank {saved.get('rank')}, not by this rank ({comm.rank})"
    if signature is not None and saved.get("signature") != signature:
        return f"it was saved with different compression settings ({saved.get('signature')}) than these ({signature})"
    return None


def refusal(owner: str, problem: str, fix: str = RESET_HINT) -> ValueError:
    return ValueError(f"{owner}.load_state_dict: refusing the compression state: {problem}. {fix}")


class CompressionState:
    """The flat compression state of ``exchanges`` (name -> Exchange; a single exchange may be
    named "") in ``optimizer.state[key]`` (looked up each time: ``load_state_dict`` replaces
    an optimizer's ``state``). ``owner`` names the optimizer in messages. ``rank_bound``: the
    state records its rank and refuses another's (the Horovod wrapper); the optimizers check
    world size and settings only, because DeepSpeed first loads rank 0's state dict on every
    rank and then each rank's own compression state from its own file."""

    def __init__(self, optimizer, key: str, exchanges: Dict[str, Exchange], comm: Communicator, device,
                 owner: str, rank_bound: bool = False, anchor: Optional[torch.Tensor] = None):
        self.optimizer, self.key, self.exchanges, self.comm = optimizer, key, exchanges, comm
        self.device, self.owner, self.rank_bound, self.anchor = device, owner, rank_bound, anchor

    def _holder(self) -> dict:
        """Where the flat dict lives: under ``key`` in the ``anchor`` parameter's state (so that
        every value of ``optimizer.state`` is a parameter's, as code written for torch's
        optimizers expects), or under ``key`` in ``optimizer.state`` itself."""
        return self.optimizer.state if self.anchor is None else self.optimizer.state[self.anchor]

    @property
    def flat(self) -> dict:
        return self._holder()[self.key]

    @flat.setter
    def flat(self, value: dict) -> None:
        self._holder()[self.key] = value

    def _packed(self, state_dict: dict) -> Optional[dict]:
        """The flat dict inside an optimizer ``state_dict`` (either place ``_holder`` may put it)."""
        state = state_dict.get("state", {})
        if self.anchor is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            index = next(i for i, p in enumerate(params) if p is self.anchor)
            ids = [i for g in state_dict.get("param_groups", []) for i in g["params"]]
            found = state.get(ids[index], {}).get(self.key) if index < len(ids) else None
            if found is not None:
                return found
        return state.get(self.key)

    @property
    def step(self) -> int:
        return int(self.flat["step"])

    @step.setter
    def step(self, value: int) -> None:
        self.flat["step"] = int(value)

    def signature(self) -> str:
        return repr({name: ex.signature() for name, ex in self.exchanges.items()})

    @staticmethod
    def _prefix(name: str, b: int) -> str:
        return f"{name}.{b}." if name else f"{b}."

    def zeros(self, name: str) -> Dict[str, torch.Tensor]:
        """Fresh (zero) state of exchange ``name``, under its flat keys."""
        return {self._prefix(name, b) + k: t for b, st in enumerate(self.exchanges[name].init_state(self.device))
                for k, t in st.items()}

    def reset(self, step: int = 0) -> None:
        """Zero every error and Markov sequence; the step count is ``step``."""
        flat: Dict[str, object] = {"step": int(step), "world_size": self.comm.world_size,
                                   "signature": self.signature()}
        if self.rank_bound:
            flat["rank"] = self.comm.rank
        for name in self.exchanges:
            flat.update(self.zeros(name))
        self.flat = flat

    def buckets(self, name: str = "") -> List[Dict[str, torch.Tensor]]:
        """Every bucket's state of exchange ``name`` (its own tensors, not copies)."""
        return [self.bucket(name, b) for b in range(len(self.exchanges[name].layouts))]

    def bucket(self, name: str, b: int) -> Dict[str, torch.Tensor]:
        prefix = self._prefix(name, b)
        return {k[len(prefix):]: v for k, v in self.flat.items() if k.startswith(prefix)}

    def free(self, name: str) -> None:
        """Drop exchange ``name``'s tensors (one that will not run again), returning their memory.
        The dict is replaced, not edited, so a ``state_dict()`` taken earlier keeps them."""
        owned = (lambda k: k.startswith(f"{name}.")) if name else (lambda k: k.split(".", 1)[0].isdigit())
        self.flat = {k: v for k, v in self.flat.items() if not owned(k)}

    def saved(self, state_dict: dict, reset: bool) -> Optional[dict]:
        """The compression state inside an optimizer ``state_dict``, checked: refused (raises)
        when absent or another rank's, world's or settings', unless ``reset``."""
        saved = self._packed(state_dict)
        if reset:
            return saved
        if saved is None:
            raise ValueError(f"{self.owner}.load_state_dict: the checkpoint holds no taciturn compression state "
                             f"('{self.key}'; was it saved by another optimizer?); pass reset_compression_state=True "
                             "on every rank to start compression from zero")
        problem = mismatch(saved, self.comm, self.signature(), self.rank_bound)
        if problem:
            raise refusal(self.owner, problem)
        return saved

    def restore(self, saved: Optional[dict], reset: bool) -> None:
        """Take ``saved`` (from ``saved()``) as this rank's state: its tensors as fp32 copies on
        this device, or with ``reset`` (or nothing saved) zeros at its step."""
        if self.anchor is not None:
            self.optimizer.state.pop(self.key, None)  # a checkpoint of the older layout, loaded by torch as is
        if reset or saved is None:
            self.reset(int(saved.get("step", 0)) if saved else 0)
            return
        self.flat = {k: v.to(device=self.device, dtype=torch.float32, copy=True) if torch.is_tensor(v) else v
                     for k, v in saved.items()}
