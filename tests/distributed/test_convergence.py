"""CD-Adam learns Fashion-MNIST about as well as uncompressed AMSGrad on 2 real ranks.

MLP 784-256-10, 2 gloo ranks, each on its own shard, batch 64 per rank, lr 1e-3, the same
initial weights and sample order for every optimizer, every run of every seed in the same
processes; test accuracy on the 10000 test images every 25 steps. The accuracy "after STEPS
steps" is the mean of the evaluations in the last FINAL_WINDOW steps (single evaluations of
CD-Adam swing by about a point from one to the next), and the claims are on the mean over
SEEDS (initial weights and sample order), not on one lucky seed.

Measured with this exact setting (SEEDS 0, 1, 2; 2 shared cores: about 1 minute of CPU, 2 under
load): AMSGrad 85.65 % on average; CD-Adam with 1024-blocks (the default) behind by 1.79, 1.62
and 2.21 points (mean 1.87; 30.9x fewer bytes), hence MEAN_GAP 2.5 and WORST_GAP 3.0; with
256-blocks and the l2 scale (28.4x) behind by 0.64, 1.15 and 0.90 (mean 0.90), and with the
magnitude profile on top (TUNED, same bytes) by 0.27, 0.92 and 0.55 (mean 0.58; 0.35, 0.81 and
0.43 before the profile's weights kernel changed its rounding), hence TUNED_MEAN_GAP 1.0; the same
codec tracking each rank's momentum (MOMENTUM) by 0.24, 0.72 and 0.62 (mean 0.53), hence
MOMENTUM_MEAN_GAP 1.0: on this one-hidden-layer MLP at 600 steps the two are within the spread
(the gain is on deeper models and longer runs, BENCHMARKS.md "tracking the momentum"); with the
profile detrended on top (DETRENDED, same bytes) by 0.13, 0.67 and 0.50 (mean 0.43), closer on
every seed but within the same bound. SPARS-AMS's top-1 % (49.9x fewer bytes up, 25.0x down) at
this lr, which is not its best, trails by 2.29, 2.92 and 4.81 (mean 3.34); with momentum correction
(``momentum_correction=True``, same bytes) by 1.15, 1.40 and 1.17 (mean 1.24), hence SPARSE_MEAN_GAP
1.75 and a gain of at least 1 point asserted. Earlier, with seed 0 pinned and seeds 0..5 measured one at a time, the
default's gaps ranged over 1.0-2.5 points: one seed can miss a bound that the mean keeps. One
scale per tensor is clearly worse than 1024-blocks while learning: its mean accuracy over the
run is 4.5 points lower on seed 0 (2.5-4.9 on seeds 0..5; it catches up later: 0.2-0.6 points
behind after 2000 steps). scripts/bench_accuracy.py measures the gaps over 5 seeds with a second
hidden layer, each method at its best lr (BENCHMARKS.md "Accuracy parity").
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import taciturn
from _datasets import fashion_mnist, shard  # scripts/, on sys.path through tests/conftest.py

N, STEPS, EVERY, BATCH, LR = 2, 600, 25, 64, 1e-3
SEEDS = (0, 1, 2)  # initial weights; rank r draws its samples with seed r + 10 * seed
FINAL_WINDOW = 150  # steps: the accuracy "after STEPS steps" is the mean of the evaluations in it
MEAN_GAP = 2.5  # points: CD-Adam's mean over SEEDS may trail AMSGrad's by at most this
WORST_GAP = 3.0  # points: and no single seed by more
#: 256-element blocks with the l2 scale and the magnitude profile (the levers of BENCHMARKS.md
#: "Accuracy parity", 28.4x)
TUNED = dict(block_size=256, compressor_options={"scale": "l2", "profile": 0.99})
TUNED_MEAN_GAP = 1.0
#: the same codec on each rank's momentum instead of its gradient (``track="momentum"``)
MOMENTUM = dict(TUNED, track="momentum")
MOMENTUM_MEAN_GAP = 1.0
#: and with the profile taken around the results' recent mean (``profile_detrend``)
DETRENDED = dict(MOMENTUM, compressor_options=dict(TUNED["compressor_options"], profile_detrend=0.5))
#: SPARS-AMS's top-1 % with DGC's momentum correction and masking (``momentum_correction``, the same bytes)
SPARSE_MEAN_GAP = 1.75
RUNS = {"amsgrad": ("AMSGrad", {}), "blocks": ("CDAdam", {}), "tuned": ("CDAdam", TUNED),
        "momentum": ("CDAdam", MOMENTUM), "detrended": ("CDAdam", DETRENDED),
        "sparsams": ("SparsAMS", {}), "corrected": ("SparsAMS", {"momentum_correction": True}),
        "per_tensor": ("CDAdam", {"compressor": "scaled_sign"})}
#: the runs of every seed; the others (per tensor: 4 points behind, far from the 1.0 asserted) run on the first only
EVERY_SEED = ("amsgrad", "blocks", "tuned", "momentum", "detrended", "sparsams", "corrected")


def train_all(rank, n, train, test):
    x, y = shard(train, n, rank)
    x_test, y_test = test
    out = {}
    for seed in SEEDS:
        for label, (name, kwargs) in RUNS.items():
            if label not in EVERY_SEED and seed != SEEDS[0]:
                continue
            torch.manual_seed(seed)
            net = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
            opt = taciturn.create_optimizer(name, net.parameters(), lr=LR, **kwargs)
            order = torch.Generator().manual_seed(rank + 10 * seed)
            accuracy = {}
            for t in range(1, STEPS + 1):
                idx = torch.randint(0, len(x), (BATCH,), generator=order)
                opt.zero_grad()
                F.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
                if t % EVERY == 0:
                    with torch.no_grad():
                        accuracy[t] = 100.0 * (net(x_test).argmax(1) == y_test).float().mean().item()
            out[seed, label] = dict(accuracy=accuracy, bytes=opt.stats.bytes_up + opt.stats.bytes_down,
                                    weights=torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    return out


@pytest.fixture(scope="module")
def runs(run_ranks):
    return run_ranks(train_all, N, fashion_mnist("train", flatten=True), fashion_mnist("test", flatten=True),
                     timeout=600)


def final(acc):
    window = [a for t, a in acc.items() if t > STEPS - FINAL_WINDOW]
    return sum(window) / len(window)


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def test_ranks_agree(runs):
    for key in runs[0]:
        assert torch.equal(runs[0][key]["weights"], runs[1][key]["weights"]), key
        assert runs[0][key]["accuracy"] == runs[1][key]["accuracy"], key


def gaps_to_amsgrad(runs, label, record_property):
    """Per seed: AMSGrad's final accuracy minus ``label``'s; the byte ratio; a summary line."""
    ams = {s: final(runs[0][s, "amsgrad"]["accuracy"]) for s in SEEDS}
    cd = {s: final(runs[0][s, label]["accuracy"]) for s in SEEDS}
    gaps = {s: ams[s] - cd[s] for s in SEEDS}
    ratio = runs[0][SEEDS[0], "amsgrad"]["bytes"] / runs[0][SEEDS[0], label]["bytes"]
    record_property("amsgrad_accuracy", mean(ams.values()))
    record_property(f"{label}_accuracy", mean(cd.values()))
    record_property(f"{label}_gaps", gaps)
    record_property(f"{label}_byte_ratio", ratio)
    summary = ", ".join(f"seed {s}: AMSGrad {ams[s]:.2f}% {label} {cd[s]:.2f}%" for s in SEEDS)
    assert mean(ams.values()) > 84.0, f"AMSGrad reached only {mean(ams.values()):.2f}% ({summary})"
    return gaps, ratio, summary


def test_cdadam_close_to_amsgrad_with_28x_fewer_bytes(runs, record_property):
    gaps, ratio, summary = gaps_to_amsgrad(runs, "blocks", record_property)
    assert mean(gaps.values()) <= MEAN_GAP, f"CD-Adam trails by {mean(gaps.values()):.2f} points on average ({summary})"
    assert max(gaps.values()) <= WORST_GAP, f"one seed trails by {max(gaps.values()):.2f} points ({summary})"
    assert ratio >= 28.0, f"CD-Adam sent only {ratio:.1f}x fewer bytes than AMSGrad"


def test_tuned_blocks_closer_with_28x_fewer_bytes(runs, record_property):
    gaps, ratio, summary = gaps_to_amsgrad(runs, "tuned", record_property)
    default, _, _ = gaps_to_amsgrad(runs, "blocks", record_property)
    assert mean(gaps.values()) <= TUNED_MEAN_GAP, (
        f"CD-Adam {TUNED} trails by {mean(gaps.values()):.2f} points on average ({summary})")
    assert mean(gaps.values()) < mean(default.values()), "the tuned CD-Adam is not closer than the default"
    assert ratio >= 28.0, f"CD-Adam {TUNED} sent only {ratio:.1f}x fewer bytes than AMSGrad"


@pytest.mark.parametrize("label", ["momentum", "detrended"])
def test_tracked_momentum_close_to_amsgrad_with_the_same_bytes(label, runs, record_property):
    gaps, ratio, summary = gaps_to_amsgrad(runs, label, record_property)
    _, tuned_ratio, _ = gaps_to_amsgrad(runs, "tuned", record_property)
    assert mean(gaps.values()) <= MOMENTUM_MEAN_GAP, (
        f"CD-Adam {RUNS[label][1]} trails by {mean(gaps.values()):.2f} points on average ({summary})")
    assert ratio == tuned_ratio, f"{label}: the bytes differ from the plain profile's on the gradient"


def test_momentum_corrected_sparsams_close_to_amsgrad_with_the_same_bytes(runs, record_property):
    gaps, ratio, summary = gaps_to_amsgrad(runs, "corrected", record_property)
    plain, plain_ratio, _ = gaps_to_amsgrad(runs, "sparsams", record_property)
    assert mean(gaps.values()) <= SPARSE_MEAN_GAP, (
        f"SPARS-AMS with momentum correction trails by {mean(gaps.values()):.2f} points on average ({summary})")
    assert mean(gaps.values()) < mean(plain.values()) - 1.0, (
        f"momentum correction: {mean(gaps.values()):.2f} points behind, the paper's SPARS-AMS {mean(plain.values()):.2f}")
    assert ratio == plain_ratio, "momentum correction changed SPARS-AMS's bytes"


def test_one_scale_per_tensor_worse_than_blocks(runs, record_property):
    over_run = lambda acc: sum(acc.values()) / len(acc)
    seed = SEEDS[0]
    blocks, per_tensor = runs[0][seed, "blocks"]["accuracy"], runs[0][seed, "per_tensor"]["accuracy"]
    record_property("blocks_mean_accuracy", over_run(blocks))
    record_property("per_tensor_mean_accuracy", over_run(per_tensor))
    assert over_run(per_tensor) <= over_run(blocks) - 1.5, (
        f"per tensor {over_run(per_tensor):.2f}% vs 1024-blocks {over_run(blocks):.2f}% (mean over the run)")
    below = sum(per_tensor[t] < blocks[t] for t in blocks)
    assert below >= 0.75 * len(blocks), f"per tensor below blocks at only {below} of {len(blocks)} evaluations"
