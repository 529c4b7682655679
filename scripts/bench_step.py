#!/usr/bin/env python3
"""Step time on a bandwidth-limited cluster: taciturn's optimizers next to what users run instead.

Every rank trains the same MLP, 5 x Linear(w, w) with ReLUs between (w = 2236: 25.0M parameters,
w = 4690: 110.0M), on a random batch of 8 of its own, one torch thread per rank, in one network
namespace per rank joined by links shaped with tc tbf (scripts/netcluster.py; ``--loopback``
or a machine without root falls back to unshaped loopback, and says so). Methods, all in the
same processes of one run, one after the other:

- ``local``: the step with no communication at all (torch AMSGrad): the compute floor, and
  what the baselines' split is taken from;
- ``ddp_fp32``, ``ddp_fp16``, ``ddp_powersgd``: DistributedDataParallel (default buckets) with
  torch's AMSGrad, alone, with the fp16 comm hook, and with the PowerSGD hook (rank 1, error
  feedback and warm start, after 2 plain allreduce steps; one bucket: PowerSGD's chained
  collectives abort on gloo with several);
- ``horovod_fp16`` (and ``horovod_fp32``, on request): ``hvd.DistributedOptimizer`` with
  ``hvd.Compression.fp16`` over torch AMSGrad, Horovod's Gloo controller;
- taciturn: ``cdadam``, ``onebitadam`` (timed after its freeze; a 1-step CD-Adam warm-up),
  ``sparsams`` (top-1 %), ``distefsgd`` (blockSGDM: block sign, momentum 0.9), ``saefsgd``
  (top-1 %), ``amsgrad`` (uncompressed: fp32 over the same all_to_all + all_gather path).

Horovod: ``horovodrun`` starts its ranks itself (locally or over ssh) and cannot place them in
network namespaces, so each rank does what horovodrun's Gloo launcher does: rank 0 serves
Horovod's rendezvous (``RendezvousHTTPServer`` with the host plan of one slot per namespace) and
every rank sets the HOROVOD_* variables horovodrun would set (controller and CPU operations
gloo, interface = the rank's veth) before ``hvd.init()``.

What is printed per method: the step time (median over the timed steps of the slowest rank's
step; a barrier starts every step), its ratio to DDP fp32, the split of the step, the bytes
on the wire per step and per rank, and the physical limit. Split: taciturn's optimizers time
their own phases (``opt.stats``: ``compress_time`` = everything in the compressed allreduce
(the flat input, compression, the server phase, decoding) except waiting for collectives,
``collective_time`` = the waits: each bucket's collectives run while the other buckets are
compressed and served, so only what that work does not hide is counted), fwd+bwd is timed around the
backward pass, update = the rest of ``opt.step()``; DDP (its allreduces end inside ``backward()``):
compute = the ``local`` fwd+bwd, communication = its own fwd+bwd beyond that, update = its own
``opt.step()``; Horovod (waits in ``step()``): compute and update are the ``local`` step's and
communication is the rest (both compress inside it). Wire bytes: in namespaces, each rank's
veth counters (tx and rx; the larger over ranks and directions), headers included; on
loopback, the payload every rank sends, from the formulas of the collectives (ring allreduce:
2(n-1)/n of the buffer; taciturn: from ``opt.stats``). The limit is wire bytes / link rate;
"comm / limit" compares the communication phase with it.

    python scripts/bench_step.py                 # the default matrix (below), writes BENCHMARKS.md
    python scripts/bench_step.py --sizes 25M --ranks 2 --rates 1gbit --methods ddp_fp32,cdadam --steps 5
    python scripts/bench_step.py --quick         # smoke run: tiny model, 2 ranks on loopback, writes nothing
    python scripts/bench_step.py --render results/bench_step.json   # section and plots again, no runs

Default matrix (18 minutes here, on 2 cores shared with other jobs): 25M at n = 2 and 4 at all
three rates, and 110M at n = 2 at 1 Gbit (110M at n = 4 needs about 4 GB per rank). Any of
``--sizes/--ranks/--rates`` replaces it by the full product of the lists given (the others
keep their defaults: 25M, 2 ranks, 1gbit).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from _bench import (add_cluster_options, img_path, join_cluster, machine_note, read_rank_results,  # noqa: E402
                    rel, run_workers, save_and_publish, table, write_rank_result, write_section)
from netcluster import Cluster, parse_rate  # noqa: E402

SECTION = "bench_step"
LAYERS, BATCH = 5, 8
DEFAULT_CELLS = ([("25M", n, r) for n in (2, 4) for r in ("100mbit", "1gbit", "10gbit")]
                 + [("110M", 2, "1gbit")])
POWERSGD_START = 2          # PowerSGD needs start_powerSGD_iter > 1 with error feedback / warm start
ADAM_LR, SGD_LR = 1e-4, 1e-3


# ---------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    label: str
    family: str                                   # local | ddp | horovod | taciturn
    build: Callable                               # model -> (module to call, optimizer)
    warmup: int = 0                               # extra untimed steps this method needs


def _torch_amsgrad(model):
    return torch.optim.Adam(model.parameters(), lr=ADAM_LR, amsgrad=True)


def _local(model):
    return model, _torch_amsgrad(model)


def _ddp(hook: Optional[str]):
    def build(model):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        from torch.nn.parallel import DistributedDataParallel

        # Every rank built the same model from the same seed: no initial broadcast (init_sync).
        one_bucket = 4 * sum(p.numel() for p in model.parameters()) / 2 ** 20 + 1
        ddp = DistributedDataParallel(model, init_sync=False,
                                      bucket_cap_mb=one_bucket if hook == "powersgd" else None)
        if hook == "fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif hook == "powersgd":
            state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                                start_powerSGD_iter=POWERSGD_START)
            ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return ddp, _torch_amsgrad(model)
    return build


def _horovod(compression: str):
    def build(model):
        import horovod.torch as hvd

        return model, hvd.DistributedOptimizer(_torch_amsgrad(model), named_parameters=model.named_parameters(),
                                               compression=getattr(hvd.Compression, compression))
    return build


def _taciturn(name: str, **kwargs):
    def build(model):
        import taciturn

        # Same seed on every rank: skip the initial broadcast of the parameters.
        return model, taciturn.create_optimizer(name, model.parameters(), broadcast_parameters=False, **kwargs)
    return build


def _deepspeed_zero(stage: int):
    def build(model):
        os.environ.setdefault("LOCAL_RANK", "0")
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": BATCH, "zero_optimization": {"stage": stage},
                  "optimizer": {"type": "AdamW", "params": {"lr": ADAM_LR, "torch_adam": True}}}
        engine, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
        return engine, engine
    return build


METHODS: Dict[str, Method] = {
    "local": Method("local step, no communication (torch AMSGrad)", "local", _local),
    "ddp_fp32": Method("DDP fp32 allreduce", "ddp", _ddp(None)),
    "ddp_fp16": Method("DDP + fp16 hook", "ddp", _ddp("fp16")),
    "ddp_powersgd": Method("DDP + PowerSGD hook (rank 1)", "ddp", _ddp("powersgd"), warmup=POWERSGD_START),
    "horovod_fp16": Method("Horovod, fp16 compression", "horovod", _horovod("fp16")),
    "horovod_fp32": Method("Horovod, no compression", "horovod", _horovod("none")),
    "cdadam": Method("CDAdam (block sign, Markov both ways)", "taciturn", _taciturn("CDAdam", lr=ADAM_LR)),
    "onebitadam": Method("OneBitAdam after freeze (block sign, EF)", "taciturn",
                         _taciturn("OneBitAdam", lr=ADAM_LR, freeze_step=1, warmup="cdadam")),
    "zerooneadam": Method("ZeroOneAdam after freeze, synchronising every step (local_step_clipper 1)", "taciturn",
                          _taciturn("ZeroOneAdam", lr=ADAM_LR, var_freeze_step=1, warmup="cdadam",
                                    local_step_clipper=1)),
    "onebitlamb": Method("OneBitLamb after freeze (block sign, EF)", "taciturn",
                         _taciturn("OneBitLamb", lr=ADAM_LR, freeze_step=1, warmup="cdadam")),
    "sparsams": Method("SparsAMS (top-1%, EF, one-way)", "taciturn", _taciturn("SparsAMS", lr=ADAM_LR)),
    "distefsgd": Method("DistEFSGD (blockSGDM, EF both ways)", "taciturn",
                        _taciturn("DistEFSGD", lr=SGD_LR, momentum=0.9)),
    "saefsgd": Method("SAEFSGD (top-1%, EF both ways)", "taciturn", _taciturn("SAEFSGD", lr=SGD_LR)),
    "amsgrad": Method("taciturn AMSGrad, uncompressed (fp32)", "taciturn", _taciturn("AMSGrad", lr=ADAM_LR)),
    "cdadam_sharded": Method("CDAdam sharded state, 1-bit downlink", "taciturn",
                             _taciturn("CDAdam", lr=ADAM_LR, shard_state=True)),
    "cdadam_sharded_bf16": Method("CDAdam sharded state, bf16 downlink", "taciturn",
                                  _taciturn("CDAdam", lr=ADAM_LR, shard_state=True, downlink="bf16")),
    "deepspeed_zero2": Method("DeepSpeed ZeRO-2 + its AdamW (fp32 reduce-scatter)", "deepspeed", _deepspeed_zero(2)),
    "cdadam_two_level": Method("CDAdam two-level (fp32 inside nodes, 1-bit between)", "taciturn",
                               _taciturn("CDAdam", lr=ADAM_LR, ranks_per_node="auto")),
    "cdadam_two_level_bf16": Method("CDAdam two-level (bf16 inside nodes, 1-bit between)", "taciturn",
                                    _taciturn("CDAdam", lr=ADAM_LR, ranks_per_node="auto", intra_node_dtype="bf16")),
}
#: the sharded-state methods run by scripts/bench_sharded.py, not by default
SHARDED_METHODS = ("cdadam_sharded", "cdadam_sharded_bf16", "deepspeed_zero2")
#: run by scripts/bench_two_level.py on a two-tier cluster, not by default
TWO_LEVEL_METHODS = ("cdadam_two_level", "cdadam_two_level_bf16")
#: DeepSpeed's other stranded 1-bit types, run with --section bench_step_onebit (their own section)
STRANDED_METHODS = ("zerooneadam", "onebitlamb")
DEFAULT_METHODS = [m for m in METHODS if m not in ("local", "horovod_fp32", *SHARDED_METHODS, *TWO_LEVEL_METHODS,
                                                   *STRANDED_METHODS)]
ONE_BIT = ("cdadam", "onebitadam", "distefsgd", *STRANDED_METHODS)


def parse_size(text: str) -> int:
    """``"25M"`` / ``"110M"`` / ``"300k"`` / ``"2500000"`` -> a parameter count."""
    t = str(text).strip().upper()
    scale = {"K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise ValueError(f"invalid model size {text!r}: write a parameter count like 25M, 110M or 300k") from None
    if value < 1000:
        raise ValueError(f"model size {text!r} is too small: give at least 1k parameters")
    return int(value)


def width_for(params: int) -> int:
    """The width w of 5 x Linear(w, w) closest to ``params`` parameters (5 (w^2 + w))."""
    return max(1, round((math.sqrt(1 + 4 * params / LAYERS) - 1) / 2))


def mlp(width: int) -> torch.nn.Module:
    layers: List[torch.nn.Module] = []
    for i in range(LAYERS):
        layers.append(torch.nn.Linear(width, width))
        if i + 1 < LAYERS:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def ring_bytes(nbytes: float, n: int) -> float:
    """What one rank sends in a ring allreduce of ``nbytes``."""
    return 2 * (n - 1) / n * nbytes


def payload_bytes(name: str, model: torch.nn.Module, n: int, last: Optional[dict], two_way: bool) -> float:
    """Bytes one rank sends per step by the collectives' formulas (headers not included)."""
    numel = sum(p.numel() for p in model.parameters())
    if name == "local":
        return 0.0
    if name in ("ddp_fp32", "horovod_fp32", "deepspeed_zero2"):
        return ring_bytes(4 * numel, n)  # ZeRO-2: reduce-scatter of the gradients + all-gather of the parameters
    if name in ("ddp_fp16", "horovod_fp16"):
        return ring_bytes(2 * numel, n)
    if name == "ddp_powersgd":
        total = 0.0
        for p in model.parameters():
            rows, cols = (p.shape[0], p.numel() // p.shape[0]) if p.dim() > 1 else (0, 0)
            # powerSGD_hook._should_compress with rank 1 and min_compression_rate 2
            compressed = p.dim() > 1 and rows * cols > (rows + cols) * 2
            total += ring_bytes(4 * (rows + cols if compressed else p.numel()), n)
        return total
    # taciturn: all_to_all sends n-1 of the n chunks handed to it, all_gather n-1 of n received
    return (n - 1) / n * (last["bytes_down"] + (last["bytes_up"] if two_way else 0))


# ---------------------------------------------------------------------- inside a rank
_RENDEZVOUS = []


def _init_horovod(rank: int, n: int) -> None:
    """What horovodrun's Gloo launcher does, from inside the ranks (see the module docstring)."""
    import torch.distributed as dist
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    plan = get_host_assignments(parse_hosts(",".join(f"rank{r}:1" for r in range(n))), n)
    port = [0]
    if rank == 0:
        from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

        server = RendezvousHTTPServer(("", 0), RendezvousHandler, 0)
        server.init(plan)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        _RENDEZVOUS.append(server)
        port = [server.server_address[1]]
    dist.broadcast_object_list(port, src=0)
    slot = plan[rank]
    os.environ.update({
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": os.environ["MASTER_ADDR"], "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port[0]),
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_IFACE": os.environ.get("GLOO_SOCKET_IFNAME", "lo"), "HOROVOD_HOSTNAME": slot.hostname,
        "HOROVOD_RANK": str(slot.rank), "HOROVOD_SIZE": str(slot.size), "HOROVOD_LOCAL_RANK": str(slot.local_rank),
        "HOROVOD_LOCAL_SIZE": str(slot.local_size), "HOROVOD_CROSS_RANK": str(slot.cross_rank),
        "HOROVOD_CROSS_SIZE": str(slot.cross_size)})
    import horovod.torch as hvd

    hvd.init()


def link_counters() -> Optional[Tuple[int, int]]:
    """(tx, rx) bytes of this rank's veth; None on loopback (shared with everything else)."""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    if ifname == "lo":
        return None
    base = f"/sys/class/net/{ifname}/statistics"
    with open(f"{base}/tx_bytes") as tx, open(f"{base}/rx_bytes") as rx:
        return int(tx.read()), int(rx.read())


def measure(name: str, base: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, warmup: int,
            steps: int) -> dict:
    """Time ``steps`` steps of method ``name`` (after ``warmup`` untimed ones) on this rank."""
    import torch.distributed as dist
    import torch.nn.functional as F

    method = METHODS[name]
    model = copy.deepcopy(base)
    net, opt = method.build(model)
    stats = getattr(opt, "stats", None)
    warm = warmup + method.warmup
    clock = time.perf_counter
    rows, before = [], None
    backward = net.backward if method.family == "deepspeed" else torch.Tensor.backward
    for i in range(warm + steps):
        if i == warm:
            dist.barrier()
            before = link_counters()
        dist.barrier()
        t0 = clock()
        opt.zero_grad()
        backward(F.cross_entropy(net(x), y))
        t1 = clock()
        opt.step()
        t2 = clock()
        if i >= warm:
            row = {"step": t2 - t0, "fwd_bwd": t1 - t0, "opt": t2 - t1}
            if stats is not None:
                row.update(compress=stats.last["compress_time"], collective=stats.last["collective_time"],
                           bytes_up=stats.last["bytes_up"], bytes_down=stats.last["bytes_down"],
                           bytes_intra=stats.last.get("bytes_intra", 0))
            rows.append(row)
    dist.barrier()
    after = link_counters()
    if stats is not None and stats.skipped_steps:
        raise RuntimeError(f"{name}: {stats.skipped_steps} step(s) skipped on non-finite gradients; the timings "
                           "would not be a step's")
    two_way = all(p.two_way for p in getattr(opt, "pipelines", {}).values())
    n = dist.get_world_size()
    out = {"rows": rows, "numel": sum(p.numel() for p in model.parameters()),
           "payload": payload_bytes(name, model, n, rows[-1] if stats is not None else None, two_way)}
    if before is not None:
        out["tx"], out["rx"] = after[0] - before[0], after[1] - before[1]
    del net, opt, model
    gc.collect()
    return out


def worker(cfg_path: str) -> None:
    import torch.distributed as dist

    cfg = join_cluster(cfg_path)
    rank, n = dist.get_rank(), dist.get_world_size()
    # Horovod's background thread runs once initialised: its methods go last.
    order = [(s, m) for s in cfg["sizes"] for m in cfg["methods"] if METHODS[m].family != "horovod"]
    order += [(s, m) for s in cfg["sizes"] for m in cfg["methods"] if METHODS[m].family == "horovod"]
    bases: Dict[str, torch.nn.Module] = {}
    results: Dict[str, dict] = {}
    horovod_up = False
    for size, name in order:
        width = width_for(parse_size(size))
        if size not in bases:
            torch.manual_seed(0)
            bases[size] = mlp(width)
        gen = torch.Generator().manual_seed(1000 + rank)
        x = torch.randn(BATCH, width, generator=gen)
        y = torch.randint(0, width, (BATCH,), generator=gen)
        if METHODS[name].family == "horovod" and not horovod_up:
            _init_horovod(rank, n)
            horovod_up = True
        res = measure(name, bases[size], x, y, cfg["warmup"], cfg["steps"])
        results[f"{size}/{name}"] = res
        if rank == 0:
            step = statistics.median(r["step"] for r in res["rows"])
            print(f"  {size} {name}: {step:.3f} s/step (rank 0)", file=sys.stderr, flush=True)
    if horovod_up:
        import horovod.torch as hvd

        hvd.shutdown()
        for server in _RENDEZVOUS:
            server.shutdown()
    write_rank_result(cfg["out"], rank, results)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------- the orchestrator
class LoopbackCluster(Cluster):
    """netcluster's loopback fallback, asked for (``--loopback``)."""

    def _unavailable(self):
        return "--loopback given"


def summarize(per_rank: List[dict], size: str, n: int, rate: str, shaped: bool, methods: Sequence[str]) -> List[dict]:
    """One row per method of a cell: the measured medians (``derive`` adds the split and limits)."""
    out = []
    for name in methods:
        key = f"{size}/{name}"
        ranks = [r[key] for r in per_rank]
        steps = len(ranks[0]["rows"])
        med = lambda field: statistics.mean(statistics.median(row[field] for row in r["rows"]) for r in ranks)
        row = {"size": size, "params": ranks[0]["numel"], "n": n, "rate": rate, "shaped": shaped, "method": name,
               "label": METHODS[name].label, "family": METHODS[name].family, "steps": steps,
               "step": statistics.median(max(r["rows"][i]["step"] for r in ranks) for i in range(steps)),
               "fwd_bwd": med("fwd_bwd"), "opt": med("opt"), "payload": max(r["payload"] for r in ranks)}
        if METHODS[name].family == "taciturn":
            row.update(compress=med("compress"), collective=med("collective"), bytes_up=med("bytes_up"),
                       bytes_down=med("bytes_down"), bytes_intra=med("bytes_intra"))
        if shaped:
            row["wire"] = max(max(r["tx"], r["rx"]) for r in ranks) / steps
        out.append(row)
    return derive(out)


def derive(rows: List[dict]) -> List[dict]:
    """Add the split (compute, comm, update), the limit and the ratio to DDP fp32 to measured rows.

    taciturn: its own phases. DDP (its allreduces finish inside ``backward()``): compute = the
    ``local`` fwd+bwd, comm = its fwd+bwd beyond that, update = its own optimizer step. Horovod
    (waits in ``step()``) and DeepSpeed ZeRO (reduce-scatters in ``backward()``, all-gathers in
    ``step()``): compute and update are the ``local`` ones, comm = the rest.
    """
    for cell in {(r["size"], r["n"], r["rate"]) for r in rows}:
        sub = [r for r in rows if (r["size"], r["n"], r["rate"]) == cell]
        local = next(r for r in sub if r["method"] == "local")
        fp32 = next((r for r in sub if r["method"] == "ddp_fp32"), None)
        for row in sub:
            family = row["family"]
            if family == "taciturn":
                row["compute"], row["comm"] = row["fwd_bwd"], row["compress"] + row["collective"]
                row["update"] = row["opt"] - row["comm"]
            elif family == "ddp":
                row["compute"], row["update"] = local["fwd_bwd"], row["opt"]
                row["comm"] = max(0.0, row["fwd_bwd"] - local["fwd_bwd"])
            else:
                row["compute"], row["update"] = local["fwd_bwd"], local["opt"]
                row["comm"] = 0.0 if row is local else max(
                    0.0, row["fwd_bwd"] + row["opt"] - local["fwd_bwd"] - local["opt"])
            row["limit"] = row.get("wire", row["payload"]) * 8 / parse_rate(row["rate"])
            row["vs_fp32"] = row["step"] / fp32["step"] if fp32 else float("nan")
    return rows


def run_cell(n: int, rate: str, sizes: Sequence[str], methods: Sequence[str], args, **cluster) -> List[dict]:
    """Build one cluster (n ranks at ``rate``; ``cluster``: more of ``Cluster``'s options, e.g. a
    two-tier topology), run every size and method in it, tear it down."""
    cls = LoopbackCluster if args.loopback else Cluster
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        cfg = {"sizes": list(sizes), "methods": ["local", *methods], "warmup": args.warmup, "steps": args.steps,
               "timeout": args.timeout, "out": tmp}
        with cls(n, rate, **cluster) as cluster:
            print(f"bench_step: {cluster.describe()}; sizes {', '.join(sizes)}", file=sys.stderr, flush=True)
            run_workers(cluster, __file__, cfg, tmp, args.timeout)
            shaped = cluster.shaped
        per_rank = read_rank_results(tmp, n)
    rows = []
    for size in sizes:
        rows += summarize(per_rank, size, n, rate, shaped, ["local", *methods])
    return rows


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f}" if nbytes < 1e7 else f"{nbytes / 1e6:.1f}"


def _s(seconds: Optional[float]) -> str:
    return "" if seconds is None else f"{seconds:.3f}"


def cell_table(rows: List[dict]) -> str:
    shaped = rows[0]["shaped"]
    headers = ["method", "step s", "vs DDP fp32", "fwd+bwd s", "compress s", "collective / comm s", "update s",
               "wire MB/step" if shaped else "payload MB/step", "limit s", "comm / limit"]
    out = []
    for r in rows:
        if r["family"] == "local":
            out.append([r["label"], _s(r["step"]), f"{r['vs_fp32']:.2f}x", _s(r["compute"]), "", "",
                        _s(r["update"]), "", "", ""])
            continue
        taciturn_row = r["family"] == "taciturn"
        out.append([r["label"], _s(r["step"]), f"{r['vs_fp32']:.2f}x", _s(r["compute"]),
                    _s(r["compress"]) if taciturn_row else "(in comm)",
                    _s(r["collective"] if taciturn_row else r["comm"]), _s(r["update"]),
                    _mb(r.get("wire", r["payload"])), _s(r["limit"]),
                    f"{r['comm'] / r['limit']:.2f}" if r["limit"] > 0 else ""])
    return table(headers, out)


def goals(rows: List[dict]) -> List[str]:
    """The issue's two goals, checked in every shaped 1 Gbit cell that has the rows they need."""
    lines = []
    cells = sorted({(r["size"], r["n"], r["rate"]) for r in rows if r["rate"] == "1gbit" and r["shaped"]},
                   key=lambda c: (parse_size(c[0]), c[1]))
    for size, n, rate in cells:
        cell = {r["method"]: r for r in rows if (r["size"], r["n"], r["rate"]) == (size, n, rate)}
        where = f"{size}, n = {n}, {rate}"
        fp32 = cell.get("ddp_fp32")
        for m in ONE_BIT:
            if fp32 and m in cell and cell[m]["comm"] > 0:
                speed = fp32["comm"] / cell[m]["comm"]
                lines.append(f"- {where}: {METHODS[m].label}: communication phase (compress + collectives) "
                             f"{cell[m]['comm']:.3f} s vs DDP fp32's {fp32['comm']:.3f} s: speed-up **{speed:.1f}x** "
                             f"(goal >= 16x: {'met' if speed >= 16 else 'NOT met'})")
        psgd = cell.get("ddp_powersgd")
        for m in ONE_BIT:
            if psgd and m in cell:
                ok = cell[m]["step"] < psgd["step"]
                lines.append(f"- {where}: {METHODS[m].label}: step {cell[m]['step']:.3f} s vs DDP + PowerSGD "
                             f"{psgd['step']:.3f} s (goal: faster: {'met' if ok else 'NOT met'})")
    return lines


def plot(rows: List[dict], path_rates: str, path_split: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = sorted({(r["size"], r["n"]) for r in rows}, key=lambda g: (parse_size(g[0]), g[1]))
    multi = [g for g in groups if len({r["rate"] for r in rows if (r["size"], r["n"]) == g}) > 1]
    if multi:
        fig, axes = plt.subplots(1, len(multi), figsize=(max(9.0, 5.5 * len(multi)), 5.8), squeeze=False)
        for ax, (size, n) in zip(axes[0], multi):
            sub = [r for r in rows if (r["size"], r["n"]) == (size, n)]
            for name in dict.fromkeys(r["method"] for r in sub):
                pts = sorted(((parse_rate(r["rate"]), r["step"]) for r in sub if r["method"] == name))
                ax.plot([p[0] / 1e9 for p in pts], [p[1] for p in pts], marker="o", label=METHODS[name].label,
                        color=plt.cm.tab20((2 * list(METHODS).index(name)) % 20 + 2 * list(METHODS).index(name) // 20),
                        linestyle="--" if METHODS[name].family != "taciturn" else "-")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("link rate (Gbit/s)")
            ax.set_ylabel("step time (s)")
            ax.set_title(f"{size} parameters, {n} ranks")
            ax.grid(alpha=0.3, which="both")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
        fig.tight_layout(rect=(0, 0.2, 1, 1))
        fig.savefig(path_rates, dpi=110)
        plt.close(fig)
        written.append(path_rates)
    cells = sorted({(r["size"], r["n"], r["rate"]) for r in rows if r["rate"] == "1gbit"},
                   key=lambda c: (parse_size(c[0]), c[1]))
    if cells:
        fig, axes = plt.subplots(1, len(cells), figsize=(6 * len(cells), 4.6), squeeze=False)
        parts = [("compute", "fwd+bwd"), ("compress", "compression"), ("comm", "collective / communication"),
                 ("update", "update")]
        colors = ["#4c72b0", "#dd8452", "#c44e52", "#55a868"]
        for ax, cell in zip(axes[0], cells):
            sub = [r for r in rows if (r["size"], r["n"], r["rate"]) == cell]
            labels = [r["label"] for r in sub]
            left = [0.0] * len(sub)
            for (key, name), color in zip(parts, colors):
                vals = [max(0.0, r["collective"] if key == "comm" and r["family"] == "taciturn" else
                            r.get(key, 0.0) if key != "compress" or r["family"] == "taciturn" else 0.0) for r in sub]
                ax.barh(labels, vals, left=left, color=color, label=name)
                left = [a + b for a, b in zip(left, vals)]
            ax.invert_yaxis()
            ax.set_xlabel("seconds per step")
            ax.set_title(f"{cell[0]} parameters, {cell[1]} ranks, {cell[2]}")
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(alpha=0.3, axis="x")
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        fig.savefig(path_split, dpi=110)
        plt.close(fig)
        written.append(path_split)
    return written


def report(result: dict, images: List[str]) -> str:
    """The BENCHMARKS.md section of a run (``result``: what ``main`` saves as JSON)."""
    rows = result["rows"]
    section = result.get("section", SECTION)
    text = [f"## Step time on a bandwidth-limited cluster (scripts/bench_step.py"
            f"{'' if section == SECTION else ', ' + section})", ""]
    text.append(f"`python scripts/bench_step.py {' '.join(result['argv'])}`".replace(" `", "`"))
    text.append("")
    text.append(
        "Each rank trains an MLP of 5 x Linear(w, w) (w = 2236: 25.0M parameters; w = 4690: 110.0M) on a batch of "
        "8, one torch thread per rank, one network namespace per rank, links shaped with tc tbf in both directions "
        "(scripts/netcluster.py). DDP and Horovod run torch's AMSGrad; PowerSGD is rank 1 with error feedback and "
        "warm start, timed after its 2 allreduce steps, in one DDP bucket. Step: the median over "
        f"{result['steps']} timed steps (after {result['warmup']} untimed) of the slowest rank; vs DDP fp32: its "
        "ratio to "
        "DDP fp32's step. Split: taciturn's optimizers time their phases themselves (compress = the compressed "
        "allreduce except its waits for collectives, collective = those waits: each bucket's collectives travel "
        "while the other buckets are compressed and served, so this is the communication that this work did not "
        "hide); "
        "DDP's allreduces finish inside "
        "`backward()`, so its fwd+bwd is the one of the step without any communication (`local`), comm is its "
        "backward pass beyond that and update its own optimizer step; Horovod waits in `step()`, so its fwd+bwd "
        "and update are `local`'s and comm is the rest (compression of both runs inside comm). Horovod runs its "
        "Gloo controller inside the namespaces: `horovodrun` cannot start ranks in network namespaces, so each "
        "rank does what its Gloo launcher does (rank 0 serves the rendezvous, every rank sets the HOROVOD_* "
        "variables). Wire: bytes per step through the busiest rank's veth, the larger of sent "
        "and received, headers included (payload: the collectives' formulas, on loopback). Limit: wire bytes / "
        "link rate; comm / limit compares the communication phase with it.")
    text.append("")
    cells = sorted({(r["size"], r["n"], r["rate"]) for r in rows}, key=lambda c: (parse_size(c[0]), c[1],
                                                                                     parse_rate(c[2])))
    for cell in cells:
        sub = [r for r in rows if (r["size"], r["n"], r["rate"]) == cell]
        net = f"{cell[2]} links" if sub[0]["shaped"] else f"loopback (NOT shaped; asked for {cell[2]})"
        text += [f"**{cell[0]} parameters ({sub[0]['params']:,}), {cell[1]} ranks, {net}**", "", cell_table(sub), ""]
    lines = goals(rows)
    if lines:
        text += ["Goals of issue 8 at 1 Gbit:", "", *lines, ""]
    peers = ("Peers measured earlier on this machine (FACTS.md; 25M, 2 ranks, 1 Gbit): DDP fp32 1.08 s, fp16 hook "
             "0.63 s, PowerSGD rank 1 0.64 s per step.")
    text += [peers, ""]
    for path in images:
        text += [f"![{os.path.basename(path)}]({rel(path)})", ""]
    text.append(result["note"])
    return "\n".join(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", help="parameter counts, comma-separated (default: the default matrix; e.g. 25M,110M)")
    ap.add_argument("--ranks", help="rank counts, comma-separated (e.g. 2,4)")
    ap.add_argument("--rates", help="link rates in tc syntax, comma-separated (e.g. 100mbit,1gbit,10gbit)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated, from: {', '.join(m for m in METHODS if m != 'local')} (local always runs)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method (default 3)")
    ap.add_argument("--section", default=SECTION,
                    help=f"the section of BENCHMARKS.md and the plots' name prefix (default {SECTION}; another "
                         "name keeps the default matrix's section, e.g. bench_step_onebit)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1; PowerSGD adds 2)")
    add_cluster_options(ap, "bench_step", "a 300k-parameter model, 2 ranks, loopback, 2 timed steps")
    args = ap.parse_args(argv)
    if args.section != SECTION and "--out" not in argv:
        args.out = args.out.replace(f"{SECTION}.json", f"{args.section}.json")
    if args.worker:
        worker(args.worker)
        return 0
    if args.render:
        render(args.render)
        return 0
    args.argv = argv
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS or m == "local"]
    if unknown or not methods:
        ap.error(f"unknown method(s) {unknown}: choose from {', '.join(m for m in METHODS if m != 'local')}")
    if any(METHODS[m].family == "horovod" for m in methods):
        try:
            import horovod.torch  # noqa: F401
        except ImportError as e:
            ap.error(f"Horovod is not importable ({e}): run scripts/install_horovod.sh, or leave the horovod_* "
                     "methods out of --methods")
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1 (OneBitAdam freezes after its first step)")
    if args.quick:
        args.loopback, args.no_write = True, True
        args.steps = min(args.steps, 2)
        args.sizes, args.ranks, args.rates = args.sizes or "300k", args.ranks or "2", args.rates or "1gbit"
    if args.sizes or args.ranks or args.rates:
        sizes = (args.sizes or "25M").split(",")
        ranks = [int(n) for n in (args.ranks or "2").split(",")]
        rates = (args.rates or "1gbit").split(",")
        for s in sizes:
            parse_size(s)
        for r in rates:
            parse_rate(r)
        if any(n < 2 for n in ranks):
            ap.error(f"--ranks {args.ranks}: every rank count must be >= 2")
        cells = [(s, n, r) for n in ranks for r in rates for s in sizes]
    else:
        cells = DEFAULT_CELLS
    started, load_before = time.time(), os.getloadavg()[0]
    rows: List[dict] = []
    grouped: Dict[Tuple[int, str], List[str]] = {}
    for size, n, rate in cells:
        grouped.setdefault((n, rate), []).append(size)
    for (n, rate), sizes in grouped.items():
        cell_rows = run_cell(n, rate, sizes, methods, args)
        for size in sizes:
            sub = [r for r in cell_rows if r["size"] == size]
            print(f"\n{size} parameters ({sub[0]['params']:,}), {n} ranks, "
                  f"{rate if sub[0]['shaped'] else 'loopback (NOT shaped)'}")
            print(cell_table(sub), flush=True)
        rows += cell_rows
    for line in goals(rows):
        print(line)
    result = {"argv": argv, "steps": args.steps, "warmup": args.warmup, "rows": rows, "section": args.section,
              "note": machine_note(started, load_before)}
    return save_and_publish(result, args.out, publish, not args.no_write)


def publish(result: dict) -> None:
    """Write the plots and this script's section of BENCHMARKS.md."""
    section = result.get("section", SECTION)
    images = plot(result["rows"], img_path(f"{section}_rates.png"), img_path(f"{section}_split.png"))
    write_section(section, report(result, images))
    print(f"wrote the {section} section of BENCHMARKS.md and {', '.join(rel(p) for p in images)}")


def render(path: str) -> None:
    """``--render``: the tables, plots and section again from a saved run (no measuring)."""
    with open(path) as f:
        result = json.load(f)
    derive(result["rows"])
    for cell in sorted({(r["size"], r["n"], r["rate"]) for r in result["rows"]},
                       key=lambda c: (parse_size(c[0]), c[1], parse_rate(c[2]))):
        print(f"\n{cell[0]} parameters, {cell[1]} ranks, {cell[2]}")
        print(cell_table([r for r in result["rows"] if (r["size"], r["n"], r["rate"]) == cell]))
    for line in goals(result["rows"]):
        print(line)
    publish(result)


if __name__ == "__main__":
    sys.exit(main())
