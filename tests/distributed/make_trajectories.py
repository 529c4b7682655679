"""Golden trajectories of every preset on 2 ranks: the generator of data/trajectories.pt.

test_trajectories.py runs the same functions and compares what they return, bit for bit,
with the saved file: a refactor of the core (presets, compression state, the exchange) that
changes no result passes it unchanged.

Run this ONLY when a change of results is intended, and say in the commit why they changed:

    python3 tests/distributed/make_trajectories.py

It overwrites data/trajectories.pt with what the taciturn that Python imports computes; it
needs Horovod (scripts/install_horovod.sh). ``meta["source"]`` records the commit that
taciturn came from. Bit-identical floats hold on one kind of machine only (torch build, CPU,
taciturn's fused kernels and their compiler): ``meta["machine"]`` records it, and the test
skips on another.

The workload: a 2-layer MLP of 320 parameters in 4 tensors (189, 21, 105, 5 elements: chunk
cuts and 50-element blocks fall inside tensors), small buckets (at least 2), other data on
each rank, STEPS steps.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import taciturn
from taciturn import kernels
from taciturn.integrations.ddp import PRESETS

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "data", "trajectories.pt")
RANKS = 2
STEPS = 8
LR = 0.02
#: 200 fp32 per bucket: 2 buckets of the optimizers' and Horovod's pipelines (3 with two groups)
BUCKET_MB = 200 * 4 / 2 ** 20
#: DDP closes a bucket once it reaches its cap: after its rebuild at step 1, [b.*] and [a.*]
DDP_BUCKET_MB = 100 / 2 ** 20
HOROVOD_TIMEOUT = 180


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(9, 21)
        self.b = nn.Linear(21, 5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 9, generator=g), torch.randn(6, 5, generator=g)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ----------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    optimizer: str
    kwargs: dict = field(default_factory=dict)
    #: two param groups, the second layer at half the lr
    groups: bool = False
    #: the step before which every group's lr is halved
    halve_lr_at: Optional[int] = None


def _optimizer_cases() -> dict:
    cases = {name: Case(name) for name in taciturn.list_optimizers()}
    cases.update({
        "CDAdam/block_size=50": Case("CDAdam", dict(block_size=50)),
        "CDAdam/param_groups": Case("CDAdam", groups=True),
        "CompressedAMSGrad/randk": Case("CompressedAMSGrad", dict(compressor="randk", ratio=0.1)),
        "CompressedAMSGrad/topk_two_way": Case("CompressedAMSGrad", dict(compressor="topk", ratio=0.1, two_way=True)),
        "CompressedAMSGrad/scaled_sign": Case("CompressedAMSGrad", dict(compressor="scaled_sign")),
        "CompressedAMSGrad/ef_ef": Case("CompressedAMSGrad", dict(worker_feedback="ef", server_feedback="ef")),
        # variance_floor=0: the golden runs predate the floor (Tang et al.'s exact frozen variance)
        "OneBitAdam/adam_freeze3": Case("OneBitAdam", dict(warmup="adam", freeze_step=3, variance_floor=0.0)),
        "OneBitAdam/cdadam_freeze3": Case("OneBitAdam", dict(warmup="cdadam", freeze_step=3, block_size=50,
                                                             variance_floor=0.0)),
        "SAEFSGD/error_avg_period=3": Case("SAEFSGD", dict(ratio=0.1, error_avg_period=3)),
        "SAEFSGD/single_way": Case("SAEFSGD", dict(ratio=0.1, two_way=False)),
        "DistEFSGD/lr_change": Case("DistEFSGD", dict(momentum=0.9), halve_lr_at=4),
        "DistEFSGD/param_groups_lr_change": Case("DistEFSGD", dict(momentum=0.9, nesterov=True, block_size=50),
                                                 groups=True, halve_lr_at=4),
    })
    return cases


OPTIMIZER_CASES = _optimizer_cases()
#: name -> (preset, options) of register_compression_hook
DDP_CASES = {
    **{preset: (preset, {}) for preset in PRESETS},
    "topk/randk": ("topk", dict(compressor="randk", ratio=0.1)),
    "markov_sign/block_size=50": ("markov_sign", dict(block_size=50)),
}
HOROVOD_PRESETS = ("cdadam", "dist_ef_block_sign", "sparsams_topk", "ef_sign", "markov_sign", "bf16")


# ----------------------------------------------------------------------------- training

def train(model, opt, rank, halve_lr_at=None) -> dict:
    """STEPS steps; after each, the parameters (SAEF: the synced x, and in ``visible`` the
    x - e_k this rank's forward sees) and the step's loss."""
    saef = isinstance(opt, taciturn.SAEFSGD)
    params, visible, losses = [], [], []
    for t in range(STEPS):
        if t == halve_lr_at:
            for group in opt.param_groups:
                group["lr"] *= 0.5
        x, y = batch(rank, t)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
        if saef:
            visible.append(flat(model))
            with opt.synced_weights():
                params.append(flat(model))
        else:
            params.append(flat(model))
    out = {"params": torch.stack(params), "loss": torch.stack(losses)}
    if saef:
        out["visible"] = torch.stack(visible)
    return out


def _optimizer_rank(rank, world, names):
    out = {}
    for name in names:
        case = OPTIMIZER_CASES[name]
        model = Tiny()
        params = ([{"params": model.a.parameters()}, {"params": model.b.parameters(), "lr": LR / 2}]
                  if case.groups else model.parameters())
        opt = taciturn.create_optimizer(case.optimizer, params, lr=LR, bucket_cap_mb=BUCKET_MB, **case.kwargs)
        out[name] = train(model, opt, rank, case.halve_lr_at)
        out[name]["state"] = {k: v.clone() for k, v in next(v["taciturn"] for v in opt.state_dict()["state"].values() if "taciturn" in v).items()
                              if torch.is_tensor(v)}
    return out


def _ddp_rank(rank, world, names):
    from torch.nn.parallel import DistributedDataParallel

    from taciturn.integrations.ddp import register_compression_hook

    out = {}
    for name in names:
        preset, options = DDP_CASES[name]
        model = DistributedDataParallel(Tiny(), bucket_cap_mb=DDP_BUCKET_MB)
        state = register_compression_hook(model, preset, **options)
        opt = taciturn.AMSGrad(model.parameters(), lr=LR, process_group="local")
        out[name] = train(model, opt, rank)
        out[name]["buckets"] = len(state.buckets)
    return out


def _horovod_rank(out_dir: str) -> None:
    """The body of each rank under ``horovodrun``: every preset, results to out_dir/rank<r>.pt."""
    import horovod.torch as hvd

    from taciturn.integrations import horovod as thvd

    torch.set_num_threads(1)
    hvd.init()
    out = {}
    for name in HOROVOD_PRESETS:
        model = Tiny()
        inner = taciturn.AMSGrad(model.parameters(), lr=LR, process_group="local")
        opt = thvd.DistributedOptimizer(inner, named_parameters=model.named_parameters(),
                                        compression=getattr(thvd.Compression, name), bucket_cap_mb=BUCKET_MB)
        out[name] = train(model, opt, hvd.rank())
    torch.save(out, os.path.join(out_dir, f"rank{hvd.rank()}.pt"))


# ----------------------------------------------------------------------------- jobs

def optimizer_runs(run_ranks) -> list:
    """Per rank: {case: record} of every optimizer case (one job of 2 gloo ranks)."""
    return run_ranks(_optimizer_rank, RANKS, list(OPTIMIZER_CASES), timeout=240)


def ddp_runs(run_ranks) -> list:
    return run_ranks(_ddp_rank, RANKS, list(DDP_CASES), timeout=240)


def horovod_runs(out_dir: str) -> list:
    """Per rank: {preset: record}, from ``horovodrun -np 2 --gloo`` of this file."""
    cmd = [sys.executable, "-m", "horovod.runner.launch", "-np", str(RANKS), "--gloo",
           sys.executable, os.path.abspath(__file__), "--horovod-rank", out_dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOROVOD_CPU_OPERATIONS": "gloo"}
    proc = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=HOROVOD_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RuntimeError(f"horovodrun did not finish within {HOROVOD_TIMEOUT} s:\n{output[-4000:]}")
    if proc.returncode != 0:
        raise RuntimeError(f"horovodrun exited with {proc.returncode}:\n{output[-4000:]}")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(RANKS)]


def rank_disagreements(per_rank: list) -> list:
    """Where a rank's parameters (SAEF: synced x) differ from rank 0's: one line each."""
    out = []
    for name, first in per_rank[0].items():
        for r, other in enumerate(per_rank[1:], start=1):
            mismatch = first_mismatch(other[name]["params"], first["params"])
            if mismatch:
                out.append(f"{name}: rank {r}'s parameters differ from rank 0's from step {mismatch[0]} "
                           f"(max abs diff {mismatch[1]:.3e})")
    return out


def merge(per_rank: list) -> dict:
    """The golden form of per-rank records: rank 0's parameters, per-step fields of every rank
    stacked on axis 1 (step first), ``state`` and ``buckets`` as a list per rank."""
    out = {}
    for name, first in per_rank[0].items():
        rec = {"params": first["params"]}
        for key in ("loss", "visible"):
            if key in first:
                rec[key] = torch.stack([r[name][key] for r in per_rank], dim=1)
        for key in ("state", "buckets"):
            if key in first:
                rec[key] = [r[name][key] for r in per_rank]
        out[name] = rec
    return out


def first_mismatch(actual: torch.Tensor, expected: torch.Tensor):
    """None when ``torch.equal``, else (first step that differs, max abs diff over all steps).
    Axis 0 is the step; a shape or dtype change is reported at step 0 as an infinite difference."""
    if torch.equal(actual, expected):
        return None
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return 0, float("inf")
    step = next(t for t in range(len(actual)) if not torch.equal(actual[t], expected[t]))
    return step, (actual.double() - expected.double()).abs().max().item()


def differences(name: str, actual: dict, expected: dict) -> list:
    """One line per field of case ``name`` that is not bit-identical to the golden one."""
    out = []
    if actual.keys() != expected.keys():
        out.append(f"{name}: fields {sorted(actual)}, golden {sorted(expected)}")
    for key in sorted(actual.keys() & expected.keys()):
        a, e = actual[key], expected[key]
        if key == "buckets" and a != e:
            out.append(f"{name}: {a} buckets per rank, golden {e}")
        elif key == "state":
            for r, (sa, se) in enumerate(zip(a, e)):
                if sa.keys() != se.keys():
                    out.append(f"{name}: rank {r}'s final compression state holds {sorted(sa)}, golden {sorted(se)}")
                for k in sorted(sa.keys() & se.keys()):
                    mismatch = first_mismatch(sa[k].unsqueeze(0), se[k].unsqueeze(0))
                    if mismatch:
                        out.append(f"{name}: rank {r}'s final compression state {k!r} differs "
                                   f"(max abs diff {mismatch[1]:.3e})")
        elif torch.is_tensor(a):
            mismatch = first_mismatch(a, e)
            if mismatch:
                out.append(f"{name}: {key} differs from step {mismatch[0]} (max abs diff {mismatch[1]:.3e})")
    return out


def machine() -> dict:
    """What bit-identical floats depend on besides taciturn: torch's build and the CPU kernels
    it dispatches to, the CPU, and whether and how taciturn's fused kernels were compiled."""
    cpu = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                cpu.setdefault(key.strip(), value.strip())
    fused = None
    if kernels.usable(torch.zeros(1)):
        compiler = os.environ.get("CXX") or shutil.which("g++")
        version = subprocess.run([compiler, "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
        fused = f"{os.path.basename(compiler)} {version} -march={os.environ.get('TACITURN_KERNELS_ARCH', 'native')}"
    return {"torch": str(torch.__version__), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": cpu.get("model name", platform.processor()),
            "cpu_flags": hashlib.sha256(cpu.get("flags", "").encode()).hexdigest()[:16], "kernels": fused}


def source() -> str:
    """The commit the imported taciturn comes from, "+changes" when tracked files are edited."""
    where = os.path.dirname(os.path.realpath(taciturn.__file__))
    git = lambda *args: subprocess.run(["git", "-C", where, *args], capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--horovod-rank", metavar="OUT_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.horovod_rank:
        _horovod_rank(args.horovod_rank)
        return
    sys.path.insert(0, os.path.dirname(HERE))
    from conftest import _run_ranks  # the suite's run_ranks fixture, whatever module it launches ranks with

    golden = {"meta": {"machine": machine(), "source": source()}}
    with tempfile.TemporaryDirectory(prefix="taciturn-golden-") as tmp:
        jobs = {"optimizers": optimizer_runs(_run_ranks), "ddp": ddp_runs(_run_ranks), "horovod": horovod_runs(tmp)}
    for section, runs in jobs.items():
        problems = rank_disagreements(runs)
        if problems:
            raise SystemExit("\n".join(problems))
        golden[section] = merge(runs)
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    torch.save(golden, GOLDEN)


if __name__ == "__main__":
    main()
