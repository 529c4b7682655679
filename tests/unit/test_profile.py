"""The magnitude profile (taciturn.profile): its weights keep each block's mass or energy, the
codec's bytes do not change, and what cannot carry it is refused with the fix."""
from __future__ import annotations

import pytest
import torch

import taciturn
from taciturn import Exchange, make_communicator, make_compressor, profile
from taciturn.feedback import make_feedback
from taciturn.layout import BucketLayout

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
])
def test_bad_profiles_are_refused(opts, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make_compressor("block_sign", **opts)


def test_sharded_state_refuses_a_profile():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="drop profile=... or shard_state"):
        taciturn.CDAdam(model.parameters(), lr=1e-3, shard_state=True, process_group="local",
                        compressor_options={"scale": "l2", "profile": 0.99})
