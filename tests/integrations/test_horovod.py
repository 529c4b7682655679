"""taciturn.integrations.horovod under real ``horovodrun -np 2``, Gloo and MPI controllers.

The scenarios run in tests/integrations/hvd_train.py (one launch per controller, every rank
also in a torch.distributed gloo group for the reference runs) and hvd_elastic.py (an elastic
job); the ranks save their measurements and these tests assert on them.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 240
RANKS = 2


def _horovodrun(args, script, out_dir, env_extra=None, np=RANKS):
    try:
        import horovod.torch  # noqa: F401
    except ImportError as e:
        pytest.fail(f"Horovod is not installed ({e}): run scripts/install_horovod.sh")
    cmd = [sys.executable, "-m", "horovod.runner.launch", "-np", str(np), *args,
           sys.executable, os.path.join(HERE, script), str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"horovodrun {' '.join(args)} {script} did not finish within {TIMEOUT} s:\n{output[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"horovodrun {' '.join(args)} {script} exited with {proc.returncode}:\n{output[-6000:]}")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(np)]


CONTROLLERS = {
    "gloo": (["--gloo"], {"HOROVOD_CPU_OPERATIONS": "gloo"}),
    "mpi": (["--mpi", "--mpi-args=--allow-run-as-root --oversubscribe"], {"HOROVOD_CPU_OPERATIONS": "mpi"}),
}


@pytest.fixture(scope="module", params=sorted(CONTROLLERS))
def ranks(request, tmp_path_factory):
    args, env = CONTROLLERS[request.param]
    return _horovodrun(args, "hvd_train.py", tmp_path_factory.mktemp(f"hvd-{request.param}"), env)


def scenario(ranks, name):
    """Every rank's measurements of one scenario; a rank's recorded exception fails the test."""
    out = []
    for r, res in enumerate(ranks):
        got = res[name]
        if isinstance(got, dict) and "error" in got:
            pytest.fail(f"scenario {name} raised on rank {r}:\n{got['error']}")
        out.append(got)
    return out


def test_cdadam_preset_matches_torch_distributed_cdadam_step_by_step(ranks):
    for res in scenario(ranks, "parity_cdadam"):
        assert res["diffs"] == [0.0] * len(res["diffs"])   # bit-identical every step
        assert res["moved"] > 1e-3                           # and training did move the parameters
        assert res["spread"] == 0.0                          # identical on both ranks
        assert res["buckets"] == 2                           # several buckets (SMALL_BUCKETS), exchanged in turn
        assert "taciturn.horovod" in res["state_keys"]       # compression state in the wrapped state_dict


def test_bytes_per_step_match_the_wire_formula(ranks):
    for res in scenario(ranks, "parity_cdadam"):
        wire = res["wire"]
        assert res["bytes"] == [(wire["up"], wire["down"])] * len(res["bytes"])
        assert res["steps"] == len(res["bytes"])
        assert wire["fp32"] / wire["up"] > 15                # 1 bit per element + scales, padded


@pytest.mark.parametrize("preset", ["cdadam", "dist_ef_block_sign", "sparsams_topk", "sparsams_topk_bf16", "ef_sign",
                                    "markov_sign", "bf16"])
def test_preset_equals_core_optimizer_with_same_ingredients(ranks, preset):
    for res in scenario(ranks, "presets"):
        got = res[preset]
        assert max(got["diffs"]) <= 1e-7, got["diffs"]
        assert got["spread"] == 0.0
        assert (got["bytes_up"], got["bytes_down"]) == (got["wire"]["up"], got["wire"]["down"])
    if preset.startswith("sparsams_topk"):  # one-way: every rank receives every rank's payload
        assert got["bytes_down"] == RANKS * got["bytes_up"]
    if preset == "sparsams_topk_bf16":  # top-2 % in 4 bytes an entry: about the bytes of top-1 % in 8
        assert abs(got["bytes_up"] - res["sparsams_topk"]["bytes_up"]) <= 0.05 * res["sparsams_topk"]["bytes_up"]


def test_buckets_communicate_while_backward_still_runs(ranks):
    for steps in scenario(ranks, "overlap"):
        for res in steps:
            # Inside the backward of the first layer (after a 0.5 s pause), every bucket of the
            # later layers has finished its exchange; the first layer's come after.
            assert res["inside_before_return"]
            assert res["during"] == res["expected_before_first_layer"] > 0
            assert res["during"] < res["total"]


def test_skip_synchronize_lets_users_clip_between(ranks):
    for res in scenario(ranks, "skip_synchronize"):
        assert res["steps_after_sync"] == res["steps_after_step"] == 1   # step() did not communicate again
        assert res["diff_to_clipped_update"] == 0.0                      # the optimizer used the clipped average
        assert res["average_spread"] == 0.0
        assert res["warned_in_skip"] == []
        assert res["warned_without_skip"] and res["steps_after_double"] == 3


def test_backward_passes_per_step_accumulates_locally_and_communicates_once(ranks):
    for res in scenario(ranks, "accumulation"):
        assert res["diffs"] == [0.0] * 3                     # = CDAdam on the accumulated gradient
        up = res["wire"]["up"]
        assert res["total_bytes_up"] == [up, 2 * up, 3 * up]  # one exchange per step, not per pass
        assert "backward_passes_per_step" in res["third_pass_error"]


def test_horovod_compressors_behave_like_horovod(ranks):
    for res in scenario(ranks, "summable"):
        assert res["none/taciturn"] == res["none/horovod"] == 0.0
        for name in ("fp16", "scaled_fp16", "scaled_fp16_tiny"):
            assert res[f"{name}/taciturn"] == res[f"{name}/horovod"] < 2e-3
        assert res["fp16_tiny/horovod"] > 0.1    # plain fp16 loses gradients near 1e-7; the scaled cast keeps them


def test_sum_op_gives_world_size_times_the_average(ranks):
    for res in scenario(ranks, "sum_op"):
        assert res["average_norm"] > 0 and res["ratio_error"] == 0.0


def test_parameter_without_gradient_on_one_rank(ranks):
    for res in scenario(ranks, "unused_parameter"):
        assert res["diffs"] == [0.0] * 3 and res["spread"] == 0.0


def test_preset_refused_by_horovods_own_optimizer(ranks):
    for res in scenario(ranks, "refusal"):
        assert "taciturn.integrations.horovod.DistributedOptimizer" in res["cdadam"]
        assert "cannot be summed" in res["cdadam"]
        assert "bfloat16" in res["bf16"]


def test_core_optimizer_runs_on_the_horovod_communicator(ranks):
    for res in scenario(ranks, "core_on_horovod"):
        assert res["comm"] == "HorovodCommunicator" and res["world_size"] == RANKS
        assert res["diffs"] == [0.0] * 3
        assert res["sharded"] and res["sharded_diffs"] == [0.0] * 3


def test_process_set(ranks):
    outside, inside = scenario(ranks, "process_set")
    assert not outside["included"] and outside["world_size"] is None
    assert inside["included"] and inside["world_size"] == 1
    assert outside["diffs"] == inside["diffs"] == [0.0] * 3


def test_broadcast_optimizer_state(ranks):
    root, other = scenario(ranks, "broadcast_state")
    for res in (root, other):
        assert res["fresh_warnings"] == [] and res["own_warnings"] == []
        # every rank loaded its own state: broadcast (ours and Horovod's) keeps it, resume is exact
        assert res["own_state_nonzero"] and res["own_kept"] and res["resumed_diff"] == 0.0
        # only the root loaded: the wrapped state comes from the root, compression restarts at its step
        assert res["root_only_exp_avg_nonzero"] and res["root_only_exp_avg_spread"] == 0.0
        assert res["root_only_zero"] and res["root_only_step"] == 2
        assert res["root_only_spread_after_step"] == 0.0
    assert len(root["root_only_warnings"]) == 1 and "restarted from zero" in root["root_only_warnings"][0]
    assert other["root_only_warnings"] == []
    assert "saved by rank 1" in root["foreign_error"] and other["foreign_error"] is None


def test_elastic_torch_state_commits_and_restores_compression_state(ranks):
    for res in scenario(ranks, "elastic_state"):
        assert res["handler"] == "OptimizerStateHandler"
        assert res["changed_after_commit"] and res["restored_equal"] and res["params_restored"]
        assert res["restored_step"][0] == res["restored_step"][1] == 2
        assert res["second_restore_equal"]                   # training never writes into the commit
        assert res["sync_warnings"] == [] and res["kept_after_sync"]
        assert res["spread_after_sync_step"] == 0.0


def test_bad_input_fails_early_with_the_fix(ranks):
    for res in scenario(ranks, "errors"):
        expected = {
            "not_optimizer": "wraps a torch.optim.Optimizer",
            "communicating_inner": "process_group='local'",
            "passes": "backward_passes_per_step=0",
            "adasum": "hvd.Adasum",
            "predivide": "gradient_predivide_factor",
            "unnamed": "were not named",
            "duplicate_names": "Found duplicates: w",
            "unknown_compression": "valid names: none, fp16, bf16, cdadam",
            "bad_option": "does not take ['bogus']",
            "bad_scale": "finite number > 0",
            "mismatched_ranks": "disagree on parameters",
            "add_param_group": "before wrapping",
            "pickle": "state_dict()",
            "plain_state": "reset_compression_state=True",
        }
        for case, text in expected.items():
            assert res[case] is not None and text in res[case], (case, res[case])
        assert res["is_optimizer"] and res["lr_after_schedule"] == pytest.approx(5e-3)
        assert res["block_sizes"] == (256, 1024)


@pytest.fixture(scope="module")
def two_level_ranks(tmp_path_factory):
    args, env = CONTROLLERS["gloo"]
    # 4 ranks on 2 cores: a rank can stall past gloo's default 30 s while the others negotiate
    return _horovodrun(args, "hvd_two_level.py", tmp_path_factory.mktemp("hvd-two-level"),
                       {**env, "HOROVOD_DYNAMIC_PROCESS_SETS": "1", "HOROVOD_GLOO_TIMEOUT_SECONDS": "120"}, np=4)


def test_two_level_on_process_sets_equals_the_torch_distributed_two_level_cdadam(two_level_ranks):
    for res in scenario(two_level_ranks, "two_level"):
        for dtype in ("fp32", "bf16"):
            got = res[dtype]
            assert got["diffs"] == [0.0] * 4 and got["spread"] == 0.0, dtype  # bit-identical, every rank
            assert got["inter_world"] == 2 and got["intra"] > 0  # 2 nodes; traffic inside them measured


def test_two_level_auto_reads_horovods_local_size(two_level_ranks):
    for res in scenario(two_level_ranks, "auto"):
        assert res["ranks_per_node"] == res["local_size"] == 4 and res["spread"] == 0.0


def test_elastic_job_restores_the_commit_and_matches_uninterrupted_training(tmp_path):
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\necho localhost:{RANKS}\n")
    discover.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    args = ["--min-np", str(RANKS), "--max-np", str(RANKS), "--network-interface", "lo",
            "--host-discovery-script", str(discover)]
    for res in _horovodrun(args, "hvd_elastic.py", out):
        assert res["handler"] == "OptimizerStateHandler"
        assert res["events"][0] == "failed" and f"reset:{RANKS}" in res["events"]
        assert res["step"] == res["ref_step"] == 6
        assert res["diff"] == 0.0


# ----------------------------------------------------------------------------- Horovod's own test_torch.py
# tests/integrations/hvd_upstream.py runs what Horovod 0.28.1's test/parallel/test_torch.py asserts
# of hvd.DistributedOptimizer on taciturn's, with Compression.none (Horovod's path) and
# Compression.cdadam; each test below names the upstream case(s) it mirrors.

@pytest.fixture(scope="module", params=sorted(CONTROLLERS))
def upstream(request, tmp_path_factory):
    args, env = CONTROLLERS[request.param]
    return _horovodrun(args, "hvd_upstream.py", tmp_path_factory.mktemp(f"hvd-upstream-{request.param}"), env)


def test_broadcast_state_of_a_fresh_optimizer_creates_it_everywhere(upstream):
    """test_broadcast_state_no_grad"""
    for res in scenario(upstream, "broadcast_state_no_grad"):
        for name in ("none", "cdadam"):
            got = res[name]
            assert got["a_grad_none"] and got["b_grad"] is not None and got["b_grad_spread"] == 0.0, name
            assert got["has_momentum"], name                   # the state exists after the call
            assert got["b_moved"] == 0.0 and got["weight_decay"] == 0.5, name   # no parameter moved
            assert got["spread_after_step"] == 0.0, name
        assert res["cdadam"]["compression_step"] == 0 and res["cdadam"]["compression_zero"]


def test_broadcast_state_gives_every_rank_the_roots_options_and_state(upstream):
    """test_broadcast_state, test_broadcast_state_options"""
    root, other = scenario(upstream, "broadcast_state_options")
    assert len(root) >= 2 * 10
    for key, mine in root.items():
        theirs = other[key]
        assert theirs["group"] == mine["group"] and theirs["types"] == mine["types"], key
        assert mine["group"]["lr"] == 0.1, key
        assert theirs["state_spread"] == 0.0 and theirs["state_len"] == mine["state_len"], key


def test_sparse_gradients_are_averaged_and_stay_sparse(upstream):
    """test_sparse_embeddings, test_async_sparse_allreduce"""
    for res in scenario(upstream, "sparse_embeddings"):
        for key, got in res.items():
            assert got["init_sparse"] and got["init_state"] > 0, key
            assert got["sparse"] and got["spread"] == 0.0, key
            # none: torch.distributed's average; cdadam: what the same dense gradient gets
            assert got["error"] < 1e-6 if key.startswith("none/") else got["error"] == 0.0, key


def test_join_with_uneven_steps(upstream):
    """test_horovod_join_allreduce (with the optimizer: uneven numbers of steps)"""
    ranks = scenario(upstream, "join")
    for name in ("none", "cdadam"):
        for first in range(RANKS):
            key = f"{name}/{first}"
            for rank, res in enumerate(ranks):
                got = res[key]
                assert got["lasts"] == [got["last"]] * RANKS and got["last"] != first, key
                assert got["spread_after"] == 0.0, key
                # the rank still training: its own gradient / 2, the joined rank adds zeros
                assert got["errors"] == ([] if rank == first else [0.0, 0.0]), key
    for first in range(RANKS):
        trained = ranks[1 - first][f"cdadam/{first}"]
        assert trained["bytes_up"][0] < trained["fp32_bytes"] / 4       # compressed while both train
        assert trained["bytes_up"][1:] == [trained["fp32_bytes"]] * 2   # fp32 while one rank is joined
        assert trained["steps"] == [3, 3]                                # compressed steps in step


def test_a_gradient_missing_on_one_rank_is_sent_as_zeros_for_every_torch_optimizer(upstream):
    """test_force_allreduce"""
    for res in scenario(upstream, "force_allreduce"):
        assert len(res) >= 2 * 10 and all(v == 0.0 for v in res.values()), res


def test_default_names_are_unique_and_equal_on_every_rank(upstream):
    """test_no_named_parameters, test_optimizer_no_named_parameters"""
    for res in scenario(upstream, "no_named_parameters"):
        for name in ("none", "cdadam"):
            assert res[name] == {"unique": True, "same_everywhere": True, "spread": 0.0}, name


def test_requires_grad_switched_between_two_optimizers(upstream):
    """test_dynamic_requires_grad"""
    for res in scenario(upstream, "dynamic_requires_grad"):
        for name in ("none", "cdadam"):
            assert res[name] == {"wrong_steps": [], "spread": 0.0}, name


def test_clipping_between_synchronize_and_step_and_the_double_sync_warning(upstream):
    """test_gradient_clipping, test_synchronize_step_warning"""
    for res in scenario(upstream, "clipping_and_warning"):
        for name in ("none", "cdadam"):
            got = res[name]
            assert abs(got["prior"]) > abs(got["clipped"]) and got["update_error"] < 1e-7, name
            assert got["skip_warnings"] == [], name
            assert len(got["step_warnings"]) == 1, name
            assert "optimizer.step() called without optimizer.skip_synchronize()" in got["step_warnings"][0], name


def test_backward_passes_per_step_on_horovods_path(upstream):
    """backward_passes_per_step (Horovod's _allreduce_delay) with Compression.none"""
    for res in scenario(upstream, "accumulation_none"):
        assert res["average_error"] < 1e-6
        assert "Increase backward_passes_per_step" in res["third_pass_error"]


def test_arguments_are_checked_before_horovod_is_needed():
    """test_duplicate_names, test_missing_named_parameters (before hvd.init, in this process)"""
    from taciturn.integrations import horovod as thvd

    net1, net2 = torch.nn.Conv2d(1, 1, 1), torch.nn.Conv2d(1, 1, 1)
    opt = torch.optim.SGD(list(net1.parameters()) + list(net2.parameters()), lr=0.1)
    duplicates = itertools.chain(net1.named_parameters(), net2.named_parameters())
    with pytest.raises(ValueError, match="Parameter names in named_parameters must be unique. Found duplicates: "
                                         "bias, weight"):
        thvd.DistributedOptimizer(opt, named_parameters=duplicates)
    with pytest.raises(ValueError, match="were not named"):
        thvd.DistributedOptimizer(opt, named_parameters=list(net1.named_parameters()))
    with pytest.raises(ValueError, match="unknown compression"):
        thvd.DistributedOptimizer(torch.optim.SGD(net1.parameters(), lr=0.1), compression="onebit")
    with pytest.raises(RuntimeError, match=r"call hvd.init\(\) first"):
        thvd.DistributedOptimizer(torch.optim.SGD(net1.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="apply to taciturn's presets, not to a Horovod Compressor"):
        thvd.DistributedOptimizer(torch.optim.SGD(net1.parameters(), lr=0.1), compression=thvd.Compression.none,
                                  ranks_per_node=2)
