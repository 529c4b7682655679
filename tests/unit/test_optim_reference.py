"""Every preset at n = 1 (no process group) against the papers' pseudo-code (tests/reference.py),
20 steps with an lr that changes every step, two param groups, a frozen parameter, gradient
accumulation, a closure on odd steps and a gradient missing at two steps."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference as ref  # noqa: E402
from reference import one_thread  # noqa: E402,F401 (fixture)

import taciturn  # noqa: E402

STEPS = 20


def run(name):
    case = ref.CASES[name]
    model = ref.make_model()
    groups = ref.param_groups(model, case.groups)
    x0 = ref.flat(ref.trainable(model))
    frozen = model.scale.detach().clone()
    opt = taciturn.create_optimizer(case.optimizer, groups, lr=case.lr, **case.kwargs)
    assert opt.comm.world_size == 1
    xs, points = ref.train(opt, model, 0, 1, STEPS, case.lr)
    assert torch.equal(model.scale, frozen), "a requires_grad=False parameter changed"
    return x0, xs, points, opt


@pytest.mark.parametrize("name", list(ref.CASES))
def test_matches_transcription(name):
    case = ref.CASES[name]
    x0, xs, points, opt = run(name)
    model = ref.make_model()
    sim = case.sim(x0, 1, ref.compression_factory(ref.pipeline_layout(opt)))
    sim_xs, sim_points = ref.simulate(sim, model, ref.param_groups(model, case.groups), 1, STEPS, case.lr)
    assert not torch.equal(xs[-1], x0)
    # The scales (mean |x| per block or tensor) are sums whose order follows the CPU's vector width
    # (AVX2 vs AVX512): a drift of ~1e-7 per step over 20 steps, far below one sign flip (~lr).
    for t in range(STEPS):
        torch.testing.assert_close(xs[t], sim_xs[t], rtol=1e-5, atol=1e-5, msg=lambda m: f"x, step {t}: {m}")
        torch.testing.assert_close(points[t], sim_points[t][0], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"parameters, step {t}: {m}")


@pytest.mark.parametrize("name", sorted(ref.IDENTITY_OF))
def test_identity_compressor_equals_uncompressed_preset(name):
    """CD-Adam and SPARS-AMS with C = identity are taciturn.AMSGrad (to rounding: the Markov
    sequences and errors are differences of equal numbers)."""
    _, xs, _, _ = run(name)
    _, base, _, _ = run(ref.IDENTITY_OF[name])
    for t in range(STEPS):
        torch.testing.assert_close(xs[t], base[t], rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t}: {m}")


def test_spars_ams_topk_with_ratio_one_is_amsgrad():
    """k = d keeps everything: the error stays zero and SPARS-AMS is AMSGrad exactly."""
    x0, xs, _, _ = run("amsgrad")
    model = ref.make_model()
    opt = taciturn.SparsAMS(ref.param_groups(model), lr=1e-2, ratio=1.0)
    sparse_xs, _ = ref.train(opt, model, 0, 1, STEPS, 1e-2)
    for a, b in zip(sparse_xs, xs):
        assert torch.equal(a, b)


def test_adam_and_sgd_baselines_equal_torch():
    """The uncompressed baselines follow torch.optim.Adam / SGD (nesterov) exactly enough."""
    for ours, theirs, kw in [(taciturn.Adam, torch.optim.Adam, dict(lr=1e-2)),
                             (taciturn.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True))]:
        a, b = ref.make_model(), ref.make_model()
        opt_a = ours(ref.trainable(a), **kw)
        opt_b = theirs(ref.trainable(b), **kw)
        for t in range(10):
            for model, opt in ((a, opt_a), (b, opt_b)):
                opt.zero_grad()
                ref.loss_of(model, 0, t, 0).backward()
                opt.step()
        torch.testing.assert_close(ref.flat(ref.trainable(a)), ref.flat(ref.trainable(b)), rtol=1e-6, atol=1e-7)
