#!/usr/bin/env python3
"""Soak test: thousands of steps on 2 real gloo ranks; memory must stay flat and the ranks identical.

Each method trains a small MLP (784-128-10) on its rank's half of Fashion-MNIST for
``--steps`` steps (default 5,000). Every rank records its resident set size (RSS) after
construction, every ``--every`` steps and at the end. During the run the optimizer's own
divergence guard (``check_divergence_every=--every``) compares parameter checksums across
ranks; at the end each rank hashes (SHA-256) the tensors every rank must hold bit-identically:
the (synced) parameters and the per-parameter optimizer state other than the local momentum.
Memory counts as flat when no rank's RSS grew by more than FLAT_MIB over the second half of
the run: allocator and cache warm-up settles early, while a leak of 1 KiB per step would add
2.4 MiB over the last 2,500 of 5,000 steps. Exit status 1 if memory is not flat or the ranks'
hashes differ.

    python scripts/soak.py                      # CD-Adam and SPARS-AMS, 5,000 steps each
    python scripts/soak.py --methods cdadam,saef --steps 20000
    python scripts/soak.py --quick              # 200 steps, prints only (BENCHMARKS.md untouched)

Writes its section of BENCHMARKS.md (``<!-- soak:start/end -->``) and docs/img/soak_rss.png.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import img_path, machine_note, rel, rss_mb, run_ranks, table, write_section  # noqa: E402
from _datasets import fashion_mnist, shard  # noqa: E402

import taciturn  # noqa: E402

#: name -> (optimizer class, keyword arguments, label)
METHODS = {
    "cdadam": ("CDAdam", dict(lr=1e-3), "CD-Adam (block sign, Markov both ways)"),
    "sparsams": ("SparsAMS", dict(lr=1e-3, ratio=0.01), "SPARS-AMS (top-1%, EF, one-way)"),
    "distefsgdm": ("DistEFSGD", dict(lr=0.05, momentum=0.9, nesterov=True), "dist-EF-blockSGDM"),
    "saef": ("SAEFSGD", dict(lr=0.05, momentum=0.9, ratio=0.01), "SAEF (top-1%, DC)"),
}
#: RSS growth (MiB) over the second half of the run that still counts as flat
FLAT_MIB = 2.0
#: per-parameter state that differs between ranks by design (each worker's own momentum)
LOCAL_STATE = ("momentum_buffer",)


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def shared_digest(opt) -> str:
    """SHA-256 of what every rank must hold bit-identically: the synced parameters and their
    optimizer state (AMSGrad moments, SAEF's synced model), in a fixed order."""
    h = hashlib.sha256()
    tensors = list(opt.synced_tensors())
    for _, p in opt._trainable:
        st = opt.state.get(p, {})
        tensors += [st[k] for k in sorted(st) if torch.is_tensor(st[k]) and k not in LOCAL_STATE]
    for t in tensors:
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _soak_rank(rank: int, world_size: int, method: str, steps: int, every: int, batch: int, seed: int) -> dict:
    cls, kwargs, _ = METHODS[method]
    x, y = shard(fashion_mnist("train", flatten=True), world_size, rank)
    x_test, y_test = fashion_mnist("test", flatten=True)
    model = small_model(seed)
    opt = getattr(taciturn, cls)(model.parameters(), check_divergence_every=every, **kwargs)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    records = [dict(step=0, rss=rss_mb(), loss=float("nan"), seconds=0.0)]
    order, pos, loss_sum, loss_n = torch.randperm(len(x), generator=gen), 0, 0.0, 0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if pos + batch > len(x):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if step % every == 0 or step == steps:
            records.append(dict(step=step, rss=rss_mb(), loss=loss_sum / loss_n,
                                seconds=time.perf_counter() - start))
            loss_sum, loss_n = 0.0, 0
    elapsed = time.perf_counter() - start
    opt.check_divergence()
    synced = opt.synced_weights() if hasattr(opt, "synced_weights") else contextlib.nullcontext()
    with torch.no_grad(), synced:
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return dict(method=method, rank=rank, records=records, digest=shared_digest(opt), accuracy=accuracy,
                elapsed=elapsed, steps=opt.global_step, skipped=opt.stats.skipped_steps,
                bytes_up=opt.stats.bytes_up, bytes_down=opt.stats.bytes_down)


def half_record(records: list) -> dict:
    """The first record at or past half of the run's steps."""
    return next(r for r in records if r["step"] >= records[-1]["step"] / 2)


def verdict(ranks: list, judge_memory: bool = True) -> dict:
    """Memory growth per rank (second half of the run, first interval -> end, construction ->
    end) and identity. ``flat`` is None when memory is not judged (runs too short to tell a
    leak from warm-up)."""
    second_half = [r["records"][-1]["rss"] - half_record(r["records"])["rss"] for r in ranks]
    growth = [r["records"][-1]["rss"] - r["records"][1]["rss"] for r in ranks]
    total = [r["records"][-1]["rss"] - r["records"][0]["rss"] for r in ranks]
    identical = len({r["digest"] for r in ranks}) == 1
    flat = max(second_half) <= FLAT_MIB if judge_memory else None
    return dict(second_half=second_half, growth=growth, total=total, identical=identical, flat=flat)


def report(results: dict, steps: int, every: int, world_size: int, judge_memory: bool = True) -> str:
    lines = []
    summary = []
    for method, ranks in results.items():
        v = verdict(ranks, judge_memory)
        r0 = ranks[0]
        summary.append([METHODS[method][2], r0["steps"], f"{r0['accuracy'] * 100:.2f}",
                        " / ".join(f"{r['records'][0]['rss']:.1f}" for r in ranks),
                        " / ".join(f"{r['records'][1]['rss']:.1f}" for r in ranks),
                        " / ".join(f"{r['records'][-1]['rss']:.1f}" for r in ranks),
                        " / ".join(f"{g:+.2f}" for g in v["growth"]),
                        " / ".join(f"{g:+.2f}" for g in v["second_half"]),
                        {True: "yes", False: "NO", None: "not judged"}[v["flat"]],
                        "yes" if v["identical"] else "NO",
                        r0["digest"][:16],
                        f"{1000 * max(r['elapsed'] for r in ranks) / steps:.1f}"])
    per_rank = "/".join(f"r{r}" for r in range(world_size))
    lines.append(table(["method", "steps", "test acc %", f"RSS at start (MiB, {per_rank})", f"RSS at step {every}",
                        "RSS at the end", f"growth from step {every} (MiB)",
                        f"growth from step {half_record(ranks[0]['records'])['step']}", "flat", "ranks identical",
                        "SHA-256 (16 hex)", "ms/step"], summary))
    for method, ranks in results.items():
        steps_seen = [rec["step"] for rec in ranks[0]["records"]]
        rows = [[s] + [f"{r['records'][i]['rss']:.1f}" for r in ranks] + [f"{ranks[0]['records'][i]['loss']:.3f}"]
                for i, s in enumerate(steps_seen)]
        lines.append(f"\n{METHODS[method][2]}: RSS (MiB) per rank and mean training loss per interval\n")
        lines.append(table(["step"] + [f"rank {r}" for r in range(world_size)] + ["loss (rank 0)"], rows))
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for method, ranks in results.items():
        for r in ranks:
            recs = r["records"]
            ax.plot([x["step"] for x in recs], [x["rss"] for x in recs], marker=".",
                    label=f"{METHODS[method][2].split(' (')[0]}, rank {r['rank']}")
    ax.set_xlabel("step")
    ax.set_ylabel("resident set size (MiB)")
    ax.set_title("soak: RSS per rank (2 gloo ranks, MLP 784-128-10)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="cdadam,sparsams",
                    help=f"comma-separated, from {', '.join(METHODS)} (default: cdadam,sparsams)")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--every", type=int, default=500, help="steps between RSS records and divergence checks")
    ap.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before the ranks are killed")
    ap.add_argument("--quick", action="store_true",
                    help="200 steps, record every 50, memory not judged, do not write BENCHMARKS.md")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        ap.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.quick:
        args.steps, args.every = 200, 50
    if args.steps < 2 * args.every:
        ap.error(f"--steps {args.steps} must be at least 2 x --every {args.every} (to see a trend)")
    started, load = time.time(), os.getloadavg()[0]
    results = {}
    for m in methods:
        print(f"soak: {METHODS[m][2]}, {args.steps} steps on {args.world_size} gloo ranks ...", flush=True)
        results[m] = run_ranks(_soak_rank, args.world_size, m, args.steps, args.every, args.batch, args.seed,
                               timeout=args.timeout)
    judge = not args.quick
    text = report(results, args.steps, args.every, args.world_size, judge)
    print(text)
    verdicts = {m: verdict(r, judge) for m, r in results.items()}
    ok = all(v["flat"] is not False and v["identical"] for v in verdicts.values())
    print(f"soak: {'PASS' if ok else 'FAIL'} (flat = RSS growth over the second half of the run <= {FLAT_MIB} MiB "
          f"on every rank{'' if judge else ', not judged in a --quick run'}; identical = equal SHA-256 of the synced "
          "parameters and optimizer state)")
    if not args.quick:
        png = img_path("soak_rss.png")
        plot(results, png)
        write_section("soak", "\n".join([
            "## Soak: 5,000 steps, 2 ranks, memory and rank identity",
            "",
            f"`python scripts/soak.py --steps {args.steps} --every {args.every}`: {args.world_size} real gloo ranks "
            f"(forked, loopback, one torch thread each), MLP 784-128-10 on each rank's half of Fashion-MNIST, batch "
            f"{args.batch} per rank. RSS is each rank's resident set size (/proc/self/statm). During the run the "
            f"optimizer's divergence guard compares parameter checksums across ranks every {args.every} steps (it "
            "raises on the first difference); at the end every rank hashes its synced parameters and "
            "per-parameter optimizer state (everything but the local momentum) with SHA-256.",
            "",
            text,
            "",
            f"Verdict: **{'PASS' if ok else 'FAIL'}**. Flat means that no rank's RSS grew by more than {FLAT_MIB} "
            "MiB over the second half of the run: the one-time allocations (the gloo buffers, the optimizer state, "
            "the allocator's arenas and caches) settle in the first intervals, while a leak of 1 KiB per step would "
            f"add {args.steps / 2 / 1024:.1f} MiB over the second half.",
            "",
            f"![RSS per rank]({rel(png)})",
            "",
            machine_note(started, load),
        ]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
