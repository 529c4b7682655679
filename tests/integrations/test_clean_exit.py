"""Jobs that trained must exit with status 0: 20 short 2-rank taciturn jobs under CPU load.

A gloo worker thread drops a finished work (and the Python objects of its tensors) a moment
after ``wait()`` returns. A job that ended right after its last step could abort under load
("terminate called without an active exception", SIGABRT, torchrun's status 1) when that
moment fell after the interpreter had begun to finalize; taciturn.comm.torch_dist now holds the
exit until gloo has let go of every tensor taciturn handed it.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "exit_jobs.py")
#: jobs, how many run at once (their ranks load the cores too), seconds each may take
RUNS, AT_ONCE, JOB_TIMEOUT = 20, 4, 300


@pytest.fixture
def cpu_load():
    """One busy process per core, as long as the test runs."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    yield
    for p in busy:
        p.kill()
        p.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(mode: str) -> subprocess.Popen:
    """One 2-rank job under torchrun, as users launch it."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), WORKER, mode]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(mode: str, job: subprocess.Popen):
    """The job's exit status and the tail of its stderr."""
    try:
        _, err = job.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"a {mode} job did not finish within {JOB_TIMEOUT} s")
    return job.returncode, err[-3000:]


@pytest.mark.parametrize("mode", ["deepspeed", "torch"])
def test_short_jobs_exit_cleanly_under_load(mode, cpu_load):
    if mode == "deepspeed":
        pytest.importorskip("deepspeed")
    failed = []
    for first in range(0, RUNS, AT_ONCE):
        jobs = {run: start(mode) for run in range(first, min(first + AT_ONCE, RUNS))}
        failed += [(run, *finish(mode, job)) for run, job in jobs.items()]
    failed = [f for f in failed if f[1] != 0]
    assert not failed, (f"{len(failed)} of {RUNS} {mode} jobs exited non-zero; first: run {failed[0][0]} "
                        f"status {failed[0][1]}:\n{failed[0][2]}")
