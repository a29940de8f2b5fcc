"""What generated modules import at run time: input checks, launch helpers, the reference form."""

from .checks import (
    FORMS,
    check_chunk_size,
    check_inputs,
    check_key_padding_mask,
    check_scale,
    kernel_settings,
    resolve_form,
)
from .launch import launch, on_device
from .reference import lion_reference
from .schedule import segment_chunks
from .varlen import Seqs, check_cu_seqlens, packed, per_sequence

__all__ = [
    "FORMS",
    "Seqs",
    "check_chunk_size",
    "check_cu_seqlens",
    "check_inputs",
    "check_key_padding_mask",
    "check_scale",
    "kernel_settings",
    "launch",
    "lion_reference",
    "on_device",
    "packed",
    "per_sequence",
    "resolve_form",
    "segment_chunks",
]
