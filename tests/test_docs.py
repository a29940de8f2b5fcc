"""docs/spec.md stays in step with the loader: every field, its default, the functions, and its examples."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import yaml

from lion_gen.codegen import generate_source
from lion_gen.functions import REGISTRY
from lion_gen.planner import UnprovenWarning
from lion_gen.spec import DEFAULTS, FEATURE_FIELDS, MASK_FIELDS, TOP_FIELDS, SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "spec.md"
TEXT = DOC.read_text(encoding="utf-8")

LOADER_FIELDS = TOP_FIELDS | {f"feature_map.{f}" for f in FEATURE_FIELDS} | {f"mask.{f}" for f in MASK_FIELDS}


def section(title: str) -> str:
    start = TEXT.index(f"\n## {title}\n")
    end = TEXT.find("\n## ", start + 1)
    return TEXT[start : end if end >= 0 else len(TEXT)]


def field_rows() -> dict[str, tuple[str, str]]:
    """field -> (type, default) from the table of the section 'The fields'."""
    rows = {}
    for line in section("The fields").splitlines():
        m = re.match(r"\| `([^`]+)` \| ([^|]+) \| ([^|]+) \|", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} documented twice"
            rows[m.group(1)] = (m.group(2).strip(), m.group(3).strip())
    return rows


def test_every_field_the_loader_accepts_is_documented():
    missing = LOADER_FIELDS - set(field_rows())
    assert not missing, f"docs/spec.md does not document {sorted(missing)}"


def test_every_documented_field_is_accepted_by_the_loader():
    unknown = set(field_rows()) - LOADER_FIELDS
    assert not unknown, f"docs/spec.md documents fields the loader refuses: {sorted(unknown)}"


def test_every_default_is_documented_as_the_loader_has_it():
    rows = field_rows()
    for field, (_, default) in rows.items():
        if field in DEFAULTS:
            literal = re.match(r"`([^`]*)`", default)
            assert literal, f"{field}: the default cell {default!r} does not start with a `literal`"
            assert yaml.safe_load(literal.group(1)) == DEFAULTS[field], f"{field}: documented {default!r}"
        else:
            assert default.startswith("required"), f"{field} has no default in the loader; documented {default!r}"


def test_the_defaults_table_is_what_the_loader_does():
    """Writing every default out explicitly gives the same spec as leaving them out."""
    base = {
        "name": "d",
        "feature_map": {"expr": "elu(x) + 1"},
        "mask": {"family": "selective", "log_decay": "-softplus(z)"},
    }
    explicit = {**base, "feature_map": dict(base["feature_map"]), "mask": dict(base["mask"])}
    for field, value in DEFAULTS.items():
        parent, _, key = field.rpartition(".")
        (explicit[parent] if parent else explicit)[key] = value
    assert parse_spec(explicit).to_dict() == parse_spec(base).to_dict()
    assert set(DEFAULTS) <= LOADER_FIELDS


def test_every_registry_function_is_documented():
    table = section("Expressions")
    missing = [name for name in REGISTRY if not re.search(rf"^\| `{name}\(", table, re.M)]
    assert not missing, f"docs/spec.md does not document the functions {missing}"
    documented = set(re.findall(r"^\| `(\w+)\(", table, re.M))
    assert documented <= set(REGISTRY), f"documented but not in the registry: {documented - set(REGISTRY)}"


def yaml_examples() -> list[tuple[int, str | None, str]]:
    """(line, marker, text) of every ```yaml block; the marker is the <!-- ... --> line just above it."""
    out = []
    lines = TEXT.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```yaml":
            end = lines.index("```", i + 1)
            above = lines[i - 1].strip() if i else ""
            marker = above[4:-3].strip() if above.startswith("<!--") and above.endswith("-->") else None
            out.append((i + 1, marker, "\n".join(lines[i + 1 : end]) + "\n"))
            i = end
        i += 1
    return out


EXAMPLES = yaml_examples()


def test_the_doc_has_accepted_and_refused_examples():
    markers = [m for _, m, _ in EXAMPLES]
    assert markers.count(None) >= 4 and sum(1 for m in markers if m and m.startswith("refused:")) >= 8


@pytest.mark.parametrize(("line", "marker", "text"), EXAMPLES, ids=[f"line{ln}" for ln, _, _ in EXAMPLES])
def test_yaml_example(line, marker, text, tmp_path):
    """An unmarked example generates a module without a warning; `refused: FIELD` is refused naming FIELD;
    `warns: FIELD` is accepted with a warning naming FIELD. Through load_spec, from a file, as the CLI does."""
    path = tmp_path / "example.yaml"
    path.write_text(text, encoding="utf-8")
    kind, _, field = (marker or "").partition(":")
    field = field.strip()
    if kind == "refused":
        with pytest.raises(SpecError) as e:
            generate_source(load_spec(path))
        assert e.value.field == field, str(e.value)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = generate_source(load_spec(path))
    unproven = [str(w.message) for w in caught if issubclass(w.category, UnprovenWarning)]
    if kind == "warns":
        assert unproven and all(f": {field}: " in m for m in unproven), unproven
    else:
        assert marker is None, f"unknown marker {marker!r} at docs/spec.md line {line}"
        assert not unproven, unproven
    assert f"def {yaml.safe_load(text)['name']}(" in source


def test_the_readme_links_the_spec_reference():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    spec_section = readme[readme.index("## The spec") : readme.index("## What is implemented")]
    assert "(docs/spec.md)" in spec_section
