"""An elastic Horovod job that test_horovod.py launches with ``horovodrun --host-discovery-script``.

Both ranks train a reference for N steps without interruption, then the same training under
``hvd.elastic.run`` with a ``TorchState`` committed every 2 steps; at step 3 both ranks raise
``HorovodInternalError`` once. Horovod restores the commit (parameters and the compression
state in the optimizer's state dict), shuts down, re-initialises, syncs the state and replays
the steps: the final parameters must equal the reference's. Each rank saves
``OUT_DIR/rank<r>.pt``.
"""
from __future__ import annotations

import os
import sys

import torch

import horovod.torch as hvd
from hvd_train import batch, loss_of, max_diff, model, wrap

STEPS = 6
FAIL_AT = 3


def step(opt, m, t):
    opt.zero_grad()
    loss_of(m, *batch(t, hvd.rank())).backward()
    opt.step()


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    hvd.init()
    m_ref = model()
    ref = wrap(m_ref)
    for t in range(STEPS):
        step(ref, m_ref, t)

    m = model()
    opt = wrap(m)
    events = []

    @hvd.elastic.run
    def train(state):
        while state.t < STEPS:
            if state.t == FAIL_AT and "failed" not in events:
                events.append("failed")
                raise hvd.HorovodInternalError("injected by the test")
            step(opt, m, state.t)
            state.t += 1
            if state.t % 2 == 0:
                state.commit()

    state = hvd.elastic.TorchState(model=m, optimizer=opt, t=0)
    state.register_reset_callbacks([lambda: events.append(f"reset:{hvd.size()}")])
    train(state)
    torch.save({"events": events, "diff": max_diff(m, m_ref), "step": opt.compression_state["step"],
                "ref_step": ref.compression_state["step"], "handler": type(state._handlers["optimizer"]).__name__},
               os.path.join(out_dir, f"rank{hvd.rank()}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
