#!/usr/bin/env bash
# Creates (once) the virtual environment .venv and installs lion-gen into it, editable.
# torch is installed first, pinned (on a machine without a GPU this is the CPU build), so that
# the project's plain `torch` requirement does not pull a different build. Usage: scripts/setup.sh [extras]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LION_GEN_VENV:-.venv}"
extras="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  "$py" -m pip install -q "torch==${LION_GEN_TORCH:-2.13.0}"
fi
"$py" -m pip install -q -e ".${extras:+[$extras]}"
