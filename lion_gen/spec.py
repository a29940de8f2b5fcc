"""YAML spec -> Spec (CONTRACT.md section 1). Every refusal names the file, the field and the reason."""

from __future__ import annotations

import builtins
import keyword
import reprlib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sympy as sp
import yaml

from .functions import FLOAT32_MAX, ExpressionError, parse_expression, shorten

DIRECTIONS = ("bidirectional", "causal")
FAMILIES = ("none", "decay", "selective")
ALIGNMENTS = ("lion", "symmetric")
NORMALIZE = ("none", "l2")
MIN_CHUNK, MAX_CHUNK = 16, 256
# Limits on the file, checked on YAML's event stream before anything is built from it:
MAX_FILE_BYTES = 64 * 1024
MAX_YAML_DEPTH = 16  # nesting of mappings and lists
MAX_YAML_NODES = 1000  # values, counting each use of an alias as a copy of what it names
MAX_NAME_BYTES = 100  # the name makes file names (<name>.py, and a temporary beside it)


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


class HugeInteger:
    """An integer literal too long for Python's int() (over 4300 digits): kept as its digit count only."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<a {self.digits}-digit integer>"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but an over-long integer becomes a HugeInteger instead of a ValueError."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> object:
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > 1000:
            return HugeInteger(digits)
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlong = 40


def show(value: object) -> str:
    """A bounded repr for messages: long strings, numbers and nested values are cut, saying so."""
    if isinstance(value, str):
        return repr(shorten(value))
    return shorten(_REPR.repr(value))


def _one_line(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong, and where."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = e.problem or e.context or "syntax error"
        if e.context and e.problem:
            what = f"{e.problem} ({e.context})"
        return f"{shorten(' '.join(what.split()), 120)}{where}"
    return shorten(" ".join(str(e).split()), 120)


def _check_events(text: str, source: str) -> None:
    """Refuse YAML nested too deeply or expanding (through aliases) to too many values, before loading it."""
    sizes: dict[str, int] = {}
    stack: list[list[Any]] = [[None, 0]]  # [anchor, size] of each open collection; the root
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                stack.append([event.anchor, 1])
                if len(stack) - 1 > MAX_YAML_DEPTH:
                    raise SpecError(source, "<file>", f"nested more than {MAX_YAML_DEPTH} levels deep")
                continue
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                anchor, size = stack.pop()
            elif isinstance(event, yaml.ScalarEvent):
                anchor, size = event.anchor, 1
            elif isinstance(event, yaml.AliasEvent):
                anchor, size = None, sizes.get(event.anchor, 1)
            else:
                continue
            if anchor is not None:
                sizes[anchor] = size
            stack[-1][1] += size
            if stack[-1][1] > MAX_YAML_NODES or size > MAX_YAML_NODES:
                raise SpecError(
                    source, "<file>", f"has more than {MAX_YAML_NODES} values (counting what each YAML alias repeats)"
                )
    except yaml.YAMLError as e:
        raise SpecError(source, "<file>", f"not valid YAML: {_one_line(e)}") from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file. Raises SpecError (file, field, reason)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise SpecError(source, "<file>", f"cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(source, "<file>", f"is {len(raw)} bytes long; a spec is at most {MAX_FILE_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(source, "<file>", f"is not UTF-8 text (byte {e.start})") from None
    _check_events(text, source)
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        raise SpecError(source, "<file>", f"not valid YAML: {_one_line(e)}") from None
    except RecursionError:  # pragma: no cover - _check_events bounds the nesting
        raise SpecError(source, "<file>", "nested too deeply") from None
    return parse_spec(data, source)


def check_name(name: object) -> str | None:
    """Why ``name`` cannot name a module, a function and a file, or None when it can."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        return f"must be a Python identifier, got {show(name)}"
    if name.startswith("_"):
        return f"must not start with an underscore, got {show(name)}"
    if keyword.issoftkeyword(name) or name in dir(builtins):
        return f"{name!r} is a Python builtin or keyword, which the generated module would shadow; choose another name"
    if unicodedata.normalize("NFKC", name) != name:
        return (
            f"{show(name)} changes under Unicode normalization (NFKC) to "
            f"{show(unicodedata.normalize('NFKC', name))}, which is the name Python would import; write that"
        )
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long; at most {MAX_NAME_BYTES} (it names the module's file), got {show(name)}"
    return None


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
                shown = shorten(key, 40) if isinstance(key, str) else show(key)
                raise fail(f"{prefix}{shown}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
        return value

    def required(container: dict[str, Any], key: str, field: str) -> object:
        if key not in container:
            raise fail(field, "required field missing")
        return container[key]

    def choice(value: object, field: str, options: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in options:
            raise fail(field, f"must be one of {', '.join(options)}; got {show(value)}")
        return value

    def boolean(value: object, field: str) -> bool:
        if not isinstance(value, bool):
            raise fail(field, f"must be true or false, got {show(value)}")
        return value

    def expression(value: object, field: str, symbol: str) -> tuple[sp.Expr, str]:
        if isinstance(value, HugeInteger):
            raise fail(field, f"the constant {value!r} is beyond float32's range (at most {FLOAT32_MAX:.4g})")
        try:
            expr = parse_expression(value, symbol)
        except ExpressionError as e:
            raise fail(field, str(e)) from None
        return expr, str(value).strip()  # bounded: parse_expression refused longer text

    top = mapping(data, "<top level>", TOP_FIELDS)
    name = required(top, "name", "name")
    why = check_name(name)
    if why is not None:
        raise fail("name", why)
    assert isinstance(name, str)

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
            raise fail("eps", f"must be a number, got {show(eps)}") from None
    if isinstance(eps, bool) or not isinstance(eps, (int, float, HugeInteger)):
        raise fail("eps", f"must be a finite number >= 0, got {show(eps)}")
    if isinstance(eps, HugeInteger):
        raise fail(
            "eps", f"must be a finite number >= 0 within float32's range (at most {FLOAT32_MAX:.4g}), got {eps!r}"
        )
    if not eps >= 0 or eps > FLOAT32_MAX:
        raise fail(
            "eps", f"must be a finite number >= 0 within float32's range (at most {FLOAT32_MAX:.4g}), got {show(eps)}"
        )

    chunk_size = top.get("chunk_size", DEFAULTS["chunk_size"])
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, HugeInteger)):
            raise fail("chunk_size", f"must be an integer, got {show(chunk_size)}")
        huge = isinstance(chunk_size, HugeInteger)
        if huge or not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_size & (chunk_size - 1):
            raise fail("chunk_size", f"must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}, got {show(chunk_size)}")

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
