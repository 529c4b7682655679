"""The magnitude profile (taciturn.profile): its weights keep each block's mass or energy, the
codec's bytes do not change, the fused CPU kernels decode with the weights as the torch path
does, bit for bit, and what cannot carry it is refused with the fix."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernel_checks import check_pipeline_with_and_without_kernel, threads, torch_path  # noqa: E402

import taciturn  # noqa: E402
from taciturn import Exchange, kernels, make_communicator, make_compressor, profile  # noqa: E402
from taciturn.compressors import Compressor  # noqa: E402
from taciturn.feedback import FeedbackStep, make_feedback  # noqa: E402
from taciturn.layout import BucketLayout  # noqa: E402
from taciturn.wire import Pieces  # noqa: E402

SIZES = (700, 3, 1300)  # blocks of 256 with short tails, a tensor smaller than a block


def profiled_layout(scale):
    return BucketLayout(SIZES, 2, make_compressor("block_sign", block_size=256, scale=scale, profile=0.9))


@pytest.mark.parametrize("scale", ["l1", "l2"])
def test_weights_follow_the_profile_and_keep_each_blocks_norm(scale):
    lay = profiled_layout(scale)
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(lay.numel, generator=gen) ** 4
    p[:256] = 0  # a block whose elements have all been 0 so far
    w = profile.weights(p, lay, scale, torch.empty(lay.numel))
    start = 0
    for size in SIZES:
        t = slice(start, start + size)
        a = (p[t] + 0.01 * p[t].mean()).sqrt()
        for lo in range(0, size, 256):
            b = slice(start + lo, start + min(size, lo + 256))
            ab = a[lo:lo + 256]
            norm = ab.mean() if scale == "l1" else ab.square().mean().sqrt()
            torch.testing.assert_close(w[b], ab / norm)
        start += size
    # the all-zero block still gets the tensor's floor, so it follows the floor (flat): w = 1
    torch.testing.assert_close(w[:256], torch.ones(256))
    coded = make_compressor("block_sign", block_size=256, scale=scale)
    y = torch.randn(lay.numel, generator=gen)
    c = profile.Weighted(coded, w).compress(y, lay.units)
    plain = coded.compress(y, lay.units)
    assert torch.equal(c.sign(), plain.sign())
    for s, count, length in lay.units.runs:
        blocks = lambda v: v[s:s + count * length].view(count, length)
        if scale == "l1":
            torch.testing.assert_close(blocks(c).abs().sum(1), blocks(y).abs().sum(1))
        else:
            torch.testing.assert_close(blocks(c).square().sum(1), blocks(y).square().sum(1))


@pytest.mark.skipif(kernels.library() is None, reason="fused kernels could not be built here")
@pytest.mark.parametrize("scale", ["l1", "l2"])
def test_weights_kernel_equals_the_torch_path_for_any_thread_count(scale):
    lay = BucketLayout((70_000, 0, 5, 600_000), 2, make_compressor("block_sign", block_size=256, scale=scale,
                                                                   profile=0.9))
    p = torch.rand(lay.numel, generator=torch.Generator().manual_seed(3)) ** 4
    p[256:512] = 0
    p[70_000:70_005] = 0  # a tensor of one short block, all 0: its floor is 0 too
    with torch_path():
        ref = profile.weights(p, lay, scale, torch.empty(lay.numel))
    fast = []
    for n in (1, 2):  # 2 threads take a bucket of 2 * 2^18 elements or more
        with threads(n):
            fast.append(profile.weights(p, lay, scale, torch.empty(lay.numel)))
    torch.testing.assert_close(fast[0], ref, rtol=1e-5, atol=0)
    assert torch.equal(fast[0], fast[1]) and torch.equal(fast[0][70_000:70_005], torch.ones(5))


@pytest.mark.skipif(kernels.library() is None, reason="fused kernels could not be built here")
def test_profile_update_kernel_rounds_as_the_torch_ops():
    gen = torch.Generator().manual_seed(4)
    p, r = torch.rand(600_001, generator=gen), torch.randn(600_001, generator=gen) * 3
    fast, ref = p.clone(), p.clone()
    profile.update({profile.KEY: fast}, r, 0.99)
    with torch_path():
        profile.update({profile.KEY: ref}, r, 0.99)
    assert torch.equal(fast, ref) and not torch.equal(fast, p)


def test_detrended_profile_follows_the_squared_deviation_from_the_results_mean():
    """p = EMA_beta((r_t - rbar_{t-1})^2) with rbar = EMA_a(r) from 0, written as a plain loop: an
    element whose result sits at a large constant value ends with a small profile, one that
    swings around zero with a large one (the plain profile ranks them the other way)."""
    beta, a, steps = 0.9, 0.5, 40
    gen = torch.Generator().manual_seed(5)
    r = torch.randn(steps, 6, generator=gen) * 0.1
    r[:, 0] += 5.0                                   # steady
    r[:, 1] = 2.0 * torch.tensor([(-1.0) ** t for t in range(steps)])  # swings
    state = {profile.KEY: torch.zeros(6), profile.TREND: torch.zeros(6)}
    plain = {profile.KEY: torch.zeros(6)}
    p, rbar = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for t in range(steps):
        profile.update(state, r[t], beta, a, torch.empty(6))
        profile.update(plain, r[t], beta)
        d = r[t].double() - rbar
        rbar = rbar + (1 - a) * d
        p = beta * p + (1 - beta) * d * d
    assert torch.allclose(state[profile.KEY].double(), p, rtol=1e-5, atol=1e-7)
    assert torch.allclose(state[profile.TREND].double(), rbar, rtol=1e-5, atol=1e-7)
    assert state[profile.KEY][0] < 0.1 * state[profile.KEY][1]
    assert plain[profile.KEY][0] > plain[profile.KEY][1]


def test_zero_profile_decodes_as_the_plain_codec():
    lay = profiled_layout("l2")
    w = profile.weights(torch.zeros(lay.numel), lay, "l2", torch.empty(lay.numel))
    assert torch.equal(w, torch.ones(lay.numel))


def test_same_bytes_as_the_plain_codec():
    comm = make_communicator("local")
    wire = [Exchange(SIZES, make_compressor("block_sign", block_size=256, scale="l2", **opts), make_feedback("markov"),
                     make_feedback("markov"), comm).wire_bytes() for opts in ({}, {"profile": 0.99})]
    assert wire[0] == wire[1]


@pytest.mark.parametrize("opts, words", [
    ({"profile": 1.0}, "in [0, 1)"),
    ({"profile": True}, "EMA decay"),
    ({"profile": 0.9, "block_size": None}, "needs a block_size"),
    ({"profile": 0.9, "scale": "none"}, "scale 'l1' or 'l2'"),
    ({"profile_detrend": 0.5}, "give profile=... too"),
    ({"profile": 0.9, "profile_detrend": 1.0}, "profile_detrend=1.0 must be the EMA decay of the results' mean in [0, 1)"),
    ({"profile": 0.9, "profile_detrend": "0.5"}, "profile_detrend='0.5' must be"),
])
def test_bad_profiles_are_refused(opts, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make_compressor("block_sign", **opts)


def test_sharded_state_refuses_a_profile():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="drop profile=... or shard_state"):
        taciturn.CDAdam(model.parameters(), lr=1e-3, shard_state=True, process_group="local",
                        compressor_options={"scale": "l2", "profile": 0.99})


# ---------------------------------------------------------------- the weighted kernels
def _sample(d, seed):
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5
    x[seed % 13::29] = 0.0
    return x


def _parts(scale):
    """A profiled layout's units and its 3 ranks' chunks, with weights from a random profile."""
    lay = BucketLayout(SIZES, 3, make_compressor("block_sign", block_size=256, scale=scale, profile=0.9))
    p = torch.rand(lay.numel, generator=torch.Generator().manual_seed(5)) ** 4
    w = profile.weights(p, lay, scale, torch.empty(lay.numel))
    parts = [(slice(0, lay.numel), lay.units)] + [(lay.chunk(j), lay.chunk_pieces[j]) for j in range(3)]
    return make_compressor("block_sign", block_size=256, scale=scale), w, parts


@pytest.fixture
def weighted_calls(monkeypatch):
    """Names of the kernel entries called with weights (the test fails if the codec fell back)."""
    calls = []
    for entry in ("sign_encode", "sign_decode", "sign_serve"):
        kernel = getattr(kernels, entry)

        def counted(*args, _entry=entry, _kernel=kernel, **kwargs):
            if kwargs.get("weights") is not None:
                calls.append(_entry)
            return _kernel(*args, **kwargs)
        monkeypatch.setattr(kernels, entry, counted)
    return calls


@pytest.mark.skipif(kernels.library() is None, reason="fused kernels could not be built here")
@pytest.mark.parametrize("scale", ["l1", "l2"])
def test_weighted_kernels_round_as_the_torch_path(scale, weighted_calls):
    """Decoding, decode-add, the fused Markov / EF update and the fused server phase with weights
    in the kernels give the torch path's values bit for bit ((+-s) * w, then the sums)."""
    plain, w, parts = _parts(scale)
    for sl, pieces in parts:
        d = pieces.numel
        fast = profile.Weighted(plain, w[sl])
        payload = plain.encode(_sample(d, 1), pieces)
        with torch_path():
            ref = fast.decode(payload, pieces)
            acc_ref = fast.decode_add(payload, pieces, _sample(d, 2))
        assert torch.equal(fast.decode(payload, pieces), ref)
        assert torch.equal(fast.decode_add(payload, pieces, _sample(d, 2)), acc_ref)
        for rule, alpha in (("markov", -1.0), ("ef", 1.0)):
            x, h0 = _sample(d, 3), _sample(d, 4) * 0.5
            h = h0.clone()
            sent = fast.encode_fused(x, pieces, FeedbackStep(h, alpha, rule))
            assert torch.equal(sent, plain.encode_fused(x, pieces, FeedbackStep(h0.clone(), alpha, rule)))
            with torch_path():
                c = fast.decode(sent, pieces)
            assert torch.equal(h, h0 + c if rule == "markov" else (x + alpha * h0) - c)
        payloads = torch.stack([plain.encode(_sample(d, 10 + i), pieces) for i in range(3)])
        state = {"server_markov": _sample(d, 20), "result_markov": _sample(d, 21)}
        twin = {k: v.clone() for k, v in state.items()}
        served = fast.serve_fused(payloads, pieces, state["server_markov"],
                                  FeedbackStep(state["result_markov"], -1.0, "none"), torch.empty(d))
        steps = Compressor.serve_fused(fast, payloads, pieces, twin["server_markov"],
                                       FeedbackStep(twin["result_markov"], -1.0, "none"), torch.empty(d))
        assert torch.equal(served, steps) and all(torch.equal(state[k], twin[k]) for k in state)
    assert {"sign_encode", "sign_decode", "sign_serve"} <= set(weighted_calls)


@pytest.mark.skipif(kernels.library() is None, reason="fused kernels could not be built here")
@pytest.mark.parametrize("two_way", [True, False], ids=["two_way", "one_way"])
@pytest.mark.parametrize("rule", ["markov", "ef"])
def test_profiled_pipeline_same_with_and_without_kernels(rule, two_way, monkeypatch):
    codec = make_compressor("block_sign", block_size=256, scale="l2", profile=0.9)
    check_pipeline_with_and_without_kernel(monkeypatch, kernels, "sign_encode", codec, rule, two_way, _sample,
                                           seed=10, tol=1e-5, sizes=(5, 1030, 7, 3000, 3, 1))


def test_weights_are_refused_by_the_triton_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "TRITON_DEVICES", {"cpu"})
    codec = make_compressor("block_sign", block_size=256)
    pieces = codec.units([300])
    with pytest.raises(ValueError, match="runs its torch path on CUDA"):
        kernels.sign_decode(torch.zeros(codec.nbytes(Pieces.from_lengths(pieces)), dtype=torch.uint8),
                            Pieces.from_lengths(pieces), "l1", 8, weights=torch.ones(300))
