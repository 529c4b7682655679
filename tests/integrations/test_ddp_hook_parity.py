"""What PyTorch's own suites assert of a DDP comm hook, asserted of taciturn's, on 2 gloo ranks.

Each test names the upstream cases it mirrors (torch/testing/_internal/distributed/
distributed_test.py, test/distributed/test_c10d_common.py and test_c10d_gloo.py). The
``identity`` preset goes through the whole compressed path in fp32, so it must give exactly
DDP's own allreduce average, under every DDP option; the compressed presets must at least keep
every rank on the same gradients.
"""
from __future__ import annotations

import copy
import os

import torch
import torch._dynamo  # noqa: F401  (torch.optim imports it lazily: load it once here, not in every forked rank)
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from taciturn.integrations.ddp import PRESETS, compressed_hook, register_compression_hook
from test_ddp_hooks import Shuffled

SIGN_PRESETS = [name for name, p in PRESETS.items() if p.compressor != "topk"]


class Branchy(nn.Module):
    """``side`` is used only when asked (rank 0 here), ``never`` is never used."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 3)
        self.side = nn.Linear(16, 3)
        self.never = nn.Linear(16, 3)

    def forward(self, x, use_side=True):
        h = torch.tanh(self.a(x))
        return self.b(h) + self.side(h) if use_side else self.b(h)


def Chain():
    """Registered c, a, b, run a -> b -> c: DDP's rebuilt buckets (gradient order) differ from
    its first ones (registration order)."""
    return Shuffled(d_in=6, width=16, d_out=3)


def batch(rank, step, n=4):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def grads(module):
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def assert_same_grads(a, b, what):
    assert a.keys() == b.keys()
    for n in a:
        assert (a[n] is None) == (b[n] is None), f"{what}: {n}"
        if a[n] is not None:
            assert torch.equal(a[n], b[n]), f"{what}: {n} differs by {(a[n] - b[n]).abs().max()}"


# ----------------------------------------------------------------------------- parity with allreduce

DDP_OPTIONS = {
    "default": {},
    "gradient_as_bucket_view": {"gradient_as_bucket_view": True},
    "static_graph": {"static_graph": True},
    "bucket_view+static_graph": {"gradient_as_bucket_view": True, "static_graph": True},
    # one parameter per bucket at first, rebuilt in gradient order after the first iteration
    "small_buckets": {"bucket_cap_mb": 1e-4},
}


def _parity(rank, world):
    out = {"constant": {}, "train": {}}
    # A gradient that is the rank on every weight entry (torch's hook parity model): every
    # preset whose codec is a scaled sign carries it exactly, so all must give the mean rank.
    group = dist.new_group(list(range(world)))
    for preset in SIGN_PRESETS:
        torch.manual_seed(0)
        net = nn.Linear(1, 5)
        plain, hooked = DDP(copy.deepcopy(net), process_group=group), DDP(copy.deepcopy(net), process_group=group)
        state = register_compression_hook(hooked, preset)
        seen = []
        for _ in range(4):
            for m in (plain, hooked):
                m.zero_grad()
                m(torch.tensor([[float(rank)]])).sum().backward()
            seen.append((hooked.module.weight.grad.clone(), plain.module.weight.grad.clone()))
        out["constant"][preset] = (seen, state.comm.world_size, hooked._get_ddp_logging_data().get("comm_hook"))
    # identity hook + Adam against DDP's allreduce + Adam, under each DDP option
    for name, options in DDP_OPTIONS.items():
        torch.manual_seed(0)
        net = Chain()
        plain, hooked = DDP(copy.deepcopy(net), **options), DDP(copy.deepcopy(net), **options)
        register_compression_hook(hooked, "identity")
        opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (plain, hooked)]
        steps = []
        for t in range(4):
            x, y = batch(rank, t)
            for m, opt in zip((plain, hooked), opts):
                opt.zero_grad()
                F.mse_loss(m(x), y).backward()
                opt.step()
            steps.append((grads(plain.module), grads(hooked.module), flat(plain), flat(hooked)))
        out["train"][name] = steps
    return out


def test_identity_hook_equals_allreduce_under_ddp_options(run_ranks):
    """Mirrors test_ddp_hook_parity_allreduce and _allreduce_process_group (a hook's gradient is
    the mean rank and equals DDP's allreduce; the DDP model's own group is used),
    test_ddp_hook_with_optimizer_parity_{sgd,adam,adamw} over gradient_as_bucket_view x
    static_graph (hook + optimizer equals DDP + optimizer, step for step), buckets rebuilt after
    the first iteration, and test_ddp_comm_hook_logging (DDP logs the hook's qualname)."""
    results = run_ranks(_parity, 2)
    for r in results:
        for preset, (seen, world, logged) in r["constant"].items():
            assert world == 2 and logged == compressed_hook.__qualname__
            for t, (hook, plain) in enumerate(seen):
                assert torch.equal(hook, torch.full_like(hook, 0.5)), f"{preset}, step {t}: {hook.flatten()}"
                assert torch.equal(hook, plain)
        for name, steps in r["train"].items():
            for t, (g_plain, g_hook, p_plain, p_hook) in enumerate(steps):
                assert_same_grads(g_plain, g_hook, f"{name}, step {t}")
                assert torch.equal(p_plain, p_hook), f"{name}, step {t}"
    for name in DDP_OPTIONS:
        assert torch.equal(results[0]["train"][name][-1][3], results[1]["train"][name][-1][3])


# ----------------------------------------------------------------------------- unused parameters, no_sync

def _unused_and_no_sync(rank, world):
    out = {}
    # find_unused_parameters: ``side`` unused on rank 1, ``never`` on both
    for preset in ("identity", "markov_sign"):
        torch.manual_seed(0)
        net = Branchy()
        plain = DDP(copy.deepcopy(net), find_unused_parameters=True)
        hooked = DDP(copy.deepcopy(net), find_unused_parameters=True)
        register_compression_hook(hooked, preset, block_size=64)
        steps = []
        for t in range(3):
            x, y = batch(rank, t)
            for m in (plain, hooked):
                m.zero_grad(set_to_none=True)
                F.mse_loss(m(x, use_side=rank == 0), y).backward()
            steps.append((grads(plain.module), grads(hooked.module)))
        out[f"unused/{preset}"] = steps
    # no_sync: even iterations accumulate locally, odd ones synchronise the sum
    for preset, options in (("identity", {}), ("identity", {"gradient_as_bucket_view": True}),
                            ("markov_sign", {})):
        torch.manual_seed(0)
        net = Chain()
        plain, hooked = DDP(copy.deepcopy(net), **options), DDP(copy.deepcopy(net), **options)
        state = register_compression_hook(hooked, preset, block_size=64)
        with torch.no_grad(), hooked.no_sync():
            hooked(batch(rank, 0)[0])  # a no_grad forward accumulates nothing
        steps = []
        for t in range(4):
            x, y = batch(rank, t)
            for m in (plain, hooked):
                if t % 2 == 0:
                    m.zero_grad(set_to_none=True)
                    with m.no_sync():
                        F.mse_loss(m(x), y).backward()
                else:
                    F.mse_loss(m(x), y).backward()
            steps.append((grads(plain.module), grads(hooked.module), state.step))
        out[f"no_sync/{preset}/{sorted(options)}"] = steps
    return out


def test_unused_parameters_and_no_sync(run_ranks):
    """Mirrors the find_unused_parameters cases (a parameter unused on one rank is averaged with
    the other's gradient, one unused everywhere keeps grad None) and
    test_accumulate_gradients_no_sync, _grad_is_view, _allreduce_hook and
    test_grads_same_across_ranks_with_no_sync (no_sync accumulates locally without calling
    the hook; the next synchronised backward averages the accumulated sum)."""
    r0, r1 = run_ranks(_unused_and_no_sync, 2)
    for key in r0:
        for t, (s0, s1) in enumerate(zip(r0[key], r1[key])):
            hook0, hook1 = s0[1], s1[1]
            if key.startswith("unused"):
                assert hook0["never.weight"] is None and hook0["side.weight"] is not None
                assert_same_grads(hook0, hook1, f"{key}, step {t}: ranks")
                if key.endswith("identity"):
                    for s in (s0, s1):
                        assert_same_grads(s[0], s[1], f"{key}, step {t}")
                continue
            synced = t % 2 == 1
            assert s0[2] == s1[2] == (t + 1) // 2, f"{key}: the hook ran in a no_sync iteration"
            assert torch.equal(hook0["a.weight"], hook1["a.weight"]) == synced, f"{key}, step {t}"
            if "identity" in key:
                for s in (s0, s1):
                    assert_same_grads(s[0], s[1], f"{key}, step {t}")


# ----------------------------------------------------------------------------- checkpoints, registration

def _checkpoint(rank, world, path):
    torch.manual_seed(0)
    net = Chain()
    ddp, restored = DDP(copy.deepcopy(net), bucket_cap_mb=1e-3), DDP(copy.deepcopy(net), bucket_cap_mb=1e-3)
    state = register_compression_hook(ddp, "markov_sign", block_size=64)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)

    def step(m, o, t):
        o.zero_grad()
        x, y = batch(rank, t)
        F.mse_loss(m(x), y).backward()
        o.step()

    for t in range(3):
        step(ddp, opt, t)
    errors = {}
    try:
        register_compression_hook(ddp, "markov_sign")
    except RuntimeError as e:
        errors["twice"] = str(e)
    file = os.path.join(path, f"rank{rank}.ckpt")  # hook state is per rank: one file each
    torch.save({"model": ddp.state_dict(), "optimizer": opt.state_dict(), "comm_hook": compressed_hook,
                "comm_hook_state": state}, file)
    checkpoint = torch.load(file, weights_only=False)
    restored.load_state_dict(checkpoint["model"])
    restored_opt = torch.optim.SGD(restored.parameters(), lr=0.1)
    restored_opt.load_state_dict(checkpoint["optimizer"])
    loaded = checkpoint["comm_hook_state"]
    facts = {"hook": checkpoint["comm_hook"] is compressed_hook, "unbound": loaded.comm is None,
             "config": loaded.config == state.config}
    register_compression_hook(restored, loaded)
    facts["step"] = loaded.step == state.step == 3
    same = []
    for t in range(3, 6):
        step(ddp, opt, t)
        step(restored, restored_opt, t)
        same.append(all(torch.equal(p.grad, q.grad) for p, q in zip(ddp.parameters(), restored.parameters())))
    facts["same"] = same

    try:
        register_compression_hook(DDP(nn.Sequential(nn.EmbeddingBag(10, 4, sparse=True))), "markov_sign")
    except ValueError as e:
        errors["sparse"] = str(e)
    return facts, errors


def test_hook_state_checkpoints_and_registration(run_ranks, tmp_path):
    """Mirrors test_ddp_hook_pickling_powerSGD (hook and state saved with torch.save inside a
    checkpoint, the process group left out, the loaded state re-registered; training then
    goes on with the same gradients as the original), test_ddp_comm_hook_register_just_once
    and test_ddp_comm_hook_sparse_gradients (taciturn refuses a sparse embedding at
    registration, naming it and the fix)."""
    for facts, errors in run_ranks(_checkpoint, 2, str(tmp_path)):
        assert facts["hook"] and facts["unbound"] and facts["config"] and facts["step"]
        assert facts["same"] == [True] * 3
        assert "can only be called once" in errors["twice"]
        assert "'0' makes sparse ones" in errors["sparse"] and "sparse=False" in errors["sparse"]
