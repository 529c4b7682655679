"""The transport: communicators (the few collectives an exchange needs) and their async handles."""
from __future__ import annotations

from .base import CollectiveError, Communicator, Handle, LocalCommunicator
from ..names import Registry


def _torch(timeout):
    from .torch_dist import TorchDistCommunicator
    return TorchDistCommunicator(timeout=timeout)


def _mpi(timeout):
    from .mpi import MPICommunicator
    return MPICommunicator()


def _horovod(timeout):
    from .horovod import HorovodCommunicator
    return HorovodCommunicator()


_NAMED = Registry("communicator", {"torch": _torch, "nccl": _torch, "gloo": _torch, "mpi": _mpi,
                                   "horovod": _horovod, "local": lambda timeout: LocalCommunicator()})


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
        return _torch(timeout) if dist.is_available() and dist.is_initialized() else LocalCommunicator()
    if isinstance(spec, str):
        return _NAMED.get(spec)(timeout)
    if dist.is_available() and isinstance(spec, dist.ProcessGroup):
        from .torch_dist import TorchDistCommunicator
        return TorchDistCommunicator(spec, timeout=timeout)
    if type(spec).__module__.startswith("horovod.") and type(spec).__name__ == "ProcessSet":
        from .horovod import HorovodCommunicator
        return HorovodCommunicator(spec)
    raise TypeError(f"cannot make a communicator from {type(spec).__name__}: pass a ProcessGroup, "
                    "a hvd.ProcessSet, a name ('torch', 'mpi', 'horovod', 'local') or a Communicator")


__all__ = ["CollectiveError", "Communicator", "Handle", "LocalCommunicator", "make_communicator"]
