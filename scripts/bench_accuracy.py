#!/usr/bin/env python3
"""Accuracy parity on Fashion-MNIST (issue #18): the 1-bit and sparse methods against their
uncompressed baselines at the same number of steps, each at its best learning rate from the
same small grid, mean and spread over several seeds; and an ablation of CD-Adam's and
SPARS-AMS's parts (directions, feedback on each side, block size, scale, early steps,
AMSGrad's running max).

Each seed runs every (method, lr) on n = 2 real gloo ranks (forked, one torch thread each,
loopback: ``_launch.run_ranks``); every method starts from the same weights (the seed) and sees
the same batches (seed * 1000 + rank) on its rank's half of the training set, batch 64 per rank,
MLP 784-256-256-10 (ReLU), constant learning rates. Accuracy "after S steps": the mean test
accuracy (the whole test set, split between the ranks) of the evaluations every 25 steps in the
last 150 steps (single evaluations of a 1-bit run swing by about a point). OneBitAdam freezes
its variance after 15 % of the steps. Bytes: what each rank hands to the worker-to-server
collective (up) and gets from the server-to-worker one (down), per step, against fp32's 4 bytes
per parameter per direction. The default run is 45 distinct (method, lr) runs per seed, about
5 minutes per seed on 2 shared cores.

    python scripts/bench_accuracy.py             # 5 seeds, lr grid 3e-4,1e-3,3e-3: results/, BENCHMARKS.md, plot
    python scripts/bench_accuracy.py --grid 0.0001,0.01 --ablation '' --out results/edges.json --no-write
                                                 # the grid's edges (BENCHMARKS.md's table merges such runs)
    python scripts/bench_accuracy.py --seeds 2 --steps 300 --no-write
    python scripts/bench_accuracy.py --model cnn --final amsgrad,cdadam --ablation ''   # the small CNN (own section)
    python scripts/bench_accuracy.py --steps 1500 --final amsgrad,cdadam --ablation ''  # longer runs (own section)
    python scripts/bench_accuracy.py --steps 1500 --rate 1gbit --final amsgrad,cdadam --ablation ''
                                                 # ranks on 1 Gbit/s links: a training-time column (own section)
    python scripts/bench_accuracy.py --quick     # smoke run: tiny MLP, 60 steps, 1 seed, writes only --out
    python scripts/bench_accuracy.py --render results/bench_accuracy.json
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

from _bench import (ROOT, cnn, img_path, join_cluster, machine_note, mlp, read_rank_results, rel,  # noqa: E402
                    run_ranks, run_workers, save_and_publish, table, write_rank_result, write_section)
from netcluster import Cluster, parse_rate  # noqa: E402

SECTION = "bench_accuracy"
GRID = (3e-4, 1e-3, 3e-3)
ABLATION_LR = 1e-3
STEPS = 600
CHANNELS = (8, 16)
FREEZE_FRACTION = 0.15
WINDOW, EVERY = 150, 25

#: the magnitude profile around the results' own recent mean (``profile_detrend``)
DETRENDED = {"scale": "l2", "profile": 0.99, "profile_detrend": 0.5}
#: name -> (label, registry name, keyword arguments, baseline name)
FINAL: Dict[str, tuple] = {
    "amsgrad": ("AMSGrad (uncompressed)", "AMSGrad", {}, None),
    "cdadam": ("CD-Adam (1024-blocks)", "CDAdam", {}, "amsgrad"),
    "cdadam_b256": ("CD-Adam (256-blocks)", "CDAdam", dict(block_size=256), "amsgrad"),
    "cdadam_b128": ("CD-Adam (128-blocks)", "CDAdam", dict(block_size=128), "amsgrad"),
    "cdadam_l2": ("CD-Adam (1024-blocks, l2 scale)", "CDAdam", dict(compressor_options={"scale": "l2"}), "amsgrad"),
    "cdadam_l2_b256": ("CD-Adam (256-blocks, l2 scale)", "CDAdam",
                       dict(block_size=256, compressor_options={"scale": "l2"}), "amsgrad"),
    "cdadam_profile_b256": ("CD-Adam (256-blocks, l2 scale, magnitude profile)", "CDAdam",
                            dict(block_size=256, compressor_options={"scale": "l2", "profile": 0.99}), "amsgrad"),
    "cdadam_profile_b392": ("CD-Adam (392-blocks, l2 scale, magnitude profile)", "CDAdam",
                            dict(block_size=392, compressor_options={"scale": "l2", "profile": 0.99}), "amsgrad"),
    "cdadam_profile": ("CD-Adam (1024-blocks, l2 scale, magnitude profile)", "CDAdam",
                       dict(compressor_options={"scale": "l2", "profile": 0.99}), "amsgrad"),
    "cdadam_momentum": ("CD-Adam (1024-blocks, momentum tracked)", "CDAdam", dict(track="momentum"), "amsgrad"),
    "cdadam_momentum_b256": ("CD-Adam (256-blocks, l2 scale, magnitude profile, momentum tracked)", "CDAdam",
                             dict(block_size=256, compressor_options={"scale": "l2", "profile": 0.99},
                                  track="momentum"), "amsgrad"),
    "cdadam_momentum_b392": ("CD-Adam (392-blocks, l2 scale, magnitude profile, momentum tracked)", "CDAdam",
                             dict(block_size=392, compressor_options={"scale": "l2", "profile": 0.99},
                                  track="momentum"), "amsgrad"),
    "cdadam_momentum_b256_detrend": ("CD-Adam (256-blocks, l2 scale, detrended profile, momentum tracked)",
                                     "CDAdam", dict(block_size=256, compressor_options=DETRENDED, track="momentum"),
                                     "amsgrad"),
    "cdadam_momentum_b392_detrend": ("CD-Adam (392-blocks, l2 scale, detrended profile, momentum tracked)",
                                     "CDAdam", dict(block_size=392, compressor_options=DETRENDED, track="momentum"),
                                     "amsgrad"),
    "sparsams": ("SPARS-AMS (top-1%)", "SparsAMS", {}, "amsgrad"),
    "sparsams_2pct": ("SPARS-AMS (top-2%)", "SparsAMS", dict(ratio=0.02), "amsgrad"),
    "sparsams_bf16": ("SPARS-AMS (top-2%, bf16 values, 16-bit indices)", "SparsAMS",
                      dict(ratio=0.02, compressor_options={"encoding": "bf16"}), "amsgrad"),
    "sparsams_bf16_4pct": ("SPARS-AMS (top-4%, bf16 values, 16-bit indices)", "SparsAMS",
                           dict(ratio=0.04, compressor_options={"encoding": "bf16"}), "amsgrad"),
    "sparsams_mc": ("SPARS-AMS (top-1%, momentum correction)", "SparsAMS", dict(momentum_correction=True),
                    "amsgrad"),
    "sparsams_mc_bf16": ("SPARS-AMS (top-2%, bf16, momentum correction)", "SparsAMS",
                         dict(ratio=0.02, compressor_options={"encoding": "bf16"}, momentum_correction=True),
                         "amsgrad"),
    "adam": ("Adam (uncompressed)", "Adam", {}, None),
    "onebit_adam": ("OneBitAdam warm-up Adam (variance_floor 0.1, default)", "OneBitAdam",
                    dict(warmup="adam"), "adam"),
    "onebit_adam_floor0": ("OneBitAdam warm-up Adam, variance_floor 0 (Tang et al.)", "OneBitAdam",
                           dict(warmup="adam", variance_floor=0.0), "adam"),
    "onebit_cdadam": ("OneBitAdam warm-up CD-Adam", "OneBitAdam", dict(warmup="cdadam"), "adam"),
}
#: the ablation, all at ABLATION_LR: name -> (label, registry name, keyword arguments)
ABLATION: Dict[str, tuple] = {
    "amsgrad": ("AMSGrad (uncompressed)", "AMSGrad", {}),
    "cdadam": ("CD-Adam: Markov both ways, 1024-blocks, l1 scale", "CDAdam", {}),
    "cd_oneway": ("one-way (workers' Markov, no server recompression)", "CompressedAMSGrad",
                  dict(two_way=False)),
    "cd_server_ef": ("server EF instead of Markov", "CompressedAMSGrad", dict(server_feedback="ef")),
    "cd_server_none": ("server without feedback", "CompressedAMSGrad", dict(server_feedback="none")),
    "ef_amsgrad": ("EF both ways (EF-AMSGrad)", "EFAMSGrad", {}),
    "naive": ("no feedback either side", "NaiveAMSGrad", {}),
    "cd_b256": ("256-blocks", "CDAdam", dict(block_size=256)),
    "cd_b128": ("128-blocks", "CDAdam", dict(block_size=128)),
    "cd_tensor": ("one scale per tensor", "CDAdam", dict(block_size=None)),
    "cd_l2": ("l2 scale (DeepSpeed's)", "CDAdam", dict(compressor_options={"scale": "l2"})),
    "sparsams": ("SPARS-AMS: top-1%, worker EF, one-way", "SparsAMS", {}),
    "sparsams_two_way": ("SPARS-AMS two-way (server top-k + EF)", "CompressedAMSGrad",
                         dict(compressor="topk", ratio=0.01, worker_feedback="ef", server_feedback="ef",
                              two_way=True)),
    "sparsams_2pct": ("SPARS-AMS top-2%", "SparsAMS", dict(ratio=0.02)),
    "adam": ("Adam (uncompressed)", "Adam", {}),
    "onebit_floor0": ("OneBitAdam warm-up Adam, variance_floor 0", "OneBitAdam",
                      dict(warmup="adam", variance_floor=0.0)),
    "onebit_floor001": ("variance_floor 0.01", "OneBitAdam", dict(warmup="adam", variance_floor=0.01)),
    "onebit_floor003": ("variance_floor 0.03", "OneBitAdam", dict(warmup="adam", variance_floor=0.03)),
    "onebit_floor01": ("variance_floor 0.1 (default)", "OneBitAdam", dict(warmup="adam")),
    "onebit_floor03": ("variance_floor 0.3", "OneBitAdam", dict(warmup="adam", variance_floor=0.3)),
    "onebit_floor1": ("variance_floor 1", "OneBitAdam", dict(warmup="adam", variance_floor=1.0)),
}


# ---------------------------------------------------------------------- inside a rank
def _evals(steps: int) -> List[int]:
    window = [t for t in range(steps - WINDOW + EVERY, steps + 1, EVERY) if t > 0]
    early = [t for t in (50, 100) if t < steps]
    return sorted(set(early + window + [steps]))


def _vhat_mean(opt) -> Optional[float]:
    """Mean of AMSGrad's running max v^ over the parameters (None without one)."""
    total, count = 0.0, 0
    for group in opt.param_groups:
        for p in group["params"]:
            v = opt.state[p].get("max_exp_avg_sq")
            if v is not None:
                total, count = total + v.double().sum().item(), count + v.numel()
    return total / count if count else None


def train_rank(rank: int, n: int, runs: Sequence[dict], cfg: dict) -> list:
    """Every run of ``runs`` (dicts: key, optimizer, kwargs, lr) for seed ``cfg["seed"]``."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import taciturn
    from _datasets import fashion_mnist, shard

    flatten = cfg.get("model", "mlp") == "mlp"
    x, y = shard(fashion_mnist("train", flatten=flatten), n, rank)
    x_test, y_test = shard(fashion_mnist("test", flatten=flatten), n, rank)
    steps, evals = cfg["steps"], _evals(cfg["steps"])
    out = []
    for run in runs:
        kwargs = dict(run["kwargs"], lr=run["lr"])
        if run["optimizer"] == "OneBitAdam":
            kwargs["freeze_step"] = max(1, round(FREEZE_FRACTION * steps))
        model = mlp(cfg["seed"], cfg["widths"]) if flatten else cnn(cfg["seed"], cfg["widths"])
        opt = taciturn.create_optimizer(run["optimizer"], model.parameters(), **kwargs)
        gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
        curve, seconds = {}, 0.0
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(x), (cfg["batch"],), generator=gen)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            seconds += time.perf_counter() - t0
            if step in evals:
                with torch.no_grad():
                    correct = torch.tensor([float((model(x_test).argmax(1) == y_test).sum()), float(len(y_test))])
                dist.all_reduce(correct)
                curve[step] = (correct[0] / correct[1]).item()
        s = opt.stats
        numel = sum(p.numel() for p in model.parameters())
        weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        out.append(dict(key=run["key"], lr=run["lr"], curve=curve, numel=numel, steps=steps,
                        bytes_up=s.bytes_up, bytes_down=s.bytes_down, fp32_bytes=s.fp32_bytes,
                        skipped=s.skipped_steps, seconds=seconds, vhat=_vhat_mean(opt),
                        checksum=float(weights.double().sum()), finite=bool(torch.isfinite(weights).all())))
    return out


# ---------------------------------------------------------------------- the orchestrator
def window_accuracy(curve: dict, steps: int) -> float:
    window = [a for t, a in curve.items() if int(t) > steps - WINDOW]
    return sum(window) / len(window)


def _spec(name: str, table_: str) -> tuple:
    entry = (FINAL if table_ == "final" else ABLATION)[name]
    return entry[1], entry[2]


def plan(final: Sequence[str], ablation: Sequence[str], grid: Sequence[float]) -> List[dict]:
    """The distinct (optimizer, kwargs, lr) runs of both tables, each once."""
    runs, seen = [], set()

    def add(optimizer, kwargs, lr):
        key = json.dumps([optimizer, kwargs, lr], sort_keys=True)
        if key not in seen:
            seen.add(key)
            runs.append(dict(key=key, optimizer=optimizer, kwargs=kwargs, lr=lr))
    for name in final:
        for lr in grid:
            add(*_spec(name, "final"), lr)
    for name in ablation:
        add(*_spec(name, "ablation"), ABLATION_LR)
    return runs


def run_all(runs: List[dict], cfg: dict, seeds: int, timeout: float, rate: Optional[str] = None) -> tuple:
    """(key -> one result per seed (rank 0's; the ranks are checked to agree), the network, whether
    its links were shaped).
    ``rate``: run the ranks in a cluster of network namespaces joined by links of that rate
    (scripts/netcluster.py), so each run's training time includes its collectives at that rate."""
    out: Dict[str, list] = {r["key"]: [] for r in runs}
    cluster = contextlib.nullcontext() if rate is None else Cluster(cfg["ranks"], rate)
    with cluster, tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        net, shaped = ("loopback", False) if rate is None else (cluster.describe(), cluster.shaped)
        for seed in range(seeds):
            started = time.time()
            if rate is None:
                ranks = run_ranks(train_rank, cfg["ranks"], runs, dict(cfg, seed=seed), timeout=timeout)
            else:
                ranks = _run_in_cluster(cluster, runs, dict(cfg, seed=seed, timeout=timeout), tmp)
            for a, b in zip(ranks[0], ranks[1:][0] if len(ranks) > 1 else ranks[0]):
                a["ranks_agree"] = a["checksum"] == b["checksum"] and a["curve"] == b["curve"]
                out[a["key"]].append(a)
            print(f"bench_accuracy: seed {seed} done in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return out, net, shaped


def _run_in_cluster(cluster, runs: List[dict], cfg: dict, tmp: str) -> list:
    """One seed's runs on the cluster's ranks (this script's ``--worker``): every rank's results."""
    run_workers(cluster, __file__, dict(cfg, runs=runs, out=tmp), tmp, cfg["timeout"])
    return [[dict(run, curve={int(k): v for k, v in run["curve"].items()}) for run in rank]
            for rank in read_rank_results(tmp, cfg["ranks"])]


def worker(cfg_path: str) -> None:
    """One rank of ``_run_in_cluster`` (torchrun's variables from the cluster)."""
    import torch.distributed as dist

    cfg = join_cluster(cfg_path)
    rank = dist.get_rank()
    results = train_rank(rank, dist.get_world_size(), cfg["runs"], cfg)
    write_rank_result(cfg["out"], rank, results)
    dist.barrier()
    dist.destroy_process_group()


def _stats(values: Sequence[float]) -> tuple:
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd, min(values), max(values)


def summarize(results: Dict[str, list], key: str) -> dict:
    per_seed = results[key]
    steps = per_seed[0]["steps"]
    acc = [window_accuracy(r["curve"], steps) if r["finite"] else 0.1 for r in per_seed]
    r0 = per_seed[0]
    up, down = r0["bytes_up"] / steps, r0["bytes_down"] / steps
    fp32 = r0["fp32_bytes"] / steps
    early = [r["curve"].get(100, r["curve"].get("100")) for r in per_seed]
    train_s = sum(r["seconds"] for r in per_seed) / len(per_seed)
    return dict(acc=acc, mean=_stats(acc)[0], sd=_stats(acc)[1], lo=min(acc), hi=max(acc),
                up=up, down=down, fp32=fp32, ratio_up=fp32 / up if up else float("inf"),
                ratio_down=fp32 / down if down else float("inf"), skipped=sum(r["skipped"] for r in per_seed),
                diverged=sum(not r["finite"] or r["skipped"] > 0 for r in per_seed),
                early=None if None in early else sum(early) / len(early),
                vhat=None if r0["vhat"] is None else sum(r["vhat"] for r in per_seed) / len(per_seed),
                ms=1000 * train_s / steps, train_s=train_s,
                agree=all(r.get("ranks_agree", True) for r in per_seed))


def _key(optimizer, kwargs, lr) -> str:
    return json.dumps([optimizer, kwargs, lr], sort_keys=True)


def final_rows(result: dict) -> List[dict]:
    """Per FINAL method: every lr of the grid summarised, the best one picked (highest mean)."""
    rows = []
    for name in result["final"]:
        label, optimizer, kwargs, base = FINAL[name]
        per_lr = {lr: summarize(result["results"], _key(optimizer, kwargs, lr)) for lr in result["grid"]
                  if _key(optimizer, kwargs, lr) in result["results"]}
        best = max(per_lr, key=lambda lr: per_lr[lr]["mean"])
        rows.append(dict(name=name, label=label, base=base, lr=best, per_lr=per_lr, **per_lr[best]))
    return rows


def _pm(s: dict) -> str:
    return f"{100 * s['mean']:.2f} ± {100 * s['sd']:.2f}"


def _ratio(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.1f}x"


def final_table(rows: List[dict], seeds: int, rate: Optional[str] = None) -> str:
    """``rate``: the runs' links (``--rate``), which adds each method's training time."""
    by = {r["name"]: r for r in rows}
    grid_ = sorted({lr for r in rows for lr in r["per_lr"]})
    out = []
    for r in rows:
        base = by.get(r["base"])
        gap = f"{100 * (r['mean'] - base['mean']):+.2f}" if base else ""
        lrs = " / ".join(f"{100 * r['per_lr'][lr]['mean']:.2f}" if lr in r["per_lr"] else "-" for lr in grid_)
        div = f" ({r['diverged']} of {seeds} diverged)" if r["diverged"] else ""
        out.append([r["label"], f"{r['lr']:g}", _pm(r) + div, f"{100 * r['lo']:.2f} – {100 * r['hi']:.2f}", gap,
                    f"{r['up']:,.0f} / {r['down']:,.0f}", f"{_ratio(r['ratio_up'])} / {_ratio(r['ratio_down'])}",
                    *([f"{r['train_s']:.1f}"] if rate else []), lrs])
    grid = " / ".join(f"{lr:g}" for lr in grid_)
    return table(["method", "best lr", f"test acc % (mean ± std, {seeds} seeds)", "min – max",
                  "vs its baseline (points)", "bytes/step up / down", "fewer than fp32 (up / down)",
                  *([f"training s at {rate} (best lr, mean of seeds)"] if rate else []),
                  f"mean acc % at lr {grid}"], out)


def ablation_table(result: dict) -> str:
    res = result["results"]
    bases = {b: summarize(res, _key(b, {}, ABLATION_LR)) for b in ("AMSGrad", "Adam")
             if _key(b, {}, ABLATION_LR) in res}
    out = []
    for name in result["ablation"]:
        label, optimizer, kwargs = ABLATION[name]
        s = summarize(res, _key(optimizer, kwargs, ABLATION_LR))
        base = bases.get("Adam" if optimizer in ("OneBitAdam", "Adam") else "AMSGrad")
        if base is None:
            continue
        if s["diverged"]:
            label += f" ({s['diverged']} of {len(s['acc'])} diverged)"
        vhat = f"{s['vhat'] / base['vhat']:.2f}" if s["vhat"] and base["vhat"] else ""
        early = f"{100 * s['early']:.2f}" if s["early"] is not None else ""
        out.append([label, _pm(s), f"{100 * (s['mean'] - base['mean']):+.2f}", early,
                    f"{_ratio(s['ratio_up'])} / {_ratio(s['ratio_down'])}", vhat, f"{s['ms']:.1f}"])
    seeds = len(res[next(iter(res))])
    return table(["variant (lr %g)" % ABLATION_LR, f"test acc % (mean ± std, {seeds} seeds)",
                  "vs AMSGrad (OneBitAdam: vs Adam)",
                  "acc % at step 100", "fewer bytes than fp32 (up / down)", "mean v^ / AMSGrad's", "ms/step"], out)


def plot(rows: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for r in rows:
        if r["diverged"] == len(r["acc"]):
            continue
        ax.errorbar([r["up"] + r["down"]], [100 * r["mean"]], yerr=[[100 * (r["mean"] - r["lo"])],
                                                                     [100 * (r["hi"] - r["mean"])]],
                    marker="o" if r["base"] else "s", capsize=3, label=f"{r['label']} (lr {r['lr']:g})")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per step per rank, up + down (log)")
    ax.set_ylabel("test accuracy % (mean, min-max over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title.replace(" parameters), ", " parameters),\n"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _variant(model: str, steps: int, widths: Sequence[int] = CHANNELS, rate: Optional[str] = None) -> List[tuple]:
    """What sets a run apart from the default one (the MLP at the default steps on loopback), as
    (name, title) pairs: its section, plot and results file are ``<section>_<name>...``."""
    if model == "cnn" and tuple(widths) != CHANNELS:
        tag = [(f"cnn{widths[0]}x{widths[1]}", f"CNN {widths[0]}/{widths[1]} channels")]
    else:
        tag = [(model, model.upper())] if model != "mlp" else []
    return tag + ([(f"{steps}steps", f"{steps} steps")] if steps != STEPS else []) + \
        ([(rate, f"{rate} links")] if rate else [])


def _section(model: str, steps: int, widths: Sequence[int] = CHANNELS, rate: Optional[str] = None) -> str:
    return SECTION + "".join(f"_{name}" for name, _ in _variant(model, steps, widths, rate))


def describe(result: dict) -> str:
    w = result["widths"]
    model = (f"MLP {'-'.join(map(str, w))}" if result.get("model", "mlp") == "mlp" else
             f"CNN conv5x5-{w[0]}, pool, conv5x5-{w[1]}, pool, linear {w[1] * 49}-10")
    return (f"Fashion-MNIST, {model} ({result['numel']:,} parameters), {result['ranks']} gloo "
            f"ranks ({result.get('net', 'loopback')}), {result['steps']} steps of batch {result['batch']} per rank, "
            f"{result['seeds']} seed(s)")


def _rate(result: dict) -> Optional[str]:
    """The links' rate when the runs went through shaped links (a time column), else None."""
    return result.get("rate") if result.get("shaped") else None


def print_tables(result: dict) -> None:
    rows = final_rows(result)
    print(f"\n{describe(result)}\n\nFinal (best lr of {', '.join(f'{lr:g}' for lr in result['grid'])}):\n"
          f"{final_table(rows, result['seeds'], _rate(result))}\n\n"
          f"Ablation (lr {ABLATION_LR:g}):\n{ablation_table(result)}")


def publish(result: dict) -> None:
    rows = final_rows(result)
    model, steps = result.get("model", "mlp"), result["steps"]
    section = _section(model, steps, result["widths"], _rate(result))
    title = "".join(f", {title}" for _, title in _variant(model, steps, result["widths"], _rate(result)))
    png = img_path(f"{section}.png")
    plot(rows, png, describe(result))
    commands = [result["argv"]] + result.get("parts", [])
    runs = ["`python scripts/bench_accuracy.py" + "".join(f" {a}" if a else " ''" for a in argv) + "`"
            for argv in commands]
    text = "\n".join([
        f"## Accuracy parity on Fashion-MNIST{title} (scripts/bench_accuracy.py)", "",
        " + ".join(runs) + (" (merged into one results file)" if len(runs) > 1 else ""), "",
        f"{describe(result)}. Every method starts from the same weights and sees the same batches (per seed); "
        "constant learning rates; each method at its best lr of the grid "
        f"{', '.join(f'{lr:g}' for lr in result['grid'])} "
        f"(the highest mean over the seeds). Accuracy: the mean test accuracy of the evaluations every {EVERY} "
        f"steps in the last {WINDOW} steps, whole test set; ± is the sample std over the seeds. OneBitAdam "
        f"freezes its variance after {round(FREEZE_FRACTION * result['steps'])} steps (15 %); its bytes include "
        "the fp32 warm-up. A diverged run counts as 10 % (chance).", "",
        final_table(rows, result["seeds"], _rate(result)), "",
        *([f"Ablation at lr {ABLATION_LR:g} (CD-Adam's and SPARS-AMS's parts, one changed at a time; same seeds). "
           "\"mean v^ / AMSGrad's\": AMSGrad's running max of the squared (compressed) gradient averaged over the "
           "parameters at the end, against uncompressed AMSGrad's: compression noise inflates it, which shrinks the "
           "steps.", "", ablation_table(result), ""] if result["ablation"] else []),
        *[f"- {line}" for line in result.get("findings", [])], "",
        f"![accuracy vs bytes]({rel(png)})", "",
        result["note"]])
    write_section(section, text)
    print(f"wrote the {section} section of BENCHMARKS.md and {rel(png)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--final", default=",".join(FINAL), help=f"final-table methods, from: {', '.join(FINAL)}")
    ap.add_argument("--ablation", default=",".join(ABLATION), help=f"ablation variants, from: {', '.join(ABLATION)}"
                    " ('' for none)")
    ap.add_argument("--grid", default=",".join(f"{lr:g}" for lr in GRID), help="learning rates of the final table")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=STEPS, help=f"steps per run (default {STEPS}; another count "
                    "has its own section)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                    help="mlp: 784-H-H-10; cnn: two 5x5 convolutions of 8 and 16 channels (its own section)")
    ap.add_argument("--hidden", type=int, default=256, help="MLP 784-H-H-10 (default 256)")
    ap.add_argument("--channels", default=",".join(map(str, CHANNELS)),
                    help="the CNN's two convolutions' channels (default 8,16; others have their own section)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rate", default=None, help="run the ranks in network namespaces joined by links of this rate "
                    "(tc syntax, e.g. 1gbit; needs root, else loopback, said so) and add each method's training "
                    "time to the final table (default: loopback, no time column)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run: MLP 784-32-32-10, 160 steps, 1 seed, lr 1e-3, "
                    "4 methods; writes only --out")
    ap.add_argument("--out", default=None, help="results JSON (default results/bench_accuracy.json, "
                    "results/bench_accuracy_quick.json with --quick)")
    ap.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md and docs/img/ alone")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per seed before the ranks are stopped")
    ap.add_argument("--render", metavar="JSON", help="print the tables, rewrite the section and plot, no runs")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        print_tables(result)
        if not args.no_write:
            publish(result)
        return 0
    if args.quick:
        args.no_write = True
        args.seeds, args.steps, args.hidden, args.grid = 1, min(args.steps, 160), min(args.hidden, 32), "0.001"
        args.final, args.ablation = "amsgrad,cdadam,adam,onebit_adam", "amsgrad,cdadam,cd_b256,adam,onebit_floor0"
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        channels = ()
    if len(channels) != 2 or min(channels) < 1:
        ap.error(f"--channels {args.channels!r}: give two positive counts, e.g. 32,64")
    if args.rate is not None:
        try:
            parse_rate(args.rate)
        except ValueError as e:
            ap.error(f"--rate: {e}")
    widths = (784, args.hidden, args.hidden, 10) if args.model == "mlp" else channels
    out = args.out or os.path.join(ROOT, "results", f"{SECTION}_quick.json" if args.quick else
                                   f"{_section(args.model, args.steps, widths, args.rate)}.json")
    final = [m for m in args.final.split(",") if m]
    ablation = [m for m in args.ablation.split(",") if m]
    unknown = [m for m in final if m not in FINAL] + [m for m in ablation if m not in ABLATION]
    if unknown or not final:
        ap.error(f"unknown or no method(s): {unknown}")
    grid = [float(v) for v in args.grid.split(",")]
    if args.steps < 2 * WINDOW // 1 and not args.quick:
        ap.error(f"--steps must be >= {2 * WINDOW}")
    if args.ranks < 2 or args.seeds < 1:
        ap.error("need --ranks >= 2 and --seeds >= 1")
    cfg = dict(steps=args.steps, batch=args.batch, widths=widths, ranks=args.ranks, model=args.model)
    started, load_before = time.time(), os.getloadavg()[0]
    runs = plan(final, ablation, grid)
    print(f"bench_accuracy: {len(runs)} runs x {args.seeds} seed(s)", file=sys.stderr, flush=True)
    results, net, shaped = run_all(runs, cfg, args.seeds, args.timeout, args.rate)
    first = next(iter(results.values()))[0]
    result = dict(argv=argv, final=final, ablation=ablation, grid=grid, seeds=args.seeds, steps=args.steps,
                  batch=args.batch, widths=widths, ranks=args.ranks, model=args.model, numel=first["numel"],
                  rate=args.rate, net=net, shaped=shaped,
                  results=results, note=machine_note(started, load_before))
    print_tables(result)
    if not all(r.get("ranks_agree", True) for rs in results.values() for r in rs):
        print("bench_accuracy: the ranks disagree", file=sys.stderr)
        return 1
    return save_and_publish(result, out, publish, not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
