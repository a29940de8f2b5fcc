"""The "reference" form: the materialized L x L mask in plain torch (tests and small sizes only)."""

from __future__ import annotations

import torch


def zero_pads(
    Q: torch.Tensor, K: torch.Tensor, log_gates: torch.Tensor | None, key_padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The reference forms' pad rows of a key padding mask (B, L), True = real token (None: no pads): Q = K = 0
    and log-gate 0 there (decay 1: no gate crosses a pad)."""
    if key_padding_mask is None:
        return Q, K, log_gates
    real = key_padding_mask[:, :, None, None]
    Q, K = torch.where(real, Q, 0.0), torch.where(real, K, 0.0)
    if log_gates is not None:
        log_gates = torch.where(real[..., 0], log_gates, 0.0)
    return Q, K, log_gates


def lion_reference(
    Q: torch.Tensor,
    K: torch.Tensor,
    v: torch.Tensor,
    log_gates: torch.Tensor | None,
    *,
    causal: bool,
    f_shift: int,
    g_shift: int,
    normalize_rows: bool,
    eps: float,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = (M o (Q K^T)) v [/ row sums + eps], M from prefix sums of ``log_gates`` (B, L, H).

    Q is already scaled and passed through the feature map. Computes in float32 at least (float64
    stays float64) and returns the dtype of v. Memory is O(B H L^2). ``key_padding_mask`` (B, L), True =
    real token: pad rows get Q = K = 0 and log-gate 0 (decay 1: no gate crosses a pad), so the real rows'
    outputs are those of the sequence without its pads and the pads' outputs are 0.
    """
    dt = torch.promote_types(Q.dtype, torch.float32)
    Q, K, vv = Q.to(dt), K.to(dt), v.to(dt)
    b, length, h, _ = Q.shape
    Q, K, log_gates = zero_pads(Q, K, log_gates, key_padding_mask)
    idx = torch.arange(length, device=Q.device)
    lower = idx[:, None] > idx[None, :]
    upper = idx[:, None] < idx[None, :]
    if log_gates is None:
        mask = torch.ones(length, length, dtype=dt, device=Q.device)
        if causal:
            mask = torch.where(upper, 0.0, mask)
        mask = mask.expand(b, h, length, length)
    else:
        lg = log_gates.to(dt).permute(0, 2, 1)  # (B, H, L)
        P = torch.cat([torch.zeros_like(lg[..., :1]), torch.cumsum(lg, -1)], -1)  # exclusive, length L+1
        F = P[..., f_shift : f_shift + length]
        G = P[..., g_shift : g_shift + length]
        low = torch.exp(torch.where(lower, F[..., :, None] - F[..., None, :], 0.0))
        up = torch.exp(torch.where(upper, G[..., None, :] - G[..., :, None], 0.0))
        up = torch.zeros_like(up) if causal else up
        mask = torch.where(lower, low, torch.where(upper, up, 1.0))
    scores = torch.einsum("bihd,bjhd->bhij", Q, K) * mask
    y = torch.einsum("bhij,bjhd->bihd", scores, vv)
    if normalize_rows:
        y = y / (scores.sum(-1).permute(0, 2, 1)[..., None] + eps)
    if key_padding_mask is not None:  # already 0 there; this keeps dY at pads from reaching anything
        y = torch.where(key_padding_mask[:, :, None, None], y, 0.0)
    return y.to(v.dtype)
