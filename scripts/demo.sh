#!/usr/bin/env bash
# The main demo, on a fresh machine: installs what it needs (idempotent), then runs two ranks
# over a simulated 1 Gbit link (network namespaces + tc; plain loopback without root):
#   1. compress and exchange a 25M-element buffer, bytes and time per direction next to fp32;
#   2. Fashion-MNIST, CD-Adam vs uncompressed AMSGrad: a table and a plot under results/demo/.
# Extra arguments go to scripts/demo_fashion.py (e.g. --rate 100mbit, --epochs 3; see --help).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/install_deps.sh" demo
cd "$here"
exec "${PYTHON:-python3}" scripts/demo_fashion.py "$@"
