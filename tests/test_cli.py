"""`lion-gen`: generate, --check, explain, exit codes, and atomic writes (CONTRACT.md section 2)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import lion_gen
from lion_gen import codegen
from lion_gen.cli import main
from lion_gen.codegen import generate_source, write_atomic

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
LION_S = ROOT / "specs" / "lion_s.yaml"

BAD_SPEC = "name: bad\nfeature_map:\n  expr: sin(x)\nmask:\n  family: none\n"


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def bad_spec(tmp_path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_SPEC, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A copy of specs/ and a directory generated from it by the CLI (made once, copied per test)."""
    root = tmp_path_factory.mktemp("fresh")
    shutil.copytree(ROOT / "specs", root / "specs")
    specs = sorted(str(p) for p in (root / "specs").glob("*.yaml"))
    assert main([*specs, "--out", str(root / "gen")]) == 0
    (root / "gen" / "__init__.py").write_text("", encoding="utf-8")
    return root


@pytest.fixture
def tree(fresh, tmp_path) -> Path:
    shutil.copytree(fresh, tmp_path / "tree")
    return tmp_path / "tree"


def check(root: Path) -> int:
    return main(["--check", "--specs", str(root / "specs"), "--out", str(root / "gen")])


# ---------------------------------------------------------------------------- generate


def test_generate_writes_the_module(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(LION_S), "--out", str(out)]) == 0
    assert files_in(out) == ["lion_s.py"]
    assert (out / "lion_s.py").read_bytes() == generate_source(LION_S).encode("utf-8")
    assert "lion_s.py" in capsys.readouterr().out


def test_generate_is_byte_identical_when_run_twice(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([str(LION_S), "--out", str(a)]) == 0
    first = (a / "lion_s.py").read_bytes()
    assert main([str(LION_S), "--out", str(a)]) == 0
    assert (a / "lion_s.py").read_bytes() == first
    assert main([str(LION_S), "--out", str(b)]) == 0
    assert (b / "lion_s.py").read_bytes() == first
    assert files_in(a) == ["lion_s.py"]  # no temp files left behind


def test_generate_several_specs(tmp_path):
    out = tmp_path / "out"
    assert main([*map(str, SPECS), "--out", str(out)]) == 0
    assert files_in(out) == [f"{p.stem}.py" for p in SPECS]


def test_generated_source_does_not_depend_on_the_spec_path(tmp_path):
    copy = tmp_path / "elsewhere.yaml"
    shutil.copy(LION_S, copy)
    assert generate_source(copy) == generate_source(LION_S)


def test_default_out_dir_is_generated(tmp_path, monkeypatch):
    shutil.copy(LION_S, tmp_path / "lion_s.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["lion_s.yaml"]) == 0
    assert files_in(tmp_path / "generated") == ["lion_s.py"]


def test_bad_spec_exits_2_names_file_and_field_and_writes_nothing(tmp_path, bad_spec, capsys):
    out = tmp_path / "out"
    assert main([str(bad_spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad_spec) in err
    assert "feature_map.expr" in err
    assert "sin" in err
    assert not out.exists()


def test_good_and_bad_spec_together_write_nothing(tmp_path, bad_spec, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep", encoding="utf-8")
    for argv in ([str(LION_S), str(bad_spec)], [str(bad_spec), str(LION_S)]):
        assert main([*argv, "--out", str(out)]) == 2
        assert files_in(out) == ["keep.txt"]
    assert "feature_map.expr" in capsys.readouterr().err


def test_spec_failing_a_proof_writes_nothing(tmp_path, capsys):
    spec = tmp_path / "neg.yaml"
    spec.write_text("name: neg\nfeature_map: {expr: silu(x)}\nmask: {family: none}\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main([str(LION_S), str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(spec) in err and "feature_map.expr" in err and "cannot prove" in err
    assert not out.exists()


def test_nonexistent_spec_path(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(LION_S), str(tmp_path / "nope.yaml"), "--out", str(out)]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert not out.exists()


def test_a_directory_is_not_a_spec(tmp_path):
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2


def test_no_spec_args(capsys):
    assert main([]) == 2
    assert "no spec files" in capsys.readouterr().err


def test_unknown_option(capsys):
    assert main(["--frobnicate"]) == 2
    assert "--frobnicate" in capsys.readouterr().err


def test_check_with_spec_args(tmp_path, capsys):
    assert main(["--check", str(LION_S), "--out", str(tmp_path)]) == 2
    assert "--check" in capsys.readouterr().err


def test_two_specs_with_the_same_name(tmp_path, capsys):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    shutil.copy(LION_S, a)
    shutil.copy(LION_S, b)
    out = tmp_path / "out"
    assert main([str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lion_s" in err and "name" in err
    assert not out.exists()


def test_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a dir", encoding="utf-8")
    assert main([str(LION_S), "--out", str(out)]) == 2
    assert out.read_text(encoding="utf-8") == "not a dir"
    assert "--out" in capsys.readouterr().err


def unwritable(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Nothing can be created under ``root``: mode 0555, and, for root (whom modes do not stop), os.mkdir and
    os.open(O_CREAT) refuse there as they would for anyone else."""
    if root.exists():
        root.chmod(0o555)
    if os.geteuid() != 0:
        return
    real_open, real_mkdir = os.open, os.mkdir

    def under(path: object) -> bool:
        return Path(os.fsdecode(path)).absolute().is_relative_to(root)

    def denied(path: object) -> PermissionError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    def guarded_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and under(path):
            raise denied(path)
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if under(path):
            raise denied(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def assert_out_refused(argv_out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main([str(LION_S), "--out", str(argv_out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lion-gen: error: --out "), err  # one line, not "internal error"
    assert str(argv_out) in err
    return err


def test_out_under_a_file(tmp_path, capsys):
    parent = tmp_path / "file"
    parent.write_text("not a dir", encoding="utf-8")
    assert "not a directory" in assert_out_refused(parent / "out", capsys)
    assert files_in(tmp_path) == ["file"] and parent.read_text(encoding="utf-8") == "not a dir"


def test_out_in_a_read_only_directory(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep", encoding="utf-8")
    unwritable(monkeypatch, out)
    try:
        assert "cannot create files in it" in assert_out_refused(out, capsys)
        assert files_in(out) == ["keep.txt"]
    finally:
        out.chmod(0o755)


def test_out_whose_parent_cannot_be_created(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    unwritable(monkeypatch, locked)
    try:
        err = assert_out_refused(locked / "missing" / "out", capsys)
        assert f"cannot create the directory {locked / 'missing'}" in err
        assert files_in(locked) == []
    finally:
        locked.chmod(0o755)


def test_out_made_but_not_writable_is_removed_again(tmp_path, monkeypatch, capsys):
    """The directories made for --out are removed when no file can be created in them."""
    real_open = os.open

    def no_files(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(os.fsdecode(path)).is_relative_to(tmp_path / "new"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_files)
    assert "cannot create files in it" in assert_out_refused(tmp_path / "new" / "a" / "out", capsys)
    assert files_in(tmp_path) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("out", ["/proc", "/proc/lion-gen-test/out"])
def test_out_in_proc_for_real(out, capsys):
    """No mock: /proc takes no new files or directories, even from root."""
    assert_out_refused(Path(out), capsys)


# Regression (fixed): a failed proof inside the planner that raises something other than SpecError escapes the CLI as a
# traceback with exit code 1 (the code of a stale --check), not 2. Reproduction:
#   a spec bad.yaml with  feature_map: {expr: "exp(x)"}
#                         mask: {family: selective, log_decay: "1/10 - 1/sqrt(softplus(z))"}
#   python -m lion_gen bad.yaml --out /tmp/o   -> ZeroDivisionError traceback, exit 1
def test_planner_crash_is_a_clean_exit_2(tmp_path):
    spec = tmp_path / "pow.yaml"
    spec.write_text(
        'name: pw\nfeature_map: {expr: "exp(x)"}\nmask: {family: selective, log_decay: "1/10 - 1/sqrt(softplus(z))"}\n',
        encoding="utf-8",
    )
    out = tmp_path / "out"
    assert main([str(spec), "--out", str(out)]) == 2
    assert not out.exists()


def test_version_via_python_m():
    res = subprocess.run(
        [sys.executable, "-m", "lion_gen", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"lion-gen {lion_gen.__version__}"


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "--check" in capsys.readouterr().out


# ---------------------------------------------------------------------------- --check


def test_check_passes_on_a_fresh_directory(tree, capsys):
    assert check(tree) == 0
    assert "ok" in capsys.readouterr().out


def test_check_fails_when_a_file_is_edited(tree, capsys):
    path = tree / "gen" / "lion_s.py"
    path.write_text(path.read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")
    assert check(tree) == 1
    err = capsys.readouterr().err
    assert "lion_s.py" in err and "differs" in err


def test_check_fails_when_a_file_is_missing(tree, capsys):
    (tree / "gen" / "lion_d.py").unlink()
    assert check(tree) == 1
    assert "lion_d.py" in capsys.readouterr().err


def test_check_fails_when_the_out_dir_is_missing(tree):
    shutil.rmtree(tree / "gen")
    assert check(tree) == 1


def test_check_fails_on_an_extra_module(tree, capsys):
    (tree / "gen" / "orphan.py").write_text("x = 1\n", encoding="utf-8")
    assert check(tree) == 1
    assert "orphan.py" in capsys.readouterr().err


def test_check_fails_when_a_spec_changed(tree):
    spec = tree / "specs" / "lion_lit.yaml"
    spec.write_text(spec.read_text(encoding="utf-8").replace("eps: 1.0e-6", "eps: 1.0e-5"), encoding="utf-8")
    assert check(tree) == 1


def test_check_ignores_init_and_non_python_files(tree):
    assert (tree / "gen" / "__init__.py").exists()
    (tree / "gen" / "README.txt").write_text("notes\n", encoding="utf-8")
    assert check(tree) == 0


def test_check_with_a_bad_spec_exits_2(tree, capsys):
    (tree / "specs" / "zz_bad.yaml").write_text(BAD_SPEC, encoding="utf-8")
    assert check(tree) == 2
    assert "zz_bad.yaml" in capsys.readouterr().err


def test_check_with_no_specs_exits_2(tmp_path):
    (tmp_path / "specs").mkdir()
    assert main(["--check", "--specs", str(tmp_path / "specs"), "--out", str(tmp_path / "gen")]) == 2


def test_check_writes_nothing(tree):
    (tree / "gen" / "lion_s.py").unlink()
    before = files_in(tree / "gen")
    assert check(tree) == 1
    assert files_in(tree / "gen") == before


def test_repository_check_passes(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["--check"]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------- explain


def test_explain(capsys):
    assert main(["explain", str(LION_S)]) == 0
    out = capsys.readouterr().out
    assert "equations:" in out
    assert "M_ij" in out and "y_i" in out
    assert "facts:" in out and "proved" in out
    assert "l2 adjoint" in out
    assert "dl/dz" in out
    assert "launch schedule" in out and "_lion_s_gate_grad" in out and "kv_carried_right" in out


def test_explain_of_a_spec_without_a_mask(capsys):
    assert main(["explain", str(ROOT / "specs" / "lion_lit.yaml")]) == 0
    out = capsys.readouterr().out
    assert "kv_carried_left" in out and "kv_carried_right" not in out and "gate_grad" not in out
    assert "dl/dz" not in out


def test_explain_bad_spec(bad_spec, capsys):
    assert main(["explain", str(bad_spec)]) == 2
    err = capsys.readouterr().err
    assert str(bad_spec) in err and "feature_map.expr" in err


def test_explain_nonexistent_spec(tmp_path):
    assert main(["explain", str(tmp_path / "nope.yaml")]) == 2


def test_explain_needs_exactly_one_spec():
    assert main(["explain"]) == 2
    assert main(["explain", str(LION_S), str(LION_S)]) == 2


# ---------------------------------------------------------------------------- atomic writes


def test_write_atomic_leaves_only_the_file(tmp_path):
    path = tmp_path / "m.py"
    write_atomic(path, "old\n")
    write_atomic(path, "new\n")
    assert path.read_text(encoding="utf-8") == "new\n"
    assert files_in(tmp_path) == ["m.py"]


def test_write_atomic_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "m.py"
    write_atomic(path, "x\n")
    assert path.read_text(encoding="utf-8") == "x\n"


def test_write_atomic_writes_lf_line_endings(tmp_path):
    path = tmp_path / "m.py"
    write_atomic(path, "a\nb\n")
    assert path.read_bytes() == b"a\nb\n"


def test_write_atomic_failed_replace_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.py"
    write_atomic(path, "old\n")

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(codegen.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_atomic(path, "new\n")
    monkeypatch.undo()
    assert path.read_text(encoding="utf-8") == "old\n"
    assert files_in(tmp_path) == ["m.py"]


def test_write_atomic_failed_write_keeps_the_old_file(tmp_path):
    """A write that fails halfway (a lone surrogate cannot be encoded) leaves the old file and no temp."""
    path = tmp_path / "m.py"
    write_atomic(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "x" * 100_000 + "\ud800")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert files_in(tmp_path) == ["m.py"]


# Regression (fixed): write_atomic creates its temp file with tempfile.mkstemp, whose mode is 0600, and renames it into
# place without a chmod: every generated module (and the committed generated/*.py after a regeneration)
# is readable by its owner only, whatever the umask, and a 0644 file is replaced by a 0600 one.
# Reproduction (umask 022):
#   python -m lion_gen specs/lion_s.yaml --out /tmp/o && stat -c %a /tmp/o/lion_s.py   -> 600 (expected 644)
def test_write_atomic_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "m.py"
        write_atomic(path, "x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# ---------------------------------------------------------------------------- the issue-9 examples, end to end


def spec_text(expr: str = "exp(x)", extra: str = "", name: str = "t", mask: str = "  family: none\n") -> str:
    return f"name: {name}\nfeature_map:\n  expr: {expr}\nmask:\n{mask}{extra}"


SELECTIVE = "  family: selective\n  log_decay: {}\n"
ISSUE_REFUSALS = {
    "name-range": (spec_text(name="range"), "name", "builtin"),
    "name-dict": (spec_text(name="dict"), "name", "builtin"),
    "name-super": (spec_text(name="super"), "name", "builtin"),
    "name-fullwidth": (spec_text(name="\uff46oo"), "name", "NFKC"),
    "name-ligature": (spec_text(name="\ufb01le"), "name", "NFKC"),
    "name-250": (spec_text(name="a" * 250), "name", "at most 100"),
    "exp100": (spec_text("exp(x) + exp(100)"), "feature_map.expr", "beyond float32's range"),
    "scale-10**400": (spec_text(extra="scale: 10**400\n"), "scale", "exponent 400"),
    "scale-1e39": (spec_text(extra="scale: 1.0e+39\n"), "scale", "beyond float32's range"),
    "eps-400-digits": (spec_text(extra="eps: " + "4" * 400 + "\n"), "eps", "float32's range"),
    "chunk-5000-digits": (spec_text(extra="chunk_size: " + "5" * 5000 + "\n"), "chunk_size", "5000-digit"),
    "min-elu": (spec_text("min(elu(-1), 0)"), "feature_map.expr", "cannot prove phi(x) = -1 + exp(-1) > 0"),
    "sigmoid-pow-x": (spec_text("sigmoid(x)**x"), "feature_map.expr", "float32's range"),
    "1000-terms": (spec_text(" + ".join(["exp(x)"] * 1000)), "feature_map.expr", "at most 1000"),
    "deep-yaml": (spec_text("[" * 4000 + "]" * 4000), "<file>", "nested more than 16"),
    "9**9**9**9": (spec_text("9**9**9**9"), "feature_map.expr", "exponent 387420489"),
    "10**10**10": (spec_text(mask=SELECTIVE.format("-z**2 - 10**10**10")), "mask.log_decay", "exponent"),
    "sqrt-abs": (spec_text("sqrt(abs(x)) + 1"), "feature_map.expr", "phi'(x)"),
    # found by the fuzzer: x - x cancels inside SymPy, then 0**-1 is zoo (was exit 3, not comparable)
    "cancelled-zoo": (spec_text("max(((x - x))**-1, min(x, x))"), "feature_map.expr", "not a real number"),
    "name-torch": (spec_text(name="torch"), "name", "collides"),  # refused before planning (was 2.5 s)
    "yaml-syntax": ("name: t\nfeature_map: {expr: x\nmask:\n  family: none\n", "<file>", "line 3, column 5"),
    "alias-bomb": (
        spec_text(
            extra="direction: [&a [x, x, x, x, x, x, x, x, x], "
            + ", ".join(f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdef", "bcdefg", strict=True))
            + "]\n"
        ),
        "<file>",
        "alias",
    ),
}


@pytest.mark.parametrize("key", list(ISSUE_REFUSALS))
def test_issue_examples_exit_2_in_one_line(key, tmp_path, capsys):
    import time

    text, field, fragment = ISSUE_REFUSALS[key]
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    start = time.perf_counter()
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - start < 2.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400, err[:500]
    assert err.startswith(f"lion-gen: error: {path}: {field}: ") and fragment in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "expr,mask",
    [
        ("exp(x) + 1", SELECTIVE.format("-1 - " + "tanh(" * 12 + "z" + ")" * 12)),  # ran past 20 s
        ("exp(x) + 1", SELECTIVE.format("log(sigmoid(elu(z)))")),  # failed the stabilization assertion
        ("x**6 + 1", "  family: none\n"),
        ("sqrt(relu(x)) + 1", "  family: none\n"),
        ("exp(x) + softplus(1)", "  family: none\n"),
    ],
    ids=["tanh12", "log-sigmoid-elu", "x6", "sqrt-relu", "softplus1"],
)
def test_issue_examples_that_compile(expr, mask, tmp_path, capsys):
    import time

    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(expr, mask=mask), encoding="utf-8")
    start = time.perf_counter()
    assert main([str(path), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert time.perf_counter() - start < 20.0
    assert files_in(tmp_path / "out") == ["t.py"]


def test_a_colliding_name_is_refused_before_planning(tmp_path, monkeypatch, capsys):
    import lion_gen.cli

    def no_planning(spec):
        raise AssertionError("planned")

    monkeypatch.setattr(lion_gen.cli, "plan", no_planning)
    path = tmp_path / "spec.yaml"
    for name in ("torch", "launch", "check_inputs"):
        path.write_text(spec_text(name=name), encoding="utf-8")
        assert main([str(path), "--out", str(tmp_path / "out")]) == 2
        assert "collides" in capsys.readouterr().err
