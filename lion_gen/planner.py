"""Spec -> Plan: derivatives, static proofs, specialization and the kernel-stage DAG (SymPy, networkx)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import networkx as nx
import sympy as sp

from .functions import RANGES, Interval, elu, increasing, shorten, sigmoid, silu, softplus
from .plan import Elementwise, Plan
from .spec import Spec, SpecError

X = sp.Symbol("x", real=True)
Z = sp.Symbol("z", real=True)
D = sp.Symbol("d", real=True)
DEFAULT_CHUNK = 64


class UnprovenWarning(UserWarning):
    """A fact the planner could not prove, accepted because the spec says allow_unproven."""


# ---------------------------------------------------------------------------- interval analysis


def _add(a: Interval, b: Interval) -> Interval:
    return Interval(a.lo + b.lo, a.hi + b.hi, a.lo_open or b.lo_open, a.hi_open or b.hi_open)


def _mul(a: Interval, b: Interval) -> Interval:
    corners = []
    for av, ao in ((a.lo, a.lo_open), (a.hi, a.hi_open)):
        for bv, bo in ((b.lo, b.lo_open), (b.hi, b.hi_open)):
            v = av * bv
            if math.isnan(v):  # 0 * inf: no bound we can trust
                return Interval.real()
            attained = (av == 0 and not ao) or (bv == 0 and not bo)
            corners.append((v, (ao or bo) and not attained))
    lo = min(v for v, _ in corners)
    hi = max(v for v, _ in corners)
    return Interval(lo, hi, all(o for v, o in corners if v == lo), all(o for v, o in corners if v == hi))


def _recip(a: Interval) -> Interval:
    if a.is_positive() or a.hi < 0 or (a.hi == 0 and a.hi_open):
        lo = 1 / a.hi if a.hi != 0 else -math.inf
        hi = 1 / a.lo if a.lo != 0 else math.inf
        return Interval(lo, hi, a.hi_open or math.isinf(lo), a.lo_open or math.isinf(hi))
    return Interval.real()  # contains 0: unbounded


def _pow(base: Interval, e: sp.Expr) -> Interval:
    if not (e.is_number and e.is_real):
        return Interval.real()
    if e.is_Integer:
        n = int(e)
        if n == 0:
            return Interval.point(1.0)
        inner = _abs_iv(base) if n % 2 == 0 else base
        mag = abs(n)
        r = increasing(lambda v: math.copysign(abs(v) ** mag, v) if not math.isinf(v) else v)(inner)
        return r if n > 0 else _recip(r)
    if base.lo < 0:  # a fractional power of a negative number is not real: no bound
        return Interval.real()
    if e < 0:  # u**(-p) = 1 / u**p: the positive power is increasing, its reciprocal decreasing
        return _recip(_pow(base, -e))
    ev = float(e)
    return increasing(lambda v: v**ev)(base)


def _abs_iv(a: Interval) -> Interval:
    return RANGES[sp.Abs](a)


def interval_of(
    expr: sp.Expr, domain: dict[sp.Symbol, Interval], seen: dict[sp.Expr, Interval] | None = None
) -> Interval:
    """A range for ``expr`` over ``domain`` (sound: the true range lies inside). ``seen``, when given,
    collects the range of every subexpression (and saves recomputing shared ones)."""
    if seen is not None and expr in seen:
        return seen[expr]
    iv = _interval(expr, domain, seen)
    if seen is not None:
        seen[expr] = iv
    return iv


def _interval(expr: sp.Expr, domain: dict[sp.Symbol, Interval], seen: dict[sp.Expr, Interval] | None) -> Interval:
    if expr.is_number and not expr.is_Atom:  # a constant such as exp(-1) - 1: its value
        return Interval.point(float(expr.evalf(20)))
    if expr.is_Number or expr in (sp.pi, sp.E):
        v = float(expr)
        return Interval.point(v)
    if expr.is_Symbol:
        return domain.get(expr, Interval.real())
    args = [interval_of(a, domain, seen) for a in expr.args]
    if expr.is_Add:
        out = args[0]
        for a in args[1:]:
            out = _add(out, a)
        return out
    if expr.is_Mul:
        out = args[0]
        for a in args[1:]:
            out = _mul(out, a)
        return out
    if expr.is_Pow:
        if not expr.args[1].is_number:  # b ** e = exp(e log b), for b > 0
            if not args[0].is_positive():
                return Interval.real()
            return RANGES[sp.exp](_mul(args[1], RANGES[sp.log](args[0])))
        return _pow(args[0], expr.args[1])
    if isinstance(expr, (sp.Min, sp.Max)):
        pick: Callable[..., float] = min if isinstance(expr, sp.Min) else max
        lo = pick(a.lo for a in args)
        hi = pick(a.hi for a in args)
        return Interval(lo, hi, False, False)
    if isinstance(expr, sp.Heaviside):
        return Interval(0.0, 1.0)
    fn = RANGES.get(expr.func)
    if fn is not None:
        return fn(args[0])
    return Interval.real()


def prove(expr: sp.Expr, symbol: sp.Symbol, domain: Interval, want: str) -> tuple[bool, str]:
    """Try to prove ``expr > 0`` (want='positive') or ``expr <= 0`` ('nonpositive') on ``domain``.

    SymPy's assumptions decide first; then the registry's range facts, propagated as intervals.
    Returns (proved, how or why not).
    """
    decided = expr.is_positive if want == "positive" else expr.is_nonpositive
    if decided:
        return True, "by SymPy's assumptions"
    iv = interval_of(expr, {symbol: domain})
    ok = iv.is_positive() if want == "positive" else iv.is_nonpositive()
    return ok, f"its range over {symbol} in {domain} is within {iv}"


def prove_defined(expr: sp.Expr, symbol: sp.Symbol, domain: Interval) -> tuple[bool, str]:
    """Try to prove ``expr`` is real and finite everywhere on ``domain``: every log argument > 0, every
    fractional power's base >= 0 (> 0 for negative powers), no division by a range that holds 0.

    A product with a step factor ``Heaviside(symbol)`` (a derivative of relu or max at a kink) is printed
    as 0 where the step is 0 (see the printers), so its other factors need to be defined only where
    ``symbol > 0``."""
    why = _undefined(expr, symbol, domain)
    if why is not None:
        return False, why
    return True, f"every log, root and division is defined for {symbol} in {domain}"


def _undefined(expr: sp.Expr, symbol: sp.Symbol, domain: Interval) -> str | None:
    if expr.is_Mul:
        steps = [f for f in expr.args if isinstance(f, sp.Heaviside) and f.args[0] == symbol]
        if steps:
            if domain.hi <= 0:
                return None  # the step is 0 on all of domain
            positive = Interval(max(domain.lo, 0.0), domain.hi, domain.lo_open or domain.lo <= 0, domain.hi_open)
            rest = sp.Mul(*[f for f in expr.args if f is not steps[0]])
            return _undefined(rest, symbol, positive)
    if isinstance(expr, sp.log):
        arg = interval_of(expr.args[0], {symbol: domain})
        if not arg.is_positive():
            return f"the argument of {expr} ranges over {arg}, not only > 0"
    elif expr.is_Pow:
        base, e = expr.args
        arg = interval_of(base, {symbol: domain})
        if not e.is_number:
            if not arg.is_positive():
                return f"{expr} = exp(({e}) log({base})) needs {base} > 0, but its range is {arg}"
        elif e.is_Integer and e < 0 and not (arg.is_positive() or arg.hi < 0 or (arg.hi == 0 and arg.hi_open)):
            return f"{expr} divides by {base}, whose range {arg} holds 0"
        elif not e.is_Integer and (arg.lo < 0 or (e < 0 and not arg.is_positive())):
            return f"{expr} takes a fractional power of {base}, whose range is {arg}"
    for a in expr.args:
        why = _undefined(a, symbol, domain)
        if why is not None:
            return why
    return None


# Ordinary inputs: where a spec's expressions must stay well inside float32's range, so that the kernels
# (which multiply feature maps and sum over a head and a sequence) neither overflow nor lose the answer.
ORDINARY = 16.0  # |x| and |z| up to this (q, k and gates are of order 1 to 10 in practice)
ORDINARY_D = Interval(1.0, 256.0)  # head dims
ORDINARY_BOUND = 1e15  # |value| of every part of phi, log_decay and scale there: phi(q) . phi(k) <= 1e30


def prove_bounded(expr: sp.Expr, symbol: sp.Symbol, domain: Interval, bound: float) -> tuple[bool, str]:
    """Try to prove that every subexpression of ``expr`` stays within [-bound, bound] on ``domain``."""
    seen: dict[sp.Expr, Interval] = {}
    interval_of(expr, {symbol: domain}, seen)
    over = [(sub, iv) for sub, iv in seen.items() if not (-bound <= iv.lo and iv.hi <= bound)]
    if over:
        sub, iv = min(over, key=lambda o: (sp.count_ops(o[0]), str(o[0])))
        return False, f"{sub} ranges over {iv} for {symbol} in {domain}, beyond +-{bound:g}"
    return True, f"every part of it lies within +-{bound:g} for {symbol} in {domain}"


ORDINARY_TINY = 1e-15  # phi must reach this somewhere on ordinary inputs: phi(q) . phi(k) >= 1e-30


def prove_not_tiny(expr: sp.Expr, symbol: sp.Symbol, points: tuple[float, ...], tiny: float) -> tuple[bool, str]:
    """Whether ``expr`` is identically 0 or reaches ``tiny`` in magnitude at one of ``points`` (values it
    takes, so the check is sound); otherwise every product of two of its values underflows float32."""
    if expr.is_zero:
        return True, "it is 0"
    values = [abs(complex(expr.subs(symbol, sp.Float(v, 20)).evalf(20))) for v in points]
    if max(values) >= tiny:
        return True, f"it reaches {max(values):.3g} at {symbol} in {list(points)}"
    return False, f"it stays below {tiny:g} in magnitude at {symbol} in {list(points)} (at most {max(values):.3g})"


def _same_value(a: sp.Expr, b: sp.Expr, symbol: sp.Symbol) -> bool:
    """Numerically (30 digits, at a few points) whether two expressions agree: bounded time, unlike simplify."""
    for v in (-20, -3, -0.5, 0, 0.25, 2, 7, 30):
        point = {symbol: sp.Float(v, 30)}
        x, y = (complex(e.rewrite(sp.exp).subs(point).evalf(30)) for e in (a, b))
        if abs(x - y) > 1e-20 * max(1.0, abs(x), abs(y)):
            return False
    return True


# ---------------------------------------------------------------------------- derivations


def stabilize(expr: sp.Expr) -> sp.Expr:
    """Rewrite forms that lose precision or overflow in fp32 into equal, stable ones.

    log(sigmoid(u)) -> -softplus(-u) and log(1 - sigmoid(u)) -> -softplus(u): the left sides give
    log(0) = -inf once sigmoid rounds to 0 or 1 (u beyond about +-88, or +-17 for 1 - sigmoid),
    and -inf log-gates turn mask differences into NaN (lion_math.md section 6, pitfall 2).
    """
    u = sp.Wild("u")

    def rule(e: sp.Expr) -> sp.Expr:
        if isinstance(e, sp.log):
            arg = e.args[0]
            if isinstance(arg, sigmoid):
                return -softplus(-arg.args[0])
            m = (arg - 1).match(-sigmoid(u))
            if m is not None and u in m:
                return -softplus(m[u])
        return e

    return expr.replace(lambda e: isinstance(e, sp.log), rule)


def elementwise(expr: sp.Expr, symbol: sp.Symbol, prefix: str) -> Elementwise:
    """CSE an elementwise expression into named temporaries (deterministic names).

    The printers write some arguments more than once (silu(a) as a * sigmoid(a), elu's branches, an integer
    power as a product of its base): each such argument that is not a symbol or a number gets a temporary
    of its own, so that nested calls print in size linear in the expression, not exponential."""
    names = sp.numbered_symbols(prefix, real=True)
    steps, (result,) = sp.cse(expr, symbols=names, optimizations="basic")
    out: list[tuple[sp.Symbol, sp.Expr]] = []
    for sym, e in steps:
        out.append((sym, _name_repeated(e, names, out)))
    result = _name_repeated(result, names, out)
    return Elementwise(symbol, expr, tuple(out), result)


def _repeats_its_argument(e: sp.Expr) -> bool:
    if isinstance(e, (silu, elu, sp.sign)):
        return True
    return bool(e.is_Pow and e.args[1].is_Integer and abs(int(e.args[1])) >= 2)


def _name_repeated(e: sp.Expr, names: Any, steps: list[tuple[sp.Symbol, sp.Expr]]) -> sp.Expr:
    """``e`` with every argument a printer repeats moved into a new step (appended to ``steps``)."""
    if e.is_Atom:
        return e
    args = [_name_repeated(a, names, steps) for a in e.args]
    if _repeats_its_argument(e) and not args[0].is_Atom:
        sym = next(names)
        steps.append((sym, args[0]))
        args[0] = sym
    if args == list(e.args):
        return e
    return e.func(*args, evaluate=False) if e.is_Add or e.is_Mul or e.is_Pow else e.func(*args)


def derive_l2_adjoint() -> sp.Expr:
    """The adjoint of phi = r / ||r||, derived by differentiation and verified symbolically.

    For a loss with gradient g wrt phi: dL/dr = (g - phi (phi . g)) / ||r||. Returned in the
    symbols g, phi, dot (= phi . g) and norm (= ||r||), which the kernel has at hand.
    """
    r = sp.symbols("r1:4", real=True)
    g = sp.symbols("g1:4", real=True)
    norm = sp.sqrt(sum(ri**2 for ri in r))
    loss = sum(gi * ri / norm for gi, ri in zip(g, r, strict=True))
    derived = sp.diff(loss, r[0])
    gs, phis, dots, norms = sp.symbols("g phi dot norm", real=True)
    adjoint = (gs - phis * dots) / norms
    claim = adjoint.subs(
        {gs: g[0], phis: r[0] / norm, dots: sum(gi * ri / norm for gi, ri in zip(g, r, strict=True)), norms: norm}
    )
    if sp.simplify(derived - claim) != 0:  # pragma: no cover - a SymPy regression would land here
        raise AssertionError("l2 adjoint derivation does not match the kernel's form")
    return adjoint


# ---------------------------------------------------------------------------- stage graph

# The chunk form's launch schedule (docs/design.md). Each stage is one kernel launch: its pass, the
# template it is rendered from, the generated function it launches, its grid, what it computes, the
# buffers it reads and writes, and when a spec needs it. Buffers exist under conditions too; a stage
# reads and writes only the buffers its spec has. Edges run from the stage that writes a buffer to
# the stages that read it, so the graph is the schedule: its topological order is the launch order.
# A stage's reads and writes, in order, are also its kernel's pointer arguments (codegen renders the
# kernel's signature and its launch from that one list): "role=buffer" binds a buffer to the name the
# template calls it by (role_ptr), a bare name is its own role.
Switches = dict[str, bool]
Entry = str | tuple[str, Callable[[Switches], bool]]


def _always(s: Switches) -> bool:
    return True


def _local(s: Switches) -> bool:  # not the global-state case: chunks see their own keys (the intra block)
    return not s["global"]


def _global(s: Switches) -> bool:  # no mask, bidirectional: one global state
    return s["global"]


def _two_way(s: Switches) -> bool:  # states flow in from both sides
    return s["bidir"] and not s["global"]


def _gated(s: Switches) -> bool:
    return s["gated"]


def _causal(s: Switches) -> bool:  # a state at a row boundary summarizes the prefix (docs/contract.md)
    return not s["bidir"]


# Buffer kinds: "rows", a (B, L, H, ...) tensor; "state", (Dk, Dv) states in the state dtype with their
# fp32 (Dk,) normalizer columns "z" (kernel arguments role_ptr and rolez_ptr); "gate", the raw gate
# (g_ptr, G_ROWED: whether its offset has a per-row part, G_STRIDE: its row stride); "numbers", fp32
# numbers per row, chunk or segment; "mask", the key padding mask (B, L) (pad_ptr, None when the call has
# no mask: the kernels branch on it at compile time); "table", the packed batch's int32 sequence table
# (seqs_ptr, None for a (B, L) batch: compiled out).
BUFFERS: dict[str, tuple[str, str, Callable[[Switches], bool]]] = {
    # inputs of the op (written by no stage)
    "q": ("queries (B, L, H, Dk)", "rows", _always),
    "k": ("keys (B, L, H, Dk)", "rows", _always),
    "v": ("values (B, L, H, Dv)", "rows", _always),
    "gate": ("raw gates", "gate", _gated),
    "pad": ("the key padding mask (B, L), True = real token (or None)", "mask", _always),
    "seqs": (
        "packed batch (cu_seqlens): per sequence its first row, chunk and segment, (N + 1, 3) int32 (or None)",
        "table",
        _always,
    ),
    "dy": ("the output's gradient (B, L, H, Dv)", "rows", _always),
    # causal state (docs/contract.md): optional, passed as None when absent (Triton specializes None)
    "initial_state": ("the state at row boundary 0, S0 (optional input)", "state", _causal),
    "d_final_state": ("the final state's gradient (optional input)", "state", _causal),
    # forward
    "seg_decay": ("T_s: each segment's total log-decay", "numbers", _gated),
    "to_end": ("P_b - P_en: log-decay from each chunk's end to its segment's end", "numbers", _gated),
    "kv_summary_left": ("per segment: sum exp(P_b - F_j) K_j v'_j^T", "state", _always),
    "kv_summary_right": ("per segment: sum exp(G_j - P_a) K_j v'_j^T", "state", _two_way),
    "kv_chunk_right": (
        "per chunk: the (K, v') state entering it from the right, within its segment",
        "state",
        _two_way,
    ),
    "kv_carried_left": (
        "per segment: the (K, v') state carried in from the left (no mask: the total)",
        "state",
        _always,
    ),
    "kv_carried_right": ("per segment: the (K, v') state carried in from the right", "state", _two_way),
    "y": ("the output (B, L, H, Dv)", "rows", _always),
    # no mask: n_i = Q_i . z is recomputed from the global z where it is needed, not stored
    "n": ("row sums n_i (B, L, H)", "numbers", lambda s: s["normalize"] and not s["global"]),
    "final_state": ("the state at row boundary L, S_L (only when asked for)", "state", _causal),
    # backward
    "dn": ("-(dY . Y) / (n + eps) per row", "numbers", lambda s: s["normalize"] and not s["global"]),
    "qd_summary_left": ("per segment: sum exp(P_b - G_i) Q_i dO'_i^T", "state", lambda s: s["bidir"] or s["global"]),
    "qd_summary_right": ("per segment: sum exp(F_i - P_a) Q_i dO'_i^T", "state", _local),
    "qd_chunk_right": ("per chunk: the (Q, dO') state entering it from the right, within its segment", "state", _local),
    "qd_carried_left": (
        "per segment: the (Q, dO') state carried in from the left (no mask: the total)",
        "state",
        lambda s: s["bidir"] or s["global"],
    ),
    "qd_carried_right": ("per segment: the (Q, dO') state carried in from the right", "state", _local),
    "dq": ("dq (B, L, H, Dk)", "rows", _always),
    "dk": ("dk (B, L, H, Dk)", "rows", _always),
    "dv": ("dv (B, L, H, Dv)", "rows", _always),
    "dF": ("gate terms dF per row", "numbers", _gated),
    "dF_sums": ("per segment: the sum of dF", "numbers", _gated),
    "dG": ("gate terms dG per row", "numbers", lambda s: s["gated"] and s["bidir"]),
    "dG_sums": ("per segment: the sum of dG", "numbers", lambda s: s["gated"] and s["bidir"]),
    "dgate": (
        "the gate's gradient (fixed decay: per (b, h, segment) partial sums, summed on the host)",
        "numbers",
        _gated,
    ),
    "d_initial_state": ("the initial state's gradient: the (Q, dO') state from the right at row 0", "state", _causal),
    "dl_final": (
        "per (b, h): <d final_state, final_state>, the final state's share of every dl_s",
        "numbers",
        lambda s: s["gated"] and not s["bidir"],
    ),
}

# (stage, pass, template, function, grid, what it computes, reads, writes, condition)
STAGES: tuple[tuple[Any, ...], ...] = (
    (
        "fwd_summary",
        "forward",
        "summary",
        "fwd_summary",
        "(b, h, segment)",
        "per-segment summaries of (K, v'), right to left, and the state entering each chunk from its right",
        ("k", "v", "g=gate", "pad", "seqs"),
        ("t=seg_decay", "rs=to_end", "sl=kv_summary_left", "sr=kv_summary_right", "cr=kv_chunk_right"),
        _always,
    ),
    (
        "fwd_scan",
        "forward",
        "scan",
        "fwd_scan",
        "(b, h)",
        "the (K, v') states carried into every segment (a short sequential scan over segments)",
        ("t=seg_decay", "sl=kv_summary_left", "sr=kv_summary_right", "h0=initial_state", "seqs"),
        ("hl=kv_carried_left", "hr=kv_carried_right"),
        _always,
    ),
    (
        "fwd_output",
        "forward",
        "output",
        "fwd_output",
        "(b, h, segment)",
        "y (and n) per chunk: intra-chunk attention plus the carried states, left to right",
        (
            "q",
            ("k", _local),
            ("v", _local),
            "g=gate",
            "pad",
            ("rs=to_end", _two_way),
            "hl=kv_carried_left",
            "hr=kv_carried_right",
            "cr=kv_chunk_right",
            "h0=initial_state",
            "seqs",
        ),
        ("y", "n", "hn=final_state"),
        _always,
    ),
    (
        "bwd_summary",
        "backward",
        "summary",
        "bwd_summary",
        "(b, h, segment)",
        "dO' per row, per-segment summaries of (Q, dO') and the state entering each chunk from its right "
        "(no mask: sums of Q dO'^T, and dq from the global state, with Y recomputed instead of read)",
        (
            "q",
            ("y", lambda s: s["normalize"] and not s["global"]),
            "n",
            "dy",
            "g=gate",
            "pad",
            ("hl=kv_carried_left", _global),
            "seqs",
        ),
        ("dn", "sl=qd_summary_left", "sr=qd_summary_right", "cr=qd_chunk_right", ("dq", _global)),
        _always,
    ),
    (
        "bwd_scan",
        "backward",
        "scan",
        "bwd_scan",
        "(b, h)",
        "the (Q, dO') states carried into every segment",
        (
            "t=seg_decay",
            "sl=qd_summary_left",
            "sr=qd_summary_right",
            "dhn=d_final_state",
            ("hn=final_state", _gated),
            "seqs",
        ),
        ("hl=qd_carried_left", "hr=qd_carried_right", "dlf=dl_final"),
        _always,
    ),
    (
        "bwd_grads",
        "backward",
        "grads",
        "bwd_grads",
        "(b, h, segment)",
        "dq, dk, dv (through phi') and the gate terms per row, left to right (no mask: dk, dv)",
        (
            ("q", _local),
            "k",
            "v",
            "g=gate",
            "pad",
            "rs=to_end",
            ("n", _local),
            ("dy", _local),
            "dn",
            ("hl=kv_carried_left", _local),
            "hr=kv_carried_right",
            "cr=kv_chunk_right",
            ("sl=qd_summary_left", _global),
            "ql=qd_carried_left",
            "qr=qd_carried_right",
            "cq=qd_chunk_right",
            "h0=initial_state",
            "dhn=d_final_state",
            "seqs",
        ),
        (("dq", _local), "dk", "dv", "df=dF", "tf=dF_sums", "dg=dG", "tg=dG_sums", "dh0=d_initial_state"),
        _always,
    ),
    (
        "gate_grad",
        "backward",
        "gate",
        "gate_grad",
        "(b, h, segment)",
        "suffix sums of the gate terms, times d log_decay / dz",
        ("g=gate", "pad", "df=dF", "tf=dF_sums", "dg=dG", "tg=dG_sums", "dlf=dl_final", "seqs"),
        ("out=dgate",),
        _gated,
    ),
)
SINKS = ("y", "dq", "dk", "dv", "dgate", "final_state", "d_initial_state")  # what the op returns
INPUTS = ("q", "k", "v", "gate", "pad", "seqs", "dy", "initial_state", "d_final_state")  # what no stage writes


def _entry(entry: Entry, switches: Switches) -> tuple[str, str] | None:
    """(role, buffer) of a read or write, or None when its condition does not hold."""
    if not isinstance(entry, str):
        entry, cond = entry
        if not cond(switches):
            return None
    role, _, buffer = entry.rpartition("=")
    return role or buffer, buffer


def stage_graph(switches: Switches) -> nx.DiGraph:
    """The chunk form's launch schedule for these switches: one node per launch, edges labelled with
    the buffers that pass between launches. Stages and buffers a spec does not need are absent. A node's
    ``args`` are its kernel's pointer arguments in order, as (role, buffer, kind)."""
    buffers = {name: kind for name, (_, kind, cond) in BUFFERS.items() if cond(switches)}
    g = nx.DiGraph()
    for name, pass_, template, function, grid, doc, reads, writes, cond in STAGES:
        if not cond(switches):
            continue
        bound = {
            side: [e for e in (_entry(x, switches) for x in entries) if e is not None and e[1] in buffers]
            for side, entries in (("reads", reads), ("writes", writes))
        }
        g.add_node(
            name,
            kernel=pass_,
            template=template,
            function=function,
            grid=grid,
            doc=doc,
            reads=tuple(b for _, b in bound["reads"]),
            writes=tuple(b for _, b in bound["writes"]),
            args=tuple((role, b, buffers[b]) for role, b in bound["reads"] + bound["writes"]),
        )
    writer = {b: n for n in g for b in g.nodes[n]["writes"]}
    for n in g:
        for b in g.nodes[n]["reads"]:
            if b in writer:
                if g.has_edge(writer[b], n):
                    g.edges[writer[b], n]["buffers"] += (b,)
                else:
                    g.add_edge(writer[b], n, buffers=(b,))
    if not nx.is_directed_acyclic_graph(g):  # pragma: no cover - STAGES is a constant
        raise AssertionError("stage graph has a cycle")
    return g


# ---------------------------------------------------------------------------- the planner


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part) or name


def _check(spec: Spec, field: str, ok: bool, what: str, how: str, facts: list[str], warns: list[str]) -> None:
    if ok:
        facts.append(f"{what}: proved ({how})")
        return
    if not spec.allow_unproven:  # derived expressions can be long: the message stays one readable line
        raise SpecError(
            spec.source,
            field,
            f"cannot prove {shorten(what, 200)}: {shorten(how, 200)} "
            "(set allow_unproven: true to accept it with a warning)",
        )
    msg = f"{spec.source}: {field}: accepted without proof: {what} ({how})"
    warns.append(msg)
    facts.append(f"{what}: NOT proved, accepted by allow_unproven ({how})")
    warnings.warn(msg, UnprovenWarning, stacklevel=3)


def plan(spec: Spec) -> Plan:
    """Derive everything the templates need from a validated Spec. Raises SpecError on a failed proof."""
    facts: list[str] = []
    warns: list[str] = []
    phi = spec.feature_map.expr
    d_range = Interval(1.0, math.inf, False, True)
    for field, expr, sym, dom, what in (
        ("feature_map.expr", phi, X, Interval.real(), f"phi(x) = {phi} is defined for every real x"),
        ("scale", spec.scale, D, d_range, f"scale = {spec.scale} is defined for every head dim d >= 1"),
        ("mask.log_decay", spec.mask.log_decay, Z, Interval.real(), f"log_decay(z) = {spec.mask.log_decay} is defined"),
    ):
        if expr is not None:
            ok, how = prove_defined(expr, sym, dom)
            _check(spec, field, ok, what, how, facts, warns)
    stable_phi = stabilize(phi)
    dphi = sp.diff(stable_phi, X)
    ok, how = prove_defined(dphi, X, Interval.real())
    _check(spec, "feature_map.expr", ok, f"phi'(x) = {dphi} is defined for every real x", how, facts, warns)
    for field, expr, sym, dom, what in (
        ("feature_map.expr", stable_phi, X, Interval(-ORDINARY, ORDINARY), f"phi(x) = {phi}"),
        ("scale", spec.scale, D, ORDINARY_D, f"scale = {spec.scale}"),
    ):
        ok, how = prove_bounded(expr, sym, dom, ORDINARY_BOUND)
        _check(spec, field, ok, f"{what} stays within float32's range", how, facts, warns)
    ok, how = prove_not_tiny(stable_phi, X, (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0), ORDINARY_TINY)
    _check(spec, "feature_map.expr", ok, f"phi(x) = {phi} is not tiny (no underflow)", how, facts, warns)
    ok, how = prove_not_tiny(spec.scale, D, (1.0, 16.0, 64.0, 256.0), ORDINARY_TINY)
    _check(spec, "scale", ok, f"scale = {spec.scale} is not tiny (no underflow)", how, facts, warns)
    if spec.normalize_rows:
        ok, how = prove(phi, X, Interval.real(), "positive")
        _check(spec, "feature_map.expr", ok, f"phi(x) = {phi} > 0 (normalize_rows: true)", how, facts, warns)
        ok, how = prove(spec.scale, D, d_range, "positive")
        _check(spec, "scale", ok, f"scale = {spec.scale} > 0 for d >= 1 (normalize_rows: true)", how, facts, warns)

    log_decay = log_decay_grad = None
    if spec.mask.log_decay is not None:
        ld = spec.mask.log_decay
        ok, how = prove(ld, Z, Interval.real(), "nonpositive")
        _check(spec, "mask.log_decay", ok, f"log_decay(z) = {ld} <= 0", how, facts, warns)
        stable = stabilize(ld)
        if stable != ld and not _same_value(stable, ld, Z):  # pragma: no cover - guards the rules above
            raise AssertionError(f"stabilize changed the value of {ld}")
        dl = sp.diff(stable, Z)
        ok, how = prove_defined(dl, Z, Interval.real())
        _check(spec, "mask.log_decay", ok, f"d log_decay/dz = {dl} is defined for every real z", how, facts, warns)
        zone = Interval(-ORDINARY, ORDINARY)
        ok, how = prove_bounded(stable, Z, zone, ORDINARY_BOUND)
        _check(spec, "mask.log_decay", ok, f"log_decay(z) = {ld} stays within float32's range", how, facts, warns)
        log_decay = elementwise(stable, Z, "t")
        log_decay_grad = elementwise(dl, Z, "t")

    if spec.direction == "causal":
        f_shift, g_shift = 1, 1  # M_ij = exp(c_i - c_j), c = inclusive prefix sum
    elif spec.mask.alignment == "symmetric":
        f_shift, g_shift = 1, 1  # M_ij = exp(-|c_i - c_j|)
    else:
        f_shift, g_shift = 0, 1  # the reference code's mask (lion alignment; decay masks are symmetric anyway)

    switches = {
        "gated": spec.mask.family != "none",
        "global": spec.mask.family == "none" and spec.direction == "bidirectional",
        "bidir": spec.direction == "bidirectional",
        "normalize": spec.normalize_rows,
    }
    l2 = spec.feature_map.normalize == "l2"
    return Plan(
        name=spec.name,
        class_name=_camel(spec.name),
        spec=spec.to_dict(),
        direction=spec.direction,
        family=spec.mask.family,
        alignment=spec.mask.alignment,
        f_shift=f_shift,
        g_shift=g_shift,
        normalize_rows=spec.normalize_rows,
        l2=l2,
        eps=spec.eps,
        default_chunk=spec.chunk_size or DEFAULT_CHUNK,
        scale=spec.scale,
        feature=elementwise(stable_phi, X, "u"),
        feature_grad=elementwise(dphi, X, "u"),
        l2_adjoint=derive_l2_adjoint(),
        log_decay=log_decay,
        log_decay_grad=log_decay_grad,
        stages=stage_graph(switches),
        equations=equations(spec, f_shift, g_shift),
        facts=tuple(facts),
        warnings=tuple(warns),
    )


def _rename(expr: sp.Expr, name: str) -> sp.Expr:
    """``expr`` with z renamed, for display: a real symbol, so that nothing is evaluated anew."""
    return expr.xreplace({Z: sp.Symbol(name, real=True)})


def equations(spec: Spec, f_shift: int, g_shift: int) -> tuple[str, ...]:
    """The math the generated kernels implement, as text (for explain and the file header)."""
    norm = " / ||f(x)||_2 (over the head dim)" if spec.feature_map.normalize == "l2" else ""
    eq = [
        f"phi(x) = f(x){norm},  f(x) = {spec.feature_map.expr}",
        f"Q_i = scale * phi(q_i),  K_j = phi(k_j),  scale = {spec.scale}",
    ]
    fam = spec.mask.family
    if fam == "selective":
        eq.append(f"l_t = {_rename(spec.mask.log_decay, 'gate[b,t,h]')}  (<= 0)")
    elif fam == "decay":
        eq.append(f"l_t = {_rename(spec.mask.log_decay, 'gate[h]')}  (<= 0, every t)")
    if fam != "none":
        eq.append("P_m = sum_{s<m} l_s (exclusive prefix sum, fp32, chunk-local in the kernels)")
        eq.append(f"F_m = P_(m+{f_shift}),  G_m = P_(m+{g_shift})")
        if spec.direction == "causal":
            eq.append("M_ij = exp(F_i - F_j) for i >= j, 0 for i < j")
        else:
            eq.append("M_ij = exp(F_i - F_j) (i > j),  1 (i = j),  exp(G_j - G_i) (i < j)")
    else:
        eq.append("M_ij = 1" + (" for i >= j, 0 for i < j" if spec.direction == "causal" else ""))
    eq.append("A_ij = M_ij (Q_i . K_j)")
    if spec.normalize_rows:
        eq.append(f"y_i = sum_j A_ij v_j / (sum_j A_ij + {spec.eps})")
    else:
        eq.append("y_i = sum_j A_ij v_j")
    if fam != "none":
        eq.append("W_ij = (dO'_i . v'_j) A_ij,  dF_m = sum_{j<m} W_mj - sum_{i>m} W_im")
        dl = f"dl_s = sum_(m+{f_shift}>s) dF_m"
        if spec.direction == "bidirectional":
            eq.append("dG_m = sum_{i<m} W_im - sum_{j>m} W_mj")
            dl += f" + sum_(m+{g_shift}>s) dG_m"
        eq.append(f"{dl},  dgate = dl * d log_decay/dz")
    return tuple(eq)
