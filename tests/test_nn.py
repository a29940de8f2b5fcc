"""lion_gen.nn: the LION initialisations, the natural (two-scan) orders against the float64 oracle, and the
models' shapes and gradients."""

from __future__ import annotations

import copy
import importlib
import itertools
import math

import oracle
import pytest
import torch
from test_kernels import TOL, rel_rms

from lion_gen.nn import (
    Block,
    DropPath,
    LionAttention,
    SoftmaxAttention,
    TokenEncoder,
    VisionTransformer,
    half_life_gates,
    snake_orders,
)


def mod(name: str):
    return importlib.import_module(f"generated.{name}")


@pytest.mark.parametrize("name", ["lion_d", "lion_s", "retention", "lion_s_sym"])
def test_half_life_initialisation(name):
    m = mod(name)
    z = half_life_gates(m, 4, (1.0, 64.0))
    decay = torch.exp(m._log_decay_torch(z.double()))
    half = torch.tensor([1.0, 4.0, 16.0, 64.0], dtype=torch.float64)
    torch.testing.assert_close(decay**half, torch.full_like(half, 0.5), rtol=1e-5, atol=0)


def test_half_life_needs_a_decay():
    with pytest.raises(ValueError, match="no decay"):
        half_life_gates(mod("lion_lit"), 4, (1.0, 8.0))


def test_snake_orders():
    row, col = snake_orders(2, 3, prefix=1)
    # grid (row-major after the class token 0): [[1, 2, 3], [4, 5, 6]]
    assert row.tolist() == [0, 1, 2, 3, 6, 5, 4]
    assert col.tolist() == [0, 1, 4, 5, 2, 3, 6]


def _attention_core(attn: LionAttention, x: torch.Tensor) -> torch.Tensor:
    """y before the output projection, from the float64 oracle: per scan the numerator and the row sums of
    CONTRACT section 3 in the scan's order, mapped back, summed, then divided."""
    spec = attn.spec
    x = x.double()
    a = copy.deepcopy(attn).double()
    B, L, _ = x.shape
    q, k, v = a.qkv(x).view(B, L, 3, a.num_heads, a.head_dim).unbind(2)
    raw = {**spec, "normalize_rows": False}
    num = den = 0
    for i in range(2):
        perm, inv = getattr(a, f"order{i}"), getattr(a, f"inverse{i}")
        g = a._gate(i, x)
        g = g[:, perm] if g is not None and g.dim() == 3 else g
        qp, kp, vp = q[:, perm], k[:, perm], v[:, perm]
        num = num + oracle.attention(raw, qp, kp, vp, g)[:, inv]
        den = den + oracle.attention(raw, qp, kp, torch.ones_like(vp[..., :1]), g)[:, inv]
    return num / (den + spec["eps"])


@pytest.mark.parametrize("name", ["lion_s", "lion_d", "lion_lit"])
def test_natural_orders_match_float64(name):
    torch.manual_seed(0)
    orders = snake_orders(4, 5, prefix=1)
    attn = LionAttention(mod(name), 16, 2, orders=orders, chunk_size=16)
    if attn.family == "selective":  # make the two scans' gates differ
        torch.nn.init.normal_(attn.gates[1].weight, std=0.5)
    x = torch.randn(2, 21, 16)
    seen = {}
    attn.proj.register_forward_hook(lambda m, inp, out: seen.update(y=inp[0]))
    attn(x)
    want = _attention_core(attn, x).reshape(2, 21, 16)
    err = ((seen["y"].double() - want).norm() / want.norm()).item()
    assert err < 1e-5, err


def test_two_identical_scans_equal_one():
    torch.manual_seed(0)
    ident = torch.arange(10)
    two = LionAttention(mod("lion_s"), 16, 2, orders=(ident, ident))
    two.gates[1].load_state_dict(two.gates[0].state_dict())  # the same gates in both scans
    one = LionAttention(mod("lion_s"), 16, 2)
    one.load_state_dict({k: v for k, v in two.state_dict().items() if not k.startswith("gates.1")}, strict=True)
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(two(x), one(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", ["sequence", "snake"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("name", ["lion_s", "lion_d", "lion_lit", "softmax"])
def test_vit_trains(name, pool, order):
    torch.manual_seed(0)
    op = name if name == "softmax" else mod(name)
    vit = VisionTransformer(
        op, image_size=8, patch_size=2, in_chans=1, num_classes=10, dim=32, depth=2, num_heads=2, pool=pool, order=order
    )
    images = torch.randn(3, 1, 8, 8)
    out = vit(images)
    assert out.shape == (3, 10)
    out.square().sum().backward()
    for pname, p in vit.named_parameters():
        if pool == "mean" and pname == "cls_token":
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    gates = [p for n, p in vit.named_parameters() if ".gates." in n]
    assert (len(gates) > 0) == (name in ("lion_s", "lion_d"))
    assert all(p.grad.abs().sum() > 0 for p in gates)


def test_selective_gate_reads_the_block_input():
    torch.manual_seed(0)
    attn = LionAttention(mod("lion_s"), 16, 4, half_lives=(2.0, 16.0))
    gate = attn.gates[0]
    assert gate.in_features == 16 and gate.out_features == 4
    z = half_life_gates(mod("lion_s"), 4, (2.0, 16.0))
    torch.testing.assert_close(gate.bias.detach(), z)
    block = Block(16, attn, drop_path=0.5)
    seen = {}
    gate.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    x = torch.randn(2, 5, 16)
    block.eval()
    block(x)
    torch.testing.assert_close(seen["x"], block.norm1(x))


def test_vit_keeps_the_gate_initialisation():
    vit = VisionTransformer(
        mod("lion_s"), image_size=8, patch_size=2, in_chans=1, num_classes=10, dim=32, depth=1, num_heads=2
    )
    bias = vit.blocks[0].attn.gates[0].bias.detach()
    torch.testing.assert_close(bias, half_life_gates(mod("lion_s"), 2, (1.0, 16.0)))


def test_drop_path_only_in_training():
    block = Block(8, SoftmaxAttention(8, 2), drop_path=0.9)
    x = torch.randn(16, 3, 8)
    block.eval()
    torch.testing.assert_close(block(x), block(x))
    block.train()
    torch.manual_seed(0)
    assert not torch.allclose(block(x), block(x))


def test_token_encoder():
    torch.manual_seed(0)
    enc = TokenEncoder(mod("lion_s"), vocab_size=50, max_len=40, dim=16, depth=2, num_heads=2)
    tokens = torch.randint(0, 50, (2, 33))
    y = enc(tokens)
    assert y.shape == (2, 33, 16)
    y.sum().backward()
    assert enc.embed.weight.grad is not None
    with pytest.raises(ValueError, match="L <= 40"):
        enc(torch.randint(0, 50, (2, 41)))
    assert math.isfinite(y.sum().item())


# Packed batches (cu_seqlens): every layer on sequences of lengths LENGTHS packed into one (1, T) batch row gives,
# row by row, what it gives on each sequence alone (B = 1): outputs, and the gradients of x and of every parameter.
LENGTHS = [5, 0, 37, 1, 20]  # T = 63; with chunk 16 none but the empty one is a multiple of the chunk


def offsets(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def packed_vs_alone(model: torch.nn.Module, x: torch.Tensor, cu: torch.Tensor, mask: torch.Tensor | None = None):
    """model(x, cu_seqlens=cu) against model on each sequence of x alone: the outputs row by row, the gradients
    of x (when it is a float tensor) and of every parameter, for the loss sum(y * w) with a random w."""
    params = dict(model.named_parameters())
    bounds = cu.tolist()
    kw = {} if mask is None else {"key_padding_mask": mask}
    xp = x.clone().requires_grad_() if x.is_floating_point() else x
    y = model(xp, cu_seqlens=cu, **kw)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    wrt = ([xp] if x.is_floating_point() else []) + list(params.values())
    got = torch.autograd.grad((y * w).sum(), wrt)
    xa = x.clone().requires_grad_() if x.is_floating_point() else x
    pieces, loss = [], 0.0
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if a == b:
            continue
        kw_i = {} if mask is None else {"key_padding_mask": mask[:, a:b]}
        y_i = model(xa[:, a:b], **kw_i)
        pieces.append(y_i)
        loss = loss + (y_i * w[:, a:b]).sum()
    alone = torch.cat(pieces, 1)
    want = torch.autograd.grad(loss, ([xa] if x.is_floating_point() else []) + list(params.values()))
    torch.testing.assert_close(y, alone, rtol=TOL[torch.float32], atol=TOL[torch.float32] / 10)  # 1e-5, 1e-6 on the CPU
    labels = (["x"] if x.is_floating_point() else []) + list(params)
    for label, g, r in zip(labels, got, want, strict=True):
        assert rel_rms(g, r.double()) <= TOL[torch.float32], (label, rel_rms(g, r.double()))
    with torch.no_grad():  # the check can fail: the first three sequences merged into one give other outputs
        merged = torch.cat([cu[:1], cu[3:]])
        assert (model(x, cu_seqlens=merged, **kw) - y)[:, : bounds[3]].abs().max() > 1e-3


def packed_mask(device) -> torch.Tensor:
    """Pads in LENGTHS' packed batch: in the middle and at the start of the 37-row sequence, the whole
    1-row sequence, the right tail of the 20-row one."""
    mask = torch.ones(1, sum(LENGTHS), dtype=torch.bool)
    mask[0, [5, 9, 20, 21, 22, 42]] = False
    mask[0, 58:] = False
    return mask.to(device)


def layer(kind: str, name: str, form: str, device, depth: int = 2) -> torch.nn.Module:
    op = name if name == "softmax" else mod(name)
    kw = {} if name == "softmax" else dict(form=form, chunk_size=16)
    if kind == "encoder":
        model = TokenEncoder(op, vocab_size=50, max_len=48, dim=32, depth=depth, num_heads=2, **kw)
    else:
        attn = SoftmaxAttention(32, 2) if name == "softmax" else LionAttention(op, 32, 2, **kw)
        model = attn if kind == "attention" else Block(32, attn)
    return model.to(device)


KINDS = ["attention", "block", "encoder"]
# the torch form for every spec; the Triton chunk form (slow under the interpreter) for lion_s's layers and
# lion_d's attention (a per-head decay shared by the sequences)
PACKED = [(name, "torch", kind) for name in ("lion_s", "lion_d", "lion_lit", "softmax") for kind in KINDS]
PACKED += [("lion_s", "chunk", kind) for kind in KINDS] + [("lion_d", "chunk", "attention")]


@pytest.mark.parametrize(("name", "form", "kind"), PACKED)
def test_packed_batch_equals_separate_calls(name, form, kind, device):
    packed_vs_alone(*packed_layer_and_input(name, form, kind, device), offsets(LENGTHS, device))


def packed_layer_and_input(name: str, form: str, kind: str, device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A seeded layer (one block in the interpreted chunk form: it is slow) and a packed input of LENGTHS."""
    torch.manual_seed(0)
    model = layer(kind, name, form, device, depth=1 if form == "chunk" else 2)
    if kind == "encoder":
        return model, torch.randint(0, 50, (1, sum(LENGTHS)), device=device)
    return model, torch.randn(1, sum(LENGTHS), 32, device=device)


@pytest.mark.parametrize(
    ("name", "form", "kind"),
    [(name, "torch", kind) for name in ("lion_s", "softmax") for kind in ("attention", "encoder")]
    + [("lion_s", "chunk", "attention")],
)
def test_packed_batch_with_padding_mask(name, form, kind, device):
    """cu_seqlens and a key padding mask together: each sequence as if alone with its own mask."""
    model, x = packed_layer_and_input(name, form, kind, device)
    packed_vs_alone(model, x, offsets(LENGTHS, device), packed_mask(device))


def test_bad_cu_seqlens_are_refused_before_any_kernel(monkeypatch, device):
    m = mod("lion_s")

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(m, "launch", no_kernel)
    attn = LionAttention(m, 32, 2, form="chunk", chunk_size=16).to(device)
    x = torch.randn(1, 63, 32, device=device)
    with pytest.raises(ValueError, match="cu_seqlens must end at T = 63"):
        attn(x, cu_seqlens=offsets([5, 0, 37, 1, 19], device))
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.int32"):
        Block(32, attn).to(device)(x, cu_seqlens=offsets(LENGTHS, device).long())
    with pytest.raises(ValueError, match="x must be a packed batch"):
        attn(x.expand(2, -1, -1), cu_seqlens=offsets(LENGTHS, device))
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        SoftmaxAttention(32, 2).to(device)(x, cu_seqlens=offsets([5, 37, -5, 26], device))
    enc = TokenEncoder(m, vocab_size=50, max_len=30, dim=32, depth=1, num_heads=2, form="chunk").to(device)
    tokens = torch.randint(0, 50, (1, 63), device=device)
    with pytest.raises(ValueError, match="at most max_len = 30 long, got one of 37 .sequence 2."):
        enc(tokens, cu_seqlens=offsets(LENGTHS, device))
    with pytest.raises(ValueError, match="tokens must be a packed batch"):
        enc(tokens[0], cu_seqlens=offsets(LENGTHS, device))


def test_natural_orders_refuse_packed_batches():
    attn = LionAttention(mod("lion_s"), 32, 2, orders=snake_orders(2, 3))
    with pytest.raises(ValueError, match="cu_seqlens .a packed batch. is not supported with orders"):
        attn(torch.randn(1, 6, 32), cu_seqlens=offsets([2, 4], "cpu"))


def test_drop_path_drops_whole_sequences_of_a_packed_batch():
    torch.manual_seed(0)
    drop = DropPath(0.5)
    lengths = [3, 0, 7, 1, 4] * 4
    cu = offsets(lengths, "cpu")
    x = torch.ones(1, sum(lengths), 2)
    out = drop(x, cu)
    bounds = cu.tolist()
    kept = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        rows = out[0, a:b]
        if a < b:
            assert (rows == rows[0, 0]).all() and rows[0, 0] in (0.0, 2.0)
            kept.append(bool(rows[0, 0] == 2.0))
    assert any(kept) and not all(kept)
    drop.eval()
    assert drop(x, cu) is x


@pytest.mark.parametrize("name", ["lion_s", "softmax"])
def test_packed_token_encoder_compiles_without_graph_breaks(name, device):
    """torch.compile(fullgraph=True) of a TokenEncoder on a packed batch: no graph break (the offsets' values
    are not read in the trace; the positions are computed on the device), and the compiled outputs and
    gradients equal eager ones. lion_s in the Triton chunk form (a custom op; interpreted on the CPU)."""
    torch.manual_seed(0)
    enc = layer("encoder", name, "chunk", device, depth=1)
    cu, tokens = offsets(LENGTHS, device), torch.randint(0, 50, (1, sum(LENGTHS)), device=device)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(enc)(tokens, cu_seqlens=cu)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    backend = "inductor" if device == "cuda" else ("eager" if name == "softmax" else "aot_eager")
    results = []
    for model in (enc, torch.compile(enc, fullgraph=True, backend=backend)):
        enc.zero_grad()
        y = model(tokens, cu_seqlens=cu)
        y.square().sum().backward()
        results.append([y.detach()] + [p.grad.clone() for p in enc.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
