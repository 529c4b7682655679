"""The fused CPU top-k kernel (taciturn.kernels.topk) against torch.topk and the torch path.

The kernel keeps the same entries as torch.topk when no two magnitudes tie, and among ties at the
k-th largest the lowest indices; the payload layout is TopK's (fp32: all values, then all int32
indices, the order within a piece the kernel's own; bf16: the torch path's bytes exactly). Its
feedback updates match the unfused torch computation, the bytes do not depend on the thread
count, and its decode writes what torch's index_put_ / index_add_ write.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernel_checks import check_pipeline_with_and_without_kernel, threads, torch_path  # noqa: E402

from taciturn import kernels, make_compressor  # noqa: E402
from taciturn.compressors import topk as topk_module  # noqa: E402
from taciturn.feedback import FeedbackStep  # noqa: E402
from taciturn.kernels.topk import topk_encode  # noqa: E402
from taciturn.wire import Pieces  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="fused kernels could not be built here")

# piece lengths: single pieces (short, one tile, longer than one thread's share, long), and
# mixed layouts with runs of equal pieces, pieces of length 1 and long pieces among short ones
LAYOUTS = {
    "1": [1],
    "7": [7],
    "2049": [2049],
    "70000": [70000],
    "1e6+3": [10 ** 6 + 3],
    "mixed": [1, 1, 5, 1030, 1030, 7, 70000, 3, 300000, 1],
}
RATIOS = [0.01, 0.03, 0.1, 0.5]  # up to 1/32 kept, a long piece takes the sampled path


def gaussian(d, seed):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5


def tied(d, seed):
    """Values from {0, -0, +-1, +-2} (mostly zeros) and a few distinct large ones: ties everywhere."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (d,), generator=gen).float()
    x[torch.rand(d, generator=gen) < 0.5] = 0.0
    x[torch.rand(d, generator=gen) < 0.1] = -0.0
    big = torch.randperm(d, generator=gen)[:max(1, d // 1000)]
    x[big] = torch.randn(big.numel(), generator=gen) * 100
    return x


def bounds(pieces):
    start = 0
    for n in pieces.lengths():
        yield start, n
        start += n


def encode(x, pieces, counts, **kwargs):
    payload = torch.full((8 * sum(counts) + 8,), 7, dtype=torch.uint8)
    topk_encode(x, pieces, counts, payload, **kwargs)
    assert (payload[8 * sum(counts):] == 7).all(), "bytes after the payload were touched"
    return payload[:8 * sum(counts)]


def entries(payload, pieces, counts):
    """Per piece: the kept indices (from the start of the segment) and values, in payload order."""
    total = sum(counts)
    values, idx = payload[:4 * total].view(torch.float32), payload[4 * total:].view(torch.int32).long()
    out, at = [], 0
    for k in counts:
        out.append((idx[at:at + k], values[at:at + k]))
        at += k
    return out


def expected_indices(y, pieces, counts):
    """Per piece: the k largest |y|, the lowest indices first among equal magnitudes (sorted)."""
    out = []
    for (start, n), k in zip(bounds(pieces), counts):
        order = torch.sort(y[start:start + n].abs(), descending=True, stable=True).indices
        out.append(order[:k].sort().values + start)
    return out


def check_entries(payload, y, pieces, counts):
    """The payload holds the tie rule's entries of y, with their values."""
    for (idx, values), want in zip(entries(payload, pieces, counts), expected_indices(y, pieces, counts)):
        assert torch.equal(idx.sort().values, want)
        assert torch.equal(values, y[idx]) and torch.equal(values.view(torch.int32), y[idx].view(torch.int32))


def counts_of(pieces, ratio):
    return make_compressor("topk", ratio=ratio).counts(pieces)


def layout_case(lid, ratio, values, seed):
    """The pieces of layout ``lid``, ``values(numel, seed)`` on them, and the top-k counts at ``ratio``."""
    pieces = Pieces.from_lengths(LAYOUTS[lid])
    return pieces, values(pieces.numel, seed), counts_of(pieces, ratio)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("lid", LAYOUTS)
def test_same_entries_as_torch_topk(lid, ratio):
    pieces, x, counts = layout_case(lid, ratio, gaussian, 1)
    payload = encode(x, pieces, counts)
    for (idx, values), (start, n), k in zip(entries(payload, pieces, counts), bounds(pieces), counts):
        ref = x[start:start + n].abs().topk(k).indices + start
        assert torch.equal(idx.sort().values, ref.sort().values)
        assert torch.equal(values, x[idx])


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("lid", LAYOUTS)
def test_ties_keep_the_lowest_indices(lid, ratio):
    pieces, x, counts = layout_case(lid, ratio, tied, 2)
    check_entries(encode(x, pieces, counts), x, pieces, counts)


@pytest.mark.parametrize("name", ["zeros", "ones", "ones_and_a_few_twos"])
@pytest.mark.parametrize("ratio", [0.01, 0.3])
def test_one_magnitude_everywhere(name, ratio):
    """Every entry ties (zeros of both signs, +-1): the first k of every piece."""
    pieces = Pieces.from_lengths([10 ** 6 + 3, 3000, 1])
    d = pieces.numel
    x = torch.zeros(d)
    x[::3] = -0.0
    if name != "zeros":
        x = torch.where(torch.arange(d) % 2 == 0, 1.0, -1.0)
    if name == "ones_and_a_few_twos":
        x[torch.randperm(d, generator=torch.Generator().manual_seed(3))[:50]] = 2.0
    counts = counts_of(pieces, ratio)
    check_entries(encode(x, pieces, counts), x, pieces, counts)


@pytest.mark.parametrize("k", [1, 2, 1000, 2 ** 20 - 1, 2 ** 20])
def test_k_from_one_to_the_length(k):
    pieces = Pieces.from_lengths([2 ** 20])
    x = tied(2 ** 20, 4)
    check_entries(encode(x, pieces, [k]), x, pieces, [k])


@pytest.mark.parametrize("ratio", [0.01, 0.03])
@pytest.mark.parametrize("case", ["sample_sees_only_zeros", "sample_sees_too_many_large", "large_only_in_sample"])
def test_skewed_pieces(case, ratio):
    """Long pieces whose sampled tiles (one in 16 of 2048 elements) misjudge the rest of them."""
    d = 2 ** 20
    tile = torch.arange(d) // 2048
    sampled = tile % 16 == 0
    x = gaussian(d, 5)
    if case == "sample_sees_only_zeros":
        x[sampled] = 0.0
    elif case == "sample_sees_too_many_large":
        x[sampled & (torch.arange(d) % 32 == 0)] = 100.0
    else:
        x[~sampled] *= 1e-3
    pieces = Pieces.from_lengths([d])
    counts = counts_of(pieces, ratio)
    check_entries(encode(x, pieces, counts), x, pieces, counts)


def test_empty_segment_and_zero_counts():
    assert encode(torch.zeros(0), Pieces.from_lengths([]), []).numel() == 0
    pieces = Pieces.from_lengths([5, 1, 7])
    x = gaussian(13, 6)
    check_entries(encode(x, pieces, [0, 1, 0]), x, pieces, [0, 1, 0])


RULES = {"markov": ("markov", -1.0), "ef": ("ef", 1.0), "ef_s0.5": ("ef", 0.5), "ef_s0": ("ef", 0.0),
         "none": ("none", 0.0)}


@pytest.mark.parametrize("rid", RULES)
@pytest.mark.parametrize("lid", ["7", "70000", "1e6+3", "mixed"])
def test_fused_feedback_matches_the_unfused_torch_path(lid, rid):
    rule, alpha = RULES[rid]
    codec = make_compressor("topk", ratio=0.01)
    pieces = Pieces.from_lengths(LAYOUTS[lid])
    x, h0 = gaussian(pieces.numel, 7), gaussian(pieces.numel, 8) * 0.5
    h = h0.clone() if rule != "none" else None
    payload = codec.encode_fused(x, pieces, FeedbackStep(h, alpha, rule))
    y = x + alpha * h0  # alpha is -1, 1, 1/2 or 0: exact, as in the kernel
    with torch_path():
        ref = codec.encode(y, pieces)
        c = codec.decode(ref, pieces)
    assert payload.numel() == ref.numel() == codec.nbytes(pieces)
    counts = codec.counts(pieces)
    check_entries(payload[:8 * sum(counts)], y, pieces, counts)
    assert not payload[8 * sum(counts):].any(), "padding bytes must be zero"
    assert torch.equal(codec.decode(payload, pieces), c)
    if rule == "markov":
        assert torch.equal(h, h0 + c)
    elif rule == "ef":
        assert torch.equal(h, y - c)


@pytest.mark.parametrize("rule", ["none", "ef", "markov"])
def test_thread_count_does_not_change_the_bytes(rule):
    pieces = Pieces.from_lengths(LAYOUTS["mixed"] + [2 ** 20, 10 ** 6 + 3])
    x, h0 = tied(pieces.numel, 9) + gaussian(pieces.numel, 10) * 1e-3, gaussian(pieces.numel, 11)
    x[:2 ** 19] = tied(2 ** 19, 12)
    results = []
    for n in (1, 2):
        h = h0.clone()
        with threads(n):
            for ratio in (0.01, 0.1):
                results.append((encode(x, pieces, counts_of(pieces, ratio), h=h, alpha=-1.0, update=rule), h.clone()))
    half = len(results) // 2
    for (a, ha), (b, hb) in zip(results[:half], results[half:]):
        assert torch.equal(a, b) and torch.equal(ha.view(torch.int32), hb.view(torch.int32))


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_codec_uses_the_kernel_with_the_torch_path_as_reference(mode):
    codec = make_compressor("topk", ratio=0.01, mode=mode)
    pieces = Pieces.from_lengths(LAYOUTS["mixed"])
    x = gaussian(pieces.numel, 13)
    fast = codec.encode(x, pieces, seed=1)
    with torch_path():
        ref = codec.encode(x, pieces, seed=1)
        ref_decoded = codec.decode(ref, pieces)
    assert fast.numel() == ref.numel()
    assert torch.equal(codec.decode(fast, pieces), ref_decoded)
    # a strided input takes the torch path
    strided = torch.stack([x, x], 1).reshape(-1)[::2]
    assert not codec.fuses(strided) and torch.equal(codec.encode(strided, pieces, seed=1), ref)


def test_decode_and_decode_add_in_place():
    codec = make_compressor("topk", ratio=0.1)
    pieces = Pieces.from_lengths([1000, 24])
    x = gaussian(1024, 14)
    payload = codec.encode(x, pieces)
    dense = torch.zeros(1024)
    for idx, values in entries(payload, pieces, codec.counts(pieces)):
        dense[idx] = values
    out = torch.full((1024,), float("nan"))
    assert codec.decode(payload, pieces, out=out) is out and torch.equal(out, dense)
    acc = gaussian(1024, 15)
    expected = acc + dense
    assert codec.decode_add(payload, pieces, acc) is acc and torch.equal(acc, expected)


@pytest.mark.parametrize("two_way", [True, False], ids=["two_way", "one_way"])
@pytest.mark.parametrize("rule", ["none", "ef", "markov"])
def test_pipeline_same_with_and_without_the_kernel(rule, two_way, monkeypatch):
    check_pipeline_with_and_without_kernel(monkeypatch, topk_module, "topk_encode",
                                           make_compressor("topk", ratio=0.05), rule, two_way, gaussian,
                                           seed=20, tol=1e-6)


def test_bad_arguments_name_the_problem():
    pieces = Pieces.from_lengths([100])
    payload = torch.zeros(80, dtype=torch.uint8)
    with pytest.raises(ValueError, match="elements given for pieces of 100"):
        topk_encode(torch.zeros(99), pieces, [5], payload)
    with pytest.raises(ValueError, match="needs the state tensor h"):
        topk_encode(torch.zeros(100), pieces, [5], payload, update="ef")
    with pytest.raises(ValueError, match=r"counts \[101\] do not fit pieces of lengths \[100\]"):
        topk_encode(torch.zeros(100), pieces, [101], payload)
    with pytest.raises(ValueError, match="too small"):
        topk_encode(torch.zeros(100), pieces, [11], payload)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("lid", LAYOUTS)
def test_bf16_payload_is_the_torch_paths_byte_for_byte(lid, ratio):
    """The "bf16" encoding puts the entries in index order, so both paths write the same bytes:
    one int32 count per 65,536-element window, the values rounded to bf16, the low 16 bits of
    the indices. The entries are the fp32 encoding's, rounded."""
    codec = make_compressor("topk", ratio=ratio, encoding="bf16")
    pieces = Pieces.from_lengths(LAYOUTS[lid])
    x = gaussian(pieces.numel, 16)
    payload = codec.encode(x, pieces)
    with torch_path():
        assert torch.equal(payload, codec.encode(x, pieces))
    windows = -(-pieces.numel // 2 ** 16)
    total = sum(codec.counts(pieces))
    assert payload.numel() == -(-(4 * windows + 4 * total) // 8) * 8
    fp32 = make_compressor("topk", ratio=ratio)
    expected = fp32.decode(fp32.encode(x, pieces), pieces)
    kept = expected.nonzero().squeeze(1)
    per_window = torch.bincount(kept // 2 ** 16, minlength=windows)
    assert torch.equal(payload[:4 * windows].view(torch.int32).long(), per_window)
    assert torch.equal(codec.decode(payload, pieces), expected.to(torch.bfloat16).float())


def test_bf16_windows_with_no_entries_and_one_with_all():
    """The largest entries all in the third window of a segment of five: the others count 0."""
    codec = make_compressor("topk", ratio=0.001, encoding="bf16")
    d = 5 * 2 ** 16 - 3
    x = gaussian(d, 17) * 1e-3
    x[2 * 2 ** 16 + 5:2 * 2 ** 16 + 5000:7] = 100.0 + torch.arange(0, 4995, 7).float()
    pieces = Pieces.from_lengths([d])
    payload = codec.encode(x, pieces)
    k = codec.counts(pieces)[0]
    assert payload[:20].view(torch.int32).tolist() == [0, 0, k, 0, 0]
    out = codec.decode(payload, pieces)
    assert torch.equal(out.nonzero().squeeze(1), torch.arange(2 * 2 ** 16 + 5, 2 * 2 ** 16 + 5000, 7)[-k:])
    assert torch.equal(out[out != 0], x[out != 0].to(torch.bfloat16).float())


@pytest.mark.parametrize("rid", RULES)
@pytest.mark.parametrize("lid", ["7", "70000", "1e6+3", "mixed"])
def test_bf16_feedback_keeps_what_the_rounding_drops(lid, rid):
    """EF's error is y - the bf16 values sent (not 0) at the kept entries, Markov's sequence
    adds the values sent: the state follows the decoded payload, in the kernel and in torch."""
    rule, alpha = RULES[rid]
    codec = make_compressor("topk", ratio=0.01, encoding="bf16")
    pieces = Pieces.from_lengths(LAYOUTS[lid])
    x, h0 = gaussian(pieces.numel, 18), gaussian(pieces.numel, 19) * 0.5
    y = x + alpha * h0
    for path in ("kernel", "torch"):
        h = h0.clone() if rule != "none" else None
        if path == "kernel":
            payload = codec.encode_fused(x, pieces, FeedbackStep(h, alpha, rule))
        else:
            with torch_path():
                payload = codec.encode_fused(x, pieces, FeedbackStep(h, alpha, rule))
        c = codec.decode(payload, pieces)
        if rule == "markov":
            assert torch.equal(h, h0 + c)
        elif rule == "ef":
            assert torch.equal(h, y - c)
            kept = c != 0
            assert h[kept].abs().max() <= y[kept].abs().max() * 2 ** -8 and h[kept].ne(0).any()


def test_bf16_bytes_do_not_depend_on_the_thread_count():
    codec = make_compressor("topk", ratio=0.02, encoding="bf16")
    pieces = Pieces.from_lengths(LAYOUTS["mixed"] + [2 ** 20, 10 ** 6 + 3])
    x, h0 = tied(pieces.numel, 20) + gaussian(pieces.numel, 21) * 1e-3, gaussian(pieces.numel, 22)
    results = []
    for n in (1, 2):
        h = h0.clone()
        with threads(n):
            results.append((codec.encode_fused(x, pieces, FeedbackStep(h, 1.0, "ef")), h))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("two_way", [True, False], ids=["two_way", "one_way"])
@pytest.mark.parametrize("rule", ["ef", "markov"])
def test_bf16_pipeline_same_with_and_without_the_kernel(rule, two_way, monkeypatch):
    check_pipeline_with_and_without_kernel(monkeypatch, topk_module, "topk_encode",
                                           make_compressor("topk", ratio=0.05, encoding="bf16"), rule, two_way,
                                           gaussian, seed=23, tol=0)


@pytest.mark.parametrize("encoding", ["fp32", "bf16"])
@pytest.mark.parametrize("lid", ["7", "70000", "1e6+3", "mixed"])
def test_decode_kernel_matches_the_torch_path(lid, encoding):
    """decode (into a dirty buffer) and decode_add write the entries the torch path's index_put_
    and index_add_ write, bit for bit, in both encodings."""
    codec = make_compressor("topk", ratio=0.02, encoding=encoding)
    pieces = Pieces.from_lengths(LAYOUTS[lid])
    x, acc0 = gaussian(pieces.numel, 24), gaussian(pieces.numel, 25)
    payload = codec.encode(x, pieces)
    assert codec._kernel_decodes(payload, acc0)
    out, acc = torch.full((pieces.numel,), float("nan")), acc0.clone()
    codec.decode(payload, pieces, out=out)
    codec.decode_add(payload, pieces, acc)
    with torch_path():
        assert not codec._kernel_decodes(payload, acc0)
        ref_out = codec.decode(payload, pieces, out=torch.full((pieces.numel,), float("nan")))
        ref_acc = codec.decode_add(payload, pieces, acc0.clone())
    assert torch.equal(out, ref_out) and torch.equal(acc, ref_acc)
    assert int((out != 0).sum()) == sum(codec.counts(pieces))
