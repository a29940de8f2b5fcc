"""Runtime input validation: every refusal names the argument and what was expected."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .interpreter import bf16_dot_ok, interpreting

FORMS = ("auto", "chunk", "parallel", "recurrent", "reference", "torch")

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_CHUNK, MAX_CHUNK = 16, 256
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Shape:
    """The sizes of a call. A packed batch (cu_seqlens) has batch 1, length T (all its tokens) and ``seqs``,
    its sequences (lion_gen.runtime.varlen.Seqs); every other call has ``seqs`` None."""

    batch: int
    length: int
    heads: int
    dk: int
    dv: int
    seqs: Any = None

    @property
    def sequences(self) -> int:
        """The number of sequences: what states and per-(b, h) buffers count."""
        return self.batch if self.seqs is None else self.seqs.count

    @property
    def longest(self) -> int:
        """The longest sequence's length: what the grids and tile sizes are chosen for."""
        return self.length if self.seqs is None else self.seqs.max_length


def _check_tensor(name: str, t: object, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    return t


def check_tokens(
    q: object, k: object, v: object, gate: object, family: str, dims: str, note: str = ""
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate q, k, v of shape (dims, D) (dims: "B, L, H" for a sequence, "B, H" for one token), their
    dtypes and devices, and the gate's presence and shape for a mask family ((H,), or (dims) per token).
    ``note`` follows the expected layout in the messages that give one. Returns q, k, v."""
    ndim = dims.count(",") + 2
    _check_tensor("q", q, ndim, f"({dims}, Dk){note}")
    _check_tensor("k", k, ndim, f"({dims}, Dk){note}")
    _check_tensor("v", v, ndim, f"({dims}, Dv){note}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)} ({dims}, Dk), got {tuple(k.shape)}")
    rows = tuple(q.shape[:-1])
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must have shape ({dims}, Dv) = ({', '.join(map(str, rows))}, Dv), got {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if min(*q.shape, v.shape[-1]) == 0:
        raise ValueError(f"q, k, v must be non-empty, got q {tuple(q.shape)} and v {tuple(v.shape)}")
    if family == "none":
        if gate is not None:
            raise ValueError("gate must be None for a spec with mask family 'none'")
    else:
        want = (q.shape[-2],) if family == "decay" else rows
        layout = "(H,)" if family == "decay" else f"({dims})"
        if gate is None:
            raise ValueError(f"gate is required for mask family {family!r}: shape {layout} = {want}{note}")
        _check_tensor("gate", gate, len(want), f"{layout} = {want}{note}")
        assert isinstance(gate, torch.Tensor)
        if tuple(gate.shape) != want:
            raise ValueError(f"gate must have shape {layout} = {want}{note}, got {tuple(gate.shape)}")
        if gate.device != q.device:
            raise ValueError(f"gate must be on the device of q ({q.device}), got {gate.device}")
    return q, k, v


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None, family: str) -> Shape:
    """Validate shapes, dtypes, devices and the gate's presence for a mask family."""
    check_tokens(q, k, v, gate, family, "B, L, H")
    return Shape(*q.shape, v.shape[3])


def check_key_padding_mask(key_padding_mask: object, shape: Shape, device: torch.device) -> torch.Tensor | None:
    """The key padding mask as a contiguous bool (B, L) tensor (True = real token), or None; refuses another
    dtype, shape or device."""
    if key_padding_mask is None:
        return None
    want = (shape.batch, shape.length)
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor (True = real token), got dtype {key_padding_mask.dtype}"
        )
    if tuple(key_padding_mask.shape) != want:
        raise ValueError(f"key_padding_mask must have shape (B, L) = {want}, got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask must be on the device of q ({device}), got {key_padding_mask.device}")
    return key_padding_mask.contiguous()


def resolve_form(form: object, device: torch.device | None = None) -> str:
    """The algorithm to run for ``form``; refuses unknown forms.

    ``"auto"`` is the Triton chunk form on CUDA tensors and the torch form elsewhere (and when no device is
    given, "chunk" when CUDA is available).
    """
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
    if form == "auto":
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        return "chunk" if cuda else "torch"
    return form


@dataclass(frozen=True)
class KernelSettings:
    chunk: int
    block_k: int
    block_v: int
    precision: str | None


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def check_chunk_size(chunk_size: object, default_chunk: int) -> int:
    """The chunk size to use: ``chunk_size``, or the spec's default when None."""
    if chunk_size is None:
        return default_chunk
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size & (chunk_size - 1) or not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}, got {chunk_size}")
    return chunk_size


def kernel_settings(q: torch.Tensor, shape: Shape, chunk_size: object, default_chunk: int) -> KernelSettings:
    """Tile sizes and dot precision for a kernel launch; refuses what the kernels cannot run."""
    chunk_size = check_chunk_size(chunk_size, default_chunk)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"q, k, v must be float32, float16 or bfloat16 for the kernel forms, got {q.dtype} "
            "(form='reference' takes float64)"
        )
    if max(shape.dk, shape.dv) > MAX_HEAD_DIM:
        raise ValueError(f"head dims must be at most {MAX_HEAD_DIM}, got Dk={shape.dk}, Dv={shape.dv}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the kernel forms need CUDA tensors (q is on {q.device}); set TRITON_INTERPRET=1 to run them on "
            "the CPU, slowly, or use form='reference'"
        )
    if q.dtype == torch.bfloat16 and interpreting():
        ok, why = bf16_dot_ok()
        if not ok:
            raise TypeError(
                f"bfloat16 kernel calls are refused under the Triton interpreter (TRITON_INTERPRET=1): {why}; "
                "use float32 or float16 there, form='reference', or a GPU"
            )
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32: no tf32 (accuracy bar 1e-4)
    return KernelSettings(chunk_size, _pow2_at_least(shape.dk), _pow2_at_least(shape.dv), precision)


def check_scale(value: float, d: int) -> float:
    if not math.isfinite(value):
        raise ValueError(f"the spec's scale is not finite at head dim d={d}: {value}")
    return float(value)
