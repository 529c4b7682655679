"""Host reads of tensor values during an optimizer step (on CUDA each is a device sync): the
one non-finite decision per step (``nonfinite='skip'``, the host decides whether to skip), none
per bucket or per tensor; after its freeze 1-bit LAMB reads each tensor's factor (the max of a
variance ratio, clamped on the host), as DeepSpeed's does."""
from __future__ import annotations

import collections

import pytest
import torch

import taciturn

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
#: the compressed phase from step 3 on
PHASE = {"OneBitAdam": dict(freeze_step=2), "OneBitLamb": dict(freeze_step=2), "ZeroOneAdam": dict(var_freeze_step=2)}


@pytest.fixture
def count_reads(monkeypatch):
    counts = collections.Counter()

    def patch(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def start():
        counts.clear()
        for name in READS:
            patch(name)
        return counts
    return start


def steps(name, nonfinite="skip"):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.ReLU(), torch.nn.Linear(40, 3))
    opt = taciturn.create_optimizer(name, net.parameters(), nonfinite=nonfinite, bucket_cap_mb=0.001,
                                    **PHASE.get(name, {}))
    assert len(next(iter(opt.exchanges.values())).buckets) > 1  # several buckets: none may add a read

    def step():
        opt.zero_grad()
        net(torch.randn(8, 50)).pow(2).mean().backward()
        opt.step()
    return step, opt


@pytest.mark.parametrize("name", ["CDAdam", "SparsAMS", "DistEFSGD", "SAEFSGD", "OneBitAdam", "ZeroOneAdam",
                                  "AMSGrad", "OneBitLamb"])
def test_one_host_read_per_step(name, count_reads):
    step, opt = steps(name)
    for _ in range(3):
        step()
    counts = count_reads()
    step()
    per_tensor = len(opt._trainable) if name == "OneBitLamb" else 0
    assert sum(counts.values()) == 1 + per_tensor, dict(counts)
    assert counts["tolist"] == 1  # the non-finite flags of every rank


def test_no_host_read_without_the_nonfinite_check(count_reads):
    step, _ = steps("CDAdam", nonfinite="off")
    step()
    counts = count_reads()
    step()
    assert not counts, dict(counts)
