#!/usr/bin/env python3
"""Time to accuracy on Fashion-MNIST: 2 ranks over a shaped link, every taciturn method and the
uncompressed baselines, same model, same initial weights, same batches, same number of steps.

Each rank trains an MLP (784-H-H-10, ReLU; H = 1024 by default: 1.86M parameters) on its own
half of the training set (``_datasets.shard``), batch 64 per rank, one torch thread per
rank, in one network namespace per rank joined by tc-tbf-shaped links (scripts/netcluster.py;
``--loopback`` or a machine without root: unshaped loopback, said so). Methods: CD-Adam,
OneBitAdam with its two warm-ups (uncompressed Adam, or CD-Adam; frozen after 15 % of the steps),
0/1 Adam with its two variance phases (DeepSpeed's: fp32 on the thinning variance steps, 1-bit
between; or CD-Adam), frozen after 15 % of the steps, then local steps whose interval doubles
every 10 % of the steps up to 16, SPARS-AMS (top-1 %), dist-EF-blockSGDM (block sign, Nesterov momentum 0.9), SAEF (top-1 %,
momentum 0.9), uncompressed AMSGrad and SGDM, and what users run instead: DDP with torch's
PowerSGD hook (rank 1) and torch's AMSGrad; constant learning rates (1e-3 for the Adam
family, 0.05 for the SGD family).

Wall time is the training steps only (rank 0's clock): the evaluations (the test set split
between the ranks, the synced model for SAEF) stop the clock. Bytes: what each rank hands to
and receives from the collectives (``opt.stats``: bytes_up + bytes_down); in namespaces, also
the bytes through rank 0's veth during training (sent + received, headers included).

    python scripts/bench_tta.py                  # 2 ranks at 1gbit; writes BENCHMARKS.md and the plot
    python scripts/bench_tta.py --methods cdadam,amsgrad --steps 200
    python scripts/bench_tta.py --quick          # smoke run: small MLP, few steps, loopback, writes nothing
    python scripts/bench_tta.py --lamb           # batch 1024 per step (2 ranks x 8 micro steps of 64): 1-bit LAMB vs LAMB
    python scripts/bench_tta.py --render results/bench_tta.json    # section and plot again, no runs

The default run takes about 3 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _bench import (add_cluster_options, img_path, join_cluster, machine_note, mlp, rel,  # noqa: E402
                    run_workers, save_and_publish, table, write_section)
from bench_step import POWERSGD_START, LoopbackCluster, link_counters  # noqa: E402
from netcluster import Cluster  # noqa: E402

SECTION = "bench_tta"
ADAM_LR, SGD_LR, LAMB_LR = 1e-3, 0.05, 1e-2
# name -> (label, registry name, keyword arguments); OneBitAdam's freeze_step and 0/1 Adam's
# var_freeze_step / local_step_scaler are set per run
METHODS: Dict[str, tuple] = {
    "cdadam": ("CD-Adam", "CDAdam", dict(lr=ADAM_LR)),
    "onebitadam_adam": ("OneBitAdam (warm-up Adam)", "OneBitAdam", dict(lr=ADAM_LR, warmup="adam")),
    "onebitadam_cdadam": ("OneBitAdam (warm-up CD-Adam)", "OneBitAdam", dict(lr=ADAM_LR, warmup="cdadam")),
    "zerooneadam_adam": ("0/1 Adam (variance phase Adam)", "ZeroOneAdam", dict(lr=ADAM_LR, warmup="adam")),
    "zerooneadam_cdadam": ("0/1 Adam (variance phase CD-Adam)", "ZeroOneAdam", dict(lr=ADAM_LR, warmup="cdadam")),
    "sparsams": ("SPARS-AMS (top-1%)", "SparsAMS", dict(lr=ADAM_LR)),
    "distefsgd": ("dist-EF-blockSGDM", "DistEFSGD", dict(lr=SGD_LR, momentum=0.9, nesterov=True)),
    "saefsgd": ("SAEF (top-1%)", "SAEFSGD", dict(lr=SGD_LR, momentum=0.9)),
    "amsgrad": ("AMSGrad (uncompressed)", "AMSGrad", dict(lr=ADAM_LR)),
    "sgdm": ("SGDM (uncompressed)", "SGD", dict(lr=SGD_LR, momentum=0.9)),
    "ddp_powersgd": ("DDP + PowerSGD (rank 1), torch AMSGrad", "powersgd", dict(lr=ADAM_LR)),
    "lamb": ("LAMB (uncompressed: 1-bit LAMB's warm-up throughout)", "OneBitLamb",
             dict(lr=LAMB_LR, freeze_step=10 ** 9, compressor="identity")),
    "onebitlamb_lamb": ("1-bit LAMB (warm-up LAMB)", "OneBitLamb", dict(lr=LAMB_LR, warmup="lamb")),
    "onebitlamb_cdadam": ("1-bit LAMB (warm-up CD-Adam)", "OneBitLamb", dict(lr=LAMB_LR, warmup="cdadam")),
    "cdadam_sharded": ("CD-Adam sharded state, 1-bit downlink", "CDAdam", dict(lr=ADAM_LR, shard_state=True)),
    "cdadam_sharded_bf16": ("CD-Adam sharded state, bf16 downlink", "CDAdam",
                            dict(lr=ADAM_LR, shard_state=True, downlink="bf16")),
}
#: run by scripts/bench_sharded.py, not by default
SHARDED_METHODS = ("cdadam_sharded", "cdadam_sharded_bf16")
#: the large-batch run (--lamb): 1-bit LAMB against LAMB, with the Adam family's CD-Adam for reference
LAMB_METHODS = ("lamb", "onebitlamb_lamb", "onebitlamb_cdadam", "cdadam")
LAMB_ACCUMULATE = 8
DEFAULT_METHODS = [m for m in METHODS if m not in SHARDED_METHODS + LAMB_METHODS[:3]]
FREEZE_FRACTION = 0.15
LOCAL_STEP_FRACTION = 0.1


# ---------------------------------------------------------------------- inside a rank
def powersgd(model, lr: float):
    """What a user would run instead: DDP with torch's PowerSGD hook (rank 1, error feedback,
    warm start, plain allreduce for its first POWERSGD_START steps, one bucket as in
    bench_step) and torch's AMSGrad. Returns the wrapped model, the optimizer, a stats object
    like ``opt.stats`` and the function that counts one step's bytes in it: what the hook's
    allreduces hand over and get back (PowerSGD's own rule for which tensors it compresses)."""
    import types

    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel

    params = list(model.parameters())
    one_bucket = 4 * sum(p.numel() for p in params) / 2 ** 20 + 1
    ddp = DistributedDataParallel(model, bucket_cap_mb=one_bucket)
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                        start_powerSGD_iter=POWERSGD_START)
    ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    stats = types.SimpleNamespace(bytes_up=0, bytes_down=0, compress_time=None, collective_time=None,
                                  fp32_bytes=0, skipped_steps=0, steps=0)
    full = sum(p.numel() for p in params)
    low_rank = 0
    for p in params:
        rows, cols = (p.shape[0], p.numel() // p.shape[0]) if p.dim() > 1 else (p.numel(), 1)
        compressed = (rows + cols) * state.matrix_approximation_rank
        low_rank += compressed if p.dim() > 1 and compressed * state.min_compression_rate < p.numel() else p.numel()

    def count():
        elements = full if stats.steps < POWERSGD_START else low_rank
        stats.bytes_up += 4 * elements
        stats.bytes_down += 4 * elements
        stats.fp32_bytes += 4 * full
        stats.steps += 1
    return ddp, torch.optim.Adam(params, lr=lr, amsgrad=True), stats, count


def train(name: str, cfg: dict, data: tuple) -> dict:
    """Train with method ``name`` on this rank; the evaluation curve (rank 0's clock)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import taciturn

    rank = dist.get_rank()
    x_train, y_train, x_test, y_test = data
    label, registry_name, kwargs = METHODS[name]
    kwargs = dict(kwargs)
    if registry_name in ("OneBitAdam", "OneBitLamb"):
        kwargs.setdefault("freeze_step", max(1, round(FREEZE_FRACTION * cfg["steps"])))
    if registry_name == "ZeroOneAdam":
        # the variance thins out as in DeepSpeed (var_update_scaler 16); after the freeze the
        # interval between synchronisations doubles every LOCAL_STEP_FRACTION of the run, up to 16
        kwargs.update(var_freeze_step=max(1, round(FREEZE_FRACTION * cfg["steps"])),
                      local_step_scaler=max(1, round(LOCAL_STEP_FRACTION * cfg["steps"])), local_step_clipper=16)
    model = mlp(cfg["seed"], (784, cfg["hidden"], cfg["hidden"], 10))
    if registry_name == "powersgd":
        model, opt, stats, count = powersgd(model, **kwargs)
    else:
        opt = taciturn.create_optimizer(registry_name, model.parameters(), **kwargs)
        stats, count = opt.stats, (lambda: None)
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
    evals = {round(cfg["steps"] * k / cfg["evals"]) for k in range(1, cfg["evals"] + 1)}

    def evaluate() -> float:
        synced = opt.synced_weights() if hasattr(opt, "synced_weights") else contextlib.nullcontext()
        with torch.no_grad(), synced:
            correct = torch.tensor([(model(x_test).argmax(1) == y_test).sum().item(), len(y_test)])
        dist.all_reduce(correct)
        return correct[0].item() / correct[1].item()

    curve = [{"step": 0, "accuracy": evaluate(), "seconds": 0.0, "bytes": 0, "wire": 0, "loss": float("nan")}]
    seconds, wire, loss_sum, loss_n = 0.0, 0, 0.0, 0
    dist.barrier()
    mark = link_counters()
    for step in range(1, cfg["steps"] + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg["accumulate"]):  # micro batches of one optimizer step
            idx = torch.randint(0, len(x_train), (cfg["batch"],), generator=gen)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx]) / cfg["accumulate"]
            loss.backward()
        opt.step()
        count()
        seconds += time.perf_counter() - t0
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if step in evals:
            dist.barrier()
            if mark is not None:
                now = link_counters()
                wire += now[0] - mark[0] + now[1] - mark[1]
            curve.append({"step": step, "accuracy": evaluate(), "seconds": seconds, "loss": loss_sum / loss_n,
                          "bytes": stats.bytes_up + stats.bytes_down, "wire": wire})
            loss_sum, loss_n = 0.0, 0
            dist.barrier()
            mark = link_counters()
        if rank == 0 and step % max(1, cfg["steps"] // 4) == 0:
            print(f"  {name}: step {step}/{cfg['steps']}, {seconds:.1f} s", file=sys.stderr, flush=True)
    s = stats
    return {"method": name, "label": label, "optimizer": registry_name,
            "kwargs": {k: v for k, v in kwargs.items()}, "params": sum(p.numel() for p in model.parameters()),
            "curve": curve, "compress_time": s.compress_time, "collective_time": s.collective_time,
            "fp32_bytes": s.fp32_bytes, "skipped_steps": s.skipped_steps}


def worker(cfg_path: str) -> None:
    import torch
    import torch.distributed as dist

    from _datasets import fashion_mnist, shard

    cfg = join_cluster(cfg_path)
    rank, n = dist.get_rank(), dist.get_world_size()
    data = (*shard(fashion_mnist("train", flatten=True), n, rank), *shard(fashion_mnist("test", flatten=True), n, rank))
    results = [train(name, cfg, data) for name in cfg["methods"]]
    if rank == 0:
        with open(os.path.join(cfg["out"], "results.json"), "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------- the orchestrator
def reached(curve: List[dict], target: float) -> Optional[dict]:
    """The first evaluation at or above ``target`` accuracy (None if never)."""
    return next((p for p in curve[1:] if p["accuracy"] >= target), None)


def summary_table(results: List[dict], target: float, shaped: bool) -> str:
    base = next((r for r in results if r["method"] == "amsgrad"), results[0])
    headers = ["method", "test acc %", "MB per rank (up + down)", f"fewer bytes than {base['label'].split(' (')[0]}"]
    headers += ["wire MB (rank 0)"] if shaped else []
    headers += ["wall s", "ms/step", "collective s", f"time to {100 * target:.0f}% (s)",
                f"MB to {100 * target:.0f}%"]
    rows = []
    for r in results:
        end, hit = r["curve"][-1], reached(r["curve"], target)
        skipped = f" ({r['skipped_steps']} steps skipped: non-finite gradients)" if r["skipped_steps"] else ""
        row = [r["label"], f"{100 * end['accuracy']:.2f}{skipped}", f"{end['bytes'] / 1e6:.1f}",
               f"{base['curve'][-1]['bytes'] / end['bytes']:.1f}x" if end["bytes"] else ""]
        row += [f"{end['wire'] / 1e6:.1f}"] if shaped else []
        collective = "(in step)" if r["collective_time"] is None else f"{r['collective_time']:.1f}"
        row += [f"{end['seconds']:.1f}", f"{1000 * end['seconds'] / end['step']:.1f}", collective,
                f"{hit['seconds']:.1f}" if hit else "not reached", f"{hit['bytes'] / 1e6:.1f}" if hit else ""]
        rows.append(row)
    return table(headers, rows)


def notes(results: List[dict]) -> List[str]:
    """A line for every method that skipped steps on non-finite gradients (it diverged)."""
    out = []
    for r in results:
        if not r["skipped_steps"]:
            continue
        line = (f"{r['label']} skipped {r['skipped_steps']} of its steps: its gradients became non-finite (the "
                "parameters diverged), and every later step was skipped.")
        if r["method"] == "onebitadam_adam":
            line += (" Cause, checked in one process: at the freeze many elements of Adam's variance are 0 or "
                     "nearly 0 (weights reading from ReLU units that rarely fired in the warm-up: in the second "
                     "layer 19,390 exactly 0, which mask_zero_variance masks, but 197,146 below 1e-10); after the "
                     "freeze the block-sign momentum gives every element of a block +-its scale, which the update "
                     "divides by sqrt(v) + eps, so those weights take steps of order scale / eps and the model "
                     "diverges within about ten steps, with or without the mask. DeepSpeed's answer is a "
                     "hand-made exp_avg_mask; the CD-Adam warm-up builds its variance from compressed gradients, "
                     "which are non-zero everywhere; OneBitAdam's variance_floor (default 0.1 of the block's mean "
                     "variance, applied at the freeze; 0 is Tang et al.'s form) bounds those steps "
                     "(scripts/bench_accuracy.py).")
        out.append(line)
    return out


def plot(results: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for r in results:
        pts = r["curve"][1:]
        acc = [100 * p["accuracy"] for p in pts]
        style = "--" if "uncompressed" in r["label"] else "-"
        ax1.plot([p["bytes"] / 1e6 for p in pts], acc, marker="o", ms=3, linestyle=style, label=r["label"])
        ax2.plot([p["seconds"] for p in pts], acc, marker="o", ms=3, linestyle=style, label=r["label"])
    ax1.set_xscale("log")
    ax1.set_xlabel("MB sent + received per rank (log)")
    ax2.set_xlabel("training wall time (s)")
    low = min(100 * p["accuracy"] for r in results for p in r["curve"][1:])
    for ax in (ax1, ax2):
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(bottom=max(0.0, low - 2))
        ax.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated, from: {', '.join(METHODS)}")
    ap.add_argument("--rate", default="1gbit", help="link rate in tc syntax (default 1gbit)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400, help="training steps per method (default 400)")
    ap.add_argument("--batch", type=int, default=64, help="batch per rank and micro step (default 64)")
    ap.add_argument("--accumulate", type=int, default=1, help="micro steps per optimizer step (default 1)")
    ap.add_argument("--lamb", action="store_true",
                    help=f"the large-batch run: methods {','.join(LAMB_METHODS)}, --accumulate {LAMB_ACCUMULATE} "
                         "unless given, its own section of BENCHMARKS.md")
    ap.add_argument("--hidden", type=int, default=1024, help="MLP width: 784-H-H-10 (default 1024)")
    ap.add_argument("--evals", type=int, default=16, help="test evaluations per method (default 16)")
    ap.add_argument("--target", type=float, default=0.80, help="accuracy of the time-to-accuracy columns")
    ap.add_argument("--seed", type=int, default=0)
    add_cluster_options(ap, "bench_tta", "784-64-64-10, 60 steps, 2 evaluations, loopback")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.render:
        with open(args.render) as f:
            publish(json.load(f))
        return 0
    if args.lamb:
        if "--methods" not in argv:
            args.methods = ",".join(LAMB_METHODS)
        if "--accumulate" not in argv:
            args.accumulate = LAMB_ACCUMULATE
        if "--out" not in argv:
            args.out = args.out.replace("bench_tta.json", "bench_tta_lamb.json")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        ap.error(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    if args.quick:
        args.loopback, args.no_write = True, True
        args.steps, args.hidden, args.evals = min(args.steps, 60), min(args.hidden, 64), min(args.evals, 2)
    if args.steps < 1 or args.evals < 1 or args.evals > args.steps or args.ranks < 2 or args.accumulate < 1:
        ap.error("need --steps >= --evals >= 1, --ranks >= 2 and --accumulate >= 1")
    if not 0.0 < args.target < 1.0:
        ap.error(f"--target {args.target}: an accuracy in (0, 1), e.g. 0.8")
    started, load_before = time.time(), os.getloadavg()[0]
    results, shaped = run_methods(methods, args)
    net = f"{args.rate} links" if shaped else f"loopback (NOT shaped; asked for {args.rate})"
    params = results[0]["params"]
    what = (f"Fashion-MNIST, MLP 784-{args.hidden}-{args.hidden}-10 ({params:,} parameters), {args.ranks} ranks, "
            f"{net}, {args.steps} steps of batch {args.batch} per rank"
            + (f" x {args.accumulate} micro steps ({args.batch * args.accumulate * args.ranks} samples per step)"
               if args.accumulate > 1 else ""))
    result = {"argv": argv, "shaped": shaped, "what": what, "target": args.target, "lamb": args.lamb,
              "freeze": max(1, round(FREEZE_FRACTION * args.steps)), "results": results,
              "note": machine_note(started, load_before)}
    print(f"\n{what}\n{summary_table(results, args.target, shaped)}")
    return save_and_publish(result, args.out, publish, not args.no_write)


def run_methods(methods: Sequence[str], args) -> tuple:
    """Train ``methods`` on a fresh cluster of ``args.ranks`` ranks at ``args.rate``: (results, shaped)."""
    cls = LoopbackCluster if args.loopback else Cluster
    with tempfile.TemporaryDirectory(prefix="bench-tta-") as tmp:
        cfg = {k: getattr(args, k) for k in ("steps", "batch", "accumulate", "hidden", "evals", "seed", "timeout")}
        cfg.update(methods=list(methods), out=tmp)
        with cls(args.ranks, args.rate) as cluster:
            print(f"bench_tta: {cluster.describe()}", file=sys.stderr, flush=True)
            run_workers(cluster, __file__, cfg, tmp, args.timeout)
            shaped = cluster.shaped
        with open(os.path.join(tmp, "results.json")) as f:
            return json.load(f), shaped


def publish(result: dict) -> None:
    """Write the plot and this script's section of BENCHMARKS.md (the --lamb run has its own)."""
    lamb = result.get("lamb", False)
    name = f"{SECTION}_lamb" if lamb else SECTION
    png = img_path(f"{name}.png")
    results, shaped = result["results"], result["shaped"]
    plot(results, png, result["what"])
    title = ("Large batch: 1-bit LAMB against LAMB on Fashion-MNIST (scripts/bench_tta.py --lamb)" if lamb
             else "Time to accuracy on Fashion-MNIST (scripts/bench_tta.py)")
    section = "\n".join([
        f"## {title}", "",
        f"`python scripts/bench_tta.py {' '.join(result['argv'])}`".replace(" `", "`"), "",
        f"{result['what']}. Every method starts from the same weights and sees the same batches; learning rates are "
        f"constant ({ADAM_LR:g} for the Adam family, {SGD_LR:g} with momentum 0.9 for the SGD family, {LAMB_LR:g} "
        f"for LAMB); OneBitAdam, 1-bit LAMB and 0/1 Adam freeze their variance after {result['freeze']} steps (0/1 Adam then takes local "
        f"steps, the interval between synchronisations doubling every {round(LOCAL_STEP_FRACTION * 100)} % of the "
        "steps up to 16); top-k keeps 1 %. Test accuracy on the whole test set (split between the ranks, the synced "
        "model for SAEF and 0/1 Adam). Wall time: rank 0's training steps, "
        "evaluations excluded. MB per rank: what each rank hands to and receives from the collectives "
        "(`opt.stats`; one-way SPARS-AMS counts its own payload in what its all_gather returns; PowerSGD: the "
        "buffers its allreduces hand over and get back, by its own rule for which tensors it compresses, "
        f"uncompressed for its first {POWERSGD_START} steps)"
        + ("; wire MB: rank 0's veth during training, sent + received, headers included." if shaped else "."), "",
        summary_table(results, result["target"], shaped), "", *[f"- {line}" for line in notes(results)], "",
        f"![accuracy vs bytes and time]({rel(png)})", "",
        result["note"]])
    write_section(name, section)
    print(f"wrote the {name} section of BENCHMARKS.md and {rel(png)}")


if __name__ == "__main__":
    sys.exit(main())
