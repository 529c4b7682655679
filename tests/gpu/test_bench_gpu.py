"""scripts/bench_gpu.py: its --dry-run smoke test (tiny sizes, CPU tensors through the Triton
interpreter) runs every cell and writes nothing; without CUDA a real run stops with a message."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'taciturn[triton]')")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts",
                      "bench_gpu.py")


def test_dry_run():
    done = subprocess.run([sys.executable, SCRIPT, "--dry-run"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("| triton ", "| torch ", "| CDAdam, Triton ", "| torch AMSGrad (foreach) "):
        assert row in done.stdout
    assert "OOM" not in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real benchmark")
def test_without_cuda_it_says_so():
    done = subprocess.run([sys.executable, SCRIPT, "--sizes", "1000"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no CUDA device" in done.stderr
