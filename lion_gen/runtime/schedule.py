"""Launch-time schedule choices of the sequence-parallel chunk form (no GPU query needed to decide)."""

from __future__ import annotations

import torch

H100_SMS = 132  # the device the defaults are chosen for; a CUDA device reports its own count
PROGRAMS_PER_SM = 4
MAX_SEGMENT_CHUNKS = 16


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS


def segment_chunks(batch_heads: int, n_chunks: int, device: torch.device) -> int:
    """Chunks per segment: the largest power of two (at most 16) that still gives every stage-1 and
    stage-3 launch at least 4 programs per SM (B * H * segments >= 4 * SMs); 1 when nothing does.

    Fewer chunks per segment means more programs and more per-segment state traffic; more chunks means
    a longer sequential sweep inside each program.
    """
    per_program = max(1, (batch_heads * n_chunks) // (PROGRAMS_PER_SM * _sm_count(device)))
    k = 1 << (per_program.bit_length() - 1)
    return max(1, min(k, MAX_SEGMENT_CHUNKS, 1 << max(0, (n_chunks - 1).bit_length())))
