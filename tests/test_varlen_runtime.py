"""lion_gen.runtime.varlen: the checks of cu_seqlens, the kernels' sequence table, and the per-sequence loop."""

from __future__ import annotations

import pytest
import torch

from lion_gen.runtime import Seqs, check_cu_seqlens, per_sequence
from lion_gen.runtime.checks import Shape

CPU = torch.device("cpu")


def cu(*values: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def shape(length: int, batch: int = 1) -> Shape:
    return Shape(batch, length, 2, 4, 3)


def seqs_of(lengths: list[int]) -> Seqs:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    out = check_cu_seqlens(cu(*offsets), shape(offsets[-1]), CPU)
    assert out is not None
    return out


# ---------------------------------------------------------------------------------------------- the checks


def test_none_is_none():
    assert check_cu_seqlens(None, shape(5), CPU) is None


@pytest.mark.parametrize(
    "value,length,batch,device,exc,match",
    [
        ([0, 2, 5], 5, 1, CPU, TypeError, r"cu_seqlens must be a torch\.Tensor or None, got list"),
        (cu(0, 2, 5, dtype=torch.int64), 5, 1, CPU, TypeError, r"cu_seqlens must be a torch\.int32 .*torch\.int64"),
        (cu(0, 2, 5, dtype=torch.int64), 5, 1, CPU, TypeError, r"flash-attn.*\.to\(torch\.int32\)"),
        (torch.tensor([0.0, 5.0]), 5, 1, CPU, TypeError, r"cu_seqlens.*int32.*torch\.float32"),
        (cu(0, 2, 5).view(1, 3), 5, 1, CPU, ValueError, r"cu_seqlens must be a 1-D .*got shape \(1, 3\)"),
        (cu(0), 0, 1, CPU, ValueError, r"cu_seqlens must be a 1-D tensor of N \+ 1 >= 2 .*got shape \(1,\)"),
        (cu(0, 2, 5), 5, 1, torch.device("meta"), ValueError, r"cu_seqlens must be on the device of q \(meta\)"),
        (cu(0, 2, 5), 5, 2, CPU, ValueError, r"cu_seqlens.*\(1, T, H, D\).*got batch size 2"),
        (cu(1, 2, 5), 5, 1, CPU, ValueError, r"cu_seqlens must start at 0, got cu_seqlens\[0\] = 1"),
        (
            cu(0, 2, 4, 3, 5),
            5,
            1,
            CPU,
            ValueError,
            r"cu_seqlens must be non-decreasing, got cu_seqlens\[3\] = 3 < cu_seqlens\[2\] = 4",
        ),
        (cu(0, 2, 4), 5, 1, CPU, ValueError, r"cu_seqlens must end at T = 5 .*got cu_seqlens\[-1\] = 4"),
        (cu(0, 2, 6), 5, 1, CPU, ValueError, r"cu_seqlens must end at T = 5 .*got cu_seqlens\[-1\] = 6"),
    ],
)
def test_bad_cu_seqlens_is_refused(value, length, batch, device, exc, match):
    with pytest.raises(exc, match=match):
        check_cu_seqlens(value, shape(length, batch), device)


def test_valid_cu_seqlens_with_empty_and_one_row_sequences():
    t = cu(0, 0, 1, 4, 4, 9)
    seqs = check_cu_seqlens(t, shape(9), CPU)
    assert isinstance(seqs, Seqs)
    assert seqs.starts == (0, 0, 1, 4, 4)
    assert seqs.lengths == (0, 1, 3, 0, 5)
    assert (seqs.count, seqs.total, seqs.max_length) == (5, 9, 5)
    assert seqs.cu.dtype == torch.int32 and seqs.cu.is_contiguous() and seqs.cu.tolist() == t.tolist()
    # a strided view is accepted and comes back contiguous
    strided = cu(0, 9, 0, 9)[::2]
    assert not strided.is_contiguous()
    seqs = check_cu_seqlens(strided, shape(0), CPU)
    assert seqs.cu.is_contiguous() and seqs.lengths == (0,) and seqs.max_length == 0


HOST_TRANSFERS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__", "to"}


class _Recording(torch.Tensor):
    """A tensor that records the names of the torch functions and methods called on it."""

    calls: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_one_device_to_host_transfer():
    t = cu(0, 3, 3, 7, 8).as_subclass(_Recording)
    _Recording.calls = []
    seqs = check_cu_seqlens(t, shape(8), CPU)
    transfers = [name for name in _Recording.calls if name in HOST_TRANSFERS]
    assert transfers == ["tolist"], _Recording.calls
    # nothing the kernels and torch forms need afterwards reads the tensor again
    _Recording.calls = []
    assert (seqs.count, seqs.total, seqs.max_length) == (4, 8, 4)
    assert (seqs.chunks(2), seqs.segments(2, 2)) == (5, 3)
    assert _Recording.calls == []


# ---------------------------------------------------------------------------------------------- the table


def test_table_hand_computed():
    seqs = seqs_of([0, 1, 64, 65, 200])
    table = seqs.table(64, 2)
    # starts 0, 0, 1, 65, 130 (T = 330); chunks 0, 1, 1, 2, 4 (8); segments 0, 1, 1, 1, 2 (5)
    assert table.tolist() == [
        [0, 0, 0],
        [0, 0, 0],
        [1, 1, 1],
        [65, 2, 2],
        [130, 4, 3],
        [330, 8, 5],
    ]
    assert table.dtype == torch.int32 and table.is_contiguous() and table.device == seqs.cu.device
    assert seqs.chunks(64) == 8 and seqs.segments(64, 2) == 5
    flat = table.flatten().tolist()
    b = 3  # a kernel reads row b and row b + 1 at flat offsets 3b .. 3b + 5
    assert flat[3 * b : 3 * b + 6] == [65, 2, 2, 130, 4, 3]
    # the segment -> sequence map precedes the table in its storage, backwards: segment g at offset -1 - g
    assert seqs.owners(64, 2) == [1, 2, 3, 4, 4]
    assert before_table(table, 5) == [1, 2, 3, 4, 4]
    assert table.storage_offset() % 4 == 0  # 16-byte aligned
    assert seqs.table(64, 2) is table  # built and copied once per (chunk, seg)


def before_table(table: torch.Tensor, count: int) -> list[int]:
    """The ``count`` int32 right before ``table`` in its storage, read as a kernel reads them (offset -1 - g)."""
    storage = torch.empty(0, dtype=table.dtype).set_(table.untyped_storage())
    start = table.storage_offset()
    assert start >= count
    return [int(storage[start - 1 - g]) for g in range(count)]


def test_table_other_sizes_match_a_direct_count():
    lengths = [5, 0, 16, 17, 33, 0, 1]
    seqs = seqs_of(lengths)
    for chunk, seg in [(16, 1), (16, 3), (4, 2), (64, 16)]:
        chunks = [(n + chunk - 1) // chunk for n in lengths]
        segments = [(c + seg - 1) // seg for c in chunks]
        table = seqs.table(chunk, seg)
        rows = table.tolist()
        for i in range(len(lengths) + 1):
            assert rows[i] == [sum(lengths[:i]), sum(chunks[:i]), sum(segments[:i])], (chunk, seg, i)
        owners = [i for i, c in enumerate(segments) for _ in range(c)]
        assert seqs.owners(chunk, seg) == owners and before_table(table, len(owners)) == owners, (chunk, seg)
        assert table.storage_offset() % 4 == 0
        assert (seqs.chunks(chunk), seqs.segments(chunk, seg)) == (sum(chunks), sum(segments))


@pytest.mark.parametrize("chunk,seg,name", [(0, 1, "chunk"), (16, 0, "seg"), (16.0, 1, "chunk"), (16, True, "seg")])
def test_table_refuses_bad_sizes(chunk, seg, name):
    with pytest.raises(ValueError, match=rf"{name} must be a positive int"):
        seqs_of([3, 4]).table(chunk, seg)


# ---------------------------------------------------------------------------------------------- per_sequence

H, DK, DV = 2, 3, 2


def toy_run(q, k, v, gate, pad, s0, output_final_state):
    """A toy causal op on one sequence: S_t = S0 + sum_{j <= t} w_j k_j [v_j, 1]^T, y_t = q_t S_t[:, :Dv],
    with w_j = sigmoid(gate_j) for a (1, L, H) gate, w = gate[h] for a (H,) gate, w_j = 0 on pads."""
    length = q.shape[1]
    if gate is None:
        w = q.new_ones(1, length, H)
    elif gate.dim() == 3:
        w = torch.sigmoid(gate)
    else:
        w = gate.expand(1, length, H)
    if pad is not None:
        w = w * pad[..., None]
    vv = torch.cat([v, v.new_ones(1, length, H, 1)], dim=-1)
    kv = torch.einsum("blhk,blhv->blhkv", k * w[..., None], vv).cumsum(dim=1)
    if s0 is not None:
        kv = kv + s0[:, None]
    y = torch.einsum("blhk,blhkv->blhv", q, kv[..., :DV])
    if output_final_state:
        return y, kv[:, -1]
    return y


def loop_reference(lengths, q, k, v, gate, pad, s0):
    """The same op written token by token over the packed rows, the state reset at every boundary."""
    ys, finals, row = [], [], 0
    for i, n in enumerate(lengths):
        s = s0[i].clone() if s0 is not None else q.new_zeros(H, DK, DV + 1)
        for t in range(row, row + n):
            for h in range(H):
                w = 1.0 if gate is None else (torch.sigmoid(gate[0, t, h]) if gate.dim() == 3 else gate[h])
                if pad is not None and not pad[0, t]:
                    w = 0.0
                s = s.clone()
                s[h] = s[h] + w * torch.outer(k[0, t, h], torch.cat([v[0, t, h], v.new_ones(1)]))
            ys.append(torch.einsum("hk,hkv->hv", q[0, t], s[:, :, :DV]))
        finals.append(s)
        row += n
    y = torch.stack(ys)[None] if ys else q.new_zeros(1, 0, H, DV)
    return y, torch.stack(finals)


def packed(total, *, gate_kind="selective", pad=False, n_states=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()

    gate = {"selective": lambda: r(1, total, H), "decay": lambda: r(H), "none": lambda: None}[gate_kind]()
    mask = torch.rand(1, total, generator=g) > 0.3 if pad else None
    s0 = r(n_states, H, DK, DV + 1) if n_states is not None else None
    return r(1, total, H, DK), r(1, total, H, DK), r(1, total, H, DV), gate, mask, s0


@pytest.mark.parametrize("gate_kind", ["selective", "decay", "none"])
@pytest.mark.parametrize("with_s0", [False, True])
def test_per_sequence_matches_a_token_loop_with_gradients(gate_kind, with_s0):
    lengths = [3, 0, 1, 5, 0, 4]
    seqs = seqs_of(lengths)
    q, k, v, gate, pad, s0 = packed(seqs.total, gate_kind=gate_kind, pad=True, n_states=6 if with_s0 else None)
    y, final = per_sequence(toy_run, seqs, q, k, v, gate, pad, s0, True, state_cols=DV + 1)
    y_ref, final_ref = loop_reference(lengths, q, k, v, gate, pad, s0)
    assert y.shape == (1, seqs.total, H, DV) and final.shape == (6, H, DK, DV + 1)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, final_ref, rtol=1e-12, atol=1e-12)
    # an empty sequence keeps its initial state, else zeros
    for i in (1, 4):
        assert torch.equal(final[i], s0[i]) if with_s0 else final[i].abs().sum() == 0

    g = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    ws = torch.randn(final.shape, generator=g, dtype=torch.float64)
    inputs = [t for t in (q, k, v, gate, s0) if t is not None]
    got = torch.autograd.grad((y * wy).sum() + (final * ws).sum(), inputs)
    want = torch.autograd.grad((y_ref * wy).sum() + (final_ref * ws).sum(), inputs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if with_s0:  # the state of an empty sequence passes its gradient straight through
        torch.testing.assert_close(got[-1][1], ws[1], rtol=0, atol=0)


def test_per_sequence_without_state_returns_y_only():
    lengths = [4, 0, 2]
    seqs = seqs_of(lengths)
    q, k, v, gate, _, _ = packed(seqs.total)
    y = per_sequence(toy_run, seqs, q, k, v, gate, None, None, False)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, loop_reference(lengths, q, k, v, gate, None, None)[0], rtol=1e-12, atol=1e-12)
    # sequences do not see each other: changing sequence 2 leaves sequence 0 as it was
    v2 = v.detach().clone()
    v2[0, 4:] += 1
    y2 = per_sequence(toy_run, seqs, q, k, v2, gate, None, None, False)
    assert torch.equal(y2[:, :4], y[:, :4]) and not torch.equal(y2[:, 4:], y[:, 4:])


def test_per_sequence_runs_each_nonempty_sequence_once_on_its_slices():
    seqs = seqs_of([2, 0, 3])
    q, k, v, gate, pad, s0 = packed(5, pad=True, n_states=3)
    seen = []

    def run(q_i, k_i, v_i, gate_i, pad_i, s0_i, final):
        seen.append((q_i.shape[1], gate_i.shape, pad_i.shape, s0_i.shape, final))
        return toy_run(q_i, k_i, v_i, gate_i, pad_i, s0_i, final)

    per_sequence(run, seqs, q, k, v, gate, pad, s0, True)
    assert seen == [
        (2, (1, 2, H), (1, 2), (1, H, DK, DV + 1), True),
        (3, (1, 3, H), (1, 3), (1, H, DK, DV + 1), True),
    ]


def test_per_sequence_all_empty():
    seqs = seqs_of([0, 0])
    q, k, v, gate, _, s0 = packed(0, n_states=2)
    y, final = per_sequence(toy_run, seqs, q, k, v, gate, None, None, True, state_cols=DV + 1)
    assert y.shape == (1, 0, H, DV) and y.dtype == v.dtype
    assert final.shape == (2, H, DK, DV + 1) and final.dtype == torch.float64 and final.abs().sum() == 0
    y, final = per_sequence(toy_run, seqs, q, k, v, gate, None, s0, True)
    assert torch.equal(final, s0)
    (grad,) = torch.autograd.grad(final.sum(), s0)
    assert torch.equal(grad, torch.ones_like(s0))
    with pytest.raises(ValueError, match=r"state_cols"):
        per_sequence(toy_run, seqs, q, k, v, gate, None, None, True)
    assert per_sequence(toy_run, seqs, q, k, v, gate, None, None, False).shape == (1, 0, H, DV)


def test_per_sequence_float32_empty_state_dtype():
    seqs = seqs_of([0])
    q = torch.zeros(1, 0, H, DK, dtype=torch.float16)
    v = torch.zeros(1, 0, H, DV, dtype=torch.float16)
    _, final = per_sequence(toy_run, seqs, q, q, v, None, None, None, True, state_cols=DV)
    assert final.dtype == torch.float32 and final.shape == (1, H, DK, DV)


def test_per_sequence_refuses_a_state_per_batch_instead_of_per_sequence():
    seqs = seqs_of([2, 3])
    q, k, v, gate, _, s0 = packed(5, n_states=1)
    with pytest.raises(ValueError, match=r"initial_state must hold one state per sequence .*\(2, H, Dk, Dv'\)"):
        per_sequence(toy_run, seqs, q, k, v, gate, None, s0, True)
