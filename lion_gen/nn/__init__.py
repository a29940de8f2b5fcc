"""Models built on any generated module: a pre-norm block, a ViT and a token encoder, in plain torch.

``op`` is a generated module (``import generated.lion_s``, or ``lion_gen.load("specs/lion_s.yaml")``); its
function, mask family and torch form are read from it, so every spec works, and a new spec needs no change
here. LION's initialisations (lion_math.md section 1.2, and the half-life spread of retention-like decays):

- decay masks: one raw parameter per head, set so that the heads' half-lives (tokens over which the decay
  halves) are spread geometrically over ``half_lives``;
- selective masks: a ``Linear(dim, num_heads)`` gate on the block's (normalized) input, weights N(0, 0.02^2)
  and biases set like the decay parameters, so that each head starts at its own half-life.

Natural orders for vision (``order="snake"``, lion_math.md section 1.5): two scans of the patch grid, a row
snake and a column snake, each with its own gates; their numerators and row sums are added before the
division. The class token stays first in both. This path runs the generated module's torch form (it needs
the numerators and row sums apart), on any device.

Packed batches (``cu_seqlens``, as in flash-attn and the generated ops, docs/contract.md section 2.2):
``LionAttention``, ``SoftmaxAttention``, ``Block`` and ``TokenEncoder`` take ``cu_seqlens``, an int32 tensor
of offsets ``[0, L_0, L_0 + L_1, ..., T]``, with the sequences back to back in one batch row, x ``(1, T, dim)``
(tokens ``(1, T)``); each sequence gets the outputs and gradients of a call on it alone (empty sequences
allowed). The two-scan vision orders (``orders``) refuse it: they are permutations of one fixed patch grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from ..runtime import Seqs, check_chunk_size, check_cu_seqlens, check_key_padding_mask, packed
from ..runtime.checks import Shape

__all__ = [
    "Block",
    "DropPath",
    "LionAttention",
    "Mlp",
    "SoftmaxAttention",
    "TokenEncoder",
    "VisionTransformer",
    "half_life_gates",
    "snake_orders",
]


def _op_parts(op: ModuleType) -> tuple[Callable[..., torch.Tensor], str, dict]:
    spec = op.SPEC
    return getattr(op, spec["name"]), op.FAMILY, spec


def half_life_gates(op: ModuleType, num_heads: int, half_lives: tuple[float, float]) -> torch.Tensor:
    """Raw gate values z, one per head, with log_decay(z) = -ln 2 / h, h spread geometrically over half_lives.

    The spec's log-decay is inverted numerically (bisection in float64 on its torch lowering), so any
    monotonic log-decay works. Raises ValueError when the spec has no decay or it cannot reach a half-life.
    """
    if op.FAMILY == "none":
        raise ValueError(f"spec {op.SPEC['name']!r} has no decay (mask family 'none')")
    lo, hi = half_lives
    if not 0 < lo <= hi:
        raise ValueError(f"half_lives must be 0 < low <= high, got {half_lives}")
    h = torch.logspace(math.log10(lo), math.log10(hi), num_heads, dtype=torch.float64)
    target = -math.log(2.0) / h
    f = op._log_decay_torch
    a, b = torch.full_like(target, -60.0), torch.full_like(target, 60.0)
    increasing = bool(f(b[:1]) > f(a[:1]))
    for _ in range(200):
        mid = (a + b) / 2
        above = f(mid) > target
        go_left = above if increasing else ~above
        b = torch.where(go_left, mid, b)
        a = torch.where(go_left, a, mid)
    z = (a + b) / 2
    err = (f(z) - target).abs().max().item()
    if not err < 1e-6 * max(1.0, target.abs().max().item()):
        raise ValueError(f"log_decay of {op.SPEC['name']!r} cannot reach half-lives {half_lives} (off by {err})")
    return z.float()


def _packed_sequences(cu_seqlens: object, name: str, x: torch.Tensor, *, values: bool = True) -> Seqs | None:
    """The sequences of the packed batch ``x`` (``name``: (1, T) tokens or (1, T, dim) features), or None
    when ``cu_seqlens`` is None: ``check_cu_seqlens``, one read of the offsets to the host. With
    ``values=False``, and inside a torch.compile trace, only what needs no read of the offsets is checked
    (their type, dtype, shape and device), and None is returned."""
    if cu_seqlens is None:
        return None
    layout = "(1, T)" if name == "tokens" else "(1, T, dim)"
    if x.dim() != (2 if name == "tokens" else 3) or x.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, {name} must be a packed batch {layout}, got shape {tuple(x.shape)}")
    shape = Shape(1, x.shape[1], 1, 1, 1)
    if not values or torch.compiler.is_compiling():
        packed(cu_seqlens, shape, x.device, values=False)
        return None
    return check_cu_seqlens(cu_seqlens, shape, x.device)


def _sequence_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """For each of the ``length`` rows of a packed batch, the index of its sequence: int64 (length,), computed
    on the device of ``cu_seqlens`` (no host synchronization). ``cu_seqlens`` must be valid (checked)."""
    rows = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, rows, right=True) - 1


def snake_orders(rows: int, cols: int, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token orders for a rows x cols patch grid stored row-major after ``prefix`` tokens (a class token):
    the row snake (left to right, then right to left, ...) and the column snake (down, then up, ...)."""
    grid = torch.arange(rows * cols).view(rows, cols)
    row = torch.cat([grid[r] if r % 2 == 0 else grid[r].flip(0) for r in range(rows)])
    col = torch.cat([grid[:, c] if c % 2 == 0 else grid[:, c].flip(0) for c in range(cols)])
    head = torch.arange(prefix)
    return torch.cat([head, row + prefix]), torch.cat([head, col + prefix])


class LionAttention(nn.Module):
    """Multi-head LION attention on a generated module: (B, L, dim) -> (B, L, dim).

    q, k, v from one Linear, the mask's gates per the spec's family (LION initialisations, see the module
    docstring), the generated op in ``form`` (default "auto": Triton kernels on CUDA, torch form elsewhere),
    an output Linear. ``orders``: None (the sequence order) or two permutations of the tokens (see
    ``snake_orders``), each scanned with its own gates. ``forward(x, key_padding_mask=None, cu_seqlens=None)``:
    a bool (B, L) mask, True = real token (the generated op's contract, section 3.1): the real tokens' outputs
    are those of the batch without its pads, the pads' are ``proj``'s bias. ``cu_seqlens``: a packed batch,
    x ``(1, T, dim)`` and the mask, if any, ``(1, T)`` (contract section 2.2), passed to the generated op in
    every form (it checks the offsets before its kernels run); a selective gate is computed per token and a
    decay gate is per head, so both pack as they are. With ``orders`` it is refused (ValueError).
    """

    def __init__(
        self,
        op: ModuleType,
        dim: int,
        num_heads: int,
        *,
        form: str = "auto",
        chunk_size: int | None = None,
        half_lives: tuple[float, float] = (1.0, 256.0),
        orders: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.fn, self.family, self.spec = _op_parts(op)
        self._parts = op._torch_chunk  # the torch form; normalize=False gives numerators and row sums
        self.eps, self.default_chunk = op.EPS, op.DEFAULT_CHUNK
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.form, self.chunk_size = form, chunk_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        scans = 1 if orders is None else 2
        if orders is not None:
            if len(orders) != 2:
                raise ValueError("orders must be two permutations of the tokens")
            for i, perm in enumerate(orders):
                self.register_buffer(f"order{i}", perm.clone(), persistent=False)
                self.register_buffer(f"inverse{i}", torch.argsort(perm), persistent=False)
        self.scans = scans
        if self.family != "none":
            z = half_life_gates(op, num_heads, half_lives)
        if self.family == "decay":
            self.gates = nn.ParameterList([nn.Parameter(z.clone()) for _ in range(scans)])
        elif self.family == "selective":
            self.gates = nn.ModuleList([nn.Linear(dim, num_heads) for _ in range(scans)])
            for lin in self.gates:
                nn.init.normal_(lin.weight, std=0.02)
                with torch.no_grad():
                    lin.bias.copy_(z)

    def _gate(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        if self.family == "decay":
            return self.gates[i]
        if self.family == "selective":
            return self.gates[i](x)
        return None

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, L, _ = x.shape
        if cu_seqlens is not None:
            if self.scans != 1:
                raise ValueError(
                    "cu_seqlens (a packed batch) is not supported with orders (the two-scan vision path): its "
                    "permutations are of one fixed token grid; pass cu_seqlens=None"
                )
            _packed_sequences(cu_seqlens, "x", x, values=False)  # the generated op checks the offsets' values
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).unbind(2)
        if self.scans == 1:
            y = self.fn(
                q,
                k,
                v,
                self._gate(0, x),
                form=self.form,
                chunk_size=self.chunk_size,
                key_padding_mask=key_padding_mask,
                cu_seqlens=cu_seqlens,
            )
        else:
            shape = Shape(B, L, self.num_heads, self.head_dim, self.head_dim)
            key_padding_mask = check_key_padding_mask(key_padding_mask, shape, x.device)
            chunk = check_chunk_size(self.chunk_size, self.default_chunk)
            num = den = None
            for i in range(2):
                perm, inv = getattr(self, f"order{i}"), getattr(self, f"inverse{i}")
                g = self._gate(i, x)
                if g is not None and g.dim() == 3:
                    g = g[:, perm]
                pad = None if key_padding_mask is None else key_padding_mask[:, perm]
                n_i, d_i = self._parts(
                    q[:, perm], k[:, perm], v[:, perm], g, chunk, normalize=False, key_padding_mask=pad
                )
                n_i = n_i[:, inv]
                num = n_i if num is None else num + n_i
                if d_i is not None:
                    d_i = d_i[:, inv]
                    den = d_i if den is None else den + d_i
            y = num if den is None else num / (den[..., None] + self.eps)
            y = y.to(v.dtype)
        return self.proj(y.reshape(B, L, self.dim))


class SoftmaxAttention(nn.Module):
    """Softmax multi-head attention (torch SDPA) with the same projections, for baselines. With a
    ``key_padding_mask`` (bool (B, L), True = real token) no query attends to a pad, and pads' outputs are
    ``proj``'s bias, as in LionAttention. With ``cu_seqlens`` (a packed batch, x ``(1, T, dim)``, checked
    with one read of the offsets to the host) each query attends to its own sequence only (a block-diagonal
    (T, T) bool mask, built on the device), and a padding mask ``(1, T)`` applies on top: each sequence gets
    what it gets alone."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, L, D = x.shape
        _packed_sequences(cu_seqlens, "x", x)
        real = check_key_padding_mask(key_padding_mask, Shape(B, L, self.num_heads, D, D), x.device)
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cu_seqlens is not None:
            seq = _sequence_ids(cu_seqlens, L)
            keys = seq[:, None] == seq[None, :]  # (L, L): the query's own sequence
            if real is not None:
                own = keys
                keys = keys & real[0][None, :]
                keys = torch.where(keys.any(1, keepdim=True), keys, own)  # a sequence of pads only: its own rows
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys)
            if real is not None:
                y = torch.where(real[:, None, :, None], y, 0.0)
        elif real is None:
            y = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            keys = real | ~real.any(1, keepdim=True)  # a sequence of pads only: any keys (its outputs are zeroed)
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
            y = torch.where(real[:, None, :, None], y, 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample with probability p (training only). With
    ``cu_seqlens`` (a packed batch (1, T, ...), already checked by the attention) per sequence instead."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        if cu_seqlens is None:
            keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        else:
            keep = torch.rand(cu_seqlens.shape[0] - 1, device=x.device) >= self.p
            keep = keep[_sequence_ids(cu_seqlens, x.shape[1])].view(1, -1, *([1] * (x.dim() - 2)))
        return x * keep.to(x.dtype) / (1.0 - self.p)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm block: x + drop_path(attn(norm(x))), then x + drop_path(mlp(norm(x))).

    ``attn`` is a LionAttention (or any (B, L, dim) -> (B, L, dim) module, e.g. SoftmaxAttention); the
    selective gate of a LionAttention reads the normalized block input. ``forward(x, key_padding_mask=None,
    cu_seqlens=None)`` passes a mask and a packed batch's offsets on to ``attn`` (each only when it is not
    None, so that any module works without them); with ``cu_seqlens`` drop-path drops per sequence.
    """

    def __init__(self, dim: int, attn: nn.Module, *, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        kw = {} if key_padding_mask is None else {"key_padding_mask": key_padding_mask}
        if cu_seqlens is not None:
            kw["cu_seqlens"] = cu_seqlens
        x = x + self.drop_path(self.attn(self.norm1(x), **kw), cu_seqlens)
        return x + self.drop_path(self.mlp(self.norm2(x)), cu_seqlens)


def _attention(op: ModuleType | str, dim: int, num_heads: int, **kw) -> nn.Module:
    if op == "softmax":
        return SoftmaxAttention(dim, num_heads)
    if isinstance(op, str):
        raise ValueError(f"op must be a generated module or 'softmax', got {op!r}")
    return LionAttention(op, dim, num_heads, **kw)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear) and not getattr(m, "_lion_gate", False):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _mark_gates(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, LionAttention) and m.family == "selective":
            for lin in m.gates:
                lin._lion_gate = True  # keeps its half-life bias through _init_weights


class VisionTransformer(nn.Module):
    """A ViT on LION attention (or softmax, ``op="softmax"``): (B, C, H, W) images -> (B, num_classes).

    Patch embedding (a strided Conv2d), a learned positional embedding, a class token (``pool="cls"``) or mean
    pooling (``pool="mean"``), ``depth`` pre-norm blocks, a final LayerNorm and a Linear head.
    ``order``: "sequence" (row-major patches) or "snake" (LION-D/S natural orders: row and column snakes, each
    scan with its own gates). Decay half-lives default to 1 .. the number of tokens. ``init``: "vit" (Linear
    weights truncated-normal with std 0.02, zero biases) or "torch" (PyTorch's defaults); the gates keep
    LION's initialisation either way. ``pos_std``: the positional embedding's std (a small data set with few
    updates learns much faster with 1.0, examples/demo.py).
    """

    def __init__(
        self,
        op: ModuleType | str,
        *,
        image_size: int,
        patch_size: int,
        in_chans: int,
        num_classes: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        pool: str = "mean",
        order: str = "sequence",
        drop_path: float = 0.0,
        form: str = "auto",
        chunk_size: int | None = None,
        half_lives: tuple[float, float] | None = None,
        init: str = "vit",
        pos_std: float = 0.02,
    ) -> None:
        super().__init__()
        if init not in ("vit", "torch"):
            raise ValueError(f"init must be 'vit' or 'torch', got {init!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if order not in ("sequence", "snake"):
            raise ValueError(f"order must be 'sequence' or 'snake', got {order!r}")
        side = image_size // patch_size
        prefix = 1 if pool == "cls" else 0
        tokens = side * side + prefix
        self.pool = pool
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if prefix else None
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=pos_std, a=-2 * pos_std, b=2 * pos_std)
        kw = {}
        if op != "softmax":
            orders = snake_orders(side, side, prefix) if order == "snake" else None
            kw = dict(form=form, chunk_size=chunk_size, half_lives=half_lives or (1.0, float(tokens)), orders=orders)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, _attention(op, dim, num_heads, **kw), mlp_ratio=mlp_ratio, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        if init == "vit":
            _mark_gates(self)
            _init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, patches, dim), row-major
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(1))


class TokenEncoder(nn.Module):
    """A bidirectional encoder of token ids: (B, L) int -> (B, L, dim), LION attention blocks.

    Token and learned positional embeddings (up to ``max_len`` positions), ``depth`` pre-norm blocks, a final
    LayerNorm. ``forward(tokens, key_padding_mask=None, cu_seqlens=None)``: a bool (B, L) mask, True = real
    token, passed to every block's attention: no real token sees a pad (a pad's outputs are not meaningful;
    ignore them). With right padding, the real tokens' outputs equal those of the unpadded sequences (pads
    elsewhere shift the positions of the tokens after them: their positional embeddings differ).
    ``cu_seqlens``: a packed batch, tokens ``(1, T)`` (and the mask ``(1, T)``), each sequence at most
    ``max_len`` long; positions restart at 0 in every sequence (computed on the device), so each sequence gets
    what it gets alone. The offsets are checked with one read to the host here (besides the one of each
    block's attention op); inside a torch.compile trace only their layout is, and the lengths are not
    checked against ``max_len``.
    """

    def __init__(
        self,
        op: ModuleType | str,
        *,
        vocab_size: int,
        max_len: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        form: str = "auto",
        chunk_size: int | None = None,
        half_lives: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        kw = {} if op == "softmax" else dict(form=form, chunk_size=chunk_size, half_lives=half_lives or (1.0, max_len))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, _attention(op, dim, num_heads, **kw), mlp_ratio=mlp_ratio, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(dim)
        _mark_gates(self)
        _init_weights(self)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(
        self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        max_len = self.pos_embed.shape[1]
        if cu_seqlens is None:
            if tokens.dim() != 2 or tokens.shape[1] > max_len:
                raise ValueError(f"tokens must have shape (B, L) with L <= {max_len}, got {tuple(tokens.shape)}")
            x = self.embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        else:
            seqs = _packed_sequences(cu_seqlens, "tokens", tokens)
            if seqs is not None and seqs.max_length > max_len:
                raise ValueError(
                    f"cu_seqlens: every sequence must be at most max_len = {max_len} long, got one of "
                    f"{seqs.max_length} (sequence {seqs.lengths.index(seqs.max_length)})"
                )
            rows = torch.arange(tokens.shape[1], device=tokens.device)
            positions = rows - cu_seqlens[_sequence_ids(cu_seqlens, tokens.shape[1])]  # 0 at each sequence's start
            x = self.embed(tokens) + self.pos_embed[0, positions][None]
        for blk in self.blocks:
            x = blk(x, key_padding_mask, cu_seqlens)
        return self.norm(x)
