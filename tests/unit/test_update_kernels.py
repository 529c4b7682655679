"""The fused CPU update kernels (taciturn.kernels.update) against the torch formulas they replace.

The kernels round as torch's ops do, op for op, but take a correctly rounded square root where
torch's fp32 sqrt (MKL's on x86) may be 1 ulp off: they match the torch formulas with that square
root bit for bit, on awkward sizes and any thread count, and the torch path of
taciturn.optim.functional to float tolerance (its moments bit for bit). The torch path, which
works through cache-sized pieces, matches the whole-tensor formulas bit for bit. Tensors the
kernels do not take fall back to it, and the optimizers give the same results either way.
"""
from __future__ import annotations

import os
import platform
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernel_checks import portable_build, threads, torch_path  # noqa: E402

import taciturn  # noqa: E402
from taciturn import kernels  # noqa: E402
from taciturn.kernels import update  # noqa: E402
from taciturn.optim import functional  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="fused kernels could not be built here")

SIZES = [0, 1, 7, 1000003]
THREADS = [1, 2, 3]
AMS = dict(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8)
ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def exact_sqrt(t):
    """The correctly rounded fp32 square root (through fp64, which rounds it exactly)."""
    return t.double().sqrt().float()


def amsgrad_formula(x, g, m, v, vmax, *, lr, beta1, beta2, eps, sqrt=exact_sqrt):
    """functional.amsgrad_'s torch ops on whole tensors, with the given square root."""
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    torch.maximum(vmax, v, out=vmax)
    x.addcdiv_(m, sqrt(vmax.add(eps)), value=-lr)


def adam_formula(x, g, m, v, *, lr, beta1, beta2, eps, step, bias_correction, sqrt=exact_sqrt):
    """functional.adam_'s torch ops on whole tensors, with the given square root."""
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if bias_correction:
        c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
        x.addcdiv_(m, sqrt(v / c2).add_(eps), value=-lr / c1)
    else:
        x.addcdiv_(m, sqrt(v).add_(eps), value=-lr)


def amsgrad_formula_torch_sqrt(*args, **kwargs):
    amsgrad_formula(*args, **kwargs, sqrt=torch.sqrt)


def adam_formula_torch_sqrt(*args, **kwargs):
    adam_formula(*args, **kwargs, sqrt=torch.sqrt)


def momentum_formula(g, buf, momentum, nesterov):
    buf.mul_(momentum).add_(g)
    return g.add(buf, alpha=momentum) if nesterov else buf


def state(n, seed, count=4):
    """x, then moments with exact zeros among them (v, v^ >= 0): an AMSGrad state."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    m = torch.randn(n, generator=gen) * 0.1
    v, vmax = (torch.rand(n, generator=gen) * 1e-3 for _ in range(2))
    v[seed % 5::5], vmax[seed % 7::7] = 0.0, 0.0
    return [x, m, v, vmax][:count]


def grads(n, seed, steps=3):
    """Gradients with zeros and negative zeros among them."""
    gen = torch.Generator().manual_seed(1000 + seed)
    out = [torch.randn(n, generator=gen) * 10 ** (2 - t) for t in range(steps)]
    for g in out:
        g[seed % 11::11], g[seed % 13::13] = 0.0, -0.0
    return out


def same(a, b, what=""):
    for i, (p, q) in enumerate(zip(a, b)):
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what} tensor {i}: {m}")


def close(a, b):
    """The moments bit for bit, the parameter (first) to a few ulps (of x near 1, where steps may
    cancel it: the 1-ulp square roots move x by a rounding or two)."""
    same(a[1:], b[1:])
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)


def clone(tensors):
    return [t.clone() for t in tensors]


def amsgrad_run(tensors, gs, formula=None):
    x, m, v, vmax = tensors
    for g in gs:
        (formula or functional.amsgrad_)(x, g, m, v, vmax, **AMS)
    return tensors


def adam_run(tensors, gs, bias_correction, formula=None):
    x, m, v = tensors
    for step, g in enumerate(gs, 1):
        (formula or functional.adam_)(x, g, m, v, **ADAM, step=step, bias_correction=bias_correction)
    return tensors


@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("n", SIZES)
def test_amsgrad_kernel(n, nthreads):
    start, gs = state(n, n % 97), grads(n, n % 97)
    assert update.fits(start[0], gs[0], *start[1:])
    with threads(nthreads):
        fast = amsgrad_run(clone(start), gs)
    same(fast, amsgrad_run(clone(start), gs, amsgrad_formula))
    with torch_path():
        close(fast, amsgrad_run(clone(start), gs))


@pytest.mark.parametrize("bias_correction", [True, False], ids=["bias_correction", "no_bias_correction"])
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("n", SIZES)
def test_adam_kernel(n, nthreads, bias_correction):
    start, gs = state(n, n % 89, 3), grads(n, n % 89)
    with threads(nthreads):
        fast = adam_run(clone(start), gs, bias_correction)
    same(fast, adam_run(clone(start), gs, bias_correction, adam_formula))
    with torch_path():
        close(fast, adam_run(clone(start), gs, bias_correction))


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("n", SIZES)
def test_momentum_kernel(n, nthreads, nesterov):
    """No square root here: the kernel is the torch path bit for bit."""
    buf, gs = state(n, 3)[1], grads(n, 3)
    fast, ref = buf.clone(), buf.clone()
    for g in gs:
        with threads(nthreads):
            direction = functional.momentum_(g, fast, 0.9, nesterov)
        expected = momentum_formula(g, ref, 0.9, nesterov)
        same([direction, fast], [expected, ref])
        assert (direction is fast) != nesterov and direction is not g


@pytest.mark.parametrize("n", [1000003, 7])
def test_torch_path_in_pieces_is_the_whole_tensor_formula(n):
    """The CPU torch path works through pieces: the same bits as the ops on whole tensors."""
    start, gs = state(n, 5), grads(n, 5)
    with torch_path():
        same(amsgrad_run(clone(start), gs), amsgrad_run(clone(start), gs, amsgrad_formula_torch_sqrt))
        for bc in (True, False):
            same(adam_run(clone(start[:3]), gs, bc), adam_run(clone(start[:3]), gs, bc, adam_formula_torch_sqrt))


def test_special_values_propagate_as_in_torch():
    """inf and NaN gradients: NaN and inf land where the formulas put them."""
    start, g = state(64, 7), grads(64, 7, 1)[0]
    g[3], g[10], g[17] = float("nan"), float("inf"), float("-inf")
    fast = amsgrad_run(clone(start), [g, g * 0.5])
    assert fast[0].isnan().any() and fast[3].isinf().any()
    same(fast, amsgrad_run(clone(start), [g, g * 0.5], amsgrad_formula))
    same(adam_run(clone(start[:3]), [g], True), adam_run(clone(start[:3]), [g], True, adam_formula))


def test_fallbacks_keep_the_torch_path(monkeypatch):
    """Strided, fp16, mismatched or switched-off inputs skip the kernels; the results hold."""
    calls = []
    monkeypatch.setattr(update, "amsgrad", lambda *a, **k: calls.append(a))
    start, g = state(300, 9), grads(300, 9, 1)[0]

    def strided():
        return torch.stack([start[0], start[0]], 1).reshape(-1)[::2]

    assert not update.fits(strided(), g, *start[1:])
    assert not update.fits(start[0], g.half(), *start[1:])
    assert not update.fits(start[0], g[:-1], *start[1:])
    with torch_path():
        assert not update.fits(start[0], g, *start[1:])
    for what, param, grad in [("strided parameter", strided, g), ("fp16 gradient", lambda: start[0].clone(), g.half())]:
        fallback, expected = [param(), *clone(start[1:])], [param(), *clone(start[1:])]
        functional.amsgrad_(fallback[0], grad, *fallback[1:], **AMS)
        amsgrad_formula_torch_sqrt(expected[0], grad, *expected[1:], **AMS)
        same(fallback, expected, what)
    assert not calls, "the kernel ran on tensors it does not take"


def test_mismatched_sizes_are_refused():
    x, m, v, vmax = state(10, 1)
    with pytest.raises(ValueError, match=r"tensors with \[10, 9, 10, 10, 10\] elements"):
        update.amsgrad(x, torch.zeros(9), m, v, vmax, **AMS)
    with pytest.raises(ValueError, match="elements"):
        update.momentum(torch.zeros(11), m, 0.9, True)


def test_version_counters_move():
    """Like torch's in-place ops, the kernels tell autograd the tensors changed."""
    x, m, v, vmax = state(10, 1)
    g = grads(10, 1, 1)[0]
    before = [t._version for t in (x, m, v, vmax)]
    functional.amsgrad_(x, g, m, v, vmax, **AMS)
    assert all(t._version > b for t, b in zip((x, m, v, vmax), before))
    version = m._version
    functional.momentum_(g, m, 0.9, False)
    assert m._version > version


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
@pytest.mark.parametrize("arch", ["x86-64", "x86-64-v3"], ids=["sse2", "avx2"])
def test_portable_builds_match_the_formulas(arch, monkeypatch):
    """The SSE and AVX branches (machines without AVX-512 run them) give the same bits."""
    portable_build(monkeypatch, arch)
    for n in (7, 1000003):
        start, gs = state(n, 2), grads(n, 2)
        same(amsgrad_run(clone(start), gs), amsgrad_run(clone(start), gs, amsgrad_formula))
        same(adam_run(clone(start[:3]), gs, True), adam_run(clone(start[:3]), gs, True, adam_formula))
        fast, ref = start[1].clone(), start[1].clone()
        same([functional.momentum_(gs[0], fast, 0.9, True), fast], [momentum_formula(gs[0], ref, 0.9, True), ref])


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(30, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))


def train(name, kwargs, steps=6):
    net = model()
    opt = taciturn.create_optimizer(name, net.parameters(), **kwargs)
    for t in range(steps):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(t)
        net(torch.randn(16, 30, generator=gen)).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("name, kwargs, rule", [
    ("CDAdam", dict(lr=1e-2), "amsgrad"),
    ("AMSGrad", dict(lr=1e-2), "amsgrad"),
    ("Adam", dict(lr=1e-2), "adam"),
    ("OneBitAdam", dict(lr=1e-2, freeze_step=3, warmup="cdadam"), "amsgrad"),
    ("DistEFSGD", dict(lr=0.1, momentum=0.9, nesterov=True), "momentum"),
    ("SGD", dict(lr=0.1, momentum=0.9), "momentum"),
])
def test_optimizers_same_with_and_without_kernels(name, kwargs, rule, monkeypatch):
    calls, kernel = [], getattr(update, rule)

    def counted(*args, **kw):
        calls.append(rule)
        return kernel(*args, **kw)

    monkeypatch.setattr(update, rule, counted)
    fast = train(name, kwargs)
    assert calls, f"{name} never ran the {rule} kernel"
    with torch_path():
        ref = train(name, kwargs)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
