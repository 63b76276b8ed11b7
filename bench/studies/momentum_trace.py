"""Per-step trace of K-FAC or FOP on MNIST at several momenta: loss, largest |logit| and weight norm, side by side.

    python bench/studies/momentum_trace.py --data-dir PATH/TO/mnist --momenta 0.9,0.5,0 --steps 60 --threads 1

The CNN of fop-train (`--width 8`), batch 1024 drawn in order from one shuffle of the 60,000 training images, only
`lr` and `momentum` set (every other argument at its default, `--opt-arg KEY=VALUE` adds one), the lr warmed up
linearly over `--warmup` steps (fop-train's first epoch at batch 1024) and then constant. Prints every `--every`-th
step and the last: what the default momentum rests on (docs/optimizers.md, "Defaults").
"""

from __future__ import annotations

import argparse
import ast
import math

import fop
import torch
import torch.nn.functional as F
from fop_train.data import load_mnist
from fop_train.models import build_model


def trace(data, optimizer: str, lr: float, momentum: float, steps: int, warmup: int, batch: int,
          extra: dict) -> list[tuple[int, float, float, float]]:
    """(step, loss, max |logit| of the step's forward, ||parameters|| after its update) per step; stops at a
    non-finite loss."""
    torch.manual_seed(0)
    model = build_model("cnn", tuple(data.train_x.shape[1:]), data.num_classes, width=8)
    opt = getattr(fop, optimizer)(model, lr=lr, momentum=momentum, **extra)
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))
    rows = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        start = (step * batch) % (len(order) - batch)
        idx = order[start:start + batch]
        logits = model(data.train_x[idx])
        loss = F.cross_entropy(logits, data.train_y[idx])
        opt.zero_grad()
        if opt.fisher == "mc":
            opt.fisher_backward(logits)
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            rows.append((step, value, float(logits.detach().abs().max()), math.nan))
            break
        opt.step()
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.detach() for p in model.parameters()])))
        rows.append((step, value, float(logits.detach().abs().max()), float(norm)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="directory with the MNIST IDX files")
    parser.add_argument("--optimizer", default="KFAC", choices=["KFAC", "FOP"])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momenta", default="0.9,0.5,0")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=59)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--opt-arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {}
    for item in args.opt_arg:
        key, _, value = item.partition("=")
        extra[key] = ast.literal_eval(value)
    data = load_mnist(args.data_dir)
    momenta = [float(m) for m in args.momenta.split(",")]
    runs = {m: trace(data, args.optimizer, args.lr, m, args.steps, args.warmup, args.batch, extra) for m in momenta}
    print(f"{args.optimizer}, lr {args.lr}, warm-up {args.warmup} steps, batch {args.batch}, {extra or 'defaults'}")
    print("| step | " + " | ".join(f"momentum {m}: loss, max abs logit, norm" for m in momenta) + " |")
    print("| --- |" + " --- |" * len(momenta))
    for step in range(args.steps):
        if step % args.every and step != args.steps - 1:
            continue
        cells = []
        for m in momenta:
            rows = runs[m]
            cells.append("-" if step >= len(rows) else "{1:.3g}, {2:.3g}, {3:.3g}".format(*rows[step]))
        print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
