"""torch.compile of LION models: zero graph breaks (torch._dynamo.explain), and the compiled model's outputs
and gradients equal eager ones. On the CPU: the torch form (traced), and the Triton chunk form under the
interpreter (a torch custom op, opaque to dynamo); on a GPU, the Triton forms compiled."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from lion_gen.nn import VisionTransformer

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def mod(name: str):
    return importlib.import_module(f"generated.{name}")


def vit(name: str, order: str, form: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(
        mod(name),
        image_size=8,
        patch_size=2,
        in_chans=1,
        num_classes=10,
        dim=32,
        depth=2,
        num_heads=2,
        order=order,
        pool="cls",
        form=form,
        chunk_size=16,
    ).to(device)


def check_compiled(model: torch.nn.Module, x: torch.Tensor, backend: str, rtol: float = 1e-5) -> None:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out_c = compiled(x)
    out_c.square().sum().backward()
    grads_c = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out_e = model(x)
    out_e.square().sum().backward()
    torch.testing.assert_close(out_c, out_e, rtol=rtol, atol=rtol * 1e-1)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads_c[n], p.grad, rtol=rtol, atol=rtol * 1e-1, msg=n)


# inductor (the default backend) for one model; dynamo alone ("eager": the same graph capture, checked for
# breaks by explain) for the others, since inductor's code generation takes minutes on a 2-core CPU. aot_eager
# fails on these models' backward in torch 2.13 ("view size is not compatible with input tensor's size and
# stride" inside its traced backward graph) while eager autograd and inductor agree.
@pytest.mark.parametrize(
    "name,order,backend",
    [("lion_s", "snake", "inductor"), ("lion_s", "sequence", "eager"), ("lion_d", "snake", "eager")],
)
def test_vit_torch_form_compiles_without_graph_breaks(name, order, backend):
    model = vit(name, order, "torch", "cpu")
    check_compiled(model, torch.randn(3, 1, 8, 8), backend, rtol=1e-4)


@pytest.mark.parametrize("name", ["lion_s", "lion_lit"])
def test_triton_chunk_form_is_a_custom_op_under_compile(name):
    """The kernels (interpreted on the CPU) inside a compiled graph: no break, same outputs and gradients."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not GPU:
        pytest.skip("needs a GPU or the Triton interpreter")
    device = "cuda" if GPU else "cpu"
    model = vit(name, "sequence", "chunk", device)
    check_compiled(model, torch.randn(2, 1, 8, 8, device=device), "aot_eager" if not GPU else "inductor")


@pytest.mark.skipif(not GPU, reason="needs a GPU")
def test_vit_compiles_on_the_gpu_with_the_triton_form():
    model = vit("lion_s", "sequence", "auto", "cuda")
    check_compiled(model, torch.randn(4, 1, 8, 8, device="cuda"), "inductor", rtol=1e-4)


@pytest.mark.parametrize(
    "name,form,stateful",
    [("lion_s_causal", "chunk", True), ("lion_s_causal", "recurrent", True), ("lion_s", "chunk", False)],
)
def test_custom_op_takes_packed_batches_and_states(name, form, stateful):
    """The kernel forms' custom op (what the main function runs while compiling) on a packed batch with an
    empty sequence, with and without a state: torch.library.opcheck (schema, fake rules against the real
    outputs, autograd registration, tracing), and its outputs and gradients (initial state included) through
    its autograd rule equal the eager function's."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not GPU:
        pytest.skip("needs a GPU or the Triton interpreter")
    device = "cuda" if GPU else "cpu"
    m = mod(name)
    fn = getattr(m, name)
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 5, 25], dtype=torch.int32, device=device)
    q, k = torch.randn(1, 25, 2, 16, device=device), torch.randn(1, 25, 2, 16, device=device)
    v = torch.randn(1, 25, 2, 8, device=device)
    gate = {"none": None, "decay": torch.randn(2), "selective": torch.randn(1, 25, 2)}[m.FAMILY]
    gate = None if gate is None else gate.to(device)
    S0 = None
    if stateful:
        S0 = torch.randn_like(fn(q, k, v, gate, form="torch", cu_seqlens=cu, output_final_state=True)[1])
    args = (q, k, v, gate, None, cu, S0, stateful, form, 16)
    torch.library.opcheck(
        m._op_forward, tuple(a.requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    )
    results = []
    for through_op in (False, True):
        x = [None if t is None else t.detach().clone().requires_grad_() for t in (q, k, v, gate, S0)]
        if through_op:
            y, S = m._op_forward(*x[:4], None, cu, x[4], stateful, form, 16)
            assert stateful or S.numel() == 0  # no state: an empty state output
        else:
            out = fn(*x[:4], form=form, chunk_size=16, cu_seqlens=cu, initial_state=x[4], output_final_state=stateful)
            y, S = out if stateful else (out, None)
        loss = (y * y).sum() + ((S * S.detach().flip(-1)).sum() if stateful else 0)
        loss.backward()
        results.append([y.detach(), *(t.grad for t in x if t is not None)] + ([S.detach()] if stateful else []))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
