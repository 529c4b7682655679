"""DeepSpeed integration (taciturn.integrations.deepspeed): real 2-rank engines on gloo/CPU.

The scenarios live in ds_train.py; one torchrun job runs them all (DeepSpeed's import and
first engine cost ~10 s per process, every later engine ~20 ms) and each test reads what its
scenario measured on both ranks. A second job runs a few under DeepSpeed 0.16.9 (a venv made
by scripts/install_deepspeed.sh).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pytest

deepspeed = pytest.importorskip("deepspeed")

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "ds_train.py")
CONFIGS = sorted(f for f in os.listdir(os.path.join(HERE, "..", "..", "configs")) if f.endswith(".json"))
CHECKPOINTED = ["cdadam.json", "onebit_adam_cdadam_warmup.json", "onebit_adam.json", "dist_ef_blocksgdm.json",
                "saef.json", "cdadam_zero2.json", "cdadam_zero1_bf16_downlink.json", "zero_one_adam.json"]
ZERO = ["1", "2", "2-bf16", "2-fp16"]
# pipeline engines last (they leave their topology in DeepSpeed's global groups); MPI just before
PRECISIONS = ["fp32", "fp16", "bf16"]
# DeepSpeed's own 1-bit Adam tests (v0.19.5), run with taciturn's OneBitAdam
UPSTREAM_ONEBIT = ([f"onebit_basic:{p}" for p in PRECISIONS] + ["onebit_mask:fp16", "onebit_checkpoint:fp16",
                                                                 "onebit_overflow:fp16"])
# and its 0/1 Adam tests, with taciturn's ZeroOneAdam
UPSTREAM_ZOADAM = ([f"zoadam_basic:{p}" for p in PRECISIONS] + ["zoadam_mask:fp16", "zoadam_checkpoint:fp16",
                                                                 "zoadam_overflow:fp16"])
# and its 1-bit LAMB tests, with taciturn's OneBitLamb
UPSTREAM_LAMB = ([f"lamb_basic:{p}" for p in PRECISIONS] + ["lamb_checkpoint:fp16", "lamb_empty:fp16",
                                                             "lamb_overflow:fp16"])
SCENARIOS = (["version", "bytes", "bytes_sparsams", "grad_accum", "clipping", "bf16", "fp16", "onebit_stranded",
              "monitor", "refusals", "zero0", "client"] + [f"train:{c}" for c in CONFIGS]
             + [f"zero:{z}" for z in ZERO]
             + [f"checkpoint:{c}" for c in CHECKPOINTED] + UPSTREAM_ONEBIT + UPSTREAM_ZOADAM + UPSTREAM_LAMB
             + ["mpi_backend", "pipeline_1x2", "pipeline_onebit_fp16", "pipeline_bf16", "pipeline_2x1"])
LEGACY_SCENARIOS = ["version", "train:cdadam.json", "train:onebit_adam.json", "bytes", "refusals",
                    "checkpoint:cdadam.json", "onebit_basic:fp16", "onebit_mask:fp16", "onebit_checkpoint:fp16",
                    "zero:2", "checkpoint:cdadam_zero2.json", "zoadam_basic:fp16", "checkpoint:zero_one_adam.json",
                    "lamb_basic:fp16"]
LEGACY_VENV = os.environ.get("TACITURN_DS_LEGACY_VENV",
                             os.path.expanduser("~/.cache/taciturn/venv-deepspeed-0.16.9"))
GRADIENT_FLOOR = 16  # bytes of the smallest gradient (a 4-element bias); every scalar sync is smaller


def launch(python: str, scenarios, out: str, timeout: float = 420.0, **env) -> dict:
    """Run the scenarios on 2 ranks; {scenario: [rank 0 result, rank 1 result]}."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env}
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", RUNNER, "--out", out,
           *scenarios]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks
        stdout, stderr = proc.communicate()
        pytest.fail(f"the DeepSpeed scenarios did not finish within {timeout:.0f} s:\n{stderr[-6000:]}")
    results = {}
    for name in scenarios:
        files = [os.path.join(out, f"{name.replace(':', '_')}.rank{r}.json") for r in range(2)]
        if not all(os.path.exists(f) for f in files):
            pytest.fail(f"scenario {name} left no result (exit {proc.returncode}):\n{stdout[-3000:]}\n"
                        f"{stderr[-6000:]}")
        results[name] = [json.load(open(f)) for f in files]
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return launch(sys.executable, SCENARIOS, str(tmp_path_factory.mktemp("ds")))


def result(runs, name):
    """Both ranks' results of ``name``, failing with the rank's traceback if it raised."""
    out = runs[name]
    for rank, r in enumerate(out):
        if "error" in r:
            pytest.fail(f"scenario {name} raised on rank {rank}:\n{r['error']}")
    return out


# torch >= 2.13 names it all_gather_single; older releases all_gather_into_tensor
ALL_GATHERS = ("all_gather_into_tensor", "all_gather_single")


def collective_bytes(calls):
    """(all_to_all input bytes, all_gather input bytes, all_gather output bytes, all_reduce sizes)."""
    a2a = sum(c["tensors"][1][1] for c in calls if c["op"] == "all_to_all_single")
    ag_in = sum(c["tensors"][1][1] for c in calls if c["op"] in ALL_GATHERS)
    ag_out = sum(c["tensors"][0][1] for c in calls if c["op"] in ALL_GATHERS)
    reduces = [c["tensors"][0][1] for c in calls if c["op"] == "all_reduce"]
    return a2a, ag_in, ag_out, reduces


def assert_falls(r, factor=0.9):
    assert r["last"] < factor * r["first"], f"loss did not fall: {r['losses']}"


# ---------------------------------------------------------------------------- in-process
def test_register_is_idempotent_and_version_checked(monkeypatch):
    import taciturn.integrations.deepspeed as tds
    from deepspeed.runtime.engine import DeepSpeedEngine

    patched = DeepSpeedEngine._configure_optimizer
    tds.register()
    assert tds.is_registered() and DeepSpeedEngine._configure_optimizer is patched
    for version in ("0.15.4", "0.20.0"):
        monkeypatch.setattr(deepspeed, "__version__", version)
        with pytest.raises(RuntimeError, match=r"0\.16\.x to 0\.19\.x.*found " + version.replace(".", r"\.")):
            tds.check_version()


# ---------------------------------------------------------------------------- 0.19 engines
@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_trains(runs, config):
    for r in result(runs, f"train:{config}"):
        assert_falls(r)
        assert r["backward_allreduce"] is False
        assert r["global_samples"] == 60 * r["train_batch_size"] == 60 * 16 * 2
        assert max(r["bytes_up"][-5:]) < r["fp32_bytes"] / 8, "the steps after any warm-up must be compressed"


def test_lr_schedulers_drive_the_optimizer(runs):
    warmup = result(runs, "train:cdadam.json")[0]["lrs"]  # WarmupLR: 0 -> 1e-3 over 5 steps, then flat
    assert [opt for opt, engine in warmup] == [engine for opt, engine in warmup]
    assert [round(lr, 6) for lr, _ in warmup[:7]] == [0.0, 0.0002, 0.0004, 0.0006, 0.0008, 0.001, 0.001]
    decay = [lr for lr, _ in result(runs, "train:dist_ef_blocksgdm.json")[0]["lrs"]]  # WarmupDecayLR
    assert decay[5] == pytest.approx(0.1, rel=1e-3) and decay[5] > decay[10] > decay[59] > 0


def test_one_step_sends_only_the_compressed_payloads(runs):
    for r in result(runs, "bytes"):
        tac, ds = r["taciturn"], r["adamw"]
        wire = tac["wire"]["grad"]
        a2a, _, ag_out, reduces = collective_bytes(tac["calls"])
        assert (a2a, ag_out) == (wire["up"], wire["down"]) == (tac["metrics"]["taciturn/bytes_up"],
                                                                tac["metrics"]["taciturn/bytes_down"])
        assert wire["up"] < wire["fp32"] / 15
        assert all(b < GRADIENT_FLOOR for b in reduces), f"a gradient-sized allreduce slipped in: {tac['calls']}"
        # the control: DeepSpeed's own optimizer allreduces the fp32 gradient, and the log sees it
        _, _, _, ds_reduces = collective_bytes(ds["calls"])
        assert 4 * ds["numel"] in ds_reduces


def test_one_way_sparse_config_sends_only_topk(runs):
    for r in result(runs, "bytes_sparsams"):
        tac = r["taciturn"]
        wire = tac["wire"]["grad"]
        a2a, ag_in, ag_out, reduces = collective_bytes(tac["calls"])
        assert (a2a, ag_in, ag_out) == (0, wire["up"], wire["down"])
        assert all(b < GRADIENT_FLOOR for b in reduces)


def test_gradient_accumulation_communicates_once_per_step(runs):
    for r in result(runs, "grad_accum"):
        ops = [c["op"] for c in r["calls"] if c["op"] in ("all_to_all_single",) + ALL_GATHERS]
        assert len(ops) == 2 and ops[0] == "all_to_all_single" and ops[1] in ALL_GATHERS  # 3 micro batches, one exchange
        a2a, _, ag_out, reduces = collective_bytes(r["calls"])
        assert (a2a, ag_out) == (r["wire"]["up"], r["wire"]["down"])
        assert all(b < GRADIENT_FLOOR for b in reduces)
        assert r["train_batch_size"] == 4 * 3 * 2
        assert r["global_steps"] == r["taciturn_steps"] == 20
        assert r["global_samples"] == 20 * 24
        assert_falls(r)


def test_gradient_clipping_clips_the_local_gradient(runs):
    ranks = result(runs, "clipping")
    clip = ranks[0]["clip"]
    for t in range(3):
        raw = [r["raw_norms"][t] for r in ranks]
        # fp32: DeepSpeed averages the local norms over the data-parallel ranks and applies one
        # coefficient to each rank's own (pre-compression) gradient
        coef = min(1.0, clip / (sum(raw) / len(raw) + 1e-6))
        assert coef < 1.0
        for r in ranks:
            assert r["clipped_norms"][t] == pytest.approx(r["raw_norms"][t] * coef, rel=1e-4)
        assert raw[0] != raw[1]


def test_bf16_trains_and_an_overflow_skips_every_rank_without_touching_state(runs):
    for r in result(runs, "bf16"):
        assert (r["wrapper"], r["param_dtype"], r["optimizer_param_dtype"]) == (
            "FP16_UnfusedOptimizer", "torch.bfloat16", "torch.float32")
        assert r["skipped_steps"] == 1  # rank 0 had finite gradients: DeepSpeed's check agreed over ranks
        assert r["state_unchanged"] and r["params_unchanged"]
        assert r["taciturn_step_before"] == r["taciturn_step_after"]
        assert_falls(r)


def test_fp16_dynamic_loss_scaling_skips_an_overflow_on_every_rank(runs):
    # DeepSpeed refuses fp16 on this CPU (no mkldnn fp16); the scenario overrides that check only
    for r in result(runs, "fp16"):
        assert (r["wrapper"], r["param_dtype"]) == ("FP16_UnfusedOptimizer", "torch.float16")
        assert r["skipped_steps"] == 1 and r["loss_scale_after"] == r["loss_scale_before"] / 2
        assert r["state_unchanged"] and r["params_unchanged"]
        assert r["taciturn_step_before"] == r["taciturn_step_after"]
        assert_falls(r)


def test_stranded_onebit_adam_config(runs):
    for rank, r in enumerate(result(runs, "onebit_stranded")):
        # "nccl" on a gloo job: mapped, logged once by rank 0, naming the backend and the config key
        assert r["nccl_warnings"] == [] and len(r["nccl_logs"]) == (rank == 0)
        assert all("runs gloo" in m and "optimizer.params.comm_backend_name" in m for m in r["nccl_logs"])
        fp32 = 4 * r["numel"]
        assert min(r["bytes_up"][:10]) >= fp32  # uncompressed warm-up ("adam")
        assert max(r["bytes_up"][10:]) < fp32 / 8  # freeze_step lowered live from 1000 to 10
        assert r["freeze_step"] == 10
        assert r["masked_rows_unchanged"] and r["other_rows_changed"]  # exp_avg_mask after the freeze
        assert_falls(r)


def test_metrics_reach_the_csv_monitor(runs):
    r = result(runs, "monitor")[0]
    def read(name):
        with open(os.path.join(r["dir"], f"Train_Samples_{name}.csv")) as f:
            return [row for row in csv.reader(f)][1:]
    up, down, ctime = read("taciturn_bytes_up"), read("taciturn_bytes_down"), read("taciturn_compress_time")
    assert [int(float(v)) for _, v in up] == [r["wire"]["up"]] * 4
    assert [int(float(v)) for _, v in down] == [r["wire"]["down"]] * 4
    assert all(float(v) > 0 for _, v in ctime)
    assert [s for s, _ in up] == [s for s, _ in read("lr")] == [str(r["train_batch_size"] * k) for k in range(1, 5)]


def test_refusals_name_the_fix(runs):
    for r in result(runs, "refusals"):
        assert "ZeRO stage 3" in r["zero3"] and '"stage": 2} (or 1)' in r["zero3"]
        assert "does not offload (offload_optimizer" in r["offload"] and "Remove the offload section" in r["offload"]
        assert "OneBitAdam: shard_state=True is not available: 1-bit Adam averages the momentum" in r["onebit_zero1"]
        assert "ZeRO stage 1" in r["onebit_zero1"] and '"stage": 0} for OneBitAdam' in r["onebit_zero1"]
        assert '"shard_state": false' in r["unsharded_zero2"] and "partitions the optimizer state" in r["unsharded_zero2"]
        assert "'CDAdma'" in r["unknown_type"] and "Did you mean 'CDAdam'" in r["unknown_type"]
        assert "valid names" in r["unknown_type"] and "OneBitAdam" in r["unknown_type"]
        assert "'betass' (did you mean 'betas'?)" in r["misspelled_param"]
        assert "valid parameters" in r["misspelled_param"]
        assert "process_group" in r["engine_group"] and "data-parallel group" in r["engine_group"]


def test_mpi_backend_outside_mpirun_is_refused(runs):
    for r in result(runs, "mpi_backend"):
        assert "OneBitAdam communicates over 1 rank(s) (MPICommunicator)" in r["refused"]
        assert "data-parallel group has 2" in r["refused"] and "mpirun" in r["refused"]


def test_zero_stage_0_trains(runs):
    for r in result(runs, "zero0"):
        assert r["optimizer"] == "CDAdam"
        assert_falls(r)


def test_optimizer_object_gets_the_same_handshake(runs):
    for r in result(runs, "client"):
        assert r["backward_allreduce"] is False
        a2a, _, ag_out, reduces = collective_bytes(r["calls"])
        assert (a2a, ag_out) == (r["wire"]["up"], r["wire"]["down"])
        assert all(b < GRADIENT_FLOOR for b in reduces)
        assert_falls(r)
        assert "name it in the JSON config" in r["bf16"]


@pytest.mark.parametrize("layout", ["pipeline_1x2", "pipeline_2x1", "pipeline_onebit_fp16"])
def test_pipeline_engine_uses_the_data_parallel_group(runs, layout):
    """pipeline_onebit_fp16 mirrors DeepSpeed's TestOneBitAdamFP16Pipeline (compressed from step 2)."""
    for r in result(runs, layout):
        assert r["pipeline_allreduce"] is False
        assert r["comm_size"] == r["dp_size"] == (1 if layout == "pipeline_2x1" else 2)
        a2a, _, ag_out, reduces = collective_bytes(r["calls"])
        assert (a2a, ag_out) == (r["wire"]["up"], r["wire"]["down"])
        assert all(b < GRADIENT_FLOOR for b in reduces)
        assert_falls(r)


def test_bf16_pipeline_engine_runs_sharded_state(runs):
    """DeepSpeed builds its BF16_Optimizer (ZeRO-1-like partitions) for bf16 pipelines; taciturn
    runs its own sharded state inside the whole-weight bf16 wrapper instead."""
    for r in result(runs, "pipeline_bf16"):
        assert r["sharded"] and r["wrapper"] != "BF16_Optimizer"
        a2a, _, ag_out, reduces = collective_bytes(r["calls"])
        assert (a2a, ag_out) == (r["wire"]["up"], r["wire"]["down"])
        assert_falls(r)


@pytest.mark.parametrize("zero", ZERO)
def test_zero_stages_1_and_2_run_sharded_state(runs, zero):
    ranks = result(runs, f"zero:{zero}")
    for r in ranks:
        assert r["sharded"] and r["asked_stage"] == int(zero[0]) and r["engine_stage"] == 0
        assert r["backward_allreduce"] is False
        a2a, _, ag_out, reduces = collective_bytes(r["calls"])
        assert (a2a, ag_out) == (r["wire"]["up"], r["wire"]["down"])  # 1-bit both ways, nothing else
        assert all(b < GRADIENT_FLOOR for b in reduces)
        assert r["wire"]["fp32"] / r["wire"]["down"] > 8  # tiny model: per-block scales and padding weigh in
        # h whole; H, m, v, v^, e on the rank's chunk (about half; DeepSpeed's wrapper holds fp16/bf16 masters)
        assert r["state_bytes"] == pytest.approx(r["formula"]) and r["state_bytes"] < 24
        assert_falls(r)
        if "-" in zero:
            assert r["skipped_untouched"] and r["steps_after_overflow"] == 0
    assert ranks[0]["params"] == ranks[1]["params"]


# ---------------------------------------------------------------------------- DeepSpeed's 1-bit Adam tests
def check_onebit_basic(r, precision):
    assert r["finite"] and r["frozen"] and r["global_steps"] == 25
    assert r["taciturn_steps"] == len(r["sent"]) == 25 - r["skipped_steps"]  # fp16 skips its first overflows
    assert r["param_dtype"] == {"fp32": "torch.float32", "fp16": "torch.float16", "bf16": "torch.bfloat16"}[precision]
    warmup, compressed = [b for t, b in r["sent"] if t < 2], [b for t, b in r["sent"] if t >= 2]  # freeze_step 2
    assert len(warmup) == 2 and min(warmup) >= r["fp32_bytes"]
    assert max(compressed) < r["fp32_bytes"] / 8
    assert r["last"] < r["first"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_upstream_onebit_adam_basic(runs, precision):
    """DeepSpeed's TestOneBitAdamBasic (fp32, fp16), plus bf16."""
    for r in result(runs, f"onebit_basic:{precision}"):
        check_onebit_basic(r, precision)


def check_onebit_mask(r):
    assert r["finite"] and r["frozen"]
    assert r["masked_exp_avg_zero"] and r["kept_row_moves"]
    assert r["upstream_state_loop"]  # TestOneBitAdamExpAvgMask reads v["exp_avg"] of every optimizer.state value


def test_upstream_onebit_adam_flat_exp_avg_mask(runs):
    """DeepSpeed's TestOneBitAdamExpAvgMask: torch.flatten(mask) for a one-weight group, fp16."""
    for r in result(runs, "onebit_mask:fp16"):
        check_onebit_mask(r)


def check_onebit_checkpoint(r):
    assert r["saved_frozen"] and r["mask_kept_after_save"]
    assert r["mask_running_after_load"] and r["resumed_frozen"] and r["resumed_step"] == r["saved_step"]
    assert r["third_frozen_before_load"]
    # the running freeze_step (20) wins over the checkpoint's (2): the saved step is back in warm-up
    assert r["third_freeze_step"] == 20 and not r["third_frozen_after_load"] and not r["third_mask"]
    warmup = [b for t, b in r["sent_after_load"] if t < 20]
    compressed = [b for t, b in r["sent_after_load"] if t >= 20]
    assert warmup and min(warmup) >= r["fp32_bytes"]  # uncompressed again until step 20
    assert compressed and max(compressed) < r["fp32_bytes"] / 8  # frozen again at step 20
    assert r["finite"]


def test_upstream_onebit_adam_checkpointing(runs):
    """DeepSpeed's TestOneBitAdamCheckpointing: the running script's mask and freeze_step win."""
    for r in result(runs, "onebit_checkpoint:fp16"):
        check_onebit_checkpoint(r)


def test_upstream_onebit_adam_overflow(runs):
    """DeepSpeed's TestOneBitAdamCheckpointing.test_overflow: overflows on rank 0 after the
    freeze skip the step on every rank, untouched; a checkpoint after every step loads back."""
    for r in result(runs, "onebit_overflow:fp16"):
        assert r["injected_skipped_untouched"] == [True] * 3 and r["taciturn_steps"] == 12 - r["skipped_steps"]
        assert r["frozen"] and r["resumed_state_equal"] and r["finite"]


# ---------------------------------------------------------------------------- DeepSpeed's 0/1 Adam tests
def check_zoadam_basic(ranks, precision):
    """var_freeze_step 4, var_update_scaler 1: fp32 on steps 1 and 3 (DeepSpeed's s = 2, 4), 1-bit
    on 2 and 4; then local steps, synchronising every other step (local_step_clipper 2)."""
    for r in ranks:
        assert r["finite"] and r["frozen"] and r["global_steps"] == 25 and r["last"] < r["first"]
        assert r["taciturn_steps"] == len(r["sent"]) == 25 - r["skipped_steps"]
        assert r["param_dtype"] == {"fp32": "torch.float32", "fp16": "torch.float16", "bf16": "torch.bfloat16"}[precision]
        sent = dict(r["sent"])
        assert sent[0] >= r["fp32_bytes"] and sent[2] >= r["fp32_bytes"]
        assert 0 < sent[1] < r["fp32_bytes"] / 8 and 0 < sent[3] < r["fp32_bytes"] / 8
        local = [b for t, b in r["sent"] if t >= 4]
        assert max(local) < r["fp32_bytes"] / 8 and local.count(0) >= len(local) // 2 - 1 and max(local) > 0
    assert ranks[0]["synced"] == ranks[1]["synced"]  # x_sync: identical on every rank after every step


@pytest.mark.parametrize("precision", PRECISIONS)
def test_upstream_zero_one_adam_basic(runs, precision):
    """DeepSpeed's TestZeroOneAdamBasic (fp32, fp16), plus bf16."""
    check_zoadam_basic(result(runs, f"zoadam_basic:{precision}"), precision)


def test_upstream_zero_one_adam_flat_exp_avg_mask(runs):
    """DeepSpeed's TestZeroOneAdamExpAvgMask: torch.flatten(mask) for a one-weight group, fp16."""
    for r in result(runs, "zoadam_mask:fp16"):
        assert r["finite"] and r["frozen"] and r["upstream_state_loop"]
        assert len(r["masked_after_sync"]) >= 5 and all(r["masked_after_sync"])
        assert r["masked_weights_fixed"]


def test_upstream_zero_one_adam_checkpointing(runs):
    """DeepSpeed's TestZeroOneAdamCheckpointing: the running script's mask wins, no error buffers
    of DeepSpeed's in the state, the resumed job trains on with x_sync identical on the ranks."""
    ranks = result(runs, "zoadam_checkpoint:fp16")
    for r in ranks:
        assert r["mask_kept_after_save"] and r["mask_running_after_load"] and not r["third_mask"]
        assert r["resumed_step"] == r["third_step"] == r["saved_step"] and r["saved_frozen"] and r["resumed_frozen"]
        assert r["second_clean"] and r["third_clean"] and r["finite"]
        assert max(b for _, b in r["sent_after_load"]) < r["fp32_bytes"] / 8
    assert ranks[0]["synced"] == ranks[1]["synced"]


def test_upstream_zero_one_adam_overflow(runs):
    """DeepSpeed's TestZeroOneAdamCheckpointing.test_overflow: overflows on rank 0 in the
    local-step phase skip the step on every rank, untouched; the every-step checkpoint loads."""
    for r in result(runs, "zoadam_overflow:fp16"):
        assert r["injected_skipped_untouched"] == [True] * 3 and r["taciturn_steps"] == 12 - r["skipped_steps"]
        assert r["frozen"] and r["resumed_state_equal"] and r["finite"]


# ---------------------------------------------------------------------------- DeepSpeed's 1-bit LAMB tests
@pytest.mark.parametrize("precision", PRECISIONS)
def test_upstream_onebit_lamb_basic(runs, precision):
    """DeepSpeed's TestOneBitLambBasic (fp32, fp16), plus bf16: fp32 during the 2 warm-up steps,
    1-bit after; parameters identical on the ranks."""
    ranks = result(runs, f"lamb_basic:{precision}")
    for r in ranks:
        check_onebit_basic(r, precision)
    assert ranks[0]["synced"] == ranks[1]["synced"]


def test_upstream_onebit_lamb_checkpointing(runs):
    """DeepSpeed's TestOneBitLambCheckpointing: scaling_coeff in every state value after the
    freeze and loaded back; the running mask wins; resumed before the new freeze_step (20), the
    job is back in warm-up with lamb_coeff_freeze 0, last_factor 1, no scaling_coeff."""
    for r in result(runs, "lamb_checkpoint:fp16"):
        assert r["saved_frozen"] and r["saved_coeffs"] and r["coeffs_loaded"] and r["resumed_frozen"]
        assert r["mask_running_after_load"] and not r["third_mask"]
        assert r["third_frozen_before_load"] and not r["third_frozen"] and r["third_reset"]
        warmup = [b for t, b in r["sent_after_load"] if t < 20]
        compressed = [b for t, b in r["sent_after_load"] if t >= 20]
        assert warmup and min(warmup) >= r["fp32_bytes"] and compressed and max(compressed) < r["fp32_bytes"] / 8
        assert r["finite"]


def test_upstream_onebit_lamb_empty_parameters(runs):
    """DeepSpeed's TestOneBitLambEmptyParameters: a 0-element parameter trains with no NaN."""
    for r in result(runs, "lamb_empty:fp16"):
        assert r["finite"] and r["state_finite"] and r["frozen"] and r["last"] < r["first"]


def test_upstream_onebit_lamb_overflow(runs):
    """DeepSpeed's TestOneBitLambCheckpointing.test_overflow."""
    for r in result(runs, "lamb_overflow:fp16"):
        assert r["injected_skipped_untouched"] == [True] * 3 and r["taciturn_steps"] == 12 - r["skipped_steps"]
        assert r["frozen"] and r["resumed_state_equal"] and r["finite"]


@pytest.mark.parametrize("config", CHECKPOINTED)
def test_checkpoint_resumes_bit_identically(runs, config):
    for rank, r in enumerate(result(runs, f"checkpoint:{config}")):
        assert r["loaded"] is not None
        assert r["files"] == ["taciturn_rank00000.pt", "taciturn_rank00001.pt"]
        assert r["resumed"] == r["full"], f"rank {rank}: the resumed run diverged"
        assert r["params_equal"] and r["state_equal"]


# ---------------------------------------------------------------------------- DeepSpeed 0.16
@pytest.fixture(scope="module")
def legacy_runs(tmp_path_factory):
    python = os.path.join(LEGACY_VENV, "bin", "python")
    if not os.path.exists(python):
        pytest.skip(f"no DeepSpeed 0.16.9 venv at {LEGACY_VENV}: run scripts/install_deepspeed.sh")
    # its own op cache: 0.16 and 0.19 name their shm op alike, and a shared cache rebuilds it each time
    return launch(python, LEGACY_SCENARIOS, str(tmp_path_factory.mktemp("ds016")),
                  TORCH_EXTENSIONS_DIR=os.path.join(LEGACY_VENV, "torch_extensions"))


def test_deepspeed_016(legacy_runs):
    assert result(legacy_runs, "version")[0]["deepspeed"] == "0.16.9"
    for name in ("train:cdadam.json", "train:onebit_adam.json"):
        for r in result(legacy_runs, name):
            assert_falls(r)
            assert r["backward_allreduce"] is False
    for r in result(legacy_runs, "bytes"):
        a2a, _, ag_out, reduces = collective_bytes(r["taciturn"]["calls"])
        assert (a2a, ag_out) == (r["taciturn"]["wire"]["grad"]["up"], r["taciturn"]["wire"]["grad"]["down"])
        assert all(b < GRADIENT_FLOOR for b in reduces)
    for r in result(legacy_runs, "refusals"):
        assert "ZeRO stage 3" in r["zero3"] and "Did you mean 'CDAdam'" in r["unknown_type"]
        # 0.16 has no whole-weight bf16 wrapper: refused naming the cause and the release that has one
        assert "BF16_Optimizer, which DeepSpeed builds for every bf16 engine without ZeRO in DeepSpeed 0.16.9" \
            in r["bf16"]
        assert "pip install 'deepspeed>=0.19,<0.20'" in r["bf16"] and "PipelineModule" not in r["bf16"]
    # DeepSpeed 0.16 wraps fp16 OneBitAdam in its fused FP16_Optimizer (flat fp32 groups)
    check_onebit_basic(result(legacy_runs, "onebit_basic:fp16")[0], "fp16")
    check_onebit_mask(result(legacy_runs, "onebit_mask:fp16")[0])
    check_onebit_checkpoint(result(legacy_runs, "onebit_checkpoint:fp16")[0])
    # 0.16 has its own ZeroOneAdam (GPU-only); with taciturn's integration imported the type is taciturn's
    check_zoadam_basic(result(legacy_runs, "zoadam_basic:fp16"), "fp16")
    check_onebit_basic(result(legacy_runs, "lamb_basic:fp16")[0], "fp16")  # and its OneBitLamb
    for name in ("checkpoint:cdadam.json", "checkpoint:cdadam_zero2.json", "checkpoint:zero_one_adam.json"):
        for r in result(legacy_runs, name):
            assert r["resumed"] == r["full"] and r["params_equal"] and r["state_equal"]
    for r in result(legacy_runs, "zero:2"):
        assert r["sharded"] and r["asked_stage"] == 2 and r["state_bytes"] == pytest.approx(r["formula"])
        assert_falls(r)
