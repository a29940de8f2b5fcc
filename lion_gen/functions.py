"""The function registry: every function a spec may use, defined once.

Each entry gives the SymPy function (with its derivative) and its arity; ``RANGES`` gives the range maps
used by the static proofs. How a function is written in Triton, torch or plain Python belongs to the
printers in ``codegen`` (``TritonPrinter.known_functions`` and its siblings). Expressions are parsed here
from the spec's text through Python's ``ast`` (never ``eval``), so only registry functions,
the spec's own symbol and numbers can appear.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp

# ---------------------------------------------------------------------------- SymPy functions


class sigmoid(sp.Function):
    """1 / (1 + exp(-x))."""

    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        s = sigmoid(self.args[0])
        return s * (1 - s)

    @classmethod
    def eval(cls, x: sp.Expr) -> sp.Expr | None:
        if x.is_zero:
            return sp.Rational(1, 2)
        if x.is_number:  # a constant: SymPy's own functions, which it can compare and evaluate
            return 1 / (1 + sp.exp(-x))
        return None

    def _eval_is_positive(self) -> bool | None:
        return True if self.args[0].is_real else None

    def _eval_rewrite_as_exp(self, x: sp.Expr, **kwargs: object) -> sp.Expr:
        return 1 / (1 + sp.exp(-x))


class softplus(sp.Function):
    """log(1 + exp(x))."""

    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sigmoid(self.args[0])

    @classmethod
    def eval(cls, x: sp.Expr) -> sp.Expr | None:
        return sp.log(1 + sp.exp(x)) if x.is_number else None

    def _eval_is_positive(self) -> bool | None:
        return True if self.args[0].is_real else None

    def _eval_rewrite_as_exp(self, x: sp.Expr, **kwargs: object) -> sp.Expr:
        return sp.log(1 + sp.exp(x))


class silu(sp.Function):
    """x * sigmoid(x)."""

    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        x = self.args[0]
        return sigmoid(x) * (1 + x * (1 - sigmoid(x)))

    @classmethod
    def eval(cls, x: sp.Expr) -> sp.Expr | None:
        return x / (1 + sp.exp(-x)) if x.is_number else None

    def _eval_rewrite_as_exp(self, x: sp.Expr, **kwargs: object) -> sp.Expr:
        return x / (1 + sp.exp(-x))


class elu(sp.Function):
    """x for x > 0, exp(x) - 1 otherwise."""

    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Min(1, sp.exp(self.args[0]))

    @classmethod
    def eval(cls, x: sp.Expr) -> sp.Expr | None:
        if x.is_number:
            return x if x > 0 else sp.exp(x) - 1
        return None

    def _eval_rewrite_as_exp(self, x: sp.Expr, **kwargs: object) -> sp.Expr:
        return sp.Piecewise((x, x > 0), (sp.exp(x) - 1, True))


class relu(sp.Function):
    """max(x, 0)."""

    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Heaviside(self.args[0], 0)

    @classmethod
    def eval(cls, x: sp.Expr) -> sp.Expr | None:
        if x.is_number:
            return x if x > 0 else sp.Integer(0)
        return None

    def _eval_is_nonnegative(self) -> bool | None:
        return True if self.args[0].is_real else None

    def _eval_rewrite_as_exp(self, x: sp.Expr, **kwargs: object) -> sp.Expr:
        return sp.Max(x, 0)


# ---------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Interval:
    """A real interval with open/closed ends; an end is open only where that is certain."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    @staticmethod
    def point(v: float) -> Interval:
        return Interval(v, v)

    @staticmethod
    def real() -> Interval:
        return Interval(-math.inf, math.inf, True, True)

    def is_positive(self) -> bool:
        return self.lo > 0 or (self.lo == 0 and self.lo_open)

    def is_nonpositive(self) -> bool:
        return self.hi <= 0

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo:.6g}, {self.hi:.6g}{')' if self.hi_open else ']'}"


def _safe(f: Callable[[float], float], v: float) -> float:
    try:
        return f(v)
    except (OverflowError, ZeroDivisionError):
        return math.inf
    except ValueError:
        return -math.inf  # log(0) and the like: the limit from above


def increasing(f: Callable[[float], float]) -> Callable[[Interval], Interval]:
    """The range map of a strictly increasing function (ends keep their openness)."""

    def image(iv: Interval) -> Interval:
        lo, hi = _safe(f, iv.lo), _safe(f, iv.hi)
        return Interval(lo, hi, iv.lo_open or math.isinf(iv.lo), iv.hi_open or math.isinf(iv.hi))

    return image


def _sigmoid(v: float) -> float:
    if v == math.inf:
        return 1.0
    if v == -math.inf:
        return 0.0
    return 1 / (1 + math.exp(-v)) if v > -700 else 0.0


def _softplus(v: float) -> float:
    if math.isinf(v):
        return 0.0 if v < 0 else math.inf
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _silu(v: float) -> float:
    if v == -math.inf:
        return 0.0
    return v * _sigmoid(v)


SILU_ARGMIN = -1.2784645427610738  # silu'(x) = 0: sigmoid(x)(1 + x(1 - sigmoid(x))) = 0
SILU_MIN = _silu(SILU_ARGMIN)  # -0.2784645...


def _silu_range(iv: Interval) -> Interval:
    if iv.lo >= SILU_ARGMIN:
        return increasing(_silu)(iv)
    hi_val = max(_silu(iv.lo), _safe(_silu, iv.hi))
    if iv.hi <= SILU_ARGMIN:
        return Interval(_safe(_silu, iv.hi), _silu(iv.lo), iv.hi_open, iv.lo_open or math.isinf(iv.lo))
    return Interval(SILU_MIN, hi_val, False, False)


def _abs_range(iv: Interval) -> Interval:
    if iv.lo >= 0:
        return iv
    if iv.hi <= 0:
        return Interval(-iv.hi, -iv.lo, iv.hi_open, iv.lo_open)
    return Interval(0.0, max(-iv.lo, iv.hi), False, False)


def _relu_range(iv: Interval) -> Interval:
    if iv.lo > 0 or (iv.lo == 0 and iv.lo_open):
        return iv
    if iv.hi <= 0:
        return Interval.point(0.0)
    return Interval(0.0, iv.hi, False, iv.hi_open)


def _elu(v: float) -> float:
    if v == -math.inf:
        return -1.0
    return v if v > 0 else math.expm1(v)


# ---------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class FunctionInfo:
    """One function a spec may use."""

    name: str
    arity: int  # -1: two or more arguments
    build: Callable[..., sp.Expr]  # SymPy constructor


REGISTRY: dict[str, FunctionInfo] = {
    f.name: f
    for f in [
        FunctionInfo("exp", 1, sp.exp),
        FunctionInfo("log", 1, sp.log),
        FunctionInfo("sigmoid", 1, sigmoid),
        FunctionInfo("softplus", 1, softplus),
        FunctionInfo("silu", 1, silu),
        FunctionInfo("elu", 1, elu),
        FunctionInfo("relu", 1, relu),
        FunctionInfo("tanh", 1, sp.tanh),
        FunctionInfo("sqrt", 1, sp.sqrt),
        FunctionInfo("abs", 1, sp.Abs),
        FunctionInfo("pow", 2, sp.Pow),  # printed through Pow
        FunctionInfo("min", -1, sp.Min),
        FunctionInfo("max", -1, sp.Max),
    ]
}

# Range maps of the one-argument functions (used by planner.interval_of).
RANGES: dict[type, Callable[[Interval], Interval]] = {
    sp.exp: increasing(lambda v: math.exp(v) if v != -math.inf else 0.0),
    sp.log: lambda iv: increasing(lambda v: math.log(v) if v > 0 else -math.inf)(
        Interval(max(iv.lo, 0.0), iv.hi, iv.lo_open or iv.lo <= 0, iv.hi_open)
    ),
    sigmoid: increasing(_sigmoid),
    softplus: increasing(_softplus),
    silu: _silu_range,
    elu: increasing(_elu),
    relu: _relu_range,
    sp.tanh: increasing(lambda v: math.tanh(v)),
    sp.Abs: _abs_range,
}


class ExpressionError(ValueError):
    """An expression that cannot be accepted; the message says why."""


# Limits checked on the parsed tree before SymPy sees it, so that no expression costs more than a moment:
MAX_CHARS = 1000  # characters of an expression's text
MAX_NODES = 200  # nodes of its syntax tree (numbers, names, operators, calls)
MAX_DEPTH = 24  # nesting of its function calls, powers and signs
MAX_EXPONENT = 32  # |e| of a constant exponent (integer powers are printed as products)
FLOAT32_MAX = 3.4028234663852886e38  # constants (and constant subexpressions) must lie in float32's range:
FLOAT32_TINY = 1.1754943508222875e-38  # 0, or a magnitude from its smallest normal number to its largest


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, saying so (messages never echo unbounded input)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters, cut)"


def parse_expression(text: object, symbol: str) -> sp.Expr:
    """Parse ``text`` into a SymPy expression in the single real symbol ``symbol``.

    Only numbers, the symbol, + - * / **, and registry functions are accepted, within the limits above.
    Raises ExpressionError naming what is wrong.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ExpressionError(f"expected an expression (string or number), got {type(text).__name__}")
    if isinstance(text, int) and text.bit_length() > 128:
        raise ExpressionError(f"the constant {_show_int(text)} is beyond float32's range (at most {FLOAT32_MAX:.4g})")
    src = str(text).strip()
    if not src:
        raise ExpressionError("empty expression")
    if len(src) > MAX_CHARS:
        raise ExpressionError(f"is {len(src)} characters long; at most {MAX_CHARS} ({shorten(src, 40)!r})")
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"does not parse: {shorten(src)!r} ({shorten(e.msg, 60)})") from None
    except (RecursionError, MemoryError, ValueError):
        raise ExpressionError(f"does not parse: {shorten(src)!r} (nested too deeply)") from None
    _check_size(tree.body, shorten(src))
    sym = sp.Symbol(symbol, real=True)
    expr, _ = _to_sympy(tree.body, sym, shorten(src))
    bad = [a for a in expr.atoms(sp.Number, sp.NumberSymbol) if not a.is_finite or not a.is_real]
    if bad or expr.has(sp.zoo, sp.nan, sp.oo, -sp.oo, sp.I):
        raise ExpressionError(
            f"{shorten(src)!r} contains a constant that is not a finite real number ({shorten(sp.sstr(expr))})"
        )
    return expr


def _show_int(v: int) -> str:
    digits = len(str(abs(v))) if v.bit_length() < 14000 else int(v.bit_length() * math.log10(2)) + 1
    return shorten(str(v), 20) if digits <= 20 else f"{'-' if v < 0 else ''}<a {digits}-digit integer>"


def _check_size(root: ast.AST, src: str) -> None:
    """Refuse a syntax tree with more than MAX_NODES nodes or deeper than MAX_DEPTH (iteratively)."""
    count = 0
    stack: list[tuple[ast.AST, int]] = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (ast.expr_context, ast.operator, ast.unaryop)):
            continue
        count += 1
        if count > MAX_NODES:
            raise ExpressionError(f"{src!r} has more than {MAX_NODES} terms, functions and numbers; simplify it")
        if depth > MAX_DEPTH:
            raise ExpressionError(f"{src!r} is nested more than {MAX_DEPTH} levels deep")
        # nesting counts calls, powers and signs; a chain such as a + b + c (a deep tree in ast) does not
        nested = isinstance(node, (ast.Call, ast.UnaryOp)) or (
            isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow)
        )
        stack.extend((child, depth + nested) for child in ast.iter_child_nodes(node))


_BINOPS: dict[type, Callable[[sp.Expr, sp.Expr], sp.Expr]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}
_FLOAT_BINOPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}
# float64 evaluations of the registry's functions, for constant arguments (each checked before SymPy builds it)
_FLOAT_FUNCS: dict[str, Callable[..., float]] = {
    "exp": math.exp,
    "log": math.log,
    "sigmoid": _sigmoid,
    "softplus": _softplus,
    "silu": _silu,
    "elu": _elu,
    "relu": lambda v: max(v, 0.0),
    "tanh": math.tanh,
    "sqrt": math.sqrt,
    "abs": abs,
    "pow": lambda a, b: a**b,
    "min": min,
    "max": max,
}


def _constant(value: float | complex, what: Callable[[], str], src: str) -> float:
    """Check a constant (or constant subexpression) against float32's range; returns it as a float."""
    if isinstance(value, complex) or math.isnan(value):
        raise ExpressionError(
            f"the constant {what()} in {src!r} is not a real number (a log of a number <= 0, a root of a "
            "negative number or a division by zero)"
        )
    mag = abs(value)
    if mag > FLOAT32_MAX:
        raise ExpressionError(f"the constant {what()} in {src!r} is beyond float32's range (at most {FLOAT32_MAX:.4g})")
    if 0 < mag < FLOAT32_TINY:
        raise ExpressionError(
            f"the constant {what()} in {src!r} is below float32's smallest normal number ({FLOAT32_TINY:.4g}); "
            "write 0 if that is meant"
        )
    return float(value)


def _to_sympy(node: ast.AST, sym: sp.Symbol, src: str) -> tuple[sp.Expr, float | None]:
    """The SymPy expression of ``node`` and, when it is a constant, its float64 value (checked)."""
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ExpressionError(f"unsupported constant {shorten(repr(v), 40)} in {src!r}")
        if isinstance(v, int):
            if v.bit_length() > 128:
                raise ExpressionError(
                    f"the constant {_show_int(v)} in {src!r} is beyond float32's range (at most {FLOAT32_MAX:.4g})"
                )
            return sp.Integer(v), _constant(float(v), lambda: _show_int(v), src)
        if not math.isfinite(v):
            raise ExpressionError(f"the constant {v!r} in {src!r} is not finite (at most {FLOAT32_MAX:.4g})")
        _constant(v, lambda: repr(v), src)
        return (sp.nsimplify(v, rational=True) if float(v).is_integer() else sp.Float(v)), v
    if isinstance(node, ast.Name):
        if node.id == sym.name:
            return sym, None
        if node.id in ("pi", "E"):
            return (sp.pi, math.pi) if node.id == "pi" else (sp.E, math.e)
        raise ExpressionError(f"uses the symbol {shorten(node.id, 40)!r}; only {sym.name!r} is allowed here")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner, v = _to_sympy(node.operand, sym, src)
        if isinstance(node.op, ast.USub):
            return -inner, (None if v is None else -v)
        return inner, v
    if isinstance(node, ast.BinOp):
        op = _BINOPS.get(type(node.op))
        if op is None:
            hint = " (use ** for powers)" if isinstance(node.op, ast.BitXor) else ""
            raise ExpressionError(f"unsupported operator {type(node.op).__name__} in {src!r}{hint}")
        (a, av), (b, bv) = _to_sympy(node.left, sym, src), _to_sympy(node.right, sym, src)
        if isinstance(node.op, ast.Pow):
            if bv is None:  # a power with a variable exponent: a ** b = exp(b log a), defined for a > 0
                return sp.exp(b * sp.log(a)), None
            if abs(bv) > MAX_EXPONENT:
                raise ExpressionError(
                    f"the exponent {shorten(sp.sstr(b), 40)} in {src!r} is larger than {MAX_EXPONENT} in magnitude"
                )
        if isinstance(node.op, ast.Div) and bv == 0:
            raise ExpressionError(f"{src!r} divides by zero")
        value = None
        if av is not None and bv is not None:
            value = _constant(_float_op(_FLOAT_BINOPS[type(node.op)], av, bv), lambda: _show(node), src)
        return _built(lambda: op(a, b), value, node, src)
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.keywords:
            raise ExpressionError(f"unsupported call in {src!r}")
        info = REGISTRY.get(node.func.id)
        if info is None:
            allowed = ", ".join(sorted(REGISTRY))
            raise ExpressionError(
                f"uses the function {shorten(node.func.id, 40)!r}, which has no Triton lowering (allowed: {allowed})"
            )
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise ExpressionError(f"unsupported call in {src!r}")
        if (info.arity > 0 and len(node.args) != info.arity) or (info.arity < 0 and len(node.args) < 2):
            want = info.arity if info.arity > 0 else "at least 2"
            raise ExpressionError(f"{info.name} takes {want} argument(s), got {len(node.args)} in {src!r}")
        parsed = [_to_sympy(a, sym, src) for a in node.args]
        args = [e for e, _ in parsed]
        values = [v for _, v in parsed]
        if info.name == "pow":
            if values[1] is None:
                return sp.exp(args[1] * sp.log(args[0])), None
            if abs(values[1]) > MAX_EXPONENT:
                big = shorten(sp.sstr(args[1]), 40)
                raise ExpressionError(f"the exponent {big} in {src!r} is larger than {MAX_EXPONENT} in magnitude")
        value = None
        if all(v is not None for v in values):
            value = _constant(_float_op(_FLOAT_FUNCS[info.name], *values), lambda: _show(node), src)
        return _built(lambda: info.build(*args), value, node, src)
    raise ExpressionError(f"unsupported syntax {type(node).__name__} in {src!r}")


def _built(make: Callable[[], sp.Expr], value: float | None, node: ast.AST, src: str) -> tuple[sp.Expr, float | None]:
    """SymPy's expression for ``node`` and its value, refused when SymPy cannot make it or it is not finite
    (``(x - x)**-1`` cancels to 0**-1 only inside SymPy, where the constants above do not see it)."""
    try:
        expr = make()
    except (ValueError, TypeError, ZeroDivisionError, ArithmeticError) as e:
        raise ExpressionError(f"{_show(node)} in {src!r} cannot be evaluated ({shorten(str(e), 60)})") from None
    if expr.has(sp.zoo, sp.nan, sp.oo, -sp.oo, sp.I):
        raise ExpressionError(f"{_show(node)} in {src!r} is not a finite real number ({shorten(sp.sstr(expr), 60)})")
    if value is None and expr.is_number:  # a part that cancels to a constant
        value = _constant(_float_op(lambda: float(expr.evalf(20))), lambda: _show(node), src)
    return expr, value


def _float_op(f: Callable[..., float], *args: float) -> float | complex:
    """``f`` on floats; an overflow is inf, a domain error (log of a negative, 0 ** -1) NaN."""
    try:
        return f(*args)
    except OverflowError:
        return math.inf
    except (ValueError, ZeroDivisionError):
        return math.nan


def _show(node: ast.AST) -> str:
    return shorten(ast.unparse(node), 40)
