"""The Triton kernels (taciturn.kernels.triton_sign, triton_update) against the torch path, bit for bit.

On a CUDA machine they run compiled on CUDA tensors and are checked against torch's CUDA ops;
elsewhere under TRITON_INTERPRET=1 (tests/gpu/conftest.py) on CPU tensors, checked against
torch's CPU ops. Sign codecs: the packed bits equal the torch path's; given the kernel's scales,
the whole payload and the feedback state h equal the torch path's byte for byte; the scales
themselves (a sum in another order) agree to float tolerance. Decoding, decode-add and the
server phase (mean of n payloads, server feedback, recompression) are exact as well. Updates:
AMSGrad, Adam and momentum equal the torch formulas bit for bit (on CPU with a correctly rounded
square root, as update.cpp's tests do). Inputs: fp32 and bf16 x (bf16 g for the updates), awkward
sizes, pieces starting anywhere in a byte (the chunks of 3 ranks), long pieces cut into items.
Dispatch: the codecs, the exchange, CDAdam and taciturn.optim.functional reach the Triton kernels
for tensors on a Triton device (here ``kernels.TRITON_DEVICES`` patched to the test's device);
CPU tensors keep the C++ kernels; top-k and a failed triton import keep the torch path.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'taciturn[triton]')")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernel_checks import check_pipeline_with_and_without_kernel, torch_path  # noqa: E402

from taciturn import kernels, make_compressor  # noqa: E402
from taciturn.compressors import Compressor  # noqa: E402
from taciturn.feedback import FeedbackStep  # noqa: E402
from taciturn.kernels import triton_sign, triton_update  # noqa: E402
from taciturn.layout import BucketLayout  # noqa: E402
from taciturn.segments import Segments  # noqa: E402
from taciturn.optim import functional  # noqa: E402
from taciturn.wire import packed_len  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK = 64
SIZES = {"1": [1], "7": [7], "block-1": [BLOCK - 1], "block+1": [BLOCK + 1], "3001": [3001],
         "tensors": [5, 130, 7, 1000, 3, 1]}
CODECS = {
    "block_sign": ("block_sign", {"block_size": BLOCK}),
    "block_sign_l2": ("block_sign", {"block_size": BLOCK, "scale": "l2"}),
    "scaled_sign": ("scaled_sign", {}),
    "sign": ("sign", {}),
}
# EF with a rescaled error (lr_{t-1} / lr_t): y = x + 0.3 h rounds once, as torch's add(alpha=)
RULES = {"none": ("none", 0.0), "markov": ("markov", -1.0), "ef": ("ef", 0.3)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def test_mode():
    """Compiled on CUDA, interpreted on CPU: the kernels were decorated in the mode this run wants."""
    import triton

    assert triton.knobs.runtime.interpret == (DEVICE.type == "cpu")


def sample(d, seed, dtype=torch.float32):
    """Gaussian values with exact zeros and negative zeros among them (sign(0) = sign(-0) = +1)."""
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5
    x[seed % 13::29] = 0.0
    x[seed % 7::31] = -0.0
    return x.to(dtype).to(DEVICE)


def layouts(cid, sid):
    """The codec, and its piece layouts: whole units, and the chunks of 3 ranks (pieces cut at
    chunk edges, starting anywhere in a byte or a 32-bit word)."""
    name, opts = CODECS[cid]
    codec = make_compressor(name, **opts)
    layout = BucketLayout(tuple(SIZES[sid]), 3, codec)
    chunks = [(layout.chunk(j), layout.chunk_pieces[j]) for j in range(3)]
    return codec, [(slice(0, layout.numel), layout.units)] + [c for c in chunks if c[1].numel]


def head(codec, pieces):
    return 0 if codec.scale == "none" else 4 * pieces.count


def scales_of(codec, payload, pieces):
    return payload[:head(codec, pieces)].view(torch.float32)


def bits_of(codec, payload, pieces):
    h = head(codec, pieces)
    return payload[h:h + packed_len(pieces.numel)]


def assert_close_scales(codec, fast, ref):
    torch.testing.assert_close(fast, ref, rtol=1e-5 if codec.scale == "l2" else 4e-6, atol=0)


def encode(codec, x, pieces, fused=None, scales=None):
    payload = torch.zeros(codec.nbytes(pieces), dtype=torch.uint8, device=DEVICE)
    fused = fused or FeedbackStep(None, 0.0, "none")
    return triton_sign.encode(x, pieces, codec.scale, payload, head(codec, pieces), h=fused.h, alpha=fused.alpha,
                              update=fused.update, scales=scales)


def cases():
    for cid in CODECS:
        for sid in SIZES:
            yield cid, sid


@pytest.fixture
def short_items(monkeypatch):
    """Pieces cut into items of 100 elements (not a multiple of 32): long pieces take the partial
    sums, the scales and the signs in three launches, items share words inside a piece."""
    def clear():
        triton_sign._layout.cache_clear()
        triton_sign._item_parts.cache_clear()

    monkeypatch.setattr(triton_sign, "_ITEM", 100)
    clear()
    yield
    clear()


def check_encode(cid, sid, rid, dtype):
    rule, alpha = RULES[rid]
    codec, parts = layouts(cid, sid)
    d = sum(SIZES[sid])
    x, h0 = sample(d, 3, DTYPES[dtype]), sample(d, 4) * 0.5
    for sl, pieces in parts:
        h = h0[sl].clone()
        fast = encode(codec, x[sl], pieces, FeedbackStep(h if rule != "none" else None, alpha, rule))
        with torch_path():  # the torch path reads x as fp32, as the kernel does
            own_h = h0[sl].clone()
            own = codec.encode_fused(x[sl].float(), pieces, FeedbackStep(own_h, alpha, rule))
            given_h = h0[sl].clone()
            given = codec.encode_fused(x[sl].float(), pieces, FeedbackStep(given_h, alpha, rule),
                                       scales=scales_of(codec, fast, pieces).clone() if codec.scale != "none" else None)
        assert torch.equal(bits_of(codec, fast, pieces), bits_of(codec, own, pieces)), "sign bits differ"
        assert_close_scales(codec, scales_of(codec, fast, pieces), scales_of(codec, own, pieces))
        assert torch.equal(fast, given), "payload differs from the torch path's with the same scales"
        if rule != "none":
            assert torch.equal(h, given_h), "feedback state differs"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rid", RULES)
@pytest.mark.parametrize("cid,sid", list(cases()))
def test_encode_fused_matches_torch_path(cid, sid, rid, dtype):
    check_encode(cid, sid, rid, dtype)


@pytest.mark.parametrize("rid", RULES)
@pytest.mark.parametrize("cid,sid", [c for c in cases() if c[1] in ("3001", "tensors") and "block" not in c[0]])
def test_long_pieces_match_torch_path(cid, sid, rid, short_items):
    check_encode(cid, sid, rid, "fp32")


@pytest.mark.parametrize("items", ["whole", "short"])
@pytest.mark.parametrize("cid,sid", list(cases()))
def test_scales_and_given_scales(cid, sid, items, request):
    if items == "short":
        request.getfixturevalue("short_items")
    codec, parts = layouts(cid, sid)
    d = sum(SIZES[sid])
    x, h = sample(d, 5), sample(d, 6)
    for sl, pieces in parts:
        with torch_path():
            expected = codec.scales(x[sl].add(h[sl], alpha=0.3), pieces)
        if codec.scale != "none":
            assert_close_scales(codec, triton_sign.piece_scales(x[sl], pieces, codec.scale, h[sl], 0.3), expected)
        given = torch.rand(pieces.count, device=DEVICE) + 0.5
        with torch_path():
            ref = codec.encode(x[sl], pieces, scales=given)
        assert torch.equal(encode(codec, x[sl], pieces, scales=given), ref)


@pytest.mark.parametrize("cid,items", [("block_sign", "whole"), ("scaled_sign", "whole"), ("scaled_sign", "short")])
def test_segments_read_in_place_equal_the_flat_copy(cid, items, request):
    """A bucket's fp32 tensors read in place (a Segments, also cut at chunk edges): the payload,
    the scales and h of their flat copy; bf16 parts go through their fp32 copy."""
    if items == "short":
        request.getfixturevalue("short_items")
    codec, parts = layouts(cid, "tensors")
    sizes = SIZES["tensors"]
    h0 = sample(sum(sizes), 41)
    for dtype, rules, where in ((torch.float32, ("markov", "ef"), parts), (torch.bfloat16, ("ef",), parts[:1])):
        x = sample(sum(sizes), 40, dtype)
        segments = Segments(list(torch.split(x.clone(), sizes)))
        for sl, pieces in where:
            for rule, alpha in (RULES[r] for r in rules):
                fused = [FeedbackStep(h0[sl].clone(), alpha, rule) for _ in range(2)]
                a, b = encode(codec, segments[sl], pieces, fused[0]), encode(codec, x[sl].float(), pieces, fused[1])
                assert torch.equal(a, b) and torch.equal(fused[0].h, fused[1].h)
            assert torch.equal(triton_sign.piece_scales(segments[sl], pieces, codec.scale, h0[sl], alpha),
                               triton_sign.piece_scales(x[sl].float(), pieces, codec.scale, h0[sl], alpha))


@pytest.mark.parametrize("items", ["whole", "short"])
@pytest.mark.parametrize("cid,sid", list(cases()))
def test_decode_and_decode_add_match_torch_path(cid, sid, items, request):
    if items == "short":
        request.getfixturevalue("short_items")
    codec, parts = layouts(cid, sid)
    d = sum(SIZES[sid])
    x = sample(d, 1)
    for sl, pieces in parts:
        with torch_path():
            payload = codec.encode(x[sl], pieces)
            ref = codec.decode(payload, pieces)
            acc = sample(pieces.numel, 2)
            ref_acc = codec.decode_add(payload, pieces, acc.clone())
        out = torch.full((pieces.numel,), float("nan"), device=DEVICE)
        assert triton_sign.decode(payload, pieces, codec.scale, head(codec, pieces), out) is out
        assert torch.equal(out, ref)
        assert torch.equal(triton_sign.decode(payload, pieces, codec.scale, head(codec, pieces), acc, True), ref_acc)


SERVER_RULES = {"none": (False, "none", 0.0), "ef": (False, "ef", 0.3), "markov": (True, "none", -1.0)}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("rid", SERVER_RULES)
@pytest.mark.parametrize("cid,sid", [c for c in cases() if c[1] in ("7", "block+1", "tensors")])
def test_serve_matches_torch_path(cid, sid, rid, n, request):
    """The server phase: the mean of n payloads, (acc +=,) y = x + alpha*h, its payload and h;
    with n = 3 in items of 100 elements too."""
    if n == 3:
        request.getfixturevalue("short_items")
    with_acc, update, alpha = SERVER_RULES[rid]
    codec, parts = layouts(cid, sid)
    for sl, pieces in parts:
        with torch_path():
            payloads = torch.stack([codec.encode(sample(pieces.numel, 10 + j), pieces) for j in range(n)])
        acc0, h0 = sample(pieces.numel, 20), sample(pieces.numel, 21)
        acc, h = acc0.clone() if with_acc else None, h0.clone()
        out = torch.zeros(codec.nbytes(pieces), dtype=torch.uint8, device=DEVICE)
        triton_sign.serve(payloads, pieces, codec.scale, head(codec, pieces), out, acc=acc,
                          h=h if alpha else None, alpha=alpha, update=update)
        with torch_path():  # Compressor.serve_fused in its steps, with the kernel's scales
            a = Compressor.decode_mean(codec, list(payloads), pieces, 0, torch.empty(pieces.numel, device=DEVICE))
            ref_acc, ref_h = acc0.clone(), h0.clone()
            x = ref_acc.add_(a) if with_acc else a
            fused = FeedbackStep(ref_h if alpha else None, alpha, update)
            own = codec.encode_fused(x.clone(), pieces, FeedbackStep(h0.clone() if alpha else None, alpha, update))
            ref = codec.encode_fused(x, pieces, fused,
                                     scales=scales_of(codec, out, pieces).clone() if codec.scale != "none" else None)
        assert torch.equal(bits_of(codec, out, pieces), bits_of(codec, own, pieces)), "sign bits differ"
        assert_close_scales(codec, scales_of(codec, out, pieces), scales_of(codec, own, pieces))
        assert torch.equal(out, ref), "payload differs from the torch path's with the same scales"
        assert torch.equal(h, ref_h), "server feedback state differs"
        if with_acc:
            assert torch.equal(acc, ref_acc), "server accumulator differs"


def test_codecs_dispatch_to_triton(monkeypatch):
    """Through the codecs and the exchange (tensors on a device of the Triton kernels: the
    interpreter's CPU tensors here): the worker's rule runs in the Triton encode, and the
    results and feedback state are those of the torch path."""
    monkeypatch.setattr(kernels, "TRITON_DEVICES", {DEVICE.type})
    codec = make_compressor("block_sign", block_size=BLOCK)
    with torch.device(DEVICE):
        check_pipeline_with_and_without_kernel(monkeypatch, triton_sign, "encode", codec, "markov", True,
                                               lambda d, seed: sample(d, seed), 0, 1e-5, sizes=(5, 130, 7, 300))


# ------------------------------------------------------------------------------ updates

UPDATE_SIZES = [1, 7, 1023, 1025, 3001]
AMS = dict(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8)
ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def root(t):
    """torch's square root on CUDA (correctly rounded); on CPU the correctly rounded one through
    fp64, where torch's may be 1 ulp off (tests/unit/test_update_kernels.py)."""
    return t.sqrt() if t.is_cuda else t.double().sqrt().float()


def state(n, seed, dtype=torch.float32):
    """x, g (in ``dtype``), m, v, v^ of n elements."""
    g = torch.Generator().manual_seed(seed)
    x, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m, v = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01
    vmax = torch.maximum(v, torch.rand(n, generator=g) * 0.01)
    return [t.to(DEVICE) for t in (x, grad.to(dtype), m, v, vmax)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", UPDATE_SIZES)
def test_amsgrad_matches_torch(n, dtype):
    fast, ref = state(n, n, DTYPES[dtype]), state(n, n, DTYPES[dtype])
    triton_update.amsgrad(*fast, **AMS)
    x, g, m, v, vmax = ref
    m.mul_(AMS["beta1"]).add_(g, alpha=1 - AMS["beta1"])
    v.mul_(AMS["beta2"]).addcmul_(g, g, value=1 - AMS["beta2"])
    torch.maximum(vmax, v, out=vmax)
    x.addcdiv_(m, root(vmax.add(AMS["eps"])), value=-AMS["lr"])
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", UPDATE_SIZES)
def test_adam_matches_torch(n, dtype, bias_correction):
    step = 3
    fast, ref = state(n, n + 1, DTYPES[dtype])[:4], state(n, n + 1, DTYPES[dtype])[:4]
    c1, c2 = 1 - ADAM["beta1"] ** step, 1 - ADAM["beta2"] ** step
    size = -ADAM["lr"] / c1 if bias_correction else -ADAM["lr"]
    triton_update.adam(*fast, beta1=ADAM["beta1"], beta2=ADAM["beta2"], eps=ADAM["eps"],
                       c2=c2 if bias_correction else 1.0, size=size)
    x, g, m, v = ref
    m.mul_(ADAM["beta1"]).add_(g, alpha=1 - ADAM["beta1"])
    v.mul_(ADAM["beta2"]).addcmul_(g, g, value=1 - ADAM["beta2"])
    x.addcdiv_(m, root(v / c2 if bias_correction else v).add_(ADAM["eps"]), value=size)
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("n", UPDATE_SIZES)
def test_momentum_matches_torch_path(n, nesterov):
    g, buf = state(n, n + 2)[1:3]
    ref_buf = buf.clone()
    out = torch.empty_like(g) if nesterov else None
    triton_update.momentum(g, buf, 0.9, out)
    with torch_path():
        expected = functional.momentum_(g, ref_buf, 0.9, nesterov)
    assert torch.equal(buf, ref_buf)
    if nesterov:
        assert torch.equal(out, expected)


def test_functional_dispatches_to_triton(monkeypatch):
    """taciturn.optim.functional sends tensors on a Triton device to the Triton kernels."""
    monkeypatch.setattr(kernels, "TRITON_DEVICES", {DEVICE.type})
    calls = []
    for name in ("amsgrad", "adam", "momentum"):
        kernel = getattr(triton_update, name)
        monkeypatch.setattr(triton_update, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    x, g, m, v, vmax = state(100, 0)
    functional.amsgrad_(x, g, m, v, vmax, **AMS)
    functional.adam_(x, g, m, v, step=2, **ADAM)
    functional.momentum_(g, m, 0.9, True)
    assert calls == ["amsgrad", "adam", "momentum"]


def test_cpu_tensors_keep_the_cpp_kernels():
    """Without the test's monkeypatch, CPU tensors never reach Triton."""
    assert "cpu" not in kernels.TRITON_DEVICES
    assert not kernels.on_triton(torch.zeros(3))


def test_codecs_without_a_triton_kernel_keep_the_torch_path(monkeypatch):
    """Top-k has no Triton kernel: on a Triton device it takes its torch path, not the C++ kernel."""
    monkeypatch.setattr(kernels, "TRITON_DEVICES", {DEVICE.type})
    x = sample(1000, 0)
    topk = make_compressor("topk", ratio=0.1)
    assert not topk.fuses(x) and make_compressor("block_sign").fuses(x)
    with torch_path():
        expected = topk.compress(x)
    assert torch.equal(topk.compress(x), expected)


def test_cdadam_step_with_triton_matches_torch_path(monkeypatch):
    """Whole CDAdam steps (one rank) with every kernel on a Triton device: the parameters and the
    optimizer state of the torch path, to float tolerance (the scales are sums in another order)."""
    import taciturn

    def run(enabled):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (1500, 7, 300)]
        opt = taciturn.create_optimizer("CDAdam", params, lr=1e-2, broadcast_parameters=False)
        previous = kernels.set_enabled(enabled)
        try:
            for step in range(3):
                for p in params:
                    p.grad = sample(p.numel(), 100 + step + p.numel())
                opt.step()
        finally:
            kernels.set_enabled(previous)
        return params

    monkeypatch.setattr(kernels, "TRITON_DEVICES", {DEVICE.type})
    calls = []
    for name in ("encode", "serve", "decode"):
        kernel = getattr(triton_sign, name)
        monkeypatch.setattr(triton_sign, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    fast = run(True)
    assert {"encode", "serve", "decode"} <= set(calls), calls
    for a, b in zip(fast, run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_usable_takes_bf16_only_as_the_input(monkeypatch):
    """On a Triton device the codec's input may be bf16 (read as fp32), its state must be fp32."""
    monkeypatch.setattr(kernels, "TRITON_DEVICES", {DEVICE.type})
    x, h = sample(10, 0, torch.bfloat16), sample(10, 1)
    assert kernels.usable(x, h) and not kernels.usable(h, x) and not kernels.usable(x, h.bfloat16())
    assert not kernels.usable(x[::2]), "not contiguous"


def test_without_triton_the_torch_path_stays(monkeypatch):
    """When triton does not import, one warning says so and tensors on a Triton device take the
    torch path."""
    monkeypatch.setattr(kernels, "TRITON_DEVICES", {DEVICE.type})
    monkeypatch.setattr(kernels, "_triton_loaded", False)
    monkeypatch.setattr(kernels, "_triton_failed", None)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    x = sample(100, 0)
    with pytest.warns(RuntimeWarning, match="Triton kernels are unavailable"):
        assert not kernels.usable(x)
    assert not kernels.usable(x) and not make_compressor("block_sign").fuses(x)
