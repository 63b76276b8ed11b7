"""product_dtype=torch.bfloat16 against the default (the factors' float32): how far one step moves from the float32
step, and what a training run reaches with each, side by side.

1. Step error: timm's ResNet-18 layout at `--width` (bench/studies/wide_models.py), K-FAC and FOP at their defaults,
   `--warmup` steps on random images, then the state loaded into a twin with product_dtype=bfloat16 and one more
   step each on the same batch: ||dW_bf16 - dW_fp32|| / ||dW_fp32|| over all parameters, and per layer the largest.
2. Training: fop_train's models on `--data` (digits by default), K-FAC and FOP with only lr set (constant lr, as the
   robustness matrix), each seed with and without bfloat16 products: epochs to the target and the best accuracy.

    .venv/bin/python bench/studies/product_dtype.py --width 64 --batch 64 --models cnn,resnet,transformer
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from fop import FOP, KFAC
from fop_train.cli import RunConfig, run_one
from fop_train.data import DATASETS, load_dataset
from wide_models import WIDE_MODELS


def step_error(opt_cls, width: int, batch: int, warmup: int) -> tuple[float, float, str]:
    """(relative error of the whole step, the largest of one layer, that layer's name) of bf16 products."""
    torch.manual_seed(0)
    model = WIDE_MODELS["resnet18-timm"](width)
    opt = opt_cls(model, lr=0.1)
    g = torch.Generator().manual_seed(0)

    def batch_of():
        return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def step(m, o, x, y):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()

    for _ in range(warmup):
        step(model, opt, *batch_of())
    twin = copy.deepcopy(model)
    low = opt_cls(twin, lr=0.1, product_dtype=torch.bfloat16)
    low.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch_of()
    step(model, opt, x, y)
    step(twin, low, x, y)
    ref = {n: (p.detach() - before[n]) for n, p in model.named_parameters()}
    got = {n: (p.detach() - before[n]) for n, p in twin.named_parameters()}
    total = float(torch.sqrt(sum(((got[n] - ref[n]) ** 2).sum() for n in ref) / sum((ref[n] ** 2).sum() for n in ref)))
    per = {n: float((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)) for n in ref if ref[n].dim() > 1}
    worst = max(per, key=per.get)
    return total, per[worst], worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=11, help="steps before the compared one (past the first refresh)")
    p.add_argument("--data", default="digits", choices=list(DATASETS))
    p.add_argument("--models", default="cnn,resnet,transformer", help="fop_train models ('' skips training)")
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--target", type=float, default=95.0)
    p.add_argument("--seeds", default="0,1")
    args = p.parse_args(argv)
    lines = [f"step error: resnet18-timm width {args.width}, batch {args.batch}, after {args.warmup} steps",
             "", "| optimizer | step rel. error | worst layer | its rel. error |", "| --- | --- | --- | --- |"]
    for name, cls in (("kfac", KFAC), ("fop", FOP)):
        total, worst, layer = step_error(cls, args.width, args.batch, args.warmup)
        lines.append(f"| {name} | {total:.2e} | {layer} | {worst:.2e} |")
    print("\n".join(lines), flush=True)
    models = [m for m in args.models.split(",") if m]
    if not models:
        return 0
    data = load_dataset(args.data, None, None, None)
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = ["", f"training: {args.data}, batch {args.train_batch}, lr {args.lr:g} constant, {args.epochs} epochs, "
             f"target {args.target:g}%, seeds {args.seeds}: epochs to the target (best accuracy)", "",
             "| model | optimizer | float32 products | bfloat16 products |", "| --- | --- | --- | --- |"]
    for model in models:
        config = RunConfig(model=model, epochs=args.epochs, target=args.target, lr_scaling="none", warmup_epochs=0,
                           schedule="constant", stop_at_target=False)
        for opt in ("kfac", "fop"):
            cells = []
            for overrides in ({}, {"product_dtype": torch.bfloat16}):
                runs = [run_one(data, opt, args.train_batch, s, config, args.lr, dict(overrides)) for s in seeds]
                cells.append(" / ".join(
                    f"{'div' if r['diverged'] else r['reached_epoch'] or '-'} "
                    f"({max((h['test_acc'] for h in r['history']), default=0.0):.1f}%)" for r in runs))
            lines.append(f"| {model} | {opt} | {cells[0]} | {cells[1]} |")
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
