"""DDP comm hooks (taciturn.integrations.ddp) on 2 real gloo ranks.

The hook path (DDP + hook + CD-Adam's update rule applied locally) must equal the optimizer
path (taciturn's compressed optimizer on the same gradients) step for step, across DDP's
re-bucketing after the first iteration; hook state must survive state_dict and pickle round
trips; misuse must fail with a message naming the fix.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch._dynamo  # noqa: F401  (torch.optim imports it lazily: load it once here, not in every forked rank)
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import taciturn
from taciturn.integrations.ddp import (CompressionHookState, compressed_hook, keep_gradients_local,
                                       register_compression_hook)

STEPS = 4
LR = 1e-2


class Shuffled(nn.Module):
    """Registered c, a, b but run a -> b -> c: DDP's initial bucket (registration order) and the
    rebuilt ones (gradient-ready order: c, b, a) hold the parameters in different compositions."""

    def __init__(self):
        super().__init__()
        self.c = nn.Linear(48, 5)
        self.a = nn.Linear(20, 48)
        self.b = nn.Linear(48, 48)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 20, generator=g), torch.randint(0, 5, (8,), generator=g)


def train(model, opt, steps, start=0):
    rank = dist.get_rank()
    history = []
    for t in range(start, start + steps):
        x, y = batch(rank, t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        history.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    return history


# (preset, hook options, optimizer path, its options, DDP options). One-tensor DDP buckets for
# ef_sign: its per-tensor scale is split at chunk cuts, so both paths need the same buckets.
CASES = {
    "markov_sign": ("markov_sign", {"block_size": 256}, "CDAdam", {"block_size": 256}, {"bucket_cap_mb": 0.01}),
    "markov_sign-static_graph": ("markov_sign", {"block_size": 256}, "CDAdam", {"block_size": 256},
                                 {"bucket_cap_mb": 0.01, "static_graph": True}),
    "block_sign": ("block_sign", {"block_size": 256}, "EFAMSGrad", {"block_size": 256}, {"bucket_cap_mb": 0.01}),
    "topk": ("topk", {"ratio": 0.05}, "SparsAMS", {"ratio": 0.05}, {"bucket_cap_mb": 0.01}),
    "ef_sign": ("ef_sign", {}, "EFAMSGrad", {"compressor": "scaled_sign", "bucket_cap_mb": 1e-6},
                {"bucket_cap_mb": 1e-6, "find_unused_parameters": True}),
}


def _hook_vs_optimizer(rank, world, case):
    preset, hook_kw, opt_name, opt_kw, ddp_kw = CASES[case]
    torch.manual_seed(0)
    ref = Shuffled()
    hooked = Shuffled()
    hooked.load_state_dict(ref.state_dict())

    opt_ref = taciturn.create_optimizer(opt_name, ref.parameters(), lr=LR, **opt_kw)
    ref_history = train(ref, opt_ref, STEPS)

    ddp = DDP(hooked, **ddp_kw)
    state = register_compression_hook(ddp, preset, **hook_kw)
    local_amsgrad = taciturn.AMSGrad(ddp.parameters(), lr=LR, process_group="local")
    buckets = []
    history = []
    for t in range(STEPS):
        history += train(ddp, local_amsgrad, 1, start=t)
        buckets.append(state.buckets)
    return {"ref": ref_history, "hook": history, "buckets": buckets, "metrics": state.metrics(),
            "ref_metrics": opt_ref.metrics(), "rebucket_bytes": state.rebucket_bytes}


@pytest.mark.parametrize("case", list(CASES))
def test_hook_equals_optimizer_path(run_ranks, case):
    results = run_ranks(_hook_vs_optimizer, 2, case)
    for r in results:
        for t, (a, b) in enumerate(zip(r["hook"], r["ref"])):
            assert torch.equal(a, b), f"{case}: step {t} differs by {(a - b).abs().max()}"
        hook, ref = r["metrics"], r["ref_metrics"]
        assert hook["taciturn/fp32_bytes"] == ref["taciturn/fp32_bytes"]
        # the same payloads, up to the 8-byte padding of each bucket's chunks
        assert abs(hook["taciturn/bytes_up"] - ref["taciturn/bytes_up"]) <= 16 * len(r["buckets"][-1])
    assert torch.equal(results[0]["hook"][-1], results[1]["hook"][-1])
    buckets = results[0]["buckets"]
    if case.startswith("markov_sign"):
        # one initial bucket of every parameter, then DDP's rebuilt buckets in gradient order
        assert len(buckets[0]) == 1 and len(buckets[-1]) == 2, buckets
        assert buckets[-1][0][:2] == ("c.bias", "c.weight"), buckets
        assert results[0]["rebucket_bytes"] > 0


def _save_restore(rank, world):
    torch.manual_seed(1)
    model = Shuffled()
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = register_compression_hook(ddp, "markov_sign", block_size=256)
    opt = taciturn.AMSGrad(ddp.parameters(), lr=LR, process_group="local")
    train(ddp, opt, 3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_hook = copy.deepcopy(state.state_dict())
    pickled_state = pickle.dumps(state)
    expected = train(ddp, opt, 3, start=3)

    def resumed(attach):
        m = Shuffled()
        m.load_state_dict(saved_model)
        d = DDP(m, bucket_cap_mb=0.01)
        o = taciturn.AMSGrad(d.parameters(), lr=LR, process_group="local")
        o.load_state_dict(copy.deepcopy(saved_opt))  # torch's load_state_dict keeps the tensors it is given
        attach(d)
        return train(d, o, 3, start=3)

    def from_state_dict(d):
        s = CompressionHookState(d, "markov_sign", block_size=256)
        s.load_state_dict(saved_hook)
        d.register_comm_hook(s, compressed_hook)

    return {"expected": expected, "state_dict": resumed(from_state_dict),
            "pickle": resumed(lambda d: register_compression_hook(d, pickle.loads(pickled_state))),
            "fresh": resumed(lambda d: register_compression_hook(d, "markov_sign", block_size=256))}


def test_hook_state_survives_save_and_restore(run_ranks):
    for r in run_ranks(_save_restore, 2):
        for how in ("state_dict", "pickle"):
            for t, (a, b) in enumerate(zip(r[how], r["expected"])):
                assert torch.equal(a, b), f"restored through {how}: step {t} differs by {(a - b).abs().max()}"
        # the restored feedback state matters: starting it from zero takes another path
        assert not torch.equal(r["fresh"][-1], r["expected"][-1])


def _misuse(rank, world):
    model = Shuffled()
    ddp = DDP(model)
    state = CompressionHookState(ddp, "markov_sign")
    errors = {}
    sd = state.state_dict()
    for what, bad in {"world_size": {**sd, "world_size": 3}, "rank": {**sd, "rank": 1 - rank}}.items():
        try:
            state.load_state_dict(bad)
        except ValueError as e:
            errors[what] = str(e)
    other = CompressionHookState(ddp, "ef_sign")
    try:
        other.load_state_dict(sd)
    except ValueError as e:
        errors["config"] = str(e)
    stranger = DDP(Shuffled())
    stranger.register_comm_hook(state, compressed_hook)
    x, y = batch(rank, 0)
    try:
        F.cross_entropy(stranger(x), y).backward()
    except RuntimeError as e:
        errors["other_model"] = str(e)
    unbound = pickle.loads(pickle.dumps(state))
    lonely = DDP(Shuffled())
    lonely.register_comm_hook(unbound, compressed_hook)
    try:
        F.cross_entropy(lonely(x), y).backward()
    except RuntimeError as e:
        errors["unbound"] = str(e)
    local = keep_gradients_local(DDP(Shuffled()))
    keep_gradients_local(local)
    F.cross_entropy(local(x), y).backward()
    grads = torch.cat([p.grad.reshape(-1) for p in local.parameters()])
    return errors, grads


def test_misuse_fails_clearly_and_local_hook_keeps_gradients(run_ranks):
    (errors, g0), (_, g1) = run_ranks(_misuse, 2)
    assert "world size 3" in errors["world_size"] and "reset_compression_state=True" in errors["world_size"]
    assert "saved by rank" in errors["rank"]
    assert "hook configuration" in errors["config"]
    assert "was not built for" in errors["other_model"]
    assert "register_compression_hook(ddp_model, state)" in errors["unbound"]
    assert not torch.equal(g0, g1)  # keep_gradients_local: DDP averaged nothing


def test_bad_arguments_fail_before_any_collective():
    with pytest.raises(ValueError, match="unknown hook preset 'sign'.*markov_sign"):
        CompressionHookState(Shuffled(), "sign")
    with pytest.raises(ValueError, match="ratio"):
        CompressionHookState(Shuffled(), "topk", ratio=2.0)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_compression_hook(Shuffled(), "markov_sign")
