"""scripts/netcluster.py: shaped namespaces, rank environment, teardown on every exit path,
and the loopback fallback. The namespace tests need root and iproute2 (CI has both)."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "netcluster.py")
_spec = importlib.util.spec_from_file_location("netcluster", SCRIPT)
netcluster = sys.modules.setdefault("netcluster", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(netcluster)

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"),
    reason="network namespaces need root and iproute2 (apt-get install iproute2)")

# one os.write per line: the ranks share stdout, and a pipe keeps a short write whole (print may
# write the text and its newline separately, and the other rank's line can land between them)
PRINT_ENV = [sys.executable, "-c", "import json, os; os.write(1, (json.dumps({k: os.environ.get(k) for k in "
             "('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE', 'GLOO_SOCKET_IFNAME')}) + '\\n').encode())"]


def _ours(prefix):
    return [ns for ns in netcluster._namespaces() if ns.startswith(prefix + "-")]


def _prefix(tag):
    return f"tcntest{os.getpid()}{tag}"


def test_parse_rate_and_limits():
    assert netcluster.parse_rate("100mbit") == 10 ** 8
    assert netcluster.parse_rate("1gbit") == 10 ** 9
    assert netcluster.parse_rate("10gbit") == 10 ** 10
    with pytest.raises(ValueError, match="1gbit"):
        netcluster.parse_rate("1 GB/s")
    # 2 ranks: each sends the whole buffer once; 4 ranks: 1.5 times
    assert netcluster.allreduce_limit(100 * 10 ** 6, 2, "1gbit") == pytest.approx(0.8)
    assert netcluster.allreduce_limit(100 * 10 ** 6, 4, "1gbit") == pytest.approx(1.2)
    burst = int(netcluster.tbf_args("1gbit")[4])
    assert 64 * 1024 <= burst <= 10 ** 6


def test_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        netcluster.Cluster(0)
    with pytest.raises(ValueError, match="prefix"):
        netcluster.Cluster(2, prefix="bad name/")
    with pytest.raises(RuntimeError, match="with Cluster"):
        netcluster.Cluster(2).run(PRINT_ENV)


def test_loopback_fallback_without_ip(tmp_path):
    """With no `ip` on PATH the CLI still runs every rank, on loopback, and says so."""
    env = {**os.environ, "PATH": str(tmp_path)}
    res = subprocess.run([sys.executable, SCRIPT, "run", "-n", "2", "--", *PRINT_ENV], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "falling back to 2 processes on loopback" in res.stderr and "iproute2" in res.stderr
    rows = sorted((json.loads(line) for line in res.stdout.splitlines()), key=lambda r: r["RANK"])
    assert [r["RANK"] for r in rows] == ["0", "1"]
    assert all(r["MASTER_ADDR"] == "127.0.0.1" and r["GLOO_SOCKET_IFNAME"] == "lo" for r in rows)


def test_loopback_asked_for_runs_gloo():
    """``loopback=True`` (a baseline for benchmarks) runs real gloo ranks on 127.0.0.1, even with
    ``fallback=False``."""
    with netcluster.Cluster(2, "1gbit", fallback=False, loopback=True) as cluster:
        assert not cluster.shaped and cluster.reason == "loopback asked for"
        m = netcluster.measure_allreduce(cluster, mb=1, repeats=1, timeout=120)
    assert m["shaped"] is False and m["bytes"] == 10 ** 6 and m["median"] > 0


def test_no_fallback_fails_clearly(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    res = subprocess.run([sys.executable, SCRIPT, "run", "-n", "2", "--no-fallback", "--", *PRINT_ENV], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "cannot build network namespaces" in res.stderr


@needs_netns
def test_two_ranks_at_1gbit_are_shaped_and_torn_down():
    prefix = _prefix("a")
    with netcluster.Cluster(2, "1gbit", prefix=prefix) as cluster:
        assert cluster.shaped and len(_ours(prefix)) == 3
        envs = [json.loads(r.stdout) for r in cluster.run(PRINT_ENV, capture=True, timeout=60)]
        assert [e["RANK"] for e in envs] == ["0", "1"]
        assert {e["MASTER_ADDR"] for e in envs} == {"10.213.0.1"}
        assert {e["GLOO_SOCKET_IFNAME"] for e in envs} == {"tcn0"}
        # every link is shaped in both directions: tbf on each rank's end and on the bridge's end
        for r in range(2):
            qd = netcluster._sh("tc", "-n", cluster.rank_ns(r), "qdisc", "show", "dev", "tcn0").stdout
            assert "tbf" in qd and "rate 1Gbit" in qd
            qd = netcluster._sh("tc", "-n", cluster.bridge_ns, "qdisc", "show", "dev", f"r{r}").stdout
            assert "tbf" in qd and "rate 1Gbit" in qd
        m = netcluster.measure_allreduce(cluster, mb=25, repeats=2, timeout=120)
    assert not _ours(prefix)
    # 25 MB at 1 Gbit cannot go faster than the link; a busy CPU may make it slower
    assert m["limit"] == pytest.approx(0.2)
    assert 0.9 * m["limit"] <= m["median"] <= 4 * m["limit"], m


@needs_netns
def test_four_ranks_at_100mbit():
    prefix = _prefix("b")
    with netcluster.Cluster(4, "100mbit", prefix=prefix) as cluster:
        assert len(_ours(prefix)) == 5
        m = netcluster.measure_allreduce(cluster, mb=4, repeats=1, timeout=120)
    assert not _ours(prefix)
    assert m["limit"] == pytest.approx(0.48)
    assert 0.9 * m["limit"] <= m["median"] <= 4 * m["limit"], m


@needs_netns
def test_failed_rank_stops_the_others_and_tears_down():
    prefix = _prefix("c")
    code = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(120)"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 exited with 3"):
        with netcluster.Cluster(2, "1gbit", prefix=prefix) as cluster:
            cluster.run([sys.executable, "-c", code], timeout=60)
    assert time.monotonic() - t0 < 40
    assert not _ours(prefix)


@needs_netns
def test_timeout_stops_ranks():
    prefix = _prefix("d")
    with pytest.raises(TimeoutError, match="still running"):
        with netcluster.Cluster(2, "1gbit", prefix=prefix) as cluster:
            cluster.run([sys.executable, "-c", "import time; time.sleep(120)"], timeout=2)
    assert not _ours(prefix)


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_tears_everything_down(tmp_path, sig):
    prefix = _prefix(f"s{int(sig)}")
    marker = tmp_path / "started"
    code = f"import os, time; open({str(marker)!r} + os.environ['RANK'], 'w').close(); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, SCRIPT, "run", "-n", "2", "--prefix", prefix, "--", sys.executable,
                             "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not all(os.path.exists(f"{marker}{r}") for r in range(2)):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        assert len(_ours(prefix)) == 3
        pids = [int(p) for r in range(2) for p in
                netcluster._sh("ip", "netns", "pids", f"{prefix}-r{r}").stdout.split()]
        assert len(pids) == 2
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not _ours(prefix)
    assert not any(netcluster._pid_alive(p) for p in pids)


@needs_netns
def test_leftovers_of_a_crashed_run_are_removed():
    prefix = _prefix("e")
    # what a run killed with SIGKILL leaves: namespaces with the same prefix
    netcluster._sh("ip", "netns", "add", f"{prefix}-r0")
    netcluster._sh("ip", "netns", "add", f"{prefix}-br")
    try:
        with netcluster.Cluster(2, "1gbit", prefix=prefix) as cluster:
            assert cluster.shaped and len(_ours(prefix)) == 3
    finally:
        netcluster.cleanup(prefix)
    assert not _ours(prefix)


@needs_netns
def test_cleanup_removes_namespaces_of_dead_runs():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ns = f"tcn{dead.pid}-r0"
    netcluster._sh("ip", "netns", "add", ns)
    try:
        alive = f"tcn{os.getpid()}-r0"
        netcluster._sh("ip", "netns", "add", alive)
        try:
            removed = netcluster.cleanup()
            assert ns in removed and alive not in removed
            assert alive in netcluster._namespaces()
        finally:
            netcluster._kill_namespace(alive)
    finally:
        netcluster._kill_namespace(ns)
