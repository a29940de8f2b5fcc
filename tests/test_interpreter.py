"""bfloat16 under the Triton interpreter: lion_gen.runtime.interpreter corrects it.

Triton 3.9's interpreter multiplies the raw uint16 bits of bfloat16 operands in tl.dot, and truncates
float32 -> bfloat16 where a GPU rounds to nearest even. Importing lion_gen.runtime under TRITON_INTERPRET=1
wraps the interpreter's create_dot (operands decoded to float32 first) and create_fp_trunc (round to
nearest even); where the dot cannot be corrected and stays wrong, bfloat16 kernel calls are refused.
These tests run only under the interpreter (they are about it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter as triton_interpreter

import lion_gen.runtime  # noqa: F401 - importing it applies the correction
from lion_gen.runtime import interpreter

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="about the Triton interpreter (TRITON_INTERPRET=1)"
)


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))


@triton.jit
def cast_kernel(x_ptr, y_ptr, z_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    x = tl.load(x_ptr + r)
    tl.store(y_ptr + r, x)  # the store converts float32 to the bfloat16 of y
    tl.store(z_ptr + r, x.to(tl.bfloat16).to(tl.float32))


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def test_bf16_dot_equals_the_fp32_matmul_of_the_bf16_operands():
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(32, 64, generator=g) * 3).to(torch.bfloat16)
    b = torch.randn(64, 16, generator=g).to(torch.bfloat16)
    c = torch.zeros(32, 16)
    dot_kernel[(1,)](a, b, c, M=32, K=64, N=16)
    # products of bf16 values are exact in fp32; only the fp32 summation order may differ
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


def test_float32_and_float16_dots_are_unchanged():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float16):
        a, b = torch.randn(16, 32, generator=g).to(dtype), torch.randn(32, 16, generator=g).to(dtype)
        c = torch.zeros(16, 16)
        dot_kernel[(1,)](a, b, c, M=16, K=32, N=16)
        torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


def test_float32_to_bf16_rounds_to_nearest_even_as_torch_does():
    g = torch.Generator().manual_seed(2)
    special = [0.0, -0.0, 1.0, float("inf"), float("-inf"), float("nan"), 3.4e38, -3.4e38, 1e-40, -1e-45]
    ties = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20]  # halfway (even down, odd up), above
    x = torch.cat([torch.tensor(special + ties), torch.randn(128 - len(special) - len(ties), generator=g)])
    y = torch.empty(128, dtype=torch.bfloat16)
    z = torch.empty(128)
    cast_kernel[(1,)](x, y, z, N=128)
    want = x.to(torch.bfloat16)
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    # back to float32 through Triton's own upcast, which flushes bfloat16 subnormals (|x| < 1.2e-38) to 0
    normal = want.float().abs() >= torch.finfo(torch.bfloat16).tiny
    torch.testing.assert_close(z[normal], want.float()[normal], rtol=0, atol=0, equal_nan=True)


def test_the_corrections_are_installed_once():
    for patch, method in (
        (interpreter.patch_bf16_dot, "create_dot"),
        (interpreter.patch_bf16_rounding, "create_fp_trunc"),
    ):
        assert patch()
        assert patch()
        wrapper = getattr(triton_interpreter.InterpreterBuilder, method)
        assert getattr(wrapper, interpreter._MARK)
        assert not getattr(wrapper.__wrapped__, interpreter._MARK, False)  # wraps Triton's own, not itself


class FakeBuilder:
    """Stands in for InterpreterBuilder: records what create_dot receives."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, object]] = []

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        self.seen.append((a, b))
        return d


def test_the_wrapper_decodes_only_bf16_stored_as_uint16(monkeypatch):
    monkeypatch.setattr(triton_interpreter, "InterpreterBuilder", FakeBuilder)
    assert interpreter.patch_bf16_dot()
    handle = triton_interpreter.TensorHandle
    x = torch.tensor([[1.5, -2.25], [0.0, 3.0e-39]], dtype=torch.bfloat16)  # 3e-39: a bf16 subnormal
    bits = handle(x.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
    d = handle(np.zeros((2, 2), np.float32), tl.float32)
    builder = FakeBuilder()
    builder.create_dot(bits, bits, d, None, 0)
    a, b = builder.seen[-1]
    assert a.dtype == tl.float32 and a.data.dtype == np.float32
    np.testing.assert_array_equal(a.data, x.float().numpy())
    # a Triton that stores bfloat16 otherwise, and every other dtype: passed through as they are
    for t in (
        handle(np.ones((2, 2), np.float16), tl.float16),
        handle(np.ones((2, 2), np.float32), tl.float32),
        handle(np.ones((2, 2), np.uint16), tl.uint16),
    ):
        builder.create_dot(t, t, d, None, 0)
        assert builder.seen[-1] == (t, t)


def test_a_missing_patch_point_changes_nothing(monkeypatch):
    class Bare:
        pass

    monkeypatch.setattr(triton_interpreter, "InterpreterBuilder", Bare)
    assert not interpreter.patch_bf16_dot()
    assert not interpreter.patch_bf16_rounding()
    assert not hasattr(Bare, "create_dot") and not hasattr(Bare, "create_fp_trunc")
    monkeypatch.delattr(triton_interpreter, "InterpreterBuilder")
    assert not interpreter.patch_interpreter()


def small_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    B, L, H, D = 1, 37, 2, 16
    q, k, v = (torch.randn(B, L, H, D, generator=g) for _ in range(3))
    gate = torch.randn(B, L, H, generator=g) * 2
    return [t.to(dtype) for t in (q, k, v, gate)]


@pytest.mark.parametrize("form", ["chunk", "parallel"])
def test_generated_lion_s_in_bf16_matches_float64(form):
    from generated.lion_s import lion_s

    inputs = small_inputs(torch.bfloat16)
    ref_in = [t.double().requires_grad_() for t in inputs]  # the same (bf16-rounded) values, in float64
    test_in = [t.clone().requires_grad_() for t in inputs]
    y_ref = lion_s(*ref_in, form="reference")
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y_ref.backward(dy.double())
    y = lion_s(*test_in, form=form, chunk_size=16)
    assert y.dtype == torch.bfloat16
    y.backward(dy)
    errors = {"y": rel_rms(y.detach(), y_ref.detach())}
    errors |= {f"d{n}": rel_rms(t.grad, r.grad) for n, t, r in zip("qkvg", test_in, ref_in, strict=True)}
    assert max(errors.values()) < 1e-2, errors


def test_bf16_is_refused_when_the_interpreter_stays_wrong(monkeypatch):
    """A Triton where the patch point is gone and the bug is not: refuse, never return wrong numbers."""
    from generated.lion_s import lion_s

    wrapper = triton_interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(triton_interpreter.InterpreterBuilder, "create_dot", wrapper.__wrapped__)
    monkeypatch.setattr(interpreter, "patch_bf16_dot", lambda: False)
    monkeypatch.setattr(interpreter, "_probe_result", None)
    with pytest.raises(TypeError, match=r"bfloat16 kernel calls are refused under the Triton interpreter"):
        lion_s(*small_inputs(torch.bfloat16), form="chunk")
    lion_s(*small_inputs(torch.float32), form="chunk")  # float32 still runs


def test_importing_the_runtime_applies_the_correction_and_imports_no_compiler():
    code = (
        "import sys, lion_gen.runtime\n"
        "from triton.runtime.interpreter import InterpreterBuilder\n"
        "for m in ('create_dot', 'create_fp_trunc'):\n"
        "    assert getattr(getattr(InterpreterBuilder, m), '_lion_gen_bf16', False), m\n"
        "heavy = [m for m in ('sympy', 'jinja2', 'networkx', 'yaml') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
