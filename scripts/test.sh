#!/usr/bin/env bash
# Fresh machine -> installed taciturn with every test dependency -> the whole test suite.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/install_deps.sh"
cd "$here"
exec python3 -m pytest -q -p no:cacheprovider tests "$@"
