"""Mutation check of the kernel tests: every seeded bug below must fail the kernel tests.

Opt-in (LION_GEN_MUTATION=1; under the interpreter about a minute per killed mutant, several for a
survivor). Each mutant edits a throwaway copy of the repository, never the working tree: a regex
substitution inside the named functions of either every generated module (applied by wrapping
`lion_gen.codegen.render` in the copy, so the committed modules, regenerated in the copy with
`python -m lion_gen`, and those `lion_gen.load` compiles in the tests carry the same bug) or one file of
the copy (the planner, the runtime's Triton tiles). A selection of the copy's kernel tests then runs with
-x and must fail; the first failing test is printed (pytest -s shows it). The patterns follow today's
kernels: after a rewrite, a mutant whose pattern no longer matches fails here as "does not apply", to be
updated, never silently skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    os.environ.get("LION_GEN_MUTATION") != "1", reason="mutation check: opt-in with LION_GEN_MUTATION=1 (slow)"
)

# The kernel tests each mutant runs (with -x): every spec and form at L = 1 and 37 with chunk 16, plus
# the half-precision, strong-gate, eps, reference, module and overflow tests, and the multi-chunk segment
# tests (at these shapes the chunk form's schedule puts one chunk in each segment, so only test_segments
# carries a state across chunks inside a segment). LION_GEN_MUTATION_SELECT replaces the selection (a
# pytest -k expression), e.g. "eps_where" to see whether the eps tests alone kill a mutant.
KERNEL_TESTS = ("tests/test_kernels.py", "tests/test_segments.py")
SELECTION = os.environ.get(
    "LION_GEN_MUTATION_SELECT", "not head_dims and not elu_features and not (match_float64 and (-7- or -130- or -64-))"
)


@dataclass(frozen=True)
class Mutant:
    name: str
    scope: str  # a regex matching whole names of the functions to edit ("" = the whole file)
    pattern: str  # a regex (re.MULTILINE)
    replacement: str
    target: str = "generated"  # every generated module, or a file of the copy (e.g. lion_gen/runtime/tiles.py)


PLANNER, TILES = "lion_gen/planner.py", "lion_gen/runtime/tiles.py"
FWD, BWD, PAR_FWD = r"_\w+_fwd_output", r"_\w+_bwd_grads", r"_\w+_parallel_fwd"
KERNEL = r"_\w+_(fwd_\w+|bwd_\w+|parallel_\w+)"
MUTANTS = [
    # eps dropped from the row normalization
    Mutant("eps_dropped_chunk_fwd", FWD, r"\(den \+ eps\)", "den"),
    Mutant("eps_dropped_parallel_fwd", PAR_FWD, r"\(den \+ eps\)", "den"),
    Mutant("eps_dropped_backward", r"_dy_and_inverse|_output_adjoint\w*", r" \+ eps\)", ")"),
    Mutant("eps_zero_everywhere", "", r"^EPS = .*$", "EPS = 0.0"),
    # F and G potentials swapped
    Mutant("fg_swapped_in_planner", "", r"f_shift, g_shift = 0, 1", "f_shift, g_shift = 1, 0", PLANNER),
    Mutant("fg_swapped_chunk_fwd", FWD, r"_mask\(pl, cl,", "_mask(cl, pl,"),
    Mutant("fg_swapped_reference", "_reference", r"f_shift=0,(\s+)g_shift=1,", r"f_shift=1,\1g_shift=0,"),
    # signs of mask exponents and carried-state decays
    Mutant("mask_sign_lower", "_mask", r"Fa\[:, None\] - Fa\[None, :\]", "Fa[None, :] - Fa[:, None]", TILES),
    Mutant("mask_sign_upper", "_mask", r"Gb\[None, :\] - Gb\[:, None\]", "Gb[:, None] - Gb[None, :]", TILES),
    Mutant("state_decay_sign_chunk_fwd", FWD, r"decay = tl\.exp\(total\)", "decay = tl.exp(-total)"),
    Mutant("segment_decay_sign_scan", r"_\w+_scan", r"tl\.exp\(tl\.load\(t_ptr", "tl.exp(-tl.load(t_ptr"),
    Mutant("tile_decay_sign_parallel_fwd", PAR_FWD, r"\(pl \+ D\)", "(pl - D)"),
    # gate gradient
    Mutant("gate_grad_sign_chunk", r"_\w+_gate_grad|_chunk_backward", r"\* _log_decay_grad", "* -_log_decay_grad"),
    Mutant("gate_grad_sign_parallel", "_parallel_backward", r"\* _log_decay_grad", "* -_log_decay_grad"),
    Mutant("suffix_sum_off_by_one_chunk", r"_\w+_gate_grad", r"- tl\.cumsum\(dG, 0\) \+ dG", "- tl.cumsum(dG, 0)"),
    Mutant("suffix_sum_off_by_one_parallel", "_parallel_backward", r"suffix\(dF, False\)", "suffix(dF, True)"),
    # the ones column of v' (the normalizer)
    Mutant("normalizer_state_dropped_chunk_fwd", FWD, r"^\s*den \+= tl\.sum\(wl \*.*$", ""),
    Mutant("normalizer_column_dropped_bwd", KERNEL, r" \+ dn\[:, None\]$", ""),
    Mutant("normalizer_state_dropped_chunk_bwd", BWD, r" \+ dn\[:, None\] \* zl\[None, :\]", ""),
    # feature map, scale, diagonal and causality, chunk boundaries, padding rows, float16 states
    Mutant("l2_adjoint_dropped", "_feature_backward", r"\(-dot\*phi \+ g\)/norm", "g/norm"),
    Mutant("feature_grad_dropped", "_feature_backward", r"return _feature_grad\(x\) \* g", "return g"),
    Mutant("scale_dropped_chunk_fwd", FWD, r"Q = Q \* scale", "Q = Q"),
    Mutant("causal_diagonal_dropped", "_mask", r"above = o\[:, None\] < o", "above = o[:, None] <= o", TILES),
    Mutant("causal_future_leaks", "_mask", r"m = tl\.where\(above, 0\.0, m\)", "m = m", TILES),
    Mutant("key_weight_shifted_chunk_fwd", FWD, r"Kl = K \* tl\.exp\(total - pl\)", "Kl = K * tl.exp(total - cl)"),
    Mutant("row_mask_off_by_one", "_load_features", r"rows\[:, None\] < L", "rows[:, None] <= L"),
    Mutant(
        "state_dots_row_operand_in_one_bf16_part",
        "_sdot",
        r"tl\.dot\(ahi, hi\) \+ tl\.dot\(alo, hi\) \+ tl\.dot\(ahi, lo\)",
        "tl.dot(a.to(tl.bfloat16), hi) + tl.dot(a.to(tl.bfloat16), lo)",
        TILES,
    ),
    Mutant(
        "state_dots_in_float16",
        "_sdot",
        r"tl\.dot\(ahi, hi\) \+ tl\.dot\(alo, hi\) \+ tl\.dot\(ahi, lo\)",
        "tl.dot(a.to(tl.float16), b.to(tl.float16))",
        TILES,
    ),
]

# Scoped substitution, as source: run here on copied files, and appended to the copy's lion_gen/codegen.py
# (below) to edit every module it renders.
MUTATE = r"""
def _mutate(text, scope, pattern, replacement):
    import re

    if not scope:
        return re.subn(pattern, replacement, text, flags=re.MULTILINE)
    out, pos, count = [], 0, 0
    for start in re.finditer(r"^def (\w+)\(", text, flags=re.MULTILINE):
        if start.start() < pos or not re.fullmatch(scope, start.group(1)):
            continue
        end = re.compile(r"\n(?=@|def |class )").search(text, start.end())
        end = end.start() if end else len(text)
        body, n = re.subn(pattern, replacement, text[start.start() : end], flags=re.MULTILINE)
        out += [text[pos : start.start()], body]
        pos, count = end, count + n
    return "".join(out) + text[pos:], count
"""
RENDER = """

_render_unmutated = render


def render(*args, **kwargs):
    return _mutate(_render_unmutated(*args, **kwargs), *MUTATION)[0]
"""


def mutate(text: str, mutant: Mutant) -> tuple[str, int]:
    namespace: dict = {}
    exec(MUTATE, namespace)
    return namespace["_mutate"](text, mutant.scope, mutant.pattern, mutant.replacement)


def subprocess_env(copy: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.update(LION_GEN_CACHE=str(copy / ".lion_gen_cache"), PYTHONDONTWRITEBYTECODE="1")
    return env


def make_copy(dst: Path) -> Path:
    dst.mkdir(parents=True)
    for part in ("lion_gen", "templates", "specs", "generated", "tests"):
        shutil.copytree(ROOT / part, dst / part, ignore=shutil.ignore_patterns("__pycache__", "test_mutants.py"))
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def regenerate(copy: Path) -> dict[str, str]:
    specs = sorted(str(p.relative_to(copy)) for p in (copy / "specs").glob("*.yaml"))
    out = copy / "generated"
    cmd = [sys.executable, "-m", "lion_gen", *specs, "--out", str(out)]
    run = subprocess.run(cmd, cwd=copy, env=subprocess_env(copy), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"regeneration failed:\n{run.stdout}\n{run.stderr}"
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(out.glob("*.py"))}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the repository whose generated/ is what its generator produces (else the check is moot)."""
    copy = make_copy(tmp_path_factory.mktemp("pristine") / "repo")
    committed = {p.name: p.read_text(encoding="utf-8") for p in sorted((copy / "generated").glob("*.py"))}
    fresh = regenerate(copy)
    stale = sorted(name for name in fresh if fresh[name] != committed.get(name))
    assert not stale, f"generated/ differs from what the generator produces now: {stale}; regenerate first"
    return copy, fresh


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_is_killed(mutant: Mutant, pristine, tmp_path):
    base, clean = pristine
    copy = tmp_path / "repo"
    shutil.copytree(base, copy, ignore=shutil.ignore_patterns(".lion_gen_cache", "__pycache__"))
    if mutant.target == "generated":
        codegen = copy / "lion_gen" / "codegen.py"
        assert re.search(r"^def render\(", codegen.read_text(encoding="utf-8"), re.MULTILINE), "no codegen.render"
        args = (mutant.scope, mutant.pattern, mutant.replacement)
        with codegen.open("a", encoding="utf-8") as fh:
            fh.write(f"\n\n# ---- mutation check (tests/test_mutants.py); a throwaway copy\nMUTATION = {args!r}\n")
            fh.write(MUTATE + RENDER)
    else:
        path = copy / mutant.target
        text, n = mutate(path.read_text(encoding="utf-8"), mutant)
        assert n, (
            f"{mutant.name} does not apply: {mutant.pattern!r} not in {mutant.scope or 'the file'} of {mutant.target}"
        )
        path.write_text(text, encoding="utf-8")
    mutated = regenerate(copy)
    changed = [name for name in mutated if mutated[name] != clean[name]]
    assert changed or mutant.target != "generated", f"{mutant.name} does not apply: no generated module changed"
    tests = [path for path in KERNEL_TESTS if (copy / path).is_file()]
    cmd = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-rf", "-p", "no:cacheprovider"]
    run = subprocess.run(
        [*cmd, "-k", SELECTION], cwd=copy, env=subprocess_env(copy), capture_output=True, text=True, timeout=1800
    )
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAILED ")]
    where = ", ".join(changed) or mutant.target
    print(f"\n{mutant.name} (changes {where}): rc {run.returncode}; {failed[:1]}", flush=True)
    assert run.returncode != 0, f"{mutant.name} survived {SELECTION!r} (changes {where})"
    assert run.returncode == 1 and failed, f"{mutant.name}: pytest did not run cleanly:\n{run.stdout[-3000:]}"
