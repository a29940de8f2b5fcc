"""The torch form (form="torch", plain torch, autograd through torch) against the float64 oracle.

Same bars as the kernels (CONTRACT section 4; tests/test_kernels.py): float32 relative RMS error <= 1e-5 for
the output and every gradient (q, k, v and the gate's), 16-bit <= 1e-2, with the same float32-limited
exceptions bounded by the oracle run in float32. Allocations are NaN-poisoned (conftest).
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import SPECS, compare, make_inputs, module

from lion_gen.runtime import resolve_form


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("L", [1, 7, 37, 130])
@pytest.mark.parametrize("name", SPECS)
def test_torch_form_matches_float64(name, L, chunk):
    compare(name, 2, L, 2, 32, 16, chunk, "cpu", form="torch")


@pytest.mark.parametrize("dk,dv", [(16, 64), (64, 64)])
@pytest.mark.parametrize("name", SPECS)
def test_torch_form_head_dims_and_many_chunks(name, dk, dv):
    compare(name, 1, 300, 2, dk, dv, 16, "cpu", form="torch")  # 19 chunks, the last one partial


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", SPECS)
def test_torch_form_half_precision(name, dtype):
    compare(name, 1, 77, 2, 32, 32, 16, "cpu", dtype=dtype, form="torch")


@pytest.mark.parametrize("name", ["lion_s", "lion_s_sym", "lion_s_causal"])
def test_torch_form_strong_gates(name):
    """Gates of magnitude up to 50: finite outputs and gradients, and still within the bar."""
    mod = module(name)
    q, k, v, _ = make_inputs(mod, 1, 70, 2, 16, 16, "cpu")
    gate = (torch.rand(1, 70, 2) * 100 - 50).requires_grad_()
    ins = [t.requires_grad_() for t in (q, k, v)]
    y = getattr(mod, name)(*ins, gate, chunk_size=16, form="torch")
    y.sum().backward()
    for t in (y, *[t.grad for t in ins], gate.grad):
        assert torch.isfinite(t).all()
    compare(name, 1, 70, 2, 16, 16, 16, "cpu", gate_scale=25.0, form="torch")


def test_auto_is_the_torch_form_off_cuda():
    assert resolve_form("auto", torch.device("cpu")) == "torch"
    assert resolve_form("auto", torch.device("cuda")) == "chunk"
    assert resolve_form("torch", torch.device("cuda")) == "torch"


def test_auto_runs_the_torch_form_on_the_cpu(monkeypatch):
    mod = module("lion_s")
    calls = []
    real = mod._torch_chunk
    monkeypatch.setattr(mod, "_torch_chunk", lambda *a, **kw: calls.append(a[-1]) or real(*a, **kw))
    q, k, v, gate = make_inputs(mod, 1, 20, 2, 8, 8, "cpu")
    y = mod.lion_s(q, k, v, gate)
    assert calls == [mod.DEFAULT_CHUNK]
    torch.testing.assert_close(y, mod.lion_s(q, k, v, gate, form="reference"), rtol=1e-5, atol=1e-6)
