"""What Horovod's own test/parallel/test_torch.py (v0.28.1) asserts of ``hvd.DistributedOptimizer``,
checked on ``taciturn.integrations.horovod.DistributedOptimizer`` under ``horovodrun -np 2``.

Usage: ``horovodrun -np 2 --gloo python hvd_upstream.py OUT_DIR``. Each scenario runs with a
Horovod Compressor (``Compression.none``, Horovod's path) and a taciturn preset
(``Compression.cdadam``) where the behaviour applies, and names the upstream case it mirrors.
Every rank also joins a torch.distributed gloo group for exact reference averages. Each rank
saves ``OUT_DIR/rank<r>.pt``; tests/integrations/test_horovod.py asserts on it.
"""
from __future__ import annotations

import inspect
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

import horovod.torch as hvd
from taciturn.integrations import horovod as thvd

from hvd_train import _join_torch_distributed, rank_spread, run_scenarios, spread

COMPRESSIONS = {"none": thvd.Compression.none, "cdadam": thvd.Compression.cdadam}


def dense_average(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().to_dense().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def own_grads(m: torch.nn.Module, loss: torch.Tensor):
    """This rank's gradients of ``loss``, computed aside (``autograd.grad`` fills no ``.grad``
    and runs no optimizer hook), for comparing with what the optimizer averaged."""
    return torch.autograd.grad(loss, list(m.parameters()))


def torch_optimizers():
    """torch's own optimizer classes, as upstream loops over them (L-BFGS needs a closure and
    SparseAdam sparse gradients: both left out there too; Muon, newer, takes 2-D parameters only)."""
    left_out = {"LBFGS", "SparseAdam", "Muon"}
    classes = [c for c in torch.optim.Optimizer.__subclasses__() if c.__module__.startswith("torch.optim")
               and c.__name__ not in left_out]
    return sorted(classes, key=lambda c: c.__name__)


def build(cls, params, options):
    accepted = inspect.signature(cls.__init__).parameters
    return cls(params, **{k: v for k, v in options.items() if k in accepted})


# ----------------------------------------------------------------------------- scenarios

class _NoGrad(torch.nn.Module):
    """An integer index parameter that never gets a gradient next to a trainable one."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1, 3], dtype=torch.int32), requires_grad=False)
        torch.manual_seed(0)
        self.b = torch.nn.Parameter(torch.rand(4))

    def forward(self, x):
        return torch.index_select(self.b, 0, self.a.long()) * x


def broadcast_state_no_grad(rank):
    """test_broadcast_state_no_grad: broadcast_optimizer_state on a fresh optimizer creates its
    state (zero gradients, one step) on every rank; the frozen parameter keeps no gradient.
    Beyond upstream: the step moves no parameter (weight decay held at 0) and leaves the
    compression state alone, and training goes on in step on both ranks."""
    out = {}
    for name, compression in COMPRESSIONS.items():
        m = _NoGrad()
        opt = thvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.5, momentum=0.9,
                                                        nesterov=True),
                                        named_parameters=m.named_parameters(), compression=compression)
        thvd.broadcast_parameters(m.state_dict(), root_rank=0)
        before = m.b.detach().clone()
        thvd.broadcast_optimizer_state(opt, root_rank=0)
        grad = opt.param_groups[0]["params"][1].grad
        res = {"a_grad_none": m.a.grad is None, "b_grad": None if grad is None else grad.clone(),
               "b_grad_spread": None if grad is None else spread(grad),
               "has_momentum": "momentum_buffer" in opt.state[m.b],
               "b_moved": (m.b.detach() - before).abs().max().item(),
               "weight_decay": opt.param_groups[0]["weight_decay"]}
        if opt.is_taciturn:
            st = opt.compression_state
            res["compression_step"] = st["step"]
            res["compression_zero"] = all(v.abs().sum().item() == 0 for v in st.values() if torch.is_tensor(v))
        opt.zero_grad()
        F.mse_loss(m(torch.full((2,), 1.0 + rank)), torch.ones(2)).backward()
        opt.step()
        res["spread_after_step"] = rank_spread(m)
        out[name] = res
    return out


def broadcast_state_options(rank):
    """test_broadcast_state and test_broadcast_state_options: after a step, every rank holds the
    root's hyper-parameters (types kept) and per-parameter state, and can step again."""
    root_options = dict(lr=0.1, momentum=0.8, weight_decay=0.2, nesterov=True, betas=(0.9, 0.999),
                        etas=(0.8, 2.4), step_sizes=(1e-5, 100))
    other_options = dict(lr=0.2, momentum=0.9, weight_decay=0.1, nesterov=False, betas=(0.8, 0.9),
                         etas=(0.25, 1.75), step_sizes=(1e-7, 5))
    out = {}
    for name, compression in COMPRESSIONS.items():
        for cls in torch_optimizers():
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
            inner = build(cls, m.parameters(), root_options if rank == 0 else other_options)
            opt = thvd.DistributedOptimizer(inner, named_parameters=m.named_parameters(), compression=compression)
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(rank))
            for _ in range(2):
                opt.zero_grad()
                F.mse_loss(m(x), torch.zeros(8, 3)).backward()
                opt.step()
                thvd.broadcast_optimizer_state(opt, root_rank=0)
            group = {k: v for k, v in opt.param_groups[0].items() if k != "params" and k in root_options}
            state = [t for p in m.parameters() for t in opt.state[p].values() if torch.is_tensor(t)]
            res = {"group": group, "types": {k: type(v).__name__ for k, v in group.items()},
                   "state_spread": max([spread(t.float()) for t in state], default=0.0),
                   "state_len": len(opt.state_dict()["state"])}
            opt.zero_grad()
            F.mse_loss(m(x), torch.zeros(8, 3)).backward()
            opt.step()
            out[f"{name}/{cls.__name__}"] = res
    return out


class _Embed(torch.nn.Module):
    def __init__(self, sparse=True):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(10, 3, sparse=sparse)

    def forward(self, x):
        return self.embedding(x)


def sparse_embeddings(rank):
    """test_sparse_embeddings and test_async_sparse_allreduce: sparse gradients averaged (Horovod's
    sparse allreduce, or densified with sparse_as_dense, or densified by a preset) come back
    sparse, and SparseAdam steps on them; broadcast_optimizer_state gives SparseAdam sparse
    zero gradients. The exact average is torch.distributed's for Horovod's path; a preset's is
    what it gives the same embedding with dense gradients."""
    inp = torch.tensor([[1, 2, 4, 5], [4, 3, 2, 9]]) if rank == 0 else torch.tensor([[1, 3, 4], [4, 7, 9]])
    out = {}
    for name, compression in COMPRESSIONS.items():
        for as_dense in (False, True):
            m = _Embed()
            opt = thvd.DistributedOptimizer(torch.optim.SparseAdam(list(m.parameters()), lr=0.1),
                                            compression=compression, sparse_as_dense=as_dense)
            thvd.broadcast_optimizer_state(opt, root_rank=0, model=m)
            res = {"init_sparse": m.embedding.weight.grad.is_sparse, "init_state": len(opt.state[m.embedding.weight])}
            if opt.is_taciturn:
                twin = _Embed(sparse=False)
                twin_opt = thvd.DistributedOptimizer(torch.optim.Adam(twin.parameters()), compression=compression,
                                                     named_parameters=[("dense." + n, p) for n, p in
                                                                       twin.named_parameters()])
                twin(inp).sum().backward()
                twin_opt.synchronize()
                expected = twin.embedding.weight.grad
            else:
                expected = dense_average(own_grads(m, m(inp).sum())[0])
            opt.zero_grad()
            m(inp).sum().backward()
            opt.synchronize()
            grad = m.embedding.weight.grad
            res["sparse"] = grad.is_sparse
            res["error"] = (grad.to_dense() - expected).abs().max().item()
            with opt.skip_synchronize():
                opt.step()
            res["spread"] = rank_spread(m)
            out[f"{name}/{'dense' if as_dense else 'sparse'}"] = res
    return out


def join(rank):
    """test_horovod_join_allreduce: the first-joining rank runs out of data after one step and
    calls hvd.join(); the other runs two more steps, whose averages are its gradient / 2 (the
    joined rank adds zeros), then joins; hvd.join() returns the same last rank everywhere, not
    the first. After the join both ranks train on in step: compression state, and the model
    broadcast from the last rank. Each rank joins first once."""
    out = {}
    for name, compression in COMPRESSIONS.items():
        for first in range(hvd.size()):
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
            opt = thvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                            named_parameters=m.named_parameters(), compression=compression)
            errors, up = [], []
            for step in range(1 if rank == first else 3):
                x = torch.randn(4, 10, generator=torch.Generator().manual_seed(10 * step + rank))
                mine = own_grads(m, m(x).sum())
                opt.zero_grad()
                m(x).sum().backward()
                opt.synchronize()
                if step > 0:
                    errors.append(max((p.grad - g / hvd.size()).abs().max().item()
                                      for p, g in zip(m.parameters(), mine)))
                up.append(opt.metrics().get("taciturn/bytes_up"))
                with opt.skip_synchronize():
                    opt.step()
            last = hvd.join()
            res = {"errors": errors, "bytes_up": up, "last": last, "lasts": hvd.allgather_object(last)}
            thvd.broadcast_parameters(m.state_dict(), root_rank=last)
            for step in range(2):
                x = torch.randn(4, 10, generator=torch.Generator().manual_seed(100 + rank))
                opt.zero_grad()
                m(x).sum().backward()
                opt.step()
            res["spread_after"] = rank_spread(m)
            if opt.is_taciturn:
                res["steps"] = hvd.allgather_object(opt.compression_state["step"])
                res["fp32_bytes"] = 4 * sum(p.numel() for p in m.parameters())
            out[f"{name}/{first}"] = res
    return out


def force_allreduce(rank):
    """test_force_allreduce: a layer without gradient on rank 0 still takes part (with zeros),
    for every torch optimizer; the ranks stay identical."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2, self.fc3 = torch.nn.Linear(6, 5), torch.nn.Linear(5, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc2(F.relu(self.fc1(x)))
            return h, self.fc3(F.relu(h))

    out = {}
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(rank))
    for name, compression in COMPRESSIONS.items():
        for cls in torch_optimizers():
            m = Net()
            opt = thvd.DistributedOptimizer(build(cls, m.parameters(), dict(lr=0.2, momentum=0.9, weight_decay=0.1)),
                                            named_parameters=m.named_parameters(), compression=compression)
            pred1, pred2 = m(x)
            opt.zero_grad()
            F.mse_loss(pred1 if rank == 0 else pred2, torch.zeros_like(pred1)).backward()
            opt.step()
            out[f"{name}/{cls.__name__}"] = rank_spread(m)
    return out


def no_named_parameters(rank):
    """test_no_named_parameters and test_optimizer_no_named_parameters: without named_parameters
    (two parameter groups) every parameter gets a unique name, the same on every rank, and
    training runs."""
    out = {}
    for name, compression in COMPRESSIONS.items():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10))
        opt = thvd.DistributedOptimizer(torch.optim.SGD([{"params": m[0].parameters()},
                                                         {"params": m[1].parameters(), "lr": 0.01}], lr=0.1),
                                        compression=compression)
        names = set(opt._parameter_names.values())
        opt.zero_grad()
        m(torch.randn(2, 10, generator=torch.Generator().manual_seed(rank))).sum().backward()
        opt.step()
        out[name] = {"unique": len(names) == len(opt._parameter_names) == 4,
                     "same_everywhere": all(n == names for n in hvd.allgather_object(names)),
                     "spread": rank_spread(m)}
    return out


def dynamic_requires_grad(rank):
    """test_dynamic_requires_grad: two optimizers (generator, discriminator), requires_grad
    switched between them every step: only the trained part gets (non-zero) gradients."""
    out = {}
    for name, compression in COMPRESSIONS.items():
        torch.manual_seed(0)
        gen, disc = torch.nn.Conv2d(1, 4, 1), torch.nn.Conv2d(4, 1, 1)
        gen_opt = thvd.DistributedOptimizer(torch.optim.SGD(gen.parameters(), lr=0.1),
                                            named_parameters=gen.named_parameters(), compression=compression)
        disc_opt = thvd.DistributedOptimizer(torch.optim.SGD(disc.parameters(), lr=0.1),
                                             named_parameters=disc.named_parameters(), compression=compression)
        inp = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(rank))
        wrong = []
        for t in range(6):
            train_gen = t % 2 == 0
            for p in gen.parameters():
                p.requires_grad_(train_gen)
            for p in disc.parameters():
                p.requires_grad_(not train_gen)
            gen_opt.zero_grad()
            disc_opt.zero_grad()
            disc(gen(inp)).sum().backward()
            for part, trained in ((gen, train_gen), (disc, not train_gen)):
                for p in part.parameters():
                    if trained != (p.grad is not None and bool(p.grad.abs().max() > 0)):
                        wrong.append(t)
            (gen_opt if train_gen else disc_opt).step()
        out[name] = {"wrong_steps": wrong, "spread": max(rank_spread(gen), rank_spread(disc))}
    return out


def clipping_and_warning(rank):
    """test_gradient_clipping and test_synchronize_step_warning: synchronize(), clip, then step()
    in skip_synchronize() uses the clipped average; step() without it warns exactly once."""
    out = {}
    for name, compression in COMPRESSIONS.items():
        m = torch.nn.Linear(1, 1)
        with torch.no_grad():
            m.weight.fill_(0.5)
            m.bias.zero_()
        opt = thvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                        compression=compression)
        opt.zero_grad()
        F.mse_loss(m(torch.ones(1, 1)), torch.ones(1, 1)).backward()
        opt.synchronize()
        prior = m.weight.grad.item()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
        clipped = m.weight.grad.item()
        weight = m.weight.item()
        with warnings.catch_warnings(record=True) as quiet:
            warnings.simplefilter("always")
            with opt.skip_synchronize():
                opt.step()
        res = {"prior": prior, "clipped": clipped, "update_error": abs(m.weight.item() - (weight - 0.1 * clipped)),
               "skip_warnings": [str(w.message) for w in quiet]}
        opt.zero_grad()
        F.mse_loss(m(torch.zeros(1, 1)), torch.ones(1, 1)).backward()
        opt.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        res["step_warnings"] = [str(w.message) for w in caught]
        out[name] = res
    return out


def accumulation_none(rank):
    """backward_passes_per_step with Horovod's path: the average of the locally accumulated
    gradient, one allreduce per step; a third pass fails with Horovod's message."""
    torch.manual_seed(0)
    m = torch.nn.Linear(5, 2)
    opt = thvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                    compression=thvd.Compression.none, backward_passes_per_step=2)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(rank))
    expected = [dense_average(g) for g in own_grads(m, m(x).sum())]
    opt.zero_grad()
    m(x[:3]).sum().backward()
    m(x[3:]).sum().backward()
    opt.synchronize()
    error = max((p.grad - e).abs().max().item() for p, e in zip(m.parameters(), expected))
    with opt.skip_synchronize():
        opt.step()
    opt.zero_grad()
    third = None
    try:
        for _ in range(3):
            m(x).sum().backward()
    except AssertionError as e:
        third = str(e)
    opt.synchronize()
    return {"average_error": error, "third_pass_error": third}


# ----------------------------------------------------------------------------- main

def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    hvd.init()
    _join_torch_distributed(out_dir)
    rank = hvd.rank()
    scenarios = {"broadcast_state_no_grad": broadcast_state_no_grad, "broadcast_state_options": broadcast_state_options,
                 "sparse_embeddings": sparse_embeddings, "join": join, "force_allreduce": force_allreduce,
                 "no_named_parameters": no_named_parameters, "dynamic_requires_grad": dynamic_requires_grad,
                 "clipping_and_warning": clipping_and_warning, "accumulation_none": accumulation_none}
    run_scenarios(scenarios, rank, out_dir)


if __name__ == "__main__":
    main(sys.argv[1])
