"""Peak memory of a generated op (forward, then backward), form by form, measured without a GPU.

The op runs dry on meta tensors (its launches skipped: the kernels allocate nothing themselves), under a torch
dispatch mode that sees every tensor the host code allocates (torch.empty, torch.zeros, copies, arithmetic,
what autograd keeps) and follows each allocation until it is freed. The inputs and dO are allocated before
and not counted; y and the gradients are. Reported per form:

- peak: the most bytes live at once, from the forward's first allocation to the end of the backward;
- results: y, dq, dk, dv and the gate's gradient, which every form returns;
- extra: peak - results, the memory a form needs beyond its results (scratch, saved states, row sums);
- saved: what stays live between the forward and the backward (y included).

    python -m benchmarks.memory lion_s --B 2 --L 4096 --H 8 --D 64 --dtype fp32
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMS = ("chunk", "parallel", "recurrent")


@dataclass(frozen=True)
class Memory:
    form: str
    peak: int
    results: int
    saved: int

    @property
    def extra(self) -> int:
        return self.peak - self.results


class _Live(TorchDispatchMode):
    """Bytes of the tensors that ops allocate (not views, not in-place results), live until freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if all(r.alias_info is None for r in func._schema.returns):  # a fresh allocation, not a view of an input
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    nbytes = t.untyped_storage().nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, nbytes)
        return out

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def measure(
    name: str, B: int, L: int, H: int, D: int, dtype: torch.dtype, form: str, chunk: int | None = None
) -> Memory:
    """The peak memory of generated.<name> forward + backward at (B, L, H, D) in ``form`` (see the module doc)."""
    from benchmarks.cost import make_inputs

    mod = importlib.import_module(f"generated.{name}")
    op = getattr(mod, name)
    q, k, v, gate, dy = make_inputs(mod.FAMILY, B, L, H, D, dtype, "meta")
    # meta tensors pass the kernel forms' device check only as the interpreter's CPU tensors do
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}), mock.patch.object(mod, "launch", lambda *a, **k: None):
        with _Live() as live:
            y = op(q, k, v, gate, form=form, chunk_size=chunk)
            saved = live.live
            y.backward(dy)
            peak = live.peak
    results = _nbytes(y) + sum(_nbytes(t.grad) for t in (q, k, v, gate) if t is not None)
    return Memory(form, peak, results, saved)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    p.add_argument("spec", help="a generated module: generated/<spec>.py (e.g. lion_s)")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--L", type=int, default=4096)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    X = args.B * args.L * args.H * args.D * DTYPES[args.dtype].itemsize
    shape = f"B={args.B} L={args.L} H={args.H} D={args.D} {args.dtype}"
    print(f"{args.spec} {shape}: X = one (B, L, H, D) tensor = {X:,} bytes")
    print(f"{'form':10} {'peak':>14} {'results':>14} {'extra':>14} {'extra/X':>8} {'saved':>14}")
    for form in args.forms:
        m = measure(args.spec, args.B, args.L, args.H, args.D, DTYPES[args.dtype], form, args.chunk)
        print(f"{form:10} {m.peak:14,} {m.results:14,} {m.extra:14,} {m.extra / X:8.3f} {m.saved:14,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
