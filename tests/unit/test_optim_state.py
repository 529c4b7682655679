"""Optimizer state at n = 1: checkpoints resume bit-identically, carry every piece of
compression state, keep fp32 state for fp16/bf16 parameters, and refuse what does not fit."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference as ref  # noqa: E402
from reference import one_thread  # noqa: E402,F401 (fixture)

import taciturn  # noqa: E402

STEPS, SAVE_AT = 20, 10


def build(name, seed=0, **extra):
    case = ref.CASES[name]
    model = ref.make_model(seed)
    opt = taciturn.create_optimizer(case.optimizer, ref.param_groups(model, case.groups), lr=case.lr,
                                    **{**case.kwargs, **extra})
    return case, model, opt


def check_resume(name, tmp_path, **extra):
    """Train, save at SAVE_AT, go on; a fresh optimizer loading the save must go on bit-identically.
    Returns the saved state dict and the parameters after each step from SAVE_AT on."""
    case, model, opt = build(name, **extra)
    ref.train(opt, model, 0, 1, SAVE_AT, case.lr)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    rest, rest_points = ref.train(opt, model, 0, 1, STEPS, case.lr, start=SAVE_AT)

    _, fresh_model, fresh = build(name, seed=123, **extra)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh_model.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["optimizer"])
    assert fresh.global_step == SAVE_AT
    again, again_points = ref.train(fresh, fresh_model, 0, 1, STEPS, case.lr, start=SAVE_AT)
    for t, (a, b, pa, pb) in enumerate(zip(rest, again, rest_points, again_points)):
        assert torch.equal(a, b) and torch.equal(pa, pb), f"step {SAVE_AT + t} differs after resuming"
    return saved["optimizer"], rest


@pytest.mark.parametrize("name", list(ref.CASES))
def test_resume_bit_identical(name, tmp_path):
    check_resume(name, tmp_path)


@pytest.mark.parametrize("profiled", [{"scale": "l2", "profile": 0.9},
                                      {"scale": "l2", "profile": 0.9, "profile_detrend": 0.5}],
                         ids=["plain", "detrended"])
def test_magnitude_profile_is_compression_state_and_resumes_bit_identically(profiled, tmp_path):
    saved, after = check_resume("cdadam_block64_buckets", tmp_path, compressor_options=profiled)
    flat = next(v["taciturn"] for v in saved["state"].values() if "taciturn" in v)
    found = [k for k in flat if k.endswith(".magnitude_profile")]
    assert found and all(flat[k].gt(0).all() for k in found), "every element's profile is set after 10 steps"
    trends = [k for k in flat if k.endswith(".magnitude_profile_trend")]
    assert len(trends) == (len(found) if "profile_detrend" in profiled else 0)
    assert all(flat[k].ne(0).all() for k in trends), "every element's trend (a signed mean) is set after 10 steps"
    _, plain = check_resume("cdadam_block64_buckets", tmp_path, compressor_options={"scale": "l2"})
    assert any(not torch.equal(a, b) for a, b in zip(after, plain)), "the profile changed nothing"


@pytest.mark.parametrize("name, keys", [
    ("cdadam_block64_buckets", ["worker_markov", "server_markov", "result_markov"]),
    ("distef_nesterov", ["worker_error", "server_error"]),
    ("saef_two_way", ["worker_error"]),  # at n = 1 the server's top-k of a top-k has no error
    ("sparsams", ["worker_error"]),
    ("onebit_cdadam", ["worker_error", "server_error"]),  # the warm-up's Markov state is freed at the freeze
])
def test_state_dict_carries_compression_state(name, keys):
    case, model, opt = build(name)
    ref.train(opt, model, 0, 1, 15, case.lr)  # onebit_cdadam froze at step 13
    flat = next(v["taciturn"] for v in opt.state_dict()["state"].values() if "taciturn" in v)
    assert flat["step"] == 15 and flat["world_size"] == 1
    for key in keys:
        found = [k for k in flat if k.endswith("." + key)]
        assert found, f"no {key} in the state dict ({sorted(flat)})"
        assert any(flat[k].any() for k in found), f"{key} is all zero after 15 compressed steps"
    per_param = opt.state_dict()["state"]
    trainable_ids = [i for i, p in enumerate(p for g in opt.param_groups for p in g["params"]) if p.requires_grad]
    wanted = {"cdadam_block64_buckets": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
              "distef_nesterov": ["momentum_buffer"], "saef_two_way": ["momentum_buffer", "synced_param"],
              "sparsams": ["max_exp_avg_sq"], "onebit_cdadam": ["exp_avg", "exp_avg_sq"]}[name]
    assert 0 not in per_param, "the frozen parameter got optimizer state"
    for i in trainable_ids:
        for key in wanted:
            assert key in per_param[i], f"parameter {i} has no {key}"
    if name == "distef_nesterov":
        assert flat["prev_lr"] == [pytest.approx(ref.lr_at(14, case.lr) * f) for f in (1.0, 0.5)]


def low_precision_run(name, dtype, steps, opt=None, model=None, start=0):
    case = ref.CASES[name]
    if model is None:
        model = ref.make_model().to(dtype)
        opt = taciturn.create_optimizer(case.optimizer, ref.param_groups(model, case.groups), lr=case.lr,
                                        **case.kwargs)
    for t in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = ref.lr_at(t, case.lr) * g["lr_factor"]
        opt.zero_grad()
        x, y = ref.batch(0, t, 0)
        torch.nn.functional.cross_entropy(model.fc2(torch.tanh(model.fc1(x.to(dtype)))).float(), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["cdadam_block1024", "distef_nesterov", "saef_two_way", "onebit_cdadam"])
def test_low_precision_params_keep_fp32_state(name, dtype, tmp_path):
    model, opt = low_precision_run(name, dtype, 4)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    before = {i: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
              for i, st in opt.state_dict()["state"].items() if isinstance(i, int)}
    assert all("master_param" in st or "synced_param" in st for st in before.values())

    fresh_model = ref.make_model(5).to(dtype)
    case = ref.CASES[name]
    fresh = taciturn.create_optimizer(case.optimizer, ref.param_groups(fresh_model, case.groups), lr=case.lr,
                                      **case.kwargs)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh_model.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["optimizer"])
    after = fresh.state_dict()["state"]
    for i, st in before.items():
        for key, value in st.items():
            assert value.dtype == torch.float32, f"saved {key} of parameter {i} is {value.dtype}"
            assert after[i][key].dtype == torch.float32, f"{key} of parameter {i} came back {after[i][key].dtype}"
            assert torch.equal(after[i][key], value), f"{key} of parameter {i} lost precision on load"
    for key, value in fresh.compression.flat.items():
        assert not torch.is_tensor(value) or value.dtype == torch.float32, key

    low_precision_run(name, dtype, 8, opt, model, start=4)
    low_precision_run(name, dtype, 8, fresh, fresh_model, start=4)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert a.dtype == dtype and torch.equal(a, b)


def test_refuses_checkpoint_without_compression_state():
    model = ref.make_model()
    plain = torch.optim.Adam(ref.trainable(model))
    opt = taciturn.CDAdam(ref.trainable(model))
    with pytest.raises(ValueError, match="no taciturn compression state.*reset_compression_state=True"):
        opt.load_state_dict(plain.state_dict())


def test_refuses_checkpoint_with_other_compression_settings():
    _, model, opt = build("cdadam_block1024")
    ref.train(opt, model, 0, 1, 2, 1e-2)
    _, _, other = build("cdadam_block1024", block_size=64)
    with pytest.raises(ValueError, match="different compression settings.*reset_compression_state=True"):
        other.load_state_dict(opt.state_dict())
    other.load_state_dict(opt.state_dict(), reset_compression_state=True)
    assert other.global_step == 2
    assert not any(v.any() for v in other.compression.flat.values() if torch.is_tensor(v))


def test_compression_state_sits_in_a_parameter_state_and_the_older_layout_loads():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    opt = taciturn.CDAdam(model.parameters(), lr=1e-2, block_size=4, process_group="local")
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 6)).pow(2).sum().backward()
        opt.step()
    assert all(isinstance(k, torch.Tensor) for k in opt.state)  # every value is a parameter's
    assert all("exp_avg" in v for v in opt.state.values())
    sd = opt.state_dict()
    old = {**sd, "state": {k: {n: t for n, t in v.items() if n != "taciturn"} for k, v in sd["state"].items()}}
    old["state"]["taciturn"] = opt.compression.flat  # the layout of earlier releases
    fresh = taciturn.CDAdam(torch.nn.Linear(6, 4).parameters(), lr=1e-2, block_size=4, process_group="local")
    fresh.load_state_dict(old)
    assert "taciturn" not in fresh.state and fresh.global_step == 2
    for k, v in opt.compression.flat.items():
        assert torch.equal(fresh.compression.flat[k], v) if torch.is_tensor(v) else fresh.compression.flat[k] == v
