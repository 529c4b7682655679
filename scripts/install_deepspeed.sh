#!/usr/bin/env bash
# DeepSpeed pieces for taciturn's DeepSpeed integration tests, after install_deps.sh has installed
# deepspeed 0.19.x. Idempotent: a second run finds everything in place and builds nothing.
#  1. JIT-builds DeepSpeed's CPU shared-memory comm op (g++, about a minute) now, so the first
#     engine of the test suite does not.
#  2. A second interpreter with DeepSpeed 0.16.9 (the last line with its own 1-bit Adam), to test
#     the integration on an old release: a plain venv holding only deepspeed 0.16.9, plus a .pth
#     file that adds the site directories of the interpreter this script runs for ($PYTHON: the
#     system Python, an active venv or a conda env alike) after its own, so it sees that
#     environment's torch, taciturn and DeepSpeed's dependencies. (A venv that sees the system site
#     packages would see the BASE interpreter's packages, not an active venv's.) The .pth file is rewritten
#     at every run, so the venv follows whichever environment ran this script last. Its op is
#     built into its own TORCH_EXTENSIONS_DIR (both releases name the op alike; one cache would
#     rebuild at every switch).
# Venv location: $TACITURN_DS_LEGACY_VENV, default ~/.cache/taciturn/venv-deepspeed-0.16.9
set -euo pipefail
PY="${PYTHON:-python3}"
VERSION=0.16.9
VENV="${TACITURN_DS_LEGACY_VENV:-$HOME/.cache/taciturn/venv-deepspeed-$VERSION}"
BUILD_OP="from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"

DS_ACCELERATOR=cpu "$PY" -c "$BUILD_OP" >/dev/null

if [ ! -x "$VENV/bin/python" ]; then
    echo "[taciturn] deepspeed $VERSION venv -> $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
# The parent environment's site directories, in its own order (a venv's own, then the ones it
# sees itself: the system site packages, user site), each processed with its .pth files (editable
# installs such as taciturn's are .pth files).
parent_sites="$("$PY" -c "import os, sys; print(repr([p for p in sys.path if os.path.basename(p) in ('site-packages', 'dist-packages') and os.path.isdir(p)]))")"
own_site="$("$VENV/bin/python" -c "import sys, sysconfig; assert sys.prefix != sys.base_prefix, 'not a venv'; print(sysconfig.get_paths()['purelib'])")"
echo "import site; list(map(site.addsitedir, $parent_sites))" > "$own_site/taciturn-parent-env.pth"
# deepspeed 0.16.9 in the venv's own site-packages (its pip leaves the parent's deepspeed alone)
if ! "$VENV/bin/python" -c "import deepspeed, sys; sys.exit(deepspeed.__version__ != '$VERSION')" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --no-deps "deepspeed==$VERSION"
fi
DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$VENV/torch_extensions" "$VENV/bin/python" - "$PY" <<PYEOF >/dev/null
import subprocess, sys
import deepspeed, taciturn, torch
parent = subprocess.run([sys.argv[1], "-c", "import taciturn, torch; print(taciturn.__file__, torch.__version__)"],
                        check=True, capture_output=True, text=True).stdout.split()
assert deepspeed.__version__ == "$VERSION", deepspeed.__version__
assert [taciturn.__file__, torch.__version__] == parent, ([taciturn.__file__, torch.__version__], parent)
$BUILD_OP
PYEOF
