#!/usr/bin/env python3
"""The main demo: 2 ranks over a simulated 1 Gbit link (scripts/netcluster.py).

Part 1: the two ranks compress and exchange a 25M-element fp32 buffer with ``taciturn.Exchange``
(``block_sign`` with Markov feedback, two-way) and uncompressed (``identity``), and print the
bytes and the time of each direction next to fp32.

Part 2: the same two ranks train an MLP on Fashion-MNIST, each on its own half of the training
set, once with ``taciturn.CDAdam`` (1-bit Markov compression both ways) and once with
``taciturn.AMSGrad`` (the same update rule, fp32 communication), with the same steps, batch and
learning rate. It prints a table (test accuracy, bytes per direction, wall and communication
time, speed-up) and writes a plot of accuracy against bytes sent and against time.

    python3 scripts/demo_fashion.py [--rate 1gbit] [--epochs 2] [--out results/demo]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = {"amsgrad": "AMSGrad (fp32)", "cdadam": "CD-Adam (1-bit)"}


# ---------------------------------------------------------------------- inside a rank
def _link(nbytes: int, n: int) -> int:
    """Bytes that cross one rank's link for ``nbytes`` handed to an all_to_all or all_gather
    (what ``CommStats`` counts): the rank's own chunk stays local."""
    return nbytes * (n - 1) // n


def _link_counters():
    """(tx, rx) bytes of this rank's own interface in its namespace, or None on loopback
    (the host's shared ``lo`` counts every local process)."""
    dev = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    if dev == "lo":
        return None
    base = f"/sys/class/net/{dev}/statistics"
    with open(f"{base}/tx_bytes") as tx, open(f"{base}/rx_bytes") as rx:
        return int(tx.read()), int(rx.read())


def _init():
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    return dist.get_rank(), dist.get_world_size()


def _timed_communicator():
    """The torch.distributed communicator, timing its worker->server (all_to_all) and
    server->worker (all_gather) collectives separately."""
    from taciturn.comm.torch_dist import TorchDistCommunicator

    class Timed(TorchDistCommunicator):
        def __init__(self):
            super().__init__()
            self.times = {"up": 0.0, "down": 0.0}

        def all_to_all(self, chunks):
            t0 = time.perf_counter()
            out = super().all_to_all(chunks)
            self.times["up"] += time.perf_counter() - t0
            return out

        def all_gather(self, t):
            t0 = time.perf_counter()
            out = super().all_gather(t)
            self.times["down"] += time.perf_counter() - t0
            return out

    return Timed()


def rank_exchange(numel: int, repeats: int, block_size: int) -> None:
    """Part 1 on one rank: time ``repeats`` exchanges of a ``numel`` buffer per method."""
    import torch
    import torch.distributed as dist
    import taciturn

    rank, n = _init()
    comm = _timed_communicator()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    rows = []
    ref = x.clone()
    dist.all_reduce(ref)  # warm-up: connections between the ranks
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(ref)
    rows.append({"method": "torch all_reduce, fp32", "bytes_up": _link(4 * numel, n),
                 "bytes_down": _link(4 * numel, n), "time": (time.perf_counter() - t0) / repeats})
    for label, codec, feedback in (("taciturn identity (fp32)", taciturn.make_compressor("identity"), "none"),
                                   (f"taciturn block_sign({block_size}) + Markov",
                                    taciturn.make_compressor("block_sign", block_size=block_size), "markov")):
        fb = taciturn.make_feedback(feedback)
        pipe = taciturn.Exchange([numel], codec, fb, fb, comm, two_way=True)
        states = pipe.init_state()
        pipe.allreduce([x], states)
        stats = taciturn.CommStats()
        comm.times = {"up": 0.0, "down": 0.0}
        dist.barrier()
        t0 = time.perf_counter()
        for step in range(repeats):
            pipe.allreduce([x], states, step=step + 1, stats=stats)
        total = (time.perf_counter() - t0) / repeats
        rows.append({"method": label, "bytes_up": _link(stats.bytes_up // repeats, n),
                     "bytes_down": _link(stats.bytes_down // repeats, n),
                     "time_up": comm.times["up"] / repeats, "time_down": comm.times["down"] / repeats,
                     "compress": stats.compress_time / repeats, "time": total})
    if rank == 0:
        print(json.dumps({"numel": numel, "world_size": n, "rows": rows}), flush=True)
    dist.destroy_process_group()


def _mlp(hidden: int, layers: int):
    import torch.nn as nn

    mods, width = [nn.Flatten()], 784
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*mods, nn.Linear(width, 10))


def rank_train(method: str, args) -> None:
    """Part 2 on one rank: train on this rank's shard of the training set; evaluations (on the
    whole test set, split between the ranks) stay outside the clocks."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from tqdm import tqdm

    import taciturn
    from _datasets import fashion_mnist, shard

    rank, n = _init()
    x_train, y_train = shard(fashion_mnist("train", flatten=True), n, rank)
    x_test, y_test = shard(fashion_mnist("test", flatten=True), n, rank)
    torch.manual_seed(args.seed)
    model = _mlp(args.hidden, args.layers)
    opt_cls = {"cdadam": taciturn.CDAdam, "amsgrad": taciturn.AMSGrad}[method]
    kwargs = {"block_size": args.block_size} if method == "cdadam" else {}
    opt = opt_cls(model.parameters(), lr=args.lr, **kwargs)  # broadcasts rank 0's initial weights
    steps_per_epoch = len(x_train) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    cosine = args.lr_schedule == "cosine"
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps) if cosine else None
    eval_at = set(round(total_steps * k / args.evals) for k in range(1, args.evals + 1))

    def evaluate() -> float:
        """Test accuracy: each rank scores its half of the test set, then the counts are summed."""
        model.eval()
        with torch.no_grad():
            correct = torch.tensor([(model(x_test).argmax(1) == y_test).sum().item(), len(y_test)])
        model.train()
        dist.all_reduce(correct)
        return correct[0].item() / correct[1].item()

    history = [{"step": 0, "accuracy": evaluate(), "time": 0.0, "comm_time": 0.0, "bytes_up": 0, "bytes_down": 0}]
    bar = tqdm(total=total_steps, desc=f"{METHODS[method]:<16}", unit="step", disable=rank != 0, file=sys.stdout,
               dynamic_ncols=True, mininterval=0.5)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    train_time, step = 0.0, 0
    counters = _link_counters()
    for _ in range(args.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if schedule is not None:
                schedule.step()
            train_time += time.perf_counter() - t0
            step += 1
            bar.update()
            if step in eval_at:
                acc = evaluate()
                bar.set_postfix(loss=f"{loss.item():.3f}", test_acc=f"{acc:.3f}")
                history.append({"step": step, "accuracy": acc, "time": train_time,
                                "comm_time": opt.stats.collective_time, "bytes_up": _link(opt.stats.bytes_up, n),
                                "bytes_down": _link(opt.stats.bytes_down, n)})
    bar.close()
    s = opt.stats
    if counters is not None:
        counters = [b - a for a, b in zip(counters, _link_counters())]
    if rank == 0:
        result = {"method": method, "label": METHODS[method], "steps": step, "params": sum(p.numel() for p in
                  model.parameters()), "accuracy": history[-1]["accuracy"], "time": train_time,
                  "comm_time": s.collective_time, "compress_time": s.compress_time,
                  "bytes_up": _link(s.bytes_up, n), "bytes_down": _link(s.bytes_down, n),
                  "fp32_bytes": _link(s.fp32_bytes, n), "link_counters": counters, "history": history}
        with open(os.path.join(args.out, f"{method}.json"), "w") as f:
            json.dump(result, f, indent=1)
    dist.destroy_process_group()


# ---------------------------------------------------------------------- the orchestrator
def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:,.1f} kB"


def _table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def print_exchange(data: dict, net: str) -> None:
    print(f"\n== Part 1: two ranks exchange a {data['numel'] / 1e6:g}M-element fp32 buffer ({net}) ==")
    fp32 = data["rows"][0]
    rows = []
    for r in data["rows"]:
        if "time_up" in r:
            rows.append([r["method"], _mb(r["bytes_up"]), f"{r['time_up']:.3f} s", _mb(r["bytes_down"]),
                         f"{r['time_down']:.3f} s", f"{r['compress']:.3f} s", f"{r['time']:.3f} s",
                         f"{fp32['time'] / r['time']:.1f}x", f"{fp32['bytes_up'] / r['bytes_up']:.1f}x"])
        else:
            rows.append([r["method"], _mb(r["bytes_up"]), "", _mb(r["bytes_down"]), "", "", f"{r['time']:.3f} s",
                         "1.0x", "1.0x"])
    print(_table(["method", "sent (up)", "time up", "received (down)", "time down", "compress", "total",
                  "speed-up", "fewer bytes"], rows))
    print("Per exchange and rank. up = worker->server (all_to_all of chunks), down = server->worker (all_gather); "
          "bytes cross the rank's link (for torch's ring all_reduce: its reduce-scatter and all-gather halves); "
          "speed-up and fewer bytes: against torch's fp32 all_reduce.")


def print_training(results: list, net: str) -> None:
    base = results[0]
    print(f"\nResults: MLP with {base['params'] / 1e6:.2f}M parameters, {base['steps']} steps on each of 2 ranks "
          f"({net})")
    rows = []
    for r in results:
        rows.append([r["label"], f"{100 * r['accuracy']:.2f} %", _mb(r["bytes_up"]), _mb(r["bytes_down"]),
                     f"{r['time']:.1f} s", f"{r['comm_time']:.1f} s", f"{r['compress_time']:.1f} s",
                     f"{base['time'] / r['time']:.2f}x", f"{base['comm_time'] / r['comm_time']:.1f}x"])
    print(_table(["method", "test acc", "sent/rank (up)", "received/rank (down)", "wall time", "comm time",
                  "compression", "speed-up", "comm speed-up"], rows))
    print("bytes: what crossed rank 0's link in each direction; wall time: the training steps on rank 0 "
          "(evaluations excluded); comm time: inside the collectives (waiting for the slower rank included); "
          "compression: encoding, decoding and feedback around them; speed-ups against AMSGrad.")
    for r in results:
        if r.get("link_counters"):
            tx, rx = r["link_counters"]
            print(f"  {r['label']}: rank 0's interface counted {_mb(tx)} out, {_mb(rx)} in during training "
                  "(its up + down traffic, with TCP/IP headers and the evaluations)")


def plot(results: list, path: str, net: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        h = r["history"][1:]  # the evaluations after training started (step 0 sent nothing)
        acc = [100 * p["accuracy"] for p in h]
        ax1.plot([(p["bytes_up"] + p["bytes_down"]) / 1e6 for p in h], acc, marker="o", label=r["label"])
        ax2.plot([p["time"] for p in h], acc, marker="o", label=r["label"])
    ax1.set_xscale("log")
    ax1.set_xlabel("MB over one rank's link, both directions (log)")
    ax2.set_xlabel("training wall time (s)")
    for ax in (ax1, ax2):
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(bottom=max(0, min(100 * p["accuracy"] for r in results for p in r["history"][1:]) - 5))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Fashion-MNIST, 2 ranks, {net}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", default="1gbit", help="link rate of the simulated cluster (tc syntax)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "results", "demo"))
    ap.add_argument("--exchange-numel", type=int, default=25_000_000)
    ap.add_argument("--exchange-repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512, help="MLP width: 784-H-H-10")
    ap.add_argument("--layers", type=int, default=2, help="hidden layers")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="per rank")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--block-size", type=int, default=256,
                    help="block_sign block size of CD-Adam and of part 1 (the preset's default is 1024; 256 keeps "
                         "this short run within about 1 point of AMSGrad, at 28x fewer bytes than fp32 instead of 31x)")
    ap.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                    help="cosine: decay to 0 over the run (same schedule for both methods)")
    ap.add_argument("--evals", type=int, default=8, help="test evaluations per run (plot points)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-exchange", action="store_true")
    ap.add_argument("--role", choices=["exchange", "amsgrad", "cdadam"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.role == "exchange":
        rank_exchange(args.exchange_numel, args.exchange_repeats, args.block_size)
        return 0
    if args.role:
        rank_train(args.role, args)
        return 0

    sys.path.insert(0, HERE)
    from netcluster import Cluster

    os.makedirs(args.out, exist_ok=True)
    me = [sys.executable, os.path.abspath(__file__)]
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k not in ("role", "skip_exchange", "rate")]
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t_start = time.perf_counter()
    with Cluster(2, args.rate) as cluster:
        net = f"simulated {args.rate} links" if cluster.shaped else "loopback, NOT shaped"
        print(f"demo: {cluster.describe()}", flush=True)
        if not args.skip_exchange:
            res = cluster.run(me + passed + ["--role", "exchange"], env=env, capture=True, timeout=600)
            print_exchange(json.loads(res[0].stdout.strip().splitlines()[-1]), net)
        print(f"\n== Part 2: Fashion-MNIST, CD-Adam vs AMSGrad, 2 ranks ({net}): {args.epochs} epochs, batch "
              f"{args.batch_size} per rank, lr {args.lr} ({args.lr_schedule}) ==", flush=True)
        results = []
        for method in METHODS:
            cluster.run(me + passed + ["--role", method], env=env, timeout=1800)
            with open(os.path.join(args.out, f"{method}.json")) as f:
                results.append(json.load(f))
    print_training(results, net)
    png = os.path.join(args.out, "fashion_mnist.png")
    plot(results, png, net)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"network": net, "results": [{k: v for k, v in r.items() if k != "history"} for r in results]},
                  f, indent=1)
    print(f"\nplot: {png}\nresults: {args.out}/ (demo took {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ndemo: interrupted; the ranks were stopped and the network namespaces removed", file=sys.stderr)
        sys.exit(130)
