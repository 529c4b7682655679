"""Tiny trainings that tests/integrations/test_horovod.py launches under ``horovodrun -np 2``.

Usage: ``horovodrun -np 2 --gloo python hvd_train.py OUT_DIR``. Every rank also joins a
torch.distributed gloo group (address from rank 0, over Horovod), so the torch.distributed
path of the optimizers runs beside the Horovod one on the same data. Each scenario returns
measurements (differences, bytes, flags) and each rank saves ``OUT_DIR/rank<r>.pt``: the
pytest side asserts on them. An exception in a scenario is recorded with its traceback.
"""
from __future__ import annotations

import copy
import itertools
import os
import sys
import time
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

import horovod.torch as hvd
import taciturn
from taciturn.integrations import horovod as thvd

_SPREADS = itertools.count()
LR = 1e-2
STEPS = 4
#: about 1000 fp32 per bucket: the model below gets three buckets
SMALL_BUCKETS = 0.004


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.Tanh(), torch.nn.Linear(64, 48), torch.nn.Tanh(),
                               torch.nn.Linear(48, 3))


def batch(step: int, rank: int, n: int = 16):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 10, generator=g), torch.randn(n, 3, generator=g)


def loss_of(m, x, y):
    return F.mse_loss(m(x), y)


def local_amsgrad(m, lr=LR):
    """CD-Adam's update rule (AMSGrad, eps inside the root) without any communication."""
    return taciturn.AMSGrad(m.parameters(), lr=lr, process_group="local", broadcast_parameters=False)


def wrap(m, inner=None, **kw):
    return thvd.DistributedOptimizer(inner if inner is not None else local_amsgrad(m),
                                     named_parameters=m.named_parameters(), **kw)


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def spread(t: torch.Tensor) -> float:
    """Largest difference between this rank's ``t`` and any rank's (0 when identical)."""
    flat = t.detach().reshape(-1)
    rows = hvd.allgather(flat.unsqueeze(0), name=f"test.spread.{next(_SPREADS)}")
    return (rows - flat).abs().max().item()


def rank_spread(m: torch.nn.Module) -> float:
    return spread(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))


def _ours(caught) -> list:
    """The messages of caught warnings that come from taciturn or concern synchronisation."""
    return [str(w.message) for w in caught if "taciturn" in str(w.message) or "synchronize" in str(w.message)]


def train_step(opt, m, x, y):
    opt.zero_grad()
    loss_of(m, x, y).backward()
    opt.step()


def lockstep(rank, ref, m_ref, opt, m, steps: int = 3) -> list:
    """Train the reference and the tested pair on the same batches; their max difference per step."""
    diffs = []
    for t in range(steps):
        x, y = batch(t, rank)
        train_step(ref, m_ref, x, y)
        train_step(opt, m, x, y)
        diffs.append(max_diff(m, m_ref))
    return diffs


# ----------------------------------------------------------------------------- scenarios

def parity_cdadam(rank):
    """Compression.cdadam + local AMSGrad vs taciturn.CDAdam over torch.distributed, step by step."""
    m_ref, m = model(), model()
    ref = taciturn.CDAdam(m_ref.parameters(), lr=LR)
    opt = wrap(m, compression=thvd.Compression.cdadam, bucket_cap_mb=SMALL_BUCKETS)
    diffs, sent = [], []
    for t in range(STEPS):
        x, y = batch(t, rank)
        train_step(ref, m_ref, x, y)
        train_step(opt, m, x, y)
        diffs.append(max_diff(m, m_ref))
        met = opt.metrics()
        sent.append((met["taciturn/bytes_up"], met["taciturn/bytes_down"]))
    return {"diffs": diffs, "bytes": sent, "wire": opt.exchange.wire_bytes(), "buckets": len(opt.exchange.buckets),
            "moved": max_diff(m, model()), "spread": rank_spread(m), "steps": opt.stats.steps,
            "state_keys": sorted(k for k in opt.state_dict()["state"] if isinstance(k, str))}


class _Wait(torch.autograd.Function):
    """Identity whose backward waits (up to 30 s) until ``expected`` bytes have been exchanged
    this step: it returns only if the buckets of the layers after it finish while backward runs."""

    record = {}

    @staticmethod
    def forward(ctx, x, opt, expected):
        ctx.opt, ctx.expected = opt, expected
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        deadline = time.monotonic() + 30.0
        sent = 0
        while sent < ctx.expected and time.monotonic() < deadline:
            time.sleep(0.01)
            last = ctx.opt.stats.last
            sent = last.get("bytes_up", 0) if last.get("_open") else 0
        _Wait.record["bytes_in_backward"] = sent
        _Wait.record["t_inside"] = time.monotonic()
        return g, None, None


def overlap(rank):
    """Buckets of the last layers finish communicating while backward still runs earlier layers."""
    m = model()
    opt = wrap(m, compression=thvd.Compression.cdadam, bucket_cap_mb=1e-6)  # one bucket per tensor
    first, rest = m[0], m[1:]
    # One bucket per tensor, parameters in reverse: the first layer's two are the last buckets.
    expected = sum(opt.comm.world_size * lay.chunk_nbytes for lay in opt.exchange.layouts[:-2])
    out = []
    for t in range(2):
        x, y = batch(t, rank)
        opt.zero_grad()
        _Wait.record = {}
        loss = F.mse_loss(rest(_Wait.apply(first(x), opt, expected)), y)
        loss.backward()
        t_after = time.monotonic()
        opt.step()
        out.append({"during": _Wait.record["bytes_in_backward"], "expected_before_first_layer": expected,
                    "total": opt.metrics()["taciturn/bytes_up"],
                    "inside_before_return": _Wait.record["t_inside"] <= t_after})
    return out


def skip_synchronize(rank):
    """synchronize(); clip; step() in skip_synchronize(): one communication, the clipped average used."""
    m, m_check = model(), model()
    opt = wrap(m, compression=thvd.Compression.cdadam)
    check = local_amsgrad(m_check)
    x, y = batch(0, rank)
    opt.zero_grad()
    loss_of(m, x, y).backward()
    opt.synchronize()
    averaged = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    steps_after_sync = opt.stats.steps
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3)
    for p, q in zip(m.parameters(), m_check.parameters()):
        q.grad = p.grad.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with opt.skip_synchronize():
            opt.step()
    check.step()
    result = {"steps_after_sync": steps_after_sync, "steps_after_step": opt.stats.steps,
              "diff_to_clipped_update": max_diff(m, m_check), "warned_in_skip": _ours(caught),
              "average_spread": spread(averaged)}
    # step() after synchronize() without skip_synchronize(): Horovod's warning, a second exchange
    opt.zero_grad()
    loss_of(m, x, y).backward()
    opt.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    result["warned_without_skip"] = any("skip_synchronize" in str(w.message) for w in caught)
    result["steps_after_double"] = opt.stats.steps
    return result


def accumulation(rank):
    """backward_passes_per_step=2 equals CDAdam on the locally accumulated gradient; one exchange."""
    m_ref, m = model(), model()
    ref = taciturn.CDAdam(m_ref.parameters(), lr=LR)
    opt = wrap(m, compression=thvd.Compression.cdadam, backward_passes_per_step=2, bucket_cap_mb=SMALL_BUCKETS)
    diffs, sent = [], []
    for t in range(3):
        x, y = batch(t, rank, n=32)
        for o, mm in ((ref, m_ref), (opt, m)):
            o.zero_grad()
            for half in (slice(0, 16), slice(16, 32)):
                loss_of(mm, x[half], y[half]).backward()
            o.step()
        diffs.append(max_diff(m, m_ref))
        sent.append(opt.stats.bytes_up)
    opt.zero_grad()
    x, y = batch(9, rank)
    error = None
    try:
        for _ in range(3):
            loss_of(m, x, y).backward()
    except AssertionError as e:
        error = str(e)
    opt.synchronize()
    return {"diffs": diffs, "steps": opt.stats.steps, "total_bytes_up": sent, "wire": opt.exchange.wire_bytes(),
            "third_pass_error": error}


def presets(rank):
    """Every taciturn preset equals the core's CompressedAMSGrad with the same ingredients
    (same tensor order: the wrapper's buckets hold the parameters in reverse)."""
    out = {}
    chosen = {name: getattr(thvd.Compression, name)
              for name in ("cdadam", "dist_ef_block_sign", "sparsams_topk", "ef_sign", "markov_sign", "bf16")}
    chosen["sparsams_topk_bf16"] = thvd.Compression.sparsams_topk(ratio=0.02, encoding="bf16")
    for name, preset in chosen.items():
        spec = preset.preset
        m_ref, m = model(), model()
        ref = taciturn.CompressedAMSGrad(list(m_ref.parameters())[::-1], lr=LR, compressor=spec.compressor,
                                         compressor_options=dict(spec.options),
                                         worker_feedback=spec.worker, server_feedback=spec.server,
                                         two_way=spec.two_way, bucket_cap_mb=SMALL_BUCKETS)
        opt = wrap(m, compression=preset, bucket_cap_mb=SMALL_BUCKETS)
        diffs = lockstep(rank, ref, m_ref, opt, m)
        met = opt.metrics()
        out[name] = {"diffs": diffs, "bytes_up": met["taciturn/bytes_up"], "bytes_down": met["taciturn/bytes_down"],
                     "wire": opt.exchange.wire_bytes(), "spread": rank_spread(m)}
    return out


def _mean_grads(m, x, y, factor=1.0):
    """This rank's gradient averaged over ranks in fp32 through torch.distributed."""
    m.zero_grad()
    (factor * loss_of(m, x, y)).backward()
    grads = [p.grad.clone() for p in m.parameters()]
    for g in grads:
        dist.all_reduce(g)
        g /= dist.get_world_size()
    return grads


def summable(rank):
    """Horovod's compressors (none, fp16, ScaledFP16Compressor) in this optimizer and in hvd's."""
    x, y = batch(0, rank)
    out = {}
    # "tiny": gradients around 1e-7, in fp16's subnormal range, where only the scaled cast keeps them.
    cases = {"none": (thvd.Compression.none, 1.0), "fp16": (thvd.Compression.fp16, 1.0),
             "scaled_fp16": (thvd.ScaledFP16Compressor(scale=256.0), 1.0),
             "fp16_tiny": (thvd.Compression.fp16, 1e-6), "scaled_fp16_tiny": (thvd.ScaledFP16Compressor(2.0 ** 16), 1e-6)}
    for name, (compression, factor) in cases.items():
        expected = _mean_grads(model(), x, y, factor)
        for host in ("taciturn", "horovod"):
            m = model()
            sgd = torch.optim.SGD(m.parameters(), lr=0.1)
            if host == "taciturn":
                opt = thvd.DistributedOptimizer(sgd, named_parameters=m.named_parameters(), compression=compression)
            else:
                opt = hvd.DistributedOptimizer(sgd, named_parameters=m.named_parameters(), compression=compression)
            opt.zero_grad()
            (factor * loss_of(m, x, y)).backward()
            opt.synchronize()
            got = [p.grad for p in m.parameters()]
            out[f"{name}/{host}"] = max(((g - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
                                        for g, e in zip(got, expected))
    return out


def sum_op(rank):
    """op=hvd.Sum hands the optimizer world_size times the average."""
    grads = {}
    for op in (hvd.Average, hvd.Sum):
        m = model()
        opt = wrap(m, compression=thvd.Compression.cdadam, op=op)
        loss_of(m, *batch(0, rank)).backward()
        opt.synchronize()
        grads[op] = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    return {"ratio_error": (grads[hvd.Sum] - hvd.size() * grads[hvd.Average]).abs().max().item(),
            "average_norm": grads[hvd.Average].norm().item()}


class _Branchy(torch.nn.Module):
    """A head that only rank 0 uses: rank 1 never computes its gradient."""

    def __init__(self):
        super().__init__()
        self.body = model()
        torch.manual_seed(1)
        self.extra = torch.nn.Linear(3, 3)

    def forward(self, x, use_extra):
        out = self.body(x)
        return self.extra(out) if use_extra else out


def unused_parameter(rank):
    """A parameter without gradient on one rank is sent as zeros, as CDAdam's local_grads does."""
    m_ref, m = _Branchy(), _Branchy()
    ref = taciturn.CDAdam(m_ref.parameters(), lr=LR)
    opt = thvd.DistributedOptimizer(taciturn.AMSGrad(m.parameters(), lr=LR, process_group="local",
                                                     broadcast_parameters=False),
                                    named_parameters=m.named_parameters(), compression=thvd.Compression.cdadam,
                                    bucket_cap_mb=SMALL_BUCKETS)
    diffs = []
    for t in range(3):
        x, y = batch(t, rank)
        for o, mm in ((ref, m_ref), (opt, m)):
            o.zero_grad()
            F.mse_loss(mm(x, use_extra=rank == 0), y).backward()
            o.step()
        diffs.append(max_diff(m, m_ref))
    return {"diffs": diffs, "spread": rank_spread(m)}


def refusal(rank):
    """A taciturn preset handed to hvd.DistributedOptimizer fails with a TypeError naming the fix."""
    out = {}
    for name in ("cdadam", "bf16"):
        m = model()
        opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                       compression=getattr(thvd.Compression, name))
        x, y = batch(0, rank)
        try:
            loss_of(m, x, y).backward()
            opt.step()
            out[name] = None
        except TypeError as e:
            out[name] = str(e)
    return out


def core_on_horovod(rank):
    """taciturn.CDAdam(process_group="horovod") equals it over torch.distributed, sharded or not."""
    out = {}
    for label, kw in (("diffs", {}), ("sharded_diffs", {"shard_state": True})):
        m_ref, m = model(), model()
        ref = taciturn.CDAdam(m_ref.parameters(), lr=LR, **kw)
        opt = taciturn.CDAdam(m.parameters(), lr=LR, process_group="horovod", **kw)
        out[label] = lockstep(rank, ref, m_ref, opt, m)
    return {**out, "comm": type(opt.comm).__name__, "world_size": opt.comm.world_size, "sharded": opt.sharded}


def process_set(rank, solo):
    """A process set of rank 1 alone: rank 1 runs CD-Adam with n = 1, rank 0 only its local rule."""
    m_ref, m = model(), model()
    if solo.included():
        ref = taciturn.CDAdam(m_ref.parameters(), lr=LR, process_group="local")
    else:
        ref = local_amsgrad(m_ref)
    opt = wrap(m, compression=thvd.Compression.cdadam, process_set=solo)
    return {"diffs": lockstep(rank, ref, m_ref, opt, m), "included": bool(solo.included()),
            "world_size": opt.comm.world_size if opt.comm is not None else None}


def _compression_tensors(opt):
    return {k: v.clone() for k, v in opt.compression_state.items() if torch.is_tensor(v)}


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def broadcast_state(rank):
    """broadcast_optimizer_state: fresh ranks; every rank its own checkpoint; the root's alone."""
    out = {}
    # Fresh optimizers on every rank: nothing to restart, no warning.
    m = model()
    opt = wrap(m, compression=thvd.Compression.cdadam)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        thvd.broadcast_optimizer_state(opt, root_rank=0)
    out["fresh_warnings"] = _ours(caught)

    # Train 2 steps, save per rank, train a third step: the resumed copy must follow exactly.
    for t in range(2):
        train_step(opt, m, *batch(t, rank))
    saved_model, saved_opt = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
    train_step(opt, m, *batch(2, rank))

    m2 = model()
    m2.load_state_dict(saved_model)
    opt2 = wrap(m2, compression=thvd.Compression.cdadam)
    opt2.load_state_dict(copy.deepcopy(saved_opt))
    loaded = _compression_tensors(opt2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        thvd.broadcast_optimizer_state(opt2, root_rank=0)
        hvd.broadcast_optimizer_state(opt2, root_rank=0)
    out["own_warnings"] = _ours(caught)
    out["own_kept"] = _same_tensors(loaded, _compression_tensors(opt2))
    out["own_state_nonzero"] = any(v.abs().sum().item() > 0 for v in loaded.values())
    train_step(opt2, m2, *batch(2, rank))
    out["resumed_diff"] = max_diff(m2, m)

    # Only the root loads its checkpoint: inner state from the root, compression restarted.
    m3 = model()
    opt3 = wrap(m3, compression=thvd.Compression.cdadam)
    if rank == 0:
        m3.load_state_dict(saved_model)
        opt3.load_state_dict(copy.deepcopy(saved_opt))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hvd.broadcast_parameters(m3.state_dict(), root_rank=0)
        thvd.broadcast_optimizer_state(opt3, root_rank=0)
    out["root_only_warnings"] = _ours(caught)
    st = opt3.compression_state
    out["root_only_step"] = st["step"]
    out["root_only_zero"] = all(v.abs().sum().item() == 0 for v in _compression_tensors(opt3).values())
    exp_avg = torch.cat([opt3.state[p]["exp_avg"].reshape(-1) for p in m3.parameters()])
    out["root_only_exp_avg_spread"] = spread(exp_avg)
    out["root_only_exp_avg_nonzero"] = exp_avg.abs().sum().item() > 0
    train_step(opt3, m3, *batch(3, rank))
    out["root_only_spread_after_step"] = rank_spread(m3)

    # Another rank's state is refused unless the compression state is reset.
    m4 = model()
    opt4 = wrap(m4, compression=thvd.Compression.cdadam)
    other = hvd.broadcast_object(saved_opt, root_rank=1, name="other_rank_state")
    try:
        opt4.load_state_dict(copy.deepcopy(other))
        out["foreign_error"] = None
    except ValueError as e:
        out["foreign_error"] = str(e)
    return out


def elastic_state(rank):
    """hvd.elastic.TorchState commits, restores and syncs the compression state."""
    m = model()
    opt = wrap(m, compression=thvd.Compression.cdadam)
    state = hvd.elastic.TorchState(model=m, optimizer=opt, epoch=0)
    out = {"handler": type(state._handlers["optimizer"]).__name__}
    for t in range(2):
        train_step(opt, m, *batch(t, rank))
    state.epoch = 2
    state.commit()
    committed = _compression_tensors(opt)
    committed_params = copy.deepcopy(m.state_dict())
    committed_step = opt.compression_state["step"]
    for t in range(2, 4):
        train_step(opt, m, *batch(t, rank))
    out["changed_after_commit"] = not _same_tensors(committed, _compression_tensors(opt))
    state.restore()
    out["restored_equal"] = _same_tensors(committed, _compression_tensors(opt))
    out["restored_step"] = (opt.compression_state["step"], committed_step)
    out["params_restored"] = all(torch.equal(v, m.state_dict()[k]) for k, v in committed_params.items())
    train_step(opt, m, *batch(2, rank))
    state.restore()
    out["second_restore_equal"] = _same_tensors(committed, _compression_tensors(opt))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state.sync()
    out["sync_warnings"] = _ours(caught)
    out["kept_after_sync"] = _same_tensors(committed, _compression_tensors(opt))
    train_step(opt, m, *batch(2, rank))
    out["spread_after_sync_step"] = rank_spread(m)
    return out


def _error(fn):
    try:
        fn()
    except Exception as e:  # the message and type are what the test checks
        return f"{type(e).__name__}: {e}"
    return None


def errors(rank):
    """Bad input fails at construction (or load) with a message naming the fix; the API works
    with torch's LR schedulers and Horovod-style string names."""
    m = model()
    out = {
        "not_optimizer": _error(lambda: thvd.DistributedOptimizer(m, named_parameters=m.named_parameters())),
        "communicating_inner": _error(lambda: wrap(m, inner=taciturn.AMSGrad(m.parameters(), lr=LR))),
        "passes": _error(lambda: wrap(m, backward_passes_per_step=0)),
        "adasum": _error(lambda: wrap(m, op=hvd.Adasum)),
        "predivide": _error(lambda: wrap(m, gradient_predivide_factor=2.0)),
        "unnamed": _error(lambda: thvd.DistributedOptimizer(local_amsgrad(m),
                                                            named_parameters=list(m.named_parameters())[:2])),
        "duplicate_names": _error(lambda: thvd.DistributedOptimizer(
            local_amsgrad(m), named_parameters=[("w", p) for p in m.parameters()])),
        "unknown_compression": _error(lambda: wrap(m, compression="onebit")),
        "bad_option": _error(lambda: thvd.Compression.sparsams_topk(bogus=1)),
        "bad_scale": _error(lambda: thvd.ScaledFP16Compressor(scale=0.0)),
        "mismatched_ranks": _error(lambda: wrap(torch.nn.Linear(4, 2 + rank))),
    }
    opt = wrap(m, compression="cdadam")
    out["add_param_group"] = _error(lambda: opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))]}))
    out["pickle"] = _error(lambda: copy.deepcopy(opt))
    out["plain_state"] = _error(lambda: opt.load_state_dict(local_amsgrad(model()).state_dict()))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_step(opt, m, *batch(0, rank))
    sched.step()
    out["lr_after_schedule"] = opt.param_groups[0]["lr"]
    out["is_optimizer"] = isinstance(opt, torch.optim.Optimizer)
    m2 = model()
    small_blocks = wrap(m2, compression=thvd.Compression.cdadam(block_size=256))
    train_step(small_blocks, m2, *batch(0, rank))
    out["block_sizes"] = (small_blocks.exchange.compressor.block_size, opt.exchange.compressor.block_size)
    return out


# ----------------------------------------------------------------------------- main

def _join_torch_distributed(out_dir: str):
    """A torch.distributed gloo group over the same ranks, meeting in a file of the (fresh)
    output folder: no port to race for."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(os.path.abspath(out_dir), 'torch_store')}",
                            rank=hvd.rank(), world_size=hvd.size(), timeout=timedelta(seconds=120))


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    solo = hvd.ProcessSet([1])
    hvd.init(process_sets=[solo])
    _join_torch_distributed(out_dir)
    rank = hvd.rank()
    scenarios = {"parity_cdadam": parity_cdadam, "overlap": overlap, "skip_synchronize": skip_synchronize,
                 "accumulation": accumulation, "presets": presets, "summable": summable, "sum_op": sum_op,
                 "unused_parameter": unused_parameter, "refusal": refusal, "core_on_horovod": core_on_horovod,
                 "process_set": lambda r: process_set(r, solo), "broadcast_state": broadcast_state,
                 "elastic_state": elastic_state, "errors": errors}
    run_scenarios(scenarios, rank, out_dir)


def run_scenarios(scenarios: dict, rank: int, out_dir: str) -> None:
    """Run each scenario on this rank (an exception becomes its result), with a barrier after
    each, save the results to ``out_dir/rank<r>.pt`` and leave torch.distributed."""
    results = {"world_size": hvd.size()}
    for name, fn in scenarios.items():
        try:
            results[name] = fn(rank)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        hvd.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
