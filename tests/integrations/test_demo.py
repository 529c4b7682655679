"""scripts/demo_fashion.py end to end, shrunk: both parts run on 2 ranks (namespaces as root,
loopback otherwise), print their tables, and write the results and the plot."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_small_run(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo_fashion.py"), "--out", str(out),
                          "--exchange-numel", "300000", "--exchange-repeats", "1", "--hidden", "64", "--epochs", "1",
                          "--batch-size", "500", "--evals", "2"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = res.stdout
    assert "Part 1: two ranks exchange a 0.3M-element fp32 buffer" in text
    for label in ("torch all_reduce, fp32", "taciturn identity (fp32)", "taciturn block_sign(256) + Markov",
                  "AMSGrad (fp32)", "CD-Adam (1-bit)"):
        assert label in text
    assert f"plot: {out / 'fashion_mnist.png'}" in text
    assert (out / "fashion_mnist.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    ams, cd = summary["results"]
    assert ams["method"] == "amsgrad" and cd["method"] == "cdadam"
    assert ams["steps"] == cd["steps"] == 60  # 30000 samples per rank / batch 500
    # 1 bit per element + one fp32 scale per 256 elements, both ways: > 20x fewer bytes than fp32
    assert ams["bytes_up"] > 20 * cd["bytes_up"] and ams["bytes_down"] > 20 * cd["bytes_down"]
    assert ams["bytes_up"] == pytest.approx(ams["fp32_bytes"], rel=1e-3)  # fp32, chunks padded to 8 bytes
    # 60 steps are enough to learn something real, with either method
    assert ams["accuracy"] > 0.7 and cd["accuracy"] > 0.6
    if summary["network"].startswith("simulated"):
        tx, rx = cd["link_counters"]
        assert cd["bytes_up"] + cd["bytes_down"] <= tx <= 1.3 * (cd["bytes_up"] + cd["bytes_down"]) + 100_000
