"""Helpers shared by the fused CPU kernel tests (tests/unit/test_kernels.py,
test_topk_kernel.py and test_update_kernels.py): switching the kernels off, setting torch's
thread count, rebuilding the kernels for an older instruction set, and running the
compressed all-reduce pipeline with and without a kernel.
"""
from __future__ import annotations

import contextlib

import torch

from taciturn import kernels
from taciturn.comm import LocalCommunicator
from taciturn.exchange import Exchange
from taciturn.feedback import make_feedback


@contextlib.contextmanager
def torch_path():
    """The kernels switched off: the torch path they replace."""
    previous = kernels.set_enabled(False)
    try:
        yield
    finally:
        kernels.set_enabled(previous)


@contextlib.contextmanager
def threads(n):
    """torch (and the kernels) on ``n`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def portable_build(monkeypatch, arch):
    """Rebuild the kernels for the instruction set ``arch`` (a -march value, through
    TACITURN_KERNELS_ARCH) for the rest of the test, and check that the build succeeds."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_failed", None)
    monkeypatch.setenv("TACITURN_KERNELS_ARCH", arch)
    assert kernels.library() is not None, kernels._failed


def check_pipeline_with_and_without_kernel(monkeypatch, module, entry, codec, rule, two_way, sample, seed, tol,
                                           sizes=(5, 1030, 7, 3000, 3, 1)):
    """Three one-bucket exchange steps on one rank with the kernel ``module.entry`` (counted:
    it must run, first with the worker's ``rule``), then with the torch path: the same results
    and feedback state to ``tol``. Step t's gradient is ``sample(numel, seed + t)``."""
    fb = make_feedback(rule)
    exchange = Exchange(sizes, codec, fb, fb, LocalCommunicator(), two_way, bucket_cap_mb=None)
    calls, kernel = [], getattr(module, entry)

    def counted(*args, **kwargs):
        calls.append(kwargs.get("update", "none"))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, entry, counted)

    def run():
        state = exchange.init_state()[0]
        out = [exchange.allreduce([sample(exchange.numel, seed + t)], [state], error_scale=0.5 if t else 0.0)[0].clone()
               for t in range(3)]
        return out, state

    fast, fast_state = run()
    assert calls and calls[0] == rule, calls  # the worker's rule, in the kernel
    with torch_path():
        ref, ref_state = run()
    for a, b in zip(fast + list(fast_state.values()), ref + list(ref_state.values())):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
