#!/usr/bin/env python3
"""Sharded optimizer state (shard_state=True): accuracy and step time next to unsharded CD-Adam.

Two parts, one run, side by side (the memory part is scripts/bench_memory.py's table):

- accuracy: Fashion-MNIST (scripts/bench_tta.py's model, data, steps and lr) for uncompressed
  AMSGrad, CD-Adam, sharded CD-Adam with the 1-bit downlink and with the bf16 downlink, over
  ``--seeds`` seeds on 2 ranks: mean and spread of the final test accuracy, bytes per rank
  and direction, and their ratio to fp32;
- step time (scripts/bench_step.py's 25M-parameter MLP) at 1 Gbit on 2 and 4 ranks: unsharded
  CD-Adam, sharded CD-Adam (1-bit and bf16 downlink) and DeepSpeed ZeRO-2 with its own AdamW
  (fp32 reduce-scatter), with the update phase split out: the sharded update runs on the
  rank's 1/n of the parameters.

    python scripts/bench_sharded.py              # writes BENCHMARKS.md's section and results/bench_sharded.json
    python scripts/bench_sharded.py --quick      # small model, loopback, writes nothing
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_step  # noqa: E402
import bench_tta  # noqa: E402
from _bench import add_cluster_options, machine_note, save_and_publish, table, write_section  # noqa: E402

SECTION = "bench_sharded"
ACCURACY_METHODS = ["amsgrad", "cdadam", "cdadam_sharded", "cdadam_sharded_bf16"]
STEP_METHODS = ["cdadam", "cdadam_sharded", "cdadam_sharded_bf16", "deepspeed_zero2"]


def accuracy(args) -> List[dict]:
    """One row per method: final accuracy over the seeds, bytes per direction."""
    runs = {m: [] for m in ACCURACY_METHODS}
    for seed in range(args.seeds):
        tta = argparse.Namespace(steps=args.steps, batch=64, hidden=args.hidden, evals=1, seed=seed,
                                 timeout=args.timeout, loopback=args.loopback, ranks=2, rate=args.rate)
        results, shaped = bench_tta.run_methods(ACCURACY_METHODS, tta)
        for r in results:
            runs[r["method"]].append(r)
    rows = []
    for name, seeds in runs.items():
        accs = [100 * r["curve"][-1]["accuracy"] for r in seeds]
        total = seeds[0]["curve"][-1]["bytes"]  # up + down over the run, the same every seed
        fp32 = seeds[0]["fp32_bytes"]
        rows.append({"method": name, "label": seeds[0]["label"], "mean": statistics.mean(accs),
                     "spread": (max(accs) - min(accs)) / 2, "accs": accs, "bytes": total, "fp32": fp32,
                     "ratio": 2 * fp32 / total if total else float("nan"), "shaped": shaped})
    return rows


def step_times(args) -> List[dict]:
    rows = []
    for n in args.ranks:
        step = argparse.Namespace(loopback=args.loopback, warmup=1, steps=args.step_steps, timeout=args.timeout)
        rows += bench_step.run_cell(n, args.rate, [args.size], STEP_METHODS, step)
    return rows


def accuracy_table(rows: List[dict]) -> str:
    base = next(r for r in rows if r["method"] == "cdadam")
    return table(["method", "test acc % (mean ± half-range)", "per seed", "vs CD-Adam (points)",
                  "MB per rank and direction", "fp32 / sent"],
                 [[r["label"], f"{r['mean']:.2f} ± {r['spread']:.2f}", " ".join(f"{a:.2f}" for a in r["accs"]),
                   f"{r['mean'] - base['mean']:+.2f}", f"{r['bytes'] / 2 / 1e6:.2f}", f"{r['ratio']:.1f}x"]
                  for r in rows])


def step_table(rows: List[dict]) -> str:
    out = []
    for n in sorted({r["n"] for r in rows}):
        sub = {r["method"]: r for r in rows if r["n"] == n}
        unsharded = sub["cdadam"]["update"]
        for name in STEP_METHODS:
            r = sub[name]
            taciturn_row = r["family"] == "taciturn"
            out.append([n, r["label"], f"{r['step']:.3f}", f"{r['compute']:.3f}", f"{r['comm']:.3f}",
                        f"{r['update']:.3f}" if taciturn_row else "(in comm)",
                        f"{unsharded / r['update']:.1f}x" if taciturn_row and r["update"] > 0 else "",
                        f"{r.get('wire', r['payload']) / 1e6:.2f}"])
    return table(["ranks", "method", "step s", "fwd+bwd s", "comm s", "update s", "update: unsharded / this",
                  "wire MB/step" if rows[0]["shaped"] else "payload MB/step"], out)


def publish(result: dict) -> None:
    acc, steps = result["accuracy"], result["steps"]
    net = "1 Gbit links" if acc[0]["shaped"] else "loopback (NOT shaped)"
    sharded, base = (next(r for r in acc if r["method"] == m) for m in ("cdadam_sharded", "cdadam"))
    verdict = (f"Goal (within 0.5 point of unsharded CD-Adam with the 1-bit downlink, at least 28x fewer bytes "
               f"than fp32 each way): {sharded['mean'] - base['mean']:+.2f} points at {sharded['ratio']:.1f}x: "
               + ("met." if sharded["mean"] >= base["mean"] - 0.5 and sharded["ratio"] >= 28 else "NOT met."))
    write_section(SECTION, "\n".join([
        "## Sharded optimizer state: accuracy and step time (scripts/bench_sharded.py)", "",
        f"`python scripts/bench_sharded.py {' '.join(result['argv'])}`".replace(" `", "`"), "",
        f"Accuracy: Fashion-MNIST, bench_tta's MLP 784-{result['hidden']}-{result['hidden']}-10, 2 ranks, {net}, "
        f"{result['steps_train']} steps of batch 64 per rank, lr 1e-3 for all, {result['seeds']} seeds (same "
        "seeds for every method: weights and batches). Bytes: each rank's collectives over the run, per direction "
        "(the sharded downlink carries the model change, compressed by the same block sign with error "
        "feedback on it, or cast to bf16).", "",
        accuracy_table(acc), "", verdict, "",
        f"Step time: bench_step's {result['size']}-parameter MLP (5 x Linear), batch 8, {net}; median of the "
        "slowest rank over the timed steps. comm = compression + the collectives' waits (taciturn), for DeepSpeed "
        "everything beyond `local`'s fwd+bwd and step (its reduce-scatter in backward, all-gather in step). "
        "update: taciturn's step minus its communication phase (the sharded update runs inside the exchange on "
        "the rank's chunk and is timed there).", "",
        step_table(steps), "",
        result["note"]]))
    print(f"wrote the {SECTION} section of BENCHMARKS.md")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400, help="training steps of the accuracy runs")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--size", default="25M", help="parameters of the step-time model")
    ap.add_argument("--ranks", default="2,4", help="rank counts of the step-time runs")
    ap.add_argument("--step-steps", type=int, default=3, help="timed steps per method")
    ap.add_argument("--rate", default="1gbit")
    add_cluster_options(ap, SECTION, "1 seed, 60 steps of a 784-64-64-10 MLP, a 300k step-time model, loopback")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            publish(json.load(f))
        return 0
    args.ranks = [int(n) for n in args.ranks.split(",")]
    if args.quick:
        args.loopback, args.no_write = True, True
        args.seeds, args.steps, args.hidden, args.size, args.ranks, args.step_steps = 1, 60, 64, "300k", [2], 1
    started, load = time.time(), os.getloadavg()[0]
    acc = accuracy(args)
    print(accuracy_table(acc))
    steps = step_times(args)
    print(step_table(steps))
    result = {"argv": argv, "accuracy": acc, "steps": steps, "hidden": args.hidden, "steps_train": args.steps,
              "seeds": args.seeds, "size": args.size, "note": machine_note(started, load)}
    return save_and_publish(result, args.out, publish, not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
