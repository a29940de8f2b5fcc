"""Plan -> Python source: SymPy printers, the Jinja templates, atomic writes and the on-the-fly loader."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import math
import os
import sys
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import jinja2
import sympy as sp
from sympy.printing.str import StrPrinter

from . import __version__
from .functions import FLOAT32_MAX, FLOAT32_TINY, elu
from .plan import Elementwise, Plan
from .planner import BUFFERS
from .planner import _camel as camel
from .planner import plan as make_plan
from .spec import Spec, SpecError, load_spec


class _Printer(StrPrinter):
    """Shared rules: numbers as float literals, powers expanded or lowered, functions from the printer's table.

    Each printer owns its lowerings, in the manner of SymPy's code printers: ``known_functions`` maps the
    name of a SymPy function class (``exp``, ``sigmoid``, ``Abs``, ``Min``; ``sqrt`` for a power 1/2) to a
    format string whose ``{0}``, ``{1}`` are the printed arguments. The registry in ``functions`` knows
    nothing of Triton or torch.
    """

    backend = ""  # "triton" | "torch" | "python"
    known_functions: ClassVar[dict[str, str]] = {}

    def _lower(self, name: str, args: list[str]) -> str:
        template = self.known_functions.get(name)
        if template is None:
            raise ValueError(f"no {self.backend} lowering for {name}")
        return template.format(*args)

    def _print(self, expr: object, **kwargs: object) -> str:
        """A constant that is not a plain number (``exp(-1) - 1``, ``log(1 + E)``) is printed as its value:
        every backend takes a float literal, while a function of a Python float breaks torch and Triton."""
        if isinstance(expr, sp.Expr) and expr.is_number and not expr.is_Atom:
            return self._float(expr)
        return super()._print(expr, **kwargs)

    @staticmethod
    def _float(expr: sp.Expr) -> str:
        value = float(expr.evalf(30))
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX or 0 < abs(value) < FLOAT32_TINY:
            raise ValueError(f"the constant {expr} = {value!r} is outside float32's range")  # parse_expression refuses
        return f"({value!r})" if value < 0 else repr(value)

    def _print_Integer(self, expr: sp.Integer) -> str:
        return f"{float(expr)!r}"

    def _print_Rational(self, expr: sp.Rational) -> str:
        return f"({float(expr.p)!r} / {float(expr.q)!r})"

    def _print_Float(self, expr: sp.Float) -> str:
        return repr(float(expr))

    def _print_Exp1(self, expr: sp.Expr) -> str:
        return repr(float(sp.E))

    def _print_Pi(self, expr: sp.Expr) -> str:
        return repr(float(sp.pi))

    def _print_Function(self, expr: sp.Function) -> str:
        return self._lower(expr.func.__name__, [self._print(a) for a in expr.args])

    # StrPrinter has its own rules for these; every function goes through the table instead.
    _print_exp = _print_log = _print_tanh = _print_Abs = _print_Function

    def _print_MinMax(self, expr: sp.Expr) -> str:
        """n-ary Min/Max folded into nested binary calls."""
        name = expr.func.__name__
        args = [self._print(a) for a in expr.args]
        out = args[0]
        for a in args[1:]:
            out = self._lower(name, [out, a])
        return out

    _print_Min = _print_Max = _print_MinMax

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        base, e = expr.args
        b = self.parenthesize(base, 100)  # atoms stay bare, everything else gets parentheses
        if e == sp.Rational(1, 2):
            return self._lower("sqrt", [self._print(base)])
        if e == -sp.Rational(1, 2):
            return f"(1.0 / {self._lower('sqrt', [self._print(base)])})"
        if e.is_Integer and e != 0:
            # an integer power is a product (by squaring): exact signs, no log of a negative base
            prod = self._product(b, abs(int(e)))
            return f"({prod})" if int(e) > 0 else f"(1.0 / ({prod}))"
        return self._general_pow(self._print(base), self._print(e))

    @classmethod
    def _product(cls, b: str, n: int) -> str:
        if n <= 4:
            return " * ".join([b] * n)
        half = f"({cls._product(b, n // 2)})"
        return f"{half} * {half}" + (f" * {b}" if n % 2 else "")

    def _print_Add(self, expr: sp.Add, order: str | None = None) -> str:
        """``elu(a) + rest`` as one branch per side, ``a + rest`` or ``exp(a) + (rest - 1)``: elu(x) + 1 is then
        exp(x) for x <= 0, exact to float32's precision where (exp(x) - 1) + 1 keeps only a few digits."""
        elus = [t for t in expr.args if isinstance(t, elu)]
        if len(elus) == 1:
            a = elus[0].args[0]
            rest = sp.Add(*[t for t in expr.args if t is not elus[0]])
            return self._elu_branches(a, a + rest, rest - 1)
        return super()._print_Add(expr, order=order)

    def _elu_branches(self, a: sp.Expr, pos: sp.Expr, neg_rest: sp.Expr) -> str:
        raise ValueError(f"no {self.backend} lowering for elu branches")

    def _print_Mul(self, expr: sp.Mul) -> str:
        """A product with a step factor (the derivative of relu or max at a kink) is 0 where the step is,
        whatever the other factors are there: ``Heaviside(u) * r`` is ``where(u > 0, r, 0)``, finite even where
        r is not (``sqrt(relu(x))``'s derivative for x <= 0)."""
        steps = [f for f in expr.args if isinstance(f, sp.Heaviside)]
        if steps:
            rest = sp.Mul(*[f for f in expr.args if f is not steps[0]])
            return self._guard(self._print(steps[0].args[0]), self._print(rest))
        return super()._print_Mul(expr)

    def _guard(self, u: str, r: str) -> str:
        raise ValueError(f"no {self.backend} lowering for Heaviside")

    def _general_pow(self, base: str, e: str) -> str:
        raise NotImplementedError

    def _print_Heaviside(self, expr: sp.Expr) -> str:
        return self._step(self._print(expr.args[0]))

    def _print_sign(self, expr: sp.Expr) -> str:
        return self._sign(self._print(expr.args[0]))

    def _step(self, x: str) -> str:
        raise ValueError(f"no {self.backend} lowering for Heaviside")

    def _sign(self, x: str) -> str:
        raise ValueError(f"no {self.backend} lowering for sign")


class TritonPrinter(_Printer):
    """SymPy -> Triton (tl.*) for use inside @triton.jit functions on fp32 tiles.

    ``_softplus`` and ``_tanh`` are small @triton.jit helpers of ``lion_gen.runtime.tiles`` that every
    generated module imports; the rest are Triton builtins.
    """

    backend = "triton"
    known_functions: ClassVar[dict[str, str]] = {
        "exp": "tl.exp({0})",
        "log": "tl.log({0})",
        "sigmoid": "tl.sigmoid({0})",
        "softplus": "_softplus({0})",
        "silu": "({0} * tl.sigmoid({0}))",
        "elu": "tl.where({0} > 0, {0}, tl.exp({0}) - 1.0)",
        "relu": "tl.maximum({0}, 0.0)",
        "tanh": "_tanh({0})",
        "sqrt": "tl.sqrt({0})",
        "Abs": "tl.abs({0})",
        "Min": "tl.minimum({0}, {1})",
        "Max": "tl.maximum({0}, {1})",
    }

    def _general_pow(self, base: str, e: str) -> str:
        return f"tl.exp(({e}) * tl.log({base}))"

    def _print_elu(self, expr: sp.Expr) -> str:
        # expm1 for small |a| by its Taylor series (exp(a) - 1 would keep few digits there)
        a = self._print(expr.args[0])
        series = f"{a} * (1.0 + {a} * (0.5 + {a} * ({1 / 6!r} + {a} * ({1 / 24!r} + {a} * {1 / 120!r}))))"
        return f"tl.where({a} > 0, {a}, tl.where({a} > -0.0625, {series}, tl.exp({a}) - 1.0))"

    def _elu_branches(self, a: sp.Expr, pos: sp.Expr, neg_rest: sp.Expr) -> str:
        neg = f"tl.exp({self._print(a)})" + ("" if neg_rest == 0 else f" + {self.parenthesize(neg_rest, 50)}")
        return f"tl.where({self._print(a)} > 0, {self._print(pos)}, {neg})"

    def _guard(self, u: str, r: str) -> str:
        return f"tl.where({u} > 0, {r}, 0.0)"

    def _step(self, x: str) -> str:
        return f"tl.where({x} > 0, 1.0, 0.0)"

    def _sign(self, x: str) -> str:
        return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"


class TorchPrinter(_Printer):
    """SymPy -> torch, for the reference form."""

    backend = "torch"
    known_functions: ClassVar[dict[str, str]] = {
        "exp": "torch.exp({0})",
        "log": "torch.log({0})",
        "sigmoid": "torch.sigmoid({0})",
        "softplus": "torch.nn.functional.softplus({0})",
        "silu": "torch.nn.functional.silu({0})",
        "elu": "torch.nn.functional.elu({0})",
        "relu": "torch.relu({0})",
        "tanh": "torch.tanh({0})",
        "sqrt": "torch.sqrt({0})",
        "Abs": "torch.abs({0})",
        "Min": "torch.minimum({0}, {1})",
        "Max": "torch.maximum({0}, {1})",
    }

    def _print_MinMax(self, expr: sp.Expr) -> str:
        # torch.minimum needs tensors: wrap numbers
        args = [a if not a.is_number else sp.Symbol(f"torch.tensor({float(a)!r})") for a in expr.args]
        return super()._print_MinMax(expr.func(*args, evaluate=False))

    _print_Min = _print_Max = _print_MinMax

    def _general_pow(self, base: str, e: str) -> str:
        return f"torch.pow({base}, {e})"

    def _elu_branches(self, a: sp.Expr, pos: sp.Expr, neg_rest: sp.Expr) -> str:
        # the exp branch is clamped so that its (discarded) value and gradient stay finite where a > 0
        pa = self._print(a)
        neg = f"torch.exp(torch.clamp({pa}, max=0.0))"
        neg += "" if neg_rest == 0 else f" + {self.parenthesize(neg_rest, 50)}"
        return f"torch.where({pa} > 0, {self._print(pos)}, {neg})"

    def _guard(self, u: str, r: str) -> str:
        return f"torch.where({u} > 0, {r}, 0.0)"

    def _step(self, x: str) -> str:
        return f"({x} > 0).to(torch.float32)"

    def _sign(self, x: str) -> str:
        return f"torch.sign({x})"


class PythonPrinter(_Printer):
    """SymPy -> plain Python (math.*) for host-side scalars such as scale(d)."""

    backend = "python"
    known_functions: ClassVar[dict[str, str]] = {
        "exp": "math.exp({0})",
        "log": "math.log({0})",
        "sigmoid": "(0.5 + 0.5 * math.tanh(0.5 * {0}))",  # never overflows, unlike 1 / (1 + exp(-a))
        "softplus": "(max({0}, 0.0) + math.log1p(math.exp(-abs({0}))))",
        "silu": "({0} * (0.5 + 0.5 * math.tanh(0.5 * {0})))",
        "elu": "({0} if {0} > 0 else math.expm1({0}))",
        "relu": "max({0}, 0.0)",
        "sqrt": "math.sqrt({0})",
        "tanh": "math.tanh({0})",
        "Abs": "abs({0})",
        "Min": "min({0}, {1})",
        "Max": "max({0}, {1})",
    }

    def _general_pow(self, base: str, e: str) -> str:
        return f"({base}) ** ({e})"

    def _elu_branches(self, a: sp.Expr, pos: sp.Expr, neg_rest: sp.Expr) -> str:
        pa = self._print(a)
        neg = f"math.exp({pa})" + ("" if neg_rest == 0 else f" + {self.parenthesize(neg_rest, 50)}")
        return f"({self._print(pos)} if {pa} > 0 else {neg})"

    def _guard(self, u: str, r: str) -> str:
        return f"({r} if {u} > 0 else 0.0)"


def render_elementwise(ew: Elementwise, printer: _Printer) -> list[str]:
    """Lines of a function body: one assignment per CSE temporary, then the return."""
    lines = [f"{sym} = {printer.doprint(expr)}" for sym, expr in ew.steps]
    lines.append(f"return {printer.doprint(ew.result)}")
    return lines


# ---------------------------------------------------------------------------- templates


def templates_dir() -> Path:
    """The templates: beside the package in a checkout, or installed inside it."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "templates", here / "templates"):
        if (candidate / "module.py.j2").is_file():
            return candidate
    raise FileNotFoundError(f"lion-gen templates not found beside {here}")


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pyrepr"] = repr
    return env


# The spec-independent Triton helpers of lion_gen.runtime.tiles that a generated module may import.
TILES_HELPERS = (
    "_causal",
    "_load_rows",
    "_load_state",
    "_load_state_if",
    "_load_state_t_if",
    "_load_vec",
    "_load_vec_if",
    "_mask",
    "_sdot",
    "_softplus",
    "_sround",
    "_store_rows",
    "_store_state",
    "_store_vec",
    "_tanh",
)


def render(p: Plan, source: str = "<spec>") -> str:
    """Render the module for a plan. Raises SpecError when the spec's name collides in the module.

    The module imports only the helpers (and ``math``) it uses: it is rendered once importing all of
    them, and again importing those whose names the first rendering uses.
    """
    ctx = _context(p)
    env = _environment()
    text = env.get_template("module.py.j2").render(**ctx, tiles_helpers=TILES_HELPERS, import_math=True)
    used = _used_names(text)
    text = env.get_template("module.py.j2").render(
        **ctx, tiles_helpers=[n for n in TILES_HELPERS if n in used], import_math="math" in used
    )
    _check_names(text, p, source)
    return text


def _used_names(text: str) -> set[str]:
    """The names a module reads (loads), outside its import statements."""
    return {n.id for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _context(p: Plan) -> dict[str, object]:
    tp, th = TritonPrinter(), TorchPrinter()
    return {
        "plan": p,
        "version": __version__,
        "spec_json": json.dumps(p.spec, indent=2, sort_keys=False),
        "feature_tl": render_elementwise(p.feature, tp),
        "feature_grad_tl": render_elementwise(p.feature_grad, tp),
        "feature_torch": render_elementwise(p.feature, th),
        "l2_adjoint_tl": tp.doprint(p.l2_adjoint),
        "log_decay_tl": render_elementwise(p.log_decay, tp) if p.log_decay else None,
        "log_decay_grad_tl": render_elementwise(p.log_decay_grad, tp) if p.log_decay_grad else None,
        "log_decay_torch": render_elementwise(p.log_decay, th) if p.log_decay else None,
        "log_decay_grad_torch": render_elementwise(p.log_decay_grad, th) if p.log_decay_grad else None,
        "scale_py": PythonPrinter().doprint(p.scale),
        "stages": [(n, p.stages.nodes[n]) for n in p.launch_order()],
        "params": lambda stage: ", ".join(_kernel_args(p, stage, kernel=True)),
        "call": lambda stage: ", ".join(_kernel_args(p, stage, kernel=False)),
        "saved": _saved(p),
        "kinds": {name: kind for name, (_, kind, _) in BUFFERS.items()},
    }


def _expand(p: Plan, role: str, buffer: str, kind: str, kernel: bool) -> list[str]:
    """One buffer as kernel parameters (kernel=True) or as the host expressions a launch passes."""
    if kind == "gate":
        return ["g_ptr", "G_ROWED", "G_STRIDE"] if kernel else ["*gate_args"]
    names = [f"{role}_ptr"] if kernel else [buffer]
    if kind == "state" and p.normalize_rows:  # the state's fp32 normalizer column
        names.append(f"{role}z_ptr" if kernel else f"{buffer}_z")
    return names


def _kernel_args(p: Plan, stage: str, kernel: bool) -> list[str]:
    """A stage's pointer arguments, from the stage graph: the kernel's parameters or the launch's values.
    Both come from this one list, so a kernel and its launch cannot disagree."""
    return [n for role, buf, kind in p.stages.nodes[stage]["args"] for n in _expand(p, role, buf, kind, kernel)]


def _saved(p: Plan) -> list[str]:
    """Host names of the buffers the forward pass writes and the backward pass reads (y and n aside)."""
    g = p.stages
    written = {b for n in p.launch_order("forward") for b in g.nodes[n]["writes"]}
    read = {b for n in p.launch_order("backward") for b in g.nodes[n]["reads"]}
    return [name for b in sorted(written & read - {"y", "n"}) for name in _expand(p, b, b, BUFFERS[b][1], kernel=False)]


# Module-level names every generated module binds (imports and the runtime's checks): a spec named so is
# refused before any planning. _check_names, on the rendered module, stays the authority.
MODULE_NAMES = frozenset(
    {"annotations", "math", "torch", "triton", "tl", "launch", "SPEC", "EPS", "FAMILY", "DEFAULT_CHUNK"}
    | {"check_chunk_size", "check_inputs", "check_key_padding_mask", "check_scale", "kernel_settings"}
    | {"lion_reference", "on_device"}
    | {"resolve_form", "segment_chunks"}
    | {"check_state", "check_step", "join_state", "reference_causal", "split_state", "state_buffers", "step_settings"}
)


def check_name_early(spec: Spec) -> None:
    """Refuse at once a name (or its `<name>_step`) that collides with what every generated module binds, or with
    its own class."""
    for name in (spec.name, f"{spec.name}_step"):  # the function and its one-token step
        if name in MODULE_NAMES:
            raise SpecError(
                spec.source,
                "name",
                f"{spec.name!r} collides with a name the generated module uses ({name!r}); choose another name",
            )
    if spec.name == camel(spec.name):
        raise SpecError(
            spec.source, "name", f"{spec.name!r} collides with its own nn.Module class name ({spec.name!r})"
        )


def _check_names(text: str, p: Plan, source: str) -> None:
    """The function, its one-token step and the class a spec names must be the only module-level bindings of
    those names."""
    counts: dict[str, int] = {}
    for node in ast.parse(text).body:
        names: list[str] = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [(a.asname or a.name).split(".")[0] for a in node.names]
        for n in names:
            counts[n] = counts.get(n, 0) + 1
    for n in sorted({p.name, p.class_name, f"{p.name}_step"}):
        if counts.get(n, 0) > 1 or p.name == p.class_name:
            taken = "its own nn.Module class name" if p.name == p.class_name else "a name the generated module uses"
            raise SpecError(source, "name", f"{p.name!r} collides with {taken} ({n!r}); choose another name")


def generate_source(spec: Spec | str | os.PathLike[str]) -> str:
    """The generated module's source for a spec (a Spec or a path to one)."""
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    check_name_early(spec)
    return render(make_plan(spec), spec.source)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    env = os.environ.get("LION_GEN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lion_gen"


def load(spec_path: str | os.PathLike[str]) -> ModuleType:
    """Generate the module for ``spec_path`` into the cache (keyed by a hash) and import it."""
    spec = load_spec(spec_path)
    source = generate_source(spec)
    key = hashlib.sha256((__version__ + json.dumps(spec.to_dict(), sort_keys=True) + source).encode()).hexdigest()[:16]
    path = cache_dir() / key / f"{spec.name}.py"
    if not path.is_file() or path.read_text(encoding="utf-8") != source:
        write_atomic(path, source)
    mod_name = f"lion_gen_cache_{key}_{spec.name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return module
