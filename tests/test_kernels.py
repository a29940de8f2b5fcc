"""Generated kernels against the float64 oracle (CONTRACT sections 3 and 4).

Under the interpreter (no GPU) with float32 inputs the bar is a relative RMS error <= 1e-5 for the
output and every gradient (q, k, v, gate); compiled on a GPU, 1e-4 (float32) and 1e-2 (16-bit).
"""

from __future__ import annotations

import copy
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


def make_inputs(mod, B, L, H, dk, dv, device, gate_scale=2.0, seed=0, qk_shift=0.0):
    """Random inputs; qk_shift moves q and k (a large negative shift with elu(x) + 1 makes phi ~ 0)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, dk, generator=g) + qk_shift
    k = torch.randn(B, L, H, dk, generator=g) + qk_shift
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
    qk_shift=0.0,
    eps_effect=None,
):
    """The op (form, chunk) against the float64 oracle: output and every gradient within the bar.

    name: a generated module's name, or a module (e.g. from lion_gen.load). eps_effect: also require that
    eps changes the oracle's output and gradients by at least this much (relative RMS) on these inputs.
    Every bound comes from the contract or from the oracle, never from the module under test.
    """
    mod = module(name) if isinstance(name, str) else name
    spec, fn_name = mod.SPEC, mod.SPEC["name"]
    q, k, v, gate = make_inputs(mod, B, L, H, dk, dv, device, gate_scale, qk_shift=qk_shift)
    ins = [t for t in (q, k, v, gate) if t is not None]
    dy = torch.randn((B, L, H, dv), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if dtype != torch.float32:
        # the float64 evaluation of what a 16-bit op receives: q, k, v and dy rounded to the dtype (the gate
        # stays float64). Rounding bf16 inputs alone moves a fixed decay's gradient by 1.2e-2 at L = 130.
        ins = [t.to(dtype).double() if i < 3 else t for i, t in enumerate(ins)]
        dy = dy.to(dtype).double()
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
    if eps_effect is not None:
        no_eps = reference({**spec, "eps": 0.0}, ins, dy)
        effect = {key: rel_rms(no_eps[key], ref[key]) for key in ref if ref[key].abs().max() > 0}
        weak = {key: e for key, e in effect.items() if not e >= eps_effect}
        assert not weak, f"{where}: eps changes these by less than {eps_effect}: {weak}"
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


@pytest.mark.parametrize("L", [37, 130])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", SPECS)
def test_half_precision(name, dtype, L, device):
    """16-bit inputs, every gradient within 1e-2. At L = 130 (9 chunks of 16) a fixed decay's gradient sums
    many cancelling terms: with the float16 state dots' row operand in one bf16 part, lion_d's was 69% off."""
    if dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("the Triton interpreter computes bfloat16 tl.dot wrongly (x @ x.T off by 1e10); GPU only")
    compare(name, 1, L, 2, 32, 32, 16, device, dtype=dtype)
    compare(name, 1, L, 2, 32, 32, 16, device, dtype=dtype, form="parallel")


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


# Specs whose eps is comparable to the row sums (created here, not shipped): LION-S's feature map and
# mask with eps 1, LION-LIT's with eps 1/2.
EPS_SPECS = {
    "lion_s_eps": """name: lion_s_eps
feature_map: {expr: silu(x) + 1/2, normalize: l2}
mask: {family: selective, log_decay: -softplus(z), alignment: lion}
normalize_rows: true
eps: 1.0
""",
    "lion_lit_eps": """name: lion_lit_eps
feature_map: {expr: elu(x) + 1}
mask: {family: none}
normalize_rows: true
eps: 0.5
""",
}
# (module, shift of q and k). Row sums n_i = sum_j A_ij at L = 1 and 37 (seed 0, dk = 32):
#   lion_s_eps, no shift: n in [0.5, 3.3] against eps = 1; eps changes y and every gradient by 0.6 to 1.5;
#   lion_lit_eps, shift -4 (phi ~ e^-4): n in [0.02, 2.9] against eps = 1/2; eps changes all by 0.4 to 16;
#   lion_lit (eps 1e-6), shift -6 (phi ~ e^-6): n in [4e-4, 5e-2]; eps changes all by 5e-5 (L = 37) to
#   2e-3 (L = 1); a larger shift loses more to elu(x) + 1 in float32 (see test_elu_features_keep_precision).
EPS_CASES = [("lion_s_eps", 0.0), ("lion_lit_eps", -4.0), ("lion_lit", -6.0)]


@pytest.mark.parametrize("form", ["chunk", "parallel"])
@pytest.mark.parametrize("L", [1, 37])
@pytest.mark.parametrize("name,shift", EPS_CASES)
def test_eps_where_it_matters(name, shift, L, form, device, eps_modules):
    """Row sums comparable to eps (L = 37 is not a multiple of the chunk 16): output and all gradients
    match the oracle, and eps moves every one of them by at least 4x the interpreter's bar."""
    mod = eps_modules.get(name) or module(name)
    compare(mod, 2, L, 2, 32, 16, 16, device, form=form, qk_shift=shift, eps_effect=4e-5)


def test_elu_features_keep_precision(device):
    """phi = elu(x) + 1 ~ e^-12 is representable to float32 precision; the contract's bar holds there too
    (elu(x) + 1 is printed as where(x > 0, x + 1, exp(x)), not as (exp(x) - 1) + 1)."""
    compare("linear_causal", 1, 7, 2, 32, 16, 16, device, qk_shift=-12.0)


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
    assert rel_rms(oracle.attention(mod.SPEC, q, k, v, gate), oracle.rnn(mod.SPEC, q, k, v, gate)) < 1e-13


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
    # against the oracle on the layer's own projections (float64), not against another form of the module
    with torch.no_grad():
        ref_layer = copy.deepcopy(layer).cpu().double()
        xd = x.cpu().double()
        q, k, v = (getattr(ref_layer, f"{p}_proj")(xd).view(2, 21, 2, 16) for p in "qkv")
        gate = {"none": lambda: None, "decay": lambda: ref_layer.gate, "selective": lambda: ref_layer.gate_proj(xd)}
        gate = gate[mod.FAMILY]()
        ref = ref_layer.out_proj(oracle.attention(mod.SPEC, q, k, v, gate).reshape(2, 21, 32))
    assert rel_rms(out.detach().cpu(), ref) < 1e-5


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
    v = v * 100.0 + 2000.0
    gate = None if mod.FAMILY == "none" else torch.full((1,), 12.0, device=device)  # lambda = sigmoid(12): slow
    y = getattr(mod, name)(q.half(), k.half(), v.half(), gate, form=form, chunk_size=16)
    args = [t.double().cpu() if t is not None else None for t in (q, k, v.half(), gate)]
    ref = oracle.attention(mod.SPEC, *args)
    assert torch.isfinite(y).all()
    # y = 2000 + a weighted mean of 100 randn: rel_rms(y, ref) would hide any error in the weights behind
    # the offset, so the part that depends on them is checked, to float16's resolution of y (ulp 1 to 2
    # near 2000, against a spread of about 16; measured 0.018)
    assert rel_rms(y.cpu() - 2000.0, ref - 2000.0) < 0.05
