"""taciturn.exchange: buckets from ``bucket_cap_mb`` and groups, the one entry ``allreduce`` and
its inputs, the seed rule, and on 2 and 3 real gloo ranks: the exact mean through the identity
codec, two-way (majority vote) against one-way (average) for plain signs, the bytes actually
handed to the collectives against ``wire_bytes``, and bit-identical results on every rank.

(The comparison with the single-server pseudo-code and the counted bytes per step are in
tests/distributed/test_allreduce.py; the layouts of one bucket in test_layout.py.)"""
from __future__ import annotations

import math

import pytest
import torch

from taciturn import Communicator, Exchange, LocalCommunicator, make_communicator, make_compressor
from taciturn.comm import Handle
from taciturn.exchange import bucket_seed
from taciturn.feedback import make_feedback


def pad8(nbytes):
    return -(-nbytes // 8) * 8


def mb(elements):
    """``bucket_cap_mb`` for a cap of ``elements`` fp32 elements."""
    return elements * 4 / 2 ** 20


def exchange(sizes, codec="identity", rule="none", server=None, comm=None, two_way=True, cap=None, groups=None,
             **opts):
    return Exchange(sizes, make_compressor(codec, **opts), make_feedback(rule), make_feedback(server or rule),
                    comm or LocalCommunicator(), two_way=two_way, bucket_cap_mb=None if cap is None else mb(cap),
                    groups=groups)


# ----------------------------------------------------------------------------- buckets

def test_buckets_from_the_cap_in_megabytes_and_the_groups():
    sizes = [300, 200, 10, 500, 50]
    # cap 400 elements: a tensor that overflows a bucket holding >= half the cap starts the next one
    ex = exchange(sizes, cap=400)
    assert [list(b) for b in ex.buckets] == [[0], [1, 2], [3], [4]]
    assert [lay.sizes for lay in ex.layouts] == [(300,), (200, 10), (500,), (50,)]
    assert [lay.numel for lay in ex.layouts] == [300, 210, 500, 50] and ex.numel == 1060
    # a group change always closes a bucket; the 10 then joins the 500 (10 < half the cap)
    grouped = exchange(sizes, cap=400, groups=[0, 0, 1, 1, 1])
    assert [list(b) for b in grouped.buckets] == [[0], [1], [2, 3], [4]]
    # None: one bucket of everything (unless groups split it)
    assert [list(b) for b in exchange(sizes).buckets] == [[0, 1, 2, 3, 4]]
    assert [list(b) for b in exchange(sizes, groups=[0, 0, 0, 1, 1]).buckets] == [[0, 1, 2], [3, 4]]
    # the default is 25 MB of fp32: 6,553,600 elements
    default = Exchange([6_553_600, 1, 6_553_599, 1], make_compressor("identity"), make_feedback("none"),
                       make_feedback("none"), LocalCommunicator())
    assert [list(b) for b in default.buckets] == [[0], [1, 2], [3]]
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match=f"bucket_cap_mb={bad!r} must be > 0"):
            Exchange([3], make_compressor("identity"), make_feedback("none"), make_feedback("none"),
                     LocalCommunicator(), bucket_cap_mb=bad)


def test_layouts_are_for_this_world_and_the_bound_compressor():
    class Three(Communicator):
        world_size = 3

    ex = exchange([10, 20], "topk", comm=Three(), k=6)
    assert all(lay.world_size == 3 for lay in ex.layouts)
    # an absolute k is bound to the exchange's 30 elements: a ratio of 1/5
    assert ex.compressor.k is None and ex.compressor.ratio == pytest.approx(0.2)
    assert ex.wire_bytes()["fp32"] == 4 * 30


def test_signature_names_what_a_saved_state_must_match():
    base = exchange([10, 20], "block_sign", "markov", cap=15, block_size=4)
    assert base.signature() == exchange([10, 20], "block_sign", "markov", cap=15, block_size=4).signature()
    for other in (exchange([10, 20], "block_sign", "markov", cap=15, block_size=8),
                  exchange([10, 20], "block_sign", "ef", cap=15, block_size=4),
                  exchange([10, 20], "block_sign", "markov", cap=15, two_way=False, block_size=4),
                  exchange([10, 20], "block_sign", "markov", block_size=4)):
        assert other.signature() != base.signature()


# ----------------------------------------------------------------------------- allreduce at n = 1

def test_inputs_per_tensor_or_flat_per_bucket_and_the_results_shapes():
    ex = exchange([6, 4, 5], cap=9)  # buckets [6] and [4, 5]
    assert [list(b) for b in ex.buckets] == [[0], [1, 2]]
    xs = [torch.arange(6.0).view(2, 3), torch.arange(4.0).to(torch.bfloat16), -torch.arange(5.0).half()]
    out = ex.allreduce(xs, ex.init_state())
    assert [r.shape for r in out] == [(2, 3), (4,), (5,)] and all(r.dtype == torch.float32 for r in out)
    assert all(torch.equal(r, x.float()) for r, x in zip(out, xs))  # one rank, fp32 both ways: itself
    flat = ex.allreduce([torch.ones(6), torch.full((9,), 2.0)], ex.init_state())
    assert [r.shape for r in flat] == [(6,), (9,)] and flat[1].eq(2).all()
    # a subset of the buckets, in the caller's order
    part = ex.allreduce(xs[1:], ex.init_state()[1:], buckets=[1])
    assert [r.shape for r in part] == [(4,), (5,)]
    with pytest.raises(ValueError, match="2 buckets need 2 states, got 1"):
        ex.allreduce(xs, ex.init_state()[:1])
    with pytest.raises(ValueError, match=r"the exchange's buckets \[0, 1\] hold 3 tensors: .*got 2 tensors"):
        ex.allreduce(xs[:2], ex.init_state())
    with pytest.raises(ValueError, match="got 1 tensors"):
        ex.allreduce([torch.ones(6)], ex.init_state()[1:], buckets=[1])


def test_split_views_per_bucket_flats_as_the_tensors():
    ex = exchange([6, 4, 5], cap=9)
    flats = [torch.arange(6.0), torch.arange(9.0) + 100]
    views = ex.split(flats, [torch.Size([2, 3]), torch.Size([4]), torch.Size([5])])
    assert [v.shape for v in views] == [(2, 3), (4,), (5,)]
    assert views[2].tolist() == [104.0, 105.0, 106.0, 107.0, 108.0]
    views[1][0] = -1.0
    assert flats[1][0] == -1.0  # views, not copies


def test_error_scale_per_group():
    """EF's error is rescaled by its group's s: s = 0 drops it (a fresh compression of x)."""
    codec = make_compressor("scaled_sign")
    ex = exchange([8, 8], "scaled_sign", "ef", "none", two_way=False, groups=[0, 1])
    assert [list(b) for b in ex.buckets] == [[0], [1]]
    states = ex.init_state()
    gen = torch.Generator().manual_seed(0)
    x0, x1 = [torch.randn(8, generator=gen) for _ in range(2)], [torch.randn(8, generator=gen) for _ in range(2)]
    ex.allreduce(x0, states, error_scale=[1.0, 1.0])
    errors = [x - codec.compress(x) for x in x0]
    for st, e in zip(states, errors):
        torch.testing.assert_close(st["worker_error"], e, rtol=1e-6, atol=1e-6)
    out = ex.allreduce(x1, states, step=1, error_scale=[0.5, 0.0])
    torch.testing.assert_close(out[0], codec.compress(x1[0] + 0.5 * errors[0]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1], codec.compress(x1[1]), rtol=1e-6, atol=1e-6)


def test_random_codec_seeds_by_step_and_bucket_and_seed_slot_places_one_bucket():
    sizes = [40, 30, 50]
    full = exchange(sizes, "randk", two_way=False, cap=40, ratio=0.25)
    assert len(full.buckets) == 3
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, generator=gen) for n in sizes]
    # the results are valid until the next call (they may alias the exchange's workspace): copies
    steps = [[r.clone() for r in full.allreduce(xs, full.init_state(), step=t)] for t in range(2)]
    for res in steps:
        for r, x in zip(res, xs):
            kept = r.ne(0)
            # randk keeps ceil(ratio * d) of x's own entries, unscaled
            assert int(kept.sum()) == math.ceil(0.25 * x.numel())
            assert torch.equal(r[kept], x[kept])
    assert any(not torch.equal(a.ne(0), b.ne(0)) for a, b in zip(*steps)), "the step does not change the seed"
    assert bucket_seed(1, 2, 3) == 5 and bucket_seed(0, 0, 3) == 0
    # one bucket alone, placed in the caller's bucketing, draws what the bucket drew in the full exchange
    for b, n in enumerate(sizes):
        alone = exchange([n], "randk", two_way=False, ratio=0.25)
        got = alone.allreduce([xs[b]], alone.init_state(), step=1, seed_slot=(b, 3))[0]
        assert torch.equal(got, steps[1][b])
    unplaced = exchange([sizes[1]], "randk", two_way=False, ratio=0.25)
    assert not torch.equal(unplaced.allreduce([xs[1]], unplaced.init_state(), step=1)[0], steps[1][1])


# ----------------------------------------------------------------------------- 2 and 3 ranks

SHAPES = [((5, 3), torch.float32), ((7,), torch.bfloat16), ((2,), torch.float16), ((4, 4), torch.float32),
          ((1,), torch.float32)]
SIZES = [math.prod(s) for s, _ in SHAPES]
GROUPS = [0, 0, 0, 0, 1]
CAP = 20  # buckets [15], [7, 2, 16] and, in its own group, [1]: smaller than the world
STEPS = 2


def int_inputs(step, rank):
    """Small integers (zeros included): exact in every dtype, and their sums exact in fp32."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randint(-8, 9, shape, generator=gen).to(dtype) for shape, dtype in SHAPES]


def normal_inputs(step, rank):
    gen = torch.Generator().manual_seed(1000 + 100 * step + rank)
    return [torch.randn(shape, generator=gen).to(dtype) for shape, dtype in SHAPES]


def flat(tensors):
    return torch.cat([t.float().reshape(-1) for t in tensors])


class Recording(Communicator):
    """A communicator that writes down the bytes every collective is handed and returns."""

    def __init__(self, inner):
        self.inner, self.rank, self.world_size, self.device = inner, inner.rank, inner.world_size, inner.device
        self.calls = []

    def _recorded(self, kind, sent, handle):
        def wait():
            out = handle.wait()
            self.calls.append((kind, sent, out.numel(), out.dtype))
            return out
        return Handle(wait)

    def all_to_all_async(self, chunks):
        return self._recorded("all_to_all", sum(c.numel() for c in chunks), self.inner.all_to_all_async(chunks))

    def all_gather_async(self, t):
        return self._recorded("all_gather", t.numel(), self.inner.all_gather_async(t))


EXACT = [(mode, rule) for mode in ("two_way", "one_way") for rule in ("none", "ef", "markov")]
VOTE = ("two_way", "one_way")
SIGNS = {  # (codec, options, worker, server, two-way)
    "scaled_sign-ef": ("scaled_sign", {}, "ef", "ef", True),
    "block_sign-markov": ("block_sign", {"block_size": 4}, "markov", "markov", True),
    "block_sign-markov-one_way": ("block_sign", {"block_size": 4}, "markov", "markov", False),
    "sign-none": ("sign", {}, "none", "none", True),
    "scaled_sign_l2-ef-one_way": ("scaled_sign_l2", {}, "ef", "none", False),
}


def _exchange_rank(rank, world_size):
    torch.manual_seed(rank)  # nothing may depend on it: every rank's results must agree anyway
    gloo = make_communicator("gloo")
    out = {"exact": {}, "vote": {}, "signs": {}}

    def build(codec, opts, worker, server, two_way):
        comm = Recording(gloo)
        ex = Exchange(SIZES, make_compressor(codec, **opts), make_feedback(worker), make_feedback(server), comm,
                      two_way=two_way, bucket_cap_mb=mb(CAP), groups=GROUPS)
        return ex, comm

    for mode, rule in EXACT:
        ex, comm = build("identity", {}, rule, rule, mode == "two_way")
        states = ex.init_state()
        results = []
        for t in range(STEPS):
            results.append(flat(ex.allreduce(int_inputs(t, rank), states, step=t, error_scale=[1.0, 0.5])))
        out["exact"][(mode, rule)] = dict(results=results, states=states, calls=comm.calls,
                                          wire=ex.wire_bytes(), buckets=[list(b) for b in ex.buckets])
    for mode in VOTE:
        ex, comm = build("sign", {}, "none", "none", mode == "two_way")
        out["vote"][mode] = dict(result=flat(ex.allreduce(int_inputs(0, rank), ex.init_state())), calls=comm.calls,
                                 wire=ex.wire_bytes())
    for name, spec in SIGNS.items():
        ex, comm = build(*spec)
        states = ex.init_state()
        results = [flat(ex.allreduce(normal_inputs(t, rank), states, step=t, error_scale=[1.0, 2.0 - t]))
                   for t in range(3)]
        out["signs"][name] = dict(results=results, calls=comm.calls, wire=ex.wire_bytes())
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def ranks(request, run_ranks):
    return request.param, run_ranks(_exchange_rank, request.param, timeout=90)


@pytest.mark.parametrize("mode,rule", EXACT, ids=["-".join(c) for c in EXACT])
def test_identity_gives_the_exact_mean_on_every_rank(ranks, mode, rule):
    n, per_rank = ranks
    assert per_rank[0]["exact"][(mode, rule)]["buckets"] == [[0], [1, 2, 3], [4]]
    for t in range(STEPS):
        mean = torch.stack([flat(int_inputs(t, r)) for r in range(n)]).sum(0) / n  # integer sums: exact
        for r in range(n):
            got = per_rank[r]["exact"][(mode, rule)]["results"][t]
            assert torch.equal(got, per_rank[0]["exact"][(mode, rule)]["results"][t])
            if rule == "markov" and t > 0:
                # through an exact codec the Markov sequences carry the means: the result is the
                # latest mean, as the previous one plus the mean of the differences (rounded twice)
                torch.testing.assert_close(got, mean, rtol=0, atol=1e-6)
            else:
                assert torch.equal(got, mean), f"rank {r} step {t}: max error {(got - mean).abs().max()}"
    if rule == "ef":  # nothing is lost, so no error is kept
        for r in range(n):
            assert not any(v.any() for st in per_rank[r]["exact"][(mode, rule)]["states"] for v in st.values())


def test_two_way_sends_back_the_majority_vote_one_way_the_average(ranks):
    n, per_rank = ranks
    signs = torch.stack([torch.where(flat(int_inputs(0, r)) >= 0, 1.0, -1.0) for r in range(n)])  # sign(0) = +1
    votes = signs.sum(0)
    for r in range(n):
        two, one = per_rank[r]["vote"]["two_way"]["result"], per_rank[r]["vote"]["one_way"]["result"]
        # two-way: the chunk's owner recompresses the mean: every element is its vote, a tie is +1
        assert torch.equal(two, torch.where(votes >= 0, 1.0, -1.0))
        # one-way: every rank averages the workers' payloads itself
        assert torch.equal(one, votes / n)
    if n == 2:
        assert per_rank[0]["vote"]["one_way"]["result"].eq(0).any()  # the inputs hold a tie


def _sent(calls, kind):
    return sum(c[1] for c in calls if c[0] == kind)


def _received(calls, kind):
    return sum(c[2] for c in calls if c[0] == kind)


def test_bytes_handed_to_the_collectives_are_wire_bytes(ranks):
    n, per_rank = ranks
    runs = [(r["exact"][case], 1 if case[0] == "two_way" else 0, STEPS) for r in per_rank for case in EXACT]
    runs += [(r["vote"][mode], mode == "two_way", 1) for r in per_rank for mode in VOTE]
    runs += [(r["signs"][name], SIGNS[name][4], 3) for r in per_rank for name in SIGNS]
    buckets = 3
    for run, two_way, steps in runs:
        calls, wire = run["calls"], run["wire"]
        assert all(dtype == torch.uint8 for *_, dtype in calls)
        kinds = [c[0] for c in calls]
        if two_way:
            # per bucket and step: the workers' chunks out (all_to_all), the servers' back (all_gather)
            assert kinds.count("all_to_all") == kinds.count("all_gather") == buckets * steps
            assert _sent(calls, "all_to_all") == steps * wire["up"]
            assert _received(calls, "all_gather") == steps * wire["down"]
        else:
            assert kinds == ["all_gather"] * buckets * steps
            assert _sent(calls, "all_gather") == steps * wire["up"]
            assert _received(calls, "all_gather") == steps * wire["down"] == n * steps * wire["up"]
        assert wire["fp32"] == 4 * sum(SIZES)


def test_wire_bytes_follow_the_codec(ranks):
    n, per_rank = ranks
    bucket_sizes = [[15], [7, 2, 16], [1]]
    one_way = per_rank[0]["exact"][("one_way", "none")]["wire"]
    # identity: 4 bytes an element, each payload padded to 8
    assert one_way["up"] == sum(pad8(4 * sum(s)) for s in bucket_sizes)
    # block sign of 4-element blocks restarting at every tensor: a scale per block, a bit per element
    sign = per_rank[0]["signs"]["block_sign-markov-one_way"]["wire"]
    assert sign["up"] == sum(pad8(4 * sum(-(-s // 4) for s in sizes) + -(-sum(sizes) // 8)) for sizes in bucket_sizes)
    # plain sign one-way: bits only
    assert per_rank[0]["vote"]["one_way"]["wire"]["up"] == sum(pad8(-(-sum(s) // 8)) for s in bucket_sizes)
    # two-way: n equal chunks of the largest chunk's payload, both ways
    two_way = per_rank[0]["exact"][("two_way", "none")]["wire"]
    assert two_way["up"] == two_way["down"]
    expected = sum(n * pad8(4 * -(-sum(s) // n)) for s in bucket_sizes)  # cuts at k * d // n
    assert two_way["up"] == expected


@pytest.mark.parametrize("name", SIGNS)
def test_sign_codecs_give_bit_identical_results_on_every_rank(ranks, name):
    n, per_rank = ranks
    first = per_rank[0]["signs"][name]["results"]
    for r in range(1, n):
        for t, (a, b) in enumerate(zip(first, per_rank[r]["signs"][name]["results"])):
            assert torch.equal(a, b), f"{name}: rank {r} differs from rank 0 at step {t}"
    codec, _, worker, server, two_way = SIGNS[name]
    if two_way and codec == "sign":
        assert all(res.abs().eq(1).all() for res in first)
    # a compressed result is not the plain mean
    mean = torch.stack([flat(normal_inputs(0, r)) for r in range(n)]).mean(0)
    assert not torch.allclose(first[0], mean, atol=1e-3)
