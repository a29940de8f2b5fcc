"""The cost report (benchmarks/cost.py): traffic counted under the interpreter, and its parsers.

The sm_90a compile figures are checked in tests/test_compile.py, which compiles every kernel anyway.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpreterBuilder

from benchmarks import cost

interpreted = pytest.mark.skipif(not cost._interpreting(), reason="counts need the Triton interpreter")


@triton.jit
def _masked_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)  # n lanes of 4 bytes in all, not 2 * BLOCK
    tl.store(y_ptr + offs, 2.0 * x, mask=m)
    s = tl.load(x_ptr)  # one unmasked lane per program
    tl.atomic_add(y_ptr + n, s)  # reads and writes one lane per program
    tl.atomic_add(y_ptr + offs, x, mask=offs < 0)  # no active lane: nothing
    acc = tl.dot(tl.zeros([16, 32], tl.float16), tl.zeros([32, 16], tl.float16))  # 2 * 16 * 16 * 32 FLOPs
    tl.store(y_ptr + n + 1 + tl.arange(0, 16), tl.sum(acc, 0), mask=tl.arange(0, 16) < 3)  # 3 lanes


@interpreted
def test_masked_lanes_are_not_counted_and_every_kind_of_access_is():
    n, block, programs = 100, 64, 2
    x = torch.randn(n)
    y = torch.zeros(n + 1 + 16)
    rec = cost.Launch("forward", "_masked_kernel", __name__, [programs], [], {})
    original = InterpreterBuilder.create_masked_load
    with cost.TrafficCounter() as counter, counter.attribute(rec, _masked_kernel, (x, y, n), {"BLOCK": block}):
        _masked_kernel[(programs,)](x, y, n, BLOCK=block)
    assert InterpreterBuilder.create_masked_load is original  # the builder is restored
    assert torch.equal(y[:n], 2 * x)  # the kernel ran
    assert rec.read == 4 * (n + programs + programs)  # masked load, scalar loads, atomic reads
    assert rec.written == 4 * (n + programs + programs * 3)  # masked store, atomic writes, 3-lane stores
    assert rec.flops == programs * 2 * 16 * 16 * 32
    assert rec.by_arg == {"x_ptr": [4 * (n + programs), 0], "y_ptr": [4 * programs, rec.written]}


@interpreted
def test_lion_s_counts_are_per_head_and_batch_and_cover_the_tensors():
    shape = dict(L=130, D=32, chunk=32)  # L not a multiple of the chunk: masked tails
    c = cost.Config("lion_s", 2, shape["L"], 2, shape["D"], "bf16", shape["chunk"], "chunk")
    counts = cost.count_traffic(c, count_batch=1, count_heads=1)
    scaled, counted = counts.launches, counts.counted
    assert counts.dtype == torch.bfloat16 and not counts.note and (counts.batch, counts.heads) == (1, 1)
    direct = cost.capture("lion_s", 2, shape["L"], 2, shape["D"], torch.bfloat16, shape["chunk"], count=True)
    assert [(r.phase, r.kernel, r.grid) for r in scaled] == [(r.phase, r.kernel, r.grid) for r in direct]
    for s, d, one in zip(scaled, direct, counted, strict=True):
        # exactly linear in B * H: the per-(b, h) counts scaled by 4 are the counts of the (2, 2) run
        assert (
            (s.read, s.written, s.flops)
            == (d.read, d.written, d.flops)
            == (4 * one.read, 4 * one.written, 4 * one.flops)
        )
        assert "(other)" not in d.by_arg, f"{d.kernel}: traffic outside its tensor arguments"
        assert sum(r for r, _ in d.by_arg.values()) == d.read and sum(w for _, w in d.by_arg.values()) == d.written

    X = 2 * shape["L"] * 2 * shape["D"] * 2
    phases = {p: [r for r in direct if r.phase == p] for p in ("forward", "backward")}
    assert phases["forward"] and phases["backward"]
    fwd_read, fwd_written = (sum(getattr(r, a) for r in phases["forward"]) for a in ("read", "written"))
    bwd_read, bwd_written = (sum(getattr(r, a) for r in phases["backward"]) for a in ("read", "written"))
    assert fwd_read >= 3 * X and fwd_written >= X  # q, k, v read and y written at least once
    assert bwd_read >= 4 * X and bwd_written >= 3 * X  # q, k, v, dO read; dq, dk, dv written
    assert all(sum(r.flops for r in rs) > 0 for rs in phases.values())

    summary = cost.traffic_summary(c, "selective", direct)
    assert summary["X_bytes"] == X
    assert summary["forward"]["total_X"] * X == pytest.approx(fwd_read + fwd_written)
    assert summary["total_X"] * X == pytest.approx(fwd_read + fwd_written + bwd_read + bwd_written)
    assert summary["floor_total_X"] == pytest.approx(8 + 2 * 4 / (2 * shape["D"]))  # 8X and the fp32 gate twice
    assert summary["total_over_floor"] >= 1


def test_dry_run_records_the_launch_arguments_of_the_anchor_shape():
    forms = cost.capture_kernel_forms("lion_s", 8, 4096, 12, 64, torch.bfloat16, 64)
    assert "chunk" in forms and "parallel" in forms
    for launches in forms.values():
        assert {r.phase for r in launches} == {"forward", "backward"}
        for r in launches:
            assert r.programs >= 1 and all(isinstance(g, int) for g in r.grid)
            tensors = [a for a in r.args if isinstance(a, dict)]
            assert tensors and all(t["tensor"] in ("bfloat16", "float32") for t in tensors)
            json.dumps(r.args)  # serializable for the compile subprocess
    t = cost.decode_arg({"tensor": "bfloat16", "shape": [2, 3], "stride": [3, 1], "offset": 5})
    assert t.dtype == torch.bfloat16 and t.shape == (2, 3) and t.data_ptr() == 10  # offset in bytes: misaligned


PTXAS_LOG = """\
ptxas-blackwell info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to \
insufficient register resources for the function '_k'
ptxas-blackwell info    : 28 bytes gmem
ptxas-blackwell info    : Compiling entry function '_k' for 'sm_90a'
ptxas-blackwell info    : Function properties for _k
    3240 bytes stack frame, 6552 bytes spill stores, 6696 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers, 3240 bytes cumulative stack size
"""


def test_ptxas_log_and_ptx_parsers():
    got = cost.parse_ptxas_log(PTXAS_LOG)
    assert (got["registers"], got["spill_stores"], got["spill_loads"], got["stack"]) == (255, 6552, 6696, 3240)
    assert len(got["ptxas_warnings"]) == 1 and got["ptxas_warnings"][0].startswith("(C7512)")
    assert cost.parse_ptxas_log("")["registers"] is None
    ptx = """
        wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, p, 1, 1, 0, 1;
        wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%r1}, %rd1, %rd2, p, 1, 1;
        @%p1 mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f2};
        wgmma.fence.sync.aligned;
    """
    assert cost.mma_instructions(ptx) == {"wgmma.bf16": 1, "wgmma.tf32": 1, "mma.tf32": 1}


def test_report_command_writes_json(tmp_path, capsys):
    assert cost.main(["lion_s", "--L", "4096", "--no-count", "--no-compile", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cost_lion_s_chunk_bf16_D64_C64.json").read_text())
    assert data["kind"] == "counts, not timings" and data["runs"][0]["config"]["B"] == 8
    launches = data["runs"][0]["launches"]
    assert launches and all(r["programs"] >= 1 and r["args"] for r in launches)
    assert "COUNTS, NOT TIMINGS" in capsys.readouterr().out


def test_torch_ops_outside_kernels_are_estimated_and_views_are_free():
    ops: list[cost.TorchOp] = []
    a = torch.empty(10, device="meta")
    with cost._TorchOps(["forward"], ops, "meta"):
        a.new_empty(10)  # an allocation: nothing
        torch.ones(3) * 2  # on another device: not the op's
        b = a + 1  # reads a, writes b
        a.add_(b)  # reads a and b, writes a
        a.view(2, 5).zero_()  # a view: nothing; zero_ writes only
    assert [(o.op, o.read, o.written) for o in ops] == [
        ("torch add", 40, 40),
        ("torch add_", 80, 40),
        ("torch zero_", 0, 40),
    ]


def test_packed_refuses_flags_it_would_ignore(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cost.main(["lion_s", "--packed", "5,3", "--no-count", "--out", str(tmp_path)])
    assert "--no-count" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_ptxas_release_names_a_version():
    assert re.fullmatch(r"\d+\.\d+", cost.ptxas_release())  # Triton's bundled ptxas for sm_90
