"""The sequence-parallel chunk form: segments of several chunks, against the float64 oracle.

Small test shapes make the launch schedule pick one chunk per segment; these tests force longer
segments (``segment_chunks`` is what the generated module calls to choose), so that segments hold
several chunks, the last segment and the last chunk are partial, and sequences shorter than one
segment occur.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_kernels import SPECS, compare, make_inputs, module

from lion_gen.planner import plan
from lion_gen.runtime import schedule
from lion_gen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "L,chunk,seg",
    [
        (37, 16, 2),  # 3 chunks: a full segment, then a partial one with a partial chunk
        (130, 16, 4),  # 9 chunks in 3 segments, the last with one partial chunk
        (50, 16, 8),  # shorter than one segment
        (130, 16, 3),  # segments of an odd number of chunks (9 chunks: 3 + 3 + 3, the last one partial)
    ],
)
@pytest.mark.parametrize("name", SPECS)
def test_multi_chunk_segments_match_float64(name, L, chunk, seg, device, monkeypatch):
    monkeypatch.setattr(module(name), "segment_chunks", lambda bh, n, dev: seg)
    compare(name, 2, L, 2, 32, 16, chunk, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["lion_lit", "lion_d", "lion_s", "lion_s_causal"])
def test_half_precision_segments(name, dtype, device, monkeypatch):
    """16-bit runs: the state dots take bf16 operands (split in two for float16), states carried across segments."""
    monkeypatch.setattr(module(name), "segment_chunks", lambda bh, n, dev: 2)
    compare(name, 1, 77, 2, 32, 32, 16, device, dtype=dtype)


def test_segment_length_fills_an_h100_at_the_anchor_shape():
    """32768 tokens, H = 12, chunk 64: every stage-1 and stage-3 launch has at least 4 programs per SM."""
    cpu = torch.device("cpu")
    for L in (256, 1024, 4096, 16384):
        bh = (32768 // L) * 12
        n = L // 64
        seg = schedule.segment_chunks(bh, n, cpu)
        programs = bh * -(-n // seg)
        assert programs >= 4 * schedule.H100_SMS, (L, seg, programs)
        assert seg <= schedule.MAX_SEGMENT_CHUNKS
        # no fewer segments would do: one fewer drops below 4 programs per SM
        assert bh * (-(-n // seg) - 1) < 4 * schedule.H100_SMS, (L, seg)


def test_segment_length_is_one_chunk_when_the_grid_is_small():
    assert schedule.segment_chunks(4, 9, torch.device("cpu")) == 1
    assert schedule.segment_chunks(1, 1, torch.device("cpu")) == 1
    assert schedule.segment_chunks(10**6, 3, torch.device("cpu")) == 3  # never beyond the sequence
    assert schedule.segment_chunks(10**6, 40, torch.device("cpu")) == 14  # at most 16, evened out: 14 + 14 + 12


def test_segment_lengths_are_evened_out():
    """The chosen number of segments, with lengths as even as it allows (the last never much shorter)."""
    cpu = torch.device("cpu")
    for bh in (1, 7, 24, 96, 384, 1536):
        for n in (1, 2, 5, 16, 63, 64, 65, 256, 1000):
            seg = schedule.segment_chunks(bh, n, cpu)
            segments = -(-n // seg)
            assert 1 <= seg <= min(n, schedule.MAX_SEGMENT_CHUNKS)
            assert seg == -(-n // segments), (bh, n, seg)
            assert n - (segments - 1) * seg >= 1


@pytest.mark.parametrize("name", SPECS)
def test_launches_follow_the_plans_stage_graph(name, device, monkeypatch):
    """The wrapper launches exactly the stages of the plan's graph, in its topological order."""
    mod = module(name)
    p = plan(load_spec(ROOT / "specs" / f"{name}.yaml"))
    seen = []
    real = mod.launch

    def spy(kernel, grid, *args, **kwargs):
        seen.append(kernel.__name__)
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(mod, "launch", spy)
    q, k, v, gate = make_inputs(mod, 1, 20, 2, 16, 16, device)
    ins = [t.requires_grad_() for t in (q, k, v, gate) if t is not None]
    getattr(mod, name)(*ins[:3], ins[3] if gate is not None else None, form="chunk", chunk_size=16).sum().backward()
    assert seen == [f"_{name}_{p.stages.nodes[n]['function']}" for n in p.launch_order()]
