"""Spec -> Plan: derivatives, the l2 adjoint, static proofs, stabilization, specialization, the stage DAG."""

from __future__ import annotations

import math
from pathlib import Path

import mpmath
import networkx as nx
import numpy as np
import pytest
import sympy as sp

from lion_gen.functions import REGISTRY, Interval, elu, parse_expression, relu, sigmoid, silu, softplus
from lion_gen.plan import Elementwise, Plan
from lion_gen.planner import (
    INPUTS,
    SINKS,
    UnprovenWarning,
    derive_l2_adjoint,
    interval_of,
    plan,
    prove,
    stabilize,
    stage_graph,
)
from lion_gen.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
X = sp.Symbol("x", real=True)
Z = sp.Symbol("z", real=True)

# numpy implementations of the registry's own SymPy functions (the rest lambdify to numpy directly)
NP = {
    "sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)),
    "softplus": lambda v: np.logaddexp(0.0, v),
    "silu": lambda v: v / (1.0 + np.exp(-v)),
    "elu": lambda v: np.where(v > 0, v, np.expm1(np.minimum(v, 0.0))),
    "relu": lambda v: np.maximum(v, 0.0),
}


def numeric(expr, sym):
    f = sp.lambdify(sym, expr, modules=[NP, "numpy"])
    return lambda v: np.broadcast_to(np.asarray(f(v), dtype=np.float64), np.shape(v))


def central_difference(f, v, h=1e-6):
    return (f(v + h) - f(v - h)) / (2 * h)


def assert_derivative(expr, deriv, sym, points):
    pts = np.asarray(points, dtype=np.float64)
    got = numeric(deriv, sym)(pts)
    want = central_difference(numeric(expr, sym), pts)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def spec_of(**fields):
    data = {"name": "t", "feature_map": {"expr": "silu(x) + 1/2", "normalize": "l2"}, "mask": {"family": "none"}}
    data.update(fields)
    return parse_spec(data, "t.yaml")


@pytest.fixture(scope="module")
def plans() -> dict[str, Plan]:
    return {p.stem: plan(load_spec(p)) for p in SPECS}


# ---------------------------------------------------------------------------- derivatives

GENERIC = [-3.1, -1.2, -0.37, 0.21, 0.9, 2.6]
POSITIVE = [0.13, 0.5, 1.0, 2.3, 4.7]
DERIVATIVES = [
    ("exp", "exp(x)", GENERIC),
    ("log", "log(x)", POSITIVE),
    ("sigmoid", "sigmoid(x)", GENERIC + [-12.0, 12.0]),
    ("softplus", "softplus(x)", GENERIC + [-12.0, 12.0]),
    ("silu", "silu(x)", GENERIC + [-7.5, 7.5]),
    ("silu", "silu(2*x - 1)", GENERIC),
    ("elu", "elu(x)", GENERIC),
    ("relu", "relu(x)", GENERIC),
    ("tanh", "tanh(x)", GENERIC),
    ("sqrt", "sqrt(x)", POSITIVE),
    ("abs", "abs(x)", GENERIC),
    ("pow", "pow(x, 3)", GENERIC),
    ("pow", "x**3", GENERIC),
    ("pow", "pow(x, 1/2)", POSITIVE),
    ("pow", "x**0.5", POSITIVE),
    ("pow", "x**-2", GENERIC),
    ("min", "min(x, 1)", GENERIC),
    ("min", "min(x, x**2, 1/2)", [-2.0, -0.3, 0.2, 0.6, 2.0]),
    ("max", "max(x, 0)", GENERIC),
    ("max", "max(x, 0, -x/2)", GENERIC),
    ("max", "max(sigmoid(x), 1/3)", [-3.0, -1.0, 0.5, 2.0]),
]


def test_every_registry_function_has_a_derivative_check():
    assert {name for name, _, _ in DERIVATIVES} == set(REGISTRY)


@pytest.mark.parametrize("name,text,points", DERIVATIVES, ids=[d[1] for d in DERIVATIVES])
def test_registry_derivative_matches_finite_differences(name, text, points):
    expr = parse_expression(text, "x")
    assert_derivative(expr, sp.diff(expr, X), X, points)


@pytest.mark.parametrize(
    "fn,ref",
    [
        (sigmoid, lambda v: 1 / (1 + math.exp(-v))),
        (softplus, lambda v: math.log1p(math.exp(v))),
        (silu, lambda v: v / (1 + math.exp(-v))),
        (elu, lambda v: v if v > 0 else math.expm1(v)),
        (relu, lambda v: max(v, 0.0)),
    ],
    ids=["sigmoid", "softplus", "silu", "elu", "relu"],
)
def test_sympy_functions_mean_what_their_names_say(fn, ref):
    """The SymPy definitions (via rewrite to exp) and the numpy helpers above agree with the textbook."""
    for v in (-4.0, -0.5, 0.0, 0.7, 3.0):
        assert float(fn(X).rewrite(sp.exp).subs(X, v).evalf()) == pytest.approx(ref(v), rel=1e-12, abs=1e-12)
        assert float(NP[fn.__name__](np.float64(v))) == pytest.approx(ref(v), rel=1e-12, abs=1e-12)


def test_derivatives_evaluated_with_evalf():
    """The same check through SymPy's own evaluation (no numpy)."""
    for text in ("silu(x)", "softplus(x)", "sigmoid(x)", "elu(x)"):
        expr = parse_expression(text, "x")
        deriv = sp.diff(expr, X).rewrite(sp.exp)
        f = expr.rewrite(sp.exp)
        h = sp.Rational(1, 10**8)
        for v in (sp.Rational(-7, 5), sp.Rational(3, 10), sp.Rational(9, 4)):
            fd = (f.subs(X, v + h) - f.subs(X, v - h)) / (2 * h)
            assert float(deriv.subs(X, v).evalf(30)) == pytest.approx(float(fd.evalf(30)), rel=1e-9)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_planned_feature_grad_matches_finite_differences(path, plans):
    p = plans[path.stem]
    pts = np.linspace(-6.0, 6.0, 25) + 0.013  # avoid exact kinks
    assert_derivative(p.feature.expr, p.feature_grad.expr, X, pts)
    # the planned feature map (after stabilization) is the spec's f
    spec = load_spec(path)
    np.testing.assert_allclose(numeric(p.feature.expr, X)(pts), numeric(spec.feature_map.expr, X)(pts), rtol=1e-12)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_planned_log_decay_grad_matches_finite_differences(path, plans):
    p = plans[path.stem]
    spec = load_spec(path)
    if spec.mask.family == "none":
        assert p.log_decay is None and p.log_decay_grad is None
        return
    pts = np.linspace(-8.0, 8.0, 33) + 0.011
    assert_derivative(p.log_decay.expr, p.log_decay_grad.expr, Z, pts)
    # and against the spec's own (unstabilized) log_decay: stabilization does not change the value
    assert_derivative(spec.mask.log_decay, p.log_decay_grad.expr, Z, pts)
    np.testing.assert_allclose(numeric(p.log_decay.expr, Z)(pts), numeric(spec.mask.log_decay, Z)(pts), rtol=1e-10)


def _rebuild(ew: Elementwise) -> sp.Expr:
    out = ew.result
    for sym, step in reversed(ew.steps):
        out = out.subs(sym, step)
    return out


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_cse_steps_rebuild_the_expression(path, plans):
    p = plans[path.stem]
    parts = [p.feature, p.feature_grad] + ([p.log_decay, p.log_decay_grad] if p.log_decay else [])
    pts = np.linspace(-5.0, 5.0, 11) + 0.017
    for ew in parts:
        np.testing.assert_allclose(
            numeric(_rebuild(ew), ew.symbol)(pts), numeric(ew.expr, ew.symbol)(pts), rtol=1e-12, atol=1e-15
        )


# ---------------------------------------------------------------------------- the l2 adjoint


def test_l2_adjoint_form():
    g, phi, dot, norm = sp.symbols("g phi dot norm", real=True)
    adj = derive_l2_adjoint()
    assert adj.free_symbols == {g, phi, dot, norm}
    assert sp.simplify(adj - (g - phi * dot) / norm) == 0


def test_l2_adjoint_matches_finite_differences():
    g_s, phi_s, dot_s, norm_s = sp.symbols("g phi dot norm", real=True)
    adj = sp.lambdify((g_s, phi_s, dot_s, norm_s), derive_l2_adjoint(), modules="numpy")
    rng = np.random.default_rng(0)
    for _ in range(3):
        r = rng.standard_normal(5)
        g = rng.standard_normal(5)

        def loss(rr, g=g):
            return float(g @ (rr / np.linalg.norm(rr)))

        h = 1e-6
        fd = np.array([(loss(r + h * e) - loss(r - h * e)) / (2 * h) for e in np.eye(5)])
        norm = np.linalg.norm(r)
        phi = r / norm
        got = adj(g, phi, float(phi @ g), norm)
        np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8)


def test_plan_carries_the_l2_adjoint(plans):
    assert plans["lion_s"].l2 is True
    assert plans["lion_lit"].l2 is False
    assert sp.simplify(plans["lion_s"].l2_adjoint - derive_l2_adjoint()) == 0


# ---------------------------------------------------------------------------- proofs


@pytest.mark.parametrize(
    "text",
    [
        "silu(x) + 1/2",
        "elu(x) + 1",
        "exp(x)",
        "x**2 + 1",
        "sigmoid(x)",
        "softplus(x)",
        "tanh(x) + 1",
        "relu(x) + 1/100",
    ],
)
def test_proved_positive(text):
    ok, how = prove(parse_expression(text, "x"), X, Interval.real(), "positive")
    assert ok, how


@pytest.mark.parametrize(
    "text", ["silu(x)", "x", "elu(x) + 0.5", "elu(x) + 1/2", "relu(x)", "tanh(x)", "-exp(x)", "x**2"]
)
def test_not_proved_positive(text):
    ok, how = prove(parse_expression(text, "x"), X, Interval.real(), "positive")
    assert not ok
    assert "range" in how


def test_elu_plus_half_range():
    iv = interval_of(parse_expression("elu(x) + 0.5", "x"), {X: Interval.real()})
    assert iv.lo == pytest.approx(-0.5)
    assert iv.hi == math.inf


def test_tanh_plus_one_is_positive_with_an_open_lower_end():
    """tanh(x) + 1 takes every value in (0, 2) and never 0: it IS positive."""
    iv = interval_of(parse_expression("tanh(x) + 1", "x"), {X: Interval.real()})
    assert (iv.lo, iv.hi) == (0.0, 2.0)
    assert iv.lo_open
    assert iv.is_positive()


@pytest.mark.parametrize("text", ["-softplus(z)", "log(sigmoid(z))", "-z**2", "log(1 - sigmoid(z))", "-abs(z)", "0*z"])
def test_proved_nonpositive(text):
    ok, how = prove(parse_expression(text, "z"), Z, Interval.real(), "nonpositive")
    assert ok, how


@pytest.mark.parametrize("text", ["z", "-z", "softplus(z)", "sigmoid(z)", "-softplus(z) + 1/10"])
def test_not_proved_nonpositive(text):
    ok, _ = prove(parse_expression(text, "z"), Z, Interval.real(), "nonpositive")
    assert not ok


def test_interval_of_is_sound_on_samples():
    """Sampled values of each shipped expression lie inside the computed range."""
    pts = np.linspace(-30.0, 30.0, 2001)
    for text, sym, name in [
        ("silu(x) + 1/2", X, "x"),
        ("elu(x) + 1", X, "x"),
        ("tanh(x) + 1", X, "x"),
        ("x**3 - x", X, "x"),
        ("log(sigmoid(z))", Z, "z"),
        ("-softplus(z)", Z, "z"),
        ("1/(1 + z**2)", Z, "z"),
    ]:
        expr = parse_expression(text, name)
        iv = interval_of(expr, {sym: Interval.real()})
        vals = numeric(expr, sym)(pts)
        vals = vals[np.isfinite(vals)]
        assert vals.min() >= iv.lo - 1e-12 and vals.max() <= iv.hi + 1e-12, (text, iv)


def test_interval_of_a_bounded_domain():
    iv = interval_of(X**2 - 1, {X: Interval(1.0, 3.0)})
    assert (iv.lo, iv.hi) == (0.0, 8.0)
    assert not iv.is_positive()
    assert interval_of(X**2 - 1, {X: Interval(1.0, 3.0, lo_open=True)}).is_positive()


# Regression (fixed): the range of a negative non-integer power (planner._pow) is computed as the range of the
# positive power, with its ends swapped: for u in (1, 2), u**(-1/2) is given the "interval" (1.414, 1)
# instead of (0.707, 1). Proofs then accept false facts. Reproduction:
#   prove(parse_expression("1/sqrt(sigmoid(x) + 1) - 6/5", "x"), X, Interval.real(), "positive")
#   -> (True, '... within (0.214214, -0.2)'), yet the expression lies in (-0.49, -0.2) for every x.
def test_negative_fractional_power_range_is_sound():
    expr = parse_expression("1/sqrt(sigmoid(x) + 1) - 6/5", "x")
    iv = interval_of(expr, {X: Interval.real()})
    vals = numeric(expr, X)(np.linspace(-20.0, 20.0, 401))
    assert iv.lo <= vals.min() and vals.max() <= iv.hi, str(iv)
    ok, how = prove(expr, X, Interval.real(), "positive")
    assert not ok, how


# Regression (fixed): same cause; a log_decay that is positive (its decay a = exp(l) exceeds 1) is accepted as <= 0.
# Reproduction: plan(parse_spec({"name": "t", "feature_map": {"expr": "exp(x)"},
#   "mask": {"family": "selective", "log_decay": "1/sqrt(1 - sigmoid(z)/2) - 1"}}))
# plans without error and records "log_decay(z) = ... <= 0: proved (... within (0, -0.292893))",
# while the value is 0.155 at z = 0 and approaches 0.414 as z grows.
def test_positive_log_decay_with_a_fractional_power_is_refused():
    spec = spec_of(mask={"family": "selective", "log_decay": "1/sqrt(1 - sigmoid(z)/2) - 1"})
    assert float(spec.mask.log_decay.subs(Z, 0).rewrite(sp.exp)) > 0.15
    with pytest.raises(SpecError) as info:
        plan(spec)
    assert info.value.field == "mask.log_decay"


# Regression (fixed): the range of u**(-p) (p not an integer) raises ZeroDivisionError when the range of u ends at 0
# (even an open end), so the planner crashes instead of refusing with a SpecError. Reproduction:
#   plan(parse_spec({"name": "t", "feature_map": {"expr": "exp(x)"},
#        "mask": {"family": "selective", "log_decay": "1/10 - 1/sqrt(softplus(z))"}}))
#   -> ZeroDivisionError: 0.0 cannot be raised to a negative power (planner._pow via functions._safe).
# The expression is not <= 0 (it tends to 1/10 as z grows), so the plan must be refused.
def test_negative_fractional_power_of_a_range_touching_zero_is_refused_not_crashed():
    spec = spec_of(
        feature_map={"expr": "exp(x)"}, mask={"family": "selective", "log_decay": "1/10 - 1/sqrt(softplus(z))"}
    )
    with pytest.raises(SpecError) as info:
        plan(spec)
    assert info.value.field == "mask.log_decay"


# Regression (fixed): non-real constants are accepted and the prover treats them as reals: sqrt(-1) parses to I,
# interval_of gives I the range of the reals, and softplus(I*x) is "proved" positive though it is
# complex (and NaN in the Triton lowering: tl.sqrt(-1.0)). Reproduction:
#   plan(parse_spec({"name": "t", "feature_map": {"expr": "softplus(sqrt(-1)*x)"}, "mask": {"family": "none"}}))
#   -> plans, with facts "phi(x) = softplus(I*x) > 0 ...: proved (... within (0, inf))".
def test_complex_feature_map_is_not_proved_positive():
    with pytest.raises(SpecError) as info:
        plan(spec_of(feature_map={"expr": "softplus(sqrt(-1)*x)"}))
    assert info.value.field == "feature_map.expr"


# Regression (fixed): a log_decay of -1e400 (parsed to -oo) crashes the planner with AssertionError
# ("stabilize changed the value of -oo": -oo - (-oo) is nan) instead of a SpecError. Reproduction:
#   plan(parse_spec({"name": "t", "feature_map": {"expr": "exp(x)"},
#        "mask": {"family": "selective", "log_decay": "-1e400"}}))
def test_infinite_log_decay_is_a_spec_error():
    with pytest.raises(SpecError):
        plan(spec_of(feature_map={"expr": "exp(x)"}, mask={"family": "selective", "log_decay": "-1e400"}))


# ---------------------------------------------------------------------------- planner refusals


def test_normalize_rows_with_a_feature_map_that_can_be_negative_is_refused():
    with pytest.raises(SpecError) as info:
        plan(spec_of(feature_map={"expr": "silu(x)"}))
    err = info.value
    assert err.field == "feature_map.expr"
    assert err.source == "t.yaml"
    assert "cannot prove" in err.reason
    assert "allow_unproven" in err.reason


def test_positive_log_decay_is_refused():
    with pytest.raises(SpecError) as info:
        plan(spec_of(mask={"family": "selective", "log_decay": "softplus(z)"}))
    assert info.value.field == "mask.log_decay"
    assert "<= 0" in info.value.reason


def test_decay_family_log_decay_is_checked_too():
    with pytest.raises(SpecError) as info:
        plan(spec_of(mask={"family": "decay", "log_decay": "z"}))
    assert info.value.field == "mask.log_decay"


def test_negative_scale_is_refused_with_normalized_rows():
    with pytest.raises(SpecError) as info:
        plan(spec_of(scale="-1"))
    assert info.value.field == "scale"
    with pytest.raises(SpecError) as info:
        plan(spec_of(scale="d - 2"))
    assert info.value.field == "scale"


def test_positive_scale_expressions_are_proved():
    p = plan(spec_of(scale="1/sqrt(d)"))
    assert any(f.startswith("scale") and "proved" in f for f in p.facts)


def test_without_normalized_rows_the_feature_map_need_not_be_positive():
    p = plan(spec_of(feature_map={"expr": "silu(x)"}, normalize_rows=False, scale="-1"))
    assert not any(f.startswith("phi") and "> 0" in f for f in p.facts)  # no positivity needed
    assert p.warnings == ()


def test_allow_unproven_plans_with_a_warning():
    spec = spec_of(
        feature_map={"expr": "silu(x)"},
        mask={"family": "selective", "log_decay": "softplus(z)"},
        allow_unproven=True,
    )
    with pytest.warns(UnprovenWarning) as record:
        p = plan(spec)
    assert len(record) == 2
    messages = [str(w.message) for w in record]
    assert any("feature_map.expr" in m for m in messages)
    assert any("mask.log_decay" in m for m in messages)
    assert all(m.startswith("t.yaml: ") for m in messages)
    not_proved = [f for f in p.facts if "NOT proved" in f]
    assert len(not_proved) == 2
    assert len(p.warnings) == 2


def test_unproven_warning_is_a_user_warning():
    assert issubclass(UnprovenWarning, UserWarning)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_shipped_specs_plan_with_every_fact_proved(path, recwarn, plans):
    p = plans[path.stem]
    assert any("is defined" in f for f in p.facts)  # every expression is proved defined on its domain
    assert any("> 0" in f for f in p.facts) == p.normalize_rows
    assert any("<= 0" in f for f in p.facts) == (p.log_decay is not None)
    assert all(": proved (" in f for f in p.facts)
    assert p.warnings == ()
    assert not [w for w in recwarn if issubclass(w.category, UnprovenWarning)]


# ---------------------------------------------------------------------------- stabilize


@pytest.mark.parametrize(
    "text,stable",
    [
        ("log(sigmoid(z))", "-softplus(-z)"),
        ("log(1 - sigmoid(z))", "-softplus(z)"),
        ("log(sigmoid(2*z))", "-softplus(-2*z)"),
        ("log(1 - sigmoid(3*z))", "-softplus(3*z)"),
        ("log(sigmoid(z)) + log(1 - sigmoid(z))", "-softplus(-z) - softplus(z)"),
    ],
)
def test_stabilize_rewrites(text, stable):
    expr = parse_expression(text, "z")
    out = stabilize(expr)
    assert out == parse_expression(stable, "z")
    assert not out.has(sp.log)
    zs = np.array([-5.0, -2.0, -0.7, 0.0, 0.4, 3.0, 5.0])  # where the naive form is still accurate
    np.testing.assert_allclose(numeric(out, Z)(zs), numeric(expr, Z)(zs), rtol=1e-9)
    # far out, where the naive form rounds to log(0) or log(1) in floating point, the stable one is still
    # right (against a 600-digit evaluation of the original)
    far = [-300.0, -60.0, 60.0, 300.0]
    naive = sp.lambdify(Z, expr.rewrite(sp.exp), modules="mpmath")
    with mpmath.workdps(600):
        want = [float(naive(mpmath.mpf(v))) for v in far]
    np.testing.assert_allclose(numeric(out, Z)(np.array(far)), want, rtol=1e-12)


@pytest.mark.parametrize("text", ["-softplus(z)", "-z**2", "log(z**2 + 1)", "-exp(z)"])
def test_stabilize_leaves_other_forms_alone(text):
    expr = parse_expression(text, "z")
    assert stabilize(expr) == expr


def test_lion_d_log_decay_is_stabilized(plans):
    p = plans["lion_d"]
    assert p.log_decay.expr == -softplus(-Z)
    assert not p.log_decay.expr.has(sp.log)


# ---------------------------------------------------------------------------- specialization and stages


def test_lion_lit_has_a_global_state_and_no_gate_stage(plans):
    p = plans["lion_lit"]
    assert p.global_state is True
    assert p.gated is False
    assert not p.has("gate_grad")
    buffers = {b for n in p.stages for b in p.stages.nodes[n]["reads"] + p.stages.nodes[n]["writes"]}
    for absent in ("gate", "seg_decay", "to_end", "kv_chunk_right", "qd_chunk_right", "dF", "dgate"):
        assert absent not in buffers, absent
    assert "k" not in p.stages.nodes["fwd_output"]["reads"]  # the output needs only Q and the global state


def test_lion_s_has_states_from_both_sides_and_a_gate_grad(plans):
    p = plans["lion_s"]
    assert p.global_state is False
    assert p.gated is True
    assert p.has("gate_grad")
    assert {"kv_carried_left", "kv_carried_right", "kv_chunk_right"} <= set(p.stages.nodes["fwd_output"]["reads"])
    assert {"qd_carried_left", "qd_carried_right", "qd_chunk_right"} <= set(p.stages.nodes["bwd_grads"]["reads"])


def test_lion_s_causal_carries_keys_from_the_left_only(plans):
    p = plans["lion_s_causal"]
    assert not p.bidirectional
    reads = set(p.stages.nodes["fwd_output"]["reads"])
    assert "kv_carried_left" in reads and not reads & {"kv_carried_right", "kv_chunk_right", "to_end"}
    # its backward needs the queries to the right of each key, not those to the left
    reads = set(p.stages.nodes["bwd_grads"]["reads"])
    assert {"qd_carried_right", "qd_chunk_right"} <= reads and "qd_carried_left" not in reads
    assert p.has("gate_grad")
    assert p.alignment is None


def test_lion_d_is_gated_per_head(plans):
    p = plans["lion_d"]
    assert p.family == "decay"
    assert p.has("gate_grad") and "kv_carried_right" in p.stages.nodes["fwd_output"]["reads"]


@pytest.mark.parametrize(
    "name,shifts", [("lion_s", (0, 1)), ("lion_s_sym", (1, 1)), ("lion_s_causal", (1, 1)), ("lion_d", (0, 1))]
)
def test_potential_shifts(name, shifts, plans):
    p = plans[name]
    assert (p.f_shift, p.g_shift) == shifts


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_stage_graph_is_a_dag_whose_stages_all_reach_a_sink(path, plans):
    g = plans[path.stem].stages
    assert nx.is_directed_acyclic_graph(g)
    sinks = {n for n in g if set(g.nodes[n]["writes"]) & set(SINKS)}
    for node in g:
        assert node in sinks or nx.descendants(g, node) & sinks, node
        assert g.nodes[node]["kernel"] in ("forward", "backward")
    for a, b, data in g.edges(data=True):  # every edge carries a buffer that a writes and b reads
        assert data["buffers"] and set(data["buffers"]) <= set(g.nodes[a]["writes"]) & set(g.nodes[b]["reads"])


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_launch_order(path, plans):
    p = plans[path.stem]
    order = p.launch_order()
    assert order == p.launch_order("forward") + p.launch_order("backward")
    assert order[:3] == ["fwd_summary", "fwd_scan", "fwd_output"]
    for a, b in p.stages.edges:  # the order respects every dependency, and no forward stage waits on a backward one
        assert order.index(a) < order.index(b)
        assert not (p.stages.nodes[a]["kernel"] == "backward" and p.stages.nodes[b]["kernel"] == "forward")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("glob", [False, True])
@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_every_switch_combination_gives_a_dag_that_produces_every_gradient(gated, glob, bidir, normalize):
    g = stage_graph({"gated": gated, "global": glob, "bidir": bidir, "normalize": normalize})
    assert nx.is_directed_acyclic_graph(g)
    written = {b for n in g for b in g.nodes[n]["writes"]}
    assert {"y", "dq", "dk", "dv"} <= written
    assert ("dgate" in written) == gated and ("gate_grad" in g) == gated
    # no mask: n and Y are recomputed from the global state, not stored
    assert ("n" in written) == ("dn" in written) == (normalize and not glob)
    read = {b for n in g for b in g.nodes[n]["reads"]}
    assert read <= written | set(INPUTS)  # nothing is read that no stage writes but the op's inputs
    assert set(INPUTS) == {"q", "k", "v", "gate", "pad", "seqs", "dy", "initial_state", "d_final_state"}


def test_normalize_rows_false_drops_the_denominator():
    p = plan(spec_of(normalize_rows=False))
    buffers = {b for n in p.stages for b in p.stages.nodes[n]["reads"] + p.stages.nodes[n]["writes"]}
    assert "n" not in buffers and "dn" not in buffers
    assert p.normalize_rows is False


def test_plan_fields(plans):
    p = plans["lion_s_causal"]
    assert p.name == "lion_s_causal"
    assert p.class_name == "LionSCausal"
    assert p.spec == load_spec(ROOT / "specs" / "lion_s_causal.yaml").to_dict()
    assert p.default_chunk == 64
    assert p.eps == 1e-6
    assert plan(spec_of(chunk_size=32)).default_chunk == 32


def test_equations_describe_the_mask(plans):
    assert any("M_ij = 1" in e for e in plans["lion_lit"].equations)
    causal = plans["lion_s_causal"].equations
    assert any("i >= j" in e for e in causal)
    assert any("F_m = P_(m+1),  G_m = P_(m+1)" in e for e in causal)
    assert any("F_m = P_(m+0),  G_m = P_(m+1)" in e for e in plans["lion_s"].equations)


@pytest.mark.parametrize(
    "field,mask,phi,reason",
    [
        ("feature_map.expr", {"family": "none"}, "log(x)", "argument of log(x)"),
        ("feature_map.expr", {"family": "none"}, "sqrt(x)", "fractional power"),
        ("feature_map.expr", {"family": "none"}, "1/x", "divides by x"),
        ("mask.log_decay", {"family": "selective", "log_decay": "log(z)"}, "x", "argument of log(z)"),
        ("mask.log_decay", {"family": "decay", "log_decay": "-1/z**2"}, "x", "divides by z"),
    ],
)
def test_expressions_must_be_defined_on_their_domain(field, mask, phi, reason):
    spec = parse_spec({"name": "t", "feature_map": {"expr": phi}, "mask": mask, "normalize_rows": False}, "t.yaml")
    with pytest.raises(SpecError) as info:
        plan(spec)
    assert info.value.field == field and reason in info.value.reason and "allow_unproven" in info.value.reason


def test_scale_must_be_defined_for_every_head_dim():
    spec = parse_spec(
        {
            "name": "t",
            "feature_map": {"expr": "x"},
            "mask": {"family": "none"},
            "normalize_rows": False,
            "scale": "1/(d-1)",
        },
        "t.yaml",
    )
    with pytest.raises(SpecError) as info:
        plan(spec)
    assert info.value.field == "scale"


# ---------------------------------------------------------------------------- issue 9: derivatives and float32 range


def test_a_derivative_that_divides_by_zero_is_refused():
    with pytest.raises(SpecError, match=r"phi'\(x\) = .* is defined") as info:
        plan(spec_of(feature_map={"expr": "sqrt(abs(x)) + 1"}))
    assert info.value.field == "feature_map.expr"


def test_a_step_guarded_derivative_is_defined():
    """sqrt(relu(x)): its derivative is Heaviside(x) / (2 sqrt(relu(x))), printed as 0 for x <= 0."""
    p = plan(spec_of(feature_map={"expr": "sqrt(relu(x)) + 1"}))
    assert any(f.startswith("phi'(x)") and "proved" in f for f in p.facts)


def test_a_log_decay_derivative_is_checked():
    with pytest.raises(SpecError, match="d log_decay/dz") as info:
        plan(spec_of(mask={"family": "selective", "log_decay": "-sqrt(abs(z))"}))
    assert info.value.field == "mask.log_decay"


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"feature_map": {"expr": "exp(3*x)"}}, "feature_map.expr"),
        ({"feature_map": {"expr": "x**13 + 1"}}, "feature_map.expr"),
        ({"feature_map": {"expr": "sigmoid(x)**x"}}, "feature_map.expr"),  # was exit 3: e < 0 on a symbol
        ({"mask": {"family": "selective", "log_decay": "-exp(4*z)"}}, "mask.log_decay"),
        ({"scale": "exp(d)"}, "scale"),
    ],
)
def test_expressions_beyond_float32_on_ordinary_inputs_are_refused(fields, field):
    with pytest.raises(SpecError, match="float32's range") as info:
        plan(spec_of(**fields))
    assert info.value.field == field


def test_float32_range_is_an_unproven_fact_under_allow_unproven():
    with pytest.warns(UnprovenWarning, match="float32's range"):
        plan(spec_of(feature_map={"expr": "exp(3*x)"}, allow_unproven=True))


@pytest.mark.parametrize("text", ["exp(2*x)", "x**12 + 1", "2**x", "sigmoid(x)**2"])
def test_expressions_within_float32_are_accepted(text):
    plan(spec_of(feature_map={"expr": text}, normalize_rows=False))


def test_twelve_nested_tanh_plan_quickly():
    import time

    start = time.perf_counter()
    plan(spec_of(mask={"family": "selective", "log_decay": "-1 - " + "tanh(" * 12 + "z" + ")" * 12}))
    assert time.perf_counter() - start < 10.0


def test_stabilize_is_checked_numerically():
    """log(sigmoid(elu(z))) failed the symbolic check (simplify left a Piecewise); its value is unchanged."""
    p = plan(spec_of(mask={"family": "selective", "log_decay": "log(sigmoid(elu(z)))"}))
    assert "softplus" in str(p.log_decay.expr)


def test_variable_exponent_ranges():
    iv = interval_of(parse_expression("2**x", "x"), {X: Interval(-1.0, 3.0)})
    assert iv.lo == pytest.approx(0.5) and iv.hi == pytest.approx(8.0)


@pytest.mark.parametrize(
    "fields,field",
    [({"feature_map": {"expr": "exp(-87)"}}, "feature_map.expr"), ({"scale": "1.2e-38"}, "scale")],
)
def test_tiny_feature_maps_and_scales_are_refused(fields, field):
    with pytest.raises(SpecError, match="is not tiny") as info:
        plan(spec_of(normalize_rows=False, **fields))
    assert info.value.field == field
