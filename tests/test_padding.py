"""Key padding masks (key_padding_mask (B, L), True = real token), against per-sequence float64 references.

A padded batch must give, on its real rows, the outputs and gradients of each sequence without its pads
(tests/oracle.py on the compacted real rows, float64), whatever the pads hold and wherever they are (left,
middle, right); pad rows get output 0 and gradients exactly 0 (q, k, v, and the gate of a selective mask;
a per-head decay's gradient sums the real rows only). Every spec, forms chunk, parallel, torch and reference.
"""

from __future__ import annotations

import importlib
import os

import oracle
import pytest
import torch
from test_kernels import FP32_FACTOR, SPECS, TOL, fp32_limited, rel_rms

from lion_gen.nn import Block, LionAttention, TokenEncoder

FORMS = ["chunk", "parallel", "recurrent", "torch", "reference"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
L, H, DK, DV, CHUNK = 45, 2, 16, 16, 16  # 45 rows: three chunks of 16, the last one partial


def module(name: str):
    return importlib.import_module(f"generated.{name}")


def masks(length: int, all_pad: bool = False) -> torch.Tensor:
    """Two sequences: pads on the left, a run and single rows in the middle, on the right (sequence 0); a
    run in the middle and a longer right tail (sequence 1), or no real row at all (``all_pad``)."""
    m = torch.ones(2, length, dtype=torch.bool)
    m[0, :3] = False
    m[0, 17:22] = False
    m[0, [9, 30]] = False
    m[0, -4:] = False
    if all_pad:
        m[1] = False
    else:
        m[1, 12:14] = False
        m[1, -11:] = False
    return m


def inputs(mod, length: int, seed: int = 0, batch: int = 2, heads: int = H):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, DK, generator=g, dtype=torch.float64)
    k = torch.randn(batch, length, heads, DK, generator=g, dtype=torch.float64)
    v = torch.randn(batch, length, heads, DV, generator=g, dtype=torch.float64)
    gate = {
        "none": None,
        "decay": torch.randn(heads, generator=g, dtype=torch.float64),
        "selective": torch.randn(batch, length, heads, generator=g, dtype=torch.float64) * 2,
    }[mod.FAMILY]
    dy = torch.randn(batch, length, heads, DV, generator=g, dtype=torch.float64)  # nonzero on pads too
    return q, k, v, gate, dy


def reference_pieces(mod, q, k, v, gate, dy, pieces, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Each piece (b, rows) alone through the float64 oracle: rows ``rows`` (a bool mask or a slice) of batch
    row b, its gate rows, and dy's; outputs and gradients put back in place (0 elsewhere)."""
    out = {"y": torch.zeros_like(v, dtype=dtype), "q": torch.zeros_like(q, dtype=dtype)}
    out["k"], out["v"] = torch.zeros_like(k, dtype=dtype), torch.zeros_like(v, dtype=dtype)
    if gate is not None:
        out["gate"] = torch.zeros_like(gate, dtype=dtype)
    for b, rows in pieces:
        x = [t[b : b + 1, rows].detach().to(dtype).requires_grad_() for t in (q, k, v)]
        if x[0].shape[1] == 0:
            continue
        g = None
        if mod.FAMILY == "selective":
            g = gate[b : b + 1, rows].detach().to(dtype).requires_grad_()
        elif mod.FAMILY == "decay":
            g = gate.detach().to(dtype).clone().requires_grad_()
        y = oracle.attention(mod.SPEC, *x, g)
        y.backward(dy[b : b + 1, rows].to(dtype))
        out["y"][b, rows] = y[0].detach()
        for label, t in zip("qkv", x, strict=True):
            out[label][b, rows] = t.grad[0]
        if mod.FAMILY == "selective":
            out["gate"][b, rows] = g.grad[0]
        elif mod.FAMILY == "decay":
            out["gate"] += g.grad
    return out


def per_sequence_reference(mod, q, k, v, gate, dy, mask, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Each sequence's real rows alone, through the oracle; outputs and gradients scattered back (0 at pads)."""
    return reference_pieces(mod, q, k, v, gate, dy, list(enumerate(mask)), dtype)


def run(mod, form, q, k, v, gate, dy, device, dtype=torch.float32, chunk=CHUNK, **kwargs):
    """The op on (q, k, v) in ``dtype`` (the gate in float32; kwargs: key_padding_mask, cu_seqlens), outputs
    and gradients back on the CPU."""
    x = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    g = None if gate is None else gate.to(device, torch.float32).requires_grad_()
    y = getattr(mod, mod.SPEC["name"])(*x, g, form=form, chunk_size=chunk, **kwargs)
    assert y.shape == v.shape and y.dtype == dtype
    y.backward(dy.to(device, dtype))
    got = {"y": y.detach().cpu(), **{label: t.grad.cpu() for label, t in zip("qkv", x, strict=True)}}
    if g is not None:
        got["gate"] = g.grad.cpu()
    return got


def assert_within_bar(got, ref, mod, length, dtype, ref32_of, where) -> None:
    """Every result within the contract's bar of the float64 reference; where float32 cannot meet it
    (test_kernels.fp32_limited, at this sequence length), within FP32_FACTOR x the oracle's own float32
    error (``ref32_of()``: the same reference in float32)."""
    limited = fp32_limited(mod.SPEC, mod.FAMILY, length) if dtype == torch.float32 else []
    ref32 = ref32_of() if limited else {}
    for label, r in ref.items():
        assert torch.isfinite(got[label]).all(), f"{where}: {label} not finite (unwritten?)"
        err = rel_rms(got[label], r)
        limit = TOL[dtype]
        if label in limited:
            limit = max(limit, FP32_FACTOR * rel_rms(ref32[label], r))
        assert err <= limit, f"{where}: {label} rel RMS {err:.3g} > {limit:.3g}"


def check(mod, form, mask, device, length=L, seed=0, dtype=torch.float32):
    q, k, v, gate, dy = inputs(mod, length, seed)
    got = run(mod, form, q, k, v, gate, dy, device, dtype, key_padding_mask=mask.to(device))
    ref = per_sequence_reference(mod, q, k, v, gate, dy, mask)
    pads = ~mask
    for label in ("y", "q", "k", "v") + (("gate",) if mod.FAMILY == "selective" else ()):
        assert (got[label][pads] == 0).all(), f"{label}: pad rows not exactly 0"

    def ref32():
        return per_sequence_reference(mod, q, k, v, gate, dy, mask, torch.float32)

    assert_within_bar(got, ref, mod, length, dtype, ref32, f"{mod.SPEC['name']} {form}")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", SPECS)
def test_padded_batch_equals_its_sequences_without_pads(name, form, device):
    check(module(name), form, masks(L), device)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["lion_s", "lion_d"])
def test_an_all_pad_sequence_gives_zeros(name, form, device):
    check(module(name), form, masks(L, all_pad=True), device)


@pytest.mark.parametrize("form", ["chunk", "parallel"])
@pytest.mark.parametrize("name", ["lion_s", "lion_lit", "lion_s_causal"])
def test_float16_padded_batch(name, form, device):
    """float16 (the interpreter's bf16 dots are wrong): pads' dY must not reach a float16 cast as dY / eps."""
    check(module(name), form, masks(L), device, dtype=torch.float16)


@pytest.mark.parametrize("name", SPECS)
def test_padded_segments_of_several_chunks(name, device, monkeypatch):
    """Segments of 2 chunks (the per-chunk right states and the segment scans all carry pads): 45 rows, 3
    chunks of 16, a full segment and a partial one."""
    monkeypatch.setattr(module(name), "segment_chunks", lambda bh, n, dev: 2)
    check(module(name), "chunk", masks(L), device)


def test_zeroing_raw_pad_keys_is_not_padding():
    """The issue's counter-example: LION-S with 10 of 40 rows padded. Zeroing the raw pad keys (k = 0, as
    lion_math.md once advised) moves the real rows far from the unpadded sequence's outputs, since
    phi(0) = silu(0) + 1/2 normalized is not 0 and the pads' gates still decay what crosses them; the key
    padding mask gives the unpadded sequence's outputs."""
    mod = module("lion_s")
    length = 40
    mask = torch.ones(1, length, dtype=torch.bool)
    mask[0, torch.tensor([0, 1, 7, 8, 9, 20, 21, 36, 37, 38])] = False
    q, k, v, gate, _ = inputs(mod, length, seed=3)
    q, k, v, gate = q[:1], k[:1], v[:1], gate[:1]
    real = mask[0]
    alone = oracle.attention(mod.SPEC, q[:, real], k[:, real], v[:, real], gate[:, real])
    zeroed = torch.where(mask[:, :, None, None], k, 0.0)
    naive = mod.lion_s(q, zeroed, v, gate, form="reference")[:, real]
    assert (naive - alone).abs().max() > 0.1  # far off (the issue measured up to 0.65)
    padded = mod.lion_s(q, k, v, gate, form="reference", key_padding_mask=mask)
    torch.testing.assert_close(padded[:, real], alone, rtol=1e-12, atol=1e-12)
    assert (padded[:, ~real] == 0).all()


def forbid_kernels(mod, monkeypatch) -> None:
    """Any kernel launch, or the reference or torch form's computation, fails the test."""

    def boom(*a, **kw):
        raise AssertionError("a kernel ran")

    for name in ("launch", "_reference", "_torch_chunk"):
        monkeypatch.setattr(mod, name, boom)


@pytest.mark.parametrize("form", FORMS)
def test_bad_masks_are_refused_before_any_kernel_runs(form, device, monkeypatch):
    mod = module("lion_s")
    q, k, v, gate, _ = inputs(mod, 20)
    q, k, v, gate = (t.to(device, torch.float32) for t in (q, k, v, gate))
    forbid_kernels(mod, monkeypatch)
    good = torch.ones(2, 20, dtype=torch.bool, device=device)
    for bad, err, words in (
        (good.to(torch.uint8), TypeError, "bool"),
        (good.float(), TypeError, "bool"),
        (good[:, :19], ValueError, "(B, L) = (2, 20)"),
        (good[:1], ValueError, "(B, L) = (2, 20)"),
        (good[None], ValueError, "(B, L) = (2, 20)"),
        ([[True] * 20] * 2, TypeError, "torch.Tensor"),
        (good.to("meta"), ValueError, "device"),
    ):
        with pytest.raises(err, match="key_padding_mask") as info:
            mod.lion_s(q, k, v, gate, form=form, chunk_size=16, key_padding_mask=bad)
        assert words in str(info.value)


def test_a_mask_of_all_real_rows_changes_nothing(device):
    mod = module("lion_s")
    q, k, v, gate, _ = inputs(mod, 37)
    q, k, v, gate = (t.to(device, torch.float32) for t in (q, k, v, gate))
    ones = torch.ones(2, 37, dtype=torch.bool, device=device)
    for form in ("chunk", "torch"):
        a = mod.lion_s(q, k, v, gate, form=form, chunk_size=16)
        b = mod.lion_s(q, k, v, gate, form=form, chunk_size=16, key_padding_mask=ones)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def alone_vs_padded(model, x: torch.Tensor, mask: torch.Tensor) -> None:
    """model(x, key_padding_mask=mask) on its real rows against model on each sequence's real rows alone."""
    with torch.no_grad():
        padded = model(x, key_padding_mask=mask)
        for b in range(x.shape[0]):
            real = mask[b]
            alone = model(x[b : b + 1, real])
            torch.testing.assert_close(padded[b : b + 1, real], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["torch", "chunk"])
@pytest.mark.parametrize("name", ["lion_s", "lion_d", "lion_lit", "lion_s_causal"])
def test_nn_layers_give_the_unpadded_outputs_on_real_tokens(name, form, device):
    torch.manual_seed(0)
    mod = module(name)
    x = torch.randn(2, 37, 32, device=device)
    mask = masks(37).to(device)
    attn = LionAttention(mod, 32, 2, form=form, chunk_size=16).to(device)
    alone_vs_padded(attn, x, mask)
    alone_vs_padded(Block(32, attn).to(device), x, mask)
    layer = getattr(mod, mod.SPEC["name"].title().replace("_", ""))(32, 2, form=form, chunk_size=16).to(device)
    alone_vs_padded(layer, x, mask)
    with torch.no_grad():  # the layer's pad rows: 0 before the output projection, i.e. its bias
        out = layer(x, key_padding_mask=mask)
    torch.testing.assert_close(out[~mask], layer.out_proj.bias.expand(int((~mask).sum()), 32))


@pytest.mark.parametrize("op", ["lion_s", "softmax"])
def test_token_encoder_with_right_padding_equals_the_unpadded_sequences(op):
    torch.manual_seed(0)
    enc = TokenEncoder(module(op) if op != "softmax" else op, vocab_size=50, max_len=40, dim=32, depth=2, num_heads=2)
    enc.eval()
    lengths = torch.tensor([33, 21])
    tokens = torch.randint(0, 50, (2, 33))
    mask = torch.arange(33)[None, :] < lengths[:, None]
    with torch.no_grad():
        padded = enc(tokens, key_padding_mask=mask)
        for b in range(2):
            alone = enc(tokens[b : b + 1, : lengths[b]])
            torch.testing.assert_close(padded[b : b + 1, : lengths[b]], alone, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(enc(tokens, key_padding_mask=torch.zeros(2, 33, dtype=torch.bool))).all()


def test_compiled_chunk_form_takes_the_mask():
    """torch.compile: the mask goes through the Triton forms' custom ops (interpreted on the CPU)."""
    if not INTERPRETED and not torch.cuda.is_available():
        pytest.skip("needs a GPU or the Triton interpreter")
    mod = module("lion_s")
    q, k, v, gate, dy = inputs(mod, 37)
    mask = masks(37)
    dev = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"

    def f(q, k, v, gate, mask):
        return mod.lion_s(q, k, v, gate, form="chunk", chunk_size=16, key_padding_mask=mask)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager" if dev == "cpu" else "inductor")):
        torch._dynamo.reset()
        x = [t.float().to(dev).requires_grad_() for t in (q, k, v, gate)]
        y = fn(*x, mask.to(dev))
        y.backward(dy.float().to(dev))
        results.append([y.detach(), *[t.grad for t in x]])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (results[1][0][~mask.to(dev)] == 0).all()


@pytest.mark.parametrize("name", ["lion_s", "lion_d"])
def test_two_orders_with_pads_equal_the_orders_of_the_real_tokens(name):
    """LionAttention with two token orders (vision's snakes; here any two permutations): a padded sequence
    gives, on its real tokens, what the real tokens alone give in the orders the permutations induce on them."""
    torch.manual_seed(0)
    length = 37
    mask = masks(length)[:1]
    real = mask[0].nonzero()[:, 0]
    orders = (torch.randperm(length), torch.randperm(length))
    rank = torch.full((length,), -1).index_put_((real,), torch.arange(len(real)))
    induced = tuple(rank[o][mask[0][o]] for o in orders)  # each order, restricted to the real tokens
    padded = LionAttention(module(name), 32, 2, form="torch", chunk_size=16, orders=orders)
    alone = LionAttention(module(name), 32, 2, form="torch", chunk_size=16, orders=induced)
    alone.load_state_dict(padded.state_dict())
    x = torch.randn(1, length, 32)
    with torch.no_grad():
        torch.testing.assert_close(padded(x, key_padding_mask=mask)[:, real], alone(x[:, real]), rtol=1e-5, atol=1e-6)
