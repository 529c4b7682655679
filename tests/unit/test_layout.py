"""Bucket layout: units, two-way chunk cuts, pieces and payload sizes (and the bytes they imply)."""
from __future__ import annotations

import bisect

import pytest
import torch

from taciturn import BucketLayout, Communicator, Exchange, make_compressor
from taciturn.feedback import make_feedback
from taciturn.exchange import bucket_ranges

SIZE_SETS = {
    "one_tensor": [10 ** 5 + 3],
    "mixed": [700, 1500, 33, 2100, 5000, 64],
    "small_tensors": [3, 1, 1030, 7, 2048, 9],
}
WORLDS = [1, 2, 3, 4, 7]
CODECS = {"block_sign": {}, "block_sign_none": {"block_size": None}, "scaled_sign": {}, "topk": {"ratio": 0.1},
          "identity": {}}


def codec(cid):
    return make_compressor(cid.replace("_none", ""), **CODECS[cid])


def pad8(nbytes):
    return -(-nbytes // 8) * 8


def tensor_bounds(sizes):
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def unit_bounds(cid, sizes):
    """Unit edges: 1024-blocks restarting at every tensor for block_sign, else tensor edges."""
    if cid != "block_sign":
        return tensor_bounds(sizes)
    out, start = [0], 0
    for s in sizes:
        out.extend(range(start + 1024, start + s, 1024))
        start += s
        out.append(start)
    return out


def wire_bytes(cid, numel, pieces):
    """ALGORITHMS.md's table in taciturn's layout: fields of 4 bytes, 1-bit signs, padded to 8."""
    if cid == "identity":
        return pad8(4 * numel)
    if cid == "topk":
        return pad8(8 * sum(-(-n // 10) for n in pieces))
    return pad8(4 * len(pieces) + -(-numel // 8))


def chunk_piece_lengths(bounds, lo, hi):
    edges = sorted({lo, hi, *(b for b in bounds if lo < b < hi)})
    return [b - a for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("n", WORLDS, ids=lambda n: f"{n}ranks")
@pytest.mark.parametrize("sizes", SIZE_SETS, ids=str)
@pytest.mark.parametrize("cid", CODECS, ids=str)
def test_layout_units_cuts_pieces_and_bytes(cid, sizes, n):
    sizes = SIZE_SETS[sizes]
    lay = BucketLayout(tuple(sizes), n, codec(cid))
    numel = sum(sizes)
    bounds = unit_bounds(cid, sizes)
    assert lay.numel == numel
    # units: blocks of 1024 inside each tensor, never straddling two tensors
    assert lay.units.lengths() == [b - a for a, b in zip(bounds, bounds[1:])]
    cuts = lay.cuts
    assert len(cuts) == n + 1 and cuts[0] == 0 and cuts[-1] == numel
    assert all(a <= b for a, b in zip(cuts, cuts[1:]))
    if cid == "block_sign":
        # cut on block boundaries, each at the boundary nearest to k * numel / n
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        for k, cut in enumerate(cuts):
            assert cut in bounds
            assert abs(cut - k * numel / n) <= longest / 2
    else:
        assert cuts == [k * numel // n for k in range(n + 1)]
    for j in range(n):
        lo, hi = cuts[j], cuts[j + 1]
        assert lay.chunk(j) == slice(lo, hi) and lay.chunk_numel(j) == hi - lo
        lengths = chunk_piece_lengths(bounds, lo, hi)
        assert lay.chunk_pieces[j].lengths() == lengths
        # every piece maps to the unit that contains it
        starts = [lo + sum(lengths[:i]) for i in range(len(lengths))]
        assert lay.piece_unit[j].tolist() == [bisect.bisect_right(bounds, s) - 1 for s in starts]
    per_chunk = [wire_bytes(cid, cuts[j + 1] - cuts[j], chunk_piece_lengths(bounds, cuts[j], cuts[j + 1]))
                 for j in range(n)]
    assert lay.chunk_nbytes == max(per_chunk)
    assert lay.full_nbytes == wire_bytes(cid, numel, chunk_piece_lengths(bounds, 0, numel))


@pytest.mark.parametrize("cid", CODECS, ids=str)
def test_bucket_smaller_than_the_world_has_empty_chunks_that_encode(cid):
    c = codec(cid)
    lay = BucketLayout((3,), 4, c)
    assert lay.cuts[0] == 0 and lay.cuts[-1] == 3
    assert any(lay.chunk_numel(j) == 0 for j in range(4))
    assert lay.chunk_nbytes == 8  # one element or none per chunk: at most 5 bytes, padded
    x = torch.tensor([0.5, -2.0, 1.0])
    for j in range(4):
        pieces = lay.chunk_pieces[j]
        payload = c.encode(x[lay.chunk(j)], pieces)
        assert payload.numel() == c.nbytes(pieces) <= lay.chunk_nbytes
        assert c.decode(payload, pieces).numel() == lay.chunk_numel(j)


# ----------------------------------------------------------------------------- bytes per step


class SizedComm(Communicator):
    """Only the world size: enough to lay buckets out and count their bytes."""

    def __init__(self, n):
        self.world_size = n


# a 25M-parameter model: an embedding, biases, square layers, an odd tail; several 25 MB buckets
MODEL_25M = [15_627_264, 512] + [1_048_576, 1024] * 8 + [1_000_000, 7]


@pytest.mark.parametrize("n", [2, 4, 8], ids=lambda n: f"{n}ranks")
@pytest.mark.parametrize("cid,two_way,min_ratio", [("block_sign", True, 28), ("block_sign", False, 28),
                                                   ("scaled_sign", True, 31.9), ("identity", True, 0.99)],
                         ids=["block_sign-two_way", "block_sign-one_way", "scaled_sign-two_way", "identity-two_way"])
def test_bytes_per_direction_on_25m_parameters(cid, two_way, min_ratio, n):
    d = sum(MODEL_25M)
    assert 25_000_000 <= d < 25_100_000
    pipe = Exchange(MODEL_25M, codec(cid), make_feedback("markov"), make_feedback("markov"), SizedComm(n),
                    two_way=two_way)
    cap = 25 * 2 ** 20 // 4
    assert all(sum(MODEL_25M[i] for i in b) <= cap or len(b) == 1 for b in pipe.buckets)
    assert len(pipe.buckets) > 1
    up = down = 0
    for idx, lay in zip(pipe.buckets, pipe.layouts):
        sizes = [MODEL_25M[i] for i in idx]
        bounds = unit_bounds(cid, sizes)
        if two_way:
            cuts = lay.cuts
            chunk = max(wire_bytes(cid, cuts[j + 1] - cuts[j], chunk_piece_lengths(bounds, cuts[j], cuts[j + 1]))
                        for j in range(n))
            up += n * chunk
            down += n * chunk
        else:
            full = wire_bytes(cid, sum(sizes), chunk_piece_lengths(bounds, 0, sum(sizes)))
            up += full
            down += n * full
    assert pipe.wire_bytes() == {"up": up, "down": down, "fp32": 4 * d}
    # per direction: what one rank sends (up) and what it receives of the result per worker (down / n)
    assert 4 * d / up >= min_ratio
    assert 4 * d / (down if two_way else down / n) >= min_ratio


def test_bucket_ranges_keep_small_tensors_with_a_neighbour():
    """Consecutive ranges, closed before a tensor that overflows the cap, unless the range is
    under half the cap (a bias between two large weights joins the next weight); never across
    groups; a cap below every size gives one tensor per bucket."""
    w, b = 22_000_000, 4690
    assert bucket_ranges([w, b] * 3, 6_553_600) == [range(0, 1), range(1, 3), range(3, 5), range(5, 6)]
    assert bucket_ranges([5_000_000, 2236] * 2, 6_553_600) == [range(0, 2), range(2, 4)]
    assert bucket_ranges([10, 10, 10, 10], 25) == [range(0, 2), range(2, 4)]
    assert bucket_ranges([10, 10, 10, 10], 25, groups=[0, 1, 1, 1]) == [range(0, 1), range(1, 3), range(3, 4)]
    assert bucket_ranges([3, 4, 5], 1) == [range(0, 1), range(1, 2), range(2, 3)]
    assert bucket_ranges([], 10) == []
