"""Benchmark harness: generated ops in every kernel form against the reference, SDPA and (if installed) fla.

    python -m benchmarks.bench                    # the anchor sweep on a GPU (32768 tokens, H=12, D=64, bf16)
    python -m benchmarks.bench --shapes fla       # flash-linear-attention's benchmark shapes
    python -m benchmarks.bench --smoke            # tiny shapes on the CPU (Triton interpreter): checks the harness

Every timed op is first checked against the float64 reference form on a (batch 0, head 0) slice; an op
that fails the check is reported WRONG and not timed. Writes a table to stdout, and JSON and a PNG plot
(time against L, log-log; needs matplotlib) to --out.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ANCHOR_LENGTHS = (197, 256, 1024, 4096, 16384)
# flash-linear-attention's six benchmark shape configs (B, L, H, D), from its benchmarks/ops registry.
FLA_SHAPES = (
    (1, 8192, 96, 128),
    (2, 16384, 16, 128),
    (4, 2048, 16, 128),
    (4, 4096, 64, 128),
    (8, 2048, 32, 256),
    (8, 1024, 8, 64),
)
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@dataclass
class Row:
    method: str
    spec: str
    B: int
    L: int
    H: int
    D: int
    dtype: str
    error: float | None = None
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    peak_mb: float | None = None
    floor_fwd_ms: float | None = None
    floor_fwdbwd_ms: float | None = None
    note: str = ""
    ratios: dict[str, float] = field(default_factory=dict)


def bench_ms(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median wall time in ms: triton.testing.do_bench on a GPU, a perf_counter loop elsewhere."""
    if device == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def copy_bandwidth(device: str) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    if device != "cuda":
        return float("nan")
    x = torch.empty(1 << 28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x), device, 200)
    return 2 * x.numel() * 4 / (ms * 1e-3)


def inputs(family: str, B: int, L: int, H: int, D: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, D, generator=g).to(device, dtype) for _ in range(3))
    gate = {"none": None, "decay": torch.randn(H, generator=g), "selective": torch.randn(B, L, H, generator=g)}[family]
    gate = gate.to(device) if gate is not None else None
    return q, k, v, gate


def hbm_bytes(family: str, B: int, L: int, H: int, D: int, dtype: torch.dtype) -> tuple[int, int]:
    """Fewest HBM bytes: forward reads q, k, v, gate and writes o; forward+backward also reads dO and
    writes dq, dk, dv, dgate (each tensor once: the ideal fused job, as in docs/anchors)."""
    act = B * L * H * D * (torch.finfo(dtype).bits // 8)
    gate = {"none": 0, "decay": H * 4, "selective": B * L * H * 4}[family]
    return 4 * act + gate, 8 * act + 2 * gate


def check(op: Callable, ref: Callable, family: str, L: int, D: int, dtype: torch.dtype, device: str) -> float:
    """Relative RMS error of op (output and input gradients) against the float64 reference, on one (b, h)."""
    q, k, v, gate = inputs(family, 1, L, 1, D, dtype, device, seed=1)
    ins = [t for t in (q, k, v, gate) if t is not None]
    mine = [t.detach().clone().requires_grad_() for t in ins]
    theirs = [t.detach().double().requires_grad_() for t in ins]
    y = op(*mine[:3], mine[3] if gate is not None else None)
    y_ref = ref(*theirs[:3], theirs[3] if gate is not None else None)
    dy = torch.randn_like(y_ref)
    y.backward(dy.to(y.dtype))
    y_ref.backward(dy)
    worst = 0.0
    for a, b in [(y, y_ref), *[(m.grad, t.grad) for m, t in zip(mine, theirs, strict=True)]]:
        if a is None:
            return math.inf
        err = ((a.double() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()
        worst = max(worst, err)
    return worst


def peak_extra_mb(fn: Callable[[], object], device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def sdpa_op(q, k, v, gate):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)


def fla_op():
    """Two causal fla chunk_simple_gla passes (forward, and on the flipped sequence), or None if fla is absent."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None

    def op(q, k, v, gate):
        g = torch.nn.functional.logsigmoid(gate.float())
        g = g.expand(q.shape[0], q.shape[1], q.shape[2]) if g.dim() == 1 else g
        fwd, _ = chunk_simple_gla(q, k, v, g=g)
        bwd, _ = chunk_simple_gla(q.flip(1), k.flip(1), v.flip(1), g=g.flip(1))
        return fwd + bwd.flip(1)

    return op


def run_case(method, op, spec, family, B, L, H, D, dtype, device, reps, bandwidth, checked: bool, ref) -> Row:
    row = Row(method, spec, B, L, H, D, str(dtype).replace("torch.", ""))
    fb, fbb = hbm_bytes(family, B, L, H, D, dtype)
    row.floor_fwd_ms, row.floor_fwdbwd_ms = fb / bandwidth * 1e3, fbb / bandwidth * 1e3
    if checked:
        try:
            row.error = check(op, ref, family, L, D, dtype, device)
        except (RuntimeError, ValueError) as e:  # out of memory, unsupported shape: report, do not time
            row.note = f"check failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            return row
        if not row.error <= TOL[dtype]:
            row.note = f"WRONG: error {row.error:.2e} > {TOL[dtype]:.0e}, not timed"
            return row
    else:
        row.note = "unchecked baseline (different function)"
    try:
        q, k, v, gate = inputs(family, B, L, H, D, dtype, device)
        ins = [t.requires_grad_() for t in (q, k, v) + ((gate,) if gate is not None else ())]
        args = (*ins[:3], ins[3] if gate is not None else None)
        dy = torch.randn(B, L, H, D, device=device, dtype=dtype)
        with torch.no_grad():
            row.fwd_ms = bench_ms(lambda: op(*args), device, reps)

        def step():
            for t in ins:
                t.grad = None
            op(*args).backward(dy)

        row.fwdbwd_ms = bench_ms(step, device, reps)
        row.peak_mb = peak_extra_mb(step, device)
    except (RuntimeError, ValueError) as e:
        row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    if row.fwdbwd_ms and not math.isnan(row.floor_fwdbwd_ms):
        row.ratios = {"fwd": row.fwd_ms / row.floor_fwd_ms, "fwdbwd": row.fwdbwd_ms / row.floor_fwdbwd_ms}
    return row


def progress(i: int, n: int, label: str) -> None:
    width = 30
    done = int(width * i / n)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:60]:<60}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows: list[Row]) -> str:
    head = f"{'method':<22}{'spec':<10}{'B':>5}{'L':>7}{'fwd ms':>9}{'f+b ms':>9}"
    head += f"{'xfloor':>8}{'peak MB':>9}{'err':>9}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        err = "-" if r.error is None else f"{r.error:.1e}"
        ratio = fmt(r.ratios.get("fwdbwd"), 1) if r.ratios else "-"
        lines.append(
            f"{r.method:<22}{r.spec:<10}{r.B:>5}{r.L:>7}{fmt(r.fwd_ms):>9}{fmt(r.fwdbwd_ms):>9}{ratio:>8}"
            f"{fmt(r.peak_mb, 0):>9}{err:>9}  {r.note}"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r.method for r in rows}):
        pts = sorted((r.L, r.fwdbwd_ms) for r in rows if r.method == method and r.fwdbwd_ms)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    floor = sorted({(r.L, r.floor_fwdbwd_ms) for r in rows if r.floor_fwdbwd_ms and not math.isnan(r.floor_fwdbwd_ms)})
    if floor:
        ax.plot(*zip(*floor, strict=True), "k--", label="HBM floor")
    ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="forward+backward, ms (median)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def environment(device: str) -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout
    except OSError:
        commit = ""
    import triton

    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.strip(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "interpreter": os.environ.get("TRITON_INTERPRET", "0"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    p.add_argument("--specs", nargs="+", default=["lion_lit", "lion_d", "lion_s"])
    p.add_argument("--forms", nargs="+", default=["chunk", "parallel"], choices=["chunk", "parallel", "reference"])
    p.add_argument("--shapes", choices=["anchor", "fla"], default="anchor")
    p.add_argument("--lengths", nargs="+", type=int, default=list(ANCHOR_LENGTHS))
    p.add_argument("--tokens", type=int, default=32768, help="B = tokens // L at the anchor shape")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--reps", type=int, default=100, help="do_bench rep time in ms")
    p.add_argument("--baselines", nargs="*", default=["reference", "sdpa", "fla"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, float32, CPU under the Triton interpreter")
    args = p.parse_args(argv)

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.lengths, args.tokens, args.heads, args.dim, args.dtype = [20, 40], 40, 2, 16, "float32"
        args.baselines = [b for b in args.baselines if b != "fla"]
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    if device == "cpu" and not args.smoke:
        p.error("no GPU: timings would mean nothing (use --smoke to check the harness on the CPU)")
    dtype = getattr(torch, args.dtype)
    sys.path.insert(0, str(ROOT))
    shapes = (
        [(max(1, args.tokens // L), L, args.heads, args.dim) for L in args.lengths]
        if args.shapes == "anchor"
        else FLA_SHAPES
    )
    bandwidth = copy_bandwidth(device)
    fla = fla_op() if "fla" in args.baselines else None

    cases = []
    for spec in args.specs:
        mod = importlib.import_module(f"generated.{spec}")
        fn = getattr(mod, spec)
        ref = lambda q, k, v, g, fn=fn: fn(q, k, v, g, form="reference")  # noqa: E731
        for B, L, H, D in shapes:
            for form in args.forms:
                op = lambda q, k, v, g, fn=fn, form=form: fn(q, k, v, g, form=form, chunk_size=args.chunk_size)  # noqa: E731
                cases.append((f"{spec}:{form}", op, spec, mod.FAMILY, B, L, H, D, True, ref))
            if "reference" in args.baselines and "reference" not in args.forms:
                cases.append((f"{spec}:reference", ref, spec, mod.FAMILY, B, L, H, D, True, ref))
            if fla is not None and mod.FAMILY != "none":
                cases.append(("fla 2x chunk_simple_gla", fla, spec, mod.FAMILY, B, L, H, D, False, ref))
    if "sdpa" in args.baselines:
        for B, L, H, D in shapes:
            cases.append(("sdpa (softmax)", sdpa_op, "-", "none", B, L, H, D, False, None))

    rows = []
    for i, (method, op, spec, family, B, L, H, D, checked, ref) in enumerate(cases):
        progress(i, len(cases), f"{method} L={L}")
        rows.append(run_case(method, op, spec, family, B, L, H, D, dtype, device, args.reps, bandwidth, checked, ref))
        if device == "cuda":
            torch.cuda.empty_cache()
    progress(len(cases), len(cases), "done")

    env = environment(device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "smoke" if args.smoke else f"bench_{args.shapes}"
    (args.out / f"{stem}.json").write_text(
        json.dumps({"env": env, "bandwidth_GBps": bandwidth / 1e9, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date']}")
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; xfloor = forward+backward time / HBM floor")
    print(table(rows))
    print(plot(rows, args.out / f"{stem}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
