"""lion-gen: a compiler from masked linear attention specs to Triton kernels.

The compiler's names (``load``, ``generate_source``, ``plan``, ``load_spec``, ``Spec``, ``SpecError``) are
imported on first use, so that ``import lion_gen.runtime``, which every generated module does, imports
neither SymPy nor Jinja2, networkx or PyYAML.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Spec", "SpecError", "__version__", "generate_source", "load", "load_spec", "plan"]

_LAZY = {
    "Spec": "spec",
    "SpecError": "spec",
    "load_spec": "spec",
    "generate_source": "codegen",
    "load": "codegen",
}

if TYPE_CHECKING:
    from .codegen import generate_source, load
    from .planner import plan
    from .spec import Spec, SpecError, load_spec


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``lion_gen.plan`` is the planner's function, never the submodule ``lion_gen.plan`` (the Plan types).

    Importing that submodule binds it as an attribute of the package; the setter keeps the function.
    """

    @property
    def plan(self) -> Any:
        from .planner import plan

        return plan

    @plan.setter
    def plan(self, value: object) -> None:
        pass


sys.modules[__name__].__class__ = _Package
