"""The demo runs (its CI path: two epochs on a subset) and reports both models and a PNG of the curves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_demo_runs(tmp_path):
    out = tmp_path / "curves.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout.replace("\r", "\n")
    for name in ("LION-S", "softmax"):
        m = re.search(rf"{name}\s+test accuracy (\d+\.\d)%", text)
        assert m and 0.0 <= float(m.group(1)) <= 100.0, text[-2000:]
    for name in ("lion_s", "lion_d"):
        m = re.search(rf"{name}: form \w+ vs reference \(float64\), relative RMS error (\S+)", text)
        assert m and float(m.group(1)) < 1e-5, text[:2000]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
