"""Packed batches (cu_seqlens): q, k, v (1, T, H, D) holding N sequences back to back, against per-sequence
float64 references.

Every sequence of a packed batch must give the outputs and gradients it gives alone (tests/oracle.py,
float64, one sequence at a time), in every form (chunk, parallel, recurrent, torch, reference) and every
spec: no chunk, segment, mask, gate or state crosses a boundary. Lengths cover the edge cases: 0 (an empty
sequence), 1, an exact multiple of the chunk, lengths that are not, a single sequence, and many short ones
(3000 on a GPU). Causal specs carry one state per sequence. Bad cu_seqlens are refused before any kernel runs.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import triton
from test_kernels import SPECS, TOL, rel_rms
from test_padding import assert_within_bar, forbid_kernels, reference_pieces, run
from test_padding import inputs as padding_inputs
from test_state import recurrence

FORMS = ["chunk", "parallel", "recurrent", "torch", "reference"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
H, DK, DV, CHUNK = 2, 16, 16, 16
LENGTHS = [5, 0, 37, 1, 16, 20]  # 79 rows: an empty sequence, one row, one full chunk, partial chunks


def module(name: str):
    return importlib.import_module(f"generated.{name}")


def cu_of(lengths: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def spans(lengths: list[int]) -> list[slice]:
    starts = cu_of(lengths).tolist()
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def inputs(mod, total: int, seed: int = 0, heads: int = H):
    """q, k, v, gate and dy of one packed batch of ``total`` rows (float64)."""
    return padding_inputs(mod, total, seed, batch=1, heads=heads)


def per_sequence_reference(mod, q, k, v, gate, dy, lengths, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Each sequence alone through the oracle; outputs and gradients put back in place."""
    return reference_pieces(mod, q, k, v, gate, dy, [(0, rows) for rows in spans(lengths)], dtype)


def check(mod, form, lengths, device, seed=0, dtype=torch.float32, heads=H):
    q, k, v, gate, dy = inputs(mod, sum(lengths), seed, heads)
    got = run(mod, form, q, k, v, gate, dy, device, dtype, cu_seqlens=cu_of(lengths, device))
    ref = per_sequence_reference(mod, q, k, v, gate, dy, lengths)

    def ref32():
        return per_sequence_reference(mod, q, k, v, gate, dy, lengths, torch.float32)

    assert_within_bar(got, ref, mod, max(lengths), dtype, ref32, f"{mod.SPEC['name']} {form} {lengths}")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", SPECS)
def test_packed_batch_equals_its_sequences(name, form, device):
    check(module(name), form, LENGTHS, device)


@pytest.mark.parametrize("name", SPECS)
def test_packed_segments_of_several_chunks(name, device, monkeypatch):
    """Segments of 2 chunks: sequences of 1 to 5 chunks, so segments end inside and at a sequence's end,
    and the scans over each sequence's segments start and stop at its boundaries."""
    monkeypatch.setattr(module(name), "segment_chunks", lambda bh, n, dev: 2)
    check(module(name), "chunk", [45, 3, 0, 70, 32], device)


@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
@pytest.mark.parametrize("name", ["lion_s", "lion_lit", "lion_s_causal"])
def test_float16_packed_batch(name, form, device):
    check(module(name), form, LENGTHS, device, dtype=torch.float16)


@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
@pytest.mark.parametrize("name", ["lion_s", "lion_d"])
def test_a_single_sequence_equals_the_unpacked_call(name, form, device):
    mod = module(name)
    q, k, v, gate, _ = inputs(mod, 45)
    q, k, v = (t.to(device, torch.float32) for t in (q, k, v))
    gate = None if gate is None else gate.to(device, torch.float32)
    fn = getattr(mod, name)
    whole = fn(q, k, v, gate, form=form, chunk_size=CHUNK)
    packed = fn(q, k, v, gate, form=form, chunk_size=CHUNK, cu_seqlens=cu_of([45], device))
    torch.testing.assert_close(packed, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
def test_many_short_sequences(form, device):
    """Sequences of 0 to 4 rows, one head: every boundary reset, every gradient. 3000 sequences compiled on
    a GPU; 100 under the interpreter (it runs each program in Python: 1000 took 4 to 5 minutes per form)."""
    mod = module("lion_s")
    count = 100 if INTERPRETED else 3000
    lengths = torch.randint(0, 5, (count,), generator=torch.Generator().manual_seed(3)).tolist()
    check(mod, form, lengths, device, seed=4, heads=1)


@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent", "torch"])
def test_packed_batch_with_a_key_padding_mask(form, device):
    """Both together: pads inside packed sequences are left out of their own sequence only."""
    mod = module("lion_s")
    lengths = [20, 0, 33, 7]
    total = sum(lengths)
    q, k, v, gate, dy = inputs(mod, total, seed=5)
    mask = torch.ones(1, total, dtype=torch.bool)
    mask[0, [0, 5, 6, 19, 20, 40, 52, 59]] = False
    got = run(mod, form, q, k, v, gate, dy, device, cu_seqlens=cu_of(lengths, device), key_padding_mask=mask.to(device))
    real = mask[0]
    kept = [int(real[r].sum()) for r in spans(lengths)]  # each sequence without its pads
    ref = per_sequence_reference(mod, q[:, real], k[:, real], v[:, real], gate[:, real], dy[:, real], kept)
    for label, r in ref.items():
        assert (got[label][:, ~real] == 0).all(), f"{label}: pad rows not 0"
        err = rel_rms(got[label][:, real], r)
        assert err <= TOL[torch.float32], f"{form}: {label} rel RMS {err:.3g}"


@pytest.mark.parametrize("form", ["chunk", "recurrent", "torch", "reference"])
@pytest.mark.parametrize("name", ["lion_s_causal", "linear_causal"])
def test_packed_batch_with_a_state_per_sequence(name, form, device, monkeypatch):
    """initial_state (N, H, Dk, Dv') and the final states: each sequence against the float64 recurrence of
    tests/test_state.py from its own initial state; an empty sequence passes its state through (and its
    gradient back). Every gradient, initial_state's included."""
    mod = module(name)
    if form == "chunk":
        monkeypatch.setattr(mod, "segment_chunks", lambda bh, n, dev: 2)
    lengths = [9, 0, 40, 1]
    total = sum(lengths)
    q, k, v, gate, dy = inputs(mod, total, seed=6)
    dvp = DV + (1 if mod.SPEC["normalize_rows"] else 0)
    g = torch.Generator().manual_seed(7)
    S0 = torch.rand(len(lengths), H, DK, dvp, generator=g, dtype=torch.float64) * 3.0
    dS = torch.randn(len(lengths), H, DK, dvp, generator=g, dtype=torch.float64)

    ins = [t.clone().requires_grad_() for t in (q, k, v, gate, S0) if t is not None]
    ys, finals = [], []
    for i, rows in enumerate(spans(lengths)):
        gi = None if gate is None else ins[3][:, rows]
        s0 = ins[-1][i : i + 1]
        if rows.start == rows.stop:
            ys.append(ins[2][:, rows] * 0)
            finals.append(s0)
            continue
        y, s = recurrence(mod.SPEC, ins[0][:, rows], ins[1][:, rows], ins[2][:, rows], gi, s0)
        ys.append(y)
        finals.append(s)
    y_ref, S_ref = torch.cat(ys, 1), torch.cat(finals, 0)
    ref = torch.autograd.grad((y_ref * dy).sum() + (S_ref * dS).sum(), ins)

    dt = torch.float32
    x = [t.detach().to(device, dt).requires_grad_() for t in ins]
    gx = x[3] if gate is not None else None
    fn = getattr(mod, name)
    y, S = fn(*x[:3], gx, form=form, chunk_size=CHUNK, cu_seqlens=cu_of(lengths, device),
              initial_state=x[-1], output_final_state=True)  # fmt: skip
    assert S.shape == S0.shape
    got = torch.autograd.grad((y * dy.to(device, dt)).sum() + (S * dS.to(device, dt)).sum(), x)
    for label, a, b in [("y", y, y_ref), ("final_state", S, S_ref)] + list(
        zip(["q", "k", "v", *(["gate"] if gate is not None else []), "initial_state"], got, ref, strict=True)
    ):
        err = rel_rms(a.cpu(), b)
        assert err <= TOL[dt], f"{name} {form}: {label} rel RMS {err:.3g}"
    empty = lengths.index(0)
    torch.testing.assert_close(S[empty].cpu().double(), S0[empty], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_bad_cu_seqlens_are_refused_before_any_kernel_runs(form, device, monkeypatch):
    mod = module("lion_s")
    q, k, v, gate, _ = inputs(mod, 20)
    q, k, v, gate = (t.to(device, torch.float32) for t in (q, k, v, gate))
    forbid_kernels(mod, monkeypatch)
    good = cu_of([5, 15], device)
    for bad, err, words in (
        (good.long(), TypeError, "int32"),
        (good.float(), TypeError, "int32"),
        ([0, 5, 20], TypeError, "torch.Tensor"),
        (good[None], ValueError, "1-D"),
        (good[:1], ValueError, "1-D"),
        (good.to("meta"), ValueError, "device"),
        (good + 1, ValueError, "start at 0"),
        (cu_of([5, 15], device).flip(0).contiguous(), ValueError, "start at 0"),
        (torch.tensor([0, 12, 5, 20], dtype=torch.int32, device=device), ValueError, "non-decreasing"),
        (cu_of([5, 14], device), ValueError, "end at T = 20"),
        (cu_of([5, 16], device), ValueError, "end at T = 20"),
    ):
        with pytest.raises(err, match="cu_seqlens") as info:
            mod.lion_s(q, k, v, gate, form=form, chunk_size=16, cu_seqlens=bad)
        assert words in str(info.value), str(info.value)
    two = torch.cat([q, q])
    with pytest.raises(ValueError, match="cu_seqlens") as info:
        mod.lion_s(two, two, torch.cat([v, v]), torch.cat([gate, gate]), form=form, cu_seqlens=good)
    assert "(1, T, H, D)" in str(info.value)


def test_one_state_per_sequence_is_checked():
    mod = module("lion_s_causal")
    q, k, v, gate, _ = inputs(mod, 20)
    q, k, v, gate = (t.float() for t in (q, k, v, gate))
    wrong = torch.zeros(1, H, DK, DV + 1)  # one state, two sequences
    with pytest.raises(ValueError, match="initial_state") as info:
        mod.lion_s_causal(q, k, v, gate, form="chunk", cu_seqlens=cu_of([5, 15]), initial_state=wrong)
    assert "(2, 2, 16, 17)" in str(info.value)


@pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="Triton's NVIDIA backend is not installed")
@pytest.mark.parametrize("name", ["lion_s", "lion_s_causal"])
def test_packed_kernels_compile_for_hopper(name):
    """The kernels specialized for a packed batch (the sequence table a pointer, early exits) compile for
    sm_90a as their launches build them (benchmarks/cost.py: a dry run records each launch)."""
    from benchmarks import cost

    launches = []
    for form in cost.KERNEL_FORMS:
        recs = cost.capture(name, 1, 300, 4, 64, torch.float16, 64, form, device="cpu", packed=[100, 0, 37, 163])
        assert recs and all(any(isinstance(a, dict) and a.get("tensor") == "int32" for a in r.args) for r in recs), (
            f"{form}: a launch without the sequence table"
        )
        launches += recs
    for r in cost.compile_launches(launches, ptxas_log=False):
        assert r["error"] is None, (r["kernel"], r["error"])
        assert r["shared"] <= cost.H100_SHARED, (r["kernel"], r["shared"])


@pytest.mark.parametrize("form", ["chunk", "torch"])
def test_generated_layer_takes_a_packed_batch(form, device):
    """The generated nn.Module: x (1, T, dim) with cu_seqlens gives each sequence's rows of its own call."""
    mod = module("lion_s")
    torch.manual_seed(0)
    layer = mod.LionS(32, 2, form=form, chunk_size=CHUNK).to(device)
    lengths = [9, 0, 30]
    x = torch.randn(1, sum(lengths), 32, device=device)
    y = layer(x, cu_seqlens=cu_of(lengths, device))
    alone = torch.cat([layer(x[:, r]) for r in spans(lengths) if r.stop > r.start], 1)
    torch.testing.assert_close(y, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["lion_s", "lion_s_causal"])
def test_packed_batch_under_torch_compile(name, device):
    """cu_seqlens passes into the compile custom ops (with a state for a causal spec): outputs and every
    gradient equal the eager ones."""
    if not INTERPRETED and not torch.cuda.is_available():
        pytest.skip("needs a GPU or the Triton interpreter")
    mod = module(name)
    fn = getattr(mod, name)
    lengths = [9, 0, 30]
    cu = cu_of(lengths, device)
    q, k, v, gate, _ = inputs(mod, sum(lengths))
    causal = name == "lion_s_causal"
    S0 = torch.rand(len(lengths), H, DK, DV + 1, dtype=torch.float64) if causal else None
    ins = [t.to(device, torch.float32) for t in (q, k, v, gate) + ((S0,) if causal else ())]

    def f(q, k, v, gate, S0=None):
        if S0 is None:
            return fn(q, k, v, gate, form="chunk", chunk_size=CHUNK, cu_seqlens=cu).square().sum()
        y, S = fn(
            q, k, v, gate, form="chunk", chunk_size=CHUNK, cu_seqlens=cu, initial_state=S0, output_final_state=True
        )
        return y.square().sum() + (S * S.detach().flip(-1)).sum()

    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        x = [t.clone().requires_grad_() for t in ins]
        out = (torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f)(*x)
        out.backward()
        results.append([out.detach()] + [t.grad for t in x])
    for got, want in zip(results[1], results[0], strict=True):
        assert rel_rms(got, want.double()) <= TOL[torch.float32]


# ------------------------------------------------------------------------------------- the packed grids

EDGES = [0, 9, 0, 70, 16, 1, 0]  # empty first, in the middle and last; 70 rows, more than all others together
PER_SEGMENT = ("_summary", "_output", "_grads", "_gate_grad")


def expected_grid(kernel: str, lengths: list[int], form: str, seg: int, heads: int = H) -> tuple[int, ...]:
    """What a packed launch must be: one program per (segment, head) of each sequence in the per-segment
    stages, per (tile, head) in the parallel form, per (sequence, head) in the scans and the recurrent form."""
    chunks = [-(-n // CHUNK) for n in lengths]
    if form == "parallel":
        return (heads * sum(chunks),)
    if form == "chunk" and kernel.endswith(PER_SEGMENT):
        return (heads * sum(-(-c // seg) for c in chunks),)
    assert form == "recurrent" or kernel.endswith("_scan"), kernel
    return (heads * len(lengths),)


def record_grids(mod, monkeypatch, run_kernels: bool) -> list[tuple[str, tuple[int, ...]]]:
    seen = []
    real = mod.launch

    def spy(kernel, grid, *args, **kwargs):
        seen.append((kernel.__name__, tuple(grid)))
        if run_kernels:
            real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(mod, "launch", spy)
    return seen


@pytest.mark.parametrize("form,seg", [("chunk", 1), ("chunk", 2), ("chunk", 3), ("parallel", 1), ("recurrent", 1)])
@pytest.mark.parametrize("name", SPECS)
def test_packed_launches_hold_exactly_the_programs_with_work(name, form, seg, monkeypatch):
    """Every launch of a packed call, forward and backward, has sum over sequences of (segments x H)
    programs (tiles x H in the parallel form, H per sequence in the scans and the recurrent form): none past
    a sequence's end, none for the segments of an empty sequence. Segments of ``seg`` chunks (the chunk
    form's). The kernels are not run (grids only)."""
    mod = module(name)
    monkeypatch.setattr(mod, "segment_chunks", lambda bh, n, dev: seg)
    for lengths in (EDGES, LENGTHS, [200, 3, 0]):
        seen = record_grids(mod, monkeypatch, run_kernels=False)
        q, k, v, gate, dy = inputs(mod, sum(lengths))
        x = [t.float().requires_grad_() for t in (q, k, v)]
        g = None if gate is None else gate.float().requires_grad_()
        getattr(mod, name)(*x, g, form=form, chunk_size=CHUNK, cu_seqlens=cu_of(lengths)).backward(dy.float())
        assert seen, "no launch recorded"
        for kernel, grid in seen:
            assert grid == expected_grid(kernel, lengths, form, seg), (kernel, lengths, grid)
        if form == "chunk":
            assert {kernel for kernel, _ in seen} >= {f"_{name}_fwd_summary", f"_{name}_bwd_grads"}


@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
@pytest.mark.parametrize("name", ["lion_s", "lion_d", "lion_lit", "lion_s_causal"])
def test_empty_sequences_at_the_ends_and_one_longer_than_all_others(name, form, device, monkeypatch):
    """Empty sequences first, in the middle and last, and one sequence longer than all the others together
    (its segments are most of the flat grid): every output and gradient against each sequence alone, and the
    grids hold exactly the programs with work."""
    mod = module(name)
    if form == "chunk":
        monkeypatch.setattr(mod, "segment_chunks", lambda bh, n, dev: 2)
    seen = record_grids(mod, monkeypatch, run_kernels=True)
    check(mod, form, EDGES, device)
    assert seen and all(grid == expected_grid(kernel, EDGES, form, 2) for kernel, grid in seen), seen
