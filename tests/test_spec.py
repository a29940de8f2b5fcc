"""YAML spec -> Spec: the five shipped specs, defaults, and every refusal of CONTRACT.md section 1."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import sympy as sp

from lion_gen.spec import Spec, SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
X = sp.Symbol("x", real=True)
Z = sp.Symbol("z", real=True)

# A valid selective spec that names only what is required (everything else takes its default).
BASE = {
    "name": "t",
    "feature_map": {"expr": "silu(x) + 1/2", "normalize": "l2"},
    "mask": {"family": "selective", "log_decay": "-softplus(z)"},
}
DELETE = object()


def variant(changes: dict) -> dict:
    """BASE with dotted-path changes applied (a value of DELETE removes the field)."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return data


def refusal(data: object, source: str = "<spec>") -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(data, source)
    return info.value


# ---------------------------------------------------------------------------- what loads


def test_the_five_shipped_specs_are_there():
    assert [p.stem for p in SPECS] == [
        "linear_causal",
        "lion_d",
        "lion_lit",
        "lion_s",
        "lion_s_causal",
        "lion_s_sym",
        "retention",
    ]


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_shipped_spec_loads(path):
    spec = load_spec(path)
    assert isinstance(spec, Spec)
    assert spec.name == path.stem
    assert spec.source == str(path)
    if spec.name.startswith("lion_"):  # the LION variants: normalized rows, scale 1, eps 1e-6
        assert spec.normalize_rows is True
        assert spec.eps == pytest.approx(1e-6)
        assert spec.scale == 1
    assert spec.feature_map.expr.free_symbols <= {X}
    if spec.mask.log_decay is not None:
        assert spec.mask.log_decay.free_symbols == {Z}


def test_lion_s_fields():
    spec = load_spec(ROOT / "specs" / "lion_s.yaml")
    assert spec.direction == "bidirectional"
    assert spec.feature_map.text == "silu(x) + 1/2"
    assert spec.feature_map.normalize == "l2"
    assert spec.mask.family == "selective"
    assert spec.mask.log_decay_text == "-softplus(z)"
    assert spec.mask.alignment == "lion"


def test_paper_variants_match_section_3():
    """lion_lit: elu+1, no mask; lion_d: decay log(sigmoid(z)); lion_s: selective -softplus(z), lion."""
    lit, d, s = (load_spec(ROOT / "specs" / f"{n}.yaml") for n in ("lion_lit", "lion_d", "lion_s"))
    assert (lit.feature_map.text, lit.feature_map.normalize, lit.mask.family) == ("elu(x) + 1", "none", "none")
    assert (d.feature_map.normalize, d.mask.family, d.mask.log_decay_text) == ("l2", "decay", "log(sigmoid(z))")
    assert d.mask.alignment is None
    assert (s.mask.family, s.mask.alignment) == ("selective", "lion")


def test_to_dict_fills_every_default():
    spec = parse_spec(
        {"name": "m", "feature_map": {"expr": "exp(x)"}, "mask": {"family": "selective", "log_decay": "-z**2"}}
    )
    assert spec.to_dict() == {
        "name": "m",
        "direction": "bidirectional",
        "feature_map": {"expr": "exp(x)", "normalize": "none"},
        "mask": {"family": "selective", "log_decay": "-z**2", "alignment": "lion"},
        "normalize_rows": True,
        "scale": "1",
        "eps": 1e-6,
        "chunk_size": None,
        "allow_unproven": False,
    }


def test_to_dict_of_a_causal_selective_spec_has_no_alignment():
    d = load_spec(ROOT / "specs" / "lion_s_causal.yaml").to_dict()
    assert d["direction"] == "causal"
    assert d["mask"] == {"family": "selective", "log_decay": "-softplus(z)"}
    assert (d["scale"], d["eps"], d["chunk_size"], d["allow_unproven"]) == ("1", 1e-6, None, False)


def test_to_dict_of_a_mask_none_spec_has_only_the_family():
    d = parse_spec({"name": "m", "feature_map": {"expr": "elu(x) + 1"}, "mask": {"family": "none"}}).to_dict()
    assert d["mask"] == {"family": "none"}


def test_explicit_values_are_kept():
    spec = parse_spec(
        variant(
            {
                "direction": "bidirectional",
                "mask.alignment": "symmetric",
                "normalize_rows": False,
                "scale": "1/sqrt(d)",
                "eps": 0.001,
                "chunk_size": 32,
                "allow_unproven": True,
            }
        )
    )
    d = spec.to_dict()
    assert d["mask"]["alignment"] == "symmetric"
    assert d["normalize_rows"] is False
    assert d["scale"] == "1/sqrt(d)"
    assert spec.scale.subs(sp.Symbol("d", real=True), 16) == sp.Rational(1, 4)
    assert d["eps"] == 0.001
    assert d["chunk_size"] == 32
    assert d["allow_unproven"] is True


@pytest.mark.parametrize("chunk", [16, 32, 64, 128])
def test_power_of_two_chunk_sizes_are_accepted(chunk):
    assert parse_spec(variant({"chunk_size": chunk})).chunk_size == chunk


def test_numeric_scale_and_expression_constants():
    assert parse_spec(variant({"scale": 2})).scale == 2
    spec = parse_spec(variant({"feature_map.expr": "exp(x) + pi - E"}))
    assert spec.feature_map.expr.free_symbols == {X}


def test_yaml_1_1_eps_without_a_dot_is_accepted(tmp_path):
    """PyYAML reads `1e-6` (no dot) as a string; the spec still means the number 1e-6."""
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\nfeature_map:\n  expr: exp(x)\nmask:\n  family: none\neps: 1e-6\n",
        encoding="utf-8",
    )
    spec = load_spec(path)
    assert isinstance(spec.eps, float)
    assert spec.eps == 1e-6
    assert spec.to_dict()["eps"] == 1e-6


def test_load_spec_reads_yaml_with_comments(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "# a comment\nname: c   # trailing\nfeature_map: {expr: 'elu(x) + 1'}\nmask: {family: none}\n",
        encoding="utf-8",
    )
    assert load_spec(path).name == "c"


# ---------------------------------------------------------------------------- refusals (section 1)

REFUSALS = [
    # unknown fields
    ({"foo": 1}, "foo", "unknown field"),
    ({"feature_map.foo": 1}, "feature_map.foo", "unknown field"),
    ({"mask.foo": 1}, "mask.foo", "unknown field"),
    # missing required fields
    ({"name": DELETE}, "name", "required"),
    ({"feature_map": DELETE}, "feature_map", "required"),
    ({"feature_map.expr": DELETE}, "feature_map.expr", "required"),
    ({"mask": DELETE}, "mask", "required"),
    ({"mask.family": DELETE}, "mask.family", "required"),
    # wrong types
    ({"name": 3}, "name", "identifier"),
    ({"name": None}, "name", "identifier"),
    ({"direction": 5}, "direction", "bidirectional"),
    ({"normalize_rows": "yes"}, "normalize_rows", "true or false"),
    ({"normalize_rows": 1}, "normalize_rows", "true or false"),
    ({"allow_unproven": "no"}, "allow_unproven", "true or false"),
    ({"eps": "abc"}, "eps", "number"),
    ({"eps": -1}, "eps", ">= 0"),
    ({"eps": -1e-6}, "eps", ">= 0"),
    ({"eps": math.nan}, "eps", "finite"),
    ({"eps": math.inf}, "eps", "finite"),
    ({"eps": True}, "eps", "number"),
    ({"eps": [1e-6]}, "eps", "number"),
    ({"chunk_size": 3.5}, "chunk_size", "integer"),
    ({"chunk_size": "64"}, "chunk_size", "integer"),
    ({"chunk_size": True}, "chunk_size", "integer"),
    ({"chunk_size": 48}, "chunk_size", "power of two"),
    ({"chunk_size": 8}, "chunk_size", "16"),
    ({"chunk_size": 0}, "chunk_size", "power of two"),
    ({"chunk_size": -16}, "chunk_size", "power of two"),
    ({"feature_map": "x"}, "feature_map", "mapping"),
    ({"mask": [1]}, "mask", "mapping"),
    ({"feature_map.expr": ["x"]}, "feature_map.expr", "expected an expression"),
    ({"feature_map.expr": True}, "feature_map.expr", "expected an expression"),
    ({"mask.log_decay": None}, "mask.log_decay", "expected an expression"),
    ({"scale": False}, "scale", "expected an expression"),
    # names that are not identifiers
    ({"name": "my-name"}, "name", "identifier"),
    ({"name": "class"}, "name", "identifier"),
    ({"name": "None"}, "name", "identifier"),
    ({"name": "1abc"}, "name", "identifier"),
    ({"name": ""}, "name", "identifier"),
    ({"name": "_private"}, "name", "underscore"),
    # expressions that do not parse
    ({"feature_map.expr": "silu(x"}, "feature_map.expr", "does not parse"),
    ({"feature_map.expr": "x ^ 2"}, "feature_map.expr", "**"),
    ({"feature_map.expr": ""}, "feature_map.expr", "empty"),
    ({"feature_map.expr": "   "}, "feature_map.expr", "empty"),
    ({"feature_map.expr": "x if x else 1"}, "feature_map.expr", "unsupported"),
    ({"feature_map.expr": "x.real"}, "feature_map.expr", "unsupported"),
    ({"feature_map.expr": "x < 1"}, "feature_map.expr", "unsupported"),
    ({"feature_map.expr": "x % 2"}, "feature_map.expr", "unsupported"),
    ({"feature_map.expr": "'x'"}, "feature_map.expr", "unsupported"),
    ({"feature_map.expr": "exp(x=x)"}, "feature_map.expr", "unsupported call"),
    # a symbol other than its own
    ({"feature_map.expr": "y + 1"}, "feature_map.expr", "'y'"),
    ({"feature_map.expr": "z + 1"}, "feature_map.expr", "'z'"),
    ({"mask.log_decay": "-softplus(x)"}, "mask.log_decay", "'x'"),
    ({"scale": "x"}, "scale", "'x'"),
    ({"scale": "1/sqrt(z)"}, "scale", "'z'"),
    # functions without a Triton lowering, and wrong arity
    ({"feature_map.expr": "sin(x)"}, "feature_map.expr", "no Triton lowering"),
    ({"feature_map.expr": "__import__('os')"}, "feature_map.expr", "no Triton lowering"),
    ({"mask.log_decay": "-erf(z)"}, "mask.log_decay", "no Triton lowering"),
    ({"feature_map.expr": "sigmoid(x, x)"}, "feature_map.expr", "argument"),
    ({"feature_map.expr": "exp()"}, "feature_map.expr", "argument"),
    ({"feature_map.expr": "pow(x)"}, "feature_map.expr", "argument"),
    ({"feature_map.expr": "min(x)"}, "feature_map.expr", "at least 2"),
    # log_decay and the family
    ({"mask": {"family": "none", "log_decay": "-softplus(z)"}}, "mask.log_decay", "not allowed"),
    ({"mask.log_decay": DELETE}, "mask.log_decay", "required"),
    ({"mask": {"family": "decay"}}, "mask.log_decay", "required"),
    # alignment on a non-selective mask or a causal spec
    ({"mask": {"family": "decay", "log_decay": "log(sigmoid(z))", "alignment": "lion"}}, "mask.alignment", "selective"),
    ({"mask": {"family": "none", "alignment": "symmetric"}}, "mask.alignment", "selective"),
    ({"direction": "causal", "mask.alignment": "lion"}, "mask.alignment", "causal"),
    # values outside their sets
    ({"direction": "sideways"}, "direction", "bidirectional"),
    ({"direction": "Causal"}, "direction", "causal"),
    ({"mask.family": "gated"}, "mask.family", "selective"),
    ({"feature_map.normalize": "l1"}, "feature_map.normalize", "l2"),
    ({"feature_map.normalize": True}, "feature_map.normalize", "l2"),
    ({"mask.alignment": "left"}, "mask.alignment", "symmetric"),
]


@pytest.mark.parametrize("changes,field,fragment", REFUSALS, ids=[f"{c[1]}-{i}" for i, c in enumerate(REFUSALS)])
def test_refusal(changes, field, fragment):
    err = refusal(variant(changes), "spec.yaml")
    assert err.source == "spec.yaml"
    assert err.field == field
    assert fragment in err.reason
    assert str(err) == f"spec.yaml: {field}: {err.reason}"


def test_spec_error_is_a_value_error_with_file_field_reason():
    err = SpecError("a.yaml", "mask.family", "must be one of none, decay, selective")
    assert isinstance(err, ValueError)
    assert (err.source, err.field, err.reason) == ("a.yaml", "mask.family", "must be one of none, decay, selective")
    assert str(err) == "a.yaml: mask.family: must be one of none, decay, selective"


def test_unknown_function_message_names_the_function():
    err = refusal(variant({"feature_map.expr": "sin(x) + 1"}))
    assert "'sin'" in err.reason
    assert "no Triton lowering" in err.reason


def test_wrong_arity_message_names_the_function_and_counts():
    err = refusal(variant({"feature_map.expr": "sigmoid(x, x)"}))
    assert "sigmoid" in err.reason
    assert "1" in err.reason and "2" in err.reason


def test_caret_hint_mentions_double_star():
    err = refusal(variant({"feature_map.expr": "x ^ 2"}))
    assert "use ** for powers" in err.reason


def test_unknown_field_lists_the_allowed_ones():
    err = refusal(variant({"mask.decay": "-z"}))
    assert err.field == "mask.decay"
    for allowed in ("alignment", "family", "log_decay"):
        assert allowed in err.reason


def test_top_level_that_is_not_a_mapping():
    for data in ([1, 2], "name: x", None, 3):
        err = refusal(data)
        assert "mapping" in err.reason


# ---------------------------------------------------------------------------- refusals of the file itself


def test_not_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\nfeature_map: {expr: x\n", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.field == "<file>"
    assert "YAML" in info.value.reason
    assert str(info.value).startswith(f"{path}: <file>: ")


def test_yaml_list_at_top_level(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: a\n- name: b\n", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.source == str(path)
    assert "mapping" in info.value.reason
    assert "list" in info.value.reason


def test_empty_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "mapping" in info.value.reason


def test_nonexistent_file(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.field == "<file>"
    assert info.value.source == str(path)
    assert "cannot read" in info.value.reason


def test_a_directory_is_not_readable(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert info.value.field == "<file>"


def test_errors_from_a_file_name_the_file_and_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\nfeature_map:\n  expr: sin(x)\nmask:\n  family: none\n",
        encoding="utf-8",
    )
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: feature_map.expr: ")
    assert "sin" in str(info.value)


def test_yaml_eps_that_is_not_a_number(tmp_path):
    path = tmp_path / "eps.yaml"
    path.write_text("name: e\nfeature_map: {expr: exp(x)}\nmask: {family: none}\neps: tiny\n", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.field == "eps"
    assert "number" in info.value.reason


# ---------------------------------------------------------------------------- bounded input (issue 9)


def timed_refusal(data: object) -> SpecError:
    """A refusal, within the 2 seconds every refusal must take, with a one-line, bounded message."""
    import time

    start = time.perf_counter()
    err = refusal(data, "spec.yaml")
    assert time.perf_counter() - start < 2.0
    assert "\n" not in str(err) and len(str(err)) < 400
    return err


@pytest.mark.parametrize(
    "name,fragment",
    [
        ("range", "builtin or keyword"),
        ("dict", "builtin or keyword"),
        ("super", "builtin or keyword"),
        ("print", "builtin or keyword"),
        ("match", "builtin or keyword"),  # a soft keyword
        ("\uff46oo", "NFKC"),  # full-width f: Python imports it as foo
        ("\ufb01le", "NFKC"),  # the ligature fi
        ("a" * 250, "at most 100"),
        ("\u00e9" * 60, "at most 100"),  # 120 bytes in UTF-8
    ],
    ids=["range", "dict", "super", "print", "match", "fullwidth", "ligature", "long", "long-utf8"],
)
def test_names_that_break_the_module_are_refused(name, fragment):
    err = timed_refusal(variant({"name": name}))
    assert err.field == "name" and fragment in err.reason


def test_a_non_ascii_name_that_normalization_keeps_is_accepted():
    assert parse_spec(variant({"name": "caf\u00e9"})).name == "caf\u00e9"


@pytest.mark.parametrize(
    "changes,field,fragment",
    [
        ({"feature_map.expr": "9**9**9**9"}, "feature_map.expr", "exponent 387420489"),
        ({"mask.log_decay": "-z**2 - 10**10**10"}, "mask.log_decay", "exponent 10000000000"),
        ({"feature_map.expr": "x**33 + 1"}, "feature_map.expr", "larger than 32"),
        ({"feature_map.expr": "exp(x) + exp(100)"}, "feature_map.expr", "exp(100) in 'exp(x) + exp(100)' is beyond"),
        ({"feature_map.expr": "exp(x) + 1e-50"}, "feature_map.expr", "below float32's smallest normal"),
        ({"scale": 10**400}, "scale", "beyond float32's range"),
        ({"scale": "1e20 * 1e20 / sqrt(d)"}, "scale", "beyond float32's range"),
        ({"scale": "1e39"}, "scale", "beyond float32's range"),
        ({"feature_map.expr": "exp(x) + log(-1)"}, "feature_map.expr", "not a real number"),
        ({"feature_map.expr": "x/0"}, "feature_map.expr", "divides by zero"),
        ({"feature_map.expr": " + ".join(["exp(x)"] * 1000)}, "feature_map.expr", "characters long; at most 1000"),
        ({"feature_map.expr": "+".join(["x"] * 300)}, "feature_map.expr", "more than 200"),
        ({"feature_map.expr": "exp(" * 30 + "x" + ")" * 30}, "feature_map.expr", "nested more than 24"),
        ({"feature_map.expr": "(" * 300 + "x" + ")" * 300}, "feature_map.expr", "does not parse"),
        ({"feature_map.expr": "-" * 990 + "x"}, "feature_map.expr", "nested"),
        ({"eps": 10**400}, "eps", "within float32's range"),
        ({"eps": 1e39}, "eps", "within float32's range"),
        ({"chunk_size": 10**400}, "chunk_size", "power of two"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_bounded_expressions_and_numbers(changes, field, fragment):
    err = timed_refusal(variant(changes))
    assert err.field == field and fragment in err.reason


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load_refusal(path: Path) -> SpecError:
    import time

    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert time.perf_counter() - start < 2.0
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    return info.value


MINIMAL = "name: t\nfeature_map:\n  expr: exp(x)\nmask:\n  family: none\n"


def test_a_5000_digit_chunk_size_is_refused(tmp_path):
    err = load_refusal(write(tmp_path, MINIMAL + "chunk_size: " + "1" * 5000 + "\n"))
    assert err.field == "chunk_size" and "<a 5000-digit integer>" in err.reason


def test_a_400_digit_eps_is_refused(tmp_path):
    err = load_refusal(write(tmp_path, MINIMAL + "eps: " + "9" * 400 + "\n"))
    assert err.field == "eps" and "float32's range" in err.reason


def test_deeply_nested_yaml_is_refused(tmp_path):
    err = load_refusal(write(tmp_path, MINIMAL.replace("exp(x)", "[" * 5000 + "]" * 5000)))
    assert err.field == "<file>" and "nested more than 16" in err.reason


def test_an_alias_bomb_in_an_echoed_field_is_refused(tmp_path):
    """7 levels of 9 aliases each: 4.8 million values in about 700 bytes, in a field whose error echoes it."""
    levels = ["&a [x, x, x, x, x, x, x, x, x]"]
    for prev, cur in zip("abcdef", "bcdefg", strict=True):
        levels.append(f"&{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    text = MINIMAL + "direction: [" + ", ".join(levels) + "]\n"
    assert len(text) < 800
    err = load_refusal(write(tmp_path, text))
    assert err.field == "<file>" and "alias" in err.reason


def test_a_few_aliases_are_fine_and_their_echo_is_cut(tmp_path):
    text = MINIMAL + "direction: [&a [" + ", ".join(["long_value"] * 40) + "], *a, *a]\n"
    err = load_refusal(write(tmp_path, text))
    assert err.field == "direction" and "..." in err.reason


def test_yaml_syntax_errors_are_one_line(tmp_path):
    err = load_refusal(write(tmp_path, "name: t\nfeature_map: {expr: x\nmask:\n  family: none\n"))
    assert err.field == "<file>" and "line 3, column 5" in err.reason


def test_a_huge_file_is_refused(tmp_path):
    err = load_refusal(write(tmp_path, MINIMAL + "#" * 70000 + "\n"))
    assert err.field == "<file>" and "at most 65536" in err.reason


def test_constant_functions_evaluate():
    """Constants built from the registry's own functions are numbers SymPy can compare (min(elu(-1), 0))."""
    phi = parse_spec(variant({"feature_map.expr": "exp(x) + min(elu(-1), 0) + 1"})).feature_map.expr
    assert float(phi.subs(X, 0)) == pytest.approx(1 + math.expm1(-1) + 1)
    assert parse_spec(variant({"feature_map.expr": "exp(x) + softplus(1)"})).feature_map.expr.free_symbols == {X}


def test_a_variable_exponent_is_a_power_of_e():
    phi = parse_spec(variant({"feature_map.expr": "sigmoid(x)**x"})).feature_map.expr
    assert phi.func == sp.exp
