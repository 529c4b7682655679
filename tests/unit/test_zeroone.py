"""ZeroOneAdam (0/1 Adam) on one rank: the transcription of DeepSpeed 0.16.9's algorithm
(tests/zeroone_reference.py) step by step across the freeze and the local-step schedule, the
identity compressor, bit-identical resumes, the running script's settings winning on load,
empty parameters, skipped non-finite steps, bytes, the registry and bad input."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference as ref  # noqa: E402
import zeroone_reference as zref  # noqa: E402
from reference import one_thread  # noqa: E402,F401 (fixture)

import taciturn  # noqa: E402
from taciturn.registry import is_taciturn_optimizer  # noqa: E402

STEPS = 36
LR = 1e-2
#: crosses var_interval 1 -> 2 -> 4, the freeze after step 14, local_step_interval 1 -> 2 -> 4
SCHEDULE = dict(var_freeze_step=14, var_update_scaler=3, local_step_scaler=3, local_step_clipper=4)
#: (ref.assert_close_steps' 1e-5: float rounding of Adam without bias correction, m / (sqrt(v) + eps)
#: of tiny v, stays near 2e-6 of the largest parameter over the run: it does not grow)


#: DeepSpeed's exact form (taciturn's zero-variance mask and variance floor off), as transcribed
EXACT = dict(mask_zero_variance=False, variance_floor=0.0)


def build(seed=0, masked=False, **kw):
    model = ref.make_model(seed)
    opt = taciturn.ZeroOneAdam(ref.masked_groups(model, masked), lr=LR, **{**SCHEDULE, **EXACT, **kw})
    return model, opt


def transcription(opt, model, masked=False, warmup="adam", block_size=1024, compressor="block_sign", **kw):
    C = ref.compression_factory(ref.pipeline_layout(opt))
    settings = {**SCHEDULE, **kw}
    sim = zref.ZeroOneAdam(ref.flat(ref.trainable(model)), 1, C(compressor, block_size=block_size), **settings,
                           mask=ref.flat_mask(model) if masked else None, warmup=warmup,
                           warmup_C=C("block_sign", block_size=block_size))
    return ref.simulate(sim, model, ref.masked_groups(model, masked), 1, STEPS, LR)


CONFIGS = {
    "adam": {},
    "adam_weight_decay_mask": dict(masked=True, weight_decay=0.01),
    "cdadam": dict(warmup="cdadam", block_size=64),
    "cdadam_weight_decay_mask": dict(warmup="cdadam", block_size=64, masked=True, weight_decay=0.01),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_the_transcription(name):
    cfg = dict(CONFIGS[name])
    masked = cfg.pop("masked", False)
    model, opt = build(masked=masked, **cfg)
    xs, points = ref.train(opt, model, 0, 1, STEPS, LR)
    sim_model = ref.make_model(0)
    sim_xs, sim_points = transcription(opt, sim_model, masked=masked, **cfg)
    ref.assert_close_steps(xs, sim_xs, f"{name}: x_sync")
    ref.assert_close_steps(points, [p[0] for p in sim_points], f"{name}: parameters")
    assert opt.freeze_key and opt.global_step == STEPS
    if cfg.get("warmup") != "cdadam":
        assert opt.schedule["var_interval"] == 4
    assert opt.schedule["local_step_interval"] == 4
    assert not torch.equal(xs[0], xs[-1])


def test_schedule_of_fp32_1bit_and_local_steps():
    """Per step: fp32 mean gradients on the variance steps, 1-bit between, 1-bit momentum at
    the synchronisations after the freeze, nothing between (DeepSpeed's s = k + 1)."""
    model, opt = build()
    fp32 = 4 * sum(p.numel() for p in ref.trainable(model))
    sent = []
    for t in range(STEPS):
        ref.train(opt, model, 0, 1, t + 1, LR, start=t)
        sent.append(opt.metrics()["taciturn/bytes_up"])
    s = [k + 1 for k in range(1, STEPS + 1)]
    variance = [2, 3, 4, 6, 8, 10, 12]
    syncs = [16, 17, 18, 20, 24, 28, 32, 36]
    for k, (step, b) in enumerate(zip(s, sent), 1):
        if step in variance:
            assert b >= fp32, f"step {k}: fp32 expected"
        elif k <= SCHEDULE["var_freeze_step"] or step in syncs:
            assert 0 < b < fp32 / 8, f"step {k}: 1-bit expected"
        else:
            assert b == 0, f"step {k}: a local step sent {b} bytes"
    assert opt.stats.fp32_bytes == STEPS * fp32
    assert opt.stats.bytes_up == sum(sent)


def test_identity_compressor_is_frozen_variance_adam():
    """With C = identity, one variance step per step (var_update_scaler large), one local step
    per synchronisation and no weight decay, 0/1 Adam is 1-bit Adam's update: Adam (no bias
    correction) until var_freeze_step, then the variance frozen: OneBitAdam(compressor="identity")."""
    kw = dict(var_freeze_step=12, var_update_scaler=10 ** 6, local_step_scaler=10 ** 6, local_step_clipper=1)
    model, opt = build(compressor="identity", **kw)
    xs, points = ref.train(opt, model, 0, 1, STEPS, LR)
    other = ref.make_model(0)
    onebit = taciturn.OneBitAdam(ref.param_groups(other), lr=LR, freeze_step=12, compressor="identity",
                                 mask_zero_variance=False, variance_floor=0.0)  # DeepSpeed's frozen variance
    expected, _ = ref.train(onebit, other, 0, 1, STEPS, LR)
    ref.assert_close_steps(points, expected, "ZeroOneAdam(identity) vs OneBitAdam(identity)")
    assert all(torch.equal(x, p) for x, p in zip(xs, points))  # every step synchronises


def test_identity_compressor_local_steps_match_the_transcription():
    model, opt = build(compressor="identity", weight_decay=0.01)
    xs, points = ref.train(opt, model, 0, 1, STEPS, LR)
    sim_xs, sim_points = transcription(opt, ref.make_model(0), compressor="identity", weight_decay=0.01)
    ref.assert_close_steps(points, [p[0] for p in sim_points], "identity: parameters")


@pytest.mark.parametrize("warmup", ["adam", "cdadam"])
@pytest.mark.parametrize("save_at", [8, 17, 25], ids=["before-freeze", "after-freeze-synced", "between-syncs"])
def test_resume_is_bit_identical(warmup, save_at, tmp_path):
    model, opt = build(warmup=warmup, block_size=64)
    ref.train(opt, model, 0, 1, save_at, LR)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    pending = opt.freeze_key and any(opt.state[p]["momentum_accumulator"].any() for p in ref.trainable(model))
    assert pending == (save_at == 25), "the checkpoint must fall where the test says"
    rest = ref.train(opt, model, 0, 1, STEPS, LR, start=save_at)

    fresh_model, fresh = build(seed=7, warmup=warmup, block_size=64)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh_model.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["optimizer"])
    again = ref.train(fresh, fresh_model, 0, 1, STEPS, LR, start=save_at)
    for a, b in zip(rest, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), "the resumed run is not bit-identical"
    assert fresh.schedule == opt.schedule
    assert sorted(fresh.compression.flat) == sorted(opt.compression.flat)
    assert not any(k.startswith(("exact.", "grad.", "warmup.")) for k in fresh.compression.flat)


def test_checkpoint_holds_the_schedule_as_ints():
    model, opt = build()
    ref.train(opt, model, 0, 1, 25, LR)
    sd = opt.state_dict()
    schedule = next(v["zero_one_schedule"] for v in sd["state"].values() if "zero_one_schedule" in v)
    assert schedule == dict(var_interval=4, var_counter=1, local_step_interval=4, local_step_counter=2, frozen=True)
    assert all(type(v) is int for k, v in schedule.items() if k != "frozen")
    assert all(isinstance(v["lrs"], float) for v in sd["state"].values() if "lrs" in v)


def test_running_mask_and_schedule_win_on_load(tmp_path):
    """DeepSpeed's TestZeroOneAdamCheckpointing: the mask of the running script wins over the
    checkpoint's; a script without one loads none."""
    model, opt = build(masked=True)
    ref.train(opt, model, 0, 1, 20, LR)
    saved = opt.state_dict()
    mask2 = ref.fc2_mask(model).flip(0)
    groups = ref.masked_groups(ref.make_model(1), False)
    groups[1]["exp_avg_mask"] = mask2
    second = taciturn.ZeroOneAdam(groups, lr=LR, **{**SCHEDULE, "local_step_clipper": 8})
    second.load_state_dict(saved)
    assert torch.equal(second.param_groups[1]["exp_avg_mask"], mask2)
    assert second.param_groups[0]["local_step_clipper"] == 8 and second.freeze_key
    third = taciturn.ZeroOneAdam(ref.masked_groups(ref.make_model(2), False), lr=LR, **SCHEDULE)
    third.load_state_dict(saved)
    assert all("exp_avg_mask" not in g for g in third.param_groups)
    assert torch.equal(opt.param_groups[1]["exp_avg_mask"], ref.fc2_mask(model))  # saving changed nothing


def test_masked_momentum_is_zero_after_a_synchronisation():
    """DeepSpeed's TestZeroOneAdamExpAvgMask: after a synchronising step the momentum is 0
    where the mask is."""
    model, opt = build(masked=True)
    ref.train(opt, model, 0, 1, 19, LR)  # step 19 (s = 20) synchronises
    w, b = model.fc2.weight, model.fc2.bias
    assert torch.equal(opt.state[w]["exp_avg"][2:], torch.zeros_like(w[2:]))
    assert opt.state[w]["exp_avg"][:2].abs().min() > 0 and opt.state[b]["exp_avg"].abs().min() > 0


@pytest.mark.parametrize("warmup", ["adam", "cdadam"])
def test_empty_parameters_give_no_nan(warmup):
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    empty = torch.nn.Parameter(torch.empty(0))
    also_empty = torch.nn.Parameter(torch.empty(0, 4))
    opt = taciturn.ZeroOneAdam([{"params": [empty, *net.parameters(), also_empty]}], lr=1e-2, warmup=warmup,
                               var_freeze_step=4, var_update_scaler=1, local_step_scaler=1, local_step_clipper=2)
    for t in range(12):
        gen = torch.Generator().manual_seed(t)
        opt.zero_grad()
        (net(torch.randn(8, 5, generator=gen)).pow(2).mean() + empty.sum() + also_empty.sum()).backward()
        opt.step()
    assert opt.freeze_key
    for p in [empty, *net.parameters(), also_empty]:
        assert torch.isfinite(p).all()
        assert all(torch.isfinite(v).all() for v in opt.state[p].values() if torch.is_tensor(v))


def test_nonfinite_step_is_skipped_untouched():
    model, opt = build()
    ref.train(opt, model, 0, 1, 20, LR)
    params = [p.detach().clone() for p in ref.trainable(model)]
    state = {k: v.clone() for k, v in opt.state[model.fc1.weight].items() if torch.is_tensor(v)}
    schedule = dict(opt.schedule)
    opt.zero_grad()
    ref.loss_of(model, 0, 20, 0).backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.stats.skipped_steps == 1 and opt.global_step == 20 and opt.schedule == schedule
    assert all(torch.equal(a, b) for a, b in zip(params, ref.trainable(model)))
    assert all(torch.equal(v, opt.state[model.fc1.weight][k]) for k, v in state.items())


def test_cdadam_warmup_saves_bytes():
    """warmup="cdadam" sends no fp32 step: the run's bytes against the DeepSpeed schedule's."""
    sent = {}
    for warmup in ("adam", "cdadam"):
        model, opt = build(warmup=warmup, block_size=64)
        ref.train(opt, model, 0, 1, STEPS, LR)
        sent[warmup] = opt.stats
    assert sent["adam"].fp32_bytes == sent["cdadam"].fp32_bytes
    assert sent["cdadam"].bytes_up < sent["adam"].bytes_up / 3
    assert sent["cdadam"].compression_ratio > 3 * sent["adam"].compression_ratio


def test_registry_builds_it():
    model = ref.make_model()
    for name in ("ZeroOneAdam", "zero_one_adam", "zerooneadam"):
        assert is_taciturn_optimizer(name)
        opt = taciturn.create_optimizer(name, ref.param_groups(model), **SCHEDULE, cuda_aware=False,
                                        comm_backend_name="nccl")
        assert type(opt) is taciturn.ZeroOneAdam
    assert "ZeroOneAdam" in taciturn.list_optimizers()


@pytest.mark.parametrize("kwargs, message", [
    (dict(warmup="lamb"), "warmup='lamb' must be 'adam'"),
    (dict(var_freeze_step=0), "var_freeze_step=0 must be an int >= 1 (the variance phase"),
    (dict(local_step_clipper=0), "local_step_clipper=0 must be an int >= 1"),
    (dict(var_update_scaler=2.5), "var_update_scaler=2.5 must be an int >= 1"),
    (dict(amsgrad=True), "amsgrad=True is not supported"),
    (dict(comm_backend_name="ucx"), "ZeroOneAdam: comm_backend_name='ucx' must be 'nccl'"),
    (dict(variance_floor=2), "ZeroOneAdam: variance_floor=2 must be a number in \\[0, 1\\]"),
    (dict(mask_zero_variance="yes"), "ZeroOneAdam: mask_zero_variance='yes' must be True or False"),
], ids=["warmup", "freeze-0", "clipper-0", "scaler-float", "amsgrad", "backend", "floor", "mask"])
def test_bad_input_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        taciturn.ZeroOneAdam(torch.nn.Linear(3, 2).parameters(), **kwargs)


def test_bad_mask_is_refused_when_the_group_is_added():
    net = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="ZeroOneAdam: param group 0's exp_avg_mask has shape"):
        taciturn.ZeroOneAdam([{"params": list(net.parameters()), "exp_avg_mask": torch.ones(5)}])


def test_synced_weights_hold_x_sync_between_synchronisations():
    model, opt = build()
    ref.train(opt, model, 0, 1, 25, LR)  # step 25 (s = 26) falls between two synchronisations
    params = ref.trainable(model)
    own = [p.detach().clone() for p in params]
    synced = [opt.state[p]["synced_param"] for p in params]
    assert not all(torch.equal(a, b) for a, b in zip(own, synced))
    with opt.synced_weights():
        assert all(torch.equal(p, s) for p, s in zip(params, synced))
    assert all(torch.equal(p, a) for p, a in zip(params, own))


def dead_unit_model(seed=0):
    """ref's model with fc1's first output unit fed by a zero column: its weights get no gradient."""
    model = ref.make_model(seed)
    with torch.no_grad():
        model.fc2.weight[:, 0] = 0.0
    return model


def test_defaults_keep_zero_variance_elements_still_and_floor_the_variance():
    """Defaults: elements whose variance is exactly 0 never move (the 1-bit gradients and the
    synchronised u_avg would move them by about lr * scale / eps), and after every variance
    update each non-zero v is at least 0.1 of its block's mean (64-element blocks here)."""
    model = ref.make_model(0)
    dead = model.fc1.weight
    opt = taciturn.ZeroOneAdam(ref.masked_groups(model, False), lr=LR, block_size=64, **SCHEDULE)
    with torch.no_grad():
        before = dead[0].clone()
    for t in range(STEPS):
        opt.zero_grad()
        ref.loss_of(model, 0, t, 0).backward()
        dead.grad[0] = 0.0  # unit 0 of fc1 never gets a gradient
        opt.step()
        for p in ref.trainable(model):
            v = opt.state[p]["exp_avg_sq"].reshape(-1)
            for block in v.split(64):  # floored from the block's mean before the floor: >= 0.1 of less than now
                assert block[block > 0].min() >= 0.09 * block.mean(), f"step {t + 1}: a variance under the floor"
    assert opt.freeze_key and torch.equal(dead[0], before)
    assert (opt.state[dead]["exp_avg_sq"][0] == 0).all()
    assert all(torch.isfinite(p).all() for p in ref.trainable(model))


def test_exact_form_moves_zero_variance_elements():
    """The same run in DeepSpeed's exact form: the 1-bit values move the dead unit's weights."""
    model = ref.make_model(0)
    dead = model.fc1.weight
    opt = taciturn.ZeroOneAdam(ref.masked_groups(model, False), lr=LR, block_size=64, **SCHEDULE, **EXACT)
    before = dead[0].detach().clone()
    for t in range(STEPS):
        opt.zero_grad()
        ref.loss_of(model, 0, t, 0).backward()
        dead.grad[0] = 0.0
        opt.step()
    assert (dead[0] - before).abs().max() > 1.0  # steps of order lr * scale / eps
    v = opt.state[dead]["exp_avg_sq"].reshape(-1)
    assert min(block[block > 0].min() / block.mean() for block in v.split(64)) < 0.01  # what the floor lifts


@pytest.mark.parametrize("drop_mask", [False, True], ids=["as-saved", "saved-without-the-mask"])
def test_zero_variance_mask_made_at_the_freeze_and_rederived_on_load(drop_mask):
    """In the local-step phase the defaults' zero-variance mask is the one made at the freeze
    (not compared per step), kept in the state; a checkpoint between synchronisations resumes
    bit-identically, also one without the mask (re-derived from the loaded frozen variance)."""
    opt, mask, fresh, model, full, resumed = ref.dead_unit_resume(
        lambda groups: taciturn.ZeroOneAdam(groups, lr=LR, block_size=64, **SCHEDULE),
        SCHEDULE["var_freeze_step"] + 3, 8, drop_mask)
    assert opt.freeze_key and mask is not None and mask.dtype == torch.bool and mask[0].all()
    loaded = fresh.state[model.fc1.weight]["zero_variance_mask"]
    assert loaded.dtype == torch.bool and torch.equal(loaded, mask)
    assert torch.equal(loaded, fresh.state[model.fc1.weight]["exp_avg_sq"] == 0)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
