#!/usr/bin/env python3
"""Optimizer state memory: bytes per parameter of every taciturn method vs torch's AMSGrad.

The state of an optimizer is every tensor it keeps between steps: the per-parameter
``opt.state[p]`` (moments, momentum, master or synced copies) plus, for taciturn, the
compression state in ``opt.compression.flat`` (errors and Markov sequences, one flat tensor
per bucket: full length on every worker, one chunk of about 1/n on its server, full length
for Markov's shared result).

World size 1: each method runs a few steps (synthetic gradients) on a 25M-parameter MLP
(5 x Linear(2236, 2236), the model of FACTS.md) in a fresh Python process, which also gives
the growth of the process's peak RSS over the model and its gradients (state plus the
step's temporaries). World size n: the per-parameter state does not depend on n, and the
compression state is allocated at construction from the bucket layouts, so it is read from
the optimizer built over a layout-only communicator of n ranks (no collective runs), for
every rank (chunk sizes differ by a block); the largest rank is reported. ``--verify`` runs
the same methods on n real gloo ranks with a small model and checks that every rank's
measured state equals that prediction exactly.

    python scripts/bench_memory.py            # 25M model, n = 1 and 4, verify on 4 ranks
    python scripts/bench_memory.py --quick    # 200K model, prints only (BENCHMARKS.md untouched)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import machine_note, peak_rss_mb, reset_peak_rss, rss_mb, run_ranks, table, write_section  # noqa: E402

import taciturn  # noqa: E402
from taciturn.comm import Communicator  # noqa: E402

#: label -> (factory name, keyword arguments, steps to run: OneBitAdam passes its freeze)
METHODS = {
    "torch Adam(amsgrad=True)": ("torch.Adam", dict(lr=1e-3, amsgrad=True), 2),
    "torch SGD(momentum=0.9)": ("torch.SGD", dict(lr=0.1, momentum=0.9), 2),
    "CDAdam": ("CDAdam", dict(), 2),
    "SparsAMS (top-1%)": ("SparsAMS", dict(ratio=0.01), 2),
    "DistEFSGD (blockSGDM, Nesterov)": ("DistEFSGD", dict(momentum=0.9, nesterov=True), 2),
    "SAEFSGD (top-1%, DC)": ("SAEFSGD", dict(ratio=0.01), 2),
    "OneBitAdam (warmup adam)": ("OneBitAdam", dict(freeze_step=1), 3),
    "OneBitAdam (warmup cdadam)": ("OneBitAdam", dict(freeze_step=1, warmup="cdadam"), 3),
    "AMSGrad (uncompressed)": ("AMSGrad", dict(), 2),
    "Adam (uncompressed)": ("Adam", dict(), 2),
    "SGD (uncompressed, momentum 0.9)": ("SGD", dict(momentum=0.9), 2),
    "EFAMSGrad": ("EFAMSGrad", dict(), 2),
    "NaiveAMSGrad": ("NaiveAMSGrad", dict(), 2),
    "Markov one-way AMSGrad": ("CompressedAMSGrad", dict(worker_feedback="markov", server_feedback="markov",
                                                         two_way=False), 2),
    "EF21SGD": ("EF21SGD", dict(), 2),
    "Signum": ("Signum", dict(), 2),
    "CDAdam sharded (1bit downlink)": ("CDAdam", dict(shard_state=True), 2),
    "CDAdam sharded (bf16 downlink)": ("CDAdam", dict(shard_state=True, downlink="bf16"), 2),
    "AMSGrad sharded (fp32 downlink)": ("AMSGrad", dict(shard_state=True, downlink="fp32"), 2),
}
#: ALGORITHMS.md's per-rank state of sharded CD-Adam, for the world sizes no machine here has
FORMULA_SIZES = (8, 64, 1024)
BASELINE = "torch Adam(amsgrad=True)"


class LayoutCommunicator(Communicator):
    """Rank ``rank`` of ``world_size`` for building an optimizer's layouts and state only."""

    name = "layout-only"

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def _refuse(self, *args, **kwargs):
        raise RuntimeError("LayoutCommunicator builds layouts only; it runs no collective")

    all_to_all = all_gather = broadcast = all_reduce = _refuse


def model_with(numel_target: int) -> torch.nn.Module:
    """5 x Linear(w, w) with w chosen so the model has about ``numel_target`` parameters."""
    width = int((numel_target / 5) ** 0.5)
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(5)])


def build(label: str, params, process_group=None):
    factory, kwargs, _ = METHODS[label]
    if factory.startswith("torch."):
        return getattr(torch.optim, factory.split(".", 1)[1])(params, **kwargs)
    extra = {}
    if isinstance(process_group, LayoutCommunicator):
        extra = dict(check_consistency=False, broadcast_parameters=False)
    return taciturn.create_optimizer(factory, params, process_group=process_group, **kwargs, **extra)


def _nbytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in values if torch.is_tensor(v))


def state_bytes(opt) -> tuple:
    """(per-parameter state bytes, taciturn compression state bytes) held by ``opt`` now."""
    per_param = sum(_nbytes(st.values()) for st in opt.state.values())  # the compression dict is no tensor
    compression = _nbytes(opt.compression.flat.values()) if hasattr(opt, "compression") else 0
    return per_param, compression


def run_steps(label: str, model: torch.nn.Module, opt, seed: int = 0) -> tuple:
    """Run the method's steps with synthetic gradients; the largest (per-param, compression)."""
    gen = torch.Generator().manual_seed(seed)
    peak = (0, 0)
    for _ in range(METHODS[label][2]):
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.normal_(0.0, 1e-3, generator=gen)
        opt.step()
        now = state_bytes(opt)
        peak = max(peak, now, key=sum)
    return peak


def compression_bytes_at(label: str, model: torch.nn.Module, world_size: int) -> int:
    """The largest rank's compression state at ``world_size`` (layouts only, no collective)."""
    if METHODS[label][0].startswith("torch."):
        return 0
    return max(state_bytes(build(label, model.parameters(), LayoutCommunicator(r, world_size)))[1]
               for r in range(world_size))


def measure_here(label: str, numel: int) -> dict:
    """World size 1 in this process: state bytes and the growth of its peak RSS (meaningful
    in a fresh process only: see ``measure``)."""
    model = model_with(numel)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = rss_mb()
    reset_peak_rss()
    opt = build(label, model.parameters())
    per_param, compression = run_steps(label, model, opt)
    return dict(numel=sum(p.numel() for p in model.parameters()), per_param=per_param, compression=compression,
                peak_rss_growth=round((peak_rss_mb() - before) * 2 ** 20))


def measure(label: str, numel: int, timeout: float) -> dict:
    """``measure_here`` in a fresh Python process, so the peak RSS is this method's alone."""
    # Every allocation above 64 KiB gets its own mapping, returned to the OS when freed, so the
    # peak RSS counts live tensors and the step's temporaries, not reused heap holes.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", label, "--numel", str(numel)],
                         capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {label!r} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _verify_rank(rank: int, world_size: int, numel: int, labels: list) -> dict:
    model = model_with(numel)
    found = {}
    for label in labels:
        if METHODS[label][0].startswith("torch."):
            continue
        opt = build(label, model.parameters())
        found[label] = run_steps(label, model, opt, seed=rank)
    return found


def verify(numel: int, world_size: int, labels: list, timeout: float) -> list:
    """Rows (method, predicted, measured per rank) on ``world_size`` real ranks; raises on a mismatch."""
    model = model_with(numel)
    measured = run_ranks(_verify_rank, world_size, numel, labels, timeout=timeout)
    rows, bad = [], []
    for label in measured[0]:
        opt = build(label, model.parameters())
        per_param = run_steps(label, model, opt)[0]
        predicted = per_param + compression_bytes_at(label, model, world_size)
        totals = [sum(m[label]) for m in measured]
        if max(totals) != predicted:
            bad.append(label)
        rows.append([label, predicted, " / ".join(map(str, totals)), "yes" if max(totals) == predicted else "NO"])
    if bad:
        raise AssertionError(f"state measured on {world_size} real ranks differs from the prediction for {bad}")
    return rows


def _deepspeed_rank(rank: int, world_size: int, stage: int, numel: int) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("LOCAL_RANK", str(rank))
    import deepspeed

    model = model_with(numel)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, opt, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    width = model[0].in_features
    for _ in range(2):
        engine.backward(engine(torch.randn(1, width)).pow(2).sum())
        engine.step()
    moments = _nbytes(t for st in opt.optimizer.state.values() for t in st.values())
    master = _nbytes(getattr(opt, "single_partition_of_fp32_groups", []))
    return {"moments": moments, "master": master, "wrapper": type(opt).__name__}


def deepspeed_state(stage: int, world_size: int, numel: int, timeout: float) -> int:
    """Bytes of optimizer state (AdamW's partitioned m, v and the fp32 partition it updates) of
    the largest rank of a real DeepSpeed ZeRO-``stage`` engine on ``world_size`` gloo ranks."""
    ranks = run_ranks(_deepspeed_rank, world_size, stage, numel, timeout=timeout)
    return max(r["moments"] + r["master"] for r in ranks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=25_000_000, help="parameters of the model (default 25M)")
    ap.add_argument("--world-sizes", default="1,2,4")
    ap.add_argument("--verify-ranks", type=int, default=4, help="real gloo ranks for the check (0: skip)")
    ap.add_argument("--verify-numel", type=int, default=1_000_000)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--quick", action="store_true",
                    help="200K parameters, in this process (no RSS), no DeepSpeed rows, 2-rank check, no "
                         "BENCHMARKS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        torch.set_num_threads(1)
        print(json.dumps(measure_here(args.child, args.numel)))
        return 0
    if args.quick:
        args.numel, args.verify_numel, args.verify_ranks = 200_000, 50_000, 2
    sizes = [int(n) for n in args.world_sizes.split(",")]
    started, load = time.time(), os.getloadavg()[0]
    model = model_with(args.numel)
    numel = sum(p.numel() for p in model.parameters())
    rows, results = [], {}
    for label in METHODS:
        print(f"bench_memory: {label} ...", flush=True)
        local = measure_here(label, args.numel) if args.quick else measure(label, args.numel, args.timeout)
        per_n = {n: local["per_param"] + (local["compression"] if n == 1 else compression_bytes_at(label, model, n))
                 for n in sizes}
        results[label] = dict(local=local, per_n=per_n)
    try:
        import deepspeed  # noqa: F401
        ds_stages = () if args.quick else (1, 2)
    except ImportError:
        ds_stages = ()
        print("bench_memory: DeepSpeed is not installed: no ZeRO rows")
    for stage in ds_stages:
        print(f"bench_memory: DeepSpeed ZeRO-{stage} + AdamW ...", flush=True)
        per_n = {n: deepspeed_state(stage, n, args.numel, args.timeout) for n in sizes}
        results[f"DeepSpeed ZeRO-{stage} + its AdamW"] = dict(local=dict(per_param=per_n[sizes[0]], compression=0,
                                                                        peak_rss_growth=None), per_n=per_n)
    base = results[BASELINE]["per_n"][sizes[0]] / numel
    for label, r in results.items():
        row = [label, f"{r['local']['per_param'] / numel:.2f}"]
        row += [f"{r['per_n'][n] / numel:.2f}" for n in sizes]
        row += [f"{r['per_n'][n] / numel / base:.2f}x" for n in sizes]
        if args.quick or r["local"]["peak_rss_growth"] is None:
            row += ["-", "-"]
        else:
            peak = r["local"]["peak_rss_growth"] / numel
            state = (r["local"]["per_param"] + r["local"]["compression"]) / numel
            row += [f"{peak:.1f}", f"{peak - state:.1f}"]
        rows.append(row)
    headers = (["method", "per-param state B/param"] + [f"total state B/param, n={n}" for n in sizes]
               + [f"vs torch AMSGrad, n={n}" for n in sizes]
               + ["peak RSS growth B/param, n=1", "of which step temporaries"])
    text = table(headers, rows)
    print(f"\nOptimizer state of a {numel / 1e6:.1f}M-parameter model (fp32 parameters: 4 B/param, not counted)\n")
    print(text)
    formula = table(["n"] + [str(n) for n in FORMULA_SIZES],
                    [["sharded CD-Adam, 4 + 20/n B/param"] + [f"{4 + 20 / n:.2f}" for n in FORMULA_SIZES],
                     ["unsharded CD-Adam, 20 + 4/n B/param"] + [f"{20 + 4 / n:.2f}" for n in FORMULA_SIZES],
                     ["DeepSpeed ZeRO-1/2 + AdamW, 12/n B/param (m, v and the fp32 partition it updates)"]
                     + [f"{12 / n:.2f}" for n in FORMULA_SIZES]])
    print(f"\n{formula}")
    check = ""
    if args.verify_ranks:
        print(f"\nbench_memory: checking the prediction on {args.verify_ranks} real gloo ranks ...", flush=True)
        vrows = verify(args.verify_numel, args.verify_ranks, list(METHODS), args.timeout)
        vnumel = sum(p.numel() for p in model_with(args.verify_numel).parameters())
        check = table(["method", f"predicted bytes, n={args.verify_ranks}", "measured per rank", "equal"], vrows)
        print(check)
        check = (f"Check on {args.verify_ranks} real gloo ranks ({vnumel:,}-parameter model, same steps): every "
                 "rank's measured state against the prediction (per-parameter state of the 1-rank run + compression "
                 f"state from the layouts), in bytes; the largest rank must match exactly.\n\n{check}")
    if not args.quick:
        write_section("bench_memory", "\n".join([
            "## Optimizer state memory",
            "",
            f"`python scripts/bench_memory.py`: bytes of optimizer state per parameter of a {numel / 1e6:.1f}M-"
            "parameter MLP (5 x Linear(2236, 2236)), counted from the tensors the optimizer keeps between steps: "
            "`opt.state[p]` for every parameter plus taciturn's compression state `opt.state[\"taciturn\"]` "
            "(errors, Markov sequences). Parameters and gradients (4 + 4 B/param) are not counted. Server-side "
            "state is one chunk of about 1/n of the buffer per rank, so the compression state shrinks with n "
            "toward its worker and result parts; n=1 is the largest state over the method's steps (which take "
            "OneBitAdam past its freeze), n>1 adds the per-parameter state of that run to the compression state built from the "
            "layouts of n ranks (largest rank). Peak RSS growth: how far the process's peak RSS rose over the "
            "model and gradients during construction and the steps, in a fresh process at n=1 (state plus the "
            "step's temporaries: the flat bucket, the feedback buffers, the decoded result).",
            "",
            text,
            "",
            "Per-rank state at larger world sizes (formulas; the rows above measure n = "
            f"{', '.join(map(str, sizes))}):",
            "",
            formula,
            "",
            check,
            "",
            "Reading it: CD-Adam keeps AMSGrad's 12 B/param, 4 B/param for each Markov sequence it holds in full "
            "(the worker's h and the shared result G) and 4/n B/param for the server's H: 24 at n=1, 21 at n=4, "
            "toward 20. Two-way EF methods keep one error per worker (4) plus a 1/n server error. One-way methods "
            "have no server chunk: SPARS-AMS adds only the worker error (16 whatever n), Markov one-way keeps h and H "
            "in full (20). SAEF keeps momentum and the synced model x per parameter (8) plus its errors. "
            "OneBitAdam with the CD-Adam warm-up holds the warm-up's Markov state (8 + 4/n) next to the momentum "
            "pipeline's errors (4 + 4/n) during the warm-up and frees it at the freeze: the columns give the "
            "largest state over the steps, the warm-up's (after the freeze it keeps 8 + 8 = 16 B/param at n=1). "
            "The uncompressed taciturn baselines keep no compression state. Sharded CD-Adam (`shard_state=True`) "
            "keeps the worker's h whole (4) and H, m, v, v^ and the downlink error on its chunk (20/n): 24 at n=1, "
            "9 at n=4; the bf16 / fp32 downlinks keep no downlink error (16/n), sharded AMSGrad only m, v, v^ "
            "(12/n). DeepSpeed's ZeRO-1/2 (a real engine per n, fp32 model) keeps AdamW's m and v and an fp32 copy "
            "of the partition it updates: 12/n, less than sharded CD-Adam's 4 + 20/n because it keeps no "
            "compression state (its gradients travel in fp32). Peak RSS growth adds the "
            "step's temporaries (last column: the flat bucket, the feedback buffers, the payloads and the decoded "
            "result, top-k's selection) to the state.",
            "",
            machine_note(started, load),
        ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
