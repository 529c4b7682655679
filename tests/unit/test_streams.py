"""taciturn.exchange.SideStream on CPU devices: every method does nothing and never reaches
torch.cuda (each entry used on CUDA is patched to raise), so the CPU paths of the DDP hook and
the Horovod wrapper are what they were. The CUDA behaviour is tested in tests/gpu/test_streams_cuda.py."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch._dynamo  # noqa: F401  (torch.optim imports it lazily: load it once here, not in every forked rank)
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from taciturn.exchange import SideStream
from taciturn.integrations.ddp import register_compression_hook

CUDA_ENTRIES = ("Stream", "Event", "stream", "current_stream", "current_device", "synchronize")


def _forbid_cuda(patch) -> None:
    """``patch(torch.cuda, name, value)`` for each entry: any call raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.cuda reached on a CPU device")
    for name in CUDA_ENTRIES:
        patch(torch.cuda, name, refuse)


@pytest.fixture
def no_cuda(monkeypatch):
    _forbid_cuda(monkeypatch.setattr)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_cpu_methods_do_nothing(no_cuda, device):
    side = SideStream()
    x = torch.arange(6.0)
    assert side.ready(device) is None
    with side.running([x]):
        y = x * 2
    with side.running([x], after=side.ready(device)):
        y += 1
    with side.running([]):
        pass
    assert side.join(device) is None
    assert torch.equal(y, torch.arange(6.0) * 2 + 1)
    assert side._streams == {}  # no stream made for a CPU device


def test_cpu_running_lets_exceptions_through(no_cuda):
    with pytest.raises(ValueError, match="inside"):
        with SideStream().running([torch.ones(2)]):
            raise ValueError("inside")


def _hook_without_cuda(rank, world):
    """The DDP hook on CPU with torch.cuda's stream entries raising: the identity preset gives
    plain DDP's average; the hook state (its SideStream included) pickles and rebinds."""
    _forbid_cuda(setattr)  # a forked rank: patched for its whole (short) life
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    plain, hooked = DDP(net), DDP(pickle.loads(pickle.dumps(net)), bucket_cap_mb=0.0005)
    state = register_compression_hook(hooked, "identity")
    grads = {"plain": [], "hook": []}
    for t in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * t + rank))
        for name, model in (("plain", plain), ("hook", hooked)):
            model.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            grads[name].append([p.grad.clone() for p in model.parameters()])
    restored = pickle.loads(pickle.dumps(state))
    assert isinstance(restored.side, SideStream) and restored.side is not state.side
    compressed = DDP(pickle.loads(pickle.dumps(net)))
    register_compression_hook(compressed, restored)
    compressed(torch.randn(4, 6)).sum().backward()
    return {"grads": grads, "steps": (state.step, restored.step), "side": state.side._streams}


def test_ddp_hook_on_cpu_does_not_touch_cuda(run_ranks):
    for r in run_ranks(_hook_without_cuda, 2):
        for plain, hook in zip(r["grads"]["plain"], r["grads"]["hook"]):
            for a, b in zip(plain, hook):
                torch.testing.assert_close(b, a)
        assert r["steps"] == (3, 4)
        assert r["side"] == {}

