#!/usr/bin/env bash
# Installs everything taciturn's demo, tests and benchmarks need into the current Python
# environment. Idempotent: a second run finds everything present and installs nothing.
# `install_deps.sh demo` installs only what the main demo needs (apt data, iproute2, torch,
# taciturn with its test extra); without an argument, everything the tests need (triton included:
# tests/gpu runs the CUDA kernels under its interpreter on a machine without a GPU).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
mode="${1:-all}"

apt_pkgs=(libopenmpi-dev openmpi-bin dataset-fashion-mnist fortunes iproute2 cmake g++)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "[taciturn] apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# torch first: the CPU wheel on this disk. With no torch present, deepspeed would pull a CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
# Whether this tree is the installed taciturn and every requirement of the given extras (setup.py's
# bounds included) is met by what is installed; then pip is skipped.
installed() {
    "$PY" - "$here" "$@" <<'PYEOF' 2>/dev/null
import importlib.metadata as md, os, sys
from packaging.requirements import Requirement
import taciturn
assert os.path.realpath(os.path.dirname(taciturn.__file__)) == os.path.realpath(os.path.join(sys.argv[1], "plugin"))
extras = [""] + sys.argv[2:]
assert set(sys.argv[2:]) <= set(md.metadata("taciturn").get_all("Provides-Extra") or [])  # metadata of this setup.py
for req in map(Requirement, md.requires("taciturn") or []):
    if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
        assert req.specifier.contains(md.version(req.name), prereleases=True), req
PYEOF
}
if [ "$mode" = demo ]; then
    installed test || "$PY" -m pip install -q -e "$here[test]"
    exit 0
fi
installed test deepspeed hf mpi triton || "$PY" -m pip install -q -e "$here[test,deepspeed,hf,mpi,triton]"
bash "$here/scripts/install_horovod.sh"
PYTHON="$PY" bash "$here/scripts/install_deepspeed.sh"
