#!/usr/bin/env bash
# The test command: set up (with test extras), lint, check generated/ is fresh, run the tests.
# Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
venv="${LION_GEN_VENV:-.venv}"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/lion-gen" --check
"$venv/bin/python" -m pytest -q -n "${LION_GEN_TEST_WORKERS:-2}" "$@"
