"""One optimizer at a constant lr on digits: per model, lr and seed the epochs to the target, the best test accuracy
and the final training loss (the robustness matrix stops at the target; this trains the whole budget, so late
kicks of a fitted model show in the final loss).

    .venv/bin/python bench/studies/final_loss.py --optimizer kfrog --models cnn,resnet,mlp --lrs 0.1,1 \
        [--opt-arg kl_damping=0]
"""

from __future__ import annotations

import argparse
import ast
import sys

from fop_train.cli import OPTIMIZERS, RunConfig, run_one
from fop_train.data import load_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="kfrog", choices=list(OPTIMIZERS))
    p.add_argument("--models", default="cnn,resnet,mlp")
    p.add_argument("--lrs", default="0.1,1")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--target", type=float, default=95.0)
    p.add_argument("--opt-arg", action="append", default=[], metavar="KEY=VALUE", help="a constructor argument")
    args = p.parse_args(argv)
    overrides = {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in args.opt_arg)}
    data = load_dataset("digits", None, None, None)
    print(f"{args.optimizer} {overrides or 'defaults'}, digits, batch {args.batch}, constant lr, {args.epochs} epochs: "
          "per seed epochs to the target, best accuracy, final training loss\n")
    print("| model | lr | " + " | ".join(f"seed {s}" for s in args.seeds.split(",")) + " |")
    print("| --- | --- |" + " --- |" * len(args.seeds.split(",")))
    for model in args.models.split(","):
        config = RunConfig(model=model, epochs=args.epochs, target=args.target, lr_scaling="none", warmup_epochs=0,
                           schedule="constant", stop_at_target=False)
        for lr in (float(v) for v in args.lrs.split(",")):
            cells = []
            for seed in (int(s) for s in args.seeds.split(",")):
                r = run_one(data, args.optimizer, args.batch, seed, config, lr, dict(overrides))
                h = r["history"]
                best = max(q["test_acc"] for q in h) if h else 0.0
                cells.append("diverged" if r["diverged"] else
                             f"{r['reached_epoch'] or '-'}, {best:.1f}%, {h[-1]['train_loss']:.2g}")
            print(f"| {model} | {lr:g} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
