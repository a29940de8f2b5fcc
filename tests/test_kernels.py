"""Generated kernels against the float64 oracle (CONTRACT sections 3 and 4).

Under the interpreter (no GPU) with float32 inputs the bar is a relative RMS error <= 1e-5 for the
output and every gradient (q, k, v, gate); compiled on a GPU, 1e-4 (float32) and 1e-2 (16-bit).
"""

from __future__ import annotations

import importlib
import os

import oracle
import pytest
import torch

SPECS = ["lion_lit", "lion_d", "lion_s", "lion_s_causal", "lion_s_sym", "linear_causal", "retention"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: 1e-5 if INTERPRETED else 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


LABELS = ("y", "q", "k", "v", "gate")
# Where float32 arithmetic itself cannot reach the bar (see `fp32_limited`), a kernel may be off by this
# factor times the error of the oracle evaluated in float32 on the same inputs: a different summation
# order gave up to 4.2x (L = 1) and 6.7x (decay gate) the oracle's float32 error across seeds.
FP32_FACTOR = 10.0


def module(name: str):
    return importlib.import_module(f"generated.{name}")


def rel_rms(got: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    err = (got.double() - ref).pow(2).mean().sqrt()
    return (err / max(ref.pow(2).mean().sqrt().item(), floor)).item()


def make_inputs(mod, B, L, H, dk, dv, device, gate_scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, dk, generator=g)
    k = torch.randn(B, L, H, dk, generator=g)
    v = torch.randn(B, L, H, dv, generator=g)
    gate = {
        "none": None,
        "decay": torch.randn(H, generator=g),
        "selective": torch.randn(B, L, H, generator=g) * gate_scale,
    }[mod.FAMILY]
    return [t.to(device) if t is not None else None for t in (q, k, v, gate)]


def reference(spec: dict, ins: list[torch.Tensor], dy: torch.Tensor, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """The oracle's output and input gradients, evaluated in `dtype` on the CPU (float64: the truth)."""
    x = [t.detach().cpu().to(dtype).requires_grad_() for t in ins]
    y = oracle.attention(spec, *x[:3], x[3] if len(x) > 3 else None)
    y.backward(dy.to(dtype))
    return {"y": y.detach(), **{label: t.grad for label, t in zip(LABELS[1:], x, strict=False)}}


def fp32_limited(spec: dict, family: str, L: int) -> list[str]:
    """The results float32 arithmetic cannot bring within the contract's bar, whatever the algorithm.

    - L = 1 with normalized rows: the exact q and k gradients are pure eps effects, about eps/n times the
      terms that cancel in them (y = v n / (n + eps)); float32 resolves them to a few % (lion_s) or not
      at all (lion_lit, where n ~ 40 and eps/n is below float32's epsilon).
    - A fixed (decay) mask: the gate's gradient is one number per head, a sum over all L^2 pairs with
      heavy cancellation; the oracle in float32 reaches 6e-7 to 5e-5 at L = 130 (the larger with dk = 64).
    """
    limited = ["q", "k"] if L == 1 and spec["normalize_rows"] else []
    return limited + (["gate"] if family == "decay" and L > 1 else [])


def compare(
    name,
    B,
    L,
    H,
    dk,
    dv,
    chunk,
    device,
    dtype=torch.float32,
    gate_scale=2.0,
    form="chunk",
):
    """The op (form, chunk) against the float64 oracle: output and every gradient within the bar.

    name: a generated module's name, or a module (e.g. from lion_gen.load).
    Every bound comes from the contract or from the oracle, never from the module under test.
    """
    mod = module(name) if isinstance(name, str) else name
    spec, fn_name = mod.SPEC, mod.SPEC["name"]
    q, k, v, gate = make_inputs(mod, B, L, H, dk, dv, device, gate_scale)
    ins = [t for t in (q, k, v, gate) if t is not None]
    dy = torch.randn((B, L, H, dv), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = reference(spec, ins, dy)
    test_in = [(t.to(dtype) if i < 3 else t).detach().clone().requires_grad_() for i, t in enumerate(ins)]
    y = getattr(mod, fn_name)(*test_in[:3], test_in[3] if gate is not None else None, form=form, chunk_size=chunk)
    assert y.dtype == dtype and y.shape == (B, L, H, dv)
    y.backward(dy.to(device=device, dtype=dtype))
    got = {"y": y.detach()}
    for label, t in zip(LABELS[1:], test_in, strict=False):
        assert t.grad is not None, f"no gradient for {label}"
        assert t.grad.shape == t.shape and t.grad.dtype == t.dtype
        got[label] = t.grad
    # At L = 1 there are no off-diagonal pairs and the gate's exact gradient is 0: it is measured against
    # rms(dY), the size of the terms W_ij that make it up at L > 1.
    floor = {"gate": dy.pow(2).mean().sqrt().item()} if L == 1 else {}
    errors = {key: rel_rms(got[key].cpu(), ref[key], floor.get(key, 0.0)) for key in ref}
    limits = {key: TOL[dtype] for key in errors}
    limited = fp32_limited(spec, mod.FAMILY, L) if dtype == torch.float32 else []
    if limited:
        # Where float32 cannot meet the bar (see fp32_limited), the bound is what float32 reaches on the
        # same inputs: the oracle itself (which shares no code with the generator) run in float32.
        ref32 = reference(spec, ins, dy, torch.float32)
        for key in limited:
            limits[key] = max(limits[key], FP32_FACTOR * rel_rms(ref32[key], ref[key]))
    where = f"{fn_name} {form} L={L} C={chunk} dk={dk} dv={dv} {dtype}"
    bad = {key: e for key, e in errors.items() if not e <= limits[key]}
    assert not bad, f"{where}: above {limits}: {bad} (all: {errors})"
    return errors


@pytest.mark.parametrize("form", ["chunk", "parallel"])
@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("L", [1, 7, 37, 130])
@pytest.mark.parametrize("name", SPECS)
def test_kernels_match_float64(name, L, chunk, form, device):
    compare(name, 2, L, 2, 32, 16, chunk, device, form=form)


@pytest.mark.parametrize("form", ["chunk", "parallel"])
@pytest.mark.parametrize("dk,dv", [(16, 16), (64, 64), (16, 64)])
@pytest.mark.parametrize("name", SPECS)
def test_head_dims(name, dk, dv, form, device):
    compare(name, 1, 130, 2, dk, dv, 16, device, form=form)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["lion_lit", "lion_d", "lion_s", "lion_s_causal"])
def test_half_precision(name, dtype, device):
    if dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("the Triton interpreter computes bfloat16 tl.dot wrongly (x @ x.T off by 1e10); GPU only")
    compare(name, 1, 37, 2, 32, 32, 16, device, dtype=dtype)
    compare(name, 1, 37, 2, 32, 32, 16, device, dtype=dtype, form="parallel")


@pytest.mark.parametrize("form", ["chunk", "parallel"])
@pytest.mark.parametrize("name", ["lion_s", "lion_s_sym", "lion_s_causal"])
def test_strong_gates_stay_finite_and_exact(name, form, device):
    """Gates of magnitude up to 50 (log-gates near -50 per step): no NaN/inf, still exact."""
    mod = module(name)
    q, k, v, _ = make_inputs(mod, 1, 70, 2, 16, 16, device)
    gate = (torch.rand(1, 70, 2) * 100 - 50).to(device).requires_grad_()
    ins = [t.requires_grad_() for t in (q, k, v)]
    y = getattr(mod, name)(*ins, gate, chunk_size=16, form=form)
    y.sum().backward()
    for t in (y, *[t.grad for t in ins], gate.grad):
        assert torch.isfinite(t).all()
    compare(name, 1, 70, 2, 16, 16, 16, device, gate_scale=25.0, form=form)


@pytest.mark.parametrize("name", SPECS)
def test_reference_form_matches_oracle(name):
    mod = module(name)
    q, k, v, gate = make_inputs(mod, 2, 19, 3, 8, 5, "cpu")
    args = [t.double() if t is not None else None for t in (q, k, v, gate)]
    y = getattr(mod, name)(*args, form="reference")
    assert y.dtype == torch.float64
    assert rel_rms(y, oracle.attention(mod.SPEC, *args)) < 1e-12


def test_oracle_matches_rnn_form():
    """The oracle's mask agrees with the bidirectional RNN of the reference code (an independent form)."""
    mod = module("lion_s")
    q, k, v, gate = (t.double() for t in make_inputs(mod, 1, 11, 2, 4, 3, "cpu"))
    assert rel_rms(oracle.attention(mod.SPEC, q, k, v, gate), oracle.rnn(mod.SPEC, q, k, v, gate)) < 1e-5


def test_poisoned_allocations_are_active():
    assert torch.isnan(torch.empty(3)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2))).all()


@pytest.mark.parametrize("name", ["lion_lit", "lion_d", "lion_s"])
def test_module_trains(name, device):
    mod = module(name)
    layer = getattr(mod, mod.SPEC["name"].title().replace("_", ""))(32, 2, chunk_size=16).to(device)
    x = torch.randn(2, 21, 32, device=device)
    out = layer(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    ref = getattr(mod, mod.SPEC["name"].title().replace("_", ""))(32, 2, form="reference")
    ref.load_state_dict(layer.state_dict())
    assert rel_rms(out.detach().cpu(), ref.cpu()(x.cpu()).detach().double()) < 1e-5


def test_numpy_oracle_self_checks(capsys):
    """The numpy oracle of docs/lion_math.md: attention == RNN == chunkwise, backward == finite differences."""
    import lion_oracle

    lion_oracle.main()
    assert "LIT closed form ok" in capsys.readouterr().out


def test_kernel_matches_numpy_oracle(device):
    """lion_s against the numpy oracle's attention form (a second, independent float64 reference)."""
    import lion_oracle
    import numpy as np

    mod = module("lion_s")
    q, k, v, gate = make_inputs(mod, 1, 45, 1, 16, 16, device)
    y = mod.lion_s(q, k, v, gate, chunk_size=16)[0, :, 0].double().cpu().numpy()
    f = lambda x: x * (1 / (1 + np.exp(-x))) + 0.5  # noqa: E731  silu(x) + 1/2, then l2
    Q, K = (f(t[0, :, 0].double().cpu().numpy()) for t in (q, k))
    Q, K = Q / np.linalg.norm(Q, axis=1, keepdims=True), K / np.linalg.norm(K, axis=1, keepdims=True)
    F, G = lion_oracle.potentials(-np.logaddexp(0, gate[0, :, 0].double().cpu().numpy()), "code")
    ref, _ = lion_oracle.attn_form(Q, K, v[0, :, 0].double().cpu().numpy(), F, G, eps=1e-6)
    assert np.sqrt(((y - ref) ** 2).mean() / (ref**2).mean()) < 1e-5


@pytest.mark.parametrize("form", ["chunk", "parallel"])
@pytest.mark.parametrize("name", ["lion_lit", "lion_d"])
def test_float16_states_do_not_overflow(name, form, device):
    """With normalized rows the output stays O(v) while the carried state sums K v^T over the sequence:
    a state cast to float16 would overflow (65504) although the result is representable."""
    mod = module(name)
    q, k, v, _ = make_inputs(mod, 1, 40, 1, 16, 16, device)
    v = v + 2000.0
    gate = None if mod.FAMILY == "none" else torch.full((1,), 12.0, device=device)  # lambda = sigmoid(12): slow
    y = getattr(mod, name)(q.half(), k.half(), v.half(), gate, form=form, chunk_size=16)
    args = [t.double().cpu() if t is not None else None for t in (q, k, v.half(), gate)]
    ref = oracle.attention(mod.SPEC, *args)
    assert torch.isfinite(y).all() and rel_rms(y.cpu(), ref) < 1e-2
