#!/usr/bin/env bash
# One command on a machine with a GPU: the kernel tests compiled (not interpreted) in float32 and
# bfloat16, long sequences up to L = 16384, the benchmark at the anchor shape (table and JSON in
# benchmarks/results/), then the recurrent form, causal state, padding and packed-batch tests compiled
# (last, so that a slow compile of their many kernel variants cannot hold up the benchmark). Without a GPU it runs the same steps at smoke sizes on the CPU under the Triton
# interpreter (CI runs that path).
#
# Python: $LION_GEN_PYTHON, else .venv/bin/python when it exists, else python3 (on the device machine,
# which has torch, triton, pytest and the rest installed and no network: run it with PYTHONPATH=.).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${LION_GEN_PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
start=$SECONDS
workers=()
if "$py" -c "import xdist" >/dev/null 2>&1; then workers=(-n "${LION_GEN_TEST_WORKERS:-4}"); fi
if "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  unset TRITON_INTERPRET
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "gpu_check: 1/4 kernel tests, compiled, float32 and bfloat16"
  "$py" -m pytest -q -x "${workers[@]}" tests/test_kernels.py tests/test_segments.py
  echo "gpu_check: 2/4 long sequences (L up to 16384) against float64 on the GPU ($((SECONDS - start)) s so far)"
  "$py" -m pytest -q -x tests/test_gpu.py
  echo "gpu_check: 3/4 benchmark at the anchor shape ($((SECONDS - start)) s so far)"
  "$py" -m benchmarks.bench --out benchmarks/results
  echo "gpu_check: 4/4 the other forms, compiled: recurrent, causal state, padding, packed batches ($((SECONDS - start)) s so far)"
  "$py" -m pytest -q "${workers[@]}" tests/test_recurrent.py tests/test_state.py tests/test_padding.py tests/test_varlen.py
else
  echo "gpu_check: no GPU: the smoke path on the CPU (Triton interpreter)"
  "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py
  "$py" -m benchmarks.bench --smoke --specs lion_s --lengths 20 --out "$(mktemp -d)"
fi
echo "gpu_check: done in $((SECONDS - start)) s"
