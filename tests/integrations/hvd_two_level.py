"""The two-level exchange through Horovod, launched by tests/integrations/test_horovod.py as
``horovodrun -np 4`` with HOROVOD_DYNAMIC_PROCESS_SETS=1: 2 nodes x 2 ranks on process sets.

Usage: ``HOROVOD_DYNAMIC_PROCESS_SETS=1 horovodrun -np 4 --gloo python hvd_two_level.py OUT_DIR``.
Each rank saves ``OUT_DIR/rank<r>.pt``; scenarios as in hvd_train.py.
"""
from __future__ import annotations

import sys

import horovod.torch as hvd
import taciturn
from taciturn.integrations import horovod as thvd

from hvd_train import LR, SMALL_BUCKETS, _join_torch_distributed, lockstep, model, rank_spread, run_scenarios, wrap


def two_level(rank):
    """Compression.cdadam two-level on process sets vs taciturn.CDAdam two-level over torch.distributed."""
    out = {}
    for dtype in ("fp32", "bf16"):
        m_ref, m = model(), model()
        ref = taciturn.CDAdam(m_ref.parameters(), lr=LR, ranks_per_node=2, intra_node_dtype=dtype)
        opt = wrap(m, compression=thvd.Compression.cdadam, bucket_cap_mb=SMALL_BUCKETS, ranks_per_node=2,
                   intra_node_dtype=dtype)
        out[dtype] = {"diffs": lockstep(rank, ref, m_ref, opt, m, steps=4), "spread": rank_spread(m),
                      "intra": opt.metrics()["taciturn/bytes_intra"], "inter_world": opt.exchange.inter.world_size}
    return out


def auto(rank):
    """ranks_per_node="auto" reads hvd.local_size(): one host, one node of all the ranks."""
    m = model()
    opt = wrap(m, compression=thvd.Compression.cdadam, ranks_per_node="auto")
    lockstep(rank, taciturn.CDAdam(model().parameters(), lr=LR, ranks_per_node=hvd.local_size()), model(), opt, m)
    return {"ranks_per_node": opt.exchange.ranks_per_node, "local_size": hvd.local_size(), "spread": rank_spread(m)}


def main(out_dir: str) -> None:
    hvd.init()
    _join_torch_distributed(out_dir)
    run_scenarios({"two_level": two_level, "auto": auto}, hvd.rank(), out_dir)


if __name__ == "__main__":
    main(sys.argv[1])
