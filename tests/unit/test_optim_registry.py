"""taciturn.create_optimizer: names case-insensitive (JSON ``type`` strings too), clear errors."""
from __future__ import annotations

import pytest
import torch

import taciturn
from taciturn.registry import check_kwargs, get_record, is_taciturn_optimizer


def params():
    return torch.nn.Linear(8, 4).parameters()


@pytest.mark.parametrize("name, cls", [
    ("CDAdam", taciturn.CDAdam), ("cdadam", taciturn.CDAdam), ("CDADAM", taciturn.CDAdam),
    ("cd_adam", taciturn.CDAdam), ("CD-Adam", taciturn.CDAdam),
    ("OneBitAdam", taciturn.OneBitAdam), ("onebit_adam", taciturn.OneBitAdam), ("1BitAdam", taciturn.OneBitAdam),
    ("OneBitLamb", taciturn.OneBitLamb), ("onebit-lamb", taciturn.OneBitLamb), ("1bitlamb", taciturn.OneBitLamb),
    ("OnebitLamb", taciturn.OneBitLamb),
    ("SparsAMS", taciturn.SparsAMS), ("spars-ams", taciturn.SparsAMS),
    ("DistEFSGD", taciturn.DistEFSGD), ("dist_ef_blockSGDM", taciturn.DistEFSGD),
    ("SAEFSGD", taciturn.SAEFSGD), ("saef", taciturn.SAEFSGD),
    ("EF21SGD", taciturn.EF21SGD), ("ef21", taciturn.EF21SGD),
    ("Signum", taciturn.Signum), ("signSGD", taciturn.Signum),
    ("AMSGrad", taciturn.AMSGrad), ("adam", taciturn.Adam), ("sgd", taciturn.SGD),
    ("EFAMSGrad", taciturn.EFAMSGrad), ("naive_amsgrad", taciturn.NaiveAMSGrad),
    ("CompressedAMSGrad", taciturn.CompressedAMSGrad),
])
def test_names_case_insensitive(name, cls):
    opt = taciturn.create_optimizer(name, params(), lr=1e-3)
    assert type(opt) is cls and is_taciturn_optimizer(name)


@pytest.mark.parametrize("name", taciturn.list_optimizers())
def test_every_registered_optimizer_steps(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    before = [p.detach().clone() for p in model.parameters()]
    opt = taciturn.create_optimizer(name, model.parameters(), lr=1e-2)
    assert isinstance(opt, torch.optim.Optimizer) and get_record(name).cls is type(opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        taciturn.create_optimizer("CDAdma", params())
    msg = str(err.value)
    assert "'CDAdma'" in msg and "Did you mean 'CDAdam'" in msg
    for valid in taciturn.list_optimizers():
        assert valid in msg
    assert not is_taciturn_optimizer("Adamax") and not is_taciturn_optimizer(None)


def test_unknown_kwarg_lists_valid_kwargs():
    with pytest.raises(ValueError) as err:
        taciturn.create_optimizer("cdadam", params(), lr=1e-3, beta=(0.9, 0.99), freeze_step=10)
    msg = str(err.value)
    assert "CDAdam does not take" in msg and "'beta' (did you mean 'betas'?)" in msg and "'freeze_step'" in msg
    for valid in ("lr", "betas", "eps", "compressor", "block_size", "process_group", "bucket_cap_mb"):
        assert valid in msg.split("valid parameters:")[1]
    json_params = {"freeze_step": 10, "cuda_aware": False, "mask_zero_variance": False}
    assert check_kwargs("OneBitAdam", json_params).cls is taciturn.OneBitAdam


def test_base_options_pass_through_the_registry():
    opt = taciturn.create_optimizer("SAEF", params(), lr=0.1, bucket_cap_mb=1, broadcast_parameters=False,
                                    check_consistency=False, process_group="local")
    assert opt.comm.world_size == 1 and opt.exchanges["delta"].bucket_cap_mb == 1
