#!/usr/bin/env bash
# The main job: set up (with the demo's extras), generate the built-in specs into generated/, and run the demo:
# a LION-S ViT and a softmax ViT trained on scikit-learn's 8x8 digits (examples/demo.py).
#   bash scripts/demo.sh           the full demo (a few minutes per model on a 2-core CPU); writes docs/demo_digits.png
#   bash scripts/demo.sh --quick   two epochs on a subset, with modules generated into a temporary directory
#                                  (generated/ and docs/ are left as they are); CI runs it in a brand-new
#                                  virtual environment
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
bash scripts/setup.sh demo
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
"$venv/bin/python" examples/demo.py --quick --modules "$scratch" --out "$scratch/demo_digits.png"
