"""Tables and plots of time-to-accuracy studies, like the FOP paper's Table 1 and Figures 2-4.

A study is a list of run records (dicts), one per (optimizer, batch size, seed), each with a `history`
of per-epoch points `{"epoch", "seconds", "test_acc", "train_loss"}` (`seconds`: cumulative training
wall-clock, evaluation excluded) and `reached_epoch` / `reached_seconds` (None when the target was never
reached). `summarize` reduces the seeds to mean and standard deviation; `markdown_table` renders
"epochs / seconds" per optimizer x batch size with "-" where no seed reached the target; `plot_curves`
draws test accuracy against wall-clock time and against epochs, one line per optimizer and seed.
"""

from __future__ import annotations

import json
import math
import statistics

import torch

__all__ = ["PLOT_DPI", "PLOT_PANEL_INCHES", "markdown_table", "plot_curves", "summarize", "write_json"]

PLOT_DPI = 100
PLOT_PANEL_INCHES = (4.0, 3.0)  # width, height of one panel; the PNG is (cols * 400) x (2 * 300) pixels


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _ordered(values) -> list:
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (optimizer, batch size): seeds run and reached, mean/std of epochs and seconds to the
    target over the seeds that reached it, mean/std of the best and final test accuracy over all seeds."""
    rows = []
    for opt in _ordered(r["optimizer"] for r in runs):
        for batch in _ordered(r["batch_size"] for r in runs if r["optimizer"] == opt):
            group = [r for r in runs if r["optimizer"] == opt and r["batch_size"] == batch]
            reached = [r for r in group if r["reached_epoch"] is not None]
            row = {
                "optimizer": opt,
                "batch_size": batch,
                "seeds": len(group),
                "reached": len(reached),
                "diverged": sum(1 for r in group if r.get("diverged")),
                "epochs_mean": None,
                "epochs_std": None,
                "seconds_mean": None,
                "seconds_std": None,
            }
            if reached:
                row["epochs_mean"], row["epochs_std"] = _mean_std([r["reached_epoch"] for r in reached])
                row["seconds_mean"], row["seconds_std"] = _mean_std([r["reached_seconds"] for r in reached])
            best = [max((p["test_acc"] for p in r["history"]), default=0.0) for r in group]
            final = [r["history"][-1]["test_acc"] if r["history"] else 0.0 for r in group]
            row["best_acc_mean"], row["best_acc_std"] = _mean_std(best)
            row["final_acc_mean"], row["final_acc_std"] = _mean_std(final)
            rows.append(row)
    return rows


def _cell(row: dict | None) -> str:
    if row is None:
        return "n/a"
    if row["reached"] == 0:
        return "-"
    cell = f"{row['epochs_mean']:.1f}±{row['epochs_std']:.1f} / {row['seconds_mean']:.1f}±{row['seconds_std']:.1f}"
    if row["reached"] < row["seeds"]:
        cell += f" ({row['reached']}/{row['seeds']})"
    return cell


def markdown_table(rows: list[dict], target: float) -> str:
    """Two markdown tables: epochs / seconds to `target` % (mean±std over the seeds that reached it;
    "(k/n)" when only k of n seeds did; "-" when none did), and best test accuracy (mean±std, all seeds)."""
    opts = _ordered(r["optimizer"] for r in rows)
    batches = _ordered(r["batch_size"] for r in rows)
    index = {(r["optimizer"], r["batch_size"]): r for r in rows}
    header = "| optimizer | " + " | ".join(f"batch {b}" for b in batches) + " |"
    rule = "| --- |" + " --- |" * len(batches)
    lines = [f"Epochs / seconds to {target:g}% test accuracy (mean±std over seeds that reached it):", "", header, rule]
    for opt in opts:
        lines.append(f"| {opt} | " + " | ".join(_cell(index.get((opt, b))) for b in batches) + " |")
    lines += ["", "Best test accuracy % (mean±std over all seeds; diverged runs counted at their best):", "", header,
              rule]
    for opt in opts:
        cells = []
        for b in batches:
            r = index.get((opt, b))
            if r is None:
                cells.append("n/a")
                continue
            cell = f"{r['best_acc_mean']:.2f}±{r['best_acc_std']:.2f}"
            if r["diverged"]:
                cell += f" ({r['diverged']} diverged)"
            cells.append(cell)
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: str, meta: dict, runs: list[dict], rows: list[dict]) -> None:
    """Write {"meta", "summary", "runs"} as JSON (non-finite floats become null)."""

    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        if isinstance(obj, torch.dtype):  # an --opt-arg such as product_dtype=torch.bfloat16
            return str(obj)
        return _finite(obj)

    with open(path, "w") as f:
        json.dump(clean({"meta": meta, "summary": rows, "runs": runs}), f, indent=1)
        f.write("\n")


def plot_curves(path: str, runs: list[dict], target: float, title: str = "") -> tuple[int, int]:
    """Save a PNG: one column per batch size; top row test accuracy vs wall-clock seconds, bottom row vs
    epochs; one colour per optimizer (each seed a line), the target as a dotted line. Returns (width,
    height) in pixels: (columns * 400, 600)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = _ordered(r["batch_size"] for r in runs)
    opts = _ordered(r["optimizer"] for r in runs)
    colors = {o: f"C{i % 10}" for i, o in enumerate(opts)}
    ncols = max(1, len(batches))
    # the lower y limit: the lowest accuracy after the first epoch, or target - 10, floored to a multiple of 10
    lowest = min([p["test_acc"] for r in runs for p in r["history"]] + [target - 10.0])
    y_low = max(0.0, 10.0 * math.floor(lowest / 10.0))
    fig, axes = plt.subplots(2, ncols, squeeze=False, dpi=PLOT_DPI,
                             figsize=(PLOT_PANEL_INCHES[0] * ncols, PLOT_PANEL_INCHES[1] * 2))
    for col, batch in enumerate(batches):
        for row, key, xlabel in ((0, "seconds", "wall-clock training time (s)"), (1, "epoch", "epoch")):
            ax = axes[row][col]
            labelled = set()
            for r in runs:
                if r["batch_size"] != batch or not r["history"]:
                    continue
                xs = [0.0] + [p[key] for p in r["history"]]
                ys = [r.get("initial_acc", 0.0)] + [p["test_acc"] for p in r["history"]]
                label = None if r["optimizer"] in labelled else r["optimizer"]
                labelled.add(r["optimizer"])
                ax.plot(xs, ys, color=colors[r["optimizer"]], label=label, alpha=0.8, linewidth=1.2)
            ax.axhline(target, color="k", linestyle=":", linewidth=1)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("test accuracy (%)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_ylim(y_low, 100.5)
            if row == 0:
                ax.set_title(f"batch {batch}", fontsize=9)
            if labelled:
                ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return int(PLOT_PANEL_INCHES[0] * ncols * PLOT_DPI), int(PLOT_PANEL_INCHES[1] * 2 * PLOT_DPI)
