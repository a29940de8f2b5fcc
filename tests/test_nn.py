"""lion_gen.nn: the LION initialisations, the natural (two-scan) orders against the float64 oracle, and the
models' shapes and gradients."""

from __future__ import annotations

import copy
import importlib
import math

import oracle
import pytest
import torch

from lion_gen.nn import (
    Block,
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
