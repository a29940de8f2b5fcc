"""The recurrent form (form="recurrent"): the token sweeps against the float64 oracle, the other forms, torch.compile,
and its memory (CONTRACT sections 2 to 4; docs/design.md, "The recurrent form").

Under the interpreter every token costs a few Triton calls per kernel, so the shapes are small: one batch, two heads,
sequences up to 130 (the kernels load rows 16 at a time: 37 and 130 end inside a block).
"""

from __future__ import annotations

import os

import pytest
import torch
from test_kernels import EPS_CASES, SPECS, TOL, compare, make_inputs, module, rel_rms

from benchmarks import memory


@pytest.mark.parametrize("L", [1, 7, 37])
@pytest.mark.parametrize("name", SPECS)
def test_recurrent_matches_float64(name, L, device):
    compare(name, 1, L, 2, 32, 16, None, device, form="recurrent")


@pytest.mark.parametrize("dk,dv", [(16, 64), (64, 16)])
@pytest.mark.parametrize("name", ["lion_s", "lion_s_causal"])
def test_recurrent_head_dims_and_many_blocks(name, dk, dv, device):
    """Dk != Dv both ways, 130 rows: 9 blocks of 16, the state carried across every block boundary."""
    compare(name, 1, 130, 1, dk, dv, None, device, form="recurrent")


@pytest.mark.parametrize("name", ["lion_lit", "lion_d", "lion_s", "lion_s_causal", "retention"])
def test_recurrent_float16(name, device):
    """16-bit inputs: the states stay fp32, the halves one sweep leaves in y, dq, dk, dv are rounded once."""
    compare(name, 1, 37, 2, 32, 32, None, device, dtype=torch.float16, form="recurrent")


@pytest.mark.parametrize("name", ["lion_s", "lion_s_sym", "lion_s_causal"])
def test_recurrent_strong_gates(name, device):
    """Gates of magnitude up to 50 (log-gates near -50 per step): finite, and still within the bar."""
    mod = module(name)
    q, k, v, _ = make_inputs(mod, 1, 40, 1, 16, 16, device)
    gate = (torch.rand(1, 40, 1) * 100 - 50).to(device).requires_grad_()
    ins = [t.requires_grad_() for t in (q, k, v)]
    y = getattr(mod, name)(*ins, gate, form="recurrent")
    y.sum().backward()
    for t in (y, *[t.grad for t in ins], gate.grad):
        assert torch.isfinite(t).all()
    compare(name, 1, 40, 1, 16, 16, None, device, gate_scale=25.0, form="recurrent")


@pytest.mark.parametrize("name,shift", EPS_CASES)
def test_recurrent_eps_where_it_matters(name, shift, device, eps_modules):
    """Row sums comparable to eps: the right sweep's half of y is stored as num / (den + eps), and the left
    sweep takes it back; eps moves the output and every gradient by at least 4x the bar."""
    mod = eps_modules.get(name) or module(name)
    compare(mod, 1, 37, 2, 32, 16, None, device, form="recurrent", qk_shift=shift, eps_effect=4e-5)


def test_recurrent_equals_the_other_kernel_forms(device):
    """The same function as the chunk and parallel forms (each within the bar of float64, so within twice it of
    one another), output and every gradient."""
    name = "lion_s"
    mod = module(name)
    q, k, v, gate = make_inputs(mod, 1, 37, 2, 32, 16, device)
    dy = torch.randn(1, 37, 2, 16, generator=torch.Generator().manual_seed(1)).to(device)
    got = {}
    for form in ("recurrent", "chunk", "parallel"):
        ins = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, gate)]
        y = getattr(mod, name)(*ins, form=form, chunk_size=16)
        y.backward(dy)
        got[form] = [y.detach().double()] + [t.grad.double() for t in ins if t is not None]
    for other in ("chunk", "parallel"):
        for label, a, b in zip("yqkvg", got["recurrent"], got[other], strict=True):
            assert rel_rms(a, b) <= 2 * TOL[torch.float32], (other, label, rel_rms(a, b))


def test_recurrent_under_torch_compile():
    """The recurrent kernels inside a compiled graph (a torch custom op): no graph break, same outputs and
    gradients as eager (tests/test_compile_torch.py's check, the recurrent form instead of the chunk form)."""
    from test_compile_torch import GPU, check_compiled, vit

    if os.environ.get("TRITON_INTERPRET") != "1" and not GPU:
        pytest.skip("needs a GPU or the Triton interpreter")
    device = "cuda" if GPU else "cpu"
    model = vit("lion_s", "sequence", "recurrent", device)
    check_compiled(model, torch.randn(2, 1, 8, 8, device=device), "aot_eager" if not GPU else "inductor")


# The shape of the memory figures in README.md and docs/design.md.
MEMORY_SHAPE = dict(B=2, L=4096, H=8, D=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_recurrent_form_needs_the_least_memory(dtype):
    """Peak memory beyond the results (y and the gradients), followed through every allocation (benchmarks/memory.py):
    the recurrent form keeps n and the gate terms' left halves, tF and tG, 3 fp32 numbers per row in all; the
    parallel and chunk forms keep more (per-row halves of dF and dG; per-chunk states)."""
    B, L, H, D = MEMORY_SHAPE.values()
    got = {form: memory.measure("lion_s", B, L, H, D, dtype, form) for form in memory.FORMS}
    rows = B * L * H * 4
    assert got["recurrent"].extra == 3 * rows, got["recurrent"]
    assert got["recurrent"].saved - B * L * H * D * dtype.itemsize == rows  # y and n
    assert got["recurrent"].extra < got["parallel"].extra < got["chunk"].extra, got
    assert got["recurrent"].results == got["chunk"].results == got["parallel"].results


def test_memory_counts_allocations_and_frees():
    """The counter itself: an allocation counts while it lives (views included), not after."""
    with memory._Live() as live:
        a = torch.empty(1000, device="meta")
        b = a.view(10, 100)
        del a
        c = torch.zeros(500, device="meta") + 1.0
        assert live.live == 4000 + 2000  # a (alive through its view b) and c (the zeros were freed)
        del b, c
    assert live.live == 0 and live.peak == 4000 + 2000 + 2000  # a, the zeros and c at once
