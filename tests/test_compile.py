"""Compiled-path checks that need no GPU: ahead-of-time compiles for Hopper, and the launch fallback.

The interpreter runs kernels as numpy and accepts things the compiler rejects; these compiles catch
that class of error on a CPU-only machine. They do not run the compiled code: a miscompile (such as
Triton's tl.dot(tl.trans(dot result)) bug on Hopper) still needs a GPU run against the float64 oracle.

Each kernel is compiled as its launch builds it (benchmarks/cost.py): the op runs dry (meta tensors, kernels
not run) in every kernel form with ``launch`` wrapped to record each launch's kernel and arguments; then, in a
subprocess without the interpreter, the JIT's own binder specializes those arguments (dtypes, pointer
alignment, integers divisible by 16 or equal to 1) and the module's ``launch`` picks num_warps and num_stages.
"""

from __future__ import annotations

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

from benchmarks import cost
from lion_gen.runtime import launch
from lion_gen.runtime.launch import STAGES

SPECS = ["lion_lit", "lion_d", "lion_s", "lion_s_causal", "lion_s_sym", "linear_causal", "retention"]
H100_SHARED = cost.H100_SHARED  # bytes of shared memory one block may use on sm_90
POINTER = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "int32": "*i32", "int64": "*i64"}


@pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="Triton's NVIDIA backend is not installed")
@pytest.mark.parametrize("name", SPECS)
def test_kernels_compile_for_hopper_and_fit_in_shared_memory(name):
    # bf16, head dim 64, chunk 64, H = 12 (not a multiple of 16, as at the anchor shape)
    forms = cost.capture_kernel_forms(name, B=2, L=4096, H=12, D=64, dtype=torch.bfloat16, chunk=64)
    assert "chunk" in forms and "parallel" in forms, sorted(forms)
    launches = []
    for form, recs in forms.items():
        assert {r.phase for r in recs} == {"forward", "backward"}, f"{form}: {[(r.phase, r.kernel) for r in recs]}"
        launches += recs
    figures = name == "lion_s"  # ptxas runs afresh (no cache) for one spec, to check its figures are read
    results = cost.compile_launches(launches, ptxas_log=figures)
    assert [r["kernel"] for r in results] == [r.kernel for r in launches]
    for rec, r in zip(launches, results, strict=True):
        assert r["error"] is None, r["error"]
        assert r["shared"] <= H100_SHARED, f"{r['kernel']}: {r['shared']} bytes of shared memory"
        # bf16 at head dim 64, chunk 64 must fit an H100 block pipelined, without the launch's fallback
        assert r["num_stages"] == STAGES[0], f"{r['kernel']} falls back: {r['attempts']}"
        assert r["num_warps"] >= 1
        # the signature comes from the launch's own tensors: one pointer of the tensor's dtype per tensor
        tensors = [a["tensor"] for a in [*rec.args, *rec.kwargs.values()] if isinstance(a, dict)]
        pointers = [v for v in r["signature"].values() if v.startswith("*")]
        assert sorted(pointers) == sorted(POINTER[t] for t in tensors), (r["kernel"], r["signature"])
        assert r["attrs"], "a launch's torch allocations are 16-byte aligned: pointers carry tt.divisibility"
        if figures:
            assert 0 < r["registers"] <= 255 and r["spill_stores"] is not None and r["stack"] is not None, r


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
