"""The lion-gen demo: a LION-S ViT against a softmax ViT of the same size on scikit-learn's 8x8 digits.

    python examples/demo.py [--quick] [--modules DIR] [--out PNG] [--epochs N]

First the generated ops (form "auto": the Triton kernels on a GPU, the torch form elsewhere) are checked
against their float64 reference form. Then two ViTs of the same size (patches 2x2 -> 16 tokens, mean pooling)
are trained on the digits data set that scikit-learn ships (1797 images, no download; a stratified split of
1437 training and 360 test images): one with LION-S attention (the paper's natural order for vision: a row
snake and a column snake of the patch grid, each with its own selective gates) and one with softmax attention
(torch SDPA). Prints both test accuracies and writes a PNG of the learning curves.

--quick: one epoch on a subset (what CI runs: it checks that the demo runs, not the accuracies).
--modules DIR: import the generated modules from DIR/generated instead of the repository's generated/.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
_parser = argparse.ArgumentParser(description="LION-S ViT vs softmax ViT on the 8x8 digits")
_parser.add_argument("--quick", action="store_true", help="one epoch on a subset (CI)")
_parser.add_argument("--modules", metavar="DIR", help="import the generated modules from DIR/generated")
_parser.add_argument("--out", default=str(ROOT / "docs" / "demo_digits.png"), help="the learning curves (PNG)")
_parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 25; --quick: 1)")
_parser.add_argument("--seed", type=int, default=0)
_parser.add_argument(
    "--threads",
    type=int,
    default=1,
    help="CPU threads (default 1: the models are small, and a second thread mostly waits on a busy machine)",
)


def load_digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits as (N, 1, 8, 8) standardized float images, and labels; stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=data.target)
    mean, std = x[tr].mean(), x[tr].std()  # standardized with the training set's statistics
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (zero padding)."""
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=x.min().item())  # the background's value
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[..., dy : dy + 8, dx : dx + 8]


def progress(prefix: str, done: int, total: int, extra: str) -> None:
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    print(f"\r  {prefix} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {extra}", end=end, flush=True)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    model.train()
    return (pred == y).float().mean().item()


def train(name: str, model: torch.nn.Module, data, epochs: int, seed: int) -> dict:
    xtr, ytr, xte, yte = data
    gen = torch.Generator().manual_seed(seed)
    batch = 16
    steps_per_epoch = math.ceil(len(xtr) / batch)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    warmup = steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    hist = {"loss": [], "test_acc": [], "seconds": 0.0}
    start = time.time()
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        run = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * batch : (s + 1) * batch]
            out = model(augment(xtr[idx], gen))
            loss = torch.nn.functional.cross_entropy(out, ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            run += loss.item()
        hist["loss"].append(run / steps_per_epoch)
        hist["test_acc"].append(accuracy(model, xte, yte))
        extra = f"loss {hist['loss'][-1]:.3f} test acc {hist['test_acc'][-1]:.3f} ({time.time() - start:.0f} s)"
        progress(f"{name:8s} epoch", epoch + 1, epochs, extra)
    hist["seconds"] = time.time() - start
    return hist


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, h in results.items():
        ep = range(1, len(h["loss"]) + 1)
        a.plot(ep, h["loss"], label=name)
        b.plot(ep, [100 * t for t in h["test_acc"]], label=f"{name} ({100 * h['test_acc'][-1]:.1f}%)")
    a.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title="training loss")
    b.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (360 images)", ylim=(50, 100))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("ViT on the 8x8 digits (scikit-learn), CPU: LION-S vs softmax attention")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> dict:
    args = _parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.modules:
        sys.path.insert(0, str(Path(args.modules).resolve()))  # ahead of the repository's generated/
    import generated.lion_d as lion_d_mod
    import generated.lion_s as lion_s_mod
    from lion_gen.nn import VisionTransformer

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"lion-gen demo on {device}{' (quick)' if args.quick else ''}, torch {torch.__version__}")
    torch.manual_seed(args.seed)

    # 1. The ops (form "auto") against the float64 reference form.
    B, L, H, D = 2, 100, 2, 32
    q, k, v = (torch.randn(B, L, H, D, device=device) for _ in range(3))
    for mod, gate in ((lion_s_mod, torch.randn(B, L, H, device=device)), (lion_d_mod, torch.randn(H, device=device))):
        fn = getattr(mod, mod.SPEC["name"])
        y = fn(q, k, v, gate, chunk_size=16)
        ref = fn(q.double(), k.double(), v.double(), gate.double(), form="reference")
        err = ((y.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
        form = "chunk" if device == "cuda" else "torch"
        print(f"  {mod.SPEC['name']}: form {form} vs reference (float64), relative RMS error {err:.1e} (L={L})")

    # 2. The two ViTs.
    data = load_digits_split(args.seed)
    if args.quick:
        data = (data[0][:256], data[1][:256], data[2], data[3])
    epochs = args.epochs or (1 if args.quick else 25)
    size = dict(image_size=8, patch_size=2, in_chans=1, num_classes=10, dim=64, depth=4, num_heads=4, pool="mean")
    size.update(init="torch", pos_std=1.0)  # few updates on a small data set: see lion_gen.nn.VisionTransformer
    results = {}
    for name, op, extra in (("LION-S", lion_s_mod, dict(order="snake")), ("softmax", "softmax", {})):
        torch.manual_seed(args.seed)
        model = VisionTransformer(op, **size, **extra).to(device)
        params = sum(p.numel() for p in model.parameters())
        print(f"  {name}: {params} parameters, {epochs} epochs of {len(data[0])} images")
        dev_data = tuple(t.to(device) for t in data)
        results[name] = train(name, model, dev_data, epochs, args.seed)
    for name, h in results.items():
        print(f"  {name:8s} test accuracy {100 * h['test_acc'][-1]:.1f}% ({h['seconds']:.0f} s of training)")
    plot(results, args.out)
    print(f"  learning curves: {args.out}")
    print("done")
    return results


if __name__ == "__main__":
    main()
