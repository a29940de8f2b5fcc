"""Compiled-path checks that need no GPU: ahead-of-time compiles for Hopper, and the launch fallback.

The interpreter runs kernels as numpy and accepts things the compiler rejects; these compiles catch
that class of error on a CPU-only machine. They do not run the compiled code: a miscompile (such as
Triton's tl.dot(tl.trans(dot result)) bug on Hopper) still needs a GPU run against the float64 oracle.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
from triton.runtime.errors import OutOfResources

from lion_gen.runtime import launch

SPECS = ["lion_lit", "lion_d", "lion_s", "lion_s_causal", "lion_s_sym", "linear_causal", "retention"]
H100_SHARED = 232448  # bytes of shared memory one block may use on sm_90
TYPED_POINTERS = {"q_ptr", "k_ptr", "v_ptr", "y_ptr", "dy_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
ROOT = Path(__file__).resolve().parent.parent


def signature(fn, dtype: str, chunk: int, head_dim: int):
    sig, consts = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[p.name] = {"PREC": "ieee" if dtype == "fp32" else None, "C": chunk}.get(p.name, head_dim)
        elif p.name in TYPED_POINTERS:
            sig[p.name] = f"*{dtype}"
        elif p.name.endswith(("_ptr", "_acc")):
            sig[p.name] = "*fp32"
        else:
            sig[p.name] = "fp32" if p.name in ("scale", "eps") else "i32"
    return sig, consts


def compile_all(name: str, dtype: str = "bf16", chunk: int = 64, head_dim: int = 64) -> dict[str, int]:
    """Compile every kernel of generated.<name> for sm_90; kernel name -> shared memory bytes.

    Runs without the interpreter (in a subprocess of the tests: see below).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(f"generated.{name}")
    out = {}
    for attr in sorted(dir(mod)):
        fn = getattr(mod, attr)
        if attr.startswith(f"_{name}_") and any(getattr(p, "name", "") == "PREC" for p in getattr(fn, "params", [])):
            sig, consts = signature(fn, dtype, chunk, head_dim)
            compiled = triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 128)
            )
            out[attr] = compiled.metadata.shared
    return out


@pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="Triton's NVIDIA backend is not installed")
@pytest.mark.parametrize("name", SPECS)
def test_kernels_compile_for_hopper_and_fit_in_shared_memory(name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = f"import json, test_compile; print(json.dumps(test_compile.compile_all({name!r})))"
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT / "tests",
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    shared = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(shared) == 5, shared  # chunk fwd and bwd, parallel fwd and its two backward kernels
    too_big = {k: v for k, v in shared.items() if v > H100_SHARED}
    assert not too_big, f"bf16, head dim 64, chunk 64 must fit an H100 block: {too_big}"


class FakeKernel:
    """Stands in for a JIT kernel: runs out of shared memory at the given stage counts."""

    __name__ = "fake_kernel"

    def __init__(self, fails_at: set[int]) -> None:
        self.fails_at, self.calls = fails_at, []

    def __getitem__(self, grid):
        def run(*args, num_stages, **kwargs):
            self.calls.append(num_stages)
            if num_stages in self.fails_at:
                raise OutOfResources(300000, 232448, "shared memory")

        return run


def test_launch_falls_back_to_fewer_stages():
    k = FakeKernel({3})
    launch(k, (1,), C=64, DK=64, DV=64)
    assert k.calls == [3, 1]


def test_launch_names_the_chunk_size_when_nothing_fits():
    k = FakeKernel({3, 1})
    with pytest.raises(ValueError, match="chunk_size=64.*smaller chunk_size"):
        launch(k, (1,), C=64, DK=128, DV=128)
