"""What a generated module imports at run time: torch, Triton and lion_gen.runtime, never the compiler's
dependencies (SymPy, Jinja2, networkx, PyYAML). Each check runs in a fresh interpreter, since this test
process has imported all of them already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = sorted(p.stem for p in (ROOT / "generated").glob("*.py") if p.stem != "__init__")
COMPILER_ONLY = ("sympy", "jinja2", "networkx", "yaml")

# Prints, as JSON, the compiler-only packages (and their submodules) that the imports above it loaded.
_REPORT = f"""
import json, sys
roots = {COMPILER_ONLY!r}
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules if m.split('.')[0] in roots}})))
"""


def _loaded_after(code: str) -> list[str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code + _REPORT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_runtime_loads_no_compiler_dependency():
    code = "import lion_gen.runtime\nassert 'lion_gen.runtime.launch' in sys.modules\n"
    assert _loaded_after("import sys\n" + code) == []


def test_importing_and_calling_generated_modules_loads_no_compiler_dependency():
    imports = "".join(f"import generated.{name}\n" for name in GENERATED)
    # one small call through the chunk form and one through the reference form
    call = (
        "import torch\n"
        "q, k, v = (torch.randn(1, 16, 1, 16) for _ in range(3))\n"
        "gate = torch.randn(1, 16, 1)\n"
        "generated.lion_s.lion_s(q, k, v, gate, form='chunk', chunk_size=16)\n"
        "generated.lion_s.lion_s(q, k, v, gate, form='reference')\n"
    )
    assert "lion_s" in GENERATED
    assert _loaded_after(imports + call) == []


def test_the_check_sees_a_compiler_dependency_when_one_is_loaded():
    """The report is not blind: after importing each of them, each is seen."""
    imports = "".join(f"import {m}\n" for m in COMPILER_ONLY)
    assert _loaded_after("import lion_gen.runtime\n" + imports) == sorted(COMPILER_ONLY)
