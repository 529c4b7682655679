"""The two-level exchange (ALGORITHMS.md, "Two-level exchange") on 4 real gloo ranks as 2 nodes x 2.

- with Markov and EF it equals the plain single-server pseudo-code of 2 workers whose
  gradients are the node means (conftest's ``simulate``); identity gives the exact mean;
- ranks_per_node=1 is the flat pipeline bit for bit; ranks stay bit-identical;
- bytes across nodes are 1/L of the flat pipeline's per rank, the rest moves inside the node;
- sharded state composes: the owners serve quarters of the buckets, state 4/L + 20/n bytes per
  parameter;
- a checkpoint resumes bit-identically; bad topologies are refused on every rank, no hang.
"""
from __future__ import annotations

import copy

import pytest
import torch

import taciturn
from taciturn import Exchange, make_communicator, make_compressor
from taciturn.consistency import checksums
from taciturn.feedback import make_feedback

SIZES = [700, 1500, 33, 2100, 5000, 64]
CAP = 6000 * 4 / 2 ** 20  # two buckets
STEPS = 4
CASES = [("block_sign", "markov"), ("block_sign", "ef"), ("identity", "none")]


def _inputs(rank, t):
    g = torch.Generator().manual_seed(100 * t + rank)
    return [torch.randn(s, generator=g) * (i + 1) for i, s in enumerate(SIZES)]


def _exchange_rank(rank, world, intra_dtype):
    comm = make_communicator("gloo")
    out = {}
    for name, rule in CASES:
        ex = Exchange(SIZES, make_compressor(name), make_feedback(rule), make_feedback(rule), comm,
                      bucket_cap_mb=CAP, ranks_per_node=2, intra_node_dtype=intra_dtype)
        states = ex.init_state()
        stats = taciturn.metrics.CommStats()
        results = [torch.cat([r.reshape(-1) for r in ex.allreduce(_inputs(rank, t), states, step=t, stats=stats)])
                   for t in range(STEPS)]
        flat = Exchange(SIZES, make_compressor(name), make_feedback(rule), make_feedback(rule), comm,
                        bucket_cap_mb=CAP)
        fstates = flat.init_state()
        flat_results = [torch.cat([r.reshape(-1) for r in flat.allreduce(_inputs(rank, t), fstates, step=t)])
                        for t in range(STEPS)]
        one = Exchange(SIZES, make_compressor(name), make_feedback(rule), make_feedback(rule), comm,
                       bucket_cap_mb=CAP, ranks_per_node=1)
        ostates = one.init_state()
        one_results = [torch.cat([r.reshape(-1) for r in one.allreduce(_inputs(rank, t), ostates, step=t)])
                       for t in range(STEPS)]
        out[(name, rule)] = {"results": torch.stack(results), "flat": torch.stack(flat_results),
                             "one": torch.stack(one_results), "wire": ex.wire_bytes(), "flat_wire": flat.wire_bytes(),
                             "intra_bytes": stats.last["bytes_intra"], "up": stats.last["bytes_up"],
                             # one server per bucket: block sign's blocks do not depend on the cuts
                             "buckets": [([SIZES[i] for i in b], [0, sum(SIZES[i] for i in b)]) for b in flat.buckets]}
    return out


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def exchanged(request, run_ranks):
    return request.param, run_ranks(_exchange_rank, 4, request.param, timeout=120)


def _node_means(dtype):
    """xs[t][node]: the node mean as the intra-node reduce-scatter computes it (rank order)."""
    out = []
    for t in range(STEPS):
        per_rank = [torch.cat(_inputs(r, t)) for r in range(4)]
        if dtype == "bf16":
            per_rank = [x.bfloat16().float() for x in per_rank]
        out.append([(per_rank[0] + per_rank[1]) / 2, (per_rank[2] + per_rank[3]) / 2])
    return out


def test_two_nodes_of_two_equal_the_pseudo_code_of_two_workers(exchanged, simulate):
    dtype, ranks = exchanged
    xs = _node_means(dtype)
    for name, rule in CASES:
        first = ranks[0][(name, rule)]
        for r in ranks[1:]:
            assert torch.equal(r[(name, rule)]["results"], first["results"]), (name, rule)  # bit-identical
        expected = simulate(xs, first["buckets"], name, {}, rule, True, [1.0] * STEPS)
        rtol = 1e-5
        if dtype == "bf16":  # the all-gather inside the node casts the result to bf16 too: a value within
            expected = expected.bfloat16().float()  # float rounding of a bf16 tie may land one bf16 ulp away
            rtol = 2 ** -7
        torch.testing.assert_close(first["results"], expected, rtol=rtol, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_identity_gives_the_exact_mean_and_one_rank_per_node_is_flat(exchanged):
    dtype, ranks = exchanged
    if dtype == "fp32":
        exact = torch.stack([torch.stack([torch.cat(_inputs(r, t)) for r in range(4)]).mean(0) for t in range(STEPS)])
    else:  # the mean of the bf16-cast inputs, cast to bf16 again by the all-gather
        exact = torch.stack([((a + b) / 2).bfloat16().float() for a, b in _node_means("bf16")])
    for r in ranks:
        case = r[("identity", "none")]
        torch.testing.assert_close(case["results"], exact, rtol=1e-6, atol=1e-6)
        for key in r:
            assert torch.equal(r[key]["one"], r[key]["flat"])  # ranks_per_node=1: the flat pipeline


def test_bytes_across_nodes_shrink_by_the_node_size(exchanged):
    dtype, ranks = exchanged
    for r in ranks:
        case = r[("block_sign", "markov")]
        assert case["up"] == case["wire"]["up"] > 0
        # each rank carries its half of the bucket across nodes: about half the flat per-rank payload
        assert case["wire"]["up"] <= 0.6 * case["flat_wire"]["up"]
        assert case["intra_bytes"] == case["wire"]["intra"] >= (4 if dtype == "fp32" else 2) * sum(SIZES)
        assert case["wire"]["fp32"] / case["wire"]["up"] > 25


def _optimizer_rank(rank, world, directory, kw):
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Tanh(), torch.nn.Linear(24, 7))

    def train(opt, m, steps, start):
        sums = []
        for t in range(start, start + steps):
            g = torch.Generator().manual_seed(1000 * t + rank)
            x, y = torch.randn(6, 40, generator=g), torch.randn(6, 7, generator=g)
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            sums.append(checksums(list(m.parameters())))
        return sums

    m = model()
    opt = taciturn.CDAdam(m.parameters(), lr=0.01, ranks_per_node=2, check_divergence_every=1, **kw)
    train(opt, m, 4, 0)
    saved = copy.deepcopy({"model": m.state_dict(), "opt": opt.state_dict()})
    full = train(opt, m, 4, 4)
    m = model()
    opt = taciturn.CDAdam(m.parameters(), lr=0.01, ranks_per_node=2, **kw)
    m.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    resumed = train(opt, m, 4, 4)
    return {"full": full, "resumed": resumed, "intra": opt.metrics()["taciturn/bytes_intra"]}


@pytest.mark.parametrize("kw", [{}, {"shard_state": True}], ids=["replicated", "sharded"])
def test_cdadam_two_level_resumes_bit_identically(run_ranks, tmp_path, kw):
    ranks = run_ranks(_optimizer_rank, 4, str(tmp_path), kw, timeout=120)
    for r in ranks:
        assert r["intra"] > 0
        for a, b in zip(r["full"], r["resumed"]):
            assert torch.equal(a, b)
        for a, b in zip(r["full"], ranks[0]["full"]):
            assert torch.equal(a, b)


def _refusal_rank(rank, world, case):
    size = {"not_multiple": 2, "differs": 2 if rank == 0 else 1, "bad_value": 0}[case]
    try:
        taciturn.CDAdam(torch.nn.Linear(4, 3).parameters(), ranks_per_node=size)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("case,world,text", [
    ("not_multiple", 3, "the world of 3 ranks is not a whole number of nodes of ranks_per_node=2"),
    ("differs", 2, "ranks disagree on ranks_per_node: rank 0 has 2, rank 1 has 1"),
    ("bad_value", 2, "rank 0 has ranks_per_node=0: give a positive int"),
])
def test_bad_topologies_are_refused_on_every_rank(run_ranks, case, world, text):
    messages = run_ranks(_refusal_rank, world, case, timeout=60)
    assert all(m is not None and text in m and "Every rank raises this" in m for m in messages), messages


def _launcher_rank(rank, world):
    import os

    os.environ.update(LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    ok = taciturn.CDAdam(torch.nn.Linear(4, 3).parameters()).comm.world_size  # one rank per node: always fine
    os.environ["LOCAL_RANK"] = str((rank + 1) % world)  # a launcher that placed the ranks out of order
    try:
        taciturn.CDAdam(torch.nn.Linear(4, 3).parameters(), ranks_per_node="auto")
        refused = None
    except ValueError as err:
        refused = str(err)
    return ok, refused


def test_auto_reads_the_launcher_and_refuses_ranks_out_of_order(run_ranks):
    for ok, refused in run_ranks(_launcher_rank, 2, timeout=60):
        assert ok == 2
        assert refused is not None and "rank 0 is local rank 1 of its node, not 0" in refused



def _sharded_rank(rank, world):
    def run(cls, **kw):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Tanh(), torch.nn.Linear(24, 7))
        opt = cls(m.parameters(), lr=0.01, bucket_cap_mb=0.002, ranks_per_node=2, check_divergence_every=1, **kw)
        for t in range(6):
            g = torch.Generator().manual_seed(1000 * t + rank)
            x, y = torch.randn(6, 40, generator=g), torch.randn(6, 7, generator=g)
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 256)), torch.nn.Parameter(torch.randn(16384))]
    opt = taciturn.CDAdam(params, shard_state=True, ranks_per_node=2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    tensors = [t for t in opt.compression.flat.values() if torch.is_tensor(t)]
    tensors += [t for p in params for t in opt.state[p].values() if torch.is_tensor(t)]
    return {"amsgrad": run(taciturn.AMSGrad), "amsgrad_sharded": run(taciturn.AMSGrad, shard_state=True, downlink="fp32"),
            "cdadam_sharded": run(taciturn.CDAdam, shard_state=True),
            "state": sum(t.numel() * t.element_size() for t in tensors) / sum(p.numel() for p in params)}


def test_sharded_state_composes_with_two_levels(run_ranks):
    ranks = run_ranks(_sharded_rank, 4, timeout=120)
    for r in ranks:
        for key in ("amsgrad", "amsgrad_sharded", "cdadam_sharded"):
            assert torch.equal(r[key], ranks[0][key])  # ranks bit-identical (the guard ran every step)
        # the owners run AMSGrad on their part of the node-averaged aggregate: the unsharded two-level run
        torch.testing.assert_close(r["amsgrad_sharded"], r["amsgrad"], rtol=1e-6, atol=1e-7)
        # h on the rank's shard (1/L); H, m, v, v^ and the downlink error on its 1/n of the bucket
        assert r["state"] == 4 / 2 + 20 / 4


def _corrected_rank(rank, world):
    try:
        taciturn.SparsAMS(torch.nn.Linear(4, 3).parameters(), momentum_correction=True, ranks_per_node=2)
    except ValueError as err:
        return str(err)
    return None


def test_momentum_correction_refused_with_two_levels_on_every_rank(run_ranks):
    """The mask reads each rank's own error feedback, which a two-level exchange keeps per node."""
    messages = run_ranks(_corrected_rank, 4, timeout=60)
    assert all(m is not None and "ranks_per_node=2" in m and "drop momentum_correction" in m for m in messages), messages
