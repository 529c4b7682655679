"""OneBitLamb (1-bit LAMB) on one rank: the transcription of DeepSpeed 0.16.9's algorithm
(tests/lamb_reference.py) step by step across the freeze with both warm-ups, the identity
compressor, bit-identical resumes on both sides of the freeze, the running script's settings
winning on load, thawing, empty parameters, skipped non-finite steps, bytes, the registry and
bad input."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lamb_reference as lref  # noqa: E402
import reference as ref  # noqa: E402
from reference import one_thread  # noqa: E402,F401 (fixture)

import taciturn  # noqa: E402
from taciturn.registry import is_taciturn_optimizer  # noqa: E402

STEPS = 32
FREEZE = 12
LR = 1e-2
#: tight enough that, on this workload, trust ratios clamp at max_coeff and at min_coeff, factors move
#: by factor_threshold per step and stop at factor_min (test_matches_the_transcription checks that)
SETTINGS = dict(freeze_step=FREEZE, max_coeff=0.06, min_coeff=0.02, coeff_beta=0.8, factor_max=1.2, factor_min=0.9,
                factor_threshold=0.01)
#: DeepSpeed's exact form (taciturn's zero-variance mask and variance floor off), as transcribed
EXACT = dict(mask_zero_variance=False, variance_floor=0.0)


def build(seed=0, masked=False, **kw):
    model = ref.make_model(seed)
    opt = taciturn.OneBitLamb(ref.masked_groups(model, masked), lr=LR, **{**SETTINGS, **EXACT, **kw})
    return model, opt


def transcription(opt, model, masked=False, warmup="lamb", block_size=1024, compressor="block_sign",
                  steps=STEPS, **kw):
    C = ref.compression_factory(ref.pipeline_layout(opt))
    settings = {**SETTINGS, **kw}
    sim = lref.OneBitLamb(ref.flat(ref.trainable(model)), 1, [p.numel() for p in ref.trainable(model)],
                          None if compressor is None else C(compressor, block_size=block_size), warmup=warmup,
                          warmup_C=C("block_sign", block_size=block_size), mask=ref.flat_mask(model) if masked else None,
                          **settings)
    xs, _ = ref.simulate(sim, model, ref.masked_groups(model, masked), 1, steps, LR)
    return xs, sim


CONFIGS = {
    "lamb": {},
    "lamb_weight_decay_mask": dict(masked=True, weight_decay=0.01),
    "cdadam": dict(warmup="cdadam", block_size=64),
    "cdadam_weight_decay_mask": dict(warmup="cdadam", block_size=64, masked=True, weight_decay=0.01),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_the_transcription(name):
    cfg = dict(CONFIGS[name])
    masked = cfg.pop("masked", False)
    model, opt = build(masked=masked, **cfg)
    xs, coeffs = [], []
    for t in range(STEPS):
        xs += ref.train(opt, model, 0, 1, t + 1, LR, start=t)[0]
        coeffs.append(list(opt.lamb_coeffs))
    sim_xs, sim = transcription(opt, ref.make_model(0), masked=masked, **cfg)
    ref.assert_close_steps(xs, sim_xs, name)
    assert opt.lamb_freeze_key and opt.global_step == STEPS
    params = ref.trainable(model)
    for k, p in enumerate(params):
        st = opt.state[p]
        assert st["lamb_coeff_freeze"] == pytest.approx(sim.lamb_coeff_freeze[k], rel=1e-5)
        assert st["last_factor"] == pytest.approx(sim.last_factor[k], rel=1e-5)
        assert st["scaling_coeff"] == pytest.approx(sim.scaling_coeff[k], rel=1e-5)
        assert all(type(st[key]) is float for key in ("lamb_coeff_freeze", "last_factor", "scaling_coeff"))
    # the run exercised the clamps: trust ratios at max_coeff, at min_coeff and between; factors
    # limited by factor_threshold, and at factor_min
    warm = [c for step in coeffs[:FREEZE] for c in step]
    assert 0.06 in warm and 0.02 in warm and any(0.02 < c < 0.06 for c in warm)
    factors = [[c / opt.state[p]["lamb_coeff_freeze"] for c, p in zip(step, params)] for step in coeffs[FREEZE:]]
    assert any(abs(b / a - 1) == pytest.approx(0.01) for f, g in zip(factors, factors[1:]) for a, b in zip(f, g))
    assert any(f == pytest.approx(0.9) for f in factors[-1])
    assert opt.get_lamb_coeffs() == opt.lamb_coeffs and len(opt.lamb_coeffs) == len(params)
    assert not torch.equal(xs[FREEZE - 1], xs[-1])


def test_identity_compressor_is_the_uncompressed_algorithm():
    """With C = identity the compressed momentum is the exact mean momentum (the scaling
    coefficients divide back out), so the reconstructed gradient is the mean gradient and the
    run is the algorithm without compression (the transcription with C=None: no scaling, no
    error feedback)."""
    for warmup in ("lamb", "cdadam"):
        model, opt = build(compressor="identity", warmup=warmup, block_size=64, weight_decay=0.01)
        xs, _ = ref.train(opt, model, 0, 1, STEPS, LR)
        sim_xs, sim = transcription(opt, ref.make_model(0), compressor=None, warmup=warmup, block_size=64,
                                    weight_decay=0.01)
        ref.assert_close_steps(xs, sim_xs, f"identity ({warmup})")
        fresh = ref.flat([opt.state[p]["exp_avg_sq_fresh"] for p in ref.trainable(model)])
        torch.testing.assert_close(fresh, sim.v_fresh, rtol=1e-4, atol=1e-9)


def test_warmup_is_lamb_with_a_running_coefficient():
    """Before the freeze, warmup="lamb" is uncompressed LAMB without bias correction: x moves by
    lr c u with the clamped trust ratio c of each tensor, and lamb_coeff_freeze averages c."""
    model, opt = build(freeze_step=1000)
    w = model.fc1.weight
    for t in range(3):
        x0 = w.detach().clone()
        ref.train(opt, model, 0, 1, t + 1, LR, start=t)
        st = opt.state[w]
        update = st["exp_avg"] / (st["exp_avg_sq"].sqrt() + 1e-8)
        c = min(max((x0.norm() / update.norm()).item(), SETTINGS["min_coeff"]), SETTINGS["max_coeff"])
        torch.testing.assert_close(w.detach(), x0 - ref.lr_at(t, LR) * c * update, rtol=1e-6, atol=1e-7)
        assert opt.lamb_coeffs[0] == pytest.approx(c)  # fc1.weight: the first trainable parameter
    assert not opt.lamb_freeze_key and opt.state[w]["lamb_coeff_freeze"] > 0


def test_bytes_fp32_warmup_then_one_bit():
    fp32 = 4 * sum(p.numel() for p in ref.trainable(ref.make_model()))
    for warmup in ("lamb", "cdadam"):
        model, opt = build(warmup=warmup, block_size=64)
        sent = []
        for t in range(20):
            ref.train(opt, model, 0, 1, t + 1, LR, start=t)
            sent.append(opt.metrics()["taciturn/bytes_up"])
        warm, compressed = sent[:FREEZE], sent[FREEZE:]
        if warmup == "lamb":
            assert all(b >= fp32 for b in warm)
        else:
            assert all(0 < b < fp32 / 8 for b in warm)
        assert all(0 < b < fp32 / 8 for b in compressed)


@pytest.mark.parametrize("warmup", ["lamb", "cdadam"])
@pytest.mark.parametrize("save_at", [7, FREEZE, 20], ids=["before-freeze", "at-freeze", "after-freeze"])
def test_resume_is_bit_identical(warmup, save_at, tmp_path):
    model, opt = build(warmup=warmup, block_size=64, weight_decay=0.01)
    ref.train(opt, model, 0, 1, save_at, LR)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    rest, _ = ref.train(opt, model, 0, 1, STEPS, LR, start=save_at)

    fresh_model, fresh = build(seed=7, warmup=warmup, block_size=64, weight_decay=0.01)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh_model.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["optimizer"])
    again, _ = ref.train(fresh, fresh_model, 0, 1, STEPS, LR, start=save_at)
    assert all(torch.equal(a, b) for a, b in zip(rest, again)), "the resumed run is not bit-identical"
    for p, q in zip(ref.trainable(model), ref.trainable(fresh_model)):
        for key in ("lamb_coeff_freeze", "last_factor", "scaling_coeff"):
            assert opt.state[p][key] == fresh.state[q][key]
    assert sorted(fresh.compression.flat) == sorted(opt.compression.flat)
    assert not any(k.startswith("warmup.") for k in fresh.compression.flat)


def test_checkpoint_carries_the_coefficients_as_floats():
    model, opt = build()
    ref.train(opt, model, 0, 1, 15, LR)
    sd = opt.state_dict()
    for st in sd["state"].values():
        assert {"lamb_coeff_freeze", "last_factor", "scaling_coeff", "exp_avg_sq_fresh"} <= set(st)
        assert all(type(st[k]) is float for k in ("lamb_coeff_freeze", "last_factor", "scaling_coeff"))


def test_fp16_parameters_resume_bit_identically(tmp_path):
    """fp16 parameters: fp32 master copies and fp32 v_fresh come back from a checkpoint as saved."""
    def build16(seed):
        model = ref.make_model(seed).half()
        return model, taciturn.OneBitLamb(ref.param_groups(model), lr=LR, **{**SETTINGS, "freeze_step": 4})

    def run(model, opt, start, stop):
        out = []
        for t in range(start, stop):
            opt.zero_grad()
            for micro in range(2):
                x, y = ref.batch(0, t, micro)
                out_ = ref.forward(model.scale.float(), *(p.float() for p in ref.trainable(model)), x)
                torch.nn.functional.cross_entropy(out_, y).backward()
            opt.step()
            out.append(ref.flat(ref.trainable(model)))
        return out

    model, opt = build16(0)
    run(model, opt, 0, 6)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    rest = run(model, opt, 6, 10)
    fresh_model, fresh = build16(3)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh_model.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["optimizer"])
    assert all(fresh.state[p]["exp_avg_sq_fresh"].dtype == torch.float32 for p in ref.trainable(fresh_model))
    again = run(fresh_model, fresh, 6, 10)
    assert all(torch.equal(a, b) for a, b in zip(rest, again))


def test_running_settings_win_on_load(tmp_path):
    """As DeepSpeed: the running script's exp_avg_mask wins (a script without one loads none),
    and so do freeze_step and the coefficient settings; the rest comes from the checkpoint."""
    model, opt = build(masked=True)
    ref.train(opt, model, 0, 1, 16, LR)
    saved = opt.state_dict()
    mask2 = ref.fc2_mask(model).flip(0)
    groups = ref.masked_groups(ref.make_model(1), False)
    groups[1]["exp_avg_mask"] = mask2
    second = taciturn.OneBitLamb(groups, lr=0.5, **{**SETTINGS, "coeff_beta": 0.5, "factor_max": 2.0,
                                                     "max_coeff": 9.0})
    second.load_state_dict(saved)
    g0, g1 = second.param_groups
    assert torch.equal(g1["exp_avg_mask"], mask2)
    assert (g0["coeff_beta"], g0["factor_max"], g0["freeze_step"]) == (0.5, 2.0, FREEZE)
    assert g0["max_coeff"] == SETTINGS["max_coeff"] and g0["lr"] == opt.param_groups[0]["lr"]  # the checkpoint's
    assert second.lamb_freeze_key
    third = taciturn.OneBitLamb(ref.masked_groups(ref.make_model(2), False), lr=LR, **SETTINGS)
    third.load_state_dict(saved)
    assert all("exp_avg_mask" not in g for g in third.param_groups)
    assert torch.equal(opt.param_groups[1]["exp_avg_mask"], ref.fc2_mask(model))  # saving changed nothing
    ref.train(third, ref.make_model(2), 0, 1, 18, LR, start=16)  # and it runs


def test_masked_momentum_is_zero_after_a_compressed_step():
    model, opt = build(masked=True)
    ref.train(opt, model, 0, 1, FREEZE + 2, LR)
    w, b = model.fc2.weight, model.fc2.bias
    assert torch.equal(opt.state[w]["exp_avg"][2:], torch.zeros_like(w[2:]))
    assert opt.state[w]["exp_avg"][:2].abs().min() > 0 and opt.state[b]["exp_avg"].abs().min() > 0


@pytest.mark.parametrize("warmup", ["lamb", "cdadam"])
def test_running_freeze_step_wins_and_thaws(warmup, tmp_path):
    """A checkpoint saved after the freeze, loaded by a script with a later freeze_step, thaws
    as DeepSpeed's load does (lamb_coeff_freeze 0, last_factor 1, no scaling_coeff), runs the
    warm-up again and freezes at the new freeze_step; one saved before the freeze, loaded with
    an earlier freeze_step, freezes at once."""
    model, opt = build(warmup=warmup, block_size=64)
    ref.train(opt, model, 0, 1, 15, LR)
    later_model = ref.make_model(1)
    later_model.load_state_dict(model.state_dict())
    later = taciturn.OneBitLamb(ref.masked_groups(later_model, False), lr=LR,
                                **{**SETTINGS, "freeze_step": 20, "warmup": warmup, "block_size": 64})
    later.load_state_dict(opt.state_dict())
    assert not later.lamb_freeze_key
    assert any(k.startswith("warmup.") for k in later.compression.flat) == (warmup == "cdadam")
    for p in ref.trainable(later_model):
        st = later.state[p]
        assert st["lamb_coeff_freeze"] == 0.0 and st["last_factor"] == 1.0
        assert "scaling_coeff" not in st and "exp_avg_sq_fresh" not in st
    xs, _ = ref.train(later, later_model, 0, 1, 24, LR, start=15)
    assert later.lamb_freeze_key and torch.isfinite(xs[-1]).all()
    assert all(later.state[p]["lamb_coeff_freeze"] > 0 for p in ref.trainable(later_model))

    early_model, early = build(warmup=warmup, block_size=64, freeze_step=30)
    ref.train(early, early_model, 0, 1, 8, LR)
    sooner = taciturn.OneBitLamb(ref.masked_groups(ref.make_model(1), False), lr=LR,
                                 **{**SETTINGS, "freeze_step": 5, "warmup": warmup, "block_size": 64})
    sooner.load_state_dict(early.state_dict())
    assert sooner.lamb_freeze_key and not any(k.startswith("warmup.") for k in sooner.compression.flat)


def test_raising_freeze_step_on_a_live_optimizer_thaws_and_refreezes():
    model, opt = build(warmup="cdadam", block_size=64)
    ref.train(opt, model, 0, 1, 14, LR)
    opt.freeze_step = 18
    ref.train(opt, model, 0, 1, 15, LR, start=14)
    assert not opt.lamb_freeze_key
    assert all("max_exp_avg_sq" in opt.state[p] and "scaling_coeff" not in opt.state[p]
               for p in ref.trainable(model))
    xs, _ = ref.train(opt, model, 0, 1, 22, LR, start=15)
    assert opt.lamb_freeze_key and torch.isfinite(xs[-1]).all()
    with pytest.raises(ValueError, match="freeze_step=0 must be an int >= 1"):
        opt.freeze_step = 0


@pytest.mark.parametrize("warmup", ["lamb", "cdadam"])
def test_empty_and_zero_parameters_give_no_nan(warmup):
    """Empty tensors (no norm, no max) and a tensor whose gradient is always 0 (zero momentum at
    the freeze: its scaling_coeff is 1) stay finite, their coefficients too."""
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    empty = torch.nn.Parameter(torch.empty(0))
    also_empty = torch.nn.Parameter(torch.empty(0, 4))
    unused = torch.nn.Parameter(torch.zeros(4))
    params = [empty, *net.parameters(), also_empty, unused]
    opt = taciturn.OneBitLamb([{"params": params}], lr=1e-2, warmup=warmup, freeze_step=4, weight_decay=0.01)
    for t in range(12):
        gen = torch.Generator().manual_seed(t)
        opt.zero_grad()
        (net(torch.randn(8, 5, generator=gen)).pow(2).mean() + empty.sum() + also_empty.sum()).backward()
        opt.step()
    assert opt.lamb_freeze_key
    assert opt.state[unused]["scaling_coeff"] == 1.0 and opt.state[empty]["scaling_coeff"] == 1.0
    for p in params:
        assert torch.isfinite(p).all()
        assert all(torch.isfinite(v).all() for v in opt.state[p].values() if torch.is_tensor(v))
        assert all(math.isfinite(opt.state[p][k]) for k in ("lamb_coeff_freeze", "last_factor", "scaling_coeff"))
    assert all(math.isfinite(c) for c in opt.lamb_coeffs)


@pytest.mark.parametrize("at", [5, 15], ids=["warmup", "compressed"])
def test_nonfinite_step_is_skipped_untouched(at):
    model, opt = build()
    ref.train(opt, model, 0, 1, at, LR)
    params = [p.detach().clone() for p in ref.trainable(model)]
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[model.fc1.weight].items()
             if k != "taciturn"}
    flat = {k: v.clone() for k, v in opt.compression.flat.items() if torch.is_tensor(v)}
    opt.zero_grad()
    ref.loss_of(model, 0, at, 0).backward()
    model.fc1.weight.grad[0, 0] = float("inf")
    opt.step()
    assert opt.stats.skipped_steps == 1 and opt.global_step == at
    assert all(torch.equal(a, b) for a, b in zip(params, ref.trainable(model)))
    for k, v in state.items():
        now = opt.state[model.fc1.weight][k]
        assert torch.equal(v, now) if torch.is_tensor(v) else v == now
    assert all(torch.equal(v, opt.compression.flat[k]) for k, v in flat.items())


def test_registry_builds_it_from_a_deepspeed_config():
    json_params = {"lr": 11e-3, "max_coeff": 0.3, "min_coeff": 0.01, "freeze_step": 1000,
                   "cuda_aware": False, "comm_backend_name": "nccl", "coeff_beta": 0.9, "factor_max": 4.0,
                   "factor_min": 0.5, "factor_threshold": 0.1, "max_grad_norm": 0.0}
    for name in ("OneBitLamb", "onebit_lamb", "OnebitLamb", "1bitlamb"):
        assert is_taciturn_optimizer(name)
        opt = taciturn.create_optimizer(name, ref.param_groups(ref.make_model()), **json_params)
        assert type(opt) is taciturn.OneBitLamb
    assert opt.param_groups[0]["lr"] == 11e-3 and opt.param_groups[0]["max_coeff"] == 0.3
    assert "OneBitLamb" in taciturn.list_optimizers()


def test_max_grad_norm_is_accepted_and_unused_with_a_warning():
    with pytest.warns(UserWarning, match="max_grad_norm=1.0 is unused, as in DeepSpeed's OnebitLamb"):
        taciturn.OneBitLamb(torch.nn.Linear(3, 2).parameters(), max_grad_norm=1.0)


def test_refuses_sharded_state():
    with pytest.raises(ValueError, match="shard_state=True is not available: 1-bit LAMB averages the momentum"):
        taciturn.OneBitLamb(torch.nn.Linear(3, 2).parameters(), shard_state=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(warmup="adam"), "warmup='adam' must be 'lamb'"),
    (dict(freeze_step=0), "freeze_step=0 must be an int >= 1 (the LAMB coefficients"),
    (dict(freeze_step=2.5), "freeze_step=2.5 must be an int >= 1"),
    (dict(amsgrad=True), "amsgrad=True is not supported"),
    (dict(bias_correction=True), "bias_correction=True is not supported"),
    (dict(eps_inside_sqrt=True), "eps_inside_sqrt=True is not supported"),
    (dict(coeff_beta=1.0), "invalid coeff_beta=1.0: must be in [0.0, 1.0)"),
    (dict(factor_min=2.0, factor_max=1.0), "factor_max=1.0 must be >= factor_min=2.0"),
    (dict(factor_threshold=-0.1), "invalid factor_threshold=-0.1"),
    (dict(min_coeff=-1.0), "invalid min_coeff=-1.0"),
    (dict(comm_backend_name="ucx"), "OneBitLamb: comm_backend_name='ucx' must be 'nccl'"),
], ids=["warmup", "freeze-0", "freeze-float", "amsgrad", "bias-correction", "eps-inside", "coeff-beta",
        "factor-order", "threshold", "min-coeff", "backend"])
def test_bad_input_names_the_problem(kwargs, message):
    with pytest.raises(ValueError) as info:
        taciturn.OneBitLamb(torch.nn.Linear(3, 2).parameters(), **kwargs)
    assert message in str(info.value)


def test_bad_mask_is_refused_when_the_group_is_added():
    net = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="OneBitLamb: param group 0's exp_avg_mask has shape"):
        taciturn.OneBitLamb([{"params": list(net.parameters()), "exp_avg_mask": torch.ones(5)}])


@pytest.mark.parametrize("exact", [False, True], ids=["defaults", "deepspeed-exact"])
def test_defaults_keep_zero_variance_elements_still_and_floor_the_variance(exact):
    """Defaults: after the freeze, elements whose frozen variance is 0 do not move (DeepSpeed's
    exact form moves them by about lr coeff scale / eps), and every non-zero frozen v is at least
    0.1 of its block's mean before the floor (64-element blocks)."""
    model = ref.make_model(0)
    dead = model.fc1.weight
    opt = taciturn.OneBitLamb(ref.param_groups(model), lr=LR, block_size=64, **SETTINGS, **(EXACT if exact else {}))
    before = dead[0].detach().clone()
    for t in range(FREEZE + 10):
        opt.zero_grad()
        ref.loss_of(model, 0, t, 0).backward()
        dead.grad[0] = 0.0  # unit 0 of fc1 never gets a gradient
        opt.step()
    assert opt.lamb_freeze_key and (opt.state[dead]["exp_avg_sq"][0] == 0).all()
    ratios = [block[block > 0].min() / block.mean() for block in opt.state[dead]["exp_avg_sq"].reshape(-1).split(64)]
    if exact:
        assert (dead[0] - before).abs().max() > 1.0 and min(ratios) < 0.01
    else:
        assert torch.equal(dead[0], before) and min(ratios) >= 0.09
        assert all(torch.isfinite(p).all() for p in ref.trainable(model))


@pytest.mark.parametrize("drop_mask", [False, True], ids=["as-saved", "saved-without-the-mask"])
def test_zero_variance_mask_made_at_the_freeze_and_rederived_on_load(drop_mask):
    """The defaults' zero-variance mask is made once at the freeze (not compared per step) and
    kept in the state; a checkpoint past the freeze resumes bit-identically, also one without
    the mask (re-derived from the loaded frozen variance)."""
    opt, mask, fresh, model, full, resumed = ref.dead_unit_resume(
        lambda groups: taciturn.OneBitLamb(groups, lr=LR, block_size=64, **SETTINGS), FREEZE + 3, 6, drop_mask)
    assert mask is not None and mask.dtype == torch.bool and mask[0].all()
    loaded = fresh.state[model.fc1.weight]["zero_variance_mask"]
    assert loaded.dtype == torch.bool and torch.equal(loaded, mask)
    assert torch.equal(loaded, fresh.state[model.fc1.weight]["exp_avg_sq"] == 0)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
