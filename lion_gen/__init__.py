"""lion-gen: a compiler from masked linear attention specs to Triton kernels."""

from __future__ import annotations

__version__ = "0.1.0"

from .codegen import generate_source, load  # noqa: E402
from .planner import plan  # noqa: E402
from .spec import Spec, SpecError, load_spec  # noqa: E402

__all__ = ["Spec", "SpecError", "__version__", "generate_source", "load", "load_spec", "plan"]
