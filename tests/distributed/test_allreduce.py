"""The compressed allreduce on real gloo ranks against the single-server pseudo-code.

Every rank runs ``Exchange.allreduce`` for several steps with changing inputs; the ranks must
end bit-identical, and equal (to float tolerance) the plain simulation of one server and n
workers in conftest.py, for every feedback rule in both modes.
"""
from __future__ import annotations

import math

import pytest
import torch

from taciturn import CommStats, Exchange, make_communicator, make_compressor
from taciturn.feedback import make_feedback

# Tensors of awkward sizes and mixed dtypes, in two buckets of the pipeline:
# [700, 1500, 33, 2100] (4333 elements) and [5000, 64].
INPUTS = {
    "mixed": [((35, 20), torch.float32), ((1500,), torch.float32), ((33,), torch.bfloat16),
              ((3, 700), torch.float32), ((5000,), torch.float32), ((8, 8), torch.float16)],
    # one bucket smaller than the world size: some chunks are empty
    "tiny": [((3,), torch.float32)],
}
BUCKET_CAP_MB = 6000 * 4 / 2 ** 20
CODECS = {"block_sign": {}, "scaled_sign": {}, "topk": {"ratio": 0.25}, "identity": {}}
#: case label -> (codec, options) where the label is not the codec's name
VARIANTS = {"block_sign_profile": ("block_sign", {"block_size": 256, "profile": 0.5}),
            "block_sign_detrended": ("block_sign", {"block_size": 256, "profile": 0.5, "profile_detrend": 0.3}),
            "topk_bf16": ("topk", {"ratio": 0.25, "encoding": "bf16"})}
RULES = ("none", "ef", "markov")
STEPS = 3
EF_SCALES = (1.0, 0.5, 2.0)  # s = lr_{t-1}/lr_t of a changing learning rate

CASES = [("mixed", codec, rule, mode) for codec in [*CODECS, *VARIANTS] for rule in RULES
         for mode in ("two_way", "one_way")]
CASES += [("tiny", codec, rule, "two_way") for codec in CODECS for rule in RULES]


def codec_of(label):
    return VARIANTS.get(label, (label, CODECS.get(label)))


def tensor_ends(sizes):
    return {sum(sizes[:i]) for i in range(len(sizes) + 1)}


def case_id(case):
    return "-".join(case)


def worker_inputs(inputs: str, step: int, rank: int):
    """Worker ``rank``'s tensors at ``step``: seeded, different per tensor scale, rank and step."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    out = []
    for i, (shape, dtype) in enumerate(INPUTS[inputs]):
        scale = 10.0 ** (i % 3 - 1)
        out.append((torch.randn(shape, generator=gen) * scale + 0.1 * scale).to(dtype))
    return out


def flat_inputs(inputs: str, step: int, rank: int) -> torch.Tensor:
    return torch.cat([t.float().reshape(-1) for t in worker_inputs(inputs, step, rank)])


def make_pipeline(inputs, codec, rule, mode, comm):
    sizes = [math.prod(shape) for shape, _ in INPUTS[inputs]]
    name, opts = codec_of(codec)
    return Exchange(sizes, make_compressor(name, **opts), make_feedback(rule), make_feedback(rule), comm,
                    two_way=mode == "two_way", bucket_cap_mb=BUCKET_CAP_MB)


def _allreduce_rank(rank, world_size, cases):
    comm = make_communicator("gloo")
    out = {}
    for case in cases:
        inputs, codec, rule, mode = case
        pipe = make_pipeline(inputs, codec, rule, mode, comm)
        states = pipe.init_state()
        stats = CommStats()
        results = []
        for t in range(STEPS):
            res = pipe.allreduce(worker_inputs(inputs, t, rank), states, error_scale=EF_SCALES[t], step=t, stats=stats)
            assert all(r.dtype == torch.float32 for r in res)
            results.append(torch.cat([r.reshape(-1) for r in res]))
        buckets = [([pipe.sizes[i] for i in idx], list(lay.cuts)) for idx, lay in zip(pipe.buckets, pipe.layouts)]
        counted = {"up": stats.bytes_up, "down": stats.bytes_down, "fp32": stats.fp32_bytes, "steps": stats.steps}
        out[case] = (torch.stack(results), buckets, counted, pipe.wire_bytes())
    return out


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda n: f"{n}ranks")
def ranks(request, run_ranks):
    n = request.param
    return n, run_ranks(_allreduce_rank, n, CASES, timeout=150)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ranks_bit_identical_and_equal_to_single_server_reference(ranks, case, simulate):
    n, per_rank = ranks
    inputs, codec, rule, mode = case
    result, buckets, counted, wire = per_rank[0][case]
    assert len(buckets) == (2 if inputs == "mixed" else 1)
    if (inputs, codec) == ("mixed", "scaled_sign") and mode == "two_way":
        # tensors straddle the chunk cuts: the worker's scale is the whole tensor's
        assert any(0 < cut < sum(sizes) and cut not in tensor_ends(sizes) for sizes, cuts in buckets for cut in cuts)
    for r in range(1, n):
        assert torch.equal(per_rank[r][case][0], result), f"rank {r} differs from rank 0"
    # what the collectives were handed, summed over the buckets, is the per-step wire size
    assert counted == {"up": STEPS * wire["up"], "down": STEPS * wire["down"], "fp32": STEPS * wire["fp32"],
                       "steps": STEPS}
    xs = [[flat_inputs(inputs, t, i) for i in range(n)] for t in range(STEPS)]
    expected = simulate(xs, buckets, *codec_of(codec), rule, mode == "two_way", EF_SCALES)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bytes on the wire

def pad8(nbytes):
    return -(-nbytes // 8) * 8


def sign_bytes(numel, blocks):
    """Wire size of scaled/block sign: one fp32 scale per block, then 1 bit per element."""
    return pad8(4 * blocks + -(-numel // 8))


def blocks_in(sizes, lo, hi, block_size=1024):
    """Blocks of ``block_size`` inside each tensor (last one shorter) that start in [lo, hi)."""
    count, start = 0, 0
    for s in sizes:
        count += sum(1 for b in range(start, start + s, block_size) if lo <= b < hi)
        start += s
    return count


STATS_SIZES = [600_000, 3, 400_000]  # about 1M elements, one bucket
STATS_CASES = [("block_sign", "two_way"), ("block_sign", "one_way"), ("identity", "two_way")]


def _stats_rank(rank, world_size):
    comm = make_communicator("gloo")
    gen = torch.Generator().manual_seed(rank)
    out = {}
    for codec, mode in STATS_CASES:
        pipe = Exchange(STATS_SIZES, make_compressor(codec), make_feedback("markov"), make_feedback("markov"), comm,
                        two_way=mode == "two_way")
        stats = CommStats()
        states = pipe.init_state()
        for _ in range(2):
            pipe.allreduce([torch.randn(s, generator=gen) for s in STATS_SIZES], states, stats=stats)
        out[(codec, mode)] = dict(stats=stats.as_dict(prefix=""), total_up=stats.bytes_up, total_down=stats.bytes_down,
                                  steps=stats.steps, wire=pipe.wire_bytes(), cuts=pipe.layouts[0].cuts)
    return out


def expected_bytes(codec, mode, cuts, n):
    d = sum(STATS_SIZES)
    if codec == "identity":
        per_chunk = max(pad8(4 * (cuts[j + 1] - cuts[j])) for j in range(n))
        return n * per_chunk, n * per_chunk
    if mode == "one_way":
        up = sign_bytes(d, blocks_in(STATS_SIZES, 0, d))
        return up, n * up
    per_chunk = max(sign_bytes(cuts[j + 1] - cuts[j], blocks_in(STATS_SIZES, cuts[j], cuts[j + 1]))
                    for j in range(n))
    return n * per_chunk, n * per_chunk


def test_bytes_counted_at_the_collective_match_the_wire_formula(run_ranks):
    n = 2
    per_rank = run_ranks(_stats_rank, n, timeout=150)
    d = sum(STATS_SIZES)
    for codec, mode in STATS_CASES:
        got = per_rank[0][(codec, mode)]
        up, down = expected_bytes(codec, mode, got["cuts"], n)
        for r, rank in enumerate(per_rank):
            last = rank[(codec, mode)]["stats"]
            assert (last["bytes_up"], last["bytes_down"], last["fp32_bytes"]) == (up, down, 4 * d), (codec, mode, r)
        assert got["wire"] == {"up": up, "down": down, "fp32": 4 * d}
        assert got["total_up"] == 2 * up and got["total_down"] == 2 * down and got["steps"] == 2
        assert got["stats"]["compress_time"] > 0 and got["stats"]["collective_time"] > 0
    two_way = per_rank[0][("block_sign", "two_way")]["stats"]
    assert two_way["compression_ratio"] == pytest.approx(4 * d / two_way["bytes_up"])
    assert two_way["compression_ratio"] > 30


# ----------------------------------------------------------------------------- overlapped buckets

OVERLAP_SIZES = [3000, 17, 2500, 4100, 9, 1024, 3333, 700]  # bucket cap 3000 elements: 5 buckets


def _overlap_rank(rank, world_size):
    comm = make_communicator("gloo")
    out = {}
    for codec, rule, mode in [("block_sign", "markov", "two_way"), ("scaled_sign", "ef", "two_way"),
                              ("topk", "ef", "one_way"), ("identity", "none", "two_way")]:
        def pipe():
            return Exchange(OVERLAP_SIZES, make_compressor(codec, **CODECS[codec]), make_feedback(rule),
                            make_feedback(rule if mode == "two_way" else "none"), comm,
                            two_way=mode == "two_way", bucket_cap_mb=3000 * 4 / 2 ** 20)
        overlapped, one_by_one = pipe(), pipe()
        assert len(overlapped.buckets) == 5
        s1, s2 = overlapped.init_state(), one_by_one.init_state()
        results = []
        for t in range(STEPS):
            gen = torch.Generator().manual_seed(100 * t + rank)
            xs = [torch.randn(n, generator=gen) for n in OVERLAP_SIZES]
            a = torch.cat([r.reshape(-1) for r in overlapped.allreduce(xs, s1, error_scale=EF_SCALES[t], step=t)])
            b = torch.cat([r.reshape(-1) for i, idx in enumerate(one_by_one.buckets)
                           for r in one_by_one.allreduce([xs[j] for j in idx], [s2[i]], buckets=[i],
                                                         error_scale=EF_SCALES[t], step=t)])
            results.append((a, b))
        same_state = all(torch.equal(x[k], y[k]) for x, y in zip(s1, s2) for k in x)
        out[(codec, rule, mode)] = (results, same_state)
    return out


def test_overlapped_buckets_equal_buckets_one_by_one(run_ranks):
    """Exchange.allreduce starts every bucket's all_to_all before the first server phase and
    every all_gather before the first finish (collectives in flight while the other buckets are
    worked on): the results and states equal those of the buckets run one after the other, bit
    for bit, on every rank."""
    per_rank = run_ranks(_overlap_rank, 3, timeout=120)
    for case, (results, same_state) in per_rank[0].items():
        assert same_state, case
        for a, b in results:
            assert torch.equal(a, b), case
        for other in per_rank[1:]:
            assert all(torch.equal(x[0], y[0]) for x, y in zip(other[case][0], results)), case
