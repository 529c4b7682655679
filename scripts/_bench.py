"""Helpers shared by the reproduction, memory and soak scripts (scripts/ on ``sys.path``).

``run_ranks(fn, n, *args)``: run ``fn(rank, n, *args)`` on n real gloo ranks (forked, one
torch thread each, a file store in a fresh folder, killed after a timeout) and return every
rank's result. ``write_section(name, text)``: replace this script's own section of
BENCHMARKS.md, between ``<!-- name:start -->`` and ``<!-- name:end -->``, leaving the rest of
the file (other scripts' sections) untouched. ``table(headers, rows)``: a Markdown table.
``train_rank`` / ``train_seeds``: the Fashion-MNIST training loop of the reproductions (one model
per optimizer spec, the same initial model and batches for all).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import sys
import time
from typing import Callable, Sequence

import torch

from _launch import run_ranks  # noqa: F401  (the benchmark scripts use it from here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")
IMG_DIR = os.path.join(ROOT, "docs", "img")
_TITLE = "# taciturn benchmarks\n\nEach section is written by the script it names; rerun the script to refresh it.\n"


def add_cluster_options(ap, name: str, quick: str) -> None:
    """The options of a benchmark that runs its ranks in a shaped cluster (scripts/netcluster.py)
    and writes results/<name>.json, its section of BENCHMARKS.md and its plots."""
    import argparse

    ap.add_argument("--loopback", action="store_true", help="skip the namespaces: unshaped loopback")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {quick}, writes nothing but --out")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", f"{name}.json"), help="results (JSON)")
    ap.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md and docs/img/ alone")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per cluster before every rank is stopped")
    ap.add_argument("--render", metavar="JSON", help="rewrite the section and plots from a saved --out, no runs")
    ap.add_argument("--worker", help=argparse.SUPPRESS)


def run_workers(cluster, script: str, cfg: dict, folder: str, timeout: float, capture: bool = False) -> list:
    """``script --worker`` on every rank of ``cluster`` (each starts with ``join_cluster``), its
    config ``cfg`` written to ``folder``/config.json; one torch thread per rank, unbuffered
    output. The ranks' ``RankResult``s (``capture``: with their stdout and stderr)."""
    path = os.path.join(folder, "config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return cluster.run([sys.executable, os.path.abspath(script), "--worker", path], timeout=timeout, capture=capture,
                       env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def join_cluster(cfg_path: str) -> dict:
    """A ``--worker`` rank's start: its config (the JSON at ``cfg_path``, with ``timeout`` in
    seconds), one torch thread, and the gloo group from the variables its cluster set."""
    from datetime import timedelta

    import torch.distributed as dist

    with open(cfg_path) as f:
        cfg = json.load(f)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=cfg["timeout"]))
    return cfg


def write_rank_result(folder: str, rank: int, result) -> None:
    """A ``--worker`` rank's JSON result, for ``read_rank_results``."""
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def read_rank_results(folder: str, world_size: int) -> list:
    """Every rank's ``write_rank_result``, in rank order."""
    out = []
    for r in range(world_size):
        with open(os.path.join(folder, f"rank{r}.json")) as f:
            out.append(json.load(f))
    return out


def write_reproduction(section: str, title: str, paper: str, ours: str, blocks: Sequence[str], image: tuple,
                       checks: Sequence[str], closing: Sequence[str]) -> None:
    """A paper reproduction's section of BENCHMARKS.md: the paper's own words, what we ran, our
    tables (``blocks``, paragraphs in order), the plot (``image``: alt text, path), the
    agreement checks and the closing paragraphs (the machine note last)."""
    alt, path = image
    lines = [f"## Reproduction: {title}", "", paper, "", ours]
    for block in [*blocks, f"![{alt}]({rel(path)})", "Agreement with the paper:"]:
        lines += ["", block]
    lines += ["", *checks]
    for block in closing:
        lines += ["", block]
    write_section(section, "\n".join(lines))


def save_and_publish(result: dict, out: str, publish: Callable[[dict], None], write: bool) -> int:
    """Save a benchmark's ``result`` as JSON at ``out`` and, when ``write``, ``publish`` it (its
    section of BENCHMARKS.md and its plots); the script's exit status."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"results: {out}")
    if write:
        publish(result)
    return 0


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table (also readable as printed text)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


def machine_note(started: float, load_before: float) -> str:
    """One line on where and how a run was measured (the cores are shared with other work)."""
    load_after = os.getloadavg()[0]
    cores = os.cpu_count()
    shared = max(load_before, load_after) > cores
    return (f"Measured on {cores} CPU cores ({platform.processor() or platform.machine()}), torch "
            f"{torch.__version__}, in {time.time() - started:.0f} s wall time; 1-minute load average "
            f"{load_before:.1f} at the start and {load_after:.1f} at the end"
            + (" (other jobs shared the cores: timings are noisy and slower than on an idle machine; the "
               "numerical results do not depend on the load)." if shared else "."))


def write_section(name: str, text: str, path: str = BENCHMARKS_MD) -> None:
    """Put ``text`` between this section's markers in ``path`` (appended the first time)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    with open(path, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        current = f.read() or _TITLE
        if start in current and end in current:
            head, rest = current.split(start, 1)
            new = head + block + rest.split(end, 1)[1]
        else:
            new = current.rstrip("\n") + "\n\n" + block + "\n"
        f.seek(0)
        f.truncate()
        f.write(new)


def img_path(filename: str) -> str:
    """docs/img/<filename>, creating the folder."""
    os.makedirs(IMG_DIR, exist_ok=True)
    return os.path.join(IMG_DIR, filename)


def rel(path: str) -> str:
    """``path`` relative to the repository root (for links in BENCHMARKS.md)."""
    return os.path.relpath(path, ROOT)


def rss_mb() -> float:
    """This process's current resident set size in MiB (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB since it started or since ``reset_peak_rss()`` (Linux
    VmHWM; unlike ``ru_maxrss`` it does not inherit the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


def reset_peak_rss() -> None:
    """Restart the peak RSS count from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def percent(x: float) -> str:
    return f"{100 * x:.2f}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"



# ----------------------------------------------------------------------------- Fashion-MNIST training

class FlatMLP(torch.nn.Module):
    """An MLP whose weights and biases are views of ONE flat parameter, so a per-tensor
    compressor sees the whole model as one vector (one scale for everything: the papers'
    "non-block" scaled sign). Starts from the same values as ``mlp(seed, widths)``."""

    def __init__(self, seed: int, widths: Sequence[int]):
        super().__init__()
        ref = mlp(seed, widths)
        self.shapes = [p.shape for p in ref.parameters()]
        self.flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in ref.parameters()]))

    def forward(self, x):
        views, offset = [], 0
        for shape in self.shapes:
            n = shape.numel()
            views.append(self.flat[offset:offset + n].view(shape))
            offset += n
        for i in range(0, len(views), 2):
            x = torch.nn.functional.linear(x, views[i], views[i + 1])
            if i + 2 < len(views):
                x = torch.relu(x)
        return x


def mlp(seed: int, widths: Sequence[int] = (784, 256, 128, 10)) -> torch.nn.Module:
    """Linear/ReLU layers of the given widths, initialised from ``seed``."""
    torch.manual_seed(seed)
    layers: list = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        if i + 2 < len(widths):
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def cnn(seed: int, channels: Sequence[int] = (8, 16)) -> torch.nn.Module:
    """A small CNN for 1x28x28 images, initialised from ``seed``: two 5x5 convolutions (padding 2)
    of ``channels``, each followed by ReLU and 2x2 max-pooling, then one linear layer to 10 classes."""
    torch.manual_seed(seed)
    c1, c2 = channels
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, c1, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(c1, c2, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(c2 * 7 * 7, 10))


def train_rank(rank: int, world_size: int, specs: Sequence[dict], steps: int, batch: int, eval_every: int,
               seed: int = 0, widths: Sequence[int] = (784, 256, 128, 10)) -> list:
    """Train one model per spec on this rank's shard of Fashion-MNIST; return the curves.

    A spec is a dict: ``label``, ``optimizer`` (a taciturn registry name), ``kwargs``, and
    optionally ``flat`` (train a ``FlatMLP``) and ``probe`` (called with the local gradients
    before every step on rank 0; its results are returned as ``probes``). Every spec sees the
    same initial model and the same batches. The test accuracy of the synced model is taken
    on rank 0 every ``eval_every`` steps; bytes are this rank's, up + down, cumulative.
    """
    import taciturn
    from _datasets import fashion_mnist, shard

    x, y = shard(fashion_mnist("train", flatten=True), world_size, rank)
    x_test, y_test = fashion_mnist("test", flatten=True)
    out = []
    for spec in specs:
        model = FlatMLP(seed, widths) if spec.get("flat") else mlp(seed, widths)
        opt = taciturn.create_optimizer(spec["optimizer"], model.parameters(), nonfinite="off", **spec["kwargs"])
        gen = torch.Generator().manual_seed(seed * 1000 + rank)
        curve, probes, loss_sum, loss_n = [], [], 0.0, 0
        start = time.perf_counter()
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            if spec.get("probe") is not None and rank == 0:
                probes.append(spec["probe"]([p.grad for p in model.parameters()]))
            opt.step()
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if step % eval_every == 0 or step == steps:
                accuracy = float("nan")
                if rank == 0:
                    synced = opt.synced_weights() if hasattr(opt, "synced_weights") else contextlib.nullcontext()
                    with torch.no_grad(), synced:
                        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
                curve.append(dict(step=step, accuracy=accuracy, loss=loss_sum / loss_n,
                                  bytes=opt.stats.bytes_up + opt.stats.bytes_down,
                                  seconds=time.perf_counter() - start))
                loss_sum, loss_n = 0.0, 0
        out.append(dict(label=spec["label"], curve=curve, probes=probes,
                        numel=sum(p.numel() for p in model.parameters()),
                        fp32_bytes_per_step=2 * 4 * sum(p.numel() for p in model.parameters())))
    return out


def best_accuracy(curve: Sequence[dict]) -> float:
    return max(c["accuracy"] for c in curve)


def train_seeds(world_size: int, specs: Sequence[dict], steps: int, batch: int, eval_every: int, seeds: int,
                timeout: float) -> list:
    """``train_rank`` on ``world_size`` ranks once per seed (model and batches), merged per
    spec: the curve averaged over seeds, ``best`` and ``final`` accuracy per seed, rank 0's probes."""
    per_seed = [run_ranks(train_rank, world_size, specs, steps, batch, eval_every, seed, timeout=timeout)[0]
                for seed in range(seeds)]
    merged = []
    for i, first in enumerate(per_seed[0]):
        runs = [seed_runs[i] for seed_runs in per_seed]
        curve = [{k: sum(r["curve"][j][k] for r in runs) / len(runs) for k in ("step", "accuracy", "loss", "bytes")}
                 for j in range(len(first["curve"]))]
        merged.append(dict(first, curve=curve, best=[best_accuracy(r["curve"]) for r in runs],
                           final=[r["curve"][-1]["accuracy"] for r in runs]))
    return merged


def mean_std(values: Sequence[float], scale: float = 100.0) -> str:
    """``mean ± std`` (sample std) of ``values`` times ``scale``; just the value for one."""
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{scale * m:.2f}"
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{scale * m:.2f} ± {scale * sd:.2f}"


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def accuracy_table(runs: Sequence[dict], steps: int) -> str:
    """One row per merged ``train_seeds`` result: wire cost and test accuracy along the run."""
    mid = len(runs[0]["curve"]) // 2 - 1
    seeds = len(runs[0]["best"])
    over = f" (mean ± std, {seeds} seeds)" if seeds > 1 else ""
    rows = []
    for r in runs:
        c = r["curve"]
        per_step = c[-1]["bytes"] / steps
        rows.append([r["label"], f"{per_step * 8 / r['numel']:.3f}", f"{r['fp32_bytes_per_step'] / per_step:.1f}x",
                     f"{100 * c[mid]['accuracy']:.2f}", mean_std(r["final"]), mean_std(r["best"]),
                     f"{c[-1]['loss']:.3f}"])
    return table(["method", "bits/param/step (up+down)", "fewer bytes than fp32",
                  f"test acc % at step {int(runs[0]['curve'][mid]['step'])} (mean)",
                  f"test acc % at step {steps}{over}",
                  f"best test acc %{over}", "train loss (last interval, mean)"], rows)


def plot_accuracy(runs: Sequence[dict], path: str, title: str, extra: Callable = None) -> None:
    """Test accuracy against steps and against bytes; ``extra(ax)`` draws a third panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if extra else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8))
    for r in runs:
        steps = [c["step"] for c in r["curve"]]
        acc = [100 * c["accuracy"] for c in r["curve"]]
        axes[0].plot(steps, acc, marker=".", label=r["label"])
        axes[1].plot([c["bytes"] / 2 ** 20 for c in r["curve"]], acc, marker=".", label=r["label"])
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("MiB communicated per rank (up + down)")
    axes[1].set_xscale("log")
    for ax in axes[:2]:
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if extra:
        extra(axes[2])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
