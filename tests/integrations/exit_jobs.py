"""One rank of a short 2-rank taciturn job that ends right after its last step; test_clean_exit.py
runs many such jobs under CPU load and checks that every rank's process exits with status 0.

    torchrun --nproc_per_node 2 exit_jobs.py {deepspeed,torch}

A rank trains a tiny MLP for a few steps with
taciturn's CDAdam, as a DeepSpeed JSON optimizer (``deepspeed``) or on a plain gloo process
group (``torch``), then leaves the way a training script does: no barrier, no
destroy_process_group, the interpreter's own exit. (Under torchrun, whose agent holds the
store, the aborts this guards against showed in 1 of 20 to 2 of 8 such jobs under load before
the fix; ranks that host their own store, a file store or one forked from a common parent
never showed them.)
"""
from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import taciturn

STEPS, TIMEOUT = 3, 120.0


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)


def train_deepspeed() -> None:
    import deepspeed

    import taciturn.integrations.deepspeed  # noqa: F401  (registers the JSON types)

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=timedelta(seconds=TIMEOUT))
    rank = dist.get_rank()
    net = model()
    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "CDAdam", "params": {"lr": 1e-3}}}
    engine, _, _, _ = deepspeed.initialize(model=net, config=cfg, model_parameters=net.parameters())
    for step in range(STEPS):
        x, y = batch(rank, step)
        engine.backward(nn.functional.mse_loss(engine(x), y))
        engine.step()


def train_torch() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT))
    rank = dist.get_rank()
    net = model()
    opt = taciturn.CDAdam(net.parameters(), lr=1e-3)
    for step in range(STEPS):
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()


if __name__ == "__main__":
    {"deepspeed": train_deepspeed, "torch": train_torch}[sys.argv[1]]()
