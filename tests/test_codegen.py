"""Plan -> source: printers, determinism, imports, readability, the on-the-fly loader."""

from __future__ import annotations

import ast
import dataclasses
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import sympy as sp

from lion_gen import generate_source, load
from lion_gen.codegen import PythonPrinter, TorchPrinter, TritonPrinter, _kernel_args, render, templates_dir
from lion_gen.functions import REGISTRY, FunctionInfo, parse_expression
from lion_gen.planner import plan
from lion_gen.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
X = sp.Symbol("x", real=True)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("silu(x) + 1/2", "(x * tl.sigmoid(x)) + (1.0 / 2.0)"),
        ("x**2", "(x * x)"),
        ("x**-1", "(1.0 / (x))"),
        ("sqrt(x)", "tl.sqrt(x)"),
        ("x**(1/3)", "tl.exp(((1.0 / 3.0)) * tl.log(x))"),
        ("max(x, 0)", "tl.maximum(0.0, x)"),
        ("min(x, 1, exp(x))", None),
        ("softplus(x)", "_softplus(x)"),
        ("tanh(x)", "_tanh(x)"),
        ("abs(x)", "tl.abs(x)"),
    ],
)
def test_triton_printer(text, expected):
    out = TritonPrinter().doprint(parse_expression(text, "x"))
    if expected is not None:
        assert out == expected
    assert "Min" not in out and "Max" not in out and "**" not in out


def test_printers_evaluate_to_the_same_values():
    """The torch printer's output, evaluated, matches SymPy for each registry function."""
    import math

    import torch

    for text in [
        "silu(x) + 1/2",
        "elu(x) + 1",
        "softplus(x)",
        "sigmoid(x)*tanh(x)",
        "relu(x) + exp(-x**2)",
        "abs(x) + sqrt(x**2 + 1)",
        "min(x, 0) + max(x, 1)",
        "x**3 - x**(1/3)*0",
    ]:
        expr = parse_expression(text, "x")
        code = TorchPrinter().doprint(expr)
        for xv in [-2.3, -0.4, 0.7, 3.1]:
            got = eval(code, {"torch": torch, "x": torch.tensor(xv, dtype=torch.float64)})  # noqa: S307
            want = float(expr.subs(X, xv).rewrite(sp.exp).evalf())
            assert math.isclose(float(got), want, rel_tol=1e-9, abs_tol=1e-12), (text, xv, float(got), want)


def _registry_call(name: str) -> sp.Expr:
    """A call of registry function ``name`` on symbols, unevaluated so that sqrt and pow stay what they are."""
    y = sp.Symbol("y", real=True)
    info = REGISTRY[name]
    if name == "pow":
        return sp.Pow(X, sp.Rational(3, 2))
    if name == "sqrt":
        return sp.sqrt(X)
    return info.build(X, y, evaluate=False) if info.arity != 1 else info.build(X, evaluate=False)


@pytest.mark.parametrize("printer", [TritonPrinter, TorchPrinter], ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_printer_lowers_every_registry_function(printer, name):
    out = printer().doprint(_registry_call(name))
    prefix = "tl." if printer is TritonPrinter else "torch."
    assert prefix in out or out.startswith("_"), out
    assert "x" in out and "**" not in out, out


def test_the_registry_holds_no_lowerings():
    """Lowerings belong to the printers: the registry keeps parsing, derivatives and ranges only."""
    assert [f.name for f in dataclasses.fields(FunctionInfo)] == ["name", "arity", "build"]
    assert {"sigmoid", "Abs", "Min", "sqrt"} <= set(TritonPrinter.known_functions)


@pytest.mark.parametrize("printer", [TritonPrinter, TorchPrinter, PythonPrinter], ids=lambda c: c.__name__)
def test_a_function_missing_from_a_printers_table_is_refused(printer):
    class Without(printer):
        known_functions = {k: v for k, v in printer.known_functions.items() if k != "exp"}

    with pytest.raises(ValueError, match="exp"):
        Without().doprint(parse_expression("exp(x) + 1", "x"))


def test_python_printer_for_scale():
    assert PythonPrinter().doprint(parse_expression("1/sqrt(d)", "d")) == "(1.0 / math.sqrt(d))"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_generation_is_deterministic_and_committed(path):
    first = generate_source(path)
    assert first == generate_source(str(path))
    assert first == (ROOT / "generated" / f"{path.stem}.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_generated_module_imports_only_torch_triton_and_runtime(path):
    tree = ast.parse(generate_source(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module)
    allowed = {"__future__", "math", "torch", "triton", "triton.language", "lion_gen.runtime", "lion_gen.runtime.tiles"}
    allowed.add("lion_gen.runtime.state")  # the causal state's checks and layout
    assert roots <= allowed, roots


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_each_kernel_states_its_equations(path):
    src = generate_source(path)
    tree = ast.parse(src)
    p = plan(load_spec(path))
    names = {f"_{p.name}_{p.stages.nodes[n]['function']}" for n in p.stages}  # every launch of the chunk form
    kernels = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert len(kernels) == len(names) >= 5
    lines = src.splitlines()
    for k in kernels:  # the comment block above each kernel states the math it implements
        above = lines[: k.lineno - 2]  # k.lineno is the decorator's line
        block = []
        for line in reversed(above):
            if not line.startswith("#"):
                break
            block.insert(0, line)
        header = "\n".join(block)
        assert "# Stage" in header or "# Gate gradient" in header, k.name
        assert "docs/lion_math.md" in header and "=" in header, k.name
    assert src.startswith("# Generated by lion-gen")


def test_templates_are_found_from_a_checkout():
    assert (templates_dir() / "module.py.j2").is_file()


@pytest.mark.slow
def test_installed_package_carries_its_templates(tmp_path):
    """A non-editable install (no checkout beside it) still finds the templates and generates."""
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    subprocess.run([*pip, str(ROOT)], check=True, capture_output=True)
    code = (
        "import lion_gen.codegen as c, sys; d = c.templates_dir(); "
        "assert str(d).startswith(sys.argv[1]), d; "
        "print(len(c.generate_source(sys.argv[2])))"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(target), str(ROOT / "specs" / "lion_s.yaml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0 and int(out.stdout) > 1000, out.stderr


def test_load_compiles_into_a_hashed_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LION_GEN_CACHE", str(tmp_path))
    m1 = load(ROOT / "specs" / "lion_s.yaml")
    m2 = load(ROOT / "specs" / "lion_s.yaml")
    assert m1 is m2 and callable(m1.lion_s) and m1.SPEC["name"] == "lion_s"
    files = list(tmp_path.rglob("*.py"))
    assert len(files) == 1 and files[0].read_text() == generate_source(ROOT / "specs" / "lion_s.yaml")
    spec = tmp_path / "other.yaml"
    spec.write_text((ROOT / "specs" / "lion_s.yaml").read_text().replace("eps: 1.0e-6", "eps: 1.0e-5"))
    m3 = load(spec)
    assert m3 is not m1 and m3.SPEC["eps"] == 1e-5 and len(list(tmp_path.rglob("*.py"))) == 2


@pytest.mark.parametrize("name", ["torch", "launch", "tl", "math", "SPEC", "EPS", "Attn", "check", "split_state"])
def test_names_that_collide_in_the_module_are_refused(name, tmp_path):
    from lion_gen import SpecError
    from lion_gen.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: {name}\nfeature_map:\n  expr: elu(x) + 1\nmask:\n  family: none\n")
    with pytest.raises(SpecError) as info:
        generate_source(spec)
    assert info.value.field == "name" and "collides" in info.value.reason
    assert main([str(spec), "--out", str(tmp_path / "out")]) == 2 and not (tmp_path / "out").exists()


def test_the_tiles_helpers_a_module_may_import_exist_and_unused_ones_are_not_imported():
    import lion_gen.runtime.tiles as tiles
    from lion_gen.codegen import TILES_HELPERS

    assert all(callable(getattr(tiles, name, None)) for name in TILES_HELPERS)
    src = generate_source(ROOT / "specs" / "lion_lit.yaml")  # no mask: no _mask, no _softplus
    assert "    _mask,\n" not in src and "import math\n" not in src
    assert "    _sdot,\n" in src


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_each_kernel_and_its_launch_take_the_stage_graphs_argument_list(path):
    """A chunk-form kernel's pointer parameters and the buffers its launch passes are one list, the
    stage's reads and writes: the signature starts with it, the launch passes the same buffers."""
    p = plan(load_spec(path))
    name = p.name
    tree = ast.parse(render(p, str(path)))
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    launches = {
        c.args[0].id: c
        for c in ast.walk(tree)
        if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "launch" and isinstance(c.args[0], ast.Name)
    }
    for stage in p.launch_order():
        node = p.stages.nodes[stage]
        fn = f"_{name}_{node['function']}"
        params = [a.arg for a in functions[fn].args.args]
        expected = _kernel_args(p, stage, kernel=True)
        assert params[: len(expected)] == expected, (stage, params)
        assert not [a for a in params[len(expected) :] if a.endswith("_ptr") or a.startswith("G_")], (stage, params)
        passed = [ast.unparse(a) for a in launches[fn].args[2:]]
        assert passed == _kernel_args(p, stage, kernel=False), (stage, passed)
        for role, buffer, _ in node["args"]:  # each pointer parameter names a buffer of the stage
            assert buffer in node["reads"] + node["writes"] and f"{role}_ptr" in params


# ---------------------------------------------------------------------------- issue 9: printed forms that are right


class _TL:
    """Enough of triton.language, in torch, to evaluate the Triton printer's output on a tensor."""

    import torch as _t

    where = staticmethod(lambda c, a, b: _TL._t.where(c, _TL._t.as_tensor(a), _TL._t.as_tensor(b)))
    exp, log, sqrt, abs, sigmoid = _t.exp, _t.log, _t.sqrt, _t.abs, _t.sigmoid
    maximum = staticmethod(lambda a, b: _TL._t.maximum(_TL._t.as_tensor(a), _TL._t.as_tensor(b)))
    minimum = staticmethod(lambda a, b: _TL._t.minimum(_TL._t.as_tensor(a), _TL._t.as_tensor(b)))


def triton_eval(expr: sp.Expr, x: object) -> object:
    import torch

    names = {"tl": _TL, "x": x, "_softplus": torch.nn.functional.softplus, "_tanh": torch.tanh}
    return eval(TritonPrinter().doprint(expr), names)  # noqa: S307


@pytest.mark.parametrize("text", ["x**6 + 1", "x**5", "x**-7", "(x - 1)**31", "x**32"])
def test_integer_powers_are_products(text):
    """Integer powers were exp(n log x) above 4: NaN for x < 0. Now products, right for either sign."""
    import torch

    expr = parse_expression(text, "x")
    for printer in (TritonPrinter, TorchPrinter):
        assert "log" not in printer().doprint(expr)
    x = torch.tensor([-1.7, -0.3, 0.4, 1.9], dtype=torch.float64)
    want = [float(expr.subs(X, float(v))) for v in x]
    assert torch.allclose(triton_eval(expr, x), torch.tensor(want, dtype=torch.float64), rtol=1e-12)


def test_elu_plus_one_keeps_its_digits_in_float32():
    import torch

    expr = parse_expression("elu(x) + 1", "x")
    x = torch.tensor([-30.0, -12.0, -3.0, -1e-3, 0.0, 2.0])
    got = triton_eval(expr, x)
    want = torch.where(x.double() > 0, x.double() + 1, torch.exp(x.double()))
    assert ((got.double() - want).abs() / want).max() < 1e-6
    torch_code = TorchPrinter().doprint(expr)
    assert "elu" not in torch_code and "torch.exp(torch.clamp(x, max=0.0))" in torch_code


def test_plain_elu_is_accurate_near_zero():
    import torch

    x = torch.tensor([-0.06, -1e-3, -1e-6, -0.5])
    got = triton_eval(parse_expression("elu(x)", "x"), x).double()
    want = torch.expm1(x.double())
    assert ((got - want).abs() / want.abs()).max() < 1e-6


def test_constants_are_printed_as_numbers():
    """softplus(1) reached torch.nn.functional.softplus as a Python float; min(elu(-1), 0) was not comparable."""
    for text, value in [("exp(x) + softplus(1)", math.log1p(math.e)), ("x + min(elu(-1), 0)", math.expm1(-1))]:
        expr = parse_expression(text, "x")
        for printer in (TritonPrinter, TorchPrinter, PythonPrinter):
            out = printer().doprint(expr.subs(X, sp.Symbol("x")) if printer is PythonPrinter else expr)
            assert "softplus" not in out and "elu" not in out, out
        assert float(expr.subs(X, 0) - (1 if "exp" in text else 0)) == pytest.approx(value)


def test_a_step_times_an_infinity_is_zero():
    """sqrt(relu(x))'s derivative: Heaviside(x) / (2 sqrt(relu(x))) is 0 for x <= 0, not 0 * inf."""
    import torch

    deriv = sp.diff(parse_expression("sqrt(relu(x)) + 1", "x"), X)
    x = torch.tensor([-2.0, 0.0, 0.25, 4.0])
    got = triton_eval(deriv, x)
    assert torch.equal(got, torch.tensor([0.0, 0.0, 1.0, 0.25]))


@pytest.mark.parametrize("name", ["sigmoid", "softplus", "silu", "elu", "relu"])
def test_python_printer_lowers_every_function(name):
    """scale: sigmoid(d) was an internal error (no lowering); each is now printed, and never overflows."""
    d = sp.Symbol("d", real=True)
    expr = REGISTRY[name].build(d, evaluate=False)
    code = PythonPrinter().doprint(expr)
    for v in (-1000.0, -2.0, 0.5, 3.0, 1000.0):
        got = eval(code, {"math": math, "d": v})  # noqa: S307
        want = float(expr.subs(d, v).rewrite(sp.exp).evalf(30))
        assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-300), (name, v, got, want)


@pytest.mark.parametrize(
    "expr", ["silu(" * 23 + "x" + ")" * 23 + " + 2", "elu(" * 20 + "x" + ")" * 20 + " + 2", "((x**2 + 1)**6 + 1)**6"]
)
def test_nested_calls_print_in_linear_size(expr):
    """silu(a) prints a twice, elu's branches three times, a power its base n times: nested, that was
    exponential (2**23 copies of x, a hang). Each repeated argument now has a temporary of its own."""
    spec = {"name": "t", "feature_map": {"expr": expr}, "mask": {"family": "none"}, "allow_unproven": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the powers are beyond float32's range: accepted unproven
        p = plan(parse_spec(spec))
    for ew in (p.feature, p.feature_grad):
        lines = [TritonPrinter().doprint(e) for _, e in ew.steps] + [TritonPrinter().doprint(ew.result)]
        assert sum(len(line) for line in lines) < 40 * len(expr) + 4000
