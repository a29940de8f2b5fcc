"""Packed batches (``cu_seqlens``): their checks, the kernels' sequence table, and the per-sequence loop of the
torch forms.

A packed batch holds N sequences of any lengths back to back in one (1, T, H, D) batch, as flash-attn and
flash-linear-attention take them: sequence i is the rows ``cu_seqlens[i] .. cu_seqlens[i + 1] - 1`` of dim 1,
and ``cu_seqlens`` is an int32 tensor ``[0, L_0, L_0 + L_1, ..., T]`` of N + 1 entries on the device of q.
Every sequence is computed as if it were alone: no mask, gate or state crosses a boundary. A selective gate
is packed the same way, (1, T, H); a fixed per-head decay stays (H,); a key padding mask is (1, T); a causal
spec's initial and final states hold one state per sequence, (N, H, Dk, Dv').
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .checks import Shape
from .state import state_dtype


@dataclass(frozen=True)
class Seqs:
    """The validated sequences of a packed batch (``check_cu_seqlens`` builds it).

    ``cu`` is the validated ``cu_seqlens`` tensor, contiguous, on the device of q; ``starts`` and ``lengths``
    are its sequences' first rows and lengths as Python ints (read from the one host copy the check made,
    so nothing here synchronizes with the device again).
    """

    cu: torch.Tensor
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (chunk, seg) -> table

    @property
    def count(self) -> int:
        """N, the number of sequences (empty ones included)."""
        return len(self.lengths)

    @property
    def total(self) -> int:
        """T, the number of rows of the packed batch."""
        return self.starts[-1] + self.lengths[-1]

    @property
    def max_length(self) -> int:
        """The length of the longest sequence (0 when all are empty)."""
        return max(self.lengths)

    def _chunk_counts(self, chunk: int) -> list[int]:
        _check_positive("chunk", chunk)
        return [-(-n // chunk) for n in self.lengths]

    def chunks(self, chunk: int) -> int:
        """The number of chunks of ``chunk`` rows over all sequences (each sequence's last chunk may be
        short; an empty sequence has none)."""
        return sum(self._chunk_counts(chunk))

    def segment_counts(self, chunk: int, seg: int) -> list[int]:
        """Each sequence's number of segments of ``seg`` chunks (its last segment may be short; an empty
        sequence has none)."""
        _check_positive("seg", seg)
        return [-(-c // seg) for c in self._chunk_counts(chunk)]

    def segments(self, chunk: int, seg: int) -> int:
        """The number of segments of ``seg`` chunks over all sequences."""
        return sum(self.segment_counts(chunk, seg))

    def table(self, chunk: int, seg: int) -> torch.Tensor:
        """The sequence table the kernels of a packed batch read: int32, shape (N + 1, 3), contiguous, on
        the device of ``cu``, preceded in its storage by the segment -> sequence map.

        Row i (0 <= i < N) describes sequence i, and row N holds the totals::

            table[i, 0] = cu_seqlens[i]                                  its first row (row N: T)
            table[i, 1] = sum_{j < i} ceil(L_j / chunk)                  its first chunk (row N: all chunks)
            table[i, 2] = sum_{j < i} ceil(ceil(L_j / chunk) / seg)      its first segment (row N: all segments)

        so that sequence b owns rows ``table[b, 0] .. table[b + 1, 0] - 1``, chunks ``table[b, 1] ..
        table[b + 1, 1] - 1`` and segments ``table[b, 2] .. table[b + 1, 2] - 1`` of the packed batch's
        flat chunk and segment numbering. A kernel reads row b and row b + 1, i.e. the flat int32 offsets
        3b .. 3b + 5. An empty sequence has no chunk and no segment (its two rows agree).

        The segment -> sequence map: the S = ``table[N, 2]`` int32 right before the table in its storage,
        backwards. With ``p`` a pointer to ``table[0, 0]``, ``p[-1 - g]`` is the sequence that owns segment g
        of the flat numbering, 0 <= g < S (``owners`` lists them in order). The per-segment kernels run on
        a flat grid of exactly S * H programs: program (g, h) reads its sequence b there, and its segment
        within b is g - ``table[b, 2]``; counted backwards from the table, the map needs neither N nor S to
        be found. The storage holds 0 to 3 zeros (so that the table starts 16-byte aligned), the map, then
        the table.

        Built on the host from ``starts`` and ``lengths`` (no device sync) and copied to the device once
        per (chunk, seg) and call (the backward reuses the forward's), map and table in one copy; every
        value is at most T, so int32 holds it.
        """
        key = (chunk, seg)
        if key not in self._tables:
            chunks, segments = self._chunk_counts(chunk), self.segment_counts(chunk, seg)
            rows, first_chunk, first_segment = [], 0, 0
            for start, c, sc in zip(self.starts + (self.total,), chunks + [0], segments + [0], strict=True):
                rows.extend([start, first_chunk, first_segment])
                first_chunk += c
                first_segment += sc
            owners = self.owners(chunk, seg)
            lead = -len(owners) % 4  # zeros before the map: the table starts 16-byte aligned
            flat = torch.tensor([0] * lead + owners[::-1] + rows, dtype=torch.int32).to(self.cu.device)
            self._tables[key] = flat[lead + len(owners) :].view(self.count + 1, 3)
        return self._tables[key]

    def owners(self, chunk: int, seg: int) -> list[int]:
        """For each segment of ``seg`` chunks in the flat numbering, in order, the sequence it belongs to
        (the map that precedes ``table``; its length is ``segments(chunk, seg)``)."""
        return [i for i, sc in enumerate(self.segment_counts(chunk, seg)) for _ in range(sc)]

    def row_ends(self, device: torch.device) -> torch.Tensor:
        """For each row of the packed batch, the end of its sequence (one past its last row): int64 (T,)."""
        ends = [start + n for start, n in zip(self.starts, self.lengths, strict=True)]
        return torch.tensor(ends).repeat_interleave(torch.tensor(self.lengths)).to(device)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_cu_seqlens(cu_seqlens: object, shape: Shape, device: torch.device) -> Seqs | None:
    """The sequences of a packed batch, or None when ``cu_seqlens`` is None.

    ``cu_seqlens`` must be a 1-D torch.int32 tensor of N + 1 >= 2 entries on ``device`` (the device of q),
    non-decreasing, from 0 to T = ``shape.length``, and the batch must be packed into ``shape.batch == 1``.
    Sequences of length 0 are allowed. Refusals (TypeError for the type and dtype, ValueError otherwise)
    name ``cu_seqlens`` and what was expected, and come before any kernel runs.

    The values are read with exactly one device-to-host transfer (one ``tolist()``), which serves every
    check and the returned ``Seqs``; on a CUDA device that is one synchronization per call.
    """
    if cu_seqlens is None:
        return None
    _check_cu_seqlens_layout(cu_seqlens, shape, device)
    cu = cu_seqlens.tolist()  # the one device-to-host transfer
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {cu[0]}")
    for i in range(len(cu) - 1):
        if cu[i + 1] < cu[i]:
            raise ValueError(
                f"cu_seqlens must be non-decreasing, got cu_seqlens[{i + 1}] = {cu[i + 1]} < cu_seqlens[{i}] = {cu[i]}"
            )
    if cu[-1] != shape.length:
        raise ValueError(
            f"cu_seqlens must end at T = {shape.length} (the length of dim 1 of q), got cu_seqlens[-1] = {cu[-1]}"
        )
    lengths = tuple(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
    return Seqs(cu_seqlens.contiguous(), tuple(cu[:-1]), lengths)


def _check_cu_seqlens_layout(cu_seqlens: object, shape: Shape, device: torch.device) -> None:
    """What can be checked of ``cu_seqlens`` without reading its values: type, dtype, shape, device, batch."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(
            f"cu_seqlens must be a torch.int32 tensor (as in flash-attn), got dtype {cu_seqlens.dtype}; "
            "convert it with .to(torch.int32)"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            "cu_seqlens must be a 1-D tensor of N + 1 >= 2 offsets [0, ..., T] for N sequences, "
            f"got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on the device of q ({device}), got {cu_seqlens.device}")
    if shape.batch != 1:
        raise ValueError(
            "with cu_seqlens, q, k and v must be packed into one batch, (1, T, H, D) with T the total length, "
            f"got batch size {shape.batch}"
        )


@dataclass(frozen=True)
class SeqCount:
    """A packed batch known by its number of sequences alone: what a graph traced by torch.compile sees (the
    offsets are data; the compile custom op reads and checks them where they are concrete)."""

    count: int


def packed(cu_seqlens: object, shape: Shape, device: torch.device, *, values: bool = True) -> Shape:
    """``shape`` with the packed batch's sequences (``check_cu_seqlens``); ``shape`` itself when None.
    ``values=False`` (inside a torch.compile trace): only what needs no read of the offsets is checked, and
    the sequences are a ``SeqCount``."""
    if cu_seqlens is not None and not values:
        _check_cu_seqlens_layout(cu_seqlens, shape, device)
        return replace(shape, seqs=SeqCount(cu_seqlens.shape[0] - 1))
    seqs = check_cu_seqlens(cu_seqlens, shape, device)
    return shape if seqs is None else replace(shape, seqs=seqs)


def per_sequence(
    run: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    seqs: Seqs,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    pad: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    *,
    state_cols: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A packed batch computed one sequence at a time (the torch and reference forms).

    Calls ``run(q_i, k_i, v_i, gate_i, pad_i, s0_i, output_final_state)`` on each non-empty sequence i:
    q_i, k_i, v_i are its rows of dim 1, gate_i its rows of a (1, T, H) gate (a (H,) gate or None is passed
    as it is), pad_i its columns of a (1, T) padding mask (or None), s0_i = ``initial_state[i:i + 1]`` (or
    None). ``run`` returns y_i (1, L_i, H, Dv), or (y_i, S_i) with S_i (1, H, Dk, Dv') when
    ``output_final_state``. Returns y (1, T, H, Dv), the y_i concatenated along dim 1, and with
    ``output_final_state`` also the final states (N, H, Dk, Dv'), concatenated along dim 0.

    An empty sequence is not run: it adds no rows, and its final state is its initial state (zeros when
    there is none, of the shape and dtype of another sequence's state; when every sequence is empty and
    there is no initial state, zeros (1, H, Dk, ``state_cols``) of the state dtype of q). Everything is
    slices and concatenations, so autograd differentiates it, into ``initial_state`` too.
    """
    if initial_state is not None and initial_state.shape[0] != seqs.count:
        raise ValueError(
            f"initial_state must hold one state per sequence of cu_seqlens, ({seqs.count}, H, Dk, Dv'), "
            f"got {tuple(initial_state.shape)}"
        )
    ys: list[torch.Tensor] = []
    states: list[torch.Tensor | None] = []
    for i, (start, length) in enumerate(zip(seqs.starts, seqs.lengths, strict=True)):
        s0 = None if initial_state is None else initial_state[i : i + 1]
        if length == 0:
            states.append(s0)
            continue
        rows = slice(start, start + length)
        out = run(
            q[:, rows],
            k[:, rows],
            v[:, rows],
            gate[:, rows] if gate is not None and gate.dim() == 3 else gate,
            None if pad is None else pad[:, rows],
            s0,
            output_final_state,
        )
        if output_final_state:
            y, s = out
            states.append(s)
        else:
            y = out
        ys.append(y)
    if ys:
        y = torch.cat(ys, dim=1)
    else:
        y = v.new_zeros((1, 0, v.shape[2], v.shape[3]))
    if not output_final_state:
        return y
    template = next((s for s in states if s is not None), None)
    if template is None:
        if state_cols is None:
            raise ValueError("state_cols (Dv') is needed for the final states when every sequence is empty")
        template = q.new_zeros((1, q.shape[2], q.shape[3], state_cols), dtype=state_dtype(q.dtype))
    return y, torch.cat([template.new_zeros(template.shape) if s is None else s for s in states], dim=0)
