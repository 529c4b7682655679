"""One rank of the Trainer tests, launched by ``torchrun --nproc_per_node 2`` from test_transformers.py.

``python _trainer_worker.py OUT plain``: a tiny BERT (built from a config, no download) trained
by ``TaciturnTrainer`` with CD-Adam, then with the Markov DDP hook + CD-Adam's update rule
applied locally, then resumed from a mid-run checkpoint. ``... OUT deepspeed CONFIG``: the
same model through ``TrainingArguments(deepspeed=CONFIG)``. Each rank saves what the test
checks to ``OUT/rank<r>.pt``.
"""
from __future__ import annotations

import os
import sys

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback

import taciturn
from taciturn.integrations.transformers import TaciturnTrainer, training_arguments

STEPS = 6
LR = 1e-3


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


class Toy(torch.utils.data.Dataset):
    """Label = first token mod 3: learnable in a few steps."""

    def __len__(self):
        return 96

    def __getitem__(self, i):
        ids = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": int(ids[0]) % 3}


class GradProbe(TrainerCallback):
    """Records a slice of the gradient the optimizer is about to use."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(model.classifier.weight.grad.reshape(-1)[:16].clone())


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def args_for(out, **kw):
    base = dict(per_device_train_batch_size=8, max_steps=STEPS, learning_rate=LR, logging_steps=1, report_to=[],
                save_strategy="no", max_grad_norm=0.0, lr_scheduler_type="constant", disable_tqdm=True)
    base.update(kw)
    return training_arguments(out, **base)


def run_plain(out):
    results = {}
    probe = GradProbe()
    model = tiny_bert()
    trainer = TaciturnTrainer(model=model, args=args_for(os.path.join(out, "opt")), train_dataset=Toy(),
                              callbacks=[probe], taciturn_optimizer="cdadam", taciturn_kwargs={"block_size": 256})
    trainer.train()
    results["optimizer"] = {"params": flat(model), "log": trainer.state.log_history, "grads": probe.grads,
                            "type": type(trainer.compressed_optimizer).__name__}

    model = tiny_bert()
    local = taciturn.AMSGrad(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, process_group="local")
    trainer = TaciturnTrainer(model=model, args=args_for(os.path.join(out, "hook")), train_dataset=Toy(),
                              optimizers=(local, None), comm_hook="markov_sign", comm_hook_kwargs={"block_size": 256})
    trainer.train()
    results["hook"] = {"params": flat(model), "log": trainer.state.log_history}

    ckpt_dir = os.path.join(out, "ckpt")
    model = tiny_bert()
    trainer = TaciturnTrainer(model=model, args=args_for(ckpt_dir, save_strategy="steps", save_steps=STEPS // 2),
                              train_dataset=Toy(), taciturn_optimizer="cdadam", taciturn_kwargs={"block_size": 256})
    trainer.train()
    mid = os.path.join(ckpt_dir, f"checkpoint-{STEPS // 2}")
    files = sorted(f for f in os.listdir(mid) if f.startswith("taciturn_"))
    model = tiny_bert()
    trainer = TaciturnTrainer(model=model, args=args_for(ckpt_dir), train_dataset=Toy(),
                              taciturn_optimizer="cdadam", taciturn_kwargs={"block_size": 256})
    trainer.train(resume_from_checkpoint=mid)
    results["resumed"] = {"params": flat(model), "files": files}
    return results


def run_deepspeed(out, config):
    # Only fields the JSON leaves open: training_arguments() takes the rest from the JSON.
    def args(folder, **kw):
        return training_arguments(os.path.join(out, folder), deepspeed=config, max_steps=STEPS, logging_steps=1,
                                  report_to=[], disable_tqdm=True, **{"save_strategy": "no", **kw})

    model = tiny_bert()
    start = flat(model).clone()
    trainer = TaciturnTrainer(model=model, args=args("ds"), train_dataset=Toy())
    trainer.train()
    opt = trainer.compressed_optimizer
    result = {"params": flat(model), "start": start, "log": trainer.state.log_history, "type": type(opt).__name__,
              "sharded": opt.sharded, "engine": type(trainer.model_wrapped).__name__,
              "args": {k: getattr(trainer.args, k) for k in ("learning_rate", "adam_beta1", "adam_beta2",
                                                            "per_device_train_batch_size", "max_grad_norm")}}
    # resume from the checkpoint of a run that saved halfway
    model = tiny_bert()
    trainer = TaciturnTrainer(model=model, args=args("ckpt", save_strategy="steps", save_steps=STEPS // 2),
                              train_dataset=Toy())
    trainer.train()
    mid = os.path.join(out, "ckpt", f"checkpoint-{STEPS // 2}")
    model = tiny_bert()
    trainer = TaciturnTrainer(model=model, args=args("ckpt"), train_dataset=Toy())
    trainer.train(resume_from_checkpoint=mid)
    result["resumed"] = flat(model)
    return {"deepspeed": result}


def main():
    out, route = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    results = run_plain(out) if route == "plain" else run_deepspeed(out, sys.argv[3])
    torch.save(results, os.path.join(out, f"rank{int(os.environ['RANK'])}.pt"))
    # the README's advice: a gloo collective the script (here Hugging Face / accelerate) issues last can
    # abort torch at exit; taciturn drains only its own
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
