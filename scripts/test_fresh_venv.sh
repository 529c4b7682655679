#!/usr/bin/env bash
# The README's two commands inside a fresh virtualenv made from this machine's python3: what a
# user who works in a venv runs. Every install script then installs into the venv (torch, taciturn,
# DeepSpeed 0.19 and the 0.16.9 side venv over it, Horovod built against the venv's torch).
# `test_fresh_venv.sh [pytest args]`: the venv is new at every run and removed afterwards.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
echo "[taciturn] fresh venv: $(command -v python3)"
# the legacy DeepSpeed venv is the user's own too: built from this venv, not shared with the system run
export TACITURN_DS_LEGACY_VENV="$(dirname "$venv")/venv-deepspeed-0.16.9"
bash "$here/scripts/demo.sh" --epochs 1
bash "$here/scripts/test.sh" "$@"
