#!/usr/bin/env bash
# Creates (once) the virtual environment .venv and installs lion-gen into it, editable.
# torch is installed first, pinned (on a machine without a GPU this is the CPU build), so that
# the project's plain `torch` requirement does not pull a different build. Usage: scripts/setup.sh [extras]
# Says in a line what each step does; pip itself stays quiet (its errors still show).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LION_GEN_VENV:-.venv}"
extras="${1:-}"
torch_version="${LION_GEN_TORCH:-2.13.0}"
say() { echo "setup: $*"; }
if [ ! -x "$venv/bin/python" ]; then
  say "creating the virtual environment $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  say "installing torch $torch_version into $venv (the build pip picks for this machine; a minute or more)"
  "$py" -m pip install -q "torch==$torch_version"
  say "installed torch $("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
fi
say "installing lion-gen (editable) and its dependencies${extras:+ with the extras [$extras]} into $venv"
"$py" -m pip install -q -e ".${extras:+[$extras]}"
