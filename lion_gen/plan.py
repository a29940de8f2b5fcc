"""The Plan: what the planner derived from a Spec and what codegen renders.

Expressions are SymPy (printed by codegen); switches are plain Python values the templates read;
``stages`` is the kernel-stage DAG after specialization and pruning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import sympy as sp


@dataclass(frozen=True)
class Elementwise:
    """An elementwise function of one symbol, after common-subexpression elimination."""

    symbol: sp.Symbol
    expr: sp.Expr  # the whole expression (for explain and for proofs)
    steps: tuple[tuple[sp.Symbol, sp.Expr], ...]  # temporaries, in order
    result: sp.Expr  # in the symbol and the temporaries


@dataclass(frozen=True)
class Plan:
    name: str
    class_name: str
    spec: dict[str, Any]  # the normalized spec
    direction: str  # bidirectional | causal
    family: str  # none | decay | selective
    alignment: str | None
    # Potentials (lion_math.md section 3.1): F_m = P_{m+f_shift}, G_m = P_{m+g_shift}, P exclusive.
    f_shift: int
    g_shift: int
    normalize_rows: bool
    l2: bool
    eps: float
    default_chunk: int
    scale: sp.Expr  # in d
    feature: Elementwise  # f(x) (before the l2 normalization)
    feature_grad: Elementwise  # f'(x)
    l2_adjoint: sp.Expr  # dr in the symbols g, phi, dot, norm (derived, see planner)
    log_decay: Elementwise | None  # l(z)
    log_decay_grad: Elementwise | None  # dl/dz
    stages: nx.DiGraph
    equations: tuple[str, ...]
    facts: tuple[str, ...]  # what the planner proved (or accepted unproven)
    warnings: tuple[str, ...] = field(default=())

    @property
    def bidirectional(self) -> bool:
        return self.direction == "bidirectional"

    @property
    def gated(self) -> bool:
        return self.family != "none"

    @property
    def global_state(self) -> bool:
        """Mask none, bidirectional: one global K^T V state, no scan (lion_math.md section 3.3)."""
        return self.family == "none" and self.bidirectional

    def has(self, stage: str) -> bool:
        return stage in self.stages

    def launch_order(self, kernel: str | None = None) -> list[str]:
        """The stages in launch order (a topological order of the stage graph, ties broken by name),
        those of one pass ("forward" or "backward") when ``kernel`` says which."""
        order = list(nx.lexicographical_topological_sort(self.stages, key=_pass_first))
        return [n for n in order if kernel is None or self.stages.nodes[n]["kernel"] == kernel]


def _pass_first(node: str) -> str:
    return ("0" if node.startswith("fwd") else "1") + node
