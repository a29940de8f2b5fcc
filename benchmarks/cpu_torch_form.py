"""CPU timing of the torch form (issue 8): forward + backward of one generated op, against its reference
form and torch SDPA on the same shape, float32. ``python -m benchmarks.cpu_torch_form [--spec lion_s]``.

Each candidate is checked against the reference form on a small shape before it is timed; the figure is
the median of ``--repeats`` timed runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import time
from collections.abc import Callable

import torch


def _time(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", default="lion_s")
    ap.add_argument("--shape", default="8,1024,4,64", help="B,L,H,D")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    mod = importlib.import_module(f"generated.{args.spec}")
    op = getattr(mod, args.spec)
    B, L, H, D = (int(x) for x in args.shape.split(","))

    def inputs(b: int, length: int) -> list[torch.Tensor | None]:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, length, H, D, generator=g) for _ in range(3))
        gate = {"none": None, "decay": torch.randn(H, generator=g), "selective": torch.randn(b, length, H, generator=g)}
        return [q, k, v, gate[mod.FAMILY]]

    def run(form: str, ins: list[torch.Tensor | None]) -> list[torch.Tensor]:
        x = [t.clone().requires_grad_() if t is not None else None for t in ins]
        y = op(*x, form=form, chunk_size=args.chunk)
        y.square().sum().backward()
        return [y.detach()] + [t.grad for t in x if t is not None]

    small = inputs(2, 200)
    for got, want in zip(run("torch", small), run("reference", small), strict=True):
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-4, f"torch form differs from the reference form: {err}"

    ins = inputs(B, L)
    sdpa_in = [t.transpose(1, 2).contiguous() for t in ins[:3]]

    def sdpa() -> None:
        x = [t.clone().requires_grad_() for t in sdpa_in]
        torch.nn.functional.scaled_dot_product_attention(*x).square().sum().backward()

    res = {
        "torch": _time(lambda: run("torch", ins), args.repeats),
        "reference": _time(lambda: run("reference", ins), args.repeats),
        "sdpa": _time(sdpa, args.repeats),
    }
    print(
        f"{args.spec} B={B} L={L} H={H} D={D} chunk={args.chunk} float32, forward+backward, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    for name, t in res.items():
        print(f"  {name:10s} {t * 1e3:9.1f} ms")
    ratio, vs_sdpa = res["reference"] / res["torch"], res["torch"] / res["sdpa"]
    print(f"  reference / torch = {ratio:.1f}x;  torch / sdpa = {vs_sdpa:.2f}x")


if __name__ == "__main__":
    main()
