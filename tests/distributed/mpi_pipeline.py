"""Rank side of test_mpi.py, launched as ``mpirun -np N python3 mpi_pipeline.py SPEC OUT_DIR``.

Every rank runs ``Exchange.allreduce`` over mpi4py (``make_communicator("mpi")``) on the inputs
in SPEC (a ``torch.save``d dict made by the test), then the sharded-state optimizers
(``shard_state=True``, ``process_group="mpi"``) with those inputs as gradients, and saves its
results as OUT_DIR/rank<r>.pt; the test compares the ranks and the plain references.
"""
from __future__ import annotations

import os
import sys

import torch

import taciturn
from taciturn import Exchange, make_communicator, make_compressor
from taciturn.feedback import make_feedback


def main(spec_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    spec = torch.load(spec_path)
    comm = make_communicator("mpi")
    out = {"communicator": type(comm).__name__, "world_size": comm.world_size}
    for case in spec["cases"]:
        name, opts, rule, two_way = case
        pipe = Exchange(spec["sizes"], make_compressor(name, **dict(opts)), make_feedback(rule), make_feedback(rule),
                        comm, two_way=two_way, bucket_cap_mb=spec["bucket_cap_mb"])
        states = pipe.init_state()
        steps = []
        for t, per_rank in enumerate(spec["inputs"]):
            res = pipe.allreduce(per_rank[comm.rank], states, error_scale=spec["ef_scales"][t], step=t)
            steps.append(torch.cat([r.reshape(-1) for r in res]))
        buckets = [([pipe.sizes[i] for i in idx], list(lay.cuts)) for idx, lay in zip(pipe.buckets, pipe.layouts)]
        out[case] = (torch.stack(steps), buckets)
    for label, cls, kwargs in (("sharded_cdadam", "CDAdam", dict(shard_state=True)),
                               ("sharded_amsgrad_fp32", "AMSGrad", dict(shard_state=True, downlink="fp32")),
                               ("amsgrad", "AMSGrad", {})):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in spec["sizes"]]
        opt = getattr(taciturn, cls)(params, lr=0.01, process_group="mpi", bucket_cap_mb=spec["bucket_cap_mb"],
                                     **kwargs)
        for per_rank in spec["inputs"]:
            for p, g in zip(params, per_rank[comm.rank]):
                p.grad = g.float()
            opt.step()
        out[label] = torch.cat([p.detach().reshape(-1) for p in params])
    torch.save(out, os.path.join(out_dir, f"rank{comm.rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
