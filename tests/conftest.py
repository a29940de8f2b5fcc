"""Test setup: run kernels under the Triton interpreter unless a GPU is present, and poison allocations.

Every ``torch.empty``/``torch.empty_like`` of a floating dtype made during a test is filled with NaN,
so a kernel that leaves any output element unwritten fails its comparison.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `generated` is importable from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.fixture(autouse=True)
def nan_poison(monkeypatch: pytest.MonkeyPatch) -> None:
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(scope="session")
def eps_modules(tmp_path_factory):
    """The specs of tests/test_kernels.py's EPS_SPECS (eps comparable to the row sums), loaded once."""
    from test_kernels import EPS_SPECS

    import lion_gen

    root = tmp_path_factory.mktemp("eps_specs")
    mods = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LION_GEN_CACHE", str(root / "cache"))
        for name, text in EPS_SPECS.items():
            (root / f"{name}.yaml").write_text(text, encoding="utf-8")
            mods[name] = lion_gen.load(root / f"{name}.yaml")
    assert all(mods[name].SPEC["eps"] >= 0.5 for name in EPS_SPECS)
    return mods
