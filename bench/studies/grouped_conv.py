"""Depthwise convs under K-FAC and FOP: preconditioned (one Kronecker block per group) against left to the grafted
update (as before grouped convs were supported), on a small ConvNeXt-like model, side by side in one run.

    PYTHONPATH=.:python .venv/bin/python bench/studies/grouped_conv.py --steps 30 --seeds 0,1,2 --batch 256 --threads 1

The model is bench/studies/wide_models.py's ConvNeXt-atto layout at reduced widths (`--dims`, `--depths`; block:
depthwise 7x7 conv, LayerNorm, Linear 4x, GELU, Linear, layer scale `--layer-scale`, residual), on 32x32 inputs.
K-FAC and FOP at their defaults with `lr` set overfit one fixed batch (random images and labels, `--batch`);
"before" leaves the depthwise convs out (`exclude=`: they take the grafted update, which is what an unsupported
layer got). Prints the coverage of both, the loss after 5, 10 and the last step per seed and their means over the
seeds (the step-0 loss is the same for both), and the wall time of each configuration (a ratio only: the machine
may be shared). The table in docs/layers.md comes from this script.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fop import FOP, KFAC  # noqa: E402
from wide_models import ConvNeXtAtto  # noqa: E402


def depthwise(model: nn.Module) -> list[str]:
    """Names of the depthwise convs (groups == in_channels > 1)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]


def run(cls, seed: int, args, dims, depths, before: bool) -> tuple[list[float], float, float]:
    """(losses after 0, 1, ..., steps updates, preconditioned share of the parameters, wall seconds of the steps)."""
    torch.manual_seed(seed)
    model = ConvNeXtAtto(dims=dims, depths=depths)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gamma"):
                m.gamma.fill_(args.layer_scale)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    opt = cls(model, lr=args.lr, exclude=depthwise(model) if before else None)
    share = opt.coverage()["total"]["share"]
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        losses.append(F.cross_entropy(model(x), y).item())
    return losses, share, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dims", default="16,32,64,128")
    ap.add_argument("--depths", default="1,1,2,1")
    ap.add_argument("--layer-scale", type=float, default=1e-6, help="initial layer scale (ConvNeXt: 1e-6)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: small models, no oversubscription)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    dims, depths = tuple(int(d) for d in args.dims.split(",")), tuple(int(d) for d in args.depths.split(","))
    warnings.filterwarnings("ignore")
    logging.getLogger("fop").setLevel(logging.ERROR)
    sample = ConvNeXtAtto(dims=dims, depths=depths)
    dw = [p.numel() for n in depthwise(sample) for p in sample.get_submodule(n).parameters()]
    print(f"ConvNeXt-like dims {dims} depths {depths}: {sum(p.numel() for p in sample.parameters())} parameters, "
          f"{len(depthwise(sample))} depthwise convs holding {sum(dw)}")
    marks = [k for k in (5, 10, args.steps) if k <= args.steps]  # the losses after k updates
    head = " / ".join(str(k) for k in marks)
    print(f"| optimizer | depthwise convs | coverage | loss after {head} steps, per seed | mean | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for cls in (KFAC, FOP):
        for before in (True, False):
            results = [run(cls, s, args, dims, depths, before) for s in seeds]
            per_seed = "; ".join(" / ".join(f"{r[0][k]:.3g}" for k in marks) for r in results)
            means = " / ".join(f"{statistics.mean(r[0][k] for r in results):.3g}" for k in marks)
            print(f"| {cls.__name__} | {'grafted (before)' if before else 'preconditioned'} | {results[0][1]:.3f} | "
                  f"{per_seed} | {means} | {sum(r[2] for r in results):.1f} |")

if __name__ == "__main__":
    main()
