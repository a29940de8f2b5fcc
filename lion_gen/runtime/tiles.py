"""Spec-independent Triton helpers that every generated module imports (tile loads and stores, masks).

They take fp32 tiles in and give fp32 tiles out unless they say otherwise. The spec-dependent pieces
(the feature map, the log-decay and their derivatives) are printed into each generated module.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    # log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|)), log1p by series when tiny
    u = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + tl.where(u < 1e-4, u * (1.0 - 0.5 * u), tl.log(1.0 + u))


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _load_rows(ptr, base, rows, cols, L, STRIDE, DIM: tl.constexpr):
    """A (C, BLOCK) tile of rows `rows` of a (B, L, H, DIM) tensor, zero outside."""
    mask = (rows[:, None] < L) & (cols[None, :] < DIM)
    return tl.load(ptr + base + rows[:, None].to(tl.int64) * STRIDE + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, base, rows, cols, L, STRIDE, DIM: tl.constexpr, value):
    mask = (rows[:, None] < L) & (cols[None, :] < DIM)
    offsets = base + rows[:, None].to(tl.int64) * STRIDE + cols[None, :]
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _state_tile(idx, o_k, o_v, DK: tl.constexpr, DV: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Offsets and mask of state `idx` of a (..., DK, DV) buffer: a (BK, BV) tile, or (BV, BK) transposed."""
    if TRANSPOSED:
        mask = (o_v[:, None] < DV) & (o_k[None, :] < DK)
        offsets = idx.to(tl.int64) * (DK * DV) + o_k[None, :] * DV + o_v[:, None]
    else:
        mask = (o_k[:, None] < DK) & (o_v[None, :] < DV)
        offsets = idx.to(tl.int64) * (DK * DV) + o_k[:, None] * DV + o_v[None, :]
    return offsets, mask


@triton.jit
def _load_state(ptr, idx, o_k, o_v, DK: tl.constexpr, DV: tl.constexpr):
    """State `idx` of a (..., DK, DV) buffer as a (BK, BV) fp32 tile, zero outside."""
    offsets, mask = _state_tile(idx, o_k, o_v, DK, DV, False)
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_state_if(ptr, idx, o_k, o_v, DK: tl.constexpr, DV: tl.constexpr, pred):
    """As _load_state, but all zero, and nothing read, where the scalar `pred` is false (a state known to
    be zero: the one entering an edge segment, or a segment's last chunk from inside the segment)."""
    offsets, mask = _state_tile(idx, o_k, o_v, DK, DV, False)
    return tl.load(ptr + offsets, mask=tl.where(pred, mask, False), other=0.0).to(tl.float32)


@triton.jit
def _load_state_t_if(ptr, idx, o_v, o_k, DK: tl.constexpr, DV: tl.constexpr, pred):
    """State `idx` of a (..., DK, DV) buffer, transposed: a (BV, BK) fp32 tile read in that order (zero,
    nothing read, where `pred` is false)."""
    offsets, mask = _state_tile(idx, o_k, o_v, DK, DV, True)
    return tl.load(ptr + offsets, mask=tl.where(pred, mask, False), other=0.0).to(tl.float32)


@triton.jit
def _store_state(ptr, idx, o_k, o_v, DK: tl.constexpr, DV: tl.constexpr, value):
    offsets, mask = _state_tile(idx, o_k, o_v, DK, DV, False)
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_vec(ptr, idx, o, DIM: tl.constexpr):
    """Vector `idx` of a (..., DIM) fp32 buffer, zero outside."""
    return tl.load(ptr + idx.to(tl.int64) * DIM + o, mask=o < DIM, other=0.0)


@triton.jit
def _load_vec_if(ptr, idx, o, DIM: tl.constexpr, pred):
    """As _load_vec, zero and not read where `pred` is false."""
    return tl.load(ptr + idx.to(tl.int64) * DIM + o, mask=tl.where(pred, o < DIM, False), other=0.0)


@triton.jit
def _store_vec(ptr, idx, o, DIM: tl.constexpr, value):
    tl.store(ptr + idx.to(tl.int64) * DIM + o, value, mask=o < DIM)


@triton.jit
def _mask(Fa, Gb, LOWER: tl.constexpr, UPPER: tl.constexpr, C: tl.constexpr):
    """M_ij = exp(Fa_i - Fa_j) below the diagonal, 1 on it, exp(Gb_j - Gb_i) above (each half only when
    asked for, else 0): one exp per element, every exponent <= 0."""
    o = tl.arange(0, C)
    below = o[:, None] > o[None, :]
    above = o[:, None] < o[None, :]
    m = tl.exp(tl.where(below, Fa[:, None] - Fa[None, :], Gb[None, :] - Gb[:, None]))
    if not LOWER:
        m = tl.where(below, 0.0, m)
    if not UPPER:
        m = tl.where(above, 0.0, m)
    return m


@triton.jit
def _causal(LOWER: tl.constexpr, UPPER: tl.constexpr, C: tl.constexpr):
    """The mask of an ungated spec: 1 where a half is asked for and on the diagonal, else 0."""
    o = tl.arange(0, C)
    keep = o[:, None] == o[None, :]
    if LOWER:
        keep = keep | (o[:, None] > o[None, :])
    if UPPER:
        keep = keep | (o[:, None] < o[None, :])
    return tl.where(keep, 1.0, 0.0)


@triton.jit
def _split(x):
    """x as two bf16 parts, hi + lo, about 16 mantissa bits between them."""
    hi = x.to(tl.bfloat16)
    return hi, (x.to(tl.float32) - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _sdot(a, b, SD: tl.constexpr, PREC: tl.constexpr):
    """a @ b for a dot that involves a carried state, with fp32 accumulation. SD = 0 (fp32 runs): fp32
    operands at PREC; 1 (bfloat16 runs): bf16 operands; 2 (float16 runs): both operands split into bf16
    hi + lo parts, three dots (hi hi, lo hi, hi lo: about 16 mantissa bits each side). fp16 cannot hold a
    state (it sums K v^T over the sequence), and a row operand rounded to one bf16 part loses the digits
    fp16 inputs carry: the gate's gradient, a sum with heavy cancellation, was off by up to 69% (lion_d,
    L = 130) with it, against 0.3% in the parallel form."""
    if SD == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    elif SD == 1:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        hi, lo = _split(b)
        ahi, alo = _split(a)
        return tl.dot(ahi, hi) + tl.dot(alo, hi) + tl.dot(ahi, lo)


@triton.jit
def _sround(a, SD: tl.constexpr):
    """``a`` rounded as _sdot rounds its first operand (fp32 values)."""
    if SD == 1:
        return a.to(tl.bfloat16).to(tl.float32)
    else:
        return a
