"""The fused CPU sign kernels (taciturn.kernels) against the torch path they replace.

Same payload bytes (packed bits identical, scales to float tolerance), same decoded values,
same feedback state, on awkward sizes and piece layouts; the pipeline gives the same results
either way; a failed build falls back to the torch path with one warning.
"""
from __future__ import annotations

import os
import platform
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernel_checks import check_pipeline_with_and_without_kernel, portable_build, torch_path  # noqa: E402

from taciturn import kernels, make_compressor  # noqa: E402
from taciturn.compressors import Compressor  # noqa: E402
from taciturn.feedback import FeedbackStep, make_feedback  # noqa: E402
from taciturn.layout import BucketLayout  # noqa: E402
from taciturn.segments import Segments  # noqa: E402
from taciturn.wire import Pieces, packed_len  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="fused kernels could not be built here")

SIZES = {
    "1": [1],
    "7": [7],
    "1023": [1023],
    "1025": [1025],
    "1e6+3": [10 ** 6 + 3],
    "tensors": [5, 1030, 7, 70000, 3, 200000, 1],
}
# every codec on the small cases; the 10^6+3 case (long pieces cut in segments) on two
CASES = [(c, s) for s in SIZES for c in ("block_sign", "block_sign_none", "block_sign_100", "scaled_sign",
                                         "scaled_sign_l2", "sign")
         if s != "1e6+3" or c in ("block_sign", "scaled_sign")]
CODECS = {
    "block_sign": ("block_sign", {}),
    "block_sign_none": ("block_sign", {"block_size": None}),
    "block_sign_100": ("block_sign", {"block_size": 100}),
    "scaled_sign": ("scaled_sign", {}),
    "scaled_sign_l2": ("scaled_sign_l2", {}),
    "sign": ("sign", {}),
}


def sample(d, seed):
    """Gaussian values with exact zeros and negative zeros among them (sign(0) = sign(-0) = +1)."""
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5
    x[seed % 13::29] = 0.0
    x[seed % 7::31] = -0.0
    return x


def layouts(cid, sid):
    """The codec and the piece layouts it meets: whole units, and the chunks of 3 ranks (pieces
    cut at chunk edges, starting anywhere in a byte)."""
    name, opts = CODECS[cid]
    codec = make_compressor(name, **opts)
    layout = BucketLayout(tuple(SIZES[sid]), 3, codec)
    chunks = [(layout.chunk(j), layout.chunk_pieces[j]) for j in range(3)]
    return codec, [(slice(0, layout.numel), layout.units)] + [c for c in chunks if c[1].numel]


def split(codec, payload, pieces):
    head = 4 * pieces.count if codec.scale != "none" else 0
    return payload[:head].view(torch.float32), payload[head:head + packed_len(pieces.numel)]


def assert_same_payload(codec, fast, ref, pieces):
    assert fast.numel() == ref.numel() == codec.nbytes(pieces)
    (fs, fb), (rs, rb) = split(codec, fast, pieces), split(codec, ref, pieces)
    assert torch.equal(fb, rb), "packed sign bits differ"
    # torch.norm sums 10^6 squares in fp32 (about 4e-5 off); the kernel sums in double per tile
    torch.testing.assert_close(fs, rs, rtol=1e-4 if codec.scale == "l2" else 2e-6, atol=0)
    assert torch.equal(fast[fs.numel() * 4 + fb.numel():], ref[rs.numel() * 4 + rb.numel():]), "padding"


def check_codec(cid, sid):
    codec, parts = layouts(cid, sid)
    x = sample(sum(SIZES[sid]), 1)
    for sl, pieces in parts:
        fast = codec.encode(x[sl], pieces)
        with torch_path():
            ref = codec.encode(x[sl], pieces)
            ref_decoded = codec.decode(ref, pieces)
        assert_same_payload(codec, fast, ref, pieces)
        # decoding is exact: +-scale from the payload, whichever path encoded it
        assert torch.equal(codec.decode(ref, pieces), ref_decoded)
        out = torch.full((pieces.numel,), float("nan"))
        assert codec.decode(ref, pieces, out=out) is out and torch.equal(out, ref_decoded)
        acc = sample(pieces.numel, 2)
        expected = acc + ref_decoded
        assert codec.decode_add(ref, pieces, acc) is acc and torch.equal(acc, expected)


RULES = {"markov": ("markov", -1.0), "ef": ("ef", 1.0), "ef_s0.5": ("ef", 0.5), "ef_s0": ("ef", 0.0)}


def check_fused(cid, sid, rid):
    rule, alpha = RULES[rid]
    codec, parts = layouts(cid, sid)
    d = sum(SIZES[sid])
    x, h0 = sample(d, 3), sample(d, 4) * 0.5
    for sl, pieces in parts:
        h = h0[sl].clone()
        fast = codec.encode_fused(x[sl], pieces, FeedbackStep(h, alpha, rule))
        with torch_path():
            y = x[sl] + alpha * h0[sl]  # alpha is -1, 1, 1/2 or 0: exact, as in the kernel
            ref = codec.encode(y, pieces)
            c = codec.decode(ref, pieces)
        assert_same_payload(codec, fast, ref, pieces)
        expected = h0[sl] + c if rule == "markov" else y - c
        tol = 1e-4 if codec.scale == "l2" else 2e-6
        torch.testing.assert_close(h, expected, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("cid,sid", CASES)
def test_encode_decode_match_torch_path(cid, sid):
    check_codec(cid, sid)


@pytest.mark.parametrize("cid,sid,rid", [(c, s, r) for c, s in CASES for r in RULES
                                         if s != "1e6+3" or r in ("markov", "ef")])
def test_fused_feedback_matches_torch_path(cid, sid, rid):
    check_fused(cid, sid, rid)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
@pytest.mark.parametrize("arch", ["x86-64", "x86-64-v3"], ids=["sse2", "avx2"])
def test_portable_builds_match_torch_path(arch, monkeypatch):
    """The AVX2 and plain C++ branches (machines without AVX-512 run them) give the same bytes."""
    portable_build(monkeypatch, arch)
    for cid in ("block_sign", "scaled_sign", "sign", "block_sign_100"):
        for sid in ("1023", "tensors"):
            check_codec(cid, sid)
            for rid in ("markov", "ef_s0.5"):
                check_fused(cid, sid, rid)


@pytest.mark.parametrize("cid", ["scaled_sign", "scaled_sign_l2", "block_sign"])
def test_given_and_fused_scales(cid):
    """Two-way mode sends the whole tensor's scale with each piece of it in a chunk."""
    codec, parts = layouts(cid, "tensors")
    d = sum(SIZES["tensors"])
    x, h = sample(d, 5), sample(d, 6)
    units = parts[0][1]
    with torch_path():
        expected = codec.scales(x - h, units)
    scales = codec.fused_scales(x, units, FeedbackStep(h, -1.0, "markov"))
    torch.testing.assert_close(scales, expected, rtol=1e-4 if codec.scale == "l2" else 2e-6, atol=0)
    given = torch.rand(units.count) + 0.5
    payload = codec.encode(x, units, scales=given)
    assert torch.equal(split(codec, payload, units)[0], given)
    with torch_path():
        assert torch.equal(payload, codec.encode(x, units, scales=given))


def test_thread_count_does_not_change_the_payload():
    codec, parts = layouts("scaled_sign", "tensors")
    x = sample(sum(SIZES["tensors"]), 7)
    big = sample(10 ** 6 + 3, 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [codec.encode(x, parts[0][1]), make_compressor("block_sign", block_size=None).compress(big)]
        torch.set_num_threads(max(2, threads))
        many = [codec.encode(x, parts[0][1]), make_compressor("block_sign", block_size=None).compress(big)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("cid", ["block_sign", "block_sign_100", "scaled_sign", "scaled_sign_l2", "sign"])
def test_segments_read_in_place_equal_the_flat_copy(cid):
    """A bucket's tensors read in place (Segments, also cut at chunk edges) give the bytes and
    the state of their flat copy; the torch path takes the copy."""
    codec, parts = layouts(cid, "tensors")
    sizes = SIZES["tensors"]
    x = sample(sum(sizes), 40)
    segments = Segments(list(torch.split(x.clone(), sizes)))
    assert segments.numel() == x.numel() and torch.equal(segments.flat(), x)
    h0 = sample(sum(sizes), 41)
    for sl, pieces in parts:
        assert torch.equal(segments[sl].flat(), x[sl])
        for rule, alpha in (("markov", -1.0), ("ef", 0.5), ("none", 0.0)):
            h1, h2 = h0[sl].clone(), h0[sl].clone()
            a = codec.encode_fused(segments[sl], pieces, FeedbackStep(h1, alpha, rule))
            b = codec.encode_fused(x[sl], pieces, FeedbackStep(h2, alpha, rule))
            assert torch.equal(a, b) and torch.equal(h1, h2)
            if codec.unit_scales:
                assert torch.equal(codec.fused_scales(segments[sl], pieces, FeedbackStep(h0[sl], alpha, rule)),
                                   codec.fused_scales(x[sl], pieces, FeedbackStep(h0[sl], alpha, rule)))
            with torch_path():
                h3 = h0[sl].clone()
                c = codec.encode_fused(segments[sl], pieces, FeedbackStep(h3, alpha, rule))
                assert c.numel() == b.numel() and torch.equal(split(codec, c, pieces)[1], split(codec, b, pieces)[1])


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("rule", ["none", "ef", "markov"])
@pytest.mark.parametrize("cid,sid", [("block_sign", "tensors"), ("block_sign_100", "1025"), ("sign", "tensors"),
                                     ("scaled_sign_l2", "1023"), ("block_sign", "1e6+3")])
def test_fused_server_phase_equals_its_steps(cid, sid, rule, n, monkeypatch):
    """serve_fused in one pass == decode_mean, acc += a, encode_fused (both with the kernels),
    bit for bit: payload and state; pieces longer than LOCAL_MAX take the steps."""
    codec, parts = layouts(cid, sid)
    fb, s = make_feedback(rule), 0.5
    served = []
    serve = kernels.sign_serve
    monkeypatch.setattr(kernels, "sign_serve", lambda *a, **k: served.append(1) or serve(*a, **k))
    for sl, pieces in parts[1:]:
        d, before = pieces.numel, len(served)
        payloads = torch.stack([codec.encode(sample(d, 20 + i), pieces) for i in range(n)])
        state = {"server_error": sample(d, 30), "server_markov": sample(d, 31), "result_markov": sample(d, 32)}
        twin = {k: v.clone() for k, v in state.items()}
        acc, form = fb.server_step(state, s, slice(0, d))
        fast = codec.serve_fused(payloads, pieces, acc, form, torch.empty(d))
        acc, form = fb.server_step(twin, s, slice(0, d))
        ref = Compressor.serve_fused(codec, payloads, pieces, acc, form, torch.empty(d))
        assert torch.equal(fast, ref)
        assert all(torch.equal(state[k], twin[k]) for k in state)
        assert (len(served) > before) == all(run[2] <= kernels.LOCAL_MAX for run in pieces.runs)


@pytest.mark.parametrize("two_way", [True, False], ids=["two_way", "one_way"])
@pytest.mark.parametrize("rule", ["none", "ef", "markov"])
@pytest.mark.parametrize("cid", ["block_sign", "scaled_sign"])
def test_pipeline_same_with_and_without_kernels(cid, rule, two_way, monkeypatch):
    name, opts = CODECS[cid]
    check_pipeline_with_and_without_kernel(monkeypatch, kernels, "sign_encode", make_compressor(name, **opts), rule,
                                           two_way, sample, seed=10, tol=1e-5)


def test_fallbacks_keep_the_torch_path():
    codec = make_compressor("block_sign")
    pieces = Pieces.from_lengths(codec.units([3000]))
    x = sample(3000, 9)
    with torch_path():
        ref = codec.encode(x, pieces)
    strided = torch.stack([x, x], 1).reshape(-1)[::2]
    assert not kernels.usable(strided) and torch.equal(codec.encode(strided, pieces), ref)
    assert not kernels.usable(x.double()) and not kernels.usable(torch.empty(3, device="meta"))
    assert not codec.fuses(x, torch.zeros(3000, dtype=torch.float64))
    assert not make_compressor("randk").fuses(x)


def test_build_failure_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_failed", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    codec = make_compressor("block_sign")
    pieces = Pieces.from_lengths(codec.units([3000]))
    x = sample(3000, 9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        payload = codec.encode(x, pieces)
        decoded = codec.decode(payload, pieces)
    assert [str(w.message) for w in caught if "fused CPU kernels" in str(w.message)] == [
        f"taciturn: the fused CPU kernels are unavailable ({kernels._failed}); the sign codecs use their slower "
        "torch path"]
    assert "false failed" in kernels._failed and not kernels.usable(x)
    with torch_path():
        assert torch.equal(payload, codec.encode(x, pieces))
        assert torch.equal(decoded, codec.decode(payload, pieces))


def test_builds_into_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_failed", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert kernels.library() is not None
    built = list((tmp_path / "taciturn").iterdir())  # the library, no temporary file left
    assert len(built) == 1 and built[0].name.startswith("kernels-") and built[0].suffix == ".so"


def test_bad_arguments_name_the_problem():
    codec = make_compressor("block_sign")
    pieces = Pieces.from_lengths(codec.units([100]))
    with pytest.raises(ValueError, match="elements given for pieces of 100"):
        kernels.sign_encode(torch.zeros(99), pieces, "l1", torch.zeros(64, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="needs the state tensor h"):
        kernels.sign_encode(torch.zeros(100), pieces, "l1", torch.zeros(64, dtype=torch.uint8), 4, update="ef")
    with pytest.raises(ValueError, match="too small"):
        kernels.sign_decode(torch.zeros(4, dtype=torch.uint8), pieces, "l1", 4)
