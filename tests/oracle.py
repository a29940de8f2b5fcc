"""An independent float64 evaluation of CONTRACT section 3 for tests.

It shares no code with the generator's printers or templates: expressions are evaluated through
SymPy's lambdify with torch implementations of the registry functions, the mask is built entry by
entry from its definition, and gradients come from float64 autograd.

Every step computes in the dtype of its inputs. The tests also run it on float32 inputs: that
evaluation, independent of the generator, measures what plain float32 arithmetic reaches on the same
inputs, and bounds the kernels' error where float32 cannot meet the contract's bar.
"""

from __future__ import annotations

from typing import Any

import sympy as sp
import torch

from lion_gen.functions import parse_expression

TORCH_FUNCS: dict[str, Any] = {
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
    "silu": torch.nn.functional.silu,
    "elu": torch.nn.functional.elu,
    "relu": torch.relu,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "tanh": torch.tanh,
    "Abs": torch.abs,
    "Min": lambda a, b: torch.minimum(*_tensors(a, b)),
    "Max": lambda a, b: torch.maximum(*_tensors(a, b)),
}


def _tensors(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Both arguments as tensors of the dtype of the one that is a tensor (a constant may be a number)."""
    dtype = a.dtype if isinstance(a, torch.Tensor) else b.dtype
    return torch.as_tensor(a, dtype=dtype), torch.as_tensor(b, dtype=dtype)


def elementwise(text: str, symbol: str):
    expr = parse_expression(text, symbol)
    # a constant part (softplus(1) is log(1 + E)) as its value: the torch functions take only tensors
    expr = expr.replace(lambda e: e.is_number and not e.is_Atom, lambda e: sp.Float(e.evalf(30), 30))
    fn = sp.lambdify(sp.Symbol(symbol, real=True), expr, modules=[TORCH_FUNCS, "math"])
    return lambda t: fn(t) + torch.zeros_like(t)  # constants broadcast to the tensor's shape


def mask_matrix(
    spec: dict[str, Any], log_gates: torch.Tensor | None, length: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """M (B, H, L, L) exactly as CONTRACT section 3 defines it, in the dtype of log_gates (else dtype)."""
    causal = spec["direction"] == "causal"
    if log_gates is None:
        m = torch.ones(length, length, dtype=dtype)
        return torch.tril(m) if causal else m
    lg = log_gates.permute(0, 2, 1)  # (B, H, L)
    P = torch.cat([torch.zeros_like(lg[..., :1]), lg.cumsum(-1)], -1)  # P_m, m = 0..L
    c = P[..., 1:]  # inclusive prefix sums c_m = P_{m+1}
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    if causal:
        return torch.where(i >= j, torch.exp(torch.where(i >= j, c[..., :, None] - c[..., None, :], 0.0)), 0.0)
    if spec["mask"].get("alignment", "lion") == "symmetric" or spec["mask"]["family"] == "decay":
        if spec["mask"]["family"] == "decay":  # lambda^|i-j|: both alignments agree; use the lion one below
            pass
        else:
            return torch.exp(-(c[..., :, None] - c[..., None, :]).abs())
    Pi, Pj = P[..., :length, None], P[..., None, :length]
    Pi1, Pj1 = P[..., 1:, None], P[..., None, 1:]
    low = torch.exp(torch.where(i > j, Pi - Pj, 0.0))
    up = torch.exp(torch.where(i < j, Pj1 - Pi1, 0.0))
    return torch.where(i > j, low, torch.where(i < j, up, 1.0))


def attention(spec: dict[str, Any], q, k, v, gate) -> torch.Tensor:
    """y (B, L, H, Dv) in the dtype of the inputs (float64 for the reference; differentiable)."""
    f = elementwise(spec["feature_map"]["expr"], "x")

    def phi(x: torch.Tensor) -> torch.Tensor:
        r = f(x)
        if spec["feature_map"]["normalize"] == "l2":
            r = r / r.norm(dim=-1, keepdim=True)
        return r

    d = q.shape[-1]
    scale = float(parse_expression(spec["scale"], "d").subs(sp.Symbol("d", real=True), d))
    B, L, H, _ = q.shape
    family = spec["mask"]["family"]
    log_gates = None
    if family != "none":
        ld = elementwise(spec["mask"]["log_decay"], "z")
        log_gates = ld(gate) if family == "selective" else ld(gate)[None, None, :].expand(B, L, H)
    M = mask_matrix(spec, log_gates, L, q.dtype)
    A = scale * torch.einsum("bihd,bjhd->bhij", phi(q), phi(k)) * M
    y = torch.einsum("bhij,bjhd->bihd", A, v)
    if spec["normalize_rows"]:
        y = y / (A.sum(-1).permute(0, 2, 1)[..., None] + spec["eps"])
    return y


def rnn(spec: dict[str, Any], q, k, v, gate) -> torch.Tensor:
    """The bidirectional RNN form with the reference code's alignment (lion_math.md 2.1), for one check."""
    f = elementwise(spec["feature_map"]["expr"], "x")
    Q, K = f(q), f(k)
    if spec["feature_map"]["normalize"] == "l2":
        Q, K = Q / Q.norm(dim=-1, keepdim=True), K / K.norm(dim=-1, keepdim=True)
    a = torch.exp(elementwise(spec["mask"]["log_decay"], "z")(gate))  # (B, L, H)
    B, L, H, _ = q.shape
    out = torch.zeros_like(v)
    for b in range(B):
        for h in range(H):
            num = torch.zeros(L, v.shape[-1], dtype=torch.float64)
            den = torch.zeros(L, dtype=torch.float64)
            for rng, prev in ((range(L), -1), (range(L - 1, -1, -1), 1)):
                S = torch.zeros(q.shape[-1], v.shape[-1], dtype=torch.float64)
                z = torch.zeros(q.shape[-1], dtype=torch.float64)
                for i in rng:
                    alpha = a[b, i + prev, h] if 0 <= i + prev < L else 1.0
                    kv = torch.outer(K[b, i, h], v[b, i, h])
                    S = alpha * S + kv
                    z = alpha * z + K[b, i, h]
                    num[i] += Q[b, i, h] @ (S - kv / 2)
                    den[i] += Q[b, i, h] @ (z - K[b, i, h] / 2)
            out[b, :, h] = num / (den[:, None] + spec["eps"])
    return out
