"""The causal state: initial_state / output_final_state on the chunk, recurrent, torch and reference forms, and the
one-token ``<name>_step``, against an independent float64 token-by-token recurrence (lion_math.md
section 2, causal) differentiated by torch's autograd.

Under the interpreter with float32 inputs the bar is a relative RMS error <= 1e-5 for the output, the final
state and every gradient (q, k, v, gate, initial_state); compiled on a GPU, 1e-4.
"""

from __future__ import annotations

import importlib
import os

import oracle
import pytest
import sympy as sp
import torch
import triton

import lion_gen
from lion_gen.functions import parse_expression

CAUSAL = ["lion_s_causal", "linear_causal"]  # every causal spec in specs/
TOL = 1e-5 if os.environ.get("TRITON_INTERPRET") == "1" else 1e-4
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
LABELS = ("q", "k", "v", "gate", "initial_state")

# A causal spec with a fixed per-head decay (no built-in spec has one): covers the decay branches.
CAUSAL_DECAY = """\
name: causal_decay
direction: causal
feature_map:
  expr: silu(x) + 1/2
mask:
  family: decay
  log_decay: log(sigmoid(z))
normalize_rows: true
"""


def module(name: str):
    return importlib.import_module(f"generated.{name}")


@pytest.fixture(scope="module")
def causal_decay(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "causal_decay.yaml"
    path.write_text(CAUSAL_DECAY)
    return lion_gen.load(path)


def get(name, causal_decay=None):
    mod = causal_decay if name == "causal_decay" else module(name)
    fn = getattr(mod, mod.SPEC["name"])
    step = getattr(mod, mod.SPEC["name"] + "_step")
    return mod, fn, step


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error; where the reference is exactly 0 (q's gradient of a loss of the final state
    alone), the largest magnitude of ``got``."""
    ref = ref.detach().double().cpu()
    err = (got.detach().double().cpu() - ref).pow(2).mean().sqrt()
    size = ref.pow(2).mean().sqrt()
    return (err / size).item() if size > 0 else got.detach().abs().max().item()


def recurrence(spec: dict, q, k, v, gate, S0):
    """y (B, L, H, Dv) and the final state, token by token: S_(t+1) = a_t S_t + K_t v'_t^T, O_t = Q_t S_(t+1).

    Independent of the generator: the feature map and log-decay through the oracle's SymPy lambdify."""
    f = oracle.elementwise(spec["feature_map"]["expr"], "x")

    def phi(x: torch.Tensor) -> torch.Tensor:
        r = f(x)
        return r / r.norm(dim=-1, keepdim=True) if spec["feature_map"]["normalize"] == "l2" else r

    B, L, H, dk = q.shape
    scale = float(parse_expression(spec["scale"], "d").subs(sp.Symbol("d", real=True), dk))
    Q, K = scale * phi(q), phi(k)
    norm = spec["normalize_rows"]
    V = torch.cat([v, torch.ones_like(v[..., :1])], -1) if norm else v
    family = spec["mask"]["family"]
    a = None if family == "none" else torch.exp(oracle.elementwise(spec["mask"]["log_decay"], "z")(gate))
    S = S0 if S0 is not None else torch.zeros(B, H, dk, V.shape[-1], dtype=q.dtype)
    ys = []
    for t in range(L):
        if family == "selective":
            S = a[:, t, :, None, None] * S
        elif family == "decay":
            S = a[None, :, None, None] * S
        S = S + K[:, t, :, :, None] * V[:, t, :, None, :]
        o = torch.einsum("bhk,bhkv->bhv", Q[:, t], S)
        ys.append(o[..., :-1] / (o[..., -1:] + spec["eps"]) if norm else o)
    return torch.stack(ys, 1), S


def inputs(mod, B, L, H, dk, dv, seed=0, with_state=True, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, L, H, dk, generator=g), torch.randn(B, L, H, dk, generator=g)
    v = torch.randn(B, L, H, dv, generator=g)
    gate = {
        "none": None,
        "decay": torch.randn(H, generator=g),
        "selective": torch.randn(B, L, H, generator=g) * 2.0,
    }[mod.FAMILY]
    dvp = dv + 1 if mod.SPEC["normalize_rows"] else dv
    # a state of the size a prefix leaves (its z column positive when rows are normalized)
    S0 = torch.rand(B, H, dk, dvp, generator=g) * 3.0 if with_state else None
    return tuple(None if t is None else t.to(device) for t in (q, k, v, gate, S0))


def check_against_recurrence(
    mod,
    fn,
    form,
    chunk,
    S0_given,
    use_y,
    use_final,
    B=1,
    L=37,
    H=2,
    dk=16,
    dv=16,
    dtype=torch.float32,
    tol=TOL,
    unchecked=(),
):
    spec = mod.SPEC
    q, k, v, gate, S0 = inputs(mod, B, L, H, dk, dv, with_state=S0_given)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(B, L, H, dv, generator=g, dtype=torch.float64)
    dS = torch.randn(B, H, dk, dv + (1 if spec["normalize_rows"] else 0), generator=g, dtype=torch.float64)
    ins = [q, k, v, gate, S0]

    ref_in = [None if t is None else t.detach().cpu().double().requires_grad_() for t in ins]
    y_ref, S_ref = recurrence(spec, *ref_in)
    loss = (y_ref * dy).sum() * use_y + (S_ref * dS).sum() * use_final
    loss.backward()
    test_in = [None if t is None else (t.to(dtype) if i < 3 else t).clone().requires_grad_() for i, t in enumerate(ins)]
    y, S = fn(*test_in[:4], form=form, chunk_size=chunk, initial_state=test_in[4], output_final_state=True)
    assert y.shape == (B, L, H, dv) and y.dtype == dtype
    assert S.shape == S_ref.shape and S.dtype == torch.float32
    errors = {"y": rel_rms(y, y_ref), "final_state": rel_rms(S, S_ref)}
    loss = (y * dy.to(y.device, dtype)).sum() * use_y + (S * dS.float().to(S.device)).sum() * use_final
    loss.backward()
    for label, t, r in zip(LABELS, test_in, ref_in, strict=True):
        if t is None:
            continue
        assert t.grad is not None and t.grad.shape == t.shape, label
        errors[label] = rel_rms(t.grad, r.grad)
    bad = {key: e for key, e in errors.items() if not e <= tol and key not in unchecked}
    assert not bad, (form, errors)
    return errors


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("form", ["chunk", "recurrent", "torch", "reference"])
def test_initial_and_final_state_against_the_recurrence(name, form):
    """Output, final state and every gradient (initial_state and the gate included) with a loss that uses
    both the output and the final state; L = 37 is not a multiple of the chunk (16)."""
    mod, fn, _ = get(name)
    check_against_recurrence(mod, fn, form, 16, S0_given=True, use_y=1.0, use_final=1.0)


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize(
    "S0_given,use_y,use_final",
    [(True, 1.0, 0.0), (False, 1.0, 1.0), (True, 0.0, 1.0)],
    ids=["no-final-grad", "zero-initial", "final-only"],
)
def test_chunk_form_state_paths(name, S0_given, use_y, use_final):
    """Each path on its own: S0 into the output only, dS_L from a zero initial state, a loss of the final
    state alone (its gate gradient is the <dS_L, S_L> share of every row and the keys' terms)."""
    mod, fn, _ = get(name)
    check_against_recurrence(mod, fn, "chunk", 16, S0_given, use_y, use_final)


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize(
    "S0_given,use_y,use_final",
    [(True, 1.0, 0.0), (False, 1.0, 1.0), (True, 0.0, 1.0)],
    ids=["no-final-grad", "zero-initial", "final-only"],
)
def test_recurrent_form_state_paths(name, S0_given, use_y, use_final):
    """The same paths through the recurrent form's sweeps: S0 starts the forward and the left backward sweep,
    dS_L the right one (its gate share <dS_L, S_L> from the left sweep's final S); L = 37 is not a multiple of
    the sweeps' 16-row blocks."""
    mod, fn, _ = get(name)
    check_against_recurrence(mod, fn, "recurrent", 16, S0_given, use_y, use_final)


@pytest.mark.parametrize("name", CAUSAL)
def test_chunk_form_state_with_segments_of_several_chunks(name, monkeypatch):
    """Two chunks per segment (the interpreter's default schedule gives one): the initial state enters the
    first segment's first chunk and the carried states; the final state leaves the last segment's last chunk."""
    mod, fn, _ = get(name)
    monkeypatch.setattr(mod, "segment_chunks", lambda bh, n, dev: 2)
    check_against_recurrence(mod, fn, "chunk", 16, S0_given=True, use_y=1.0, use_final=1.0, L=70)


@pytest.mark.parametrize("name", CAUSAL)
def test_float16_chunk_form_with_a_state(name):
    """float16 inputs with a float32 state: output, final state and every gradient within the 16-bit bar, for
    a loss of the output, of both, and of the final state alone. (With the state dots' row operand rounded
    to one bf16 part, the gate's gradient of the last two was off by 1.7e-2 and 7e-2: the final state's
    share <dS_L, S_L> of every dl_s and the keys' terms that cancel it were rounded differently.)"""
    mod, fn, _ = get(name)
    for use_y, use_final in ((1.0, 0.0), (1.0, 1.0), (0.0, 1.0)):
        check_against_recurrence(mod, fn, "chunk", 16, True, use_y, use_final, dtype=torch.float16, tol=1e-2)


def test_causal_decay_spec(causal_decay):
    """A fixed per-head decay (one gate per head: its gradient sums every row's share)."""
    check_against_recurrence(causal_decay, causal_decay.causal_decay, "chunk", 16, True, 1.0, 1.0)
    check_against_recurrence(causal_decay, causal_decay.causal_decay, "torch", 16, True, 1.0, 1.0)
    check_against_recurrence(causal_decay, causal_decay.causal_decay, "recurrent", 16, True, 1.0, 1.0)


@pytest.mark.parametrize("name", [*CAUSAL, "causal_decay"])
@pytest.mark.parametrize("step_form", ["kernel", "torch"])
def test_prefill_then_steps_equals_the_whole_sequence(name, step_form, causal_decay):
    """Prefill 37 tokens with the chunk form (chunk 16), then one step per token: the outputs and the
    state equal the chunk form over the whole sequence; so does a second chunk call from the prefill's state."""
    mod, fn, step = get(name, causal_decay)
    B, L, L0, H, dk, dv = 2, 45, 37, 2, 16, 32
    q, k, v, gate, _ = inputs(mod, B, L, H, dk, dv, seed=3)
    sel = mod.FAMILY == "selective"

    def part(a, b):
        return q[:, a:b], k[:, a:b], v[:, a:b], gate[:, a:b] if sel else gate

    y_all, S_all = fn(q, k, v, gate, form="chunk", chunk_size=16, output_final_state=True)
    y0, S = fn(*part(0, L0), form="chunk", chunk_size=16, output_final_state=True)
    y1, S1 = fn(*part(L0, L), form="chunk", chunk_size=16, initial_state=S, output_final_state=True)
    ys = [y0]
    for t in range(L0, L):
        y_t, S = step(S, q[:, t], k[:, t], v[:, t], gate[:, t] if sel else gate, form=step_form)
        assert y_t.shape == (B, H, dv) and S.dtype == torch.float32
        ys.append(y_t[:, None])
    assert rel_rms(torch.cat(ys, 1), y_all.double()) <= TOL
    assert rel_rms(S, S_all.double()) <= TOL
    assert rel_rms(torch.cat([y0, y1], 1), y_all.double()) <= TOL
    assert rel_rms(S1, S_all.double()) <= TOL
    # the first tokens from the zero state (state=None) equal the chunk form's first rows
    first = [t if t is None or t.dim() == 1 else t[:, 0] for t in part(0, 1)]
    y_first, _ = step(None, *first, form=step_form)
    assert rel_rms(y_first, y_all[:, 0].double()) <= TOL


@pytest.mark.parametrize("name", CAUSAL)
def test_step_against_the_recurrence(name):
    """Steps from a given state against the float64 recurrence (kernel and torch paths)."""
    mod, _, step = get(name)
    q, k, v, gate, S0 = inputs(mod, 2, 4, 2, 16, 16, seed=5)
    y_ref, S_ref = recurrence(mod.SPEC, *(None if t is None else t.cpu().double() for t in (q, k, v, gate, S0)))
    for form in ("kernel", "torch"):
        S, ys = S0, []
        for t in range(4):
            y_t, S = step(S, q[:, t], k[:, t], v[:, t], gate[:, t] if gate is not None else None, form=form)
            ys.append(y_t)
        assert rel_rms(torch.stack(ys, 1), y_ref) <= TOL, form
        assert rel_rms(S, S_ref) <= TOL, form


def test_float64_torch_and_reference_forms_keep_a_float64_state():
    mod, fn, step = get("lion_s_causal")
    q, k, v, gate, S0 = (t.double() for t in inputs(mod, 1, 20, 2, 16, 8, device="cpu"))
    y_ref, S_ref = recurrence(mod.SPEC, q, k, v, gate, S0)
    for form in ("torch", "reference"):
        y, S = fn(q, k, v, gate, form=form, chunk_size=16, initial_state=S0, output_final_state=True)
        assert S.dtype == torch.float64 and rel_rms(y, y_ref) < 1e-12 and rel_rms(S, S_ref) < 1e-12
    y_t, S1 = step(S0, q[:, 0], k[:, 0], v[:, 0], gate[:, 0])  # auto on the CPU: torch
    assert S1.dtype == torch.float64 and y_t.dtype == torch.float64


def test_step_is_inference_only():
    mod, _, step = get("lion_s_causal")
    q, k, v, gate, S0 = inputs(mod, 1, 1, 2, 16, 8)
    q.requires_grad_()
    for form in ("kernel", "torch"):
        y, S = step(S0, q[:, 0], k[:, 0], v[:, 0], gate[:, 0], form=form)
        assert not y.requires_grad and not S.requires_grad


# ---------------------------------------------------------------------------- refusals


def small(name):
    mod, fn, step = get(name)
    q, k, v, gate, S0 = inputs(mod, 1, 5, 2, 4, 3)
    return mod, fn, step, q, k, v, gate, S0


@pytest.mark.parametrize("name", ["lion_s", "lion_lit", "lion_d", "lion_s_sym", "retention"])
def test_bidirectional_specs_refuse_a_state(name):
    mod, fn, step = get(name)
    q, k, v, gate, _ = inputs(mod, 1, 5, 2, 4, 3)
    S0 = torch.zeros(1, 2, 4, 4, device=q.device)
    for kwargs in (dict(initial_state=S0), dict(output_final_state=True)):
        with pytest.raises(ValueError, match="bidirectional.*whole sequence"):
            fn(q, k, v, gate, form="torch", **kwargs)
    with pytest.raises(ValueError, match="bidirectional.*later token"):
        step(None, q[:, 0], k[:, 0], v[:, 0], None if gate is None else gate)


@pytest.mark.parametrize(
    "make,exc,words",
    [
        (lambda S0: dict(initial_state=S0[..., :-1]), ValueError, ["initial_state", "(1, 2, 4, 4)", "z"]),
        (lambda S0: dict(initial_state=S0[:, :1]), ValueError, ["initial_state", "shape"]),
        (lambda S0: dict(initial_state=S0.double()), TypeError, ["initial_state", "float32"]),
        (lambda S0: dict(initial_state=S0.half()), TypeError, ["initial_state", "float32"]),
        (lambda S0: dict(initial_state=S0.to("meta")), ValueError, ["initial_state", "device"]),
        (lambda S0: dict(initial_state=S0.tolist()), TypeError, ["initial_state", "Tensor"]),
        (lambda S0: dict(output_final_state=1), TypeError, ["output_final_state", "bool"]),
        (lambda S0: dict(initial_state=S0, form="parallel"), ValueError, ["initial_state", "'chunk'", "parallel"]),
        (lambda S0: dict(output_final_state=True, form="parallel"), ValueError, ["output_final_state", "parallel"]),
    ],
)
def test_bad_state_arguments_are_refused(make, exc, words):
    _, fn, _, q, k, v, gate, S0 = small("lion_s_causal")
    kwargs = dict(form="chunk", chunk_size=16) | make(S0)
    with pytest.raises(exc) as err:
        fn(q, k, v, gate, **kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_non_contiguous_initial_state_is_accepted():
    mod, fn, _, q, k, v, gate, S0 = small("lion_s_causal")
    S0t = S0.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not S0t.is_contiguous()
    want = fn(q, k, v, gate, form="reference", initial_state=S0)
    for form in ("chunk", "torch"):
        assert rel_rms(fn(q, k, v, gate, form=form, chunk_size=16, initial_state=S0t), want.double()) <= TOL


@pytest.mark.parametrize(
    "args,exc,words",
    [
        (lambda S, q, k, v, g: (S[..., :-1], q, k, v, g), ValueError, ["state", "(1, 2, 4, 4)"]),
        (lambda S, q, k, v, g: (S.double(), q, k, v, g), TypeError, ["state", "float32"]),
        (lambda S, q, k, v, g: (S, q[:, :, None], k, v, g), ValueError, ["q", "(B, H, Dk)"]),
        (lambda S, q, k, v, g: (S, q, k[:, :1], v, g), ValueError, ["k", "shape"]),
        (lambda S, q, k, v, g: (S, q, k, v[:, :1], g), ValueError, ["v", "(B, H, Dv)"]),
        (lambda S, q, k, v, g: (S, q, k, v, None), ValueError, ["gate", "required", "(B, H)"]),
        (lambda S, q, k, v, g: (S, q, k, v, g[:, :1]), ValueError, ["gate", "(1, 2)"]),
        (lambda S, q, k, v, g: (S, q, k.double(), v, g), TypeError, ["k", "dtype"]),
        (lambda S, q, k, v, g: (S, q, k, v, g.to("meta")), ValueError, ["gate", "device"]),
    ],
)
def test_bad_step_arguments_are_refused(args, exc, words):
    _, _, step, q, k, v, gate, S0 = small("lion_s_causal")
    with pytest.raises(exc) as err:
        step(*args(S0, q[:, 0], k[:, 0], v[:, 0], gate[:, 0]))
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_step_refuses_a_gate_without_a_mask_and_an_unknown_form():
    _, _, step, q, k, v, _, S0 = small("linear_causal")
    with pytest.raises(ValueError, match="gate must be None"):
        step(S0, q[:, 0], k[:, 0], v[:, 0], torch.zeros(1, 2))
    with pytest.raises(ValueError, match="form"):
        step(S0, q[:, 0], k[:, 0], v[:, 0], form="chunk")


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("form", ["chunk", "recurrent", "torch"])
def test_state_under_torch_compile(name, form):
    """fullgraph torch.compile with a state: the chunk and recurrent forms through the state custom ops, the torch form
    traced; the outputs and every gradient (initial_state included) equal the eager ones."""
    if form != "torch" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or the Triton interpreter")
    mod, fn, _ = get(name)
    ins = inputs(mod, 1, 20, 2, 16, 8)

    def f(q, k, v, gate, S0):
        y, S = fn(q, k, v, gate, form=form, chunk_size=16, initial_state=S0, output_final_state=True)
        return (y * y).sum() + (S * S.detach().flip(-1)).sum()

    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        x = [None if t is None else t.clone().requires_grad_() for t in ins]
        call = torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f
        out = call(*x)
        out.backward()
        results.append([out.detach()] + [t.grad for t in x if t is not None])
    for got, want in zip(results[1], results[0], strict=True):
        assert rel_rms(got, want.double()) <= TOL


@pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="Triton's NVIDIA backend is not installed")
@pytest.mark.parametrize("name", CAUSAL)
def test_stateful_kernels_compile_for_hopper(name, monkeypatch):
    """The chunk form's kernels specialized for a state (no pointer None) and the step kernel compile for
    sm_90a (benchmarks/cost.py: a dry run on meta tensors records each launch, then the JIT compiles it)."""
    from benchmarks import cost

    mod, fn, step = get(name)
    launches, phase = [], ["forward"]

    def record(kernel, grid, *args, **kwargs):
        args = [cost.encode_arg(a) for a in args]
        kwargs = {k: cost.encode_arg(v) for k, v in kwargs.items()}
        launches.append(cost.Launch(phase[0], cost._kernel_name(kernel), mod.__name__, list(grid), args, kwargs))

    monkeypatch.setattr(mod, "launch", record)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the dry run's meta tensors pass the kernel forms' device check
    B, L, H, D = 2, 256, 4, 64
    q, k, v = (torch.randn(B, L, H, D, device="meta", dtype=torch.float16, requires_grad=True) for _ in range(3))
    gate = torch.randn(B, L, H, device="meta", requires_grad=True) if mod.FAMILY == "selective" else None
    S0 = torch.randn(B, H, D, D + (1 if mod.SPEC["normalize_rows"] else 0), device="meta", requires_grad=True)
    y, S = fn(q, k, v, gate, form="chunk", chunk_size=64, initial_state=S0, output_final_state=True)
    phase[0] = "backward"
    torch.autograd.backward([y, S], [torch.ones_like(y), torch.ones_like(S)])
    phase[0] = "step"
    one = [t if t is None else t[:, 0].detach() for t in (q, k, v, gate)]
    step(S.detach(), *one, form="kernel")
    names = [r.kernel for r in launches]
    assert f"_{name}_step_kernel" in names and f"_{name}_bwd_grads" in names
    for r in cost.compile_launches(launches, ptxas_log=False):
        assert r["error"] is None, (r["kernel"], r["error"])
        assert r["shared"] <= cost.H100_SHARED, (r["kernel"], r["shared"])


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("form", ["chunk", "recurrent", "torch", "reference"])
def test_padded_batch_with_a_state_equals_its_sequences_without_pads(name, form):
    """key_padding_mask and a state together: left padding (batched prompts), pads in the middle; each
    sequence's real rows, its final state and every gradient equal those of its real rows alone, run from
    the same initial state (the float64 recurrence per sequence)."""
    mod, fn, _ = get(name)
    spec = mod.SPEC
    B, L, H, dk, dv = 2, 37, 2, 16, 16
    q, k, v, gate, S0 = inputs(mod, B, L, H, dk, dv)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :9] = False  # left padding
    mask[1, 20:26] = False  # pads in the middle
    mask = mask.to(DEVICE)
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(B, L, H, dv, generator=g, dtype=torch.float64)
    dS = torch.randn(*S0.shape, generator=g, dtype=torch.float64)
    ins = [q, k, v, gate, S0]
    test_in = [None if t is None else t.clone().requires_grad_() for t in ins]
    y, S = fn(
        *test_in[:4], form=form, chunk_size=16, key_padding_mask=mask, initial_state=test_in[4], output_final_state=True
    )
    ((y * dy.to(y)).sum() + (S * dS.to(S)).sum()).backward()
    assert (y[~mask] == 0).all()
    for b in range(B):
        real = mask[b].cpu()
        ref_in = [None if t is None else t.detach().cpu().double()[b : b + 1].clone() for t in ins]
        if gate is not None and mod.FAMILY == "decay":
            ref_in[3] = gate.detach().cpu().double().clone()
        sliced = [
            t[:, real] if i < 3 or (i == 3 and mod.FAMILY == "selective") else t
            for i, t in enumerate(ref_in)
            if t is not None
        ]
        if gate is None:
            sliced.insert(3, None)
        sliced = [None if t is None else t.requires_grad_() for t in sliced]
        y_ref, S_ref = recurrence(spec, *sliced)
        ((y_ref * dy[b : b + 1, real]).sum() + (S_ref * dS[b : b + 1]).sum()).backward()
        errors = {"y": rel_rms(y[b : b + 1, real], y_ref), "final_state": rel_rms(S[b : b + 1], S_ref)}
        for label, t, r in zip(LABELS, test_in, sliced, strict=True):
            if t is None:
                continue
            got = t.grad if label == "gate" and mod.FAMILY == "decay" else t.grad[b : b + 1]
            if label in ("q", "k", "v") or (label == "gate" and mod.FAMILY == "selective"):
                assert (got[:, ~real] == 0).all(), f"{label}: a pad row got a gradient"
                got = got[:, real]
            if label == "gate" and mod.FAMILY == "decay":
                continue  # one number per head summed over the batch: checked by the unpadded tests
            errors[label] = rel_rms(got, r.grad)
        bad = {key: e for key, e in errors.items() if not e <= TOL}
        assert not bad, (form, b, errors)
