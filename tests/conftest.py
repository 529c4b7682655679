"""Shared test helpers, exposed as fixtures; scripts/ joins ``sys.path`` here, so tests import
its helpers (``_launch``, ``_datasets``, ``_bench``) as the scripts do.

``run_ranks``: run a function on n real gloo ranks (forked processes, a file store, a timeout).
``simulate``: the papers' pseudo-code for one server and n workers, written plainly (one flat
vector per bucket, one Python step per line of the algorithm boxes), the reference that the
multi-process pipeline must reproduce.
"""
from __future__ import annotations

import math
import os
import sys
from fractions import Fraction

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import _launch  # noqa: E402


# ----------------------------------------------------------------------------- processes

def _run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """``_launch.run_ranks``; a rank still running at ``timeout`` fails the test."""
    try:
        return _launch.run_ranks(fn, world_size, *args, timeout=timeout)
    except TimeoutError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def run_ranks():
    return _run_ranks


# ----------------------------------------------------------------------------- reference

def segments(bounds, total):
    """[(start, end)] between the sorted distinct boundaries (0 and ``total`` included)."""
    edges = sorted({0, total, *bounds})
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def tensor_bounds(sizes):
    out, acc = [], 0
    for s in sizes:
        acc += s
        out.append(acc)
    return out


def block_bounds(sizes, block_size):
    """Tensor ends plus every ``block_size`` elements from each tensor's start."""
    out, start = [], 0
    for s in sizes:
        out.extend(range(start, start + s, block_size))
        start += s
        out.append(start)
    return out


def plain_compress(v: torch.Tensor, name: str, opts: dict) -> torch.Tensor:
    """C(v) for one piece, straight from the formulas of ALGORITHMS.md."""
    if name in ("scaled_sign", "block_sign"):
        return v.abs().mean() * torch.where(v >= 0, 1.0, -1.0)
    if name == "topk":
        k = min(v.numel(), max(1, math.ceil(Fraction(str(opts["ratio"])) * v.numel())))
        out = torch.zeros_like(v)
        idx = torch.sort(v.abs(), descending=True, stable=True).indices[:k]  # ties: lowest indices
        out[idx] = v[idx].to(torch.bfloat16).float() if opts.get("encoding") == "bf16" else v[idx]
        return out
    if name == "identity":
        return v.clone()
    raise ValueError(f"no plain reference for {name!r}")


def plain_compress_pieces(v, pieces, name, opts):
    return torch.cat([plain_compress(v[a:b], name, opts) for a, b in pieces])


def compression_units(sizes, name, opts):
    """Boundaries of the units a codec compresses as one (blocks or whole tensors)."""
    if name == "block_sign" and opts.get("block_size", 1024) is not None:
        return block_bounds(sizes, opts.get("block_size", 1024))
    return tensor_bounds(sizes)


def profile_weights(p, sizes, units):
    """The magnitude profile's decode weights (taciturn.profile, l1 scale) written plainly: a =
    sqrt(p + 0.01 * the tensor's mean p), w = a / the block's mean a (1 where that is 0)."""
    d = sum(sizes)
    a = torch.cat([p[lo:hi] + 0.01 * p[lo:hi].mean() for lo, hi in segments(tensor_bounds(sizes), d)]).sqrt()
    w = torch.ones(d)
    for lo, hi in segments(units, d):
        if a[lo:hi].mean() > 0:
            w[lo:hi] = a[lo:hi] / a[lo:hi].mean()
    return w


def _simulate_bucket(xs, sizes, cuts, name, opts, rule, two_way, s):
    """One bucket: ``xs[t][i]`` is worker i's flat input at step t; returns the results per step.
    ``opts["profile"] = beta``: every compression decodes with the magnitude profile's weights,
    the profile p an EMA of the squared results (from 0); with ``opts["profile_detrend"] = a``
    of the squared deviations r - rbar from the results' EMA rbar (decay a, from 0)."""
    n, d = len(xs[0]), sum(sizes)
    units = compression_units(sizes, name, opts)
    beta, p = opts.get("profile"), torch.zeros(d)
    detrend, rbar = opts.get("profile_detrend"), torch.zeros(d)

    def compress(v, pieces):
        c = plain_compress_pieces(v, pieces, name, opts)
        return c if beta is None else c * profile_weights(p, sizes, units)

    # Workers compress whole units (a sign scale spans a tensor split by a chunk cut); top-k
    # in two-way mode is applied to each piece of a tensor inside a chunk. The server
    # compresses every piece of a unit that falls in its chunk on its own.
    per_piece_worker = two_way and name == "topk"
    worker_pieces = segments(units + (list(cuts) if per_piece_worker else []), d)
    server_pieces = segments(units + list(cuts), d)
    zeros = lambda: torch.zeros(d)
    e, h = [zeros() for _ in range(n)], [zeros() for _ in range(n)]
    e_server, H, G = zeros(), zeros(), zeros()
    results = []
    for t, x in enumerate(xs):
        sent = []
        for i in range(n):
            if rule == "none":
                c = compress(x[i], worker_pieces)
            elif rule == "ef":
                y = x[i] + s[t] * e[i]
                c = compress(y, worker_pieces)
                e[i] = y - c
            else:
                c = compress(x[i] - h[i], worker_pieces)
                h[i] = h[i] + c
            sent.append(c)
        a = torch.stack(sent).sum(0) / n
        if not two_way:
            if rule == "markov":
                H = H + a
                result = H.clone()
            else:
                result = a
        elif rule == "none":
            result = compress(a, server_pieces)
        elif rule == "ef":
            y = a + s[t] * e_server
            result = compress(y, server_pieces)
            e_server = y - result
        else:
            H = H + a
            G = G + compress(H - G, server_pieces)
            result = G.clone()
        results.append(result)
        if beta is not None:
            deviation = result
            if detrend is not None:
                deviation = result - rbar
                rbar = detrend * rbar + (1 - detrend) * result
            p = beta * p + (1 - beta) * deviation * deviation
    return results


def _simulate(xs, buckets, name, opts, rule, two_way, s):
    """The papers' pseudo-code, one server and n workers, bucket by bucket.

    ``xs[t][i]``: worker i's flat fp32 input at step t (all tensors concatenated);
    ``buckets``: ``(sizes, cuts)`` per bucket, in order; ``s[t]``: the EF error scale at step t.
    Returns a ``(steps, d)`` tensor of the averaged results every worker must end with.
    """
    per_bucket, start = [], 0
    for sizes, cuts in buckets:
        d = sum(sizes)
        part = [[xi[start:start + d] for xi in x] for x in xs]
        per_bucket.append(_simulate_bucket(part, sizes, cuts, name, opts, rule, two_way, s))
        start += d
    return torch.stack([torch.cat([b[t] for b in per_bucket]) for t in range(len(xs))])


@pytest.fixture(scope="session")
def simulate():
    return _simulate
