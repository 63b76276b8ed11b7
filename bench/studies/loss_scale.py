"""The scale of the loss and of regression targets against the defaults (docs/optimizers.md, "The scale of the loss
and of regression targets"): the empirical Fisher's G grows with the square of the output gradients and the gradient
with them once, so K-FAC's and FOP's step shrinks as they grow.

    python bench/studies/loss_scale.py --out out/loss-scale

sklearn's digits (every sample, inputs in [0, 1]), a 64-64 ReLU MLP, batch 128, seed 0, every optimizer built with
the model alone (AdamW lr 1e-3). Classification rows: the cross entropy multiplied by k, train accuracy after
--cls-epochs epochs. Regression rows: MSE on the digit's value, standardized or times k, train MSE / the targets'
variance after --reg-epochs epochs (about 3.45 is the zero predictor at k >= 10). Writes loss_scale.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings

import fop
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

OPTIMIZERS = {"adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), "kfac": fop.KFAC, "fop": fop.FOP,
              "frog": fop.FROG}
CLASSIFICATION = {"cross-entropy x 0.01": 0.01, "cross-entropy x 1": 1.0, "cross-entropy x 100": 100.0}
REGRESSION = {"MSE, standardized targets": None, "MSE, targets 0-9": 1.0, "MSE, targets 0-90": 10.0,
              "MSE, targets 0-900": 100.0}


def run(make, x: torch.Tensor, target: torch.Tensor, loss_fn, epochs: int, batch: int) -> nn.Module | None:
    """Train a fresh MLP (seed 0) for `epochs`; None when the loss or the step went non-finite."""
    torch.manual_seed(0)
    out = 10 if target.dtype == torch.long else 1
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = make(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - batch + 1, batch):
            b = order[i:i + batch]
            opt.zero_grad()
            loss = loss_fn(model(x[b]), target[b])
            loss.backward()
            if not math.isfinite(loss.item()):
                return None
            try:
                opt.step()
            except FloatingPointError:
                return None
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cls-epochs", type=int, default=4)
    p.add_argument("--reg-epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default="out/loss-scale")
    args = p.parse_args()
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    labels = torch.tensor(digits.target)
    value = labels.float()[:, None]
    rows = {}
    for name, k in CLASSIFICATION.items():
        rows[name] = {}
        for opt_name, make in OPTIMIZERS.items():
            model = run(make, x, labels, lambda o, t, k=k: k * F.cross_entropy(o, t), args.cls_epochs, args.batch)
            with torch.no_grad():
                rows[name][opt_name] = None if model is None else float((model(x).argmax(1) == labels).float().mean())
            print(name, opt_name, rows[name][opt_name], flush=True)
    for name, k in REGRESSION.items():
        target = (value - value.mean()) / value.std() if k is None else value * k
        rows[name] = {}
        for opt_name, make in OPTIMIZERS.items():
            model = run(make, x, target, F.mse_loss, args.reg_epochs, args.batch)
            with torch.no_grad():
                rows[name][opt_name] = None if model is None else float(F.mse_loss(model(x), target) / target.var())
            print(name, opt_name, rows[name][opt_name], flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__, **vars(args)}
    with open(os.path.join(args.out, "loss_scale.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"Classification: train accuracy after {args.cls_epochs} epochs; regression: train MSE / target variance "
             f"after {args.reg_epochs} epochs. {meta['date']}, torch {meta['torch']}.", "",
             "| task | " + " | ".join(OPTIMIZERS) + " |", "| --- |" + " --- |" * len(OPTIMIZERS)]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join("non-finite" if v is None else f"{v:.3f}" for v in cells.values())
                     + " |")
    with open(os.path.join(args.out, "loss_scale.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
