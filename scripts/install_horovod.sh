#!/usr/bin/env bash
# Builds Horovod 0.28.1 from its PyPI sdist against the installed torch (>= 2.1 needs C++17;
# Horovod's CMake files ask for C++14). Idempotent: skips when horovod.torch already imports
# with PyTorch, MPI and Gloo built in. Fails loudly, with the build log's tail, otherwise.
set -euo pipefail
PY="${PYTHON:-python3}"
if "$PY" - <<'PYEOF' 2>/dev/null
import horovod.torch as hvd
assert hvd.mpi_built() and hvd.gloo_built()
PYEOF
then
    echo "[taciturn] horovod already built"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "[taciturn] building horovod 0.28.1 (about 3 minutes)"
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" "horovod==0.28.1"
tar -xzf "$work"/horovod-0.28.1.tar.gz -C "$work"
src="$work/horovod-0.28.1"
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
grep -q "CMAKE_CXX_STANDARD 17" "$src/horovod/torch/CMakeLists.txt" || {
    echo "[taciturn] ERROR: could not raise Horovod's C++ standard to 17 (CMakeLists.txt changed?)" >&2; exit 1; }
"$PY" -m pip install -q cloudpickle psutil pyyaml packaging
if ! (cd "$src" && CMAKE_POLICY_VERSION_MINIMUM=3.5 HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
      HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_CPU_OPERATIONS=gloo \
      MAKEFLAGS="-j$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps . >"$work/build.log" 2>&1); then
    echo "[taciturn] ERROR: Horovod build failed; last lines of the log:" >&2
    tail -40 "$work/build.log" >&2
    exit 1
fi
"$PY" -c "import horovod.torch as hvd; assert hvd.mpi_built() and hvd.gloo_built(); print('[taciturn] horovod', __import__('horovod').__version__, 'built')"
