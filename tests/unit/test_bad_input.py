"""Bad input gets a clear error naming the problem and the fix; never a hang or corrupt state."""
import logging

import pytest
import torch

import taciturn
from taciturn.compressors import make_compressor
from taciturn.feedback import make_feedback


def params(*shapes):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s)) for s in shapes]


CASES = [
    ("unknown-compressor", lambda: taciturn.CDAdam(params((4,)), compressor="signn"), ValueError,
     "unknown compressor 'signn'; valid names"),
    ("unknown-optimizer", lambda: taciturn.create_optimizer("CDAdamm", params((4,))), ValueError,
     "Did you mean 'CDAdam'"),
    ("ratio-zero", lambda: taciturn.SparsAMS(params((100,)), ratio=0), ValueError, "ratio=0 must be in (0, 1]"),
    ("ratio-above-one", lambda: taciturn.SparsAMS(params((100,)), ratio=1.5), ValueError,
     "ratio=1.5 must be in (0, 1]"),
    ("k-larger-than-d", lambda: taciturn.SparsAMS(params((10,), (5,)), k=16), ValueError,
     "k=16 is larger than the 15 elements"),
    ("ratio-and-k", lambda: make_compressor("topk", ratio=0.1, k=3), ValueError, "give ratio or k, not both"),
    ("negative-lr", lambda: taciturn.CDAdam(params((4,)), lr=-1e-3), ValueError, "invalid lr=-0.001"),
    ("negative-lr-in-group", lambda: taciturn.CDAdam([{"params": params((4,)), "lr": -1.0}], lr=1e-3), ValueError,
     "invalid lr=-1.0"),
    ("beta-one", lambda: taciturn.CDAdam(params((4,)), betas=(1.0, 0.99)), ValueError,
     "invalid betas[0]=1.0: must be in [0.0, 1.0)"),
    ("beta-negative", lambda: taciturn.AMSGrad(params((4,)), betas=(0.9, -0.1)), ValueError, "invalid betas[1]=-0.1"),
    ("betas-not-a-pair", lambda: taciturn.CDAdam(params((4,)), betas=(0.9,)), ValueError, "give two floats"),
    ("negative-eps", lambda: taciturn.CDAdam(params((4,)), eps=-1.0), ValueError, "invalid eps=-1.0"),
    ("empty-param-list", lambda: taciturn.CDAdam([]), ValueError, "empty parameter list"),
    ("nothing-trainable", lambda: taciturn.CDAdam([torch.nn.Parameter(torch.ones(3), requires_grad=False)]),
     ValueError, "no parameter requires grad"),
    ("complex-dtype", lambda: taciturn.CDAdam([torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))]),
     TypeError, "complex parameters"),
    ("bucket-size-zero", lambda: taciturn.CDAdam(params((4,)), bucket_cap_mb=0), ValueError,
     "bucket_cap_mb=0 must be > 0"),
    ("block-size-zero", lambda: taciturn.CDAdam(params((4,)), block_size=0), ValueError,
     "block_size=0 must be a positive int or None"),
    ("misspelled-json-key", lambda: taciturn.create_optimizer("CDAdam", params((4,)), lrr=1e-3), ValueError,
     "does not take 'lrr' (did you mean 'lr'?)"),
    ("option-for-other-codec", lambda: make_compressor("topk", block_size=8), ValueError,
     "compressor 'topk' does not take ['block_size']"),
    ("momentum-one", lambda: taciturn.DistEFSGD(params((4,)), momentum=1.0), ValueError, "invalid momentum=1.0"),
    ("nesterov-without-momentum", lambda: taciturn.DistEFSGD(params((4,)), nesterov=True), ValueError,
     "nesterov=True needs momentum > 0"),
    ("unknown-feedback", lambda: make_feedback("ef22"), ValueError, "unknown feedback 'ef22'"),
    ("onebit-warmup", lambda: taciturn.OneBitAdam(params((4,)), warmup="lamb"), ValueError,
     "warmup='lamb' must be 'adam'"),
    ("onebit-mask-zero-variance", lambda: taciturn.OneBitAdam(params((4,)), mask_zero_variance="yes"), ValueError,
     "mask_zero_variance='yes' must be True or False"),
    ("onebit-comm-backend", lambda: taciturn.OneBitAdam(params((4,)), comm_backend_name="ucx"), ValueError,
     "comm_backend_name='ucx' must be 'nccl', 'compressed', 'gloo' (torch.distributed) or 'mpi'"),
    ("onebit-lamb-amsgrad", lambda: taciturn.create_optimizer("OneBitLamb", params((4,)), amsgrad=True), ValueError,
     "OneBitLamb: amsgrad=True is not supported (1-bit LAMB freezes the variance); remove it"),
    ("onebit-lamb-coeffs", lambda: taciturn.OneBitLamb(params((4,)), max_coeff=0.001, min_coeff=0.01), ValueError,
     "max_coeff=0.001 must be >= min_coeff=0.01 (the LAMB coefficient is clamped to [min_coeff, max_coeff]); "
     "raise max_coeff or lower min_coeff"),
    ("saef-period-zero", lambda: taciturn.SAEFSGD(params((4,)), error_avg_period=0), ValueError,
     "error_avg_period=0 must be a positive int"),
    ("nonfinite-mode", lambda: taciturn.CDAdam(params((4,)), nonfinite="ignore"), ValueError,
     "nonfinite='ignore' must be 'skip', 'raise' or 'off'"),
    ("divergence-period", lambda: taciturn.CDAdam(params((4,)), check_divergence_every=-2), ValueError,
     "check_divergence_every=-2 must be an int >= 0"),
    ("unknown-communicator", lambda: taciturn.CDAdam(params((4,)), process_group="ucx"), ValueError,
     "unknown communicator 'ucx'"),
    ("torch-group-without-init", lambda: taciturn.make_communicator("gloo"), RuntimeError,
     "call torch.distributed.init_process_group"),
]


@pytest.mark.parametrize("make,exc,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_a_clear_message(make, exc, message):
    with pytest.raises(exc) as info:
        make()
    assert message in str(info.value)


def test_sparse_gradient_refused_at_step_without_touching_state():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = taciturn.CDAdam(emb.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in opt.compression.flat.items() if torch.is_tensor(v)}
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients .* use nn.Embedding\\(sparse=False\\)"):
        opt.step()
    assert opt.global_step == 0
    for k, v in before.items():
        assert torch.equal(opt.compression.flat[k], v)


def test_block_size_larger_than_every_tensor_warns_and_trains_as_one_block_per_tensor():
    ps = params((10,), (3, 4))
    with pytest.warns(UserWarning, match="block_size=4096 is larger than every parameter tensor"):
        opt = taciturn.CDAdam(ps, lr=1e-2, block_size=4096)
    ref = taciturn.CDAdam([p.detach().clone().requires_grad_() for p in ps], lr=1e-2, block_size=None)
    for o, ws in ((opt, ps), (ref, [p for g in ref.param_groups for p in g["params"]])):
        for w in ws:
            w.grad = torch.ones_like(w) * torch.arange(w.numel()).view_as(w)
        o.step()
    for a, b in zip(ps, [p for g in ref.param_groups for p in g["params"]]):
        assert torch.equal(a, b)


def test_checkpoint_without_taciturn_state_is_refused():
    opt = taciturn.CDAdam(params((4,)), lr=1e-3)
    plain = torch.optim.Adam(params((4,))).state_dict()
    with pytest.raises(ValueError, match="holds no taciturn compression state"):
        opt.load_state_dict(plain)


def test_nonfinite_gradient_skips_step_and_keeps_state():
    ps = params((6,))
    opt = taciturn.CDAdam(ps, lr=1e-2)
    ps[0].grad = torch.ones(6)
    opt.step()
    snapshot = {k: v.clone() for k, v in opt.compression.flat.items() if torch.is_tensor(v)}
    weights = ps[0].detach().clone()
    ps[0].grad = torch.tensor([1.0, float("nan"), 0, 0, 0, 0])
    opt.step()
    assert opt.global_step == 1 and opt.stats.skipped_steps == 1
    assert torch.equal(ps[0], weights)
    for k, v in snapshot.items():
        assert torch.equal(opt.compression.flat[k], v)


def test_nonfinite_skip_warnings_are_rate_limited(caplog):
    """100 skipped steps: a warning on the 1st, 2nd, 4th... 64th, each with the running count."""
    ps = params((6,))
    opt = taciturn.CDAdam(ps, lr=1e-2)
    ps[0].grad = torch.full((6,), float("nan"))
    with caplog.at_level(logging.WARNING, logger="taciturn"):
        for _ in range(100):
            opt.step()
    warned = [r.getMessage() for r in caplog.records if "every rank skips this step" in r.getMessage()]
    assert opt.stats.skipped_steps == 100 and opt.global_step == 0
    assert len(warned) == 7
    assert "(1 step(s) skipped so far; next warning at 2)" in warned[0]
    assert "(64 step(s) skipped so far; next warning at 128)" in warned[-1]


def test_nonfinite_raise_mode():
    ps = params((6,))
    opt = taciturn.CDAdam(ps, lr=1e-2, nonfinite="raise")
    ps[0].grad = torch.full((6,), float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite gradient .* on rank\\(s\\) \\[0\\]"):
        opt.step()
