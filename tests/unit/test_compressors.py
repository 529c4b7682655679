"""Compressor properties on random inputs of awkward sizes and dtypes (ALGORITHMS.md, compressors)."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from taciturn import list_compressors, make_compressor
from taciturn.wire import Pieces, from_bytes

SIZES = [1, 7, 9, 1000, 1025, 10 ** 6 + 3]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CODECS = {
    "scaled_sign": ("scaled_sign", {}),
    "scaled_sign_l2": ("scaled_sign_l2", {}),
    "sign": ("sign", {}),
    "block_sign": ("block_sign", {}),
    "block_sign_none": ("block_sign", {"block_size": None}),
    "block_sign_100": ("block_sign", {"block_size": 100}),
    "topk": ("topk", {"ratio": 0.1}),
    "topk_sampled": ("topk", {"ratio": 0.1, "mode": "sampled"}),
    "randk": ("randk", {"ratio": 0.1}),
    "topk_bf16": ("topk", {"ratio": 0.1, "encoding": "bf16"}),
    "randk_bf16": ("randk", {"ratio": 0.1, "encoding": "bf16"}),
    "identity": ("identity", {}),
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
}
# every dtype on the small sizes; the 10^6+3 case in fp32 keeps the suite fast
SIZE_DTYPES = [(d, dt) for d in SIZES for dt in DTYPES if d < 10 ** 6 or dt == "fp32"]
SIGN_CODECS = ["scaled_sign", "scaled_sign_l2", "block_sign", "block_sign_none", "block_sign_100"]
# torch.norm (the l2 scale) accumulates 10^6 squares in fp32 to about 4e-5; the l1 scale's
# cascaded sum is exact to about 1e-7
L2_RTOL = 1e-4


def codec(cid):
    name, opts = CODECS[cid]
    return make_compressor(name, **opts)


def sample(d, dtype=torch.float32, seed=0):
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed * 7919 + d))
    return (x * 3 + 0.5).to(dtype)


def block_size_of(cid):
    name, opts = CODECS[cid]
    if name == "block_sign":
        return opts.get("block_size", 1024)
    return None


def blocks(x, cid):
    """The pieces one scale covers, as rows: full blocks of the block size, then the shorter last
    block (or the whole tensor as one row)."""
    size = block_size_of(cid) or x.numel()
    full = x.numel() // size * size
    rows = [x[:full].view(-1, size), x[full:].view(1, -1)]
    return [r for r in rows if r.numel()]


def block_lengths(x, cid):
    return [r.shape[1] for r in blocks(x, cid) for _ in range(r.shape[0])]


def kept(d, ratio):
    return min(d, max(1, math.ceil(Fraction(str(ratio)) * d)))


def content_bytes(cid, d):
    """Wire size before padding, from the table of ALGORITHMS.md and the layout of taciturn.wire."""
    name, opts = CODECS[cid]
    if name == "sign":
        return -(-d // 8)
    if cid in SIGN_CODECS:
        size = block_size_of(cid)
        return 4 * (-(-d // size) if size else 1) + -(-d // 8)
    if name == "topk" and opts.get("encoding") == "bf16":  # a count per 65,536-element window
        return 4 * -(-d // 65536) + 4 * kept(d, opts["ratio"])
    if name in ("topk", "randk"):
        value = 4 if opts.get("encoding", "fp32") == "fp32" else 2
        return value * (2 if name == "topk" else 1) * kept(d, opts["ratio"])
    return {"identity": 4, "fp16": 2, "bf16": 2}[name] * d


def plain_compress(x, cid):
    """C(x) from the formulas, for the deterministic codecs."""
    name, _ = CODECS[cid]
    if name == "sign":
        return torch.where(x >= 0, 1.0, -1.0)
    if cid in SIGN_CODECS:
        out = []
        for b in blocks(x.double(), cid):
            scale = b.abs().mean(1, keepdim=True) if name != "scaled_sign_l2" else \
                b.norm(dim=1, keepdim=True) / math.sqrt(b.shape[1])
            out.append((scale * torch.where(b >= 0, 1.0, -1.0)).reshape(-1))
        return torch.cat(out).float()
    if name == "identity":
        return x.clone()
    return x.to(DTYPES[name]).float()


# ----------------------------------------------------------------------------- round trip, sizes


@pytest.mark.parametrize("d,dtype", SIZE_DTYPES, ids=lambda v: v if isinstance(v, str) else f"d{v}")
@pytest.mark.parametrize("cid", CODECS, ids=str)
def test_round_trip_payload_size_and_padding(cid, d, dtype):
    c = codec(cid)
    x = sample(d, DTYPES[dtype])
    flat = x.float()
    pieces = Pieces.from_lengths(c.units([d]))
    payload = c.encode(flat, pieces, seed=5)
    assert payload.dtype == torch.uint8 and payload.dim() == 1 and payload.is_contiguous()
    content = content_bytes(cid, d)
    assert payload.numel() == c.nbytes(pieces) == -(-content // 8) * 8
    assert not payload[content:].any(), "padding bytes must be zero"
    decoded = c.decode(payload, pieces, seed=5)
    assert decoded.dtype == torch.float32 and decoded.shape == (d,)
    assert torch.equal(decoded, c.compress(x, seed=5))
    # the payload read out of a larger receive buffer (what a collective hands over) decodes the same
    buf = torch.full((payload.numel() + 16,), 255, dtype=torch.uint8)
    buf[:payload.numel()] = payload
    out = torch.full((d,), float("nan"))
    assert torch.equal(c.decode(buf, pieces, seed=5, out=out), decoded)
    assert torch.equal(out, decoded)
    # C keeps the caller's shape
    shaped = c.compress(x.reshape(1, d), seed=5)
    assert shaped.shape == (1, d) and shaped.dtype == torch.float32


@pytest.mark.parametrize("d,dtype", SIZE_DTYPES, ids=lambda v: v if isinstance(v, str) else f"d{v}")
@pytest.mark.parametrize("cid", SIGN_CODECS + ["sign", "identity", "fp16", "bf16"], ids=str)
def test_compress_equals_the_formula(cid, d, dtype):
    x = sample(d, DTYPES[dtype], seed=1).float()
    rtol = L2_RTOL if cid == "scaled_sign_l2" else 2e-6
    torch.testing.assert_close(codec(cid).compress(x), plain_compress(x, cid), rtol=rtol, atol=0)


# ----------------------------------------------------------------------------- sign codecs


@pytest.mark.parametrize("d", SIZES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("cid", ["scaled_sign", "block_sign", "block_sign_none", "block_sign_100"], ids=str)
def test_exact_l1_scale_per_block(cid, d):
    c = codec(cid)
    x = sample(d, seed=2)
    pieces = Pieces.from_lengths(c.units([d]))
    expected = torch.cat([b.double().abs().mean(1) for b in blocks(x, cid)])
    assert pieces.lengths() == block_lengths(x, cid)
    scales = from_bytes(c.encode(x, pieces), 0, pieces.count, torch.float32)
    torch.testing.assert_close(scales.double(), expected, rtol=1e-6, atol=0)
    out = c.compress(x)
    assert torch.equal(out.abs(), scales.repeat_interleave(torch.tensor(block_lengths(x, cid))))


@pytest.mark.parametrize("d", SIZES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("cid", SIGN_CODECS, ids=str)
def test_contraction_identity_of_scaled_sign(cid, d):
    """||C(x)-x||^2 = sum_b (||x_b||^2 - ||x_b||_1^2/d_b) (l1) <= (1 - min_b delta_b) ||x||^2."""
    x = sample(d, seed=3).double()
    err = (codec(cid).compress(x.float()).double() - x).pow(2).sum()
    if cid == "scaled_sign_l2":
        # l2/sqrt(d) scale: ||C(x)-x||^2 = sum_b 2||x_b||^2 - 2||x_b||_2 ||x_b||_1 / sqrt(d_b)
        exact = sum((2 * b.pow(2).sum(1) - 2 * b.norm(dim=1) * b.abs().sum(1) / math.sqrt(b.shape[1])).sum()
                    for b in blocks(x, cid))
        torch.testing.assert_close(err, exact, rtol=L2_RTOL, atol=1e-9)
        return
    exact = sum((b.pow(2).sum(1) - b.abs().sum(1) ** 2 / b.shape[1]).sum() for b in blocks(x, cid))
    torch.testing.assert_close(err, exact, rtol=1e-5, atol=1e-9)
    delta = min((b.abs().sum(1) ** 2 / (b.shape[1] * b.pow(2).sum(1))).min() for b in blocks(x, cid))
    assert err <= (1 - delta) * x.pow(2).sum() * (1 + 1e-6) + 1e-9


@pytest.mark.parametrize("cid", SIGN_CODECS + ["sign"], ids=str)
def test_sign_of_zero_is_plus_one(cid):
    x = torch.tensor([0.0, -2.0, 0.0, 1.0, -0.0, -4.0, 3.0])
    out = codec(cid).compress(x)
    assert (out[[0, 2, 3, 4, 6]] > 0).all() and (out[[1, 5]] < 0).all()



@pytest.mark.parametrize("cid", SIGN_CODECS, ids=str)
def test_scaled_sign_of_zero_vector_is_zero(cid):
    assert torch.equal(codec(cid).compress(torch.zeros(1030)), torch.zeros(1030))  # Markov states start at C(0) = 0


def test_blocks_never_straddle_tensors():
    assert codec("block_sign").units([1025, 3, 2048, 1]) == [1024, 1, 3, 1024, 1024, 1]
    assert codec("block_sign_100").units([250, 0, 7]) == [100, 100, 50, 7]
    assert codec("block_sign_none").units([1025, 3]) == [1025, 3]
    assert codec("scaled_sign").units([1025, 0, 3]) == [1025, 3]


def test_block_size_none_is_per_tensor_scaled_sign():
    x = sample(5000, seed=4)
    assert torch.equal(codec("block_sign_none").compress(x), codec("scaled_sign").compress(x))


def test_given_unit_scales_are_used_for_a_piece():
    """Two-way workers encode a piece of a tensor with the whole tensor's scale."""
    c = codec("scaled_sign")
    x = sample(100, seed=5)
    piece = Pieces.from_lengths([40])
    scale = x.abs().mean().reshape(1)
    out = c.decode(c.encode(x[:40], piece, scales=scale), piece)
    assert torch.equal(out, torch.where(x[:40] >= 0, scale, -scale))


# ----------------------------------------------------------------------------- sparse codecs


@pytest.mark.parametrize("d", SIZES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("cid", ["topk", "topk_sampled"], ids=str)
def test_topk_keeps_the_largest_entries(cid, d):
    x = sample(d, seed=6)
    out = codec(cid).compress(x)
    mask = out != 0
    k = kept(d, 0.1)
    assert int(mask.sum()) == k
    assert torch.equal(out[mask], x[mask])
    if k < d:
        assert x[mask].abs().min() >= x[~mask].abs().max()


def test_sampled_topk_equals_exact_topk():
    x = sample(10 ** 6 + 3, seed=7)
    assert torch.equal(codec("topk_sampled").compress(x, seed=3), codec("topk").compress(x))


@pytest.mark.parametrize("ratio,d,k", [(0.07, 100, 7), (0.1, 30, 3), (0.25, 1025, 257), (1.0, 9, 9), (1e-9, 9, 1)],
                         ids=lambda v: str(v))
def test_kept_count_is_ceil_ratio_times_d(ratio, d, k):
    for name in ("topk", "randk"):
        out = make_compressor(name, ratio=ratio).compress(sample(d, seed=8))
        assert int((out != 0).sum()) == k, name


@pytest.mark.parametrize("k,d", [(7, 25), (1, 1), (3, 10), (29, 35), (1000, 10 ** 6 + 3)], ids=lambda v: str(v))
def test_absolute_k_keeps_exactly_k(k, d):
    x = sample(d, seed=9)
    for name in ("topk", "randk"):
        c = make_compressor(name, k=k)
        assert int((c.compress(x) != 0).sum()) == k, name
        assert int((c.bind(d).compress(x) != 0).sum()) == k, name


def test_topk_per_piece():
    c = codec("topk")
    x = sample(300, seed=10)
    pieces = Pieces.from_lengths([100, 200])
    out = c.compress(x, pieces)
    assert int((out[:100] != 0).sum()) == 10 and int((out[100:] != 0).sum()) == 20


def test_randk_same_seed_same_indices_other_seed_other_indices():
    c = codec("randk")
    x, y = sample(1000, seed=11), sample(1000, seed=12)
    support = lambda out: (out != 0).nonzero().squeeze(1)
    a = support(c.compress(x, seed=4))
    torch.manual_seed(123)  # the global generator plays no part: every rank derives the same indices
    assert torch.equal(support(c.compress(y, seed=4)), a)
    assert not torch.equal(support(c.compress(x, seed=5)), a)
    assert not torch.equal(support(make_compressor("randk", ratio=0.1, seed=1).compress(x, seed=4)), a)
    out = c.compress(x, seed=4)
    assert torch.equal(out[a], x[a])


def test_randk_contraction_in_expectation():
    """E||C(x)-x||^2 = (1 - k/d) ||x||^2 for rand-k; never more than ||x||^2."""
    c, x = codec("randk"), sample(1000, seed=13)
    errs = torch.stack([(c.compress(x, seed=s) - x).pow(2).sum() for s in range(400)])
    norm = x.pow(2).sum()
    assert (errs <= norm).all()
    assert errs.mean().item() == pytest.approx((1 - 100 / 1000) * norm.item(), rel=0.02)


@pytest.mark.parametrize("d", SIZES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("name", ["topk", "randk"])
def test_bf16_encoding_sends_the_fp32_selection_rounded_in_half_the_bytes(name, d):
    x = sample(d, seed=16)
    fp32, bf16 = make_compressor(name, ratio=0.1), make_compressor(name, ratio=0.1, encoding="bf16")
    assert torch.equal(bf16.compress(x, seed=2), fp32.compress(x, seed=2).to(torch.bfloat16).float())
    pieces = Pieces.from_lengths([d])
    header = 4 * -(-d // 65536) if name == "topk" else 0
    assert bf16.nbytes(pieces) - header <= fp32.nbytes(pieces) // 2 + 8


@pytest.mark.parametrize("d", SIZES, ids=lambda d: f"d{d}")
def test_topk_contraction(d):
    x = sample(d, seed=14)
    err = (codec("topk").compress(x) - x).pow(2).sum()
    assert err <= (1 - kept(d, 0.1) / d) * x.pow(2).sum() * (1 + 1e-6)


# ----------------------------------------------------------------------------- casts


@pytest.mark.parametrize("d", SIZES, ids=lambda d: f"d{d}")
def test_identity_is_exact_and_casts_round_to_their_dtype(d):
    x = sample(d, seed=15)
    assert torch.equal(codec("identity").compress(x), x)
    for name, eps in (("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)):
        out = codec(name).compress(x)
        assert torch.equal(out, x.to(DTYPES[name]).float())
        # contraction with delta = 1 - eps^2 (relative rounding error at most eps)
        assert (out - x).pow(2).sum() <= eps ** 2 * x.pow(2).sum()


def test_registry_names():
    assert set(list_compressors()) == {"scaled_sign", "scaled_sign_l2", "sign", "block_sign", "topk", "randk",
                                       "identity", "fp16", "bf16"}
    assert make_compressor("Block-Sign").name == "block_sign"
    ready = make_compressor("topk", ratio=0.5)
    assert make_compressor(ready) is ready


# ----------------------------------------------------------------------------- bad options

BAD = [
    (("nope",), {}, "unknown compressor 'nope'; valid names: bf16, block_sign"),
    (("topk",), {"ratio": 0}, r"ratio=0 must be in \(0, 1\]"),
    (("topk",), {"ratio": -0.5}, r"ratio=-0.5 must be in \(0, 1\]"),
    (("topk",), {"ratio": 1.5}, r"ratio=1.5 must be in \(0, 1\]"),
    (("randk",), {"ratio": 0.0}, r"ratio=0.0 must be in \(0, 1\]"),
    (("randk",), {"ratio": 2}, r"ratio=2 must be in \(0, 1\]"),
    (("topk",), {"k": 0}, "k=0 must be a positive int"),
    (("topk",), {"ratio": 0.1, "k": 3}, "give ratio or k, not both"),
    (("topk",), {"mode": "fast"}, "mode='fast' must be 'exact' or 'sampled'"),
    (("topk",), {"encoding": "fp16"}, "encoding='fp16' must be one of"),
    (("randk",), {"encoding": "int8"}, "encoding='int8' must be one of"),
    (("block_sign",), {"block_size": 0}, "block_size=0 must be a positive int or None"),
    (("block_sign",), {"block_size": -4}, "block_size=-4 must be a positive int or None"),
    (("block_sign",), {"block_size": 2.5}, "block_size=2.5 must be a positive int or None"),
    (("block_sign",), {"scale": "max"}, "scale='max' is not one of"),
    (("scaled_sign",), {"block_size": 4}, r"does not take \['block_size'\]"),
    (("identity",), {"ratio": 0.1}, "no options"),
]


@pytest.mark.parametrize("args,kwargs,match", BAD, ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_bad_options_raise_clear_value_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_compressor(*args, **kwargs)


@pytest.mark.parametrize("name", ["topk", "randk"])
def test_k_larger_than_d_raises(name):
    c = make_compressor(name, k=11)
    with pytest.raises(ValueError, match="k=11 is larger than the 10 elements"):
        c.bind(10)
    with pytest.raises(ValueError, match="k=11 is larger than the 10 elements"):
        c.compress(torch.ones(10))
