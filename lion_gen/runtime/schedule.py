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
    """Chunks per segment: as many as still give every stage-1 and stage-3 launch at least 4 programs
    per SM (B * H * segments >= 4 * SMs), at most 16, then evened out over the segments that makes; 1
    when no length does.

    Each segment moves its summaries and carried states through HBM, so the fewest segments that fill
    the device move the least; at most 16 chunks bounds each program's sequential sweep.
    """
    need = -(-PROGRAMS_PER_SM * _sm_count(device) // max(1, batch_heads))  # segments per (b, h)
    n_chunks = max(1, n_chunks)
    if need <= 1:
        seg = n_chunks
    else:  # the longest segment that still cuts n_chunks into `need` segments or more
        seg = max(1, (n_chunks - 1) // (need - 1))
    seg = min(seg, MAX_SEGMENT_CHUNKS)
    segments = -(-n_chunks // seg)
    return -(-n_chunks // segments)  # the same number of segments, lengths evened out
