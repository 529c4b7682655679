"""taciturn.exchange.SideStream on a real GPU (skipped without CUDA): ``running`` queues its block
on a stream of its own, one per device, ordered after the producer's work (the current stream,
or an event from ``ready`` recorded on another thread); ``join`` orders the current stream after
it, so the results equal the same computation on the default stream, also when the inputs are
freed and their memory reused on the compute stream meanwhile (``record_stream``). A one-rank
NCCL DDP job with ``register_compression_hook`` (the hook's exchange on the side stream, its
CUDA future) gives the gradients of the same hook with its block run on the compute stream.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from taciturn.exchange import SideStream
from taciturn.integrations.ddp import register_compression_hook

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

N = 2048


def slow_input(seed: int) -> torch.Tensor:
    """A tensor whose value lands late on the current stream: a chain of matmuls writes it."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(N, N, device="cuda", generator=g) / N ** 0.5
    x = torch.zeros(N, N, device="cuda")
    for _ in range(8):
        x = x + a @ a
    return x


def work(x: torch.Tensor) -> torch.Tensor:
    """Long enough on its stream for a missing wait to show."""
    y = x
    for _ in range(8):
        y = torch.tanh(y @ x) + x
    return y


def test_running_uses_a_stream_of_its_own():
    side = SideStream()
    x = torch.ones(4, device="cuda")
    outside = torch.cuda.current_stream()
    with side.running([x]):
        inside = torch.cuda.current_stream()
    with side.running([x], after=side.ready(x.device)):
        again = torch.cuda.current_stream()
    assert inside != outside and inside != torch.cuda.default_stream()
    assert again == inside  # one stream per device, made once
    assert torch.cuda.current_stream() == outside
    side.join(x.device)


def test_results_after_join_equal_the_default_stream():
    side = SideStream()
    expected = work(slow_input(0))
    x = slow_input(0)  # still being written on the current stream when the side stream starts
    with side.running([x]):
        y = work(x)
    side.join(x.device)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_event_from_another_thread():
    """The Horovod pattern: ``ready`` on the producing thread, ``running(after=)`` on another."""
    side = SideStream()
    expected = work(slow_input(1))
    x = slow_input(1)
    event = side.ready(x.device)
    out = {}

    def comm_thread():
        with side.running([x], after=event):
            out["y"] = work(x)
    t = threading.Thread(target=comm_thread)
    t.start()
    t.join()
    side.join(x.device)
    torch.testing.assert_close(out["y"], expected, rtol=0, atol=0)


def test_inputs_freed_while_the_side_stream_reads_them():
    """``record_stream``: memory of an input freed on the compute stream is not handed out again
    (here to tensors filled with garbage at once) before the side stream is done with it."""
    side = SideStream()
    expected = work(slow_input(2))
    x = slow_input(2)
    with side.running([x]):
        y = work(x)
    del x
    junk = [torch.full((N, N), float("nan"), device="cuda") for _ in range(4)]
    side.join(y.device)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    del junk


class Inline(SideStream):
    """The hook's block on the compute stream: the reference for the side-stream path."""

    @contextlib.contextmanager
    def running(self, tensors, after=None):
        yield


@pytest.fixture
def nccl_one_rank(tmp_path):
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("preset", ["identity", "markov_sign"])
def test_ddp_hook_on_the_side_stream(nccl_one_rank, preset):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10)).cuda()
    models, states = [], []
    for _ in range(2):
        model = DDP(copy.deepcopy(net), device_ids=[0], bucket_cap_mb=0.25)
        states.append(register_compression_hook(model, preset, block_size=256))
        models.append(model)
    states[1].side = Inline()
    for t in range(3):
        x = torch.randn(64, 256, device="cuda", generator=torch.Generator(device="cuda").manual_seed(t))
        grads = []
        for model in models:
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if preset == "identity":  # one rank: the average is the local gradient
            local = copy.deepcopy(net)  # no optimizer steps: still the models' parameters
            local(x).square().mean().backward()
            for p, g in zip(local.parameters(), grads[0]):
                torch.testing.assert_close(g, p.grad)
    assert states[0].side._streams and not states[1].side._streams
    assert states[0].step == states[1].step == 3
