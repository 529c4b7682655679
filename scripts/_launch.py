"""Run a function on n local gloo ranks: forked processes meeting through a file store.

A helper of the tests and benchmarks on one machine (scripts/ on ``sys.path``), not part of the
taciturn package: real jobs start with torchrun, deepspeed or horovodrun. The ranks are forked
(no re-import per rank), single-threaded (OpenMP pools do not survive fork), meet through a
file store in a fresh temporary folder (no port to race for), and are killed after ``timeout``
seconds.
"""
from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_entry(rank: int, fn: Callable, world_size: int, tmp: str, args: tuple, timeout: float) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))


def run_ranks(fn: Callable, world_size: int, *args, timeout: float = 900.0) -> list:
    """``[fn(r, world_size, *args) for each rank r]``, computed on ``world_size`` gloo ranks.

    ``fn`` must be a module-level function; its result must be ``torch.save``-able. A rank
    that fails raises here with its traceback; ranks still running after ``timeout`` seconds
    are killed and a TimeoutError names the function.
    """
    with tempfile.TemporaryDirectory(prefix="taciturn-ranks-") as tmp:
        ctx = mp.start_processes(_rank_entry, args=(fn, world_size, tmp, args, timeout), nprocs=world_size,
                                 join=False, start_method="fork")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{world_size} ranks of {fn.__name__} did not finish within {timeout:.0f} s")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
