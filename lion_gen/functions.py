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

    def _eval_rewrite_as_exp(self, x: sp.Expr, **kwargs: object) -> sp.Expr:
        return x / (1 + sp.exp(-x))


class elu(sp.Function):
    """x for x > 0, exp(x) - 1 otherwise."""

    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Min(1, sp.exp(self.args[0]))

    def _eval_rewrite_as_exp(self, x: sp.Expr, **kwargs: object) -> sp.Expr:
        return sp.Piecewise((x, x > 0), (sp.exp(x) - 1, True))


class relu(sp.Function):
    """max(x, 0)."""

    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Heaviside(self.args[0], 0)

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


def parse_expression(text: object, symbol: str) -> sp.Expr:
    """Parse ``text`` into a SymPy expression in the single real symbol ``symbol``.

    Only numbers, the symbol, + - * / **, and registry functions are accepted. Raises
    ExpressionError naming what is wrong.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ExpressionError(f"expected an expression (string or number), got {type(text).__name__}")
    src = str(text).strip()
    if not src:
        raise ExpressionError("empty expression")
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"does not parse: {src!r} ({e.msg})") from None
    sym = sp.Symbol(symbol, real=True)
    expr = _to_sympy(tree.body, sym, src)
    bad = [a for a in expr.atoms(sp.Number, sp.NumberSymbol) if not a.is_finite or not a.is_real]
    if bad or expr.has(sp.zoo, sp.nan, sp.oo, -sp.oo, sp.I):
        raise ExpressionError(f"{src!r} contains a constant that is not a finite real number ({sp.sstr(expr)})")
    return expr


_BINOPS: dict[type, Callable[[sp.Expr, sp.Expr], sp.Expr]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}


def _to_sympy(node: ast.AST, sym: sp.Symbol, src: str) -> sp.Expr:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ExpressionError(f"unsupported constant {node.value!r} in {src!r}")
        if isinstance(node.value, int):
            return sp.Integer(node.value)
        if not math.isfinite(node.value):
            raise ExpressionError(f"the constant {node.value!r} in {src!r} is not finite")
        return sp.nsimplify(node.value, rational=True) if float(node.value).is_integer() else sp.Float(node.value)
    if isinstance(node, ast.Name):
        if node.id == sym.name:
            return sym
        if node.id in ("pi", "E"):
            return sp.pi if node.id == "pi" else sp.E
        raise ExpressionError(f"uses the symbol {node.id!r}; only {sym.name!r} is allowed here")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _to_sympy(node.operand, sym, src)
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp):
        op = _BINOPS.get(type(node.op))
        if op is None:
            hint = " (use ** for powers)" if isinstance(node.op, ast.BitXor) else ""
            raise ExpressionError(f"unsupported operator {type(node.op).__name__} in {src!r}{hint}")
        return op(_to_sympy(node.left, sym, src), _to_sympy(node.right, sym, src))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.keywords:
            raise ExpressionError(f"unsupported call in {src!r}")
        info = REGISTRY.get(node.func.id)
        if info is None:
            allowed = ", ".join(sorted(REGISTRY))
            raise ExpressionError(
                f"uses the function {node.func.id!r}, which has no Triton lowering (allowed: {allowed})"
            )
        args = [_to_sympy(a, sym, src) for a in node.args]
        if (info.arity > 0 and len(args) != info.arity) or (info.arity < 0 and len(args) < 2):
            want = info.arity if info.arity > 0 else "at least 2"
            raise ExpressionError(f"{info.name} takes {want} argument(s), got {len(args)} in {src!r}")
        return info.build(*args)
    raise ExpressionError(f"unsupported syntax {type(node).__name__} in {src!r}")
