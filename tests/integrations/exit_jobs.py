"""One rank of a short 2-rank taciturn job that ends right after its last step; test_clean_exit.py
runs many such jobs under CPU load and checks that every rank's process exits with status 0.

    python exit_jobs.py {deepspeed,torch} RANK STORE

The two ranks meet through the file store STORE. A rank trains a tiny MLP for a few steps with
taciturn's CDAdam, as a DeepSpeed JSON optimizer (``deepspeed``) or on a plain gloo process
group (``torch``), then leaves the way a training script does: no barrier, no
destroy_process_group, the interpreter's own exit. (Each rank is its own interpreter: ranks
forked from one parent do not show the exit aborts this guards against.)
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import taciturn

WORLD, STEPS, TIMEOUT = 2, 3, 120.0


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)


def train_deepspeed(rank: int, store: str) -> None:
    import deepspeed

    import taciturn.integrations.deepspeed  # noqa: F401  (registers the JSON types)

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, init_method=f"file://{store}",
                               rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT))
    net = model()
    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "CDAdam", "params": {"lr": 1e-3}}}
    engine, _, _, _ = deepspeed.initialize(model=net, config=cfg, model_parameters=net.parameters())
    for step in range(STEPS):
        x, y = batch(rank, step)
        engine.backward(nn.functional.mse_loss(engine(x), y))
        engine.step()


def train_torch(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT))
    net = model()
    opt = taciturn.CDAdam(net.parameters(), lr=1e-3)
    for step in range(STEPS):
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()


if __name__ == "__main__":
    mode, rank, store = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    {"deepspeed": train_deepspeed, "torch": train_torch}[mode](rank, store)
