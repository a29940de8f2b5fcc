"""YAML spec -> Spec (CONTRACT.md section 1). Every refusal names the file, the field and the reason."""

from __future__ import annotations

import keyword
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sympy as sp
import yaml

from .functions import ExpressionError, parse_expression

DIRECTIONS = ("bidirectional", "causal")
FAMILIES = ("none", "decay", "selective")
ALIGNMENTS = ("lion", "symmetric")
NORMALIZE = ("none", "l2")
MIN_CHUNK, MAX_CHUNK = 16, 256


class SpecError(ValueError):
    """A spec the generator refuses: names the file, the field and the reason."""

    def __init__(self, source: str, field: str, reason: str) -> None:
        self.source, self.field, self.reason = source, field, reason
        super().__init__(f"{source}: {field}: {reason}")


@dataclass(frozen=True)
class FeatureMap:
    expr: sp.Expr  # in the symbol x
    text: str
    normalize: str  # none | l2


@dataclass(frozen=True)
class Mask:
    family: str  # none | decay | selective
    log_decay: sp.Expr | None  # in the symbol z
    log_decay_text: str | None
    alignment: str | None  # lion | symmetric (selective only)


@dataclass(frozen=True)
class Spec:
    name: str
    direction: str
    feature_map: FeatureMap
    mask: Mask
    normalize_rows: bool
    scale: sp.Expr  # in the symbol d
    scale_text: str
    eps: float
    chunk_size: int | None
    allow_unproven: bool
    source: str  # where it was read from (for messages only; never part of the output)

    def to_dict(self) -> dict[str, Any]:
        """The normalized spec: every field present, defaults filled in, expressions as text."""
        mask: dict[str, Any] = {"family": self.mask.family}
        if self.mask.log_decay_text is not None:
            mask["log_decay"] = self.mask.log_decay_text
        if self.mask.alignment is not None:
            mask["alignment"] = self.mask.alignment
        return {
            "name": self.name,
            "direction": self.direction,
            "feature_map": {"expr": self.feature_map.text, "normalize": self.feature_map.normalize},
            "mask": mask,
            "normalize_rows": self.normalize_rows,
            "scale": self.scale_text,
            "eps": self.eps,
            "chunk_size": self.chunk_size,
            "allow_unproven": self.allow_unproven,
        }


TOP_FIELDS = {
    "name",
    "direction",
    "feature_map",
    "mask",
    "normalize_rows",
    "scale",
    "eps",
    "chunk_size",
    "allow_unproven",
}
FEATURE_FIELDS = {"expr", "normalize"}
MASK_FIELDS = {"family", "log_decay", "alignment"}
# Optional fields (dotted names) and the value an omitted one takes. Every other field is required, but
# mask.log_decay only with family decay or selective. docs/spec.md documents these (tests/test_docs.py).
DEFAULTS: dict[str, object] = {
    "direction": "bidirectional",
    "feature_map.normalize": "none",
    "mask.alignment": "lion",  # only for a bidirectional selective mask; absent otherwise
    "normalize_rows": True,
    "scale": 1,
    "eps": 1.0e-6,
    "chunk_size": None,  # the kernels' default, 64
    "allow_unproven": False,
}


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file. Raises SpecError (file, field, reason)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(source, "<file>", f"cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(source, "<file>", f"not valid YAML: {e}") from None
    return parse_spec(data, source)


def parse_spec(data: object, source: str = "<spec>") -> Spec:
    """Validate an already-loaded mapping (as from YAML)."""

    def fail(field: str, reason: str) -> SpecError:
        return SpecError(source, field, reason)

    def mapping(value: object, field: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise fail(field, f"must be a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                prefix = f"{field}." if field != "<top level>" else ""
                raise fail(f"{prefix}{key}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
        return value

    def required(container: dict[str, Any], key: str, field: str) -> object:
        if key not in container:
            raise fail(field, "required field missing")
        return container[key]

    def choice(value: object, field: str, options: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in options:
            raise fail(field, f"must be one of {', '.join(options)}; got {value!r}")
        return value

    def boolean(value: object, field: str) -> bool:
        if not isinstance(value, bool):
            raise fail(field, f"must be true or false, got {value!r}")
        return value

    def expression(value: object, field: str, symbol: str) -> tuple[sp.Expr, str]:
        try:
            expr = parse_expression(value, symbol)
        except ExpressionError as e:
            raise fail(field, str(e)) from None
        return expr, str(value).strip()

    top = mapping(data, "<top level>", TOP_FIELDS)
    name = required(top, "name", "name")
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise fail("name", f"must be a Python identifier, got {name!r}")
    if name.startswith("_"):
        raise fail("name", f"must not start with an underscore, got {name!r}")

    direction = choice(top.get("direction", DEFAULTS["direction"]), "direction", DIRECTIONS)

    fm = mapping(required(top, "feature_map", "feature_map"), "feature_map", FEATURE_FIELDS)
    phi, phi_text = expression(required(fm, "expr", "feature_map.expr"), "feature_map.expr", "x")
    normalize = choice(fm.get("normalize", DEFAULTS["feature_map.normalize"]), "feature_map.normalize", NORMALIZE)

    mk = mapping(required(top, "mask", "mask"), "mask", MASK_FIELDS)
    family = choice(required(mk, "family", "mask.family"), "mask.family", FAMILIES)
    log_decay = log_decay_text = None
    if family == "none":
        if "log_decay" in mk:
            raise fail("mask.log_decay", "not allowed with family: none (there is no decay)")
    else:
        if "log_decay" not in mk:
            raise fail("mask.log_decay", f"required with family: {family}")
        log_decay, log_decay_text = expression(mk["log_decay"], "mask.log_decay", "z")
    alignment = None
    if "alignment" in mk and family != "selective":
        raise fail("mask.alignment", f"only a selective mask has an alignment (family is {family})")
    if "alignment" in mk and direction == "causal":
        raise fail("mask.alignment", "a causal mask has one triangle; alignment applies to bidirectional masks")
    if family == "selective" and direction == "bidirectional":
        alignment = choice(mk.get("alignment", DEFAULTS["mask.alignment"]), "mask.alignment", ALIGNMENTS)

    normalize_rows = boolean(top.get("normalize_rows", DEFAULTS["normalize_rows"]), "normalize_rows")
    allow_unproven = boolean(top.get("allow_unproven", DEFAULTS["allow_unproven"]), "allow_unproven")
    scale, scale_text = expression(top.get("scale", DEFAULTS["scale"]), "scale", "d")

    eps = top.get("eps", DEFAULTS["eps"])
    if isinstance(eps, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        try:
            eps = float(eps)
        except ValueError:
            raise fail("eps", f"must be a number, got {eps!r}") from None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise fail("eps", f"must be a finite number >= 0, got {eps!r}")

    chunk_size = top.get("chunk_size", DEFAULTS["chunk_size"])
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise fail("chunk_size", f"must be an integer, got {chunk_size!r}")
        if chunk_size & (chunk_size - 1) or not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise fail("chunk_size", f"must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}, got {chunk_size}")

    return Spec(
        name=name,
        direction=direction,
        feature_map=FeatureMap(phi, phi_text, normalize),
        mask=Mask(family, log_decay, log_decay_text, alignment),
        normalize_rows=normalize_rows,
        scale=scale,
        scale_text=scale_text,
        eps=float(eps),
        chunk_size=chunk_size,
        allow_unproven=allow_unproven,
        source=source,
    )
