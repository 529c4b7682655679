"""scripts/scaling_model.py: the alpha-beta cost formulas, the two-tier rules, the methods'
bytes, and that ``--quick`` runs in seconds, prints the prediction table and writes nothing."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

import scaling_model as sm  # scripts/, on sys.path through tests/conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GB = 1e9
T = sm.Tier(alpha=1e-5, bandwidth=10 * GB)


def topo(N, L, inter=sm.Tier(5e-6, 12.5 * GB), intra=sm.Tier(2e-6, 450 * GB)):
    return sm.Topology(N, L, inter, intra)


@pytest.mark.parametrize("n", [2, 3, 8, 64])
def test_ring_allreduce_sends_2_n_minus_1_over_n_of_the_buffer(n):
    import bench_step

    assert sm.wire("all_reduce", 1000.0, n) == pytest.approx(2 * (n - 1) / n * 1000)
    assert sm.wire("all_reduce", 1000.0, n) == pytest.approx(bench_step.ring_bytes(1000.0, n))
    assert sm.steps("all_reduce", n) == 2 * (n - 1)
    assert sm.collective("all_reduce", 1e9, n, T) == pytest.approx(2 * (n - 1) * 1e-5 + 2 * (n - 1) / n * 0.1)


@pytest.mark.parametrize("kind", ["all_to_all", "all_gather", "reduce_scatter"])
def test_one_pass_collectives(kind):
    assert sm.steps(kind, 4) == 3
    assert sm.collective(kind, 4e9, 4, T) == pytest.approx(3e-5 + 0.3)
    assert sm.collective(kind, 4e9, 1, T) == 0.0  # a group of one sends nothing


def test_onebit_payload_is_an_eighth_plus_one_scale_per_block():
    from taciturn import make_compressor
    from taciturn.wire import Pieces

    codec = make_compressor("block_sign")
    d = 1 << 20
    assert codec.nbytes(Pieces.from_lengths(codec.units([d]))) == pytest.approx(sm.ONE_BIT * d)


@pytest.mark.parametrize("N", [1, 2, 16])
def test_two_level_is_flat_when_one_rank_per_node(N):
    t = topo(N, 1)
    buckets = sm.bucketize(7e9, 1e8)
    a, b = sm.two_level(buckets, t, sm.H100), sm.flat(buckets, t, sm.H100)
    for field in ("collectives", "latency", "compression", "uplink"):
        assert getattr(a, field) == pytest.approx(getattr(b, field))


@pytest.mark.parametrize("N,L", [(2, 8), (16, 8), (4, 2)])
def test_two_level_inter_node_bytes_per_rank_are_a_L_th_of_flat(N, L):
    """Per rank, the inter-node 1-bit exchange of the two-level scheme carries 1/L of the bucket;
    flat carries all of it among all N L ranks (the uplink then carries L times more still)."""
    t, e = topo(N, L), 1e8
    n_across, _, share = sm.group(t, "across", "all_to_all")
    two = sm.wire("all_to_all", sm.ONE_BIT * e / L, n_across)
    flat = sm.wire("all_to_all", sm.ONE_BIT * e, N * L)
    assert two / (sm.ONE_BIT * e * (N - 1) / N) == pytest.approx(1 / L)
    assert flat / (sm.ONE_BIT * e) == pytest.approx((N * L - 1) / (N * L))
    assert share == L  # the L groups of equal local ranks share each uplink
    c2, cf = sm.two_level([e], t, sm.H100), sm.flat([e], t, sm.H100)
    # node uplink: two-level 2 (N-1)/N of a rank's 1/L shard times L ranks = 2 (N-1)/N e bits/8;
    assert c2.uplink == pytest.approx(2 * (N - 1) / N * sm.ONE_BIT * e)
    # flat: all_to_all L (n-L)/n of the payload, ring all_gather (n-1)/n of it
    n = N * L
    assert cf.uplink == pytest.approx((L * (n - L) / n + (n - 1) / n) * sm.ONE_BIT * e)


def test_flat_cluster_group_rules_are_the_plain_formulas():
    t = sm.Topology(4, 1, T, sm.Tier(0.0, 1.0))  # intra unused with L = 1
    for kind in ("all_reduce", "all_to_all", "all_gather"):
        n, tier, share = sm.group(t, "world", kind)
        assert (n, tier, share) == (4, T, 1.0)
    assert sm.ddp([1e9], t, dtype_bytes=4).collectives == pytest.approx(sm.collective("all_reduce", 4e9, 4, T))


def test_world_all_to_all_on_two_tiers_is_bound_by_the_shared_uplink():
    t = topo(2, 2, inter=sm.Tier(0.0, 1 * GB), intra=sm.Tier(0.0, 10 * GB))
    n, tier, share = sm.group(t, "world", "all_to_all")
    # each rank sends 3/4 B, of which 2/4 B leave the node; the uplink carries that for 2 ranks = B
    assert share == pytest.approx(2 * 2 / 3)
    assert sm.collective("all_to_all", 1e9, n, tier) == pytest.approx(1.0)
    assert sm.collective("all_gather", 1e9, n, sm.group(t, "world", "all_gather")[1]) == pytest.approx(0.75)


@pytest.mark.parametrize("method", sorted(sm.METHODS))
@pytest.mark.parametrize("N,L", [(1, 8), (2, 1), (4, 8), (32, 8)])
def test_more_bandwidth_is_never_slower(method, N, L):
    fn = sm.METHODS[method][1]
    buckets = sm.bucketize(7e9, 1e8)
    times = [fn(buckets, topo(N, L, inter=sm.Tier(5e-6, g * GB / 8), intra=sm.Tier(2e-6, b * GB)), sm.H100).serial
             for g in (10, 25, 100, 400) for b in (100, 450)]
    by_inter = [times[i::2] for i in range(2)]
    for series in by_inter:
        assert all(a >= b - 1e-12 for a, b in zip(series, series[1:]))
    assert all(a >= b - 1e-12 for a, b in zip(times[::2], times[1::2]))  # faster intra: not slower


def test_two_level_beats_flat_and_ddp_on_slow_uplinks():
    rows = sm.predict(models={"7B": 7e9}, rates=(25,), nodes=(16,))
    r = rows[0]
    assert r["two_level"]["comm"] < r["flat"]["comm"] < r["ddp"]["comm"]
    assert r["zeropp"]["comm"] < r["ddp"]["comm"]
    # uplink bytes per parameter: DDP bf16 ~4, ZeRO++ ~1.5, two-level ~2/8 + scales
    assert r["ddp"]["uplink"] / 7e9 == pytest.approx(4 * 127 / 128, rel=1e-6)
    assert r["zeropp"]["uplink"] / 7e9 == pytest.approx(127 / 128 + 0.5 * 15 / 16, rel=1e-6)
    assert r["two_level"]["uplink"] / 7e9 == pytest.approx(2 * 15 / 16 * sm.ONE_BIT, rel=1e-6)


def test_overlap_never_exceeds_serial_nor_undercuts_the_larger_part():
    c = sm.Cost(collectives=0.3, compression=0.2, buckets=5)
    assert max(c.collectives, c.compression) <= c.overlapped <= c.serial


def test_fit_recovers_alpha_and_bandwidth():
    tier = sm.Tier(3e-4, 120e6)
    points = [{"kind": k, "n": n, "bytes": mb * 1e6, "median": sm.collective(k, mb * 1e6, n, tier)}
              for k in sm.KINDS for n in (2, 4) for mb in sm.SIZES_MB]
    fitted, errors = sm.fit_tier(points)
    assert fitted.bandwidth == pytest.approx(120e6, rel=1e-6)
    assert fitted.alpha == pytest.approx(3e-4, rel=1e-6)
    assert errors["all sizes"] == pytest.approx(0.0, abs=1e-9)


def _fingerprint():
    out = {}
    for p in (os.path.join(ROOT, "BENCHMARKS.md"), os.path.join(ROOT, "docs", "img", "scaling_model.png"),
              os.path.join(ROOT, "results", "scaling_model.json")):
        if os.path.exists(p):
            with open(p, "rb") as f:
                out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_quick_prints_the_prediction_table_and_writes_nothing():
    before = _fingerprint()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "scaling_model.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "**7B parameters" in out and "**70B parameters" in out
    assert "| 100 Gbit   | 16 (128)" in out
    assert "taciturn two-level 1-bit s" in out and "ZeRO++" in out
    assert "1-bit Adam" in out and "2.16x" in out
    assert _fingerprint() == before
