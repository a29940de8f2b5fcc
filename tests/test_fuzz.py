"""The compiler on random and adversarial specs (hypothesis): every spec is compiled right or refused.

Property: `lion-gen SPEC --out DIR` either exits 2 within 2 seconds with a one-line message and writes
nothing, or exits 0 and writes a module whose chunk and parallel forms, on ordinary inputs, are finite
and equal to the float64 reference (tests/oracle.py, which shares no code with the printers or the
templates) within the contract's bar (1e-5 under the interpreter, 1e-4 compiled), or within
FP32_FACTOR times what float32 arithmetic itself reaches on the same inputs (the oracle run in float32),
the rule tests/test_kernels.py uses where float32 cannot meet the bar. Exit 3 (an internal error) and a
hang are failures.

Profiles: the CI one (the default) is derandomized and small; `LION_GEN_FUZZ=large` runs a larger one
and prints its counts (specs tried, refused, accepted, accepted and run, failures).
"""

from __future__ import annotations

import contextlib
import io
import os
import string
import time
import warnings
from pathlib import Path

import oracle
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lion_gen
from lion_gen.cli import main
from lion_gen.functions import REGISTRY
from lion_gen.planner import UnprovenWarning

LARGE = os.environ.get("LION_GEN_FUZZ") == "large"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TOL = 1e-5 if INTERPRETED else 1e-4
FP32_FACTOR = 10.0
REFUSAL_SECONDS = 2.0
LABELS = ("y", "q", "k", "v", "gate")
# (examples of the compile property, examples of the numeric property)
EXAMPLES = (2000, 40) if LARGE else (100, 4)
COMMON = {
    "deadline": None,
    "database": None,  # nothing written into the checkout
    "derandomize": not LARGE,  # CI: the same examples every run
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
}
COUNTS: dict[str, int] = {
    "tried": 0,
    "refused": 0,
    "accepted": 0,
    "run": 0,
    "reference_not_finite": 0,
    "failures": 0,
}
FAILURES: list[str] = []  # the large profile records failures and goes on (no shrinking); see the last test


@contextlib.contextmanager
def recorded(what: str):
    """CI: a failure fails the example (hypothesis shrinks it). Large: it is counted, shown and reported."""
    if not LARGE:
        yield
        return
    try:
        yield
    except Exception as e:  # an assertion, or an error of the module or of the oracle
        COUNTS["failures"] += 1
        FAILURES.append(f"{what}: {type(e).__name__}: {str(e)[:600]}")
        print(f"\nFAILURE {FAILURES[-1]}", flush=True)


# ---------------------------------------------------------------------------- strategies

UNARY = sorted(n for n, f in REGISTRY.items() if f.arity == 1)
NARY = sorted(n for n, f in REGISTRY.items() if f.arity < 0)
ORDINARY_CONSTANTS = ["0", "1", "2", "3", "1/2", "0.25", "1e-3", "pi", "E", "10"]
ADVERSARIAL_CONSTANTS = [
    "1e39",
    "1e-50",
    "10**400",
    "9**9**9**9",
    "1" * 500,
    "exp(100)",
    "exp(-100)",
    "log(0)",
    "log(-1)",
    "sqrt(-2)",
    "0**-1",
    "1/0",
    "inf",
    "nan",
    "1e400",
]


def expressions(symbol: str, adversarial: bool) -> st.SearchStrategy[str]:
    """Expression text in ``symbol`` built from the registry's functions, operators and constants."""
    consts = ORDINARY_CONSTANTS + (ADVERSARIAL_CONSTANTS if adversarial else [])
    leaves = st.one_of(st.just(symbol), st.just(symbol), st.sampled_from(consts))

    def extend(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        exponents = st.sampled_from(
            ["2", "3", "6", "-1", "-2", "1/2", "1.5"] + (["33", "x", "z"] if adversarial else [])
        )
        return st.one_of(
            st.tuples(st.sampled_from(UNARY), children).map(lambda t: f"{t[0]}({t[1]})"),
            st.tuples(children, st.sampled_from("+-*/"), children).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.tuples(children, exponents).map(lambda t: f"({t[0]})**{t[1]}"),
            st.tuples(st.sampled_from(NARY), st.lists(children, min_size=2, max_size=3)).map(
                lambda t: f"{t[0]}({', '.join(t[1])})"
            ),
        )

    return st.recursive(leaves, extend, max_leaves=12 if adversarial else 5)


def positive_features() -> st.SearchStrategy[str]:
    """Feature maps likely to be proved positive (so that many specs get through to the kernels)."""
    inner = expressions("x", adversarial=False)
    return st.one_of(
        st.tuples(st.sampled_from(["exp", "sigmoid", "softplus"]), inner).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(st.sampled_from(["elu", "relu", "silu", "tanh"]), inner, st.sampled_from(["1", "2", "1/2"])).map(
            lambda t: f"{t[0]}({t[1]}) + {t[2]}"
        ),
        st.tuples(inner, st.sampled_from(["2", "4", "6"])).map(lambda t: f"({t[0]})**{t[1]} + 1/4"),
        st.sampled_from(["x**6 + 1", "sqrt(relu(x)) + 1", "exp(x) + softplus(1)", "elu(x) + 1", "x**2 + 1"]),
    )


def log_decays() -> st.SearchStrategy[str]:
    inner = expressions("z", adversarial=False)
    return st.one_of(
        st.tuples(st.sampled_from(["-softplus", "log(sigmoid", "-sigmoid", "-exp", "-relu"]), inner).map(
            lambda t: f"{t[0]}({t[1]})" + (")" if t[0].startswith("log(") else "")
        ),
        st.sampled_from(["-softplus(z)", "log(sigmoid(z))", "-z**2", "-1 - tanh(z)", "-abs(z)/2"]),
    )


NAMES = st.one_of(
    st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True),
    st.sampled_from(["range", "dict", "super", "torch", "launch", "Lion", "\uff46oo", "\ufb01le", "a" * 250, "_x"]),
    st.text(max_size=20),
    st.integers(),
)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
)


@st.composite
def specs(draw: st.DrawFn, adversarial: bool = True) -> dict:
    """A spec as a mapping: mostly well-formed, with random fields broken when adversarial."""
    family = draw(st.sampled_from(["none", "decay", "selective"]))
    direction = draw(st.sampled_from(["bidirectional", "causal"]))
    normalize_rows = draw(st.booleans())
    feature = draw(
        st.one_of(positive_features(), expressions("x", adversarial)) if adversarial else positive_features()
    )
    spec: dict = {
        "name": draw(NAMES) if adversarial else draw(st.from_regex(r"fz_[a-z0-9]{1,8}", fullmatch=True)),
        "direction": direction,
        "feature_map": {"expr": feature, "normalize": draw(st.sampled_from(["none", "l2"]))},
        "mask": {"family": family},
        "normalize_rows": normalize_rows,
        "scale": draw(st.sampled_from(["1", "1/sqrt(d)", "0.5", "sigmoid(d)", "1/d", "softplus(1/d)"])),
        "eps": draw(st.sampled_from([1e-6, 1e-3, 0.0])),
        "chunk_size": draw(st.sampled_from([None, 16, 32])),
    }
    if family != "none":
        spec["mask"]["log_decay"] = draw(
            st.one_of(log_decays(), expressions("z", True)) if adversarial else log_decays()
        )
    if family == "selective" and direction == "bidirectional":
        spec["mask"]["alignment"] = draw(st.sampled_from(["lion", "symmetric"]))
    if adversarial:
        if draw(st.booleans()):
            spec["scale"] = draw(st.one_of(expressions("d", True), VALUES))
        for _ in range(draw(st.integers(0, 2))):  # break a field: a wrong value, a missing or an unknown one
            path = draw(
                st.sampled_from(
                    ["name", "direction", "eps", "chunk_size", "normalize_rows", "allow_unproven", "mask.family"]
                    + ["feature_map.expr", "feature_map.normalize", "mask.alignment", "extra", "mask.extra"]
                )
            )
            node, key = (spec, path) if "." not in path else (spec[path.split(".")[0]], path.split(".")[1])
            if draw(st.integers(0, 4)) == 0:
                node.pop(key, None)
            else:
                node[key] = draw(VALUES)
    return spec


ADVERSARIAL_TEXT = [
    "name: t\nfeature_map: {expr: x\nmask:\n  family: none\n",  # a YAML syntax error
    "name: t\nfeature_map: " + "[" * 3000 + "]" * 3000 + "\nmask:\n  family: none\n",  # nested too deeply
    "name: t\nfeature_map:\n  expr: exp(x)\nmask:\n  family: none\nchunk_size: " + "7" * 5000 + "\n",
    "name: t\nfeature_map:\n  expr: exp(x)\nmask:\n  family: none\neps: " + "9" * 400 + "\n",
    "name: t\nfeature_map:\n  expr: exp(x)\nmask:\n  family: none\ndirection: [&a [x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdef", "bcdefg", strict=True))
    + "]\n",
    "\x00\xff",
    "",
    "- 1\n- 2\n",
    "name: t\nfeature_map:\n  expr: " + " + ".join(["x"] * 1000) + "\nmask:\n  family: none\n",
]


def texts() -> st.SearchStrategy[str]:
    """YAML text: dumped specs, a hand-broken few, and random characters."""
    return st.one_of(
        specs().map(lambda s: yaml.safe_dump(s, allow_unicode=True, sort_keys=False)),
        specs().map(lambda s: yaml.safe_dump(s, allow_unicode=True, sort_keys=False)),
        st.sampled_from(ADVERSARIAL_TEXT),
        st.text(alphabet=string.printable, max_size=200),
    )


# ---------------------------------------------------------------------------- the property


def run_cli(text: str, tmp: Path) -> tuple[int, str, float, list[Path]]:
    """lion-gen on ``text``: exit code, stderr, seconds, and what it wrote."""
    spec = tmp / "spec.yaml"
    spec.write_text(text, encoding="utf-8", errors="surrogatepass")
    out = tmp / "out"
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UnprovenWarning)
        rc = main([str(spec), "--out", str(out)])
    seconds = time.perf_counter() - start
    written = sorted(out.iterdir()) if out.is_dir() else []
    return rc, err.getvalue(), seconds, written


def check_outcome(text: str, tmp: Path) -> Path | None:
    """The compile property; returns the module written, if any."""
    COUNTS["tried"] += 1
    if LARGE and COUNTS["tried"] % 100 == 0:
        print(f"\nfuzz progress: {COUNTS}", flush=True)
    rc, err, seconds, written = run_cli(text, tmp)
    assert rc in (0, 2), f"exit {rc} ({err.strip()}) for:\n{text[:2000]}"
    if rc == 2:
        COUNTS["refused"] += 1
        assert seconds < REFUSAL_SECONDS, f"refused after {seconds:.1f} s: {err.strip()[:300]}"
        assert err.count("\n") == 1 and err.startswith("lion-gen: error: "), err[:500]
        assert len(err) < 600, err[:600]
        assert not written, written
        return None
    COUNTS["accepted"] += 1
    (module,) = written
    compile(module.read_text(encoding="utf-8"), str(module), "exec")
    return module


def reference(spec: dict, ins: list[torch.Tensor], dy: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    x = [t.detach().to(dtype).requires_grad_() for t in ins]
    y = oracle.attention(spec, *x[:3], x[3] if len(x) > 3 else None)
    y.backward(dy.to(dtype))
    # a constant feature map leaves q and k out of the graph: their gradient is 0
    grads = {
        label: t.grad if t.grad is not None else torch.zeros_like(t) for label, t in zip(LABELS[1:], x, strict=False)
    }
    return {"y": y.detach(), **grads}


def rel_rms(got: torch.Tensor, ref: torch.Tensor, where: torch.Tensor) -> float:
    got, ref = got.double()[where], ref.double()[where]
    den = ref.pow(2).mean().sqrt().item()
    return (got - ref).pow(2).mean().sqrt().item() / den if den > 0 else (got - ref).abs().max().item()


def check_numerics(mod, L: int = 37, H: int = 2, D: int = 16, chunk: int = 16) -> dict[str, float]:
    """The chunk and parallel forms against the float64 oracle on ordinary inputs (randn q, k, v; gates 2 randn)."""
    spec, fn = mod.SPEC, getattr(mod, mod.SPEC["name"])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, L, H, D, generator=g) for _ in range(3))
    gate = {"none": None, "decay": torch.randn(H, generator=g), "selective": 2 * torch.randn(1, L, H, generator=g)}
    ins = [t for t in (q, k, v, gate[mod.FAMILY]) if t is not None]
    dy = torch.randn(1, L, H, D, generator=g, dtype=torch.float64)
    ref = reference(spec, ins, dy, torch.float64)
    ref32 = reference(spec, ins, dy, torch.float32)
    errors = {}
    for form in ("chunk", "parallel"):
        x = [t.detach().clone().requires_grad_() for t in ins]
        y = fn(*x[:3], x[3] if len(x) > 3 else None, form=form, chunk_size=chunk)
        y.backward(dy.float())
        got = {"y": y.detach(), **{label: t.grad for label, t in zip(LABELS[1:], x, strict=False)}}
        for key, r in ref.items():
            assert got[key] is not None and torch.isfinite(got[key]).all(), f"{form}: {key} is not finite"
            finite = torch.isfinite(r)
            if not finite.all():  # autograd of the oracle: 0 * inf at a kink; compare where it is finite
                COUNTS["reference_not_finite"] += 1
            err = rel_rms(got[key], r, finite)
            limit = max(TOL, FP32_FACTOR * rel_rms(ref32[key], r, finite & torch.isfinite(ref32[key])))
            assert err <= limit, f"{spec['name']} {form}: {key} error {err:.3g} above {limit:.3g}"
            errors[f"{form}.{key}"] = err
    return errors


@settings(max_examples=EXAMPLES[0], **COMMON)
@given(text=texts())
def test_every_spec_is_compiled_or_refused(text, tmp_path_factory):
    with recorded(repr(text[:300])):
        check_outcome(text, tmp_path_factory.mktemp("fuzz"))


@settings(max_examples=EXAMPLES[1], **COMMON)
@given(spec=specs(adversarial=False))
def test_accepted_specs_are_right(spec, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    spec["allow_unproven"] = False
    with recorded(repr(spec)):
        path = check_outcome(yaml.safe_dump(spec, sort_keys=False), tmp)
        if path is None:
            return
        mod = load_module(tmp / "spec.yaml", tmp / "cache")
        COUNTS["run"] += 1
        check_numerics(mod)


def load_module(spec: Path, cache: Path):
    """lion_gen.load with its cache under ``cache``."""
    old = os.environ.get("LION_GEN_CACHE")
    os.environ["LION_GEN_CACHE"] = str(cache)
    try:
        return lion_gen.load(spec)
    finally:
        if old is None:
            del os.environ["LION_GEN_CACHE"]
        else:
            os.environ["LION_GEN_CACHE"] = old


def test_counts_of_the_profile():
    """Runs after the two properties: prints what the profile did (pytest -s shows it); no failure recorded."""
    print(f"\nfuzz profile {'large' if LARGE else 'ci'}: {COUNTS}")
    assert not FAILURES, "\n".join(FAILURES)


# ---------------------------------------------------------------------------- the issue's examples, compiled right


def load_spec_text(tmp_path: Path, **fields: object):
    spec = {"name": "ex", "feature_map": {"expr": "elu(x) + 1"}, "mask": {"family": "none"}, **fields}
    rc, err, _, _ = run_cli(yaml.safe_dump(spec, sort_keys=False), tmp_path)
    assert rc == 0, err
    return load_module(tmp_path / "spec.yaml", tmp_path / "cache")


@pytest.mark.parametrize(
    "fields",
    [
        {"feature_map": {"expr": "x**6 + 1"}},  # was printed exp(6 log x): NaN for x < 0
        {"feature_map": {"expr": "exp(x) + softplus(1)"}},  # was softplus(1.0) on a Python float in torch
        {"feature_map": {"expr": "exp(x) + min(elu(-1), 0) + 1"}},  # was exit 3 (not comparable)
        {"feature_map": {"expr": "elu(x) + 1"}, "scale": "sigmoid(d)"},  # was exit 3 (no scale lowering)
    ],
    ids=["x6", "softplus1", "min-elu", "scale-sigmoid"],
)
def test_issue_examples_compile_right(fields, tmp_path):
    mod = load_spec_text(tmp_path, **fields)
    check_numerics(mod, L=19, H=1, D=16)
    x = torch.randn(1, 5, 1, 16, dtype=torch.float64)
    y = mod.ex(x, x, x, None, form="reference")
    assert torch.isfinite(y).all()


def test_sqrt_relu_has_finite_gradients(tmp_path, monkeypatch):
    """sqrt(relu(x)) + 1: right forward, and its gradient is 0 for x <= 0 (it was NaN there).

    The oracle's autograd gives 0 * inf = NaN for x < 0, so the reference here is the same phi written
    so that autograd sees no infinity: sqrt(where(x > 0, x, 1)) where x > 0, else 0."""
    mod = load_spec_text(tmp_path, feature_map={"expr": "sqrt(relu(x)) + 1"})

    def phi(t: torch.Tensor) -> torch.Tensor:
        pos = t > 0
        return torch.where(pos, torch.sqrt(torch.where(pos, t, torch.ones_like(t))), torch.zeros_like(t)) + 1

    real = oracle.elementwise
    monkeypatch.setattr(
        oracle, "elementwise", lambda text, sym: phi if text == "sqrt(relu(x)) + 1" else real(text, sym)
    )
    before = COUNTS["reference_not_finite"]
    check_numerics(mod, L=19, H=1, D=16)
    assert COUNTS["reference_not_finite"] == before
