"""Every preset's trajectory on 2 real ranks, bit for bit against data/trajectories.pt.

The golden file pins the results of the code before the core refactor (presets, compression
state, the exchange); make_trajectories.py made it with the functions this test calls, so
the two sides share one code path. A refactor that changes no result passes; a failure names
the section and preset, the field (params, loss, SAEF's visible parameters, the final
compression state), the first step that differs and the largest absolute difference.
Regenerate only for an intended change of results: see make_trajectories.py.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_trajectories as mt  # noqa: E402

GOLDEN = torch.load(mt.GOLDEN, weights_only=True)
#: section of the golden file -> the fixture that runs it now
SECTIONS = {"optimizers": "optimizer_runs", "ddp": "ddp_runs", "horovod": "horovod_runs"}


@pytest.fixture(scope="module", autouse=True)
def same_machine():
    """Bit-identical floats need the machine the golden file was made on (torch build, CPU
    capability, fused kernels): elsewhere a difference would not mean a change of taciturn."""
    here, there = mt.machine(), GOLDEN["meta"]["machine"]
    changed = {k: (there.get(k), here.get(k)) for k in sorted(here.keys() | there.keys())
               if here.get(k) != there.get(k)}
    if changed:
        pytest.skip(f"the golden trajectories were made on another machine (golden, here): {changed}")


@pytest.fixture(scope="module")
def optimizer_runs(run_ranks):
    return mt.optimizer_runs(run_ranks)


@pytest.fixture(scope="module")
def ddp_runs(run_ranks):
    return mt.ddp_runs(run_ranks)


@pytest.fixture(scope="module")
def horovod_runs(tmp_path_factory):
    try:
        import horovod.torch  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Horovod is not importable ({e}): see scripts/install_horovod.sh")
    return mt.horovod_runs(str(tmp_path_factory.mktemp("hvd-trajectories")))


@pytest.mark.parametrize("section", SECTIONS)
def test_ranks_hold_the_same_parameters(section, request):
    problems = mt.rank_disagreements(request.getfixturevalue(SECTIONS[section]))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("section", SECTIONS)
def test_every_case_has_golden_data(section, request):
    """A preset added without golden data, or one whose golden data no longer runs."""
    now, golden = set(request.getfixturevalue(SECTIONS[section])[0]), set(GOLDEN[section])
    assert now == golden, (f"{section}: not in the golden file: {sorted(now - golden)}; "
                           f"no longer run: {sorted(golden - now)}")


@pytest.mark.parametrize("section,name", [(s, n) for s in SECTIONS for n in GOLDEN[s]],
                         ids=[f"{s}-{n}" for s in SECTIONS for n in GOLDEN[s]])
def test_trajectory_is_bit_identical(section, name, request):
    runs = request.getfixturevalue(SECTIONS[section])
    if name not in runs[0]:
        pytest.fail(f"{section}/{name}: in the golden file but no longer run")
    actual = mt.merge([{name: r[name]} for r in runs])[name]
    problems = mt.differences(f"{section}/{name}", actual, GOLDEN[section][name])
    assert not problems, "\n".join(problems)
