"""bfloat16 under the Triton interpreter (``TRITON_INTERPRET=1``, how kernels run without a GPU), made right.

Triton 3.9's interpreter keeps a bfloat16 tensor as its raw bits in a numpy ``uint16`` array, and

- its ``InterpreterBuilder.create_dot`` passes those arrays to ``np.matmul`` as they are: a bfloat16
  ``tl.dot`` multiplies bit patterns as integers, and a bfloat16 kernel call on CPU tensors returns wrong
  numbers without an error (LION-S: output errors of order 1, gradients off by 1e10). ``patch_bf16_dot``
  wraps ``create_dot`` so that such operands are first decoded to float32 (exactly: a bfloat16 is the upper
  half of a float32) and then multiplied with float32 accumulation, which is what a GPU's bfloat16 MMA
  computes;
- its ``create_fp_trunc`` (``x.to(tl.bfloat16)`` and every store of float32 values to a bfloat16 tensor)
  drops the low 16 bits of a float32, where a GPU rounds to nearest even: a bias that about triples the
  error of a bfloat16 output. ``patch_bf16_rounding`` makes that conversion round to nearest even.

Each wrapper leaves every other case to Triton's own method, and so does nothing on a Triton whose
interpreter stores bfloat16 otherwise (one that fixed this). Both are applied when this module is imported
under the interpreter, that is when ``lion_gen.runtime`` is (``checks`` imports it); patching is
idempotent. ``bf16_dot_ok`` runs a small bfloat16 ``tl.dot`` kernel under the interpreter once and says
whether it is right: ``checks.kernel_settings`` refuses bfloat16 kernel calls under the interpreter when
it is not (a Triton where the patch point moved and the bug stayed).
"""

import functools
import os
from collections.abc import Callable
from typing import Any

import triton
import triton.language as tl

_MARK = "_lion_gen_bf16"  # set on a wrapper: patching twice wraps once
_probe_result: tuple[bool, str] | None = None


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _wrap(method: str, make: Callable[[Callable[..., Any], Any], Callable[..., Any]]) -> bool:
    """Replace ``InterpreterBuilder.<method>`` by ``make(original, TensorHandle)``, once.

    True when the wrapper is in place (now or from an earlier call); False, changing nothing, when the
    interpreter, the method or ``TensorHandle`` is missing.
    """
    try:
        from triton.runtime import interpreter
    except Exception:  # any failure to import means: no patch point
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, method, None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or not callable(original) or handle is None:
        return False
    if getattr(original, _MARK, False):
        return True
    wrapper = functools.wraps(original)(make(original, handle))
    setattr(wrapper, _MARK, True)
    setattr(builder, method, wrapper)
    return True


def _scalar(t: Any) -> Any:
    dtype = getattr(t, "dtype", t)
    return getattr(dtype, "scalar", dtype)


def patch_bf16_dot() -> bool:
    """Wrap the interpreter's ``create_dot`` so that bfloat16 operands are decoded to float32 first.

    Only an operand whose numpy data is ``uint16`` and whose Triton dtype is bfloat16 is decoded; the dot
    itself is Triton's (``np.matmul`` into the float32 accumulator). Idempotent. Returns True when the
    wrapper is in place, False when the patch point
    (``triton.runtime.interpreter.InterpreterBuilder.create_dot``) is missing; then nothing is changed.
    """
    import numpy as np

    def make(original: Callable[..., Any], handle: Any) -> Callable[..., Any]:
        def decoded(t: Any) -> Any:
            data = getattr(t, "data", None)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint16 or _scalar(t) != tl.bfloat16:
                return t
            return handle((data.astype(np.uint32) << np.uint32(16)).view(np.float32), tl.float32)

        def create_dot(self: Any, a: Any, b: Any, d: Any, *args: Any, **kwargs: Any) -> Any:
            return original(self, decoded(a), decoded(b), d, *args, **kwargs)

        return create_dot

    return _wrap("create_dot", make)


def patch_bf16_rounding() -> bool:
    """Wrap the interpreter's ``create_fp_trunc`` so that float32 -> bfloat16 rounds to nearest even.

    Only float32 numpy data converted to bfloat16 is handled here (NaN stays NaN, overflow gives inf, as
    on a GPU); everything else goes to Triton's own method. Idempotent. Returns True when the wrapper is in
    place, False (changing nothing) when ``InterpreterBuilder.create_fp_trunc`` is missing.
    """
    import numpy as np

    def make(original: Callable[..., Any], handle: Any) -> Callable[..., Any]:
        def create_fp_trunc(self: Any, src: Any, dst_type: Any) -> Any:
            data = getattr(src, "data", None)
            if not isinstance(data, np.ndarray) or data.dtype != np.float32 or _scalar(dst_type) != tl.bfloat16:
                return original(self, src, dst_type)
            bits = np.ascontiguousarray(data).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x40)
            out = np.where(np.isnan(data), quiet_nan, rounded).astype(np.uint16)
            return handle(out, tl.bfloat16)

        return create_fp_trunc

    return _wrap("create_fp_trunc", make)


def patch_interpreter() -> bool:
    """Apply both corrections (idempotent). Returns whether the ``tl.dot`` one is in place."""
    patch_bf16_rounding()
    return patch_bf16_dot()


def _probe_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):  # a Triton kernel, jitted when probed
    r = tl.arange(0, N)
    offs = r[:, None] * N + r[None, :]
    tl.store(c_ptr + offs, tl.dot(tl.load(a_ptr + offs), tl.load(b_ptr + offs)))


def bf16_dot_ok() -> tuple[bool, str]:
    """Whether a bfloat16 ``tl.dot`` under the interpreter is right, after patching (probed once per process).

    Returns (ok, why): ``why`` says what was found when it is not ok. Meant for ``TRITON_INTERPRET=1``.
    """
    global _probe_result
    if _probe_result is not None:
        return _probe_result
    patched = patch_interpreter()
    try:
        import torch

        kernel = triton.jit(_probe_kernel)
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(16, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
        c = torch.zeros(16, 16, dtype=torch.float32)
        kernel[(1,)](a, b, c, N=16)
        want = a.float() @ b.float()
        err = ((c - want).norm() / want.norm()).item()
        ok = err < 1e-5
        why = "" if ok else f"a 16x16 bfloat16 tl.dot under the interpreter is off by a relative {err:.2g}"
    except Exception as e:  # a probe that cannot run is a probe that failed
        ok, why = False, f"a bfloat16 tl.dot under the interpreter fails: {type(e).__name__}: {e}"
    if not ok and not patched:
        why += " (and this Triton has no InterpreterBuilder.create_dot for lion-gen to correct)"
    _probe_result = (ok, why)
    return _probe_result


if interpreting():  # applied when lion_gen.runtime is imported (checks imports this module)
    patch_interpreter()
