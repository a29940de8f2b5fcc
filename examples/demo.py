"""A short demo of the generated modules: exactness against the reference form, then a few training steps.

Runs on a GPU when there is one; otherwise under the Triton interpreter on the CPU (slow: shapes are tiny).

    python examples/demo.py [--quick] [--modules DIR]

--quick: shorter sequences and fewer training steps (what CI runs). --modules DIR: import the generated
modules from DIR/generated instead of the repository's generated/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
_parser = argparse.ArgumentParser(description="A short demo of the generated modules.")
_parser.add_argument("--quick", action="store_true", help="shorter sequences, fewer training steps")
_parser.add_argument("--modules", metavar="DIR", help="import the generated modules from DIR/generated")
ARGS = _parser.parse_args()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if ARGS.modules:
    sys.path.insert(0, str(Path(ARGS.modules).resolve()))  # ahead of the repository's generated/

from generated.lion_d import LionD, lion_d  # noqa: E402
from generated.lion_lit import LionLit  # noqa: E402
from generated.lion_s import LionS, lion_s  # noqa: E402


def main(quick: bool = False) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = "GPU" if device == "cuda" else "CPU, Triton interpreter"
    print(f"lion-gen demo on {where}{' (quick)' if quick else ''}")
    torch.manual_seed(0)

    # 1. The chunkwise kernels against the materialized reference form (float64 on the reference side).
    B, L, H, D = 2, 40 if quick else 100, 2, 32
    q, k, v = (torch.randn(B, L, H, D, device=device) for _ in range(3))
    gate_s = torch.randn(B, L, H, device=device)
    gate_d = torch.randn(H, device=device)
    for name, fn, gate in (("lion_s", lion_s, gate_s), ("lion_d", lion_d, gate_d)):
        y = fn(q, k, v, gate, chunk_size=16)
        ref = fn(q.double(), k.double(), v.double(), gate.double(), form="reference")
        err = ((y.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
        print(f"  {name}: chunk vs reference, relative RMS error {err:.2e} (L={L}, chunk 16)")

    # 2. Train each layer a few steps to copy a shifted sequence (a task that needs both directions).
    dim, heads, L = 32, 2, 24
    steps = 2 if quick else 10
    for cls in (LionLit, LionD, LionS):
        layer = torch.nn.Sequential(cls(dim, heads, chunk_size=16), torch.nn.Linear(dim, dim)).to(device)
        opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
        x = torch.randn(4, L, dim, device=device)
        target = torch.roll(x, shifts=1, dims=1) + torch.roll(x, shifts=-1, dims=1)
        start = time.time()
        losses = []
        for _ in range(steps):
            loss = (layer(x) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        took = time.time() - start
        print(f"  {cls.__name__}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps ({took:.1f}s)")
    print("done")


if __name__ == "__main__":
    main(quick=ARGS.quick)
