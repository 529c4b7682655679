"""One rank of a reliability scenario (launched by test_reliability.py, one process per rank)."""
import os
import sys
import time

import torch
import torch.distributed as dist

import taciturn


def model(width=8):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Tanh(), torch.nn.Linear(width, 2))


def train(opt, m, steps, rank, on_step=None):
    gen = torch.Generator().manual_seed(rank)
    for t in range(steps):
        if on_step is not None:
            on_step(t)
        opt.zero_grad()
        m(torch.randn(16, 6, generator=gen)).square().mean().backward()
        if getattr(opt, "_poison", None) == t:
            next(m.parameters()).grad[0, 0] = float("nan")
        opt.step()


def main(scenario):
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    if scenario == "mismatch-shape":
        m = model(width=8 if rank != 1 else 9)
        taciturn.CDAdam(m.parameters(), lr=1e-2)
    elif scenario == "mismatch-hparam":
        m = model()
        taciturn.CDAdam(m.parameters(), lr=1e-2 if rank != 1 else 2e-2)
    elif scenario == "divergence":
        m = model()
        opt = taciturn.CDAdam(m.named_parameters(), lr=1e-2, check_divergence_every=1)

        def tamper(t):
            if t == 3 and rank == 1:
                with torch.no_grad():
                    m[2].bias[0] += 1e-3
        train(opt, m, 6, rank, tamper)
    elif scenario == "nonfinite":
        m = model()
        opt = taciturn.CDAdam(m.parameters(), lr=1e-2, check_divergence_every=1)
        opt._poison = 2 if rank == 1 else None
        train(opt, m, 5, rank)
        print(f"RESULT rank={rank} step={opt.global_step} skipped={opt.stats.skipped_steps}", flush=True)
    elif scenario in ("dead", "stalled"):
        m = model()
        opt = taciturn.CDAdam(m.parameters(), lr=1e-2, timeout=float(os.environ["TIMEOUT"]))

        def fail(t):
            if t == 5 and rank == 2:
                if scenario == "dead":
                    os._exit(3)
                time.sleep(3600)
        train(opt, m, 50, rank, fail)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
