#!/usr/bin/env bash
# The main job: set up, generate the built-in specs into generated/, and run a short demo with them.
#   bash scripts/demo.sh           the full demo (about two minutes on a CPU, under the Triton interpreter)
#   bash scripts/demo.sh --quick   a shorter demo with modules generated into a temporary directory
#                                  (generated/ is left as it is); CI runs it in a brand-new virtual environment
set -euo pipefail
cd "$(dirname "$0")/.."
quick=""
case "${1:-}" in
  "") ;;
  --quick) quick=1 ;;
  *)
    echo "usage: bash scripts/demo.sh [--quick]" >&2
    exit 2
    ;;
esac
bash scripts/setup.sh
venv="${LION_GEN_VENV:-.venv}"
if [ -z "$quick" ]; then
  "$venv/bin/lion-gen" specs/*.yaml
  "$venv/bin/python" examples/demo.py
  exit 0
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$venv/bin/lion-gen" specs/*.yaml --out "$scratch/generated"
: >"$scratch/generated/__init__.py"
"$venv/bin/python" examples/demo.py --quick --modules "$scratch"
