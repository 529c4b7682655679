#!/usr/bin/env bash
# DeepSpeed pieces for taciturn's DeepSpeed integration tests, after install_deps.sh has installed
# deepspeed 0.19.x. Idempotent: a second run finds everything in place and builds nothing.
#  1. JIT-builds DeepSpeed's CPU shared-memory comm op (g++, about a minute) now, so the first
#     engine of the test suite does not.
#  2. A second interpreter with DeepSpeed 0.16.9 (the last line with its own 1-bit Adam), to test
#     the integration on an old release: a venv that sees this Python's packages (torch, taciturn,
#     DeepSpeed's dependencies) and adds only deepspeed 0.16.9, with its op built into its own
#     TORCH_EXTENSIONS_DIR (both releases name the op alike; one cache would rebuild at every switch).
# Venv location: $TACITURN_DS_LEGACY_VENV, default ~/.cache/taciturn/venv-deepspeed-0.16.9
set -euo pipefail
PY="${PYTHON:-python3}"
VERSION=0.16.9
VENV="${TACITURN_DS_LEGACY_VENV:-$HOME/.cache/taciturn/venv-deepspeed-$VERSION}"
BUILD_OP="from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"

DS_ACCELERATOR=cpu "$PY" -c "$BUILD_OP" >/dev/null

if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c \
        "import deepspeed, sys; sys.exit(deepspeed.__version__ != '$VERSION')" 2>/dev/null; }; then
    echo "[taciturn] deepspeed $VERSION venv -> $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install -q --no-deps "deepspeed==$VERSION"
fi
DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$VENV/torch_extensions" "$VENV/bin/python" -c \
    "import deepspeed, taciturn; assert deepspeed.__version__ == '$VERSION'; $BUILD_OP" >/dev/null
