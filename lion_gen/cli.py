"""`lion-gen`: generate modules from specs, check committed output, explain a plan.

    lion-gen SPEC.yaml [SPEC.yaml ...] [--out DIR]   write DIR/<name>.py for each spec (default DIR: generated)
    lion-gen --check [--specs DIR] [--out DIR]      exit 1 if any file under --out differs from its spec's output
    lion-gen explain SPEC.yaml                      print the derived equations, facts and stages

Exit codes: 0 ok, 1 --check found stale files, 2 a bad spec or bad arguments, an --out that cannot be
made or written included (nothing is written), 3 an internal error of lion-gen (a bug: please report it
with the spec).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .codegen import check_name_early, render, write_atomic
from .planner import plan
from .spec import SpecError, load_spec

EXIT_OK, EXIT_STALE, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its message, name the program
        self.print_usage(sys.stderr)
        raise SystemExit(f"{self.prog}: error: {message}") from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lion-gen",
        description="Generate Triton masked linear attention modules from YAML specs.",
        epilog="lion-gen explain SPEC.yaml prints what the planner derives for a spec. Exit codes: 0 ok, "
        "1 --check found stale files, 2 bad spec or arguments (nothing written), 3 internal error.",
    )
    p.add_argument("specs", nargs="*", metavar="SPEC", help="spec files to generate")
    p.add_argument("--out", default="generated", help="output directory (default: generated)")
    p.add_argument("--check", action="store_true", help="verify that --out matches the specs in --specs")
    p.add_argument("--specs", dest="spec_dir", default="specs", help="spec directory for --check (default: specs)")
    p.add_argument("--version", action="version", version=f"lion-gen {__version__}")
    return p


def _render_all(paths: Sequence[str]) -> dict[str, str]:
    """name -> source for every spec; raises SpecError on the first bad one (before anything is written)."""
    out: dict[str, str] = {}
    sources: dict[str, str] = {}
    for path in paths:
        spec = load_spec(path)
        check_name_early(spec)
        if spec.name in out:
            raise SpecError(path, "name", f"{spec.name!r} is also the name of {sources[spec.name]}")
        out[spec.name] = render(plan(spec), spec.source)
        sources[spec.name] = path
    return out


def _fail(message: str) -> int:
    print(f"lion-gen: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def generate(paths: Sequence[str], out_dir: str) -> int:
    for path in paths:
        if not Path(path).is_file():
            return _fail(f"{path}: no such spec file")
    try:
        sources = _render_all(paths)
    except SpecError as e:
        return _fail(str(e))
    out = Path(out_dir)
    reason = _prepare_out(out)
    if reason:
        return _fail(f"--out {out_dir}: {reason}")
    for name, source in sources.items():
        try:
            write_atomic(out / f"{name}.py", source)
        except OSError as e:  # after the probe succeeded: a full disk, a quota, a race
            return _fail(f"--out {out_dir}: cannot write {name}.py: {e.strerror or e}")
        print(f"wrote {out / f'{name}.py'}")
    return EXIT_OK


def _prepare_out(out: Path) -> str | None:
    """Make ``out`` (and missing parents) and check that files can be created in it.

    Returns why not, having removed any directory it made, or None when ``out`` is ready.
    """
    made: list[Path] = []
    step = "cannot use it"
    try:
        if out.exists() and not out.is_dir():
            return "exists and is not a directory"
        missing = []
        base = out
        while not base.exists() and base.parent != base:
            missing.append(base)
            base = base.parent
        if not base.is_dir():
            return f"{base} is not a directory"
        for d in reversed(missing):
            step = f"cannot create the directory {d}"
            d.mkdir()
            made.append(d)
        step = "cannot create files in it"
        fd, probe = tempfile.mkstemp(dir=out, prefix=".lion-gen-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
        return f"{step}: {e.strerror or e}"
    return None


def check(spec_dir: str, out_dir: str) -> int:
    specs = sorted(Path(spec_dir).glob("*.yaml"))
    if not specs:
        return _fail(f"--specs {spec_dir}: no *.yaml specs found")
    try:
        expected = _render_all([str(p) for p in specs])
    except SpecError as e:
        return _fail(str(e))
    out = Path(out_dir)
    present = {p.stem: p for p in out.glob("*.py") if p.name != "__init__.py"} if out.is_dir() else {}
    stale = []
    for name, source in expected.items():
        path = out / f"{name}.py"
        if name not in present:
            stale.append(f"{path}: missing (run lion-gen {spec_dir}/*.yaml --out {out_dir})")
        elif present[name].read_text(encoding="utf-8") != source:
            stale.append(f"{path}: differs from what its spec generates now")
    for name, path in sorted(present.items()):
        if name not in expected:
            stale.append(f"{path}: no spec in {spec_dir} generates it")
    for line in stale:
        print(f"stale: {line}", file=sys.stderr)
    if stale:
        return EXIT_STALE
    print(f"ok: {len(expected)} generated file(s) in {out_dir} match {spec_dir}")
    return EXIT_OK


def explain(path: str) -> int:
    try:
        p = plan(load_spec(path))
    except SpecError as e:
        return _fail(str(e))
    print(f"{p.name} ({p.direction}, mask {p.family}{', alignment ' + p.alignment if p.alignment else ''})")
    print("\nequations:")
    for eq in p.equations:
        print(f"  {eq}")
    print("\nderived:")
    print(f"  f'(x) = {p.feature_grad.expr}")
    if p.l2:
        print(f"  l2 adjoint: dr = {p.l2_adjoint}")
    if p.log_decay_grad is not None:
        print(f"  dl/dz = {p.log_decay_grad.expr}")
    print("\nfacts:")
    for fact in p.facts or ("(none needed)",):
        print(f"  {fact}")
    print("\nlaunch schedule of the chunk form (the stage graph in topological order):")
    for node in p.launch_order():
        st = p.stages.nodes[node]
        print(f"  {st['kernel']}: {node} -> _{p.name}_{st['function']} over {st['grid']}: {st['doc']}")
        print(f"      reads {', '.join(st['reads'])}; writes {', '.join(st['writes'])}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except Exception as e:  # a bug in lion-gen, not in the spec: say so in one line, exit 3
        print(f"lion-gen: internal error: {type(e).__name__}: {e} (please report it with the spec)", file=sys.stderr)
        return EXIT_INTERNAL


def _main(argv: Sequence[str] | None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list[:1] == ["explain"]:
            if len(args_list) != 2 or args_list[1].startswith("-"):
                return _fail("usage: lion-gen explain SPEC.yaml")
            return explain(args_list[1])
        args = _parser().parse_args(args_list)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return EXIT_USAGE
        return int(e.code or 0)
    if args.check:
        if args.specs:
            return _fail("--check takes no spec files (it reads --specs DIR)")
        return check(args.spec_dir, args.out)
    if not args.specs:
        return _fail("no spec files given (try: lion-gen specs/*.yaml, or lion-gen --help)")
    return generate(args.specs, args.out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
