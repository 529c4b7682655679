"""Communicators and the compressed allreduce built on them."""
from __future__ import annotations

from .base import CollectiveError, Communicator, LocalCommunicator


def make_communicator(spec=None, timeout: float = None) -> Communicator:
    """A communicator from a spec.

    ``None``: the default torch.distributed group when one is initialised, else world size 1.
    A torch ProcessGroup: that group. ``"torch"``/``"nccl"``/``"gloo"``: the default group.
    ``"mpi"``: mpi4py's COMM_WORLD. ``"horovod"``: every Horovod rank (after ``hvd.init()``); a
    ``hvd.ProcessSet``: its ranks. ``"local"``: world size 1. A Communicator: itself.
    ``timeout`` (seconds) bounds every torch.distributed collective (see TorchDistCommunicator).
    """
    if isinstance(spec, Communicator):
        return spec
    import torch.distributed as dist

    if spec is None:
        if dist.is_available() and dist.is_initialized():
            from .torch_dist import TorchDistCommunicator
            return TorchDistCommunicator(timeout=timeout)
        return LocalCommunicator()
    if isinstance(spec, str):
        key = spec.lower()
        if key == "local":
            return LocalCommunicator()
        if key == "mpi":
            from .mpi import MPICommunicator
            return MPICommunicator()
        if key == "horovod":
            from .horovod import HorovodCommunicator
            return HorovodCommunicator()
        if key in ("torch", "nccl", "gloo"):
            from .torch_dist import TorchDistCommunicator
            return TorchDistCommunicator(timeout=timeout)
        raise ValueError(f"unknown communicator {spec!r}; valid: 'torch', 'nccl', 'gloo', 'mpi', 'horovod', 'local', "
                         "a torch.distributed ProcessGroup or a Communicator instance")
    if dist.is_available() and isinstance(spec, dist.ProcessGroup):
        from .torch_dist import TorchDistCommunicator
        return TorchDistCommunicator(spec, timeout=timeout)
    if type(spec).__module__.startswith("horovod.") and type(spec).__name__ == "ProcessSet":
        from .horovod import HorovodCommunicator
        return HorovodCommunicator(spec)
    raise TypeError(f"cannot make a communicator from {type(spec).__name__}: pass a ProcessGroup, "
                    "a hvd.ProcessSet, a name ('torch', 'mpi', 'horovod', 'local') or a Communicator")


__all__ = ["CollectiveError", "Communicator", "LocalCommunicator", "make_communicator"]
