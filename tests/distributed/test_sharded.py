"""Sharded optimizer state (ALGORITHMS.md, "Sharded state") on 1-4 real gloo ranks.

- identity codec + ``downlink="fp32"``: the sharded AMSGrad / Adam trajectory equals the
  unsharded one to float tolerance (the owner computes x_new on its chunk and sends
  x_old - x_new; every rank's x_old - (x_old - x_new) is x_new exactly whenever the step is
  small next to x (Sterbenz), otherwise within an ulp of x);
- every compressor: the ranks hold bit-identical parameters after every step;
- CD-Adam with the 1-bit downlink equals a plain transcription of the section's steps;
- per-rank state bytes equal 4 + 20/n per parameter;
- a resumed job continues bit-identically; another rank's state is refused.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import taciturn
from taciturn.consistency import checksums

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reference import Compression, mean  # noqa: E402

STEPS = 12


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Tanh(), torch.nn.Linear(24, 7))


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 40, generator=g), torch.randn(6, 7, generator=g)


def _train(rank, opt, model, steps, start=0, record=None):
    sums = []
    for t in range(start, start + steps):
        for group in opt.param_groups:
            group["lr"] = 0.02 * (1 + (t % 3)) / 3  # a changing learning rate
        x, y = _batch(rank, t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if record is not None:
            record.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        opt.step()
        sums.append(checksums(list(model.parameters())))
    return sums


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _parity_rank(rank, world, cls_name, options):
    cls = getattr(taciturn, cls_name)
    out = {}
    for sharded in (False, True):
        model = _model()
        kw = dict(options, shard_state=True, downlink="fp32") if sharded else options
        opt = cls(model.parameters(), lr=0.02, bucket_cap_mb=0.002, check_divergence_every=1, **kw)
        _train(rank, opt, model, STEPS)
        out[sharded] = _flat(model)
    return out


PARITY = [("AMSGrad", {}), ("Adam", {}), ("CDAdam", {"compressor": "identity", "track": "momentum"})]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("cls_name,options", PARITY, ids=[f"{c}-{o}" for c, o in PARITY])
def test_fp32_downlink_equals_the_unsharded_method(run_ranks, n, cls_name, options):
    per_rank = run_ranks(_parity_rank, n, cls_name, options, timeout=120)
    for r in per_rank:
        assert torch.equal(r[True], per_rank[0][True])  # ranks bit-identical
        torch.testing.assert_close(r[True], r[False], rtol=1e-6, atol=1e-7)


def _identical_rank(rank, world, cls_name, kwargs):
    model = _model()
    opt = getattr(taciturn, cls_name)(model.parameters(), lr=0.02, bucket_cap_mb=0.002, shard_state=True, **kwargs)
    sums = _train(rank, opt, model, STEPS)
    return {"sums": sums, "metrics": opt.metrics(), "x": _flat(model)}


CODECS = [("CDAdam", {}), ("CDAdam", {"compressor": "scaled_sign"}), ("CDAdam", {"downlink": "bf16"}),
          ("CDAdam", {"track": "momentum"}),
          ("EFAMSGrad", {}), ("NaiveAMSGrad", {}), ("CompressedAMSGrad", {"compressor": "topk", "ratio": 0.2}),
          ("Adam", {"downlink": "bf16"})]


@pytest.mark.parametrize("cls_name,kwargs", CODECS, ids=[f"{c}-{k}" for c, k in CODECS])
def test_ranks_hold_bit_identical_parameters_every_step(run_ranks, cls_name, kwargs):
    per_rank = run_ranks(_identical_rank, 3, cls_name, kwargs, timeout=120)
    for r in per_rank[1:]:
        for t, (mine, first) in enumerate(zip(r["sums"], per_rank[0]["sums"])):
            assert torch.equal(mine, first), f"step {t}"
    assert torch.isfinite(per_rank[0]["x"]).all()
    assert not torch.equal(per_rank[0]["x"], _flat(_model()))  # it trained


def _transcription_rank(rank, world):
    model = _model()
    x0 = _flat(model)
    opt = taciturn.CDAdam(model.parameters(), lr=0.02, bucket_cap_mb=0.002, shard_state=True)
    grads, xs = [], []
    for t in range(STEPS):
        _train(rank, opt, model, 1, start=t, record=grads)
        xs.append(_flat(model))
    ex = opt.exchanges["grad"]
    buckets = [(list(b), lay.cuts) for b, lay in zip(ex.buckets, ex.layouts)]
    return {"x0": x0, "grads": grads, "xs": xs, "buckets": buckets,
            "sizes": [p.numel() for p in model.parameters()]}


def _sharded_cdadam(x0, grads, lrs, C, betas=(0.9, 0.99), nu=1e-8):
    """ALGORITHMS.md "Sharded state", written for one process holding every worker and owner:
    workers c_i = C(g_i - h_i), h_i += c_i; owners H += mean c_i and AMSGrad on H gives
    Delta = x_old - x_new; downlink p = Delta + e, c = C(p), e = p - c; every rank x -= c."""
    n = len(grads[0])
    x = x0.clone()
    h = [torch.zeros_like(x) for _ in range(n)]
    H, m, v, v_hat, e = (torch.zeros_like(x) for _ in range(5))
    out = []
    for g, lr in zip(grads, lrs):
        c_w = []
        for i in range(n):
            c_w.append(C.worker(g[i] - h[i]))
            h[i] = h[i] + c_w[i]
        H = H + mean(c_w)
        m = betas[0] * m + (1 - betas[0]) * H
        v = betas[1] * v + (1 - betas[1]) * H * H
        v_hat = torch.maximum(v_hat, v)
        delta = x - (x - lr * m / torch.sqrt(v_hat + nu))
        p = delta + e
        c = C.server(p)
        e = p - c
        x = x - c
        out.append(x)
    return out


@pytest.mark.parametrize("n", [1, 3])
def test_cdadam_1bit_downlink_equals_the_plain_transcription(run_ranks, n):
    per_rank = run_ranks(_transcription_rank, n, timeout=120)
    first = per_rank[0]
    C = Compression("block_sign", first["sizes"], first["buckets"])
    grads = [[r["grads"][t] for r in per_rank] for t in range(STEPS)]
    lrs = [0.02 * (1 + (t % 3)) / 3 for t in range(STEPS)]
    ref = _sharded_cdadam(first["x0"], grads, lrs, C)
    for t in range(STEPS):
        torch.testing.assert_close(first["xs"][t], ref[t], rtol=1e-5, atol=1e-6, msg=f"step {t}")


def _bytes_rank(rank, world):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 256)), torch.nn.Parameter(torch.randn(16384))]
    out = {}
    for sharded in (False, True):
        opt = taciturn.CDAdam(params, shard_state=sharded)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        tensors = [t for t in opt.compression.flat.values() if torch.is_tensor(t)]
        tensors += [t for p in params for t in opt.state[p].values() if torch.is_tensor(t)]
        out[sharded] = sum(t.numel() * t.element_size() for t in tensors) / sum(p.numel() for p in params)
    return out


def test_state_bytes_per_parameter_on_four_ranks_follow_the_formula(run_ranks):
    per_rank = run_ranks(_bytes_rank, 4, timeout=120)
    for r in per_rank:
        assert r[True] == 4 + 20 / 4  # h whole; H, m, v, v^, e on the rank's quarter
        assert r[False] == 4 + 4 / 4 + 4 + 12  # h, H on the chunk, the shared G, m, v, v^


def _resume_rank(rank, world, directory):
    model = _model()
    opt = taciturn.CDAdam(model.parameters(), lr=0.02, bucket_cap_mb=0.002, shard_state=True)
    _train(rank, opt, model, 5)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f"{directory}/rank{rank}.pt")
    full = _train(rank, opt, model, 5, start=5)

    model = _model(seed=1)
    opt = taciturn.CDAdam(model.parameters(), lr=0.02, bucket_cap_mb=0.002, shard_state=True)
    saved = torch.load(f"{directory}/rank{rank}.pt", weights_only=False)
    model.load_state_dict(saved["model"])
    other = torch.load(f"{directory}/rank{(rank + 1) % world}.pt", weights_only=False)
    try:
        opt.load_state_dict(other["opt"])
        refused = None
    except ValueError as e:
        refused = str(e)
    opt.load_state_dict(saved["opt"])
    resumed = _train(rank, opt, model, 5, start=5)
    return {"full": full, "resumed": resumed, "refused": refused}


def test_resume_is_bit_identical_and_another_ranks_state_is_refused(run_ranks, tmp_path):
    per_rank = run_ranks(_resume_rank, 2, str(tmp_path), timeout=120)
    for rank, r in enumerate(per_rank):
        for a, b in zip(r["full"], r["resumed"]):
            assert torch.equal(a, b)
        assert r["refused"] is not None and f"saved by rank {1 - rank}, not by this rank ({rank})" in r["refused"]


# ----------------------------------------------------------------------------- one process

def test_refusals_name_the_reason():
    params = _model().parameters
    with pytest.raises(ValueError, match="one-way"):
        taciturn.SparsAMS(params(), shard_state=True)
    with pytest.raises(ValueError, match="averages the momentum"):
        taciturn.OneBitAdam(params(), shard_state=True)
    with pytest.raises(ValueError, match="applies only with shard_state=True"):
        taciturn.CDAdam(params(), downlink="bf16")
    with pytest.raises(ValueError, match="must be one of"):
        taciturn.CDAdam(params(), shard_state=True, downlink="int8")
    for cls in (taciturn.DistEFSGD, taciturn.SAEFSGD, taciturn.Signum):
        with pytest.warns(UserWarning, match="shard_state=True changes nothing"):
            opt = cls(params(), shard_state=True)
        assert not opt.sharded


def test_sharded_wire_bytes_are_one_bit_both_ways():
    params = [torch.nn.Parameter(torch.zeros(256, 256))]
    wire = taciturn.CDAdam(params, shard_state=True).exchanges["grad"].wire_bytes()
    assert wire["up"] == wire["down"] == 65536 // 8 + 4 * 64  # a bit per element, a scale per block
    cast = taciturn.CDAdam(params, shard_state=True, downlink="bf16").exchanges["grad"].wire_bytes()
    assert cast["up"] == wire["up"] and cast["down"] == 2 * 65536


def test_resetting_a_sharded_state_warns_that_the_moments_restart():
    model = _model()
    opt = taciturn.CDAdam(model.parameters(), shard_state=True)
    model(torch.randn(2, 40)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    assert opt.compression.flat["grad.0.exp_avg"].any()
    with pytest.warns(UserWarning, match="restarts the chunk owners' update-rule state"):
        opt.load_state_dict(saved, reset_compression_state=True)
    assert not opt.compression.flat["grad.0.exp_avg"].any() and opt.global_step == 1
