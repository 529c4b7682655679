"""Every preset on 3 real gloo processes against the papers' pseudo-code simulating 3 workers.

One job runs every case for 20 steps (checkpointing each rank at step 10); a second job of
fresh processes restores the step-10 checkpoints and runs steps 10-19. The tests then check,
for each case: every rank bit-identical after every step (SAEF: the synced x), each rank's
parameters equal to the simulated worker's, the trajectory equal to the transcription, and the
resumed run bit-identical to the uninterrupted one.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference as ref  # noqa: E402
from reference import one_thread  # noqa: E402,F401 (fixture)

import taciturn  # noqa: E402

N = 3
STEPS = 20
SAVE_AT = 10
RTOL, ATOL = 1e-5, 1e-6


def _build(name, seed):
    case = ref.CASES[name]
    model = ref.make_model(seed)
    opt = taciturn.create_optimizer(case.optimizer, ref.param_groups(model, case.groups), lr=case.lr,
                                    **case.kwargs)
    return case, model, opt


def _ckpt(ckpt_dir, name, rank):
    return os.path.join(ckpt_dir, f"{name}.rank{rank}.pt")


def run_uninterrupted(rank, n, names, ckpt_dir):
    """Each case from step 0 to STEPS; every rank saves its model and optimizer at SAVE_AT.
    Ranks start from different initial weights: the optimizer broadcasts rank 0's."""
    out = {}
    for name in names:
        case, model, opt = _build(name, seed=rank)
        xs, points = ref.train(opt, model, rank, n, SAVE_AT, case.lr)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, _ckpt(ckpt_dir, name, rank))
        more_xs, more_points = ref.train(opt, model, rank, n, STEPS, case.lr, start=SAVE_AT)
        out[name] = dict(xs=xs + more_xs, points=points + more_points, layout=ref.pipeline_layout(opt),
                         frozen=model.scale.detach().clone())
    return out


def run_resumed(rank, n, names, ckpt_dir):
    """Fresh processes: new models (other weights), load the step-SAVE_AT files, continue."""
    out = {}
    for name in names:
        case, model, opt = _build(name, seed=1000 + rank)
        saved = torch.load(_ckpt(ckpt_dir, name, rank), weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        xs, points = ref.train(opt, model, rank, n, STEPS, case.lr, start=SAVE_AT)
        out[name] = dict(xs=xs, points=points)
    return out


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, run_ranks):
    ckpt_dir = str(tmp_path_factory.mktemp("ckpt"))
    names = list(ref.CASES)
    full = run_ranks(run_uninterrupted, N, names, ckpt_dir, timeout=300)
    resumed = run_ranks(run_resumed, N, names, ckpt_dir, timeout=300)
    return full, resumed, ckpt_dir


def assert_trajectory(actual, expected, what, exact=False):
    assert len(actual) == len(expected)
    for t, (a, e) in enumerate(zip(actual, expected)):
        if exact:
            assert torch.equal(a, e), f"{what}: not bit-identical at step {t} (max diff {(a - e).abs().max():.3e})"
        else:
            torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, step {t}: {m}")


@pytest.mark.parametrize("name", list(ref.CASES))
def test_ranks_bit_identical_every_step(jobs, name):
    full, _, _ = jobs
    for rank in range(1, N):
        assert_trajectory(full[rank][name]["xs"], full[0][name]["xs"], f"{name}: rank {rank} vs rank 0",
                          exact=True)
        assert torch.equal(full[rank][name]["frozen"], full[0][name]["frozen"])
    first = full[0][name]["xs"]
    assert not torch.equal(first[0], first[-1]), f"{name}: the parameters never moved"


@pytest.mark.parametrize("name", list(ref.CASES))
def test_matches_transcription_of_3_workers(jobs, name):
    full, _, _ = jobs
    case = ref.CASES[name]
    model = ref.make_model(seed=0)  # rank 0's initial weights, which every rank received
    x0 = ref.flat(ref.trainable(model))
    sim = case.sim(x0, N, ref.compression_factory(full[0][name]["layout"]))
    xs, points = ref.simulate(sim, model, ref.param_groups(model, case.groups), N, STEPS, case.lr)
    assert_trajectory(full[0][name]["xs"], xs, f"{name}: x")
    for rank in range(N):
        assert_trajectory(full[rank][name]["points"], [p[rank] for p in points],
                          f"{name}: rank {rank}'s parameters")


@pytest.mark.parametrize("name", ["saef_two_way", "saef_single_way"])
def test_saef_forward_sees_x_minus_own_error(jobs, name):
    """SAEF's ranks share x, but each one's parameters are x - e_k: different per rank, except
    right after the errors were averaged (at the start of step t when (t + 1) mod p == 0)."""
    full, _, _ = jobs
    period = ref.CASES[name].kwargs["error_avg_period"]
    for i in range(STEPS):
        points = [full[r][name]["points"][i] for r in range(N)]
        t = i + 1  # the step the parameters are prepared for
        if (t + 1) % period == 0:
            assert all(torch.equal(p, points[0]) for p in points), f"{name}: errors not averaged before step {t}"
        else:
            assert not torch.equal(points[0], points[1]) and not torch.equal(points[1], points[2]), (
                f"{name}: ranks hold the same parameters before step {t}")
        assert not torch.equal(points[0], full[0][name]["xs"][i]), f"{name}: parameters are x before step {t}"


@pytest.mark.parametrize("name", list(ref.CASES))
def test_resume_from_checkpoint_bit_identical(jobs, name):
    full, resumed, _ = jobs
    for rank in range(N):
        assert_trajectory(resumed[rank][name]["xs"], full[rank][name]["xs"][SAVE_AT:],
                          f"{name}: rank {rank} resumed x", exact=True)
        assert_trajectory(resumed[rank][name]["points"], full[rank][name]["points"][SAVE_AT:],
                          f"{name}: rank {rank} resumed parameters", exact=True)


@pytest.mark.parametrize("name", ["cdadam_block1024", "distef_nesterov", "saef_two_way", "onebit_cdadam"])
def test_other_world_size_refused_unless_reset(jobs, name):
    _, _, ckpt_dir = jobs
    case = ref.CASES[name]
    model = ref.make_model()
    opt = taciturn.create_optimizer(case.optimizer, ref.param_groups(model, case.groups), lr=case.lr,
                                    process_group="local", **case.kwargs)
    saved = torch.load(_ckpt(ckpt_dir, name, 0), weights_only=True)
    model.load_state_dict(saved["model"])
    with pytest.raises(ValueError, match=r"world size 3.*1 ranks.*reset_compression_state=True"):
        opt.load_state_dict(saved["optimizer"])
    opt.load_state_dict(saved["optimizer"], reset_compression_state=True)
    st = opt.compression.flat
    assert st["world_size"] == 1 and opt.global_step == SAVE_AT
    for key, value in st.items():
        if torch.is_tensor(value):
            assert value.dtype == torch.float32 and not value.any(), f"{key} was not reset"
    xs, _ = ref.train(opt, model, 0, 1, SAVE_AT + 2, case.lr, start=SAVE_AT)
    assert torch.isfinite(xs[-1]).all() and not torch.equal(xs[0], xs[1])

