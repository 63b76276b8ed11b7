"""FOP against K-FAC, part by part: which of FOP's choices helps or costs on a task, at the same settings and seeds.

    python bench/studies/ablation.py --data digits --model cnn --batch-sizes 1024,full --seeds 0,1,2 --epochs 40 \
        --out out/ablation

Every variant is an optimizer (`kfac` or `fop`) with constructor overrides and, for the official recipe, the
training loss's label smoothing; everything else is fop-train's default run (linear warm-up over one epoch, cosine
schedule, base lr at batch 256 scaled linearly; `--lr` sets one base lr for every variant). Cells: epochs to the
target (mean over the seeds that reached it, "k/n" when only k of n did) and the best test accuracy (mean).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from fop_train.cli import OPTIMIZERS, RunConfig, run_one, scaled_lr
from fop_train.data import load_dataset

OFFICIAL = {"damping_mode": "factored", "inverse_method": "cholesky", "fisher": "mc", "max_update_norm": 10.0}

# name: (optimizer, constructor overrides, label smoothing)
VARIANTS = {
    "kfac (defaults)": ("kfac", {}, 0.0),
    "kfac former defaults (eigen damping, no KL clip)": ("kfac", {"damping_mode": "eigen", "kl_clip": None}, 0.0),
    "fop (defaults: adaptive beta, eta=1)": ("fop", {}, 0.0),
    "fop beta=0 (K-FAC)": ("fop", {"beta": 0.0}, 0.0),
    "fop adaptive eta, normalized": ("fop", {"eta": "adaptive"}, 0.0),
    "fop adaptive eta, paper form (eta_norm=False)": ("fop", {"eta": "adaptive", "eta_norm": False}, 0.0),
    "fop beta=0, adaptive paper eta (2x K-FAC before the clip)": ("fop", {"beta": 0.0, "eta": "adaptive",
                                                                         "eta_norm": False}, 0.0),
    "fop beta=0.1 fixed": ("fop", {"beta": 0.1}, 0.0),
    "kfac eigen damping": ("kfac", {"damping_mode": "eigen"}, 0.0),
    "fop eigen damping": ("fop", {"damping_mode": "eigen"}, 0.0),
    "kfac mc Fisher": ("kfac", {"fisher": "mc"}, 0.0),
    "fop mc Fisher": ("fop", {"fisher": "mc"}, 0.0),
    "fop split=backward (two half-batch passes)": ("fop", {"split": "backward"}, 0.0),
    "kfac official recipe": ("kfac", OFFICIAL, 0.1),
    "fop official recipe (split=backward, paper eta)": ("fop", {**OFFICIAL, "split": "backward", "eta": "adaptive",
                                                                "eta_norm": False}, 0.1),
    "fop official recipe with eta=1": ("fop", {**OFFICIAL, "split": "backward"}, 0.1),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--model", default="cnn")
    p.add_argument("--batch-sizes", default="1024,full")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--target", type=float, default=95.0)
    p.add_argument("--lr", type=float, default=None,
                   help="base lr at batch 256 for every variant (default: fop-train's)")
    p.add_argument("--variants", default=None, help="comma-separated indices into the variant list (default: all)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="out/ablation")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(VARIANTS)
    if args.variants:
        names = [names[int(i)] for i in args.variants.split(",")]
    data = load_dataset(args.data, args.data_dir, None, args.train_limit)
    n_train = len(data.train_y)
    batches = [n_train if b == "full" else int(b) for b in args.batch_sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    records = []
    start = time.time()
    for name in names:
        opt, overrides, smoothing = VARIANTS[name]
        config = RunConfig(model=args.model, epochs=args.epochs, target=args.target, label_smoothing=smoothing)
        for batch in batches:
            lr = scaled_lr(args.lr if args.lr is not None else OPTIMIZERS[opt].base_lr, batch, config.base_batch,
                           config.lr_scaling)
            for seed in seeds:
                r = run_one(data, opt, batch, seed, config, lr, overrides)
                r["variant"] = name
                records.append(r)
                print(f"[{time.time() - start:6.0f}s] {name} b={batch} seed={seed}: reached {r['reached_epoch']} "
                      f"diverged {r['diverged']}", file=sys.stderr, flush=True)
    lines = [f"# Ablation: {data.name}, {args.model}, target {args.target:g}%, seeds {args.seeds}", "",
             f"Command: `python bench/studies/ablation.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             "| variant | " + " | ".join(f"batch {b}: epochs / best %" for b in batches) + " |",
             "| --- | " + " | ".join("---" for _ in batches) + " |"]
    for name in names:
        cells = []
        for batch in batches:
            group = [r for r in records if r["variant"] == name and r["batch_size"] == batch]
            reached = [r["reached_epoch"] for r in group if r["reached_epoch"] is not None]
            best = statistics.fmean(max((q["test_acc"] for q in r["history"]), default=0.0) for r in group)
            epochs = f"{statistics.fmean(reached):.1f}" if reached else "-"
            if len(reached) < len(group):
                epochs += f" ({len(reached)}/{len(group)})"
            if any(r["diverged"] for r in group):
                epochs += " div"
            cells.append(f"{epochs} / {best:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "records": records}, f, indent=1)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
