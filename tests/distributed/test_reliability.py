"""Reliability across real processes: same decision on every rank, no hangs, clear messages."""
import os
import socket
import subprocess
import sys
import time

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "_reliability_worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario, n, extra_env=None):
    port = free_port()
    procs = []
    for rank in range(n):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, WORKER, scenario], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs, timeout):
    outs = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"rank hung past {timeout} s")
        outs.append((p.returncode, out))
    return outs


@pytest.mark.parametrize("scenario,needle", [
    ("mismatch-shape", "disagree on params: parameter #0 is (8, 6)"),
    ("mismatch-hparam", "disagree on hyperparameters"),
], ids=["different-shapes", "different-lr"])
def test_mismatched_ranks_are_refused_at_construction(scenario, needle):
    outs = finish(launch(scenario, 2), 120)
    assert all(rc != 0 for rc, _ in outs)
    assert any(needle in out for _, out in outs), outs


def test_divergence_guard_names_the_tensor_on_every_rank():
    outs = finish(launch("divergence", 2), 120)
    for rc, out in outs:
        assert rc != 0
        assert "ranks diverged at step 4: parameter 2.bias (shape (2,)) differs between rank 0 and rank(s) [1]" in out


def test_nonfinite_on_one_rank_skips_the_step_on_all_ranks():
    outs = finish(launch("nonfinite", 2), 120)
    results = sorted(line for rc, out in outs for line in out.splitlines() if line.startswith("RESULT"))
    assert all(rc == 0 for rc, _ in outs), outs
    assert results == ["RESULT rank=0 step=4 skipped=1", "RESULT rank=1 step=4 skipped=1"]


@pytest.mark.parametrize("scenario", ["dead", "stalled"])
def test_lost_rank_ends_the_others_within_the_timeout(scenario):
    timeout = 10
    procs = launch(scenario, 3, {"TIMEOUT": str(timeout)})
    start = time.monotonic()
    survivors = procs[:2]
    outs = finish(survivors, timeout + 60)
    elapsed = time.monotonic() - start
    procs[2].kill()
    procs[2].wait()
    for rc, out in outs:
        assert rc != 0
        assert "taciturn: " in out and "a peer rank died, stalled, or ran a different collective" in out, out[-2000:]
    assert elapsed < timeout + 45
