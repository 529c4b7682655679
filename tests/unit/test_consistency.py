"""taciturn.consistency: ``check_same`` (every rank raises, naming the first difference, instead
of a hang), ``first_difference``'s wording, and the non-finite and divergence checks, which
give every rank the same answer. The multi-rank cases run on 2 and 3 gloo ranks."""
from __future__ import annotations

import pytest
import torch

from taciturn import LocalCommunicator, make_communicator
from taciturn.consistency import any_nonfinite, check_same, checksums, first_difference, first_divergence


def signature(odd: bool, case: str) -> dict:
    """The signature a rank builds in ``case``; ``odd``: the one rank (the last) that differs."""
    sig = {"optimizer": "CDAdam", "params": [((3, 4), "torch.float32"), ((4,), "torch.float32")],
           "hyperparameters": [{"lr": 0.1}], "exchanges": {"grad": "BlockSign(block_size=1024)"}}
    if case == "shape" and odd:
        sig["params"] = [((3, 5), "torch.float32"), ((4,), "torch.float32")]
        sig["hyperparameters"] = [{"lr": 0.2}]  # a later key differs too: the first one is named
    elif case == "count" and odd:
        sig["params"] = sig["params"][:1]
    elif case == "hyper" and odd:
        sig["hyperparameters"] = [{"lr": 0.2}]
    elif case == "optimizer" and odd:
        sig["optimizer"] = "SparsAMS"
    elif case == "extra_key" and odd:
        sig["compressor_version"] = 2
    return sig


CASES = ("same", "shape", "count", "hyper", "optimizer", "extra_key")


def _outcome(fn):
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return None


def _consistency_rank(rank, world_size):
    comm = make_communicator("gloo")
    odd = rank == world_size - 1
    out = {}
    for case in CASES:
        out[case] = _outcome(lambda: check_same(comm, "Owner", signature(odd, case), "model and optimizer"))
    # after every case the ranks are still in step: one more collective completes everywhere
    t = torch.ones(1)
    comm.all_reduce(t)
    out["in_step"] = t.item()
    nan = torch.tensor([1.0, float("nan") if odd else 2.0])
    inf = torch.tensor([float("inf") if rank == 0 else 0.0])
    out["nonfinite"] = (any_nonfinite(comm, [torch.ones(3), nan]), any_nonfinite(comm, [inf]),
                        any_nonfinite(comm, [torch.ones(2)]), any_nonfinite(comm, []))
    a, b = torch.arange(6.0).view(2, 3), torch.tensor([0.5, -1.5])
    if odd:
        b = b.flip(0)  # same sum, elements swapped
    out["divergence"] = (first_divergence(comm, [a, b], ["fc.weight", "fc.bias"]), first_divergence(comm, [a, b]),
                         first_divergence(comm, [a]))
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def ranks(request, run_ranks):
    return request.param, run_ranks(_consistency_rank, request.param, timeout=60)


def test_equal_signatures_pass_on_every_rank(ranks):
    n, per_rank = ranks
    assert [r["same"] for r in per_rank] == [None] * n
    assert [r["in_step"] for r in per_rank] == [n] * n


def test_a_different_shape_raises_on_every_rank_naming_the_first_difference(ranks):
    n, per_rank = ranks
    odd = n - 1
    for rank, r in enumerate(per_rank):
        msg = r["shape"]
        assert msg is not None, f"rank {rank} did not raise"
        other = 0 if rank == odd else odd  # the first rank whose signature differs from this one's
        mine, theirs = ("(3, 5)", "(3, 4)") if rank == odd else ("(3, 4)", "(3, 5)")
        assert msg == (f"Owner: rank {other} and rank {rank} disagree on params: parameter #0 is {theirs} "
                       f"torch.float32 on one and {mine} torch.float32 on the other. Every rank must build the "
                       "same model and optimizer.")


def test_other_differences_are_named_on_every_rank(ranks):
    n, per_rank = ranks
    for rank, r in enumerate(per_rank):
        theirs_first = rank != n - 1
        assert r["count"] is not None and "disagree on params: " in r["count"]
        assert ("1 vs 2 parameters" if theirs_first else "2 vs 1 parameters") in r["count"]
        # the other rank's value first ("on one"), this rank's second ("on the other")
        a, b = ("0.2", "0.1") if theirs_first else ("0.1", "0.2")
        assert r["hyper"] is not None and (f"disagree on hyperparameters: entry #0 is {{'lr': {a}}} on one and "
                                           f"{{'lr': {b}}} on the other.") in r["hyper"]
        a, b = ("'SparsAMS'", "'CDAdam'") if theirs_first else ("'CDAdam'", "'SparsAMS'")
        assert r["optimizer"] is not None and f"disagree on optimizer: {a} vs {b}." in r["optimizer"]


def test_a_key_only_one_rank_has_raises_on_every_rank(ranks):
    # the ranks without the key must raise too, or they would go on alone into a collective
    n, per_rank = ranks
    assert "disagree on compressor_version: None vs 2" in per_rank[-1]["extra_key"]  # the rank that has it
    raised = [r["extra_key"] is not None for r in per_rank]
    assert raised == [True] * n, f"raised per rank: {raised}"


def test_nonfinite_ranks_are_the_same_list_everywhere(ranks):
    n, per_rank = ranks
    for r in per_rank:
        assert r["nonfinite"] == ([n - 1], [0], [], [])


def test_divergence_names_the_first_differing_tensor_everywhere(ranks):
    n, per_rank = ranks
    for r in per_rank:
        named, numbered, agree = r["divergence"]
        assert named == f"parameter fc.bias (shape (2,)) differs between rank 0 and rank(s) [{n - 1}]"
        assert numbered == f"parameter #1 (shape (2,)) differs between rank 0 and rank(s) [{n - 1}]"
        assert agree is None


# ----------------------------------------------------------------------------- one process

def test_one_rank_never_disagrees():
    comm = LocalCommunicator()
    check_same(comm, "Owner", {"params": [((2,), "torch.float32")], "x": float("nan")}, "model")
    assert any_nonfinite(comm, [torch.tensor([float("nan")])]) == [0]
    assert any_nonfinite(comm, [torch.ones(2)]) == []
    assert first_divergence(comm, [torch.ones(2)]) is None


def test_first_difference_wording():
    p = [((8, 6), "torch.float32"), ((6,), "torch.bfloat16")]
    q = [((8, 6), "torch.float32"), ((6,), "torch.float16")]
    assert first_difference("params", p, q) == \
        "parameter #1 is (6,) torch.bfloat16 on one and (6,) torch.float16 on the other"
    assert first_difference("parameters", p[:1], p) == "1 vs 2 parameters"
    # other lists: entries, shown with repr
    assert first_difference("names", ["fc.weight", "fc.bias"], ["fc.weight", "fc2.bias"]) == \
        "entry #1 is 'fc.bias' on one and 'fc2.bias' on the other"
    # anything else: both values
    assert first_difference("lr", 0.1, 0.2) == "0.1 vs 0.2"
    assert first_difference("exchanges", {"grad": "a"}, {"grad": "b"}) == "{'grad': 'a'} vs {'grad': 'b'}"
    assert first_difference("params", [1], (1,)) == "[1] vs (1,)"


def test_first_difference_counts_entries_in_plain_english():
    # lists of other entries than parameters are counted as "entries"
    assert first_difference("names", ["a"], ["a", "b"]) == "1 vs 2 entries"


def test_checksums_see_a_changed_and_a_moved_element():
    x = torch.tensor([1.0, -2.0, 3.5, 0.25])
    rows = checksums([x, x.view(2, 2)])
    assert rows.dtype == torch.float64 and rows.shape == (2, 2)
    # the sum and the 1-based position-weighted sum
    assert rows[0].tolist() == [2.75, 1.0 - 4.0 + 10.5 + 1.0]
    assert torch.equal(rows[0], rows[1])  # the shape does not count, the elements do
    changed = x.clone()
    changed[2] = torch.nextafter(changed[2], torch.tensor(4.0))  # one ulp of float32
    moved = x[[1, 0, 2, 3]]
    for other in (changed, moved):
        assert not torch.equal(checksums([other])[0], rows[0])
    assert checksums([moved])[0, 0] == rows[0, 0]  # a swap keeps the plain sum: the weighted one sees it
    assert torch.equal(checksums([x.half()]), checksums([x.half().double()]))
