#!/usr/bin/env bash
# The main job: set up, generate the built-in specs into generated/, and run a short demo with them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv="${LION_GEN_VENV:-.venv}"
"$venv/bin/lion-gen" specs/*.yaml
"$venv/bin/python" examples/demo.py
