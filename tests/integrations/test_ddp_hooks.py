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

    def __init__(self, d_in: int = 20, width: int = 48, d_out: int = 5):
        super().__init__()
        self.c = nn.Linear(width, d_out)
        self.a = nn.Linear(d_in, width)
        self.b = nn.Linear(width, width)

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
    "markov_sign-bucket_view": ("markov_sign", {"block_size": 256}, "CDAdam", {"block_size": 256},
                                {"bucket_cap_mb": 0.01, "gradient_as_bucket_view": True}),
    # 4 ranks as 2 nodes x 2: the two-level exchange, whose state follows DDP's rebuilt buckets too
    "markov_sign-two_level": ("markov_sign", {"block_size": 256, "ranks_per_node": 2}, "CDAdam",
                              {"block_size": 256, "ranks_per_node": 2}, {"bucket_cap_mb": 0.01}),
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
    results = run_ranks(_hook_vs_optimizer, 4 if "two_level" in case else 2, case)
    for r in results:
        for t, (a, b) in enumerate(zip(r["hook"], r["ref"])):
            assert torch.equal(a, b), f"{case}: step {t} differs by {(a - b).abs().max()}"
        hook, ref = r["metrics"], r["ref_metrics"]
        if "two_level" in case:  # a rank carries its shard of each bucket: the buckets move the cuts
            assert sum(q["metrics"]["taciturn/fp32_bytes"] for q in results[:2]) == 4 * sum(
                p.numel() for p in Shuffled().parameters())
            continue
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


# ----------------------------------------------------------------------------- what DDP reduces

class Parts(nn.Module):
    """Two layers, a rank-local gain whose shape differs per rank (for DDP to ignore) and, with
    ``complex_gain``, a complex parameter (DDP buckets it as its real view)."""

    def __init__(self, rank: int = 0, complex_gain: bool = False):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)
        self.local = nn.Linear(1, rank + 1, bias=False)
        self.z = nn.Parameter(torch.randn(8, dtype=torch.complex64)) if complex_gain else None

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.z is not None:
            h = (h * self.z).abs()
        return self.b(h) * self.local.weight.mean()


def grads_per_step(ddp, steps=3):
    """{name: gradient or None} after each of ``steps`` backward passes on this rank's batches."""
    rank = dist.get_rank()
    out = []
    for t in range(steps):
        ddp.zero_grad(set_to_none=True)
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * t + rank))
        ddp(x).square().sum().backward()
        out.append({n: None if p.grad is None else p.grad.clone() for n, p in ddp.module.named_parameters()})
    return out


def _parts_pair(rank, case, **ddp_kw):
    """The same ``Parts`` twice, wrapped in DDP as ``case`` says: (plain DDP, DDP for a hook)."""
    torch.manual_seed(0)
    net = Parts(rank if case == "ignored" else 0, complex_gain=case == "complex")
    pair = []
    for _ in range(2):
        m = copy.deepcopy(net)
        if case == "ignored":
            DDP._set_params_and_buffers_to_ignore_for_model(m, ["local.weight"])
        else:
            m.local.requires_grad_(False)
        d = DDP(m, find_unused_parameters=case == "frozen_after_wrap", **ddp_kw)
        if case == "frozen_after_wrap":
            m.a.bias.requires_grad_(False)  # DDP still reduces it (zeros): the hook must follow DDP
        pair.append(d)
    return pair


def _reduced_set(rank, world, case):
    plain, hooked = _parts_pair(rank, case)
    register_compression_hook(hooked, "identity")
    out = {"plain": grads_per_step(plain), "hook": grads_per_step(hooked)}
    if case == "complex":
        _, compressed = _parts_pair(rank, case)
        register_compression_hook(compressed, "markov_sign", block_size=4)
        out["markov_sign"] = grads_per_step(compressed)
    return out


@pytest.mark.parametrize("case", ["ignored", "frozen_after_wrap", "complex"])
def test_hook_reduces_what_ddp_reduces(run_ranks, case):
    """Ignored parameters (here of a different shape on each rank), parameters frozen after
    DDP wrapped the model, complex parameters: the hook averages exactly DDP's set, as DDP does."""
    results = run_ranks(_reduced_set, 2, case)
    for r in results:
        for t, (plain, hook) in enumerate(zip(r["plain"], r["hook"])):
            assert plain.keys() == hook.keys()
            for n in plain:
                assert (plain[n] is None) == (hook[n] is None), (case, t, n)
                if plain[n] is not None:
                    assert torch.equal(hook[n], plain[n]), (case, t, n)
    if case == "ignored":  # DDP leaves the ignored gain's gradient local
        assert [r["hook"][0]["local.weight"].shape for r in results] == [(1, 1), (2, 1)]
    if case == "frozen_after_wrap":
        assert results[0]["hook"][0]["a.bias"] is None
    if case == "complex":
        for step0, step1 in zip(results[0]["markov_sign"], results[1]["markov_sign"]):
            assert step0["z"].is_complex() and torch.equal(step0["z"], step1["z"])
            assert torch.equal(step0["a.weight"], step1["a.weight"])


# ----------------------------------------------------------------------------- uneven inputs

def _join(rank, world):
    # identity: a linear model whose gradient does not depend on the weights; a rank that has
    # joined contributes zeros, so DDP at lr * world equals a local model run for every rank's
    # iterations in turn (the same check as torch's DDP join equivalence test)
    iters = {r: 2 * (r + 1) for r in range(world)}
    inp = torch.rand(3, 10, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    base = nn.Linear(10, 10, bias=False)
    local = copy.deepcopy(base)
    local_opt = torch.optim.SGD(local.parameters(), lr=0.03)
    for _ in range(sum(iters.values())):
        local_opt.zero_grad()
        local(inp).sum().backward()
        local_opt.step()
    out = {"local": local.weight.detach().clone()}
    for how in ("plain", "identity"):
        ddp = DDP(copy.deepcopy(base))
        if how == "identity":
            register_compression_hook(ddp, "identity")
        opt = torch.optim.SGD(ddp.parameters(), lr=0.03 * world)
        with ddp.join():
            for _ in range(iters[rank]):
                opt.zero_grad()
                ddp(inp).sum().backward()
                opt.step()
        out[how] = ddp.module.weight.detach().clone()

    # markov_sign, each rank its own batches, rank 0 two steps longer: equal to CD-Adam's
    # optimizer path in which the exhausted rank keeps stepping on zero gradients
    steps = STEPS + 2 if rank == 0 else STEPS
    torch.manual_seed(0)
    ref = Shuffled()
    hooked = copy.deepcopy(ref)
    opt_ref = taciturn.CDAdam(ref.parameters(), lr=LR, block_size=256)
    for t in range(STEPS + 2):
        opt_ref.zero_grad()
        if t < steps:
            x, y = batch(rank, t)
            F.cross_entropy(ref(x), y).backward()
        else:
            for p in ref.parameters():
                p.grad = torch.zeros_like(p)
        opt_ref.step()
    ddp = DDP(hooked, bucket_cap_mb=0.01)
    state = register_compression_hook(ddp, "markov_sign", block_size=256)
    opt = taciturn.AMSGrad(ddp.parameters(), lr=LR, process_group="local")
    with ddp.join():
        train(ddp, opt, steps)
    out["markov_sign"] = torch.cat([p.detach().reshape(-1) for p in hooked.parameters()])
    out["markov_sign_ref"] = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    out["hook_steps"] = state.step
    return out


def test_uneven_inputs_under_join(run_ranks):
    """``DDP.join()`` runs the registered hook in its shadow backward passes: uneven inputs work."""
    results = run_ranks(_join, 2)
    for r in results:
        assert torch.equal(r["identity"], r["plain"])
        assert torch.allclose(r["identity"], r["local"], rtol=1e-5, atol=1e-6)
        assert r["hook_steps"] == STEPS + 2  # the joined rank's hook ran in the shadow passes
    assert torch.equal(results[0]["markov_sign"], results[0]["markov_sign_ref"])
    assert torch.equal(results[1]["markov_sign"], results[0]["markov_sign"])  # join broadcast the last joiner's model
