#!/usr/bin/env python3
"""GPU throughput: the Triton kernels of the sign codecs and of the update rules next to torch.

Compression: one worker round of block_sign (1024) with EF and with Markov feedback on a flat fp32
buffer of d elements (scripts/bench_compress.py's ``worker_round``: encode with the feedback rule
and its state update, then the decode a receiver does), in GB/s of fp32 input, median of
``--reps`` rounds after a warm-up, four ways: a copy of the buffer (``out.copy_(x)``, the memory
bandwidth ceiling), the torch path (kernels off), the same torch path under ``torch.compile``, and
the Triton kernels of ``taciturn.kernels.triton_sign`` (what CUDA tensors get by default).

Optimizer step: one whole ``CDAdam`` step (block sign with Markov feedback both ways, on one
device with one rank: taciturn's LocalCommunicator, so the step is compression, the server
phase, decoding and the AMSGrad update, without any network) with the Triton kernels and with
the torch path, next to torch's AMSGrad (``torch.optim.Adam(amsgrad=True)``, foreach and fused),
on parameters of ``--step-params`` elements in tensors of at most 16M elements (and a short odd
one, like a bias) with fixed random gradients.

    python scripts/bench_gpu.py                # on a CUDA machine: 1M, 25M, 100M, 1B; writes BENCHMARKS.md
    python scripts/bench_gpu.py --sizes 1e6 1e8 --step-params 25e6 --no-write
    python scripts/bench_gpu.py --dry-run      # anywhere, a smoke test: tiny sizes, CPU tensors through
                                               # the Triton interpreter, no torch.compile, writes nothing

On a machine without CUDA it stops with a message (but for ``--dry-run``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import img_path, rel, table, write_section  # noqa: E402
from bench_compress import median_time, worker_round  # noqa: E402

import taciturn  # noqa: E402
from taciturn import kernels, make_compressor  # noqa: E402
from taciturn.feedback import make_feedback  # noqa: E402
from taciturn.wire import Pieces  # noqa: E402

SECTION = "gpu"
TITLE = "## GPU: Triton kernels (scripts/bench_gpu.py)"
COPY = "copy: out.copy_(x)"
PATHS = ("torch", "torch.compile", "triton")
RULES = ("ef", "markov")
STEPS = ("torch AMSGrad (foreach)", "torch AMSGrad (fused)", "CDAdam, torch path", "CDAdam, Triton")
LR = 1e-3
LONGEST = 1 << 24  # elements per parameter tensor of the step benchmark


def timed(fn, reps, sync):
    """median_time, or None when the device runs out of memory."""
    try:
        return median_time(fn, reps, sync)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compress_cell(path, codec, rule, pieces, x, out, reps, sync):
    state = {k: torch.zeros_like(x) for k in rule.worker_keys}
    previous = kernels.set_enabled(path == "triton")
    try:
        fn = worker_round
        if path == "torch.compile":
            torch._dynamo.reset()  # one compilation per cell (shapes differ; no cache limit)
            fn = torch.compile(worker_round, dynamic=False)
        return timed(lambda: fn(codec, rule, pieces, x, state, out), reps, sync)
    finally:
        kernels.set_enabled(previous)


def measure_compression(sizes, reps, device, paths, sync):
    """{(path, rule): {d: seconds or None}}, the copy first."""
    codec = make_compressor("block_sign")
    results = {(COPY, ""): {}}
    for d in sizes:
        x = torch.randn(d, device=device)
        out = torch.empty_like(x)
        results[(COPY, "")][d] = timed(lambda: out.copy_(x), reps, sync)
        pieces = Pieces.from_lengths(codec.units([d]))
        for rule_name in RULES:
            for path in paths:
                t = compress_cell(path, codec, make_feedback(rule_name), pieces, x, out, reps, sync)
                results.setdefault((path, rule_name), {})[d] = t
                print(f"{d:>13,} {rule_name:<7} {path:<14} " + (f"{4 * d / t / 1e9:8.1f} GB/s" if t else "OOM"),
                      flush=True)
        del x, out
    return results


def step_params(total, device):
    """Parameters of ``total`` elements (tensors of at most LONGEST, then an odd short one) with gradients."""
    sizes = [LONGEST] * ((total - 1003) // LONGEST)
    sizes += [total - 1003 - sum(sizes), 1003]
    params = [torch.nn.Parameter(torch.randn(n, device=device) * 0.02) for n in sizes if n > 0]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def step_optimizer(method, params):
    if method.startswith("torch"):
        return torch.optim.Adam(params, lr=LR, amsgrad=True, **({"fused": True} if "fused" in method else
                                                               {"foreach": True}))
    return taciturn.create_optimizer("CDAdam", params, lr=LR, broadcast_parameters=False)


def measure_steps(totals, reps, device, sync):
    """{method: {params: seconds or None}}."""
    results = {}
    for total in totals:
        for method in STEPS:
            params = step_params(total, device)
            previous = kernels.set_enabled(method != "CDAdam, torch path")
            try:
                opt = step_optimizer(method, params)
                t = timed(opt.step, reps, sync)
            finally:
                kernels.set_enabled(previous)
            results.setdefault(method, {})[total] = t
            print(f"{total:>13,} params  {method:<26} " + (f"{t * 1e3:9.2f} ms" if t else "OOM"), flush=True)
            del params, opt
    return results


def fmt(d):
    return f"{d / 1e9:g}B" if d >= 1e9 else f"{d / 1e6:g}M" if d >= 1e6 else f"{d:,}"


def render(sizes, totals, compression, steps, device, reps, image, started):
    headers = ["path", "feedback"] + [h for d in sizes for h in (f"{fmt(d)} GB/s", "x copy")]
    copy = compression[(COPY, "")]
    rows = []
    for (path, rule), per in compression.items():
        row = [path, rule]
        for d in sizes:
            t = per.get(d)
            row += ([f"{4 * d / t / 1e9:.3g}", f"{copy[d] / t:.2f}" if copy.get(d) else ""] if t else ["OOM", ""])
        rows.append(row)
    base = steps[STEPS[0]]
    step_rows = [[m] + [c for n in totals for c in ((f"{per[n] * 1e3:.2f}", f"{per[n] / base[n]:.2f}")
                                                    if per.get(n) and base.get(n) else ("OOM", ""))]
                 for m, per in steps.items()]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter: a smoke run)"
    return "\n\n".join(block for block in [
        TITLE,
        f"Compression: one worker round (encode with the feedback rule and its state update, decode) of "
        f"block_sign (1024) on a flat fp32 buffer, in GB/s of fp32 input, median of {reps} rounds after a "
        "warm-up; `x copy` is the time of `out.copy_(x)` over the round's (1 = as fast as a copy). `torch`: "
        "the codec's torch path, `torch.compile`: the same under torch.compile, `triton`: "
        "taciturn.kernels.triton_sign (the default for CUDA tensors; payload bytes and state equal the "
        "torch path's, tests/gpu).",
        table(headers, rows),
        "Optimizer step: one whole step on one device (CDAdam with one rank: compression, server phase, "
        "decoding and the update, no network), ms, and its ratio to torch's AMSGrad (foreach).",
        table(["method"] + [h for n in totals for h in (f"{fmt(n)} params ms", "x torch")], step_rows),
        f"![GPU throughput]({rel(image)})" if image else "",
        f"Measured on {name}, torch {torch.__version__}, in {time.time() - started:.0f} s.",
    ] if block)


def plot(sizes, totals, compression, steps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for (name, rule), per in compression.items():
        ds = [d for d in sizes if per.get(d)]
        left.plot(ds, [4 * d / per[d] / 1e9 for d in ds], marker="o", label=f"{name} {rule}".strip(),
                  linestyle="--" if name == COPY else "-")
    left.set_xscale("log")
    left.set_xlabel("elements")
    left.set_ylabel("GB/s of fp32 input")
    left.set_title("block_sign worker round", fontsize=10)
    left.legend(fontsize=7)
    width = 0.8 / len(steps)
    for i, (method, per) in enumerate(steps.items()):
        right.bar([j + i * width for j in range(len(totals))], [1e3 * (per.get(n) or 0) for n in totals], width,
                  label=method)
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(totals))], [f"{fmt(n)} params" for n in totals])
    right.set_ylabel("ms per step")
    right.set_title("optimizer step, one device", fontsize=10)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 25e6, 1e8, 1e9],
                        help="buffer sizes in elements (default 1e6 25e6 1e8 1e9)")
    parser.add_argument("--step-params", type=float, nargs="+", default=[25e6, 1e8],
                        help="parameter counts of the optimizer step (default 25e6 1e8)")
    parser.add_argument("--reps", type=int, default=10, help="timed rounds per cell (median reported)")
    parser.add_argument("--dry-run", action="store_true",
                        help="smoke test anywhere: sizes 1000 and 5003, CPU tensors through the Triton interpreter")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md and docs/img alone")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        kernels.TRITON_DEVICES = {"cuda", "cpu"}
        sizes, totals, reps, paths = [1000, 5003], [5003], 2, ("torch", "triton")
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu.py: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU "
                     "machine, or pass --dry-run for a smoke test on CPU")
        sizes, totals, reps, paths = [int(s) for s in args.sizes], [int(n) for n in args.step_params], args.reps, PATHS
    if not kernels.triton_ready():
        sys.exit("bench_gpu.py: triton does not import: pip install 'taciturn[triton]'")
    if reps < 1 or min(sizes) < 1 or min(totals) < 1004:
        parser.error("--reps must be at least 1, --sizes at least 1 element, --step-params at least 1004")
    device = torch.device("cuda" if not args.dry_run else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    started = time.time()
    compression = measure_compression(sizes, reps, device, paths, sync)
    steps = measure_steps(totals, reps, device, sync)
    write = not (args.no_write or args.dry_run)
    image = img_path("bench_gpu.png") if write else None
    if image:
        plot(sizes, totals, compression, steps, image)
    text = render(sizes, totals, compression, steps, device, reps, image, started)
    print("\n" + text)
    if write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
