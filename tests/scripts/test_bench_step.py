"""scripts/bench_step.py and scripts/bench_tta.py: their --quick smoke runs (2 real gloo ranks on
loopback, every method) produce complete, self-consistent results and write nothing but --out;
the model sizes and the wire formulas the step benchmark reports are right."""
import hashlib
import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")
TIMEOUT = 600


def _load(name):
    """scripts/<name>.py as a module (scripts/ is on sys.path through tests/conftest.py)."""
    return importlib.import_module(name)


def _fingerprint():
    """Hashes of what a full run writes (BENCHMARKS.md, docs/img/bench_*), to check --quick leaves them."""
    out = {}
    paths = [os.path.join(ROOT, "BENCHMARKS.md")]
    img = os.path.join(ROOT, "docs", "img")
    if os.path.isdir(img):
        paths += [os.path.join(img, f) for f in sorted(os.listdir(img)) if f.startswith(("bench_step", "bench_tta"))]
    for p in paths:
        if os.path.exists(p):
            with open(p, "rb") as f:
                out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


def _run(script, out, *extra):
    before = _fingerprint()
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert _fingerprint() == before, f"{script} --quick must not write BENCHMARKS.md or docs/img"
    assert "loopback" in proc.stderr + proc.stdout
    with open(out) as f:
        return json.load(f), proc.stdout


def test_sizes_and_wire_formulas():
    bench = _load("bench_step")
    assert bench.width_for(bench.parse_size("25M")) == 2236          # FACTS.md's 5 x Linear(2236)
    assert bench.width_for(bench.parse_size("110M")) == 4690
    assert sum(p.numel() for p in bench.mlp(2236).parameters()) == 25_009_660
    with pytest.raises(ValueError, match="25M"):
        bench.parse_size("lots")
    model = bench.mlp(100)                                          # 5 x (100 x 100 weight + 100 bias)
    assert bench.payload_bytes("ddp_fp32", model, 2, None, True) == 4 * 50_500
    assert bench.payload_bytes("ddp_fp16", model, 4, None, True) == 1.5 * 2 * 50_500
    # PowerSGD rank 1 sends P and Q (100 + 100 floats) per matrix and every bias whole
    assert bench.payload_bytes("ddp_powersgd", model, 2, None, True) == 5 * 4 * (200 + 100)
    last = {"bytes_up": 1000, "bytes_down": 1000}                  # two-way: n chunks each way, n-1 travel
    assert bench.payload_bytes("cdadam", model, 4, last, True) == 1500
    assert bench.payload_bytes("sparsams", model, 4, {"bytes_up": 250, "bytes_down": 1000}, False) == 750


def test_bench_step_quick(tmp_path):
    bench = _load("bench_step")
    data, stdout = _run("bench_step.py", tmp_path / "step.json")
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"local", *bench.DEFAULT_METHODS}
    assert all(not r["shaped"] and r["n"] == 2 and r["steps"] == 2 for r in rows.values())
    assert all(r["step"] > 0 and r["compute"] > 0 for r in rows.values())
    fp32 = rows["ddp_fp32"]["payload"]
    assert fp32 == 4 * rows["ddp_fp32"]["params"]                  # 2 ranks: the ring sends the buffer once
    assert rows["ddp_fp16"]["payload"] == rows["horovod_fp16"]["payload"] == fp32 / 2
    # taciturn's fp32 path moves the same bytes as the ring (chunks padded to 8 bytes)
    assert rows["amsgrad"]["payload"] == pytest.approx(fp32, rel=1e-3)
    for m in ("cdadam", "onebitadam", "distefsgd"):                 # 1 bit + a scale per 1024 elements
        assert 25 < fp32 / rows[m]["payload"] < 32, m
    for m in ("sparsams", "saefsgd"):                               # top-1 %: values and indices
        assert fp32 / rows[m]["payload"] > 20, m
    for r in rows.values():
        if r["family"] == "taciturn":                               # the optimizer timed its own phases
            assert r["collective"] > 0 and r["compress"] > 0
            assert r["collective"] + r["compress"] < r["opt"] * 1.05
    assert "DDP + PowerSGD hook (rank 1)" in stdout and "payload MB/step" in stdout


def test_bench_tta_quick(tmp_path):
    tta = _load("bench_tta")
    data, stdout = _run("bench_tta.py", tmp_path / "tta.json")
    results = {r["method"]: r for r in data["results"]}
    assert list(results) == list(tta.DEFAULT_METHODS) and not data["shaped"]
    for r in results.values():
        curve = r["curve"]
        assert [p["step"] for p in curve] == [0, 30, 60]
        assert all(b["seconds"] > a["seconds"] and b["bytes"] >= a["bytes"] for a, b in zip(curve, curve[1:]))
        assert curve[-1]["bytes"] > 0
    final = {m: r["curve"][-1] for m, r in results.items()}
    fp32 = final["amsgrad"]["bytes"]
    assert final["sgdm"]["bytes"] == fp32
    for m in ("cdadam", "onebitadam_cdadam", "distefsgd"):
        assert fp32 / final[m]["bytes"] > 20, m
    for m in ("sparsams", "saefsgd"):
        assert fp32 / final[m]["bytes"] > 20, m
    # OneBitAdam with Adam's warm-up sends fp32 for its first 15 % of steps, then 1 bit
    assert final["cdadam"]["bytes"] < final["onebitadam_adam"]["bytes"] < fp32 / 3
    # 0/1 Adam: fp32 on its thinning variance steps in the first 15 %, then 1-bit synchronisations
    # and local steps of 0 bytes; its CD-Adam variance phase sends no fp32 step
    assert final["zerooneadam_cdadam"]["bytes"] < final["cdadam"]["bytes"] < final["zerooneadam_adam"]["bytes"] < fp32 / 3
    for m in ("cdadam", "amsgrad", "sgdm", "distefsgd", "saefsgd", "onebitadam_cdadam", "zerooneadam_adam",
              "zerooneadam_cdadam"):
        assert final[m]["accuracy"] > 0.5, (m, final[m]["accuracy"])   # 60 steps; chance is 0.1
    assert "time to 80%" in stdout


def test_bench_tta_lamb_quick(tmp_path):
    """--lamb: 8 micro steps per step, 1-bit LAMB against LAMB (its warm-up throughout, fp32)."""
    data, stdout = _run("bench_tta.py", tmp_path / "lamb.json", "--lamb")
    final = {r["method"]: r["curve"][-1] for r in data["results"]}
    assert list(final) == ["lamb", "onebitlamb_lamb", "onebitlamb_cdadam", "cdadam"] and data["lamb"]
    assert "x 8 micro steps (1024 samples per step)" in data["what"]
    fp32 = final["lamb"]["bytes"]
    assert final["onebitlamb_cdadam"]["bytes"] < fp32 / 20 and final["onebitlamb_lamb"]["bytes"] < fp32 / 3
    for m, r in final.items():
        assert r["accuracy"] > 0.5, (m, r["accuracy"])
    assert "fewer bytes than LAMB" in stdout
