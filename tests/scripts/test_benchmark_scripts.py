"""Smoke tests of the reproduction, memory and soak scripts: each runs as a user would
(``python scripts/X.py --quick``), exits 0, prints its table with the expected rows and exact
byte counts, and leaves its section of BENCHMARKS.md alone in quick mode."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import _bench  # scripts/, on sys.path through tests/conftest.py
import netcluster

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")
NO_NAMESPACES = netcluster.namespaces_unavailable()  # why shaped namespaces cannot be built, or None

# script -> patterns its --quick output must contain (regular expressions, one line each)
EXPECTED = {
    "bench_accuracy.py": [
        # MLP 784-32-32-10 (26,506 parameters): fp32 4 B/param each way; block sign 1 bit + a scale per block
        r"^\| AMSGrad \(uncompressed\)\s+\| 0\.001\s+\|.*\| 106,032 / 106,032\s+\| 1\.0x / 1\.0x\s+\|",
        r"^\| CD-Adam \(1024-blocks\)\s+\| 0\.001\s+\|.*\| 3,440 / 3,440\s+\| 30\.8x / 30\.8x\s+\|",
        # the warm-up-Adam divergence: the default floor converges, Tang et al.'s exact form does not
        r"^\| OneBitAdam warm-up Adam \(variance_floor 0\.1, default\)\s+\| 0\.001\s+\| [5-9]\d\.\d\d ± 0\.00\s+\|",
        r"^\| OneBitAdam warm-up Adam, variance_floor 0 \(1 of 1 diverged\)\s+\| 1[0-2]\.\d\d",  # chance
        r"^\| 256-blocks\s+\|.*\| 28\.\dx / 28\.\dx\s+\|",
    ],
    "soak.py": [
        # 2 ranks x 200 steps, identical ranks (memory is judged only in full-length runs)
        r"^\| CD-Adam \(block sign, Markov both ways\)\s+\| 200\s+\|.*\| not judged\s+\| yes\s+\|",
        r"^\| SPARS-AMS \(top-1%, EF, one-way\)\s+\| 200\s+\|",
        r"^soak: PASS",
    ],
    "bench_memory.py": [
        # torch AMSGrad: exp_avg, exp_avg_sq, max_exp_avg_sq = 12 B/param whatever n is
        r"^\| torch Adam\(amsgrad=True\)\s+\| 12\.00\s+\| 12\.00\s+\| 12\.00\s+\| 12\.00\s+\| 1\.00x\s+\| 1\.00x",
        # CD-Adam: AMSGrad's 12 + worker h 4 + server H 4/n + shared G 4 B/param (n = 1, 2, 4)
        r"^\| CDAdam\s+\| 12\.00\s+\| 24\.00\s+\| 22\.0\d\s+\| 21\.0\d\s+\| 2\.00x",
        # sharded: h whole, H / m / v / v^ / downlink error on the chunk: 4 + 20/n
        r"^\| CDAdam sharded \(1bit downlink\)\s+\| 0\.00\s+\| 24\.00\s+\| 14\.0\d\s+\| 9\.0\d\s+\|",
        # the prediction for n ranks equals what 2 real ranks hold
        r"^\| CDAdam\s+\| \d+\s+\| \d+ / \d+\s+\| yes\s+\|",
    ],
    "bench_repro_cdadam.py": [
        # d = 196: fp32 2 x 32 x 196 bits; scaled sign 2 x padded(4 + 25 bytes) = 2 x 256 bits
        r"^\| AMSGrad \(uncompressed\)\s+\| 0\.005\s+\| 12,544\s+\|",
        r"^\| CD-Adam\s+\| 0\.005\s+\| 512\s+\|",
        r"^\| Markov one-way\s+\| 0\.005\s+\| 6,528\s+\|",
    ],
    "bench_repro_blocksign.py": [
        r"^\| SGDM \(fp32\)\s+\| 64\.0\d\d\s+\| 1\.0x\s+\|",
        r"^\| dist-EF-blockSGDM, per tensor\s+\| 2\.0\d\d\s+\|",
        r"^\| whole vector \(non-block\)\s+\|",
    ],
    "bench_repro_saef.py": [
        r"^\| EF \(local error feedback\)\s+\|",
        r"^\| p = inf\s+\| 60\.59\s+\| \+10\.59\s+\|",
        r"^\| p = 5\s+\| 65\.62\s+\|",
    ],
    "bench_repro_sparsams.py": [
        r"^\| AMSGrad \(fp32\)\s+\| 64\.0\d\d\s+\|",
        r"^\| SPARS-AMS, k = 1%\s+\|",
        r"^\| top-k without EF, k = 1%\s+\|",
    ],
}


def _own_section(script: str) -> str:
    """The script's section of BENCHMARKS.md (between its markers), "" when absent; other
    sections may change meanwhile (other scripts, other jobs) and are not compared."""
    name = script[:-3]
    try:
        with open(_bench.BENCHMARKS_MD, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    match = re.search(f"<!-- {name}:start -->(.*?)<!-- {name}:end -->", text, re.S)
    return match.group(1) if match else ""


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_quick_run_prints_its_table(script):
    before = _own_section(script)
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert re.search(r"^\| [^\n]+\|\n\|-", proc.stdout, re.M), f"{script} printed no Markdown table:\n{proc.stdout}"
    for pattern in EXPECTED[script]:
        assert re.search(pattern, proc.stdout, re.M), f"{script}: no line matches {pattern!r} in:\n{proc.stdout}"
    assert _own_section(script) == before, f"{script} --quick rewrote its section of BENCHMARKS.md"


def test_write_section_replaces_only_its_own_section(tmp_path):
    path = str(tmp_path / "B.md")
    _bench.write_section("one", "first\nbody", path)
    _bench.write_section("two", "other script", path)
    _bench.write_section("one", "second", path)
    text = open(path).read()
    assert text.startswith("# taciturn benchmarks")
    assert "<!-- one:start -->\nsecond\n<!-- one:end -->" in text
    assert "first" not in text
    assert "<!-- two:start -->\nother script\n<!-- two:end -->" in text
    assert text.index("one:start") < text.index("two:start")


def test_table_pads_columns():
    assert _bench.table(["a", "bb"], [[1, 2], ["long", 3]]) == (
        "| a    | bb |\n|------|----|\n| 1    | 2  |\n| long | 3  |")


def _rank(rss, digest):
    return {"records": [{"step": s, "rss": r} for s, r in zip((0, 500, 2500, 5000), rss)], "digest": digest}


def test_soak_verdict_flags_growth_and_divergence():
    import soak

    # warm-up growth in the first half is not a leak
    steady = [_rank((400.0, 410.0, 420.0, 421.0), "a"), _rank((400.0, 419.0, 420.0, 420.5), "a")]
    assert soak.verdict(steady) == dict(second_half=[1.0, 0.5], growth=[11.0, 1.5], total=[21.0, 20.5],
                                        identical=True, flat=True)
    leaking = [_rank((400.0, 420.0, 421.0, 421.0 + soak.FLAT_MIB + 0.5), "a"), _rank((400.0, 420.0, 420.0, 420.0), "a")]
    assert soak.verdict(leaking)["flat"] is False
    diverged = [_rank((400.0, 420.0, 420.0, 420.0), "a"), _rank((400.0, 420.0, 420.0, 420.0), "b")]
    assert soak.verdict(diverged)["identical"] is False
    assert soak.verdict(leaking, judge_memory=False)["flat"] is None


@pytest.mark.skipif(NO_NAMESPACES is not None, reason=str(NO_NAMESPACES))
def test_bench_accuracy_on_shaped_links_trains_as_on_loopback(tmp_path):
    """--rate runs the ranks in shaped namespaces: the same weights and curves as loopback (the
    links change the time, not the numbers), a training-time column, and its own results file."""
    # MLP 784-64-64-10: 221 KB of fp32 per step, well past the links' 64 KiB tbf burst, so the
    # shaping shows in AMSGrad's time (a 784-16-16-10's 52 KB fit in the burst)
    common = ["--steps", "300", "--seeds", "1", "--hidden", "64", "--final", "amsgrad,cdadam", "--grid", "0.001",
              "--ablation", "", "--no-write"]
    out = {}
    for name, extra in (("loopback", []), ("shaped", ["--rate", "100mbit"])):
        path = str(tmp_path / f"{name}.json")
        proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench_accuracy.py"), *common, "--out", path,
                               *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = (json.load(open(path)), proc.stdout)
    (loop, loop_text), (shaped, shaped_text) = out["loopback"], out["shaped"]
    assert shaped["net"].startswith("2 network namespaces, 100mbit links") and loop["net"] == "loopback"
    assert shaped["shaped"] and not loop["shaped"]
    for key, runs in loop["results"].items():
        assert [(r["checksum"], r["curve"]) for r in runs] == \
            [(r["checksum"], r["curve"]) for r in shaped["results"][key]]
    # AMSGrad's fp32 exchange takes longer at 100 Mbit than CD-Adam's 30x smaller one (about 18 ms
    # against 1 ms a step there)
    times = {json.loads(key)[0]: runs[0]["seconds"] for key, runs in shaped["results"].items()}
    assert times["AMSGrad"] > times["CDAdam"] > 0
    assert "training s at 100mbit" in shaped_text and "training s at" not in loop_text
    import bench_accuracy

    assert bench_accuracy._section("mlp", 300, rate="100mbit") == "bench_accuracy_300steps_100mbit"


def test_finetune_passes_momentum_correction_only_to_optimizers_that_take_it():
    import finetune_fortunes as ft

    args = ft.parse_args(["--optimizer", "sparsams", "cdadam", "--momentum-correction"])
    assert ft.extra_kwargs("sparsams", args, 100).get("momentum_correction") is True
    assert "momentum_correction" not in ft.extra_kwargs("cdadam", args, 100)
    assert "momentum_correction" not in ft.extra_kwargs("sparsams", ft.parse_args(["--optimizer", "sparsams"]), 100)
