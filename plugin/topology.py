"""Nodes of ranks for the two-level exchange (ALGORITHMS.md, "Two-level exchange").

``ranks_per_node=L`` groups a communicator's ranks into N = n/L nodes of L consecutive ranks
(rank r is local rank r % L of node r // L, as torchrun and mpirun place them). ``"auto"``
reads L from the launcher: torchrun's LOCAL_WORLD_SIZE, Open MPI's
OMPI_COMM_WORLD_LOCAL_SIZE, or Horovod's local size. ``check_topology`` compares every rank's
view (one gather) and raises the same error on every rank for a bad one, before any
sub-group or collective depends on it.
"""
from __future__ import annotations

import os
import socket
from typing import List, Optional, Tuple

from .comm import Communicator
from .comm.base import gather_objects

_LOCAL_SIZE = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")
_LOCAL_RANK = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")


def _env(names) -> Optional[int]:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def _auto(comm: Communicator) -> Optional[int]:
    if comm.name == "horovod":
        import horovod.torch as hvd

        return hvd.local_size()
    return _env(_LOCAL_SIZE)


def _problem(views: List[Tuple], n: int) -> Optional[str]:
    """What is wrong with the ranks' (L, local rank from the launcher, host) views; None if fine."""
    sizes = [v[0] for v in views]
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        bad = next(r for r, s in enumerate(sizes) if not isinstance(s, int) or isinstance(s, bool) or s < 1)
        return (f"rank {bad} has ranks_per_node={sizes[bad]!r}: give a positive int, or \"auto\" under a launcher "
                f"that sets {' / '.join(_LOCAL_SIZE)} (or Horovod)")
    if len(set(sizes)) > 1:
        first = next(r for r, s in enumerate(sizes) if s != sizes[0])
        return f"ranks disagree on ranks_per_node: rank 0 has {sizes[0]}, rank {first} has {sizes[first]}"
    size = sizes[0]
    if n % size:
        return f"the world of {n} ranks is not a whole number of nodes of ranks_per_node={size}"
    for r, (_, local, host) in enumerate(views if size > 1 else ()):  # one rank per node: any placement
        if local is not None and local != r % size:
            return (f"rank {r} is local rank {local} of its node, not {r % size}: the ranks of a node must be "
                    f"consecutive (rank r on node r // {size}); launch them so, or pass ranks_per_node=1")
        if host != views[r - r % size][2]:
            return (f"rank {r} runs on {host} but rank {r - r % size}, the first of its node, on "
                    f"{views[r - r % size][2]}: the ranks of a node must be consecutive")
    return None


def check_topology(comm: Communicator, ranks_per_node, owner: str) -> int:
    """L for ``ranks_per_node`` (an int or ``"auto"``), checked against every rank's view."""
    size = _auto(comm) if ranks_per_node == "auto" else ranks_per_node
    if ranks_per_node == "auto" and size is None:
        size = f"auto (none of {', '.join(_LOCAL_SIZE)} is set)"
    # the launcher's local rank says where this rank sits only when the communicator is its whole world
    whole = comm.name != "horovod" and _env(("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE")) == comm.world_size
    view = (size, _env(_LOCAL_RANK) if whole else None, socket.gethostname())
    views = gather_objects(comm, view) if comm.world_size > 1 else [view]
    problem = _problem(views, comm.world_size)
    if problem:
        raise ValueError(f"{owner}: {problem}. Every rank raises this.")
    return views[0][0]


def node_parts(n: int, size: int) -> Tuple[List[List[int]], List[List[int]]]:
    """(the nodes: L consecutive ranks each, the local-rank groups: one rank of every node each)."""
    nodes = [list(range(k * size, (k + 1) * size)) for k in range(n // size)]
    return nodes, [list(range(local, n, size)) for local in range(size)]
