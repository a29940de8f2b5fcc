"""The benchmark harness on the CPU (--smoke): it checks before it times, and refuses wrong ops."""

from __future__ import annotations

import json

import torch

from benchmarks import bench


def test_smoke_run_writes_checked_rows(tmp_path, capsys):
    assert bench.main(["--smoke", "--specs", "lion_s", "--lengths", "20", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert {"lion_s:chunk", "lion_s:parallel", "lion_s:reference", "sdpa (softmax)"} <= set(rows)
    for name in ("lion_s:chunk", "lion_s:parallel"):
        assert rows[name]["error"] < 1e-4 and rows[name]["fwd_ms"] > 0 and rows[name]["fwdbwd_ms"] > 0
    assert data["env"]["commit"] and data["env"]["date"]
    assert "lion_s:chunk" in capsys.readouterr().out


def test_a_wrong_op_is_reported_and_not_timed():
    import generated.lion_s as mod

    def wrong(q, k, v, g):  # right shape, wrong function
        return 1.01 * mod.lion_s(q, k, v, g, form="reference")

    ref = lambda q, k, v, g: mod.lion_s(q, k, v, g, form="reference")  # noqa: E731
    row = bench.run_case("wrong", wrong, "lion_s", "selective", 1, 20, 2, 16, torch.float32, "cpu", 1, 1.0, True, ref)
    assert row.note.startswith("WRONG") and row.fwd_ms is None and row.fwdbwd_ms is None


def test_floor_bytes_match_the_anchor_floor():
    """32768 tokens, H = 12, D = 64, bf16 at 3.02 TB/s: 0.134 ms forward+backward, 0.067 ms forward."""
    fwd, total = bench.hbm_bytes("selective", 8, 4096, 12, 64, torch.bfloat16)
    assert round(total / 3.02e12 * 1e3, 3) == 0.134 and round(fwd / 3.02e12 * 1e3, 3) == 0.067
