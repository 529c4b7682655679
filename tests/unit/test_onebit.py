"""OneBitAdam at the freeze: zero-variance elements are masked, the CD-Adam warm-up's
compression state is freed, and checkpoints on either side of the freeze resume exactly."""
from __future__ import annotations

import gc
import os
import sys
import weakref

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference as ref  # noqa: E402
from reference import one_thread  # noqa: E402,F401 (fixture)

import taciturn  # noqa: E402
from taciturn.optim.onebit import (DEFAULT_VARIANCE_FLOOR, VARIANCE_FLOORED, ZERO_VARIANCE_MASK,  # noqa: E402
                                   floor_variance_)

FREEZE = 5


def dead_input_net(seed=0):
    """A classifier whose input feature 0 is always 0 in ``train``: the weights reading it
    get a zero gradient, so their variance is exactly 0 at the freeze."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def train(net, opt, start, stop):
    """Steps ``start``..``stop - 1`` on fixed batches; the parameters after each step."""
    out = []
    for t in range(start, stop):
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(32, 6, generator=gen)
        x[:, 0] = 0.0
        y = torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        out.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    return out


def onebit(net, **kw):
    return taciturn.OneBitAdam(net.parameters(), lr=1e-2, freeze_step=FREEZE, **kw)


def test_zero_variance_masked_at_the_freeze():
    net = dead_input_net()
    start = net[0].weight.detach().clone()
    opt = onebit(net)
    xs = train(net, opt, 0, 20)
    assert all(torch.isfinite(x).all() for x in xs) and opt.stats.skipped_steps == 0
    mask = opt.state[net[0].weight][ZERO_VARIANCE_MASK]
    assert mask.dtype == torch.bool and mask[:, 0].all() and not mask[:, 1:].any()
    assert all(ZERO_VARIANCE_MASK not in opt.state[p] for p in list(net.parameters())[1:])
    assert torch.equal(net[0].weight[:, 0], start[:, 0]), "a zero-variance weight moved"
    assert not torch.equal(net[0].weight[:, 1:], start[:, 1:])


def test_zero_variance_mask_combines_with_exp_avg_mask():
    net = dead_input_net()
    start = net[0].weight.detach().clone()
    keep = torch.ones_like(start)
    keep[:, 1] = 0.0
    w, *rest = net.parameters()
    opt = taciturn.OneBitAdam([{"params": [w], "exp_avg_mask": keep}, {"params": rest}], lr=1e-2,
                              freeze_step=FREEZE)
    train(net, opt, 0, FREEZE)
    at_freeze = net[0].weight.detach().clone()
    train(net, opt, FREEZE, 12)
    after = net[0].weight.detach()
    assert torch.equal(after[:, 0], start[:, 0])  # the automatic mask
    assert torch.equal(after[:, 1], at_freeze[:, 1])  # exp_avg_mask
    assert not torch.equal(after[:, 2:], at_freeze[:, 2:]) and torch.isfinite(after).all()


def test_without_the_mask_zero_variance_weights_explode():
    """mask_zero_variance=False is DeepSpeed's behaviour: +-scale / (sqrt(0) + eps)."""
    net = dead_input_net()
    start = net[0].weight.detach().clone()
    opt = onebit(net, mask_zero_variance=False)
    train(net, opt, 0, FREEZE)
    assert torch.equal(net[0].weight[:, 0], start[:, 0])
    train(net, opt, FREEZE, FREEZE + 1)
    assert (net[0].weight[:, 0] - start[:, 0]).abs().max() > 100.0
    assert all(ZERO_VARIANCE_MASK not in st for st in opt.state.values())


def test_zero_variance_mask_survives_a_checkpoint(tmp_path):
    net = dead_input_net()
    opt = onebit(net)
    train(net, opt, 0, 10)
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    rest = train(net, opt, 10, 20)

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["optimizer"]["state"][0][ZERO_VARIANCE_MASK][:, 0].all()
    fresh_net = dead_input_net(seed=1)
    fresh = onebit(fresh_net)
    fresh_net.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["optimizer"])
    mask = fresh.state[fresh_net[0].weight][ZERO_VARIANCE_MASK]
    assert mask.dtype == torch.bool and torch.equal(mask, opt.state[net[0].weight][ZERO_VARIANCE_MASK])
    again = train(fresh_net, fresh, 10, 20)
    assert all(torch.equal(a, b) for a, b in zip(rest, again))

    off = onebit(dead_input_net(seed=1), mask_zero_variance=False)
    off.load_state_dict(saved["optimizer"])  # the running script's setting wins, as for exp_avg_mask
    assert all(ZERO_VARIANCE_MASK not in st for st in off.state.values())


def state_bytes(opt):
    """(per-parameter state bytes, compression state bytes)."""
    per_param = sum(v.numel() * v.element_size() for k, st in opt.state.items() if k != "taciturn"
                    for v in st.values() if torch.is_tensor(v))
    flat = opt.compression.flat
    return per_param, sum(v.numel() * v.element_size() for v in flat.values() if torch.is_tensor(v))


def test_cdadam_warmup_state_freed_at_the_freeze():
    net = dead_input_net()
    opt = taciturn.OneBitAdam(net.parameters(), lr=1e-2, freeze_step=FREEZE, warmup="cdadam", block_size=64)
    numel = sum(p.numel() for p in net.parameters())
    train(net, opt, 0, FREEZE)
    markov = weakref.ref(opt.compression.flat["warmup.0.worker_markov"])
    assert state_bytes(opt) == (12 * numel, 20 * numel)  # m, v, max v; Markov h, H, G + EF e, e~ (n = 1)
    train(net, opt, FREEZE, FREEZE + 1)
    gc.collect()
    assert markov() is None, "the warm-up's Markov state is still referenced"
    assert not any(k.startswith("warmup.") for k in opt.compression.flat)
    # m, v; EF e, e~. CD-Adam's variance comes from compressed gradients: no zero, no mask
    assert state_bytes(opt) == (8 * numel, 8 * numel)


@pytest.mark.parametrize("freeze_step", [5, 13], ids=["saved-after-freeze", "saved-before-freeze"])
def test_cdadam_resume_across_the_freeze(freeze_step, tmp_path):
    case = ref.CASES["onebit_cdadam"]

    def build(seed):
        model = ref.make_model(seed)
        kwargs = {**case.kwargs, "freeze_step": freeze_step}
        return model, taciturn.create_optimizer(case.optimizer, ref.param_groups(model, case.groups), lr=case.lr,
                                                **kwargs)

    model, opt = build(0)
    ref.train(opt, model, 0, 1, 10, case.lr)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    rest, _ = ref.train(opt, model, 0, 1, 20, case.lr, start=10)

    fresh_model, fresh = build(123)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert any(k.startswith("warmup.") for k in next(v["taciturn"] for v in saved["optimizer"]["state"].values() if "taciturn" in v)) == (freeze_step > 10)
    fresh_model.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["optimizer"])
    again, _ = ref.train(fresh, fresh_model, 0, 1, 20, case.lr, start=10)
    assert all(torch.equal(a, b) for a, b in zip(rest, again))
    assert sorted(fresh.compression.flat) == sorted(opt.compression.flat)


def test_raising_freeze_step_after_the_freeze_restarts_the_warmup():
    net = dead_input_net()
    opt = taciturn.OneBitAdam(net.parameters(), lr=1e-2, freeze_step=3, warmup="cdadam", block_size=64)
    train(net, opt, 0, 5)
    assert opt.adam_freeze_key is True  # DeepSpeed's name, read by its tests
    opt.freeze_step = 8
    train(net, opt, 5, 6)
    flat = opt.compression.flat
    assert not flat["frozen"] and any(k.startswith("warmup.") for k in flat)
    assert opt.adam_freeze_key is False
    assert all(ZERO_VARIANCE_MASK not in opt.state[p] for p in net.parameters())
    xs = train(net, opt, 6, 12)
    assert opt.compression.flat["frozen"] and not any(k.startswith("warmup.") for k in opt.compression.flat)
    assert torch.isfinite(xs[-1]).all()


def _ranks_resume(rank, n, ckpt_dir, resume):
    """Rank ``rank`` of a 2-rank OneBitAdam(warmup="cdadam") run freezing at step 5: steps
    0-9 then a checkpoint and steps 10-19, or (``resume``) a fresh model loading it for 10-19."""
    torch.set_num_threads(1)
    case = ref.CASES["onebit_cdadam"]
    model = ref.make_model(1000 * resume + rank)
    opt = taciturn.create_optimizer(case.optimizer, ref.param_groups(model, case.groups), lr=case.lr,
                                    **{**case.kwargs, "freeze_step": 5})
    path = os.path.join(ckpt_dir, f"rank{rank}.pt")
    if resume:
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
    else:
        ref.train(opt, model, rank, n, 10, case.lr)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    xs, _ = ref.train(opt, model, rank, n, 20, case.lr, start=10)
    return xs, sorted(opt.compression.flat)


def test_cdadam_resume_after_the_freeze_on_two_ranks(run_ranks, tmp_path):
    full = run_ranks(_ranks_resume, 2, str(tmp_path), False)
    resumed = run_ranks(_ranks_resume, 2, str(tmp_path), True)
    for (xs, keys), (again, again_keys) in zip(full, resumed):
        assert all(torch.equal(a, b) for a, b in zip(xs, again))
        assert keys == again_keys and not any(k.startswith("warmup.") for k in keys)
    assert all(torch.equal(a, b) for a, b in zip(full[0][0], full[1][0])), "ranks diverged"


# ---------------------------------------------------------------------------- exp_avg_mask shapes
def masked_run(groups_of):
    """Train a dead-input net past the freeze with the param groups ``groups_of(net)``; its
    parameters after each step."""
    net = dead_input_net()
    opt = taciturn.OneBitAdam(groups_of(net), lr=1e-2, freeze_step=FREEZE)
    return train(net, opt, 0, 12), opt


def keep_rows(weight, rows):
    mask = torch.zeros_like(weight)
    mask[rows] = 1.0
    return mask


def test_flat_exp_avg_mask_is_the_per_parameter_mask_flattened():
    """Mirrors DeepSpeed's TestOneBitAdamExpAvgMask: ``torch.flatten(mask)`` of a one-parameter
    group, and one flat mask over a group of two parameters (DeepSpeed's flattened groups)."""
    def per_parameter(net):
        w, b, *rest = net.parameters()
        return [{"params": [w], "exp_avg_mask": keep_rows(w, [0, 1])},
                {"params": [b], "exp_avg_mask": keep_rows(b, [2])}, {"params": rest}]

    def flat(net):
        w, b, *rest = net.parameters()
        return [{"params": [w], "exp_avg_mask": torch.flatten(keep_rows(w, [0, 1]))},
                {"params": [b], "exp_avg_mask": torch.flatten(keep_rows(b, [2]))}, {"params": rest}]

    def concatenated(net):
        w, b, *rest = net.parameters()
        mask = torch.cat([keep_rows(w, [0, 1]).flatten(), keep_rows(b, [2])])
        return [{"params": [w, b], "exp_avg_mask": mask}, {"params": rest}]

    reference, opt = masked_run(per_parameter)
    for groups_of in (flat, concatenated):
        xs, other = masked_run(groups_of)
        assert all(torch.equal(a, b) for a, b in zip(reference, xs))
        for p, q in zip(opt.param_groups[0]["params"] + opt.param_groups[1]["params"],
                        other.param_groups[0]["params"] + (other.param_groups[1]["params"] if groups_of is flat
                                                           else [])):
            assert torch.equal(opt.state[p]["exp_avg"], other.state[q]["exp_avg"])
    w, b = opt.param_groups[0]["params"][0], opt.param_groups[1]["params"][0]
    # the averaged momentum is 0 wherever the mask is, as DeepSpeed's test checks after its steps
    assert torch.equal(opt.state[w]["exp_avg"][2:], torch.zeros_like(w[2:]))
    assert opt.state[w]["exp_avg"][:2, 1:].abs().min() > 0
    assert torch.equal(opt.state[b]["exp_avg"] != 0, keep_rows(b, [2]).bool())


@pytest.mark.parametrize("mask_shape", [(16,), (16, 5), (97,)], ids=["rows", "wrong-shape", "wrong-size"])
def test_exp_avg_mask_of_another_size_is_refused(mask_shape):
    net = dead_input_net()
    w, b, *rest = net.parameters()
    with pytest.raises(ValueError, match=r"param group 0's exp_avg_mask has shape .* fits neither the shape of the "
                                         r"group's parameters \(\(16, 6\)\) nor .* \(96 elements"):
        taciturn.OneBitAdam([{"params": [w], "exp_avg_mask": torch.ones(mask_shape)}, {"params": [b, *rest]}])
    opt = taciturn.OneBitAdam([{"params": [w]}])
    with pytest.raises(ValueError, match=r"param group 1's exp_avg_mask .* \(\(16,\), \(3, 16\)\) .* \(64 elements"):
        opt.add_param_group({"params": [b, rest[0]], "exp_avg_mask": torch.ones(66)})
    with pytest.raises(ValueError, match="exp_avg_mask is a list; give a tensor"):
        taciturn.OneBitAdam([{"params": [w], "exp_avg_mask": [1.0] * 96}])


# ---------------------------------------------------------------------------- freeze_step on resume
@pytest.mark.parametrize("warmup", ["adam", "cdadam"])
@pytest.mark.parametrize("saved_freeze, running_freeze", [(5, 20), (20, 5)], ids=["thaw", "freeze"])
def test_running_freeze_step_wins_over_the_checkpoint(warmup, saved_freeze, running_freeze, tmp_path):
    """Mirrors the freeze_step part of DeepSpeed's TestOneBitAdamCheckpointing: a checkpoint of
    step 10 resumed with another freeze_step follows the running one, exactly as the same
    change made live at step 10."""
    def build(seed, freeze_step):
        net = dead_input_net(seed)
        return net, taciturn.OneBitAdam(net.parameters(), lr=1e-2, freeze_step=freeze_step, warmup=warmup,
                                        block_size=64)

    net, opt = build(0, saved_freeze)
    train(net, opt, 0, 10)
    assert opt.compression.flat.get("frozen", False) == (saved_freeze <= 10)
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    opt.freeze_step = running_freeze
    live = train(net, opt, 10, 25)

    fresh_net, fresh = build(1, running_freeze)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh_net.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["optimizer"])
    flat = fresh.compression.flat
    assert fresh.freeze_step == running_freeze and flat.get("frozen", False) == (running_freeze <= 10)
    assert any(k.startswith("warmup.") for k in flat) == (running_freeze > 10 and warmup == "cdadam")
    resumed = train(fresh_net, fresh, 10, 25)
    assert all(torch.equal(a, b) for a, b in zip(live, resumed))
    assert fresh.compression.flat["frozen"] and sorted(fresh.compression.flat) == sorted(opt.compression.flat)


def test_thawing_restarts_the_cdadam_running_max_from_the_frozen_variance():
    net = dead_input_net()
    opt = taciturn.OneBitAdam(net.parameters(), lr=1e-2, freeze_step=3, warmup="cdadam", block_size=64)
    train(net, opt, 0, 5)
    frozen = [opt.state[p]["exp_avg_sq"].clone() for p in net.parameters()]
    opt.freeze_step = 8
    train(net, opt, 5, 6)
    for p, v in zip(net.parameters(), frozen):
        assert (opt.state[p]["max_exp_avg_sq"] >= v).all(), "the running max lost the frozen variance"
    assert all(not torch.is_tensor(t) or t.abs().sum() == 0 for k, t in opt.compression.flat.items()
               if k.startswith("momentum.")), "the error feedback of the earlier compressed phase is left over"


# ---------------------------------------------------------------------------- comm_backend_name
def _ranks_backend(rank, n, name):
    import logging
    import warnings

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("taciturn").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = taciturn.OneBitAdam(torch.nn.Linear(3, 2).parameters(), comm_backend_name=name)
    return [r.getMessage() for r in records], [str(w.message) for w in caught], opt.comm.world_size


@pytest.mark.parametrize("name", ["nccl", "compressed", "gloo"])
def test_comm_backend_name_maps_to_torch_distributed_and_warns_once(run_ranks, name):
    """DeepSpeed's 1-bit Adam tutorial names three backends: all run over the job's process
    group; naming NCCL on a gloo job is logged by rank 0 only, with the backend and config key."""
    (logs0, warned0, world0), (logs1, warned1, world1) = run_ranks(_ranks_backend, 2, name)
    assert world0 == world1 == 2 and warned0 == warned1 == [] and logs1 == []
    if name == "nccl":
        assert len(logs0) == 1 and "runs gloo" in logs0[0] and "optimizer.params.comm_backend_name" in logs0[0]
        assert "Set comm_backend_name to 'gloo'" in logs0[0]
    else:
        assert logs0 == []


# ---------------------------------------------------------------------------- variance_floor
def plain_floor(v, fraction, block_size):
    """v_i = max(v_i, fraction * mean of its block) where v_i > 0, written plainly."""
    flat = v.reshape(-1).tolist()
    size = len(flat) if block_size is None else block_size
    out = []
    for lo in range(0, len(flat), size):
        block = flat[lo:lo + size]
        floor = fraction * sum(block) / len(block)
        out += [max(x, floor) if x > 0 else x for x in block]
    return torch.tensor(out).view(v.shape)


@pytest.mark.parametrize("block_size", [None, 4, 5, 64])
def test_floor_variance_math(block_size):
    gen = torch.Generator().manual_seed(3)
    v = torch.rand(3, 7, generator=gen) ** 8  # many tiny values
    v[0, :3] = 0.0
    v[2, 5] = 1e-30
    expected = plain_floor(v, 0.3, block_size)
    got = floor_variance_(v.clone(), 0.3, block_size)
    assert torch.allclose(got, expected, rtol=1e-6, atol=0)
    assert torch.equal(got[0, :3], torch.zeros(3)), "a zero variance was floored (it is the mask's)"
    assert (got >= v).all()
    assert torch.equal(floor_variance_(v.clone(), 0.0, block_size), v)


def frozen_runs(floor, warmup="adam", block_size=32, steps=FREEZE + 3):
    """(optimizer, parameters after each step) of a OneBitAdam on ``dead_input_net``."""
    net = dead_input_net()
    opt = taciturn.OneBitAdam(net.parameters(), lr=1e-2, freeze_step=FREEZE, warmup=warmup, block_size=block_size,
                              variance_floor=floor)
    return net, opt, train(net, opt, 0, steps)


@pytest.mark.parametrize("warmup", ["adam", "cdadam"])
def test_variance_floor_applied_once_at_the_freeze(warmup):
    net0, raw, xs0 = frozen_runs(0.0, warmup)
    net, floored, xs = frozen_runs(0.5, warmup)
    assert all(torch.equal(a, b) for a, b in zip(xs0[:FREEZE], xs[:FREEZE])), "the floor changed the warm-up"
    if warmup == "adam":  # CD-Adam's v^, built from block signs, is rarely under half its block's mean
        assert not torch.equal(xs0[FREEZE], xs[FREEZE])
    for p0, p in zip(net0.parameters(), net.parameters()):
        v0 = raw.state[p0]["exp_avg_sq"]
        assert torch.equal(floored.state[p]["exp_avg_sq"], floor_variance_(v0.clone(), 0.5, 32))
        assert floored.state[p][VARIANCE_FLOORED] == 0.5 and raw.state[p0][VARIANCE_FLOORED] == 0.0
    # the mask still comes from the exact zeros (warm-up Adam: the dead input's column)
    if warmup == "adam":
        assert floored.state[net[0].weight][ZERO_VARIANCE_MASK][:, 0].all()
    # a repeated freeze (the compression state reset) leaves the floored variance alone
    before = [floored.state[p]["exp_avg_sq"].clone() for p in net.parameters()]
    floored.reset_compression_state()
    train(net, floored, FREEZE + 3, FREEZE + 4)
    assert all(torch.equal(b, floored.state[p]["exp_avg_sq"]) for b, p in zip(before, net.parameters()))


def test_variance_floor_default_and_its_checks():
    net = dead_input_net()
    assert taciturn.OneBitAdam(net.parameters()).param_groups[0]["variance_floor"] == DEFAULT_VARIANCE_FLOOR > 0
    assert taciturn.OneBitAdam(net.parameters(), compressor="topk").param_groups[0]["variance_floor"] == 0.1
    for bad in (-0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match="variance_floor"):
            taciturn.OneBitAdam(net.parameters(), variance_floor=bad)
    with pytest.raises(ValueError, match="variance_floor.*param group 1"):
        taciturn.OneBitAdam([{"params": [net[0].weight]}, {"params": [net[0].bias], "variance_floor": 2.0}])


def test_variance_floor_per_tensor_for_other_compressors():
    _, raw, _ = frozen_runs(0.0, block_size=None)
    net, opt = dead_input_net(), None
    opt = taciturn.OneBitAdam(net.parameters(), lr=1e-2, freeze_step=FREEZE, compressor="scaled_sign",
                              variance_floor=0.5)
    train(net, opt, 0, FREEZE + 1)
    for p0, p in zip(raw.param_groups[0]["params"], net.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], floor_variance_(raw.state[p0]["exp_avg_sq"].clone(), 0.5))


@pytest.mark.parametrize("save_at", [FREEZE - 2, FREEZE + 2], ids=["saved-before-freeze", "saved-after-freeze"])
def test_variance_floor_resumes_from_a_checkpoint(save_at, tmp_path):
    net, opt, _ = frozen_runs(0.3, steps=save_at)
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    rest = train(net, opt, save_at, FREEZE + 6)

    fresh_net = dead_input_net(seed=1)
    fresh = taciturn.OneBitAdam(fresh_net.parameters(), lr=1e-2, freeze_step=FREEZE, block_size=32,
                                variance_floor=0.3)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh_net.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["optimizer"])
    again = train(fresh_net, fresh, save_at, FREEZE + 6)
    assert all(torch.equal(a, b) for a, b in zip(rest, again))
    for p, q in zip(net.parameters(), fresh_net.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], fresh.state[q]["exp_avg_sq"])
        assert fresh.state[q][VARIANCE_FLOORED] == 0.3


def test_running_variance_floor_wins_before_the_freeze(tmp_path):
    """Like freeze_step: the script that loads a warm-up checkpoint decides the floor."""
    net, opt, _ = frozen_runs(0.0, steps=FREEZE - 1)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    _, expected_opt, _ = frozen_runs(0.5, steps=FREEZE + 1)
    fresh = taciturn.OneBitAdam(net.parameters(), lr=1e-2, freeze_step=FREEZE, block_size=32, variance_floor=0.5)
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    train(net, fresh, FREEZE - 1, FREEZE + 1)
    assert fresh.param_groups[0]["variance_floor"] == 0.5
    for p, q in zip(expected_opt.param_groups[0]["params"], net.parameters()):
        assert torch.equal(expected_opt.state[p]["exp_avg_sq"], fresh.state[q]["exp_avg_sq"])


def test_tiny_variances_blow_up_without_the_floor():
    """The warm-up-Adam divergence (BENCHMARKS.md "Accuracy parity"), in miniature: after the
    freeze a weight whose variance is tiny but not 0 takes steps of lr * scale / sqrt(v); the
    floor bounds them."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(64))
    for floor, bound in ((0.0, None), (0.1, 1.0)):
        w.data.zero_()
        opt = taciturn.OneBitAdam([w], lr=1e-2, freeze_step=3, block_size=64, variance_floor=floor)
        for t in range(6):
            g = torch.ones(64)
            g[0] = 1e-6 if t < 3 else 1.0  # element 0: a unit that barely fired in the warm-up
            w.grad = g
            opt.step()
        if bound is None:
            assert w[0].abs() > 100.0, "the tiny-variance weight did not blow up without the floor"
        else:
            assert w.abs().max() < bound


def test_identity_compressor_unaffected_by_the_floor():
    """With C = identity the default is no floor: OneBitAdam is still Adam with its frozen variance
    (the uncompressed algorithm), bit for bit the exact form; an explicit floor still applies."""
    runs = {}
    for name, kw in {"default": {}, "exact": dict(variance_floor=0.0), "floored": dict(variance_floor=0.5)}.items():
        net = dead_input_net()
        opt = taciturn.OneBitAdam(net.parameters(), lr=1e-2, freeze_step=FREEZE, compressor="identity", **kw)
        runs[name] = (opt, train(net, opt, 0, FREEZE + 4))
    assert runs["default"][0].param_groups[0]["variance_floor"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(runs["default"][1], runs["exact"][1]))
    assert not torch.equal(runs["default"][1][-1], runs["floored"][1][-1])
    # and the identity run is plain frozen-variance Adam: no bias correction, eps outside the root
    net = dead_input_net()
    params = list(net.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    expected = []
    for t in range(FREEZE + 4):
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(32, 6, generator=gen)
        x[:, 0] = 0.0
        y = torch.randint(0, 3, (32,), generator=gen)
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        with torch.no_grad():
            for p, mi, vi in zip(params, m, v):
                mi.mul_(0.9).add_(p.grad, alpha=0.1)
                if t < FREEZE:
                    vi.mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
                step = mi / (vi.sqrt() + 1e-8)
                if t >= FREEZE:
                    step = torch.where(vi == 0, torch.zeros_like(step), step)  # mask_zero_variance
                p.sub_(1e-2 * step)
        expected.append(torch.cat([p.detach().flatten() for p in params]))
    for t, (a, b) in enumerate(zip(runs["default"][1], expected)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"step {t}"
