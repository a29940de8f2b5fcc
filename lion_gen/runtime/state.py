"""The causal state of a generated module: its checks, its layout conversions and its reference form.

The state of a causal spec at row boundary t, per (batch, head), is the (Dk, Dv') matrix

    S_t = sum_{j < t} exp(P_t - F_j) K_j v'_j^T

with v' = [v, 1] (Dv' = Dv + 1) when the spec normalizes rows, so that its last column is the normalizer
column z, and v' = v (Dv' = Dv) otherwise. The user sees ONE tensor (B, H, Dk, Dv') in float32 (float64 in
float64 runs of the torch and reference forms); the kernels keep the (Dk, Dv) part and the z column apart,
as (B * H, Dk, Dv) and (B * H, Dk) fp32 buffers. A bidirectional spec has no such state: each of its
outputs depends on the whole sequence, which no prefix state summarizes.
"""

from __future__ import annotations

import torch

from .checks import KernelSettings, Shape, _pow2_at_least, check_tokens, kernel_settings
from .reference import zero_pads

STATE_FORMS = ("chunk", "recurrent", "torch", "reference")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a state for inputs of ``dtype``: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_state(
    initial_state: object,
    output_final_state: object,
    q: torch.Tensor,
    shape: Shape,
    *,
    causal: bool,
    normalize_rows: bool,
    algorithm: str,
) -> bool:
    """Validate ``initial_state`` and ``output_final_state``; return whether a state is used at all.

    Raises ValueError for a bidirectional spec, for a form that does not carry a state, and for a state of
    the wrong shape or device; TypeError for a wrong type or dtype. Runs before any kernel.
    """
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    if initial_state is None and not output_final_state:
        return False
    what = "initial_state" if initial_state is not None else "output_final_state=True"
    if not causal:
        raise ValueError(
            f"{what} is only for causal specs: this spec is bidirectional, so each output row depends on the "
            "whole sequence (later rows included), and no state of a prefix can summarize it"
        )
    if algorithm not in STATE_FORMS:
        raise ValueError(
            f"{what} is supported by form='chunk', 'recurrent', 'torch', 'reference' and 'auto', "
            f"not by form={algorithm!r}"
        )
    if initial_state is not None:
        check_state_tensor(
            "initial_state", initial_state, q, shape.sequences, shape.heads, shape.dk, shape.dv, normalize_rows
        )
    return True


def check_state_tensor(
    name: str, state: object, q: torch.Tensor, b: int, h: int, dk: int, dv: int, normalize_rows: bool
) -> torch.Tensor:
    """A state argument: a (B, H, Dk, Dv') tensor of the state dtype on the device of q."""
    dvp = dv + 1 if normalize_rows else dv
    layout = f"(B, H, Dk, Dv{' + 1' if normalize_rows else ''}) = ({b}, {h}, {dk}, {dvp})"
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout} or None, got {type(state).__name__}")
    want = state_dtype(q.dtype)
    if state.dtype != want:
        raise TypeError(f"{name} must be {want} (the state is kept in {want} for {q.dtype} inputs), got {state.dtype}")
    if tuple(state.shape) != (b, h, dk, dvp):
        extra = " (the last column is the normalizer column z)" if normalize_rows else ""
        raise ValueError(f"{name} must have shape {layout}{extra}, got {tuple(state.shape)}")
    if state.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {state.device}")
    return state


def split_state(state: torch.Tensor, normalize_rows: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, H, Dk, Dv') -> the kernels' contiguous fp32 (B * H, Dk, Dv) part and (B * H, Dk) z column."""
    b, h, dk, dvp = state.shape
    s = state.detach().to(torch.float32).reshape(b * h, dk, dvp)
    if normalize_rows:
        return s[..., :-1].contiguous(), s[..., -1].contiguous()
    return s.contiguous(), None


def state_buffers(shape: Shape, normalize_rows: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Uninitialized fp32 kernel buffers for one state per (b, h): (B * H, Dk, Dv) and the (B * H, Dk) z
    column (None when rows are not normalized)."""
    bh = shape.sequences * shape.heads
    kv = torch.empty(bh, shape.dk, shape.dv, dtype=torch.float32, device=device)
    z = torch.empty(bh, shape.dk, dtype=torch.float32, device=device) if normalize_rows else None
    return kv, z


def join_state(kv: torch.Tensor, z: torch.Tensor | None, b: int, h: int, normalize_rows: bool) -> torch.Tensor:
    """The kernels' (B * H, Dk, Dv) part and z column -> one (B, H, Dk, Dv') tensor."""
    s = torch.cat([kv, z[..., None]], -1) if normalize_rows else kv
    return s.reshape(b, h, *s.shape[1:])


def reference_causal(
    Q: torch.Tensor,
    K: torch.Tensor,
    v: torch.Tensor,
    log_gates: torch.Tensor | None,
    *,
    normalize_rows: bool,
    eps: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The materialized causal form with a state (the "reference" form of a causal spec given a state).

    M_ij = exp(F_i - F_j) for i >= j (F_i = P_(i+1)); row i also gets exp(F_i) Q_i S0 from the initial state
    S0, and the final state is S_L = exp(P_L) S0 + sum_j exp(P_L - F_j) K_j v'_j^T. Q is already scaled and
    passed through the feature map. Computes in float32 at least (float64 stays float64); y in the dtype of
    v, the final state in the state dtype. Memory O(B H L^2). ``key_padding_mask`` (B, L), True = real
    token: pad rows get Q = K = 0 and log-gate 0, as in ``lion_reference``.
    """
    dt = torch.promote_types(Q.dtype, torch.float32)
    Q, K, log_gates = zero_pads(Q.to(dt), K.to(dt), log_gates, key_padding_mask)
    b, length, h, _ = Q.shape
    Qh, Kh = Q.to(dt).transpose(1, 2), K.to(dt).transpose(1, 2)  # (B, H, L, Dk)
    V = v.to(dt).transpose(1, 2)
    if normalize_rows:
        V = torch.cat([V, V.new_ones(b, h, length, 1)], -1)
    if log_gates is None:
        lg = torch.zeros(b, h, length, dtype=dt, device=Q.device)
    else:
        lg = log_gates.to(dt).permute(0, 2, 1)  # (B, H, L)
    F = lg.cumsum(-1)  # F_i = P_(i+1)
    P_L = F[..., -1:]
    idx = torch.arange(length, device=Q.device)
    below = idx[:, None] >= idx[None, :]
    mask = torch.where(below, torch.exp(torch.where(below, F[..., :, None] - F[..., None, :], 0.0)), 0.0)
    out = ((Qh @ Kh.transpose(-1, -2)) * mask) @ V  # (B, H, L, Dv')
    final = (Kh * torch.exp(P_L - F)[..., None]).transpose(-1, -2) @ V  # (B, H, Dk, Dv')
    if initial_state is not None:
        S0 = initial_state.to(dt)
        out = out + torch.exp(F)[..., None] * (Qh @ S0)
        final = final + torch.exp(P_L)[..., None] * S0
    if normalize_rows:
        out = out[..., :-1] / (out[..., -1:] + eps)
    y = out.transpose(1, 2)
    if key_padding_mask is not None:  # already 0 there; this keeps dY at pads from reaching anything
        y = torch.where(key_padding_mask[:, :, None, None], y, 0.0)
    y = y.to(v.dtype)
    return (y, final.to(state_dtype(Q.dtype))) if output_final_state else y


def check_step(
    state: object, q: object, k: object, v: object, gate: object, family: str, normalize_rows: bool
) -> tuple[int, int, int, int]:
    """Validate the arguments of a one-token step; returns (B, H, Dk, Dv)."""
    q, k, v = check_tokens(q, k, v, gate, family, "B, H", " (one token)")
    b, h, dk = q.shape
    if state is not None:
        check_state_tensor("state", state, q, b, h, dk, v.shape[2], normalize_rows)
    return b, h, dk, v.shape[2]


def step_settings(q: torch.Tensor, b: int, h: int, dk: int, dv: int) -> KernelSettings:
    """Tile sizes of the step kernel (block_v covers Dv + 1, the normalizer column); refuses what the kernel
    cannot run (dtype, head dims, device) as the kernel forms do."""
    st = kernel_settings(q, Shape(b, 1, h, dk, dv), None, 16)
    return KernelSettings(st.chunk, st.block_k, _pow2_at_least(dv + 1), st.precision)


def fill_empty(dst: tuple, src: tuple, shape: Shape) -> None:
    """A packed batch's sequences with no rows pass their state through: their kernel buffers in ``dst``
    (the final state, or the initial state's gradient) get ``src`` (the initial state, or the final state's
    gradient; 0 where it is None). The chunk form's kernels have no program for such a sequence."""
    if shape.seqs is None or dst[0] is None:
        return
    empty = [i for i, n in enumerate(shape.seqs.lengths) if n == 0]
    if not empty:
        return
    rows = (torch.tensor(empty)[:, None] * shape.heads + torch.arange(shape.heads)).flatten().to(dst[0].device)
    for d, s in zip(dst, src, strict=True):
        if d is not None:
            d[rows] = 0.0 if s is None else s[rows].to(d.dtype)
