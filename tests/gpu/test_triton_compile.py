"""The Triton kernels compile for an H100 (sm_90) on any machine, GPU or not (the interpreter of
the other tests never lowers them), and their PTX rounds as the torch ops they replace: no fma
contraction (a multiply then an add stays two roundings), IEEE division and square root, never
the approximate ones; shared sign words ORed with relaxed atomics."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'taciturn[triton]')")


@pytest.fixture(scope="module")
def ptx():
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_kernels.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_kernel_compiles(ptx):
    assert len(ptx) == 14


def test_no_approximate_division_or_root(ptx):
    for name, ops in ptx.items():
        assert ops["div.full.f32"] == ops["div.approx"] == ops["sqrt.approx"] == 0, name
    for name in ("amsgrad", "adam"):
        assert ptx[name]["div.rn.f32"] and ptx[name]["sqrt.rn.f32"], name


def test_multiply_then_add_is_not_contracted(ptx):
    """momentum: buf * mu + g is a mul and an add (torch's mul_ then add_), Nesterov's g + mu buf one fma."""
    ops = ptx["momentum nesterov"]
    assert ops["mul.rn.f32"] == ops["add.rn.f32"] == ops["fma.rn.f32"] > 0


def test_shared_words_use_relaxed_ors(ptx):
    for name in ("encode l1 ef", "encode l2 given markov", "encode none", "encode segments"):
        ops = ptx[name]
        assert ops["red.global"] + ops["atom.global"] == ops["relaxed.or.b32"] > 0, name
