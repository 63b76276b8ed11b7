"""The robustness matrix: every optimizer at its defaults with only `lr` set, over a grid of learning rates, batch
sizes and models. Each cell is "epochs to the target", "best accuracy" (target not reached in the budget) or
"diverged at step k" (non-finite loss, or the optimizer refused a non-finite gradient).

    python bench/studies/robustness.py --data digits --models cnn,mlp,resnet,transformer \
        --optimizers sgd,adamw,kfac,fop --lrs 0.01,0.1,1.0 --batch-sizes 32,256,full --epochs 30 \
        --out out/robustness

The learning rate is constant (no warm-up, no schedule, no scaling by batch): the harshest setting for stability, and
what "only lr set" means. Each optimizer is built as `fop-train` builds it (fop_train.cli.OPTIMIZERS): the constructor's
defaults for K-FAC, FOP, AdaFisher and AdamW; momentum 0.9 for SGD and FROG. Writes `robustness.md`,
`robustness.json` and `robustness.png` (one heat map per model) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from fop_train.cli import OPTIMIZERS, RunConfig, run_one
from fop_train.data import DATASETS, load_dataset
from fop_train.models import MODELS


def cell_text(record: dict) -> str:
    if record["diverged"]:
        return f"div@{record['diverged_step']}"
    if record["reached_epoch"] is not None:
        return str(record["reached_epoch"])
    best = max((p["test_acc"] for p in record["history"]), default=0.0)
    return f"({best:.0f}%)"


def cell_value(record: dict, epochs: int) -> float:
    """For the heat map: epochs to target; budget + 1 when not reached; budget + 3 when diverged."""
    if record["diverged"]:
        return epochs + 3
    return record["reached_epoch"] if record["reached_epoch"] is not None else epochs + 1


def markdown(records: list[dict], models: list[str], optimizers: list[str], lrs: list[float], batches: list[str],
             target: float, epochs: int) -> str:
    lines = [f"Cells: epochs to {target:g}% test accuracy (median over seeds), `(x%)`: best accuracy when the target "
             f"was not reached in {epochs} epochs, `div@k`: diverged at step k (any seed)."]
    for model in models:
        lines += ["", f"### {model}", "", "| optimizer | lr | " + " | ".join(f"batch {b}" for b in batches) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in batches) + " |"]
        for opt in optimizers:
            for lr in lrs:
                cells = []
                for b in batches:
                    group = [r for r in records if r["model"] == model and r["optimizer"] == opt and r["lr"] == lr
                             and r["batch_label"] == b]
                    div = [r for r in group if r["diverged"]]
                    if div:
                        cells.append(cell_text(div[0]))
                    elif all(r["reached_epoch"] is not None for r in group):
                        cells.append(str(sorted(r["reached_epoch"] for r in group)[len(group) // 2]))
                    else:
                        cells.append(" / ".join(cell_text(r) for r in group))
                lines.append(f"| {opt} | {lr:g} | " + " | ".join(cells) + " |")
    summary = {opt: (sum(1 for r in records if r["optimizer"] == opt and r["reached_epoch"] is not None),
                     sum(1 for r in records if r["optimizer"] == opt and r["diverged"]),
                     sum(1 for r in records if r["optimizer"] == opt)) for opt in optimizers}
    lines += ["", "| optimizer | runs reaching the target | runs diverged | runs |", "| --- | --- | --- | --- |"]
    lines += [f"| {opt} | {reached} | {div} | {n} |" for opt, (reached, div, n) in summary.items()]
    return "\n".join(lines) + "\n"


def heat_map(path: str, records: list[dict], models: list[str], optimizers: list[str], lrs: list[float],
             batches: list[str], epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 0.45 * len(optimizers) * len(lrs) + 1.5),
                             squeeze=False)
    rows = [(o, lr) for o in optimizers for lr in lrs]
    for ax, model in zip(axes[0], models):
        grid = torch.full((len(rows), len(batches)), float("nan"))
        labels = [["" for _ in batches] for _ in rows]
        for i, (opt, lr) in enumerate(rows):
            for j, b in enumerate(batches):
                group = [r for r in records if r["model"] == model and r["optimizer"] == opt and r["lr"] == lr
                         and r["batch_label"] == b]
                if group:
                    grid[i, j] = max(cell_value(r, epochs) for r in group)
                    labels[i][j] = cell_text(max(group, key=lambda r: cell_value(r, epochs)))
        ax.imshow(grid.numpy(), cmap="RdYlGn_r", vmin=1, vmax=epochs + 3, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(batches)):
                ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(batches)), [f"b={b}" for b in batches])
        ax.set_yticks(range(len(rows)), [f"{o} lr={lr:g}" for o, lr in rows], fontsize=7)
        ax.set_title(model)
    fig.suptitle("epochs to target (worst seed); red: not reached or diverged")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", choices=list(DATASETS))
    p.add_argument("--data-dir", default=None, help="the MNIST IDX files (for --data mnist)")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--models", default="cnn,mlp,resnet,transformer")
    p.add_argument("--optimizers", default="sgd,adamw,kfac,fop")
    p.add_argument("--lrs", default="0.01,0.1,1.0")
    p.add_argument("--batch-sizes", default="32,256,full")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--target", type=float, default=95.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="out/robustness")
    p.add_argument("--merge", nargs="+", default=None, metavar="ROBUSTNESS_JSON",
                   help="run nothing: merge the records of these robustness.json files (runs split over processes) "
                        "and write the table, JSON and heat map into --out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models.split(",")
    optimizers = args.optimizers.split(",")
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; valid: {', '.join(MODELS)}")
    for o in optimizers:
        if o not in OPTIMIZERS:
            p.error(f"unknown optimizer {o!r}; valid: {', '.join(OPTIMIZERS)}")
    lrs = [float(v) for v in args.lrs.split(",")]
    batches = args.batch_sizes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        records = []
        for path in args.merge:
            with open(path) as f:
                records += json.load(f)["records"]
        return write_outputs(args, argv, args.data, records, models, optimizers, lrs, batches)
    data = load_dataset(args.data, args.data_dir, None, args.train_limit)
    n_train = len(data.train_y)
    records = []
    start = time.time()
    for model in models:
        config = RunConfig(model=model, epochs=args.epochs, target=args.target, lr_scaling="none", warmup_epochs=0,
                           schedule="constant")
        for opt in optimizers:
            for lr in lrs:
                for b in batches:
                    batch = n_train if b == "full" else int(b)
                    for seed in seeds:
                        r = run_one(data, opt, batch, seed, config, lr)
                        r.update(model=model, batch_label=b)
                        records.append(r)
                        print(f"[{time.time() - start:7.0f}s] {model} {opt} lr={lr:g} b={b} seed={seed}: "
                              f"{cell_text(r)}", file=sys.stderr, flush=True)
    return write_outputs(args, argv, data.name, records, models, optimizers, lrs, batches)


def write_outputs(args, argv, data_name: str, records: list[dict], models, optimizers, lrs, batches) -> int:
    md = markdown(records, models, optimizers, lrs, batches, args.target, args.epochs)
    header = (f"# Robustness matrix: {data_name}, only lr set, constant lr\n\nCommand: "
              f"`python bench/studies/robustness.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n")
    with open(os.path.join(args.out, "robustness.md"), "w") as f:
        f.write(header + md)
    with open(os.path.join(args.out, "robustness.json"), "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "records": records}, f, indent=1)
    heat_map(os.path.join(args.out, "robustness.png"), records, models, optimizers, lrs, batches, args.epochs)
    print(header + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
