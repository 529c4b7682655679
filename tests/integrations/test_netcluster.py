"""scripts/netcluster.py: shaped namespaces, rank environment, teardown on every exit path,
and the loopback fallback. The namespace tests need root and iproute2 (CI has both)."""
import importlib.util
import json
import os
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

NO_NAMESPACES = netcluster.namespaces_unavailable()  # why shaped namespaces cannot be built, or None
needs_netns = pytest.mark.skipif(NO_NAMESPACES is not None, reason=str(NO_NAMESPACES))

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


# ---------------------------------------------------------------------- two tiers
# a tiny gloo job: every rank reports its torchrun variables and the sum of 1..4 over the world
GLOO_JOB = [sys.executable, "-c", """
import json, os, torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(x)
keys = ('RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'WORLD_SIZE')
os.write(1, (json.dumps({**{k: os.environ.get(k) for k in keys}, 'sum': x.item()}) + '\\n').encode())
dist.destroy_process_group()
"""]


def test_two_tier_arguments_and_env():
    with pytest.raises(ValueError, match="not a multiple of ranks_per_node=2"):
        netcluster.Cluster(3, "1gbit", ranks_per_node=2)
    with pytest.raises(ValueError, match="ranks_per_node"):
        netcluster.Cluster(4, "1gbit", ranks_per_node=0)
    with pytest.raises(ValueError, match="1gbit"):
        netcluster.Cluster(4, "1gbit", ranks_per_node=2, intra_rate="fast")
    cluster = netcluster.Cluster(6, "100mbit", ranks_per_node=3, intra_rate="1gbit")
    assert cluster.nodes == 2 and [cluster.node_of(r) for r in range(6)] == [0, 0, 0, 1, 1, 1]
    assert cluster.node_ranks(1) == [3, 4, 5]
    envs = [cluster.env(r) for r in range(6)]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2", "0", "1", "2"]
    assert {e["LOCAL_WORLD_SIZE"] for e in envs} == {"3"} and {e["WORLD_SIZE"] for e in envs} == {"6"}
    assert [e["GROUP_RANK"] for e in envs] == ["0", "0", "0", "1", "1", "1"]
    # the flat layout (ranks_per_node=1, the default) keeps its variables as they were
    flat = netcluster.Cluster(2, "1gbit")
    assert flat.ranks_per_node == 1 and flat.intra_rate == "1gbit" and not flat.two_tier
    assert [(flat.env(r)["LOCAL_RANK"], flat.env(r)["LOCAL_WORLD_SIZE"]) for r in range(2)] == [("0", "2"), ("1", "2")]
    assert "GROUP_RANK" not in flat.env(0)
    assert netcluster.Cluster(4, "1gbit", ranks_per_node=2).intra_rate == "1gbit"  # intra defaults to rate


@pytest.mark.parametrize("args, message", [
    (["-n", "3", "--ranks-per-node", "2"], "not a multiple"),
    (["-n", "3", "--nodes", "2", "--ranks-per-node", "2"], "disagrees"),
    (["--nodes", "2", "--intra-rate", "1 GB/s"], "invalid rate"),
], ids=["not-a-multiple", "disagree", "bad-rate"])
def test_two_tier_cli_refuses_bad_layouts(args, message):
    res = subprocess.run([sys.executable, SCRIPT, "run", *args, "--", *PRINT_ENV], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_two_tier_on_loopback_sets_local_ranks():
    with netcluster.Cluster(4, "1gbit", loopback=True, ranks_per_node=2, intra_rate="10gbit") as cluster:
        assert "2 nodes x 2 ranks" in cluster.describe()
        rows = [json.loads(r.stdout) for r in cluster.run(GLOO_JOB, capture=True, timeout=120)]
    assert [(r["RANK"], r["LOCAL_RANK"], r["LOCAL_WORLD_SIZE"]) for r in rows] == \
        [("0", "0", "2"), ("1", "1", "2"), ("2", "0", "2"), ("3", "1", "2")]
    assert {r["sum"] for r in rows} == {10.0}


def _host_links():
    return {line.split()[0].split("@")[0] for line in netcluster._sh("ip", "-br", "link").stdout.splitlines()}


@needs_netns
def test_two_tier_2x2_is_shaped_per_tier_and_torn_down():
    prefix = _prefix("t")
    links_before = _host_links()
    with netcluster.Cluster(4, "50mbit", prefix=prefix, ranks_per_node=2, intra_rate="1gbit") as cluster:
        assert cluster.shaped and len(_ours(prefix)) == 5  # 4 ranks and the bridges' namespace
        assert "2 nodes x 2 ranks" in cluster.describe() and "1gbit links within a node" in cluster.describe()
        br = cluster.bridge_ns
        # each rank's link, both ends, at the intra-node rate, joined to its node's bridge
        for r in range(4):
            qd = netcluster._sh("tc", "-n", cluster.rank_ns(r), "qdisc", "show", "dev", "tcn0").stdout
            assert "tbf" in qd and "rate 1Gbit" in qd
            qd = netcluster._sh("tc", "-n", br, "qdisc", "show", "dev", f"r{r}").stdout
            assert "tbf" in qd and "rate 1Gbit" in qd
            assert f"master n{r // 2}" in netcluster._sh("ip", "-n", br, "link", "show", f"r{r}").stdout
        # each node's uplink, both directions, at the inter-node rate, into the core bridge
        for k in range(2):
            for dev, master in ((f"u{k}", f"n{k}"), (f"d{k}", "br0")):
                qd = netcluster._sh("tc", "-n", br, "qdisc", "show", "dev", dev).stdout
                assert "tbf" in qd and "rate 50Mbit" in qd
                assert f"master {master}" in netcluster._sh("ip", "-n", br, "link", "show", dev).stdout
        # every rank reaches every other (one subnet): gloo's allreduce over all 4, and the local ranks
        rows = [json.loads(r.stdout) for r in cluster.run(GLOO_JOB, capture=True, timeout=120)]
        assert [(r["RANK"], r["LOCAL_RANK"], r["LOCAL_WORLD_SIZE"], r["GROUP_RANK"]) for r in rows] == \
            [("0", "0", "2", "0"), ("1", "1", "2", "0"), ("2", "0", "2", "1"), ("3", "1", "2", "1")]
        assert {r["sum"] for r in rows} == {10.0}
        m = netcluster.measure_allreduce(cluster, mb=2, repeats=2, timeout=180)
    assert not _ours(prefix)
    assert _host_links() <= links_before  # nothing was ever made in the host's namespace
    assert m["intra"]["ranks"] == [0, 1] and m["inter"]["ranks"] == [0, 2]
    # 2 MB between two nodes at 50 Mbit: 0.32 s at least; within a node at 1 Gbit it is 20x less
    assert m["inter"]["limit"] == pytest.approx(0.32) and m["intra"]["limit"] == pytest.approx(0.016)
    assert 0.9 * m["inter"]["limit"] <= m["inter"]["median"] <= 4 * m["inter"]["limit"], m
    assert m["inter"]["median"] > 2 * m["intra"]["median"], m


@needs_netns
def test_two_tier_failed_rank_tears_down():
    prefix = _prefix("f")
    code = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '3' else time.sleep(120)"
    with pytest.raises(RuntimeError, match="rank 3 exited with 3"):
        with netcluster.Cluster(4, "100mbit", prefix=prefix, ranks_per_node=2, intra_rate="1gbit") as cluster:
            assert len(_ours(prefix)) == 5
            cluster.run([sys.executable, "-c", code], timeout=60)
    assert not _ours(prefix)


@needs_netns
def test_two_tier_check_cli():
    """``check --nodes 2 --ranks-per-node 2``: the within-node allreduce beats the cross-node one."""
    prefix = _prefix("k")
    res = subprocess.run([sys.executable, SCRIPT, "check", "--nodes", "2", "--ranks-per-node", "2", "--inter-rate",
                          "50mbit", "--intra-rate", "1gbit", "--mb", "2", "--repeats", "2", "--prefix", prefix],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "intra: allreduce within node 0 (ranks 0, 1)" in res.stdout
    assert "inter: allreduce across nodes, one rank per node (ranks 0, 2)" in res.stdout
    assert "shaping holds" in res.stdout
    assert not _ours(prefix)
