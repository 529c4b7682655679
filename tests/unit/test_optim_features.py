"""What every preset must handle at n = 1: frozen parameters, a missing gradient, per-group
learning rates, closures and gradient accumulation (one communication per step)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reference import one_thread  # noqa: E402,F401 (fixture)

import taciturn  # noqa: E402

ALL = taciturn.list_optimizers()


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def loss_of(net, t, micro=0):
    gen = torch.Generator().manual_seed(31 * t + micro)
    return net(torch.randn(8, 6, generator=gen)).pow(2).mean()


def make(name, groups, **kw):
    return taciturn.create_optimizer(name, groups, lr=1e-2, **kw)


@pytest.mark.parametrize("name", ALL)
def test_missing_gradient_is_zero(name):
    """A parameter whose grad is None this step is treated exactly as a zero gradient."""
    a, b = model(), model()
    opt_a, opt_b = make(name, a.parameters()), make(name, b.parameters())
    for t in range(4):
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss_of(net, t).backward()
        a[2].bias.grad = None
        b[2].bias.grad = torch.zeros_like(b[2].bias)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ALL)
def test_frozen_parameter_untouched(name):
    net = model()
    net[0].weight.requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    opt = make(name, net.parameters())
    for t in range(3):
        opt.zero_grad()
        loss_of(net, t).backward()
        opt.step()
    assert torch.equal(net[0].weight, frozen) and net[0].weight not in opt.state
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert all(pipe.numel == trainable for pipe in opt.exchanges.values()), "a frozen parameter is communicated"


def test_nothing_trainable_is_refused():
    net = model().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        taciturn.CDAdam(net.parameters())


@pytest.mark.parametrize("name", ALL)
def test_param_group_learning_rates(name):
    """Each group moves with its own lr: a group at lr 0 stays put while the other moves."""
    net = model()
    still = [p.detach().clone() for p in net[0].parameters()]
    moving = [p.detach().clone() for p in net[2].parameters()]
    opt = taciturn.create_optimizer(name, [{"params": net[0].parameters(), "lr": 0.0},
                                           {"params": net[2].parameters(), "lr": 1e-2}])
    for t in range(3):
        opt.zero_grad()
        loss_of(net, t).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net[0].parameters(), still))
    assert all(not torch.equal(p, q) for p, q in zip(net[2].parameters(), moving))


@pytest.mark.parametrize("name", ["CDAdam", "DistEFSGD", "SAEFSGD", "OneBitAdam"])
def test_closure_runs_with_grad_and_returns_its_loss(name):
    net = model()
    opt = make(name, net.parameters())
    before = [p.detach().clone() for p in net.parameters()]

    def closure():
        opt.zero_grad()
        loss = loss_of(net, 0)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.requires_grad
    assert all(not torch.equal(p, q) for p, q in zip(net.parameters(), before))


@pytest.mark.parametrize("name", ["CDAdam", "SparsAMS", "DistEFSGD", "SAEFSGD", "EF21SGD"])
def test_gradient_accumulation_communicates_once_per_step(name):
    """Several backward calls, one step: the summed gradient is sent once."""
    acc, whole = model(), model()
    opt_acc, opt_whole = make(name, acc.parameters()), make(name, whole.parameters())
    for t in range(3):
        opt_acc.zero_grad()
        for micro in range(3):
            loss_of(acc, t, micro).backward()
        opt_whole.zero_grad()
        grads = torch.autograd.grad(sum(loss_of(whole, t, micro) for micro in range(3)), list(whole.parameters()))
        for p, g in zip(whole.parameters(), grads):
            p.grad = g
        opt_acc.step()
        opt_whole.step()
        assert opt_acc.stats.steps == t + 1
        assert opt_acc.stats.bytes_up == (t + 1) * opt_acc.metrics()["taciturn/bytes_up"]
    for p, q in zip(acc.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_saef_parameters_are_x_minus_error_and_synced_weights_swaps_x_in():
    net = model()
    opt = taciturn.SAEFSGD(net.parameters(), lr=0.1, momentum=0.9, ratio=0.1)
    for t in range(3):
        opt.zero_grad()
        loss_of(net, t).backward()
        opt.step()
    x = [opt.state[p]["synced_param"].clone() for p in net.parameters()]
    ahead = [p.detach().clone() for p in net.parameters()]
    for xi, pi, ei in zip(x, ahead, opt.worker_errors()):
        assert ei.any() and torch.equal(pi, xi - ei)
    with opt.synced_weights():
        assert all(torch.equal(p, xi) for p, xi in zip(net.parameters(), x))
    assert all(torch.equal(p, a) for p, a in zip(net.parameters(), ahead))


def _momentum_run(steps):
    net = model()
    opt = taciturn.CDAdam(net.parameters(), lr=1e-2, compressor="identity", track="momentum")
    for t in range(steps):
        opt.zero_grad()
        loss_of(net, t).backward()
        opt.step()
    return net, opt


@pytest.mark.parametrize("how", ["reset", "load"])
def test_tracked_momentum_restarts_with_the_markov_sequences(how):
    """track="momentum": the rule's m is the sum of the Markov sequences' steps, so when those
    restart from zero m and the workers' momenta restart too; the first step after is then a
    fresh AMSGrad momentum, m = (1 - b1) g, and v^ keeps its old values."""
    net, opt = _momentum_run(6)
    first = next(net.parameters())
    vmax = opt.state[first]["max_exp_avg_sq"].clone()
    if how == "reset":
        opt.reset_compression_state()
    else:
        opt.load_state_dict(opt.state_dict(), reset_compression_state=True)
    assert not opt.state[first]["exp_avg"].any() and not opt.state[first]["worker_exp_avg"].any()
    opt.zero_grad()
    loss_of(net, 6).backward()
    g = first.grad.clone()
    opt.step()
    torch.testing.assert_close(opt.state[first]["exp_avg"], 0.1 * g, rtol=1e-5, atol=1e-9)
    assert torch.equal(opt.state[first]["max_exp_avg_sq"], torch.maximum(vmax, opt.state[first]["exp_avg_sq"]))


def test_checkpoint_without_track_loads_as_the_optimizer_was_built():
    """A checkpoint saved before ``track`` existed has no such key in its param groups."""
    _, saved = _momentum_run(3)
    state = saved.state_dict()
    for group in state["param_groups"]:
        del group["track"]
    net, opt = _momentum_run(0)
    opt.load_state_dict(state)
    assert [g["track"] for g in opt.param_groups] == ["momentum"]
    opt.zero_grad()
    loss_of(net, 3).backward()
    opt.step()


@pytest.mark.parametrize("encoding", ["fp32", "bf16"])
def test_momentum_correction_masks_the_momentum_where_it_sent(encoding):
    """SparsAMS(momentum_correction=True), first step: u = (1-b1) g goes through top-k with EF;
    u is zeroed exactly at the entries kept (in bf16 too, where EF keeps the rounding there)
    and the error holds u elsewhere; the step is the kept entries, v from their squares."""
    net = model()
    opt = taciturn.SparsAMS(net.parameters(), lr=1e-2, ratio=0.1, momentum_correction=True,
                            compressor_options={"encoding": encoding})
    loss_of(net, 0).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    opt.step()
    flats = [st["worker_error"] for st in opt.compression.buckets("grad")]
    errors = dict(zip(net.parameters(), opt.exchanges["grad"].split(flats, [p.shape for p in net.parameters()])))
    for p, g in zip(net.parameters(), grads):
        u = (0.1 * g).reshape(-1)
        k = max(1, -(-u.numel() // 10))
        kept = torch.zeros(u.numel(), dtype=torch.bool)
        kept[u.abs().topk(k).indices] = True
        st = opt.state[p]
        assert torch.equal(st["worker_exp_avg"].reshape(-1) == 0, kept)
        assert torch.equal(errors[p].reshape(-1)[~kept], u[~kept])
        sent = u.masked_fill(~kept, 0.0)
        if encoding == "bf16":
            sent = sent.bfloat16().float()
        torch.testing.assert_close(st["exp_avg"].reshape(-1), sent)
        torch.testing.assert_close(st["exp_avg_sq"].reshape(-1), 0.01 * sent * sent)


@pytest.mark.parametrize("kwargs, words", [
    (dict(momentum_correction="yes"), "must be True or False"),
    (dict(momentum_correction=True, track="momentum"), "drop track"),
])
def test_momentum_correction_bad_values_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        taciturn.CompressedAMSGrad(model().parameters(), compressor="topk", worker_feedback="ef", two_way=False,
                                   **kwargs)


@pytest.mark.parametrize("name, kwargs", [("CompressedAMSGrad", {}),
                                          ("CompressedAMSGrad", dict(worker_feedback="ef", server_feedback="ef")),
                                          ("CompressedAMSGrad", dict(compressor="topk", worker_feedback="markov",
                                                                     two_way=False))])
def test_momentum_correction_needs_one_way_error_feedback(name, kwargs):
    """The mask reads which entries the rank's error feedback sent: Markov sequences and server
    recompression are refused with the fix."""
    with pytest.raises(ValueError, match="one-way error feedback.*drop momentum_correction"):
        taciturn.create_optimizer(name, model().parameters(), momentum_correction=True, **kwargs)


def test_checkpoint_without_momentum_correction_loads_as_the_optimizer_was_built():
    net = model()
    opt = taciturn.SparsAMS(net.parameters(), lr=1e-2, ratio=0.1, momentum_correction=True)
    loss_of(net, 0).backward()
    opt.step()
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["momentum_correction"]
    fresh = taciturn.SparsAMS(model().parameters(), lr=1e-2, ratio=0.1, momentum_correction=True)
    fresh.load_state_dict(state)
    assert [g["momentum_correction"] for g in fresh.param_groups] == [True]
