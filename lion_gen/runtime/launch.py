"""Kernel launches that fit the device: pipelined first, then with less shared memory."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from triton.runtime.errors import OutOfResources

# Software pipelining (num_stages > 1) multiplies the shared memory a loop's tiles take. The largest
# need is the chunk form's backward stage 3 (`bwd_grads`): 156,680 bytes at 3 stages in bfloat16, head
# dim 64, chunk 64 (sm_90a as launched, benchmarks/RESULTS.md), within an H100's 232,448 per block; a
# configuration that does not fit (float32 or head dim 128 at chunk 64) retries with one stage.
STAGES = (3, 1)


def launch(kernel: Any, grid: Sequence[int], *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel`` pipelined; if the device lacks the shared memory, again without pipelining.

    Raises ValueError naming the chunk size when even that does not fit.
    """
    error: OutOfResources | None = None
    for stages in STAGES:
        try:
            kernel[tuple(grid)](*args, num_stages=stages, **kwargs)
            return
        except OutOfResources as e:
            error = e
    name = getattr(kernel, "__name__", "a kernel")
    raise ValueError(
        f"{name} needs more shared memory than this GPU has at chunk_size={kwargs.get('C')} with head dims "
        f"Dk={kwargs.get('DK')}, Dv={kwargs.get('DV')} ({error}); pass a smaller chunk_size"
    ) from error


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Make ``t``'s GPU the current one while kernels launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
