"""Cost report that needs no GPU: memory traffic and dot FLOPs counted per launch, and sm_90a compile figures.

    python -m benchmarks.cost lion_s                       # anchor: bf16, D = 64, chunk 64, H = 12, B = 32768 // L
    python -m benchmarks.cost lion_s --L 4096 --D 128      # other shapes
    python -m benchmarks.cost lion_s --small --no-compile  # a quick look (B = 1, L = 200, H = 2)

These are counts, not timings. Two parts:

1. Traffic. The public op ``generated.<spec>.<spec>(q, k, v, gate, form=..., chunk_size=...)`` runs forward and
   ``.backward()`` under the Triton interpreter (TRITON_INTERPRET=1) with the interpreter builder's loads, stores,
   atomics and dots wrapped: every active lane (masked-off lanes excluded) counts its element size, every dot
   2 M N K FLOPs. Each launch goes through ``launch(kernel, grid, ...)``, which the generated module imports by
   name; the wrapped ``mod.launch`` attributes the counts to the running kernel. The counts run at the requested
   L but at a small B * H (default 1 x 2) and are scaled by B H / (B_count H_count): they are per (b, h) (the test
   tests/test_cost.py checks that they are exactly linear in B * H). The grids are those of the requested shape
   (a dry run of the op on meta tensors, kernels not run). Totals are in units of X, the bytes of one
   (B, L, H, D) tensor in the run's dtype, against the floor of benchmarks/bench.py (q, k, v, dO read, o, dq, dk,
   dv written once, plus the gate and its gradient: about 8X). Torch ops the host code runs between launches
   (casts, the parallel form's suffix sums) are listed apart, estimated as one read of their inputs and one
   write of their outputs; allocations and views count nothing.
2. Compile. Every kernel is compiled for sm_90a (``GPUTarget("cuda", 90, 128)``, Triton's own ptxas) exactly as
   its launch builds it: the JIT's own binder specializes the recorded launch arguments (dtypes, 16-byte
   alignment of pointers, integers divisible by 16 or equal to 1, the kernel's do_not_specialize), with the
   launch's constexprs and num_warps, and the module's own ``launch`` picks num_stages (its shared-memory
   fallback emulated with an H100's 232,448 bytes per block). Reported: registers, spills and stack (ptxas -v),
   shared memory, the MMA instructions in the PTX (TF32 ones flagged) and ptxas warnings such as C7512.
   The compile runs in a subprocess without TRITON_INTERPRET.

Writes a table to stdout and JSON to --out (benchmarks/results/cost_<spec>_<form>_<dtype>_D<D>_C<C>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parent.parent
ANCHOR_TOKENS = 32768
H100_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (the driver's opt-in maximum)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNEL_FORMS = ("chunk", "parallel", "recurrent")  # forms that launch kernels (checks.FORMS less auto, reference)


# ---------------------------------------------------------------------------------------------------------------
# Launch records


@dataclass
class Launch:
    """One kernel launch of a generated module, with what it moved when it ran under the interpreter."""

    phase: str  # "forward" or "backward"
    kernel: str  # the kernel's name
    module: str
    grid: list[int]
    args: list[Any]  # encoded (see encode_arg), positional
    kwargs: dict[str, Any]  # encoded, keyword (constexprs, num_warps, ...)
    read: int = 0  # bytes, active lanes only
    written: int = 0
    flops: int = 0  # 2 M N K per dot
    by_arg: dict[str, list[int]] = field(default_factory=dict)  # kernel parameter -> [bytes read, bytes written]

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


@dataclass
class TorchOp:
    """A torch op the op's host code runs between launches; its bytes are an estimate (see _TorchOps)."""

    phase: str
    op: str
    read: int
    written: int


def encode_arg(a: Any) -> Any:
    """A JSON form of a launch argument: tensors by dtype, shape, strides and storage offset; scalars as is."""
    if isinstance(a, torch.Tensor):
        return {
            "tensor": str(a.dtype).removeprefix("torch."),
            "shape": list(a.shape),
            "stride": list(a.stride()),
            "offset": a.storage_offset(),
        }
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise TypeError(f"cannot record a launch argument of type {type(a).__name__}: {a!r}")


def decode_arg(a: Any) -> Any:
    """The inverse of encode_arg: a meta tensor whose data_ptr() is its byte offset (a 16-byte aligned base)."""
    if isinstance(a, dict) and "tensor" in a:
        extent = 1 + sum((s - 1) * st for s, st in zip(a["shape"], a["stride"], strict=True)) if all(a["shape"]) else 0
        base = torch.empty(a["offset"] + extent, dtype=getattr(torch, a["tensor"]), device="meta")
        return base.as_strided(a["shape"], a["stride"], a["offset"])
    return a


def _kernel_name(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", type(kernel).__name__)


def make_inputs(
    family: str, B: int, L: int, H: int, D: int, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, L, H, D) in dtype, the gate in float32 (as benchmarks/bench.py) and dO; all requiring grad."""
    if device == "meta":
        q, k, v, dy = (torch.empty(B, L, H, D, dtype=dtype, device="meta") for _ in range(4))
        gate = {"none": None, "decay": torch.empty(H, device="meta"), "selective": torch.empty(B, L, H, device="meta")}
    else:
        g = torch.Generator().manual_seed(seed)
        q, k, v, dy = (torch.randn(B, L, H, D, generator=g).to(device, dtype) for _ in range(4))
        gate = {"none": None, "decay": torch.randn(H, generator=g), "selective": torch.randn(B, L, H, generator=g)}
    gt = gate[family]
    gt = gt.to(device) if gt is not None else None
    ins = [t.requires_grad_() for t in (q, k, v) + ((gt,) if gt is not None else ())]
    return (*ins[:3], gt, dy)


def _interpreting() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def capture(
    name: str,
    B: int,
    L: int,
    H: int,
    D: int,
    dtype: torch.dtype,
    chunk: int | None = None,
    form: str = "chunk",
    *,
    count: bool = False,
    device: str | None = None,
    torch_ops: list[TorchOp] | None = None,
    schedule_bh: int | None = None,
    packed: list[int] | None = None,
) -> list[Launch]:
    """Every launch of generated.<name> forward and backward at (B, L, H, D), in launch order.

    count=False: a dry run (the kernels are not run) on meta tensors, or on CUDA tensors when kernels run
    compiled: it records kernels, grids and arguments. count=True: the kernels run under the Triton interpreter
    with their memory traffic and dot FLOPs counted (needs TRITON_INTERPRET=1 before the module is imported).
    torch_ops (dry runs only): a list that receives the torch ops the host code runs outside the kernels.
    schedule_bh: schedule the launches as for this many (b, h) pairs (the chunk form's segment length depends
    on B * H), so that a run at a small B * H counts, per (b, h), exactly what the full shape does.
    packed: sequence lengths; the op then runs on one packed batch of them (B = 1, L = their sum, cu_seqlens).
    """
    mod = importlib.import_module(f"generated.{name}")
    op = getattr(mod, name)
    real_launch = mod.launch
    if count and not _interpreting():
        raise RuntimeError("counting needs the Triton interpreter: set TRITON_INTERPRET=1 before importing generated/")
    if device is None:
        device = "cpu" if count else ("meta" if _interpreting() or not torch.cuda.is_available() else "cuda")
    launches: list[Launch] = []
    phase = ["forward"]
    counter = TrafficCounter() if count else None

    def recording_launch(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
        rec = Launch(
            phase[0],
            _kernel_name(kernel),
            mod.__name__,
            [int(g) for g in grid],
            [encode_arg(a) for a in args],
            {k: encode_arg(v) for k, v in kwargs.items()},
        )
        launches.append(rec)
        if counter is not None:
            with counter.attribute(rec, kernel, args, kwargs):
                real_launch(kernel, grid, *args, **kwargs)

    q, k, v, gate, dy = make_inputs(mod.FAMILY, B, L, H, D, dtype, device)
    if torch_ops is not None and count:
        raise ValueError("torch_ops are recorded in dry runs only")
    mode = _TorchOps(phase, torch_ops, q.device) if torch_ops is not None else contextlib.nullcontext()
    mod.launch = recording_launch
    real_schedule = getattr(mod, "segment_chunks", None)
    if schedule_bh is not None and real_schedule is not None:
        mod.segment_chunks = lambda bh, n, dev: real_schedule(schedule_bh, n, dev)
    try:
        with counter if counter is not None else contextlib.nullcontext(), mode:
            extra = {} if packed is None else {"cu_seqlens": _cu_seqlens(packed, q.device)}
            y = op(q, k, v, gate, form=form, chunk_size=chunk, **extra)
            phase[0] = "backward"
            y.backward(dy)
    finally:
        mod.launch = real_launch
        if real_schedule is not None:
            mod.segment_chunks = real_schedule
    if counter is not None and (counter.outside.read or counter.outside.written):
        raise RuntimeError(f"memory traffic outside any launch: {counter.outside}")
    return launches


def _cu_seqlens(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)


_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias"}
_WRITE_ONLY = {"fill_", "zero_", "copy_", "normal_", "uniform_"}


class _TorchOps(TorchDispatchMode):
    """Records torch ops on ``device`` that move memory, estimating each as one read of its inputs and one write
    of its outputs (allocations and views move nothing). Ops on other devices (such as a CPU probe kernel the
    runtime may run once) are not the op's."""

    def __init__(self, phase: list[str], sink: list[TorchOp], device: torch.device | str) -> None:
        super().__init__()
        self.phase, self.sink, self.device = phase, sink, torch.device(device)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _ALLOCATIONS:
            return out
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not any(t.device == self.device for t in ins + outs):
            return out
        read = sum(_nbytes(t) for t in ins if not any(t is o for o in outs))
        if name.endswith("_") and name not in _WRITE_ONLY and ins:  # in place: self is read, then written
            read += _nbytes(ins[0])
        self.sink.append(TorchOp(self.phase[0], f"torch {name}", read, sum(_nbytes(t) for t in outs)))
        return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def capture_kernel_forms(
    name: str, B: int, L: int, H: int, D: int, dtype: torch.dtype, chunk: int | None = None
) -> dict[str, list[Launch]]:
    """Dry runs of every kernel form the module implements (a form that is 'not implemented' is left out)."""
    out = {}
    for form in KERNEL_FORMS:
        try:
            out[form] = capture(name, B, L, H, D, dtype, chunk, form)
        except ValueError as e:
            if "not implemented" not in str(e):
                raise
    return out


# ---------------------------------------------------------------------------------------------------------------
# Counting under the interpreter


def _elem_bytes(handle: Any) -> int:
    return max(1, handle.get_element_ty().primitive_bitwidth // 8)  # int1 is stored as a byte


def _active(ptrs: Any, mask: Any = None) -> np.ndarray:
    """The addresses of the active lanes of a pointer block."""
    p = np.asarray(ptrs.data)
    if mask is None:
        return p.reshape(-1)
    return p[np.broadcast_to(np.asarray(mask.data, dtype=bool), p.shape)]


def _desc_active(desc: Any, indices: Any) -> tuple[np.ndarray, int]:
    ptrs, mask = desc.materialize_pointers(indices)
    return _active(ptrs, mask), _elem_bytes(desc.base)


# builder method -> (reads, writes) measures; each returns (active addresses, element bytes)
_MEASURES: dict[str, tuple[Callable[..., Any] | None, Callable[..., Any] | None]] = {
    "create_load": (lambda ptr, *a, **k: (_active(ptr), _elem_bytes(ptr)), None),
    "create_masked_load": (lambda ptrs, mask, *a, **k: (_active(ptrs, mask), _elem_bytes(ptrs)), None),
    "create_store": (None, lambda ptr, *a, **k: (_active(ptr), _elem_bytes(ptr))),
    "create_masked_store": (None, lambda ptrs, value, mask, *a, **k: (_active(ptrs, mask), _elem_bytes(ptrs))),
    "create_atomic_load": (lambda ptr, mask, *a, **k: (_active(ptr, mask), _elem_bytes(ptr)), None),
    "create_atomic_store": (None, lambda ptr, val, mask, *a, **k: (_active(ptr, mask), _elem_bytes(ptr))),
    "create_atomic_cas": (
        lambda ptr, *a, **k: (_active(ptr), _elem_bytes(ptr)),
        lambda ptr, *a, **k: (_active(ptr), _elem_bytes(ptr)),
    ),
    "create_atomic_rmw": (
        lambda op, ptr, val, mask, *a, **k: (_active(ptr, mask), _elem_bytes(ptr)),
        lambda op, ptr, val, mask, *a, **k: (_active(ptr, mask), _elem_bytes(ptr)),
    ),
    "create_descriptor_load": (lambda desc, indices, *a, **k: _desc_active(desc, indices), None),
    "create_descriptor_store": (None, lambda desc, value, indices, *a, **k: _desc_active(desc, indices)),
}
# Any other builder method touching memory must reach one of the above (gathers, scatters and polls do);
# if it ever is the innermost one, counting stops with an error instead of missing its traffic. create_gather
# itself (tl.gather: elements of a tensor held in registers, the recurrent form's tokens) touches no memory.
_MEMORY_METHOD = re.compile(r"create_(?!gather\Z)\w*(load|store|atomic|gather|scatter|tensor_pointer)\w*")


class _Bucket:
    """Traffic of one launch, by kernel parameter (address ranges of its tensor arguments)."""

    def __init__(self, rec: Launch | None = None, names: list[str] | None = None, tensors: list[Any] | None = None):
        self.rec = rec or Launch("", "outside any launch", "", [], [], {})
        self.names = names or []
        spans = [
            (t.data_ptr(), t.data_ptr() + _extent_bytes(t), n) for n, t in zip(self.names, tensors or [], strict=True)
        ]
        spans.sort()
        self.starts = np.array([s for s, _, _ in spans], dtype=np.uint64)
        self.ends = np.array([e for _, e, _ in spans], dtype=np.uint64)
        self.labels = [n for _, _, n in spans]

    def add(self, direction: int, addresses: np.ndarray, elem: int) -> None:
        nbytes = int(addresses.size) * elem
        if direction == 0:
            self.rec.read += nbytes
        else:
            self.rec.written += nbytes
        if not nbytes:
            return
        if len(self.starts):
            idx = np.searchsorted(self.starts, addresses.astype(np.uint64), side="right").astype(np.int64) - 1
            ok = idx >= 0
            ok[ok] &= addresses[ok] < self.ends[idx[ok]]
            per = np.bincount(idx[ok], minlength=len(self.labels)) * elem
            for label, b in zip(self.labels, per, strict=True):
                if b:
                    self.rec.by_arg.setdefault(label, [0, 0])[direction] += int(b)
            stray = int((~ok).sum()) * elem
        else:
            stray = nbytes
        if stray:
            self.rec.by_arg.setdefault("(other)", [0, 0])[direction] += stray


def _extent_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))) * t.element_size()


class TrafficCounter:
    """Wraps the interpreter builder's memory and dot methods; counts what each launch moves.

    A builder method that calls another wrapped one (create_load -> create_masked_load, descriptor loads,
    atomic loads) is counted once, by the innermost wrapped method.
    """

    def __init__(self) -> None:
        self.outside = Launch("", "outside any launch", "", [], [], {})
        self._bucket = _Bucket(self.outside)
        self._inner_counted = False
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> TrafficCounter:
        from triton.runtime.interpreter import InterpreterBuilder

        for name in dir(InterpreterBuilder):
            if name in _MEASURES or _MEMORY_METHOD.fullmatch(name):
                self._saved[name] = InterpreterBuilder.__dict__.get(name, getattr(InterpreterBuilder, name))
                setattr(InterpreterBuilder, name, self._wrap(name, getattr(InterpreterBuilder, name)))
        self._saved["create_dot"] = InterpreterBuilder.__dict__["create_dot"]
        InterpreterBuilder.create_dot = self._wrap_dot(InterpreterBuilder.create_dot)
        if "create_dot_scaled" in InterpreterBuilder.__dict__:
            self._saved["create_dot_scaled"] = InterpreterBuilder.__dict__["create_dot_scaled"]
            InterpreterBuilder.create_dot_scaled = _unsupported("create_dot_scaled")
        return self

    def __exit__(self, *exc: object) -> None:
        from triton.runtime.interpreter import InterpreterBuilder

        for name, orig in self._saved.items():
            setattr(InterpreterBuilder, name, orig)
        self._saved.clear()

    @contextlib.contextmanager
    def attribute(self, rec: Launch, kernel: Any, args: tuple, kwargs: dict) -> Iterator[None]:
        """Count what happens inside this block for ``rec``."""
        names = list(getattr(kernel, "arg_names", []))
        named = list(zip(names, args, strict=False)) + [(k, v) for k, v in kwargs.items()]
        tensors = [(n, t) for n, t in named if isinstance(t, torch.Tensor)]
        previous = self._bucket
        self._bucket = _Bucket(rec, [n for n, _ in tensors], [t for _, t in tensors])
        try:
            yield
        finally:
            self._bucket = previous

    def _wrap(self, name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        reads, writes = _MEASURES.get(name, (None, None))
        counter = self

        @functools.wraps(orig)  # keeps marks other patches set on the method (lion_gen.runtime.interpreter)
        def wrapper(builder: Any, *args: Any, **kwargs: Any) -> Any:
            counter._inner_counted = False
            result = orig(builder, *args, **kwargs)
            if not counter._inner_counted:
                if reads is None and writes is None:
                    raise NotImplementedError(f"benchmarks.cost cannot count interpreter method {name}")
                for direction, measure in ((0, reads), (1, writes)):
                    if measure is not None:
                        counter._bucket.add(direction, *measure(*args, **kwargs))
            counter._inner_counted = True
            return result

        return wrapper

    def _wrap_dot(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        counter = self

        @functools.wraps(orig)
        def create_dot(builder: Any, a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
            sa, sb = np.shape(a.data), np.shape(b.data)
            counter._bucket.rec.flops += 2 * math.prod(sa[:-1]) * sa[-1] * sb[-1]
            return orig(builder, a, b, *args, **kwargs)

        return create_dot


def _unsupported(name: str) -> Callable[..., Any]:
    def method(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"benchmarks.cost cannot count interpreter method {name}")

    return method


# ---------------------------------------------------------------------------------------------------------------
# Compiling for sm_90a (runs in a subprocess without TRITON_INTERPRET)


def compile_launches(
    launches: list[Launch], *, ptxas_log: bool = True, timeout: float | None = None
) -> list[dict[str, Any]]:
    """Compile each launch's kernel for sm_90a as its launch builds it; one result dict per launch.

    Runs ``_compile_worker`` in a subprocess without TRITON_INTERPRET (the interpreter replaces the JIT).
    ptxas_log: compile afresh (bypass Triton's cache) so that ptxas runs and its registers, spills and
    warnings are known; False takes cached binaries and leaves those figures None.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default (fusion on), without its warning
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    request = json.dumps({"launches": [asdict(r) for r in launches], "ptxas_log": ptxas_log})
    run = subprocess.run(
        [sys.executable, "-c", "from benchmarks.cost import _compile_worker; _compile_worker()"],
        input=request,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if run.returncode != 0:
        raise RuntimeError(f"the sm_90a compile failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


class _FakeCudaDriver:
    """Enough of a CUDA driver for the JIT to compile (warmup) for sm_90a on a machine without a GPU."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 128)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target


class _CompileOnly:
    """Stands in for a JIT kernel in ``launch``: compiles (JIT warmup) instead of running, and raises
    OutOfResources like a load on an H100 would when the binary needs more shared memory than a block has."""

    def __init__(self, fn: Any, memo: dict[str, dict[str, Any]]) -> None:
        self.fn, self.memo, self.attempts = fn, memo, []
        self.__name__ = fn.__name__

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        from triton.runtime.errors import OutOfResources

        def run(*args: Any, **kwargs: Any) -> None:
            out = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stdout(out):
                kernel = self.fn.run(*args, grid=grid, warmup=True, **kwargs)
            seconds = time.perf_counter() - start
            if kernel.hash not in self.memo:
                self.memo[kernel.hash] = describe_binary(kernel, out.getvalue(), seconds)
            info = self.memo[kernel.hash]
            self.attempts.append(
                {"num_stages": kwargs.get("num_stages"), "shared": info["shared"], "hash": kernel.hash}
            )
            if info["shared"] > H100_SHARED:
                raise OutOfResources(info["shared"], H100_SHARED, "shared memory")
            self.attempts[-1]["used"] = True

        return run


_MMA = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:wgmma\.mma_async|mma)\.[\w.]+)", re.MULTILINE)
_MMA_TYPES = ("tf32", "bf16", "f16", "e4m3", "e5m2", "s8", "u8", "f64")


def parse_ptxas_log(log: str) -> dict[str, Any]:
    """Registers, spills, stack and warnings from ``ptxas -v`` output."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    # warnings, and diagnostics with a code such as "info : (C7512) ... wgmma.mma_async instructions are serialized"
    warnings = sorted(
        {line.split(":", 1)[1].strip() for line in log.splitlines() if re.search(r"warning\s*:|:\s*\(C\d+\)", line)}
    )
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill.group(1)) if spill else None,
        "spill_loads": int(spill.group(2)) if spill else None,
        "stack": int(stack.group(1)) if stack else None,
        "ptxas_warnings": warnings,
    }


def mma_instructions(ptx: str) -> dict[str, int]:
    """Static count of MMA instructions in PTX by kind and input type, e.g. {'wgmma.bf16': 12, 'mma.tf32': 4}."""
    counts: dict[str, int] = {}
    for instr in _MMA.findall(ptx):
        parts = instr.split(".")
        kind = "wgmma" if instr.startswith("wgmma") else "mma"
        ty = next((t for t in _MMA_TYPES if t in parts), "other")
        counts[f"{kind}.{ty}"] = counts.get(f"{kind}.{ty}", 0) + 1
    return counts


def describe_binary(kernel: Any, ptxas_output: str, seconds: float) -> dict[str, Any]:
    """The figures of one compiled kernel (triton CompiledKernel) and its ptxas log."""
    md = kernel.metadata
    src = kernel.src
    mma = mma_instructions(kernel.asm["ptx"])
    signature = {k: v for k, v in src.signature.items() if v != "constexpr"}
    attrs = {}
    names = list(src.signature)
    for path, values in src.attrs.items():
        if values:
            attrs[names[path[0]]] = [f"{v[0]}={v[1]}" for v in values]
    return {
        "name": md.name,
        "hash": kernel.hash,
        "num_warps": md.num_warps,
        "num_stages": md.num_stages,
        "shared": md.shared,
        **parse_ptxas_log(ptxas_output),
        "mma": mma,
        "tf32_mma": sum(n for k, n in mma.items() if k.endswith(".tf32")),
        "signature": signature,
        "attrs": attrs,
        "constants": {names[p[0]]: v for p, v in src.constants.items() if not isinstance(v, str) or len(v) < 40},
        "compile_s": round(seconds, 1),
    }


def _compile_worker() -> None:
    """Subprocess entry: read launches (JSON) on stdin, write one result per launch (JSON) on stdout."""
    import triton
    from triton.runtime.driver import driver

    if triton.knobs.runtime.interpret:
        raise RuntimeError("the sm_90a compile must run without TRITON_INTERPRET")
    request = json.load(sys.stdin)
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output (registers, spills, warnings) to stdout
    triton.knobs.compilation.always_compile = request["ptxas_log"]  # a cached binary skips ptxas and its log
    driver.set_active(_FakeCudaDriver())
    sys.path.insert(0, str(ROOT))
    launches = request["launches"]
    memo: dict[str, dict[str, Any]] = {}
    results = []
    for rec in launches:
        mod = importlib.import_module(rec["module"])
        proxy = _CompileOnly(getattr(mod, rec["kernel"]), memo)
        args = [decode_arg(a) for a in rec["args"]]
        kwargs = {k: decode_arg(v) for k, v in rec["kwargs"].items()}
        res: dict[str, Any] = {"phase": rec["phase"], "kernel": rec["kernel"], "grid": rec["grid"], "error": None}
        try:
            mod.launch(proxy, rec["grid"], *args, **kwargs)  # the module's launch: its stages and fallback
        except Exception as e:  # nothing fits (ValueError from launch), or the compiler refused the kernel
            res["error"] = f"{type(e).__name__}: {e}"[:3000]
        res["attempts"] = proxy.attempts
        # the binary the launch runs, or the last one it tried when none fits (its figures, with the error)
        chosen = next((a for a in proxy.attempts if a.get("used")), proxy.attempts[-1] if proxy.attempts else None)
        if chosen is not None:
            res.update(memo[chosen["hash"]])
        results.append(res)
    print(json.dumps(results))


# ---------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class Config:
    spec: str
    B: int
    L: int
    H: int
    D: int
    dtype: str
    chunk: int | None
    form: str


def floor_bytes(family: str, c: Config) -> tuple[int, int]:
    """(forward, forward + backward) fewest HBM bytes, as benchmarks/bench.py defines them."""
    from benchmarks.bench import hbm_bytes

    return hbm_bytes(family, c.B, c.L, c.H, c.D, DTYPES[c.dtype])


@dataclass
class Counts:
    launches: list[Launch]  # at the report's shape, counts scaled to it
    counted: list[Launch]  # as counted, at (batch, heads)
    torch_ops: list[TorchOp]  # at the report's shape (estimates)
    batch: int
    heads: int
    dtype: torch.dtype  # of the counted run
    note: str = ""


def count_traffic(c: Config, count_batch: int = 1, count_heads: int = 2) -> Counts:
    """Count at B = count_batch, H = count_heads and scale to c's B * H; grids and torch ops at c's shape."""
    cb, ch = min(count_batch, c.B), min(count_heads, c.H)
    dtype, note = DTYPES[c.dtype], ""
    torch_ops: list[TorchOp] = []
    anchor = capture(c.spec, c.B, c.L, c.H, c.D, dtype, c.chunk, c.form, torch_ops=torch_ops)
    try:
        counted = capture(c.spec, cb, c.L, ch, c.D, dtype, c.chunk, c.form, count=True, schedule_bh=c.B * c.H)
    except Exception as e:  # the interpreter's bfloat16 support is partial; float16 has the same element size
        if dtype != torch.bfloat16:
            raise
        note = f"bfloat16 failed under the interpreter ({type(e).__name__}: {str(e)[:80]}); counted in float16"
        dtype = torch.float16
        counted = capture(c.spec, cb, c.L, ch, c.D, dtype, c.chunk, c.form, count=True, schedule_bh=c.B * c.H)
    # the same launches, each with the same per-(b, h) grid (axis 0 is b * h)
    if [(r.phase, r.kernel, r.grid[1:]) for r in counted] != [(r.phase, r.kernel, r.grid[1:]) for r in anchor]:
        raise RuntimeError(
            f"the launches at B={cb}, H={ch} differ from those at B={c.B}, H={c.H}: the counts cannot be scaled; "
            "pass --count-batch/--count-heads equal to B and H"
        )
    scale = (c.B * c.H) / (cb * ch)
    for a, r in zip(anchor, counted, strict=True):
        a.read, a.written, a.flops = round(r.read * scale), round(r.written * scale), round(r.flops * scale)
        a.by_arg = {k: [round(x * scale) for x in v] for k, v in r.by_arg.items()}
    return Counts(anchor, counted, torch_ops, cb, ch, dtype, note)


def packed_overhead(
    spec: str, lengths: list[int], H: int, D: int, dtype: torch.dtype, chunk: int | None, form: str
) -> dict[str, Any]:
    """What a packed batch (cu_seqlens) moves against the same tokens unpacked, all counted under the
    interpreter: the packed call; each sequence in a call of its own (B = 1); and the padded batch a user
    would otherwise build (B = N, L = the longest). Bytes read + written by the kernels, and programs
    launched (a packed call launches one program per segment or tile and head of each sequence)."""
    runs = {"packed": [capture(spec, 1, sum(lengths), H, D, dtype, chunk, form, count=True, packed=lengths)]}
    runs["one call per sequence"] = [capture(spec, 1, n, H, D, dtype, chunk, form, count=True) for n in lengths if n]
    runs["padded batch"] = [capture(spec, len(lengths), max(lengths), H, D, dtype, chunk, form, count=True)]
    out: dict[str, Any] = {"lengths": lengths, "H": H, "D": D, "dtype": str(dtype).removeprefix("torch.")}
    for label, calls in runs.items():
        recs = [r for call in calls for r in call]
        out[label] = {
            "calls": len(calls),
            "launches": len(recs),
            "bytes": sum(r.read + r.written for r in recs),
            "programs": sum(r.programs for r in recs),
        }
    base = out["one call per sequence"]["bytes"]
    for label in runs:
        out[label]["bytes_over_unpacked"] = out[label]["bytes"] / base
    return out


def packed_table(o: dict[str, Any]) -> str:
    head = f"{'':<24}{'calls':>7}{'launches':>10}{'programs':>10}{'MB moved':>11}{'vs unpacked':>13}"
    lines = [head, "-" * len(head)]
    for label in ("packed", "one call per sequence", "padded batch"):
        r = o[label]
        lines.append(
            f"{label:<24}{r['calls']:>7}{r['launches']:>10}{r['programs']:>10}{r['bytes'] / 1e6:>11.3f}"
            f"{r['bytes_over_unpacked']:>12.3f}x"
        )
    return "\n".join(lines)


def traffic_summary(
    c: Config, family: str, launches: list[Launch], torch_ops: list[TorchOp] | tuple = ()
) -> dict[str, Any]:
    """Per-phase and total kernel traffic in X; torch ops outside the kernels apart (torch_X, with_torch_X)."""
    X = c.B * c.L * c.H * c.D * DTYPES[c.dtype].itemsize
    fwd_floor, total_floor = floor_bytes(family, c)
    phases = {}
    for phase in ("forward", "backward"):
        rs = [r for r in launches if r.phase == phase]
        ops = [o for o in torch_ops if o.phase == phase]
        phases[phase] = {
            "launches": len(rs),
            "read_X": sum(r.read for r in rs) / X,
            "written_X": sum(r.written for r in rs) / X,
            "flops": sum(r.flops for r in rs),
            "torch_ops": len(ops),
            "torch_X": sum(o.read + o.written for o in ops) / X,
        }
        phases[phase]["total_X"] = phases[phase]["read_X"] + phases[phase]["written_X"]
    total = phases["forward"]["total_X"] + phases["backward"]["total_X"]
    return {
        "X_bytes": X,
        **phases,
        "total_X": total,
        "with_torch_X": total + phases["forward"]["torch_X"] + phases["backward"]["torch_X"],
        "floor_forward_X": fwd_floor / X,
        "floor_backward_X": (total_floor - fwd_floor) / X,
        "floor_total_X": total_floor / X,
        "total_over_floor": total / (total_floor / X),
    }


def _fmt_grid(grid: list[int]) -> str:
    return "(" + ", ".join(map(str, grid)) + ("," if len(grid) == 1 else "") + ")"


def traffic_table(
    c: Config, launches: list[Launch], summary: dict[str, Any], torch_ops: list[TorchOp] | tuple = ()
) -> str:
    """The per-launch table, phase totals against the floor, torch ops apart, and traffic by kernel parameter."""
    X = summary["X_bytes"]
    head = (
        f"{'phase':<9}{'kernel':<30}{'grid':>14}{'programs':>10}{'read X':>9}{'write X':>9}{'total X':>9}{'GFLOP':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in launches:
        lines.append(
            f"{r.phase:<9}{r.kernel:<30}{_fmt_grid(r.grid):>14}{r.programs:>10}{r.read / X:>9.2f}{r.written / X:>9.2f}"
            f"{(r.read + r.written) / X:>9.2f}{r.flops / 1e9:>9.1f}"
        )
    lines.append("-" * len(head))
    for phase in ("forward", "backward"):
        p = summary[phase]
        floor = summary[f"floor_{phase}_X"]
        lines.append(
            f"{phase + ' total':<53}{p['read_X']:>9.2f}{p['written_X']:>9.2f}{p['total_X']:>9.2f}"
            f"{p['flops'] / 1e9:>9.1f}   floor {floor:.2f}X"
        )
    flops = summary["forward"]["flops"] + summary["backward"]["flops"]
    lines.append(
        f"{'total':<71}{summary['total_X']:>9.2f}{flops / 1e9:>9.1f}   floor {summary['floor_total_X']:.2f}X "
        f"({summary['total_over_floor']:.1f}x the floor)"
    )
    lines.append("")
    if not torch_ops:
        lines.append("torch ops outside the kernels (allocations and views aside): none")
    else:
        lines.append(
            f"torch ops outside the kernels (estimate: inputs read once, outputs written once), not in the totals "
            f"above: forward {summary['forward']['torch_X']:.2f}X, backward {summary['backward']['torch_X']:.2f}X; "
            f"total with them {summary['with_torch_X']:.2f}X"
        )
        for o in torch_ops:
            lines.append(f"  {o.phase:<9}{o.op:<30}{o.read / X:>9.2f}{o.written / X:>9.2f}")
    lines.append("")
    lines.append("traffic by kernel parameter, X read / X written:")
    for i, r in enumerate(launches):
        parts = [
            f"{k} {rb / X:.2f}/{wb / X:.2f}"
            for k, (rb, wb) in sorted(r.by_arg.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))
        ]
        lines.append(f"  {i + 1}. {r.kernel}: " + ", ".join(parts))
    return "\n".join(lines)


def compile_table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'kernel':<30}{'warps':>6}{'stages':>7}{'shared B':>10}{'regs':>6}{'spill st/ld B':>15}{'stack B':>9}"
        f"{'tf32 mma':>9}  {'mma (static count in PTX)':<30}{'s':>6}  ptxas warnings"
    )
    lines = [head, "-" * len(head)]
    seen = set()
    for r in results:
        key = r.get("hash") or r["kernel"]
        if key in seen:
            continue
        seen.add(key)
        if "shared" not in r:  # not compiled
            lines.append(f"{r['kernel']:<30}  {r.get('error')}")
            continue
        fallback = [a for a in r["attempts"] if not a.get("used")]
        stages = f"{r['num_stages']}" + ("*" if fallback else "")
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        mma = ", ".join(f"{k} {n}" for k, n in sorted(r["mma"].items())) or "none"
        warns = "; ".join(re.sub(r"\s+", " ", w)[:90] for w in r["ptxas_warnings"]) or "-"
        lines.append(
            f"{r['kernel']:<30}{r['num_warps']:>6}{stages:>7}{r['shared']:>10}{r['registers']!s:>6}{spill:>15}"
            f"{r['stack']!s:>9}{r['tf32_mma']:>9}  {mma:<30}{r['compile_s']:>6}  {warns}"
        )
        for a in fallback:
            lines.append(f"{'':<30}  * with {a['num_stages']} stages: {a['shared']} B of shared memory > {H100_SHARED}")
        if r.get("error"):
            lines.append(f"{'':<30}  ! does not fit: {r['error'][:300]}")
    return "\n".join(lines)


def ptxas_release(arch: int = 90) -> str:
    """The release of the ptxas Triton uses for ``arch`` (e.g. "12.8"; Triton 3.9 takes its newer
    ptxas-blackwell for sm_90 too), or "" when it cannot be asked."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        found = re.search(r"release (\d+\.\d+)", get_ptxas_version(arch))
        return found.group(1) if found else ""
    except Exception:  # no nvidia backend, or no ptxas binary
        return ""


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "generated", "lion_gen", "templates"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cost", description=__doc__.splitlines()[0])
    p.add_argument("spec", help="a generated module: generated/<spec>.py (e.g. lion_s)")
    p.add_argument("--L", type=int, nargs="+", default=[1024, 4096], help="sequence lengths (default 1024 4096)")
    p.add_argument("--B", type=int, default=None, help=f"batch (default {ANCHOR_TOKENS} // L)")
    p.add_argument("--H", type=int, default=12)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--form", default="chunk", choices=list(KERNEL_FORMS))
    p.add_argument("--count-batch", type=int, default=1, help="B of the counted (interpreted) run")
    p.add_argument("--count-heads", type=int, default=2, help="H of the counted (interpreted) run")
    p.add_argument("--small", action="store_true", help="B = 1, L = 200, H = 2: a quick run")
    p.add_argument("--no-count", action="store_true", help="skip the interpreted traffic counts")
    p.add_argument("--no-compile", action="store_true", help="skip the sm_90a compile")
    p.add_argument(
        "--packed",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        metavar="L1,L2,...",
        help="instead: count a packed batch (cu_seqlens) of these lengths against the same tokens unpacked",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.small:
        args.L, args.B, args.H = [200], 1, 2
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before generated/ is imported: the kernels are interpreted
    if not _interpreting():
        p.error("TRITON_INTERPRET is set to something other than 1: the counts need the interpreter")
    sys.path.insert(0, str(ROOT))
    mod = importlib.import_module(f"generated.{args.spec}")

    report: dict[str, Any] = {
        "kind": "counts, not timings",
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__,
        "runs": [],
    }
    dry_launches: list[Launch] = []
    print(f"lion-gen cost report: COUNTS, NOT TIMINGS (no GPU used). commit {report['commit']}, {report['date']}")
    if args.packed is not None:
        if not args.packed or min(args.packed) < 0 or max(args.packed) == 0:
            p.error("--packed needs non-negative lengths, at least one of them positive")
        if args.no_count:
            p.error(
                "--packed counts traffic under the interpreter (and compiles nothing): "
                "--no-count leaves it nothing to do"
            )
        dtype = torch.float16 if args.dtype == "bf16" else DTYPES[args.dtype]  # the interpreter's bf16 is partial
        print(f"\n== {args.spec}, form={args.form}, packed lengths {args.packed}, H={args.H} D={args.D} ({dtype})")
        report["packed"] = packed_overhead(args.spec, args.packed, args.H, args.D, dtype, args.chunk, args.form)
        print(packed_table(report["packed"]))
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"cost_{args.spec}_{args.form}_packed.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"\nJSON: {path}")
        return 0
    for L in args.L:
        c = Config(
            args.spec, args.B or max(1, ANCHOR_TOKENS // L), L, args.H, args.D, args.dtype, args.chunk, args.form
        )
        run: dict[str, Any] = {"config": asdict(c)}
        print(f"\n== {c.spec}, form={c.form}, {c.dtype}, B={c.B} L={c.L} H={c.H} D={c.D} chunk={c.chunk}")
        if args.no_count:
            launches = capture(c.spec, c.B, c.L, c.H, c.D, DTYPES[c.dtype], c.chunk, c.form)
        else:
            start = time.perf_counter()
            counts = count_traffic(c, args.count_batch, args.count_heads)
            seconds = time.perf_counter() - start
            launches, note, counted_dtype, cb, ch = (
                counts.launches,
                counts.note,
                counts.dtype,
                counts.batch,
                counts.heads,
            )
            summary = traffic_summary(c, mod.FAMILY, launches, counts.torch_ops)
            run["traffic"] = summary
            run["torch_ops"] = [asdict(o) for o in counts.torch_ops]
            run["count"] = {
                "B": cb,
                "H": ch,
                "dtype": str(counted_dtype).removeprefix("torch."),
                "scale": c.B * c.H / (cb * ch),
                "seconds": round(seconds, 1),
                "note": note,
            }
            print(
                f"X = one (B, L, H, D) {c.dtype} tensor = {summary['X_bytes'] / 1e6:.1f} MB. Counted under the Triton "
                f"interpreter at B={cb}, H={ch} ({str(counted_dtype).removeprefix('torch.')}; {seconds:.0f} s) and "
                f"scaled by B*H/{cb * ch} (counts are per (b, h)); grids are those of this shape."
            )
            if counted_dtype == torch.bfloat16:
                print("Counted in bf16: bytes and FLOPs do not depend on the values the interpreter's dots compute.")
            if note:
                print(note)
            print(traffic_table(c, launches, summary, counts.torch_ops))
        run["launches"] = [{**asdict(r), "programs": r.programs} for r in launches]
        report["runs"].append(run)
        dry_launches += launches
    if not args.no_compile:
        report["ptxas"] = ptxas_release()
        print(
            f"\n== sm_90a compile (Triton {report['triton']}, its ptxas {report['ptxas'] or '?'}; as each launch "
            "builds the kernel; figures per thread)"
        )
        start = time.perf_counter()
        results = compile_launches(dry_launches)
        report["compile"] = {"seconds": round(time.perf_counter() - start, 1), "results": results}
        print(compile_table(results))
        print(f"compile: {report['compile']['seconds']:.0f} s in all")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cost_{args.spec}_{args.form}_{args.dtype}_D{args.D}_C{args.chunk}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
