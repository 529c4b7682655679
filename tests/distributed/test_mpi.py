"""The pipeline over mpi4py under a real ``mpirun -np 2`` (torch's wheels have no MPI backend)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_pipeline.py")
SIZES = [700, 1500, 33, 2100, 5000, 64]
BUCKET_CAP_MB = 6000 * 4 / 2 ** 20  # two buckets
CASES = [
    ("block_sign", (), "markov", True),
    ("scaled_sign", (), "ef", True),
    ("topk", (("ratio", 0.25),), "ef", False),
    ("block_sign", (), "none", False),
    ("identity", (), "none", True),
]
STEPS = 3
EF_SCALES = (1.0, 0.5, 2.0)
N = 2


def inputs():
    """inputs[t][rank]: that rank's tensors at step t (one fp16 and one bf16 among them)."""
    gen = torch.Generator().manual_seed(42)
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.float16]
    return [[[(torch.randn(s, generator=gen) * (i + 1)).to(dt) for i, (s, dt) in enumerate(zip(SIZES, dtypes))]
             for _ in range(N)] for _ in range(STEPS)]


@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="mpirun not found: apt-get install openmpi-bin libopenmpi-dev && pip install mpi4py")
def test_mpirun_two_ranks_bit_identical_and_equal_to_reference(tmp_path, simulate):
    xs = inputs()
    spec = tmp_path / "spec.pt"
    torch.save({"sizes": SIZES, "bucket_cap_mb": BUCKET_CAP_MB, "cases": CASES, "inputs": xs,
                "ef_scales": EF_SCALES}, spec)
    cmd = ["mpirun", "-np", str(N), "--allow-run-as-root", "--oversubscribe", sys.executable, SCRIPT, str(spec),
           str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"mpirun did not finish within 120 s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"mpirun failed ({proc.returncode}):\n{output[-4000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(N)]
    assert [(r["communicator"], r["world_size"]) for r in ranks] == [("MPICommunicator", N)] * N
    flat = [[torch.cat([t.float().reshape(-1) for t in x_i]) for x_i in x] for x in xs]
    for case in CASES:
        name, opts, rule, two_way = case
        result, buckets = ranks[0][case]
        assert len(buckets) == 2
        assert torch.equal(ranks[1][case][0], result), f"{case}: rank 1 differs from rank 0"
        expected = simulate(flat, buckets, name, dict(opts), rule, two_way, EF_SCALES)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case}: {m}")
    # sharded optimizer state over mpi4py: ranks identical, the fp32 downlink equals unsharded AMSGrad
    for label in ("sharded_cdadam", "sharded_amsgrad_fp32", "amsgrad"):
        assert torch.equal(ranks[0][label], ranks[1][label]), label
    torch.testing.assert_close(ranks[0]["sharded_amsgrad_fp32"], ranks[0]["amsgrad"], rtol=1e-6, atol=1e-7)
    assert not torch.equal(ranks[0]["sharded_cdadam"], ranks[0]["amsgrad"])
