"""The generated functional API refuses bad runtime input with errors naming the argument."""

from __future__ import annotations

import importlib
import re

import pytest
import torch


def mod(name: str):
    return importlib.import_module(f"generated.{name}")


def qkv(B=1, L=5, H=2, dk=4, dv=3, dtype=torch.float32):
    return (
        torch.randn(B, L, H, dk, dtype=dtype),
        torch.randn(B, L, H, dk, dtype=dtype),
        torch.randn(B, L, H, dv, dtype=dtype),
    )


S = mod("lion_s").lion_s
D = mod("lion_d").lion_d
LIT = mod("lion_lit").lion_lit


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda q, k, v: S(q[0], k, v, torch.randn(1, 5, 2)), ValueError, ["q", "(B, L, H, Dk)"]),
        (lambda q, k, v: S(q, k[:, :4], v, torch.randn(1, 5, 2)), ValueError, ["k", "shape"]),
        (lambda q, k, v: S(q, k, v[:, :, :1], torch.randn(1, 5, 2)), ValueError, ["v", "(B, L, H, Dv)"]),
        (lambda q, k, v: S(q, k, v, None), ValueError, ["gate", "required", "(B, L, H)"]),
        (lambda q, k, v: S(q, k, v, torch.randn(1, 4, 2)), ValueError, ["gate", "(1, 5, 2)"]),
        (lambda q, k, v: D(q, k, v, torch.randn(1, 5, 2)), ValueError, ["gate", "(H,)"]),
        (lambda q, k, v: LIT(q, k, v, torch.randn(2)), ValueError, ["gate", "None"]),
        (lambda q, k, v: S(q.int(), k, v, torch.randn(1, 5, 2)), TypeError, ["q", "floating"]),
        (lambda q, k, v: S(q, k.double(), v, torch.randn(1, 5, 2)), TypeError, ["k", "dtype"]),
        (lambda q, k, v: S(q, k, v, torch.randn(1, 5, 2).int()), TypeError, ["gate", "floating"]),
        (lambda q, k, v: S(q, k.to("meta"), v, torch.randn(1, 5, 2)), ValueError, ["k", "device"]),
        (lambda q, k, v: S(q, k, v, torch.randn(1, 5, 2, device="meta")), ValueError, ["gate", "device"]),
        (lambda q, k, v: S(q.tolist(), k, v, torch.randn(1, 5, 2)), TypeError, ["q", "Tensor"]),
        (lambda q, k, v: S(q, k, v, torch.randn(1, 5, 2), form="fast"), ValueError, ["form", "'chunk'"]),
        (lambda q, k, v: S(q, k, v, torch.randn(1, 5, 2), chunk_size=48), ValueError, ["chunk_size", "power of two"]),
        (lambda q, k, v: S(q, k, v, torch.randn(1, 5, 2), chunk_size=8), ValueError, ["chunk_size", "16"]),
        (lambda q, k, v: S(q, k, v, torch.randn(1, 5, 2), chunk_size="64"), TypeError, ["chunk_size"]),
        (
            lambda q, k, v: S(q, k, v, torch.randn(1, 5, 2), form="reference", chunk_size=3),
            ValueError,
            ["chunk_size"],
        ),
        (
            lambda q, k, v: S(q.double(), k.double(), v.double(), torch.randn(1, 5, 2), form="chunk"),
            TypeError,
            ["float64", "reference"],
        ),
        (lambda q, k, v: S(q[:, :0], k[:, :0], v[:, :0], torch.randn(1, 0, 2)), ValueError, ["non-empty"]),
    ],
)
def test_bad_input_is_refused(call, exc, words):
    q, k, v = qkv()
    with pytest.raises(exc) as info:
        call(q, k, v)
    message = str(info.value)
    for w in words:
        # a name (q, k, gate, ...) must appear as a whole word: "Dk" in "(B, L, H, Dk)" does not name k
        pattern = rf"(?<!\w){re.escape(w)}(?!\w)" if w.isidentifier() else re.escape(w)
        assert re.search(pattern, message), (w, message)


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch, form):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="CUDA tensors.*TRITON_INTERPRET=1"):
        S(q, k, v, torch.randn(1, 5, 2), form=form)


def test_module_refusals():
    LionS = mod("lion_s").LionS
    with pytest.raises(ValueError, match="divisible"):
        LionS(10, 3)
    with pytest.raises(ValueError, match="form"):
        LionS(8, 2, form="nope")
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, 8\)"):
        LionS(8, 2)(torch.randn(2, 3, 7))


def test_module_parameters_follow_the_mask_family():
    assert not hasattr(mod("lion_lit").LionLit(8, 2), "gate")
    assert mod("lion_d").LionD(8, 2).gate.shape == (2,)
    assert mod("lion_s").LionS(8, 2).gate_proj.out_features == 2


def test_spec_is_exported_normalized():
    spec = mod("lion_s").SPEC
    assert spec["name"] == "lion_s" and spec["mask"] == {
        "family": "selective",
        "log_decay": "-softplus(z)",
        "alignment": "lion",
    }
    assert spec["feature_map"] == {"expr": "silu(x) + 1/2", "normalize": "l2"}
