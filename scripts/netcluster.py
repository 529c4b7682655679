#!/usr/bin/env python3
"""A bandwidth-limited cluster on one machine: one network namespace per rank.

Each rank gets its own network namespace with one veth interface (``tcn0``, address
10.213.0.<rank+1>/24); the other ends of the veth pairs join a bridge that lives in a namespace
of its own, so the host's interfaces are never touched. Every link is shaped in both directions
with ``tc qdisc ... tbf rate R`` (on the rank end for rank -> bridge, on the bridge end for
bridge -> rank), like a switch with R ports. Ranks run inside their namespaces through
``ip netns exec`` with MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE / LOCAL_RANK and
GLOO_SOCKET_IFNAME set, so ``torch.distributed.init_process_group("gloo")`` just works.

Two tiers (``ranks_per_node=L`` > 1, CLI ``--nodes N --ranks-per-node L``): the world_size = N L
ranks form N nodes of L consecutive ranks (rank r is local rank r % L of node r // L, as torchrun
places them). In the bridge namespace each node has a bridge of its own (``n<k>``) that its L ranks'
veths join, shaped at ``intra_rate`` in both directions; a veth pair per node (``u<k>`` on the node
bridge, ``d<k>`` on the core bridge ``br0``) is the node's uplink, shaped at ``rate`` in both
directions, so traffic between nodes crosses rank link -> uplink -> uplink -> rank link and the L
ranks of a node share one uplink. All ranks stay in the one subnet, each reaching every other.
``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` / ``GROUP_RANK`` are then r % L, L and r // L. (With L = 1,
the flat layout, they stay what they always were: the rank itself and the world size.)

Everything is torn down on exit, on failure and on SIGINT / SIGTERM / SIGHUP. Names carry a
per-run prefix (``tcn<pid>``); leftovers of a run with the same prefix, and of runs whose
process is gone (killed with SIGKILL), are removed before a new cluster is built.

Without root, ``ip``/``tc`` or namespace support it falls back to plain processes on loopback
(unshaped) and says so.

CLI::

    python scripts/netcluster.py run -n 2 --rate 1gbit -- python3 train.py ...
    python scripts/netcluster.py check -n 2 --rate 1gbit --mb 100   # 100 MB gloo allreduce, ~0.84 s
    python scripts/netcluster.py check --nodes 2 --ranks-per-node 2 --inter-rate 1gbit \
        --intra-rate 10gbit --mb 100    # also times an allreduce within a node vs across nodes
    python scripts/netcluster.py cleanup                              # remove stale namespaces

As a module (``sys.path`` holding scripts/)::

    from netcluster import Cluster
    with Cluster(2, "1gbit") as cluster:
        results = cluster.run([sys.executable, "train.py"], timeout=600)
    with Cluster(4, "1gbit", ranks_per_node=2, intra_rate="10gbit") as cluster:   # 2 nodes of 2
        ...
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

RATES = ("100mbit", "1gbit", "10gbit")
IFNAME = "tcn0"
SUBNET = "10.213.0"
PORT = 29500
FAILURE_GRACE = 5.0
ETC_NETNS = "/etc/netns"
_UNITS = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}
_STALE = re.compile(r"^tcn(\d+)-")


def parse_rate(rate: str) -> int:
    """``"100mbit"`` / ``"1gbit"`` / ``"10gbit"`` (tc's spelling) -> bits per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", str(rate).strip().lower())
    if not m:
        raise ValueError(f"invalid rate {rate!r}: write it as tc does, e.g. {', '.join(RATES)}")
    bits = int(float(m.group(1)) * _UNITS[m.group(2)])
    if bits < 10 ** 6:
        raise ValueError(f"rate {rate!r} is below 1mbit; the cluster needs at least 1mbit")
    return bits


def tbf_args(rate: str) -> List[str]:
    """tbf parameters that hold ``rate``: a bucket of 4 ms of traffic (at least 64 KiB, so one
    64 KiB GSO segment fits) and a 100 ms queue."""
    burst = max(64 * 1024, parse_rate(rate) // 8 * 4 // 1000)
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "100ms"]


def allreduce_limit(nbytes: int, world_size: int, rate: str) -> float:
    """Seconds a ring allreduce of ``nbytes`` needs at ``rate``: each rank sends (and receives)
    2 (n - 1) / n of the buffer over its own link."""
    return 2 * (world_size - 1) / world_size * nbytes * 8 / parse_rate(rate)


def namespaces_unavailable() -> Optional[str]:
    """Why this process cannot build shaped namespaces (None: it can)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (this process is not root)"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"`{tool}` not found (apt-get install iproute2)"
    return None


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    if check and res.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _namespaces() -> List[str]:
    if not shutil.which("ip"):
        return []
    res = _sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace(ns: str) -> None:
    """Kill what still runs inside ``ns`` (processes a cluster started there), then delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in _sh("ip", "netns", "pids", ns, check=False).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not pids:
            break
        time.sleep(0.5)
    _sh("ip", "netns", "del", ns, check=False)
    shutil.rmtree(os.path.join(ETC_NETNS, ns), ignore_errors=True)


def cleanup(prefix: Optional[str] = None) -> List[str]:
    """Delete the namespaces of ``prefix`` (a crashed run with the same prefix), or, with no
    prefix, those of every run whose owning process no longer exists. Returns their names."""
    removed = []
    for ns in _namespaces():
        if prefix is not None:
            stale = ns.startswith(prefix + "-")
        else:
            m = _STALE.match(ns)
            stale = bool(m) and not _pid_alive(int(m.group(1)))
        if stale:
            _kill_namespace(ns)
            removed.append(ns)
    return removed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str = ""
    stderr: str = ""


class Cluster:
    """``world_size`` ranks joined by links of ``rate`` (see the module docstring).

    ``ranks_per_node=L`` > 1 makes two tiers: world_size / L nodes whose ranks reach their node's
    bridge over links of ``intra_rate`` (default: ``rate``) and whose bridges are joined by
    uplinks of ``rate``. ``L = 1`` (the default) is the flat layout; ``intra_rate`` is then unused.

    Use it as a context manager: entering builds the namespaces (or falls back to loopback),
    leaving tears them down, and SIGINT / SIGTERM / SIGHUP inside the block unwind through it.
    ``shaped`` tells which of the two it got; ``reason`` says why it fell back.
    ``loopback=True`` asks for the unshaped loopback cluster directly (a baseline);
    ``fallback=False`` raises instead of falling back.
    """

    def __init__(self, world_size: int, rate: str = "1gbit", prefix: Optional[str] = None,
                 fallback: bool = True, loopback: bool = False, log=sys.stderr, *, ranks_per_node: int = 1,
                 intra_rate: Optional[str] = None):
        if not isinstance(world_size, int) or not 1 <= world_size <= 250:
            raise ValueError(f"world_size={world_size!r}: give an int in [1, 250]")
        if not isinstance(ranks_per_node, int) or isinstance(ranks_per_node, bool) or ranks_per_node < 1:
            raise ValueError(f"ranks_per_node={ranks_per_node!r}: give a positive int")
        if world_size % ranks_per_node:
            raise ValueError(f"world_size={world_size} is not a multiple of ranks_per_node={ranks_per_node}: "
                             "every node holds the same number of ranks")
        parse_rate(rate)
        if intra_rate is not None:
            parse_rate(intra_rate)
        self.world_size = world_size
        self.rate = rate
        self.ranks_per_node = ranks_per_node
        self.nodes = world_size // ranks_per_node
        self.intra_rate = intra_rate or rate
        self.prefix = prefix or f"tcn{os.getpid()}"
        if not re.fullmatch(r"[A-Za-z0-9_.]{1,40}", self.prefix):
            raise ValueError(f"prefix={self.prefix!r}: use 1-40 letters, digits, '_' or '.'")
        self.fallback = fallback
        self.loopback = loopback
        self.log = log
        self.shaped = False
        self.reason = ""
        self.port = PORT
        self._created: List[str] = []
        self._procs: List[subprocess.Popen] = []
        self._old_handlers: Dict[int, object] = {}
        self._ready = False

    # ------------------------------------------------------------------ names
    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    def rank_ns(self, rank: int) -> str:
        return f"{self.prefix}-r{rank}"

    @property
    def two_tier(self) -> bool:
        return self.ranks_per_node > 1

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def node_ranks(self, node: int) -> List[int]:
        """The ranks of node ``node``: L consecutive ones."""
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    @staticmethod
    def node_bridge(node: int) -> str:
        """Node ``node``'s bridge in the bridge namespace (two tiers); its uplink is the veth pair
        ``uplink(node)`` = (port on the node bridge, port on the core bridge br0)."""
        return f"n{node}"

    @staticmethod
    def uplink(node: int) -> Tuple[str, str]:
        return f"u{node}", f"d{node}"

    def address(self, rank: int) -> str:
        return self.address_for(rank) if self.shaped else "127.0.0.1"

    @staticmethod
    def address_for(rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

    @property
    def ifname(self) -> str:
        return IFNAME if self.shaped else "lo"

    def env(self, rank: int) -> Dict[str, str]:
        """The variables rank ``rank`` runs with (torchrun's names plus the gloo interface). Two
        tiers: LOCAL_RANK = rank % L, LOCAL_WORLD_SIZE = L, GROUP_RANK = rank // L (its node);
        flat: LOCAL_RANK = rank, LOCAL_WORLD_SIZE = world_size (one machine), as always."""
        env = {"MASTER_ADDR": self.address(0), "MASTER_PORT": str(self.port), "RANK": str(rank),
               "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(self.world_size), "GLOO_SOCKET_IFNAME": self.ifname,
               "TP_SOCKET_IFNAME": self.ifname, "TACITURN_NET": self.describe()}
        if self.two_tier:
            env.update(LOCAL_RANK=str(rank % self.ranks_per_node), LOCAL_WORLD_SIZE=str(self.ranks_per_node),
                       GROUP_RANK=str(self.node_of(rank)))
        return env

    def describe(self) -> str:
        if self.shaped and self.two_tier:
            return (f"{self.world_size} network namespaces as {self.nodes} nodes x {self.ranks_per_node} ranks: "
                    f"{self.intra_rate} links within a node, {self.rate} uplinks between nodes (tc tbf, both "
                    "directions)")
        if self.shaped:
            return f"{self.world_size} network namespaces, {self.rate} links (tc tbf, both directions)"
        if self.two_tier:
            return (f"{self.world_size} processes on loopback (unshaped; {self.nodes} nodes x "
                    f"{self.ranks_per_node} ranks in LOCAL_RANK / LOCAL_WORLD_SIZE only)")
        return f"{self.world_size} processes on loopback (unshaped)"

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> "Cluster":
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, _raise_on_signal)
        try:
            self.up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.down()
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            self._old_handlers.clear()

    def up(self) -> None:
        problem = self._unavailable()
        if problem is None:
            cleanup()
            cleanup(self.prefix)
            try:
                self._build()
                self.shaped = self._ready = True
                return
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                self._teardown_namespaces()
                problem = str(e)
        if not self.fallback and not self.loopback:
            raise RuntimeError(f"netcluster: cannot build network namespaces: {problem}. Run as root on Linux "
                               "with iproute2 installed (apt-get install iproute2)")
        self.reason = problem
        self.port = _free_port()
        self._ready = True
        rates = f"{self.intra_rate} within / {self.rate} between nodes" if self.two_tier else self.rate
        print(f"netcluster: {problem}; falling back to {self.world_size} processes on loopback: the links are "
              f"NOT shaped to {rates}, timings show this machine's loopback", file=self.log, flush=True)

    def _unavailable(self) -> Optional[str]:
        return "loopback asked for" if self.loopback else namespaces_unavailable()

    def _add_ns(self, ns: str, rank: Optional[int] = None) -> None:
        _sh("ip", "netns", "add", ns)
        self._created.append(ns)
        # `ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts: name the ranks (also as
        # IPv4-mapped IPv6, how a dual-stack socket sees them) so that gloo's reverse lookups of
        # the private addresses succeed instead of warning. In a rank's namespace this machine's
        # hostname names the rank's own address, as on a cluster node: Horovod's Gloo process
        # sets build their device from the hostname (they do not pass HOROVOD_GLOO_IFACE on).
        lines = ["127.0.0.1 localhost"]
        if rank is not None:
            lines.append(f"{self.address_for(rank)} {socket.gethostname()}")
        for r in range(self.world_size):
            name = f"{self.prefix}-rank{r}"
            lines += [f"{self.address_for(r)} {name}", f"::ffff:{self.address_for(r)} {name}"]
        os.makedirs(os.path.join(ETC_NETNS, ns), exist_ok=True)
        with open(os.path.join(ETC_NETNS, ns, "hosts"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def _build(self) -> None:
        """Flat: every rank's veth joins br0, shaped at ``rate``. Two tiers: every rank's veth
        joins its node's bridge n<k>, shaped at ``intra_rate``; each node bridge reaches br0 (the
        core) over its uplink u<k> -- d<k>, shaped at ``rate``. Every interface lives in a
        namespace of this cluster (none in the host's), so deleting those removes them all."""
        br = self.bridge_ns
        shape = tbf_args(self.intra_rate if self.two_tier else self.rate)
        self._add_ns(br)
        _sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", br, "link", "set", "br0", "up")
        if self.two_tier:
            uplink = tbf_args(self.rate)
            for k in range(self.nodes):
                node, (up, down) = self.node_bridge(k), self.uplink(k)
                _sh("ip", "-n", br, "link", "add", node, "type", "bridge")
                _sh("ip", "-n", br, "link", "set", node, "up")
                _sh("ip", "-n", br, "link", "add", up, "type", "veth", "peer", "name", down)
                _sh("ip", "-n", br, "link", "set", up, "master", node, "up")
                _sh("ip", "-n", br, "link", "set", down, "master", "br0", "up")
                _sh("tc", "-n", br, "qdisc", "add", "dev", up, "root", *uplink)    # node -> core
                _sh("tc", "-n", br, "qdisc", "add", "dev", down, "root", *uplink)  # core -> node
        for r in range(self.world_size):
            ns, port = self.rank_ns(r), f"r{r}"
            master = self.node_bridge(self.node_of(r)) if self.two_tier else "br0"
            self._add_ns(ns, r)
            _sh("ip", "link", "add", "name", IFNAME, "netns", ns, "type", "veth", "peer", "name", port, "netns", br)
            _sh("ip", "-n", br, "link", "set", port, "master", master, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.address_for(r)}/24", "dev", IFNAME)
            _sh("ip", "-n", ns, "link", "set", IFNAME, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("tc", "-n", ns, "qdisc", "add", "dev", IFNAME, "root", *shape)
            _sh("tc", "-n", br, "qdisc", "add", "dev", port, "root", *shape)

    def down(self) -> None:
        """Stop the ranks and delete every namespace this cluster made. Idempotent; signals
        are held off while it runs so a second Ctrl-C cannot leave half a cluster behind."""
        held = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            held[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            self._ready = False
            self._stop_ranks()
            self._teardown_namespaces()
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)

    def _teardown_namespaces(self) -> None:
        for ns in reversed(self._created):
            _kill_namespace(ns)
        self._created.clear()

    def _stop_ranks(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self._procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(p.pid, signal.SIGKILL)
                p.wait()
        self._procs.clear()

    # ------------------------------------------------------------------ running ranks
    def command(self, rank: int, argv: Sequence[str]) -> List[str]:
        argv = [str(a) for a in argv]
        return ["ip", "netns", "exec", self.rank_ns(rank), *argv] if self.shaped else argv

    def run(self, argv: Sequence[str], *, timeout: Optional[float] = None, env: Optional[Dict[str, str]] = None,
            capture: bool = False, check: bool = True) -> List[RankResult]:
        """Run ``argv`` once per rank, inside its namespace, and wait for all of them.

        If a rank fails, the others are stopped (they would hang in their next collective).
        ``capture``: collect each rank's stdout/stderr instead of passing them through.
        ``check``: raise ``RuntimeError`` naming the first failed rank (with its stderr tail).
        ``timeout`` (seconds): stop every rank and raise ``TimeoutError``.
        """
        if not argv:
            raise ValueError("run() needs a command, e.g. [sys.executable, 'train.py']")
        if not self._ready:
            raise RuntimeError("Cluster.run() needs a built cluster: use `with Cluster(...) as cluster:`")
        with tempfile.TemporaryDirectory(prefix="netcluster") as tmp, contextlib.ExitStack() as files:
            outs = []
            for r in range(self.world_size):
                streams = {}
                if capture:
                    streams = {name: files.enter_context(open(os.path.join(tmp, f"{r}.{name}"), "w+"))
                               for name in ("stdout", "stderr")}
                    outs.append(streams)
                self._procs.append(subprocess.Popen(self.command(r, argv), env={**os.environ, **(env or {}),
                                                    **self.env(r)}, start_new_session=True, **streams))
            codes, first_failed = self._wait(timeout)
            results = [RankResult(r, code) for r, code in enumerate(codes)]
            for res, streams in zip(results, outs):
                for name, f in streams.items():
                    f.seek(0)
                    setattr(res, name, f.read())
        if check and first_failed is not None:
            res = results[first_failed]
            tail = "\n".join(res.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"netcluster: rank {res.rank} exited with {res.returncode} running "
                               f"`{' '.join(map(str, argv))}`" + (f":\n{tail}" if tail else ""))
        return results

    def _wait(self, timeout: Optional[float]) -> Tuple[List[int], Optional[int]]:
        """Wait for every rank; the return codes and the rank that failed first (if any). Once
        a rank fails the others get ``FAILURE_GRACE`` seconds to notice, then are stopped."""
        procs = list(self._procs)
        deadline = None if timeout is None else time.monotonic() + timeout
        first_failed, failed_at = None, None
        while any(p.poll() is None for p in procs):
            if deadline is not None and time.monotonic() > deadline:
                self._stop_ranks()
                raise TimeoutError(f"netcluster: ranks still running after {timeout} s; stopped them")
            if first_failed is None:
                first_failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
                failed_at = time.monotonic()
            elif time.monotonic() - failed_at > FAILURE_GRACE:
                self._stop_ranks()
                break
            time.sleep(0.05)
        codes = [p.returncode for p in procs]
        if first_failed is None:
            first_failed = next((r for r, c in enumerate(codes) if c != 0), None)
        self._procs = [p for p in self._procs if p not in procs]
        return codes, first_failed


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _raise_on_signal(signum, frame):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------- shaping check
def _timed_allreduce(x, repeats: int, group=None, member: bool = True) -> List[float]:
    """``repeats`` timed allreduces of ``x`` within ``group`` (every rank calls this; those not in
    the group only keep the barriers, so one tier is timed at a time)."""
    import torch.distributed as dist

    times = []
    for _ in range(repeats):
        dist.barrier()
        if member:
            t0 = time.perf_counter()
            dist.all_reduce(x, group=group)
            times.append(time.perf_counter() - t0)
    dist.barrier()
    return times


def _allreduce_rank(mb: float, repeats: int, ranks_per_node: int = 1) -> None:
    """One rank of ``check``: time a gloo allreduce of ``mb`` MB of fp32; rank 0 prints JSON.
    With ``ranks_per_node=L`` > 1 also among the L ranks of node 0 (``intra``) and among the
    first rank of every node (``inter``), one group at a time; rank 0 is in both."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    x = torch.ones(int(mb * 10 ** 6) // 4)
    dist.all_reduce(x)
    out = {"bytes": x.numel() * 4, "times": _timed_allreduce(x, repeats)}
    rank, n, size = dist.get_rank(), dist.get_world_size(), ranks_per_node
    if size > 1:
        # every rank creates every group, in the same order (new_group is collective)
        tiers = [("intra", list(range(size)))]
        if n // size > 1:
            tiers.append(("inter", list(range(0, n, size))))
        for name, ranks in tiers:
            group = dist.new_group(ranks)
            member = rank in ranks
            if member:
                dist.all_reduce(x[:1024], group=group)  # connect before timing
            out[name] = {"ranks": ranks, "times": _timed_allreduce(x, repeats, group, member)}
    if rank == 0:
        print(json.dumps(out))
    dist.destroy_process_group()


def _median(times: Sequence[float]) -> float:
    return sorted(times)[len(times) // 2]


def measure_allreduce(cluster: Cluster, mb: float = 100.0, repeats: int = 3, timeout: float = 300,
                      tiers: bool = True) -> dict:
    """Time a gloo allreduce of ``mb`` MB between the cluster's ranks; the median and the
    physical limit of the link (``allreduce_limit``).

    Two tiers (and ``tiers``): also ``intra`` (the ranks of node 0) and ``inter`` (one rank per
    node), each ``{"ranks", "times", "median", "limit", "rate"}`` with ``rate`` the slowest link
    on the way: ``intra_rate`` within a node, min(``rate``, ``intra_rate``) between nodes. The
    world's ``limit`` is then the ring's over its slowest link; how gloo lays the ring over the
    nodes decides how near it gets."""
    size = cluster.ranks_per_node if tiers else 1
    res = cluster.run([sys.executable, os.path.abspath(__file__), "_allreduce", "--mb", str(mb),
                       "--repeats", str(repeats), "--ranks-per-node", str(size)], timeout=timeout, capture=True)
    data = json.loads(res[0].stdout.strip().splitlines()[-1])
    slowest = cluster.rate
    if cluster.two_tier and parse_rate(cluster.intra_rate) < parse_rate(cluster.rate):
        slowest = cluster.intra_rate
    out = {"world_size": cluster.world_size, "rate": cluster.rate, "shaped": cluster.shaped, "bytes": data["bytes"],
           "times": data["times"], "median": _median(data["times"]),
           "limit": allreduce_limit(data["bytes"], cluster.world_size, slowest)}
    if cluster.two_tier:
        out.update(ranks_per_node=cluster.ranks_per_node, nodes=cluster.nodes, intra_rate=cluster.intra_rate)
    for name, rate in (("intra", cluster.intra_rate), ("inter", slowest)):
        if name in data:
            tier = data[name]
            out[name] = {**tier, "median": _median(tier["times"]), "rate": rate,
                         "limit": allreduce_limit(data["bytes"], len(tier["ranks"]), rate)}
    return out


def _layout(ap: argparse.ArgumentParser, args) -> Tuple[int, int]:
    """(world size, ranks per node) from -n / --nodes / --ranks-per-node."""
    size = args.ranks_per_node
    if size < 1:
        ap.error(f"--ranks-per-node {size}: give a positive number")
    if args.nodes is not None:
        if args.nodes < 1:
            ap.error(f"--nodes {args.nodes}: give a positive number")
        world = args.nodes * size
        if args.world_size is not None and args.world_size != world:
            ap.error(f"-n {args.world_size} disagrees with --nodes {args.nodes} x --ranks-per-node {size} = {world}")
        return world, size
    world = args.world_size if args.world_size is not None else 2 * size
    if world % size:
        ap.error(f"-n {world} is not a multiple of --ranks-per-node {size}")
    return world, size


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run_p = sub.add_parser("run", help="run a command once per rank: run -n 2 --rate 1gbit -- CMD ...")
    chk_p = sub.add_parser("check", help="verify the shaping: time a gloo allreduce between the namespaces")
    for p in (run_p, chk_p):
        p.add_argument("-n", "--world-size", type=int, default=None,
                       help="number of ranks (default 2; with --nodes: nodes x ranks-per-node)")
        p.add_argument("--nodes", type=int, default=None, help="number of nodes (two tiers with --ranks-per-node)")
        p.add_argument("--ranks-per-node", type=int, default=1,
                       help="ranks per node (default 1: the flat layout, every rank on its own link)")
        p.add_argument("--inter-rate", "--rate", dest="rate", default="1gbit",
                       help=f"tc rate of every link (flat) or of every node's uplink ({', '.join(RATES)})")
        p.add_argument("--intra-rate", default=None,
                       help="tc rate of each rank's link into its node (two tiers; default: --inter-rate)")
        p.add_argument("--prefix", default=None, help="namespace name prefix (default tcn<pid>)")
        p.add_argument("--no-fallback", action="store_true", help="fail instead of falling back to loopback")
        p.add_argument("--loopback", action="store_true", help="run on unshaped loopback (a baseline)")
    run_p.add_argument("--timeout", type=float, default=None, help="seconds before every rank is stopped")
    run_p.add_argument("command", nargs=argparse.REMAINDER)
    chk_p.add_argument("--mb", type=float, default=100.0, help="allreduce size in MB (default 100)")
    chk_p.add_argument("--repeats", type=int, default=3)
    cln_p = sub.add_parser("cleanup", help="delete namespaces left by runs that died (or by --prefix)")
    cln_p.add_argument("--prefix", default=None)
    wrk_p = sub.add_parser("_allreduce", help=argparse.SUPPRESS)
    wrk_p.add_argument("--mb", type=float, required=True)
    wrk_p.add_argument("--repeats", type=int, required=True)
    wrk_p.add_argument("--ranks-per-node", type=int, default=1)
    args = ap.parse_args(argv)

    if args.cmd == "_allreduce":
        _allreduce_rank(args.mb, args.repeats, args.ranks_per_node)
        return 0
    if args.cmd == "cleanup":
        removed = cleanup(args.prefix)
        print(f"netcluster: removed {len(removed)} namespace(s)" + (f": {' '.join(removed)}" if removed else ""))
        return 0
    world, size = _layout(ap, args)
    try:
        make = lambda: Cluster(world, args.rate, args.prefix, not args.no_fallback, args.loopback,
                               ranks_per_node=size, intra_rate=args.intra_rate)
        make()  # argument errors before anything is built
    except ValueError as e:
        ap.error(str(e))
    if args.cmd == "run":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            ap.error("run needs a command after --, e.g. run -n 2 -- python3 train.py")
        with make() as cluster:
            print(f"netcluster: {cluster.describe()}", file=sys.stderr, flush=True)
            results = cluster.run(command, timeout=args.timeout, check=False)
        return max((r.returncode or 0 for r in results), key=abs)
    with make() as cluster:
        m = measure_allreduce(cluster, args.mb, args.repeats)
    ratio = m["median"] / m["limit"]
    print(f"netcluster check: {m['world_size']} ranks, {cluster.describe()}")
    print(f"  gloo allreduce of {m['bytes'] / 1e6:.0f} MB fp32: median {m['median']:.3f} s over {args.repeats} "
          f"(all: {', '.join(f'{t:.3f}' for t in m['times'])})")
    if not cluster.two_tier:
        print(f"  link limit 2(n-1)/n x bytes / rate = {m['limit']:.3f} s; measured / limit = {ratio:.2f}")
        if not m["shaped"]:
            print("  NOT shaped (loopback fallback): the ratio says nothing about the link")
            return 0
        ok = 0.9 <= ratio <= 1.5
        print("  shaping holds" if ok else "  WARNING: the measured time is not near the link limit (a busy CPU, "
              "or tbf not holding the rate)")
        return 0 if ok else 1
    print(f"  ring limit over the slowest link 2(n-1)/n x bytes / rate = {m['limit']:.3f} s; measured / limit = "
          f"{ratio:.2f} (how gloo lays its ring over the nodes decides this one)")
    for name, what in (("intra", "within node 0"), ("inter", "across nodes, one rank per node")):
        if name in m:
            t = m[name]
            print(f"  {name}: allreduce {what} (ranks {', '.join(map(str, t['ranks']))}): median {t['median']:.3f} s "
                  f"(all: {', '.join(f'{x:.3f}' for x in t['times'])}); limit at {t['rate']} {t['limit']:.3f} s, "
                  f"measured / limit = {t['median'] / t['limit']:.2f}")
    if "intra" in m and "inter" in m:
        print(f"  inter / intra time = {m['inter']['median'] / m['intra']['median']:.2f} "
              f"(the intra link is {parse_rate(cluster.intra_rate) / parse_rate(cluster.rate):g}x the inter link)")
    if not m["shaped"]:
        print("  NOT shaped (loopback fallback): the tiers say nothing about the links")
        return 0
    ok, problems = True, []
    if "inter" in m:
        inter_ratio = m["inter"]["median"] / m["inter"]["limit"]
        if not 0.9 <= inter_ratio <= 1.5:
            problems.append("the cross-node allreduce is not near its link limit (a busy CPU, or tbf not holding "
                            "the rate)")
        if "intra" in m and parse_rate(cluster.intra_rate) > parse_rate(cluster.rate) \
                and m["intra"]["median"] >= m["inter"]["median"]:
            problems.append("the within-node allreduce is not faster than the cross-node one")
    if "intra" in m and m["intra"]["median"] / m["intra"]["limit"] > 1.5:
        print("  note: the within-node allreduce is slower than its link allows (on few CPU cores a fast link is "
              "CPU-bound)")
    for problem in problems:
        ok = False
        print(f"  WARNING: {problem}")
    if ok:
        print("  shaping holds: both tiers as set" if "inter" in m else "  shaping holds")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("netcluster: interrupted; the cluster was torn down", file=sys.stderr)
        sys.exit(130)
