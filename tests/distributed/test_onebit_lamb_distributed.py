"""OneBitLamb on 3 real gloo processes against the transcription simulating 3 workers
(tests/lamb_reference.py), across the freeze, with both warm-ups.

One job runs each case for 32 steps with the divergence guard on at every step, checkpointing
each rank at step 8 (warm-up) and step 20 (compressed) and skipping the steps whose gradient is
NaN on rank 1 only (one in the warm-up, one after the freeze); a second job of fresh processes
restores both checkpoints. The tests check every rank's trajectory against the transcription,
the parameters and the coefficients bit-identical on every rank after every step, the skipped
steps, and the bit-identical resumes.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lamb_reference as lref  # noqa: E402
import reference as ref  # noqa: E402
from reference import one_thread  # noqa: E402,F401 (fixture)

import taciturn  # noqa: E402

N = 3
STEPS = 32
FREEZE = 12
SAVE_AT = (8, 20)
NAN_AT = (5, 16)  # rank 1's gradient is NaN: every rank skips the step (warm-up, compressed)
LR = 1e-2
SETTINGS = dict(freeze_step=FREEZE, max_coeff=0.06, min_coeff=0.02, coeff_beta=0.8, factor_max=1.2, factor_min=0.9,
                factor_threshold=0.01)
#: DeepSpeed's exact form (taciturn's zero-variance mask and variance floor off), as transcribed
EXACT = dict(mask_zero_variance=False, variance_floor=0.0)
RTOL, ATOL = 1e-5, 1e-5
CASES = {
    "lamb_mask_weight_decay": dict(weight_decay=0.01, masked=True),
    "cdadam": dict(warmup="cdadam", block_size=64),
}
COEFFICIENTS = ("lamb_coeff_freeze", "last_factor", "scaling_coeff")


def build(name, seed):
    cfg = dict(CASES[name])
    masked = cfg.pop("masked", False)
    model = ref.make_model(seed)
    groups = ref.param_groups(model)
    if masked:
        groups[1]["exp_avg_mask"] = ref.fc2_mask(model)
    opt = taciturn.OneBitLamb(groups, lr=LR, check_divergence_every=1, **SETTINGS, **EXACT, **cfg)
    return model, opt


def coefficients(opt, model):
    return [[opt.state[p].get(k) for k in COEFFICIENTS] for p in ref.trainable(model)]


def drive(opt, model, rank, start, stop, ckpt=None):
    """ref.train one step at a time (t: the workload's step index), with rank 1's gradient NaN at
    the indices NAN_AT; saves a checkpoint when the optimizer's step count reaches one of
    SAVE_AT, if ``ckpt`` (a path pattern) is given."""
    points, coeffs, skipped = [], [], []
    for t in range(start, stop):
        if t in NAN_AT:
            before = opt.global_step
            opt.zero_grad()
            ref.loss_of(model, rank, t, 0).backward()
            if rank == 1:
                model.fc1.weight.grad[0, 0] = float("nan")
            opt.step()
            skipped.append(opt.global_step == before)
            continue
        points += ref.train(opt, model, rank, N, t + 1, LR, start=t)[0]
        coeffs.append(coefficients(opt, model))
        if ckpt is not None and opt.global_step in SAVE_AT:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt.format(opt.global_step))
    return points, coeffs, skipped


def run_full(rank, n, ckpt_dir):
    out = {}
    for name in CASES:
        model, opt = build(name, seed=rank)
        points, coeffs, skipped = drive(opt, model, rank, 0, STEPS + len(NAN_AT),
                                        os.path.join(ckpt_dir, f"{name}.{{}}.rank{rank}.pt"))
        out[name] = dict(points=points, coeffs=coeffs, skipped=skipped, layout=ref.pipeline_layout(opt),
                         steps=opt.global_step, frozen=opt.lamb_freeze_key)
    return out


def run_resumed(rank, n, ckpt_dir):
    out = {}
    for name in CASES:
        for at in SAVE_AT:
            model, opt = build(name, seed=1000 + rank)
            saved = torch.load(os.path.join(ckpt_dir, f"{name}.{at}.rank{rank}.pt"), weights_only=True)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            start = at + sum(t < at for t in NAN_AT)  # the loop index of the step after the checkpoint
            points, coeffs, _ = drive(opt, model, rank, start, STEPS + len(NAN_AT))
            out[name, at] = dict(points=points, coeffs=coeffs)
    return out


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, run_ranks):
    return ref.full_and_resumed(run_ranks, tmp_path_factory, run_full, run_resumed, N)


def simulate(name, layout):
    """The transcription on the same steps (the NaN steps are skipped: they are not steps)."""
    cfg = dict(CASES[name])
    masked = cfg.pop("masked", False)
    model = ref.make_model(0)
    groups = ref.param_groups(model)
    C = ref.compression_factory(layout)
    block = cfg.get("block_size", 1024)
    mask = ref.flat_mask(model)
    sim = lref.OneBitLamb(ref.flat(ref.trainable(model)), N, [p.numel() for p in ref.trainable(model)],
                          C("block_sign", block_size=block), warmup=cfg.get("warmup", "lamb"),
                          warmup_C=C("block_sign", block_size=block), weight_decay=cfg.get("weight_decay", 0.0),
                          mask=mask if masked else None, **SETTINGS)
    shapes, scale = ref.shapes(model), model.scale.detach()
    xs = []
    for t in range(STEPS + len(NAN_AT)):
        if t in NAN_AT:
            continue
        grads = [ref.gradient(pt, shapes, scale, i, N, t) for i, pt in enumerate(sim.points())]
        sim.step(grads, ref.flat_lr(model, groups, t, LR))
        xs.append(sim.x.clone())
    return xs, sim


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transcription_of_3_workers(jobs, name):
    full, _ = jobs
    xs, sim = simulate(name, full[0][name]["layout"])
    assert full[0][name]["steps"] == STEPS and full[0][name]["frozen"]
    points = full[0][name]["points"]
    assert len(points) == len(xs) == STEPS
    for k, (a, e) in enumerate(zip(points, xs), 1):
        torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}, step {k}: {m}")
    last = full[0][name]["coeffs"][-1]
    for i, (lamb_coeff, factor, scaling) in enumerate(last):
        assert lamb_coeff == pytest.approx(sim.lamb_coeff_freeze[i], rel=1e-5)
        assert factor == pytest.approx(sim.last_factor[i], rel=1e-5)
        assert scaling == pytest.approx(sim.scaling_coeff[i], rel=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_bit_identical_after_every_step(jobs, name):
    """The parameters and the coefficients, on both sides of the freeze (the divergence guard
    compared the parameters at every step too and passed)."""
    full, _ = jobs
    for k in range(STEPS):
        assert all(torch.equal(full[r][name]["points"][k], full[0][name]["points"][k]) for r in range(N)), \
            f"{name}: parameters differ after step {k + 1}"
        assert all(full[r][name]["coeffs"][k] == full[0][name]["coeffs"][k] for r in range(N)), \
            f"{name}: coefficients differ after step {k + 1}"


def test_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(jobs):
    full, _ = jobs
    for name in CASES:
        assert [full[r][name]["skipped"] for r in range(N)] == [[True, True]] * N


@pytest.mark.parametrize("at", SAVE_AT, ids=["warmup", "compressed"])
@pytest.mark.parametrize("name", list(CASES))
def test_resume_is_bit_identical(jobs, name, at):
    full, resumed = jobs
    for rank in range(N):
        again = resumed[rank][name, at]
        assert len(again["points"]) == STEPS - at
        assert all(torch.equal(a, b) for a, b in zip(full[rank][name]["points"][at:], again["points"])), \
            f"{name}: rank {rank}'s resumed parameters (checkpoint of step {at})"
        assert full[rank][name]["coeffs"][at:] == again["coeffs"]
