"""`fop-train` (also `python -m fop_train`): time-to-accuracy studies of optimizers, like the FOP paper's Table 1.

For every seed, batch size and optimizer: build the model from the seed, train with the learning rate
`lr = base_lr * (batch / base_batch)` (linear scaling; `--lr-scaling sqrt|none` to change), a linear
warm-up over `--warmup-epochs` and a cosine or step schedule over the epoch budget (per step), evaluate
the test accuracy after every epoch, and stop at `--target` % or at the budget. Writes `table.md`,
`results.json` and `accuracy.png` into `--out`. See docs/train.md.

This module is the only place in `fop_train` that prints or draws progress bars; `run_one` itself reports
through a callback and `logging`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fop_train.data import DATASETS, ImageDataset, load_dataset
from fop_train.models import MODELS, build_model
from fop_train.report import markdown_table, plot_curves, summarize, write_json

__all__ = ["OPTIMIZERS", "OptimizerSpec", "RunConfig", "available_optimizers", "main", "make_optimizer", "run_one"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer: `target` is 'module:Class' (imported only when used), `takes_model` says
    whether the constructor takes the model (Fisher optimizers register hooks) or its parameters,
    `base_lr` is the learning rate at `--base-batch`, `defaults` extra constructor keywords, `interval_keys`
    the keywords that `--curvature-interval` sets (steps between curvature refreshes)."""

    target: str
    takes_model: bool
    base_lr: float
    defaults: dict = dataclasses.field(default_factory=dict)
    interval_keys: tuple[str, ...] = ()

    def load(self) -> type:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec("torch.optim:SGD", False, 0.05, {"momentum": 0.9}),
    "adamw": OptimizerSpec("torch.optim:AdamW", False, 1e-3),
    # K-FAC and FOP at their constructors' defaults (KL clip 1e-3, factored damping 1e-3)
    "kfac": OptimizerSpec("fop:KFAC", True, 0.025, {}, ("factor_interval", "inverse_interval")),
    "fop": OptimizerSpec("fop:FOP", True, 0.025, {}, ("factor_interval", "inverse_interval")),
    "frog": OptimizerSpec("fop:FROG", True, 0.005, {"momentum": 0.9}),
    # K-FROG: 0.1 at batch 64 is its measured default (digits); 0.4 at batch 256 reached 0.982 there (3 seeds).
    "kfrog": OptimizerSpec("fop:KFROG", True, 0.4),
    # AdaFisher: the public default lr 1e-3 at batch 1024 (1e-3 at batch 256, scaled, diverged on digits).
    "adafisher": OptimizerSpec("fop:AdaFisher", True, 2.5e-4, {}, ("factor_interval",)),
}


def _import_error(name: str) -> str | None:
    try:
        OPTIMIZERS[name].load()
    except (ImportError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def available_optimizers() -> list[str]:
    """The names in OPTIMIZERS whose class imports in this installation."""
    return [name for name in OPTIMIZERS if _import_error(name) is None]


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0,
                   overrides: dict | None = None) -> torch.optim.Optimizer:
    """Construct optimizer `name` for `model` with its defaults, `lr`, `weight_decay` and `overrides`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(available_optimizers())}")
    reason = _import_error(name)
    if reason is not None:
        raise ValueError(
            f"optimizer {name!r} is not available in this installation ({reason}); "
            f"valid: {', '.join(available_optimizers())}"
        )
    spec = OPTIMIZERS[name]
    kwargs = {**spec.defaults, "lr": lr, "weight_decay": weight_decay, **(overrides or {})}
    first = model if spec.takes_model else model.parameters()
    return spec.load()(first, **kwargs)


@dataclasses.dataclass
class RunConfig:
    """Everything one training run needs besides data, optimizer name, batch size and seed."""

    model: str = "cnn"
    width: int | None = None
    epochs: int = 20
    target: float = 95.0
    base_batch: int = 256
    lr_scaling: str = "linear"
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    drop_last: bool = False
    stop_at_target: bool = True
    eval_batch_size: int = 4096
    device: str = "cpu"


def scaled_lr(base_lr: float, batch_size: int, base_batch: int, scaling: str) -> float:
    """lr = base_lr * (B / base_batch) (linear), * sqrt(B / base_batch) (sqrt), or base_lr (none)."""
    ratio = batch_size / base_batch
    if scaling == "linear":
        return base_lr * ratio
    if scaling == "sqrt":
        return base_lr * math.sqrt(ratio)
    if scaling == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling {scaling!r}; valid: linear, sqrt, none")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warm-up (step+1)/warmup, then
    cosine 0.5 (1 + cos(pi t)), t the fraction of the post-warm-up steps done; or step: x0.1 at 50% and
    75% of all steps; or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    if schedule == "step":
        return 0.1 ** sum(step >= m * total_steps for m in (0.5, 0.75))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; valid: cosine, step, constant")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Test accuracy in percent (sequence outputs (N, T, classes): over every position)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(0, len(y), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum()
    model.train(was_training)
    return 100.0 * correct.item() / y.numel()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_backward(model, optimizer, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> float:
    """The mean cross-entropy's backward; FOP with split="backward" gets two half-batch passes (each mean loss halved),
    its sub-batches; an optimizer with fisher="mc" gets its sampled-label backward after each forward. Returns the
    loss (NaN/inf: nothing was backpropagated after it)."""
    passes = 2 if getattr(optimizer, "split", None) == "backward" and len(y) > 1 else 1
    mc = getattr(optimizer, "fisher", None) == "mc"
    total = 0.0
    for part_x, part_y in zip(x.tensor_split(passes), y.tensor_split(passes)):
        logits = model(part_x)
        if logits.dim() == 3:  # a sequence model: every position is a sample of the loss and of the MC Fisher
            logits, part_y = logits.flatten(0, 1), part_y.flatten()
        loss = F.cross_entropy(logits, part_y, label_smoothing=label_smoothing) / passes
        value = loss.item()
        total += value
        if not math.isfinite(value):
            return value
        if mc:
            optimizer.fisher_backward(logits)
        loss.backward()
    return total


def run_one(data: ImageDataset, optimizer_name: str, batch_size: int, seed: int, config: RunConfig,
            lr: float, overrides: dict | None = None,
            on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train one model; returns the run record (see fop_train.report). `on_epoch` is called with each epoch's point.

    A run stops early when the test accuracy reaches `config.target` (if `stop_at_target`) or when the
    training loss becomes non-finite or the optimizer refuses a non-finite gradient or update (FloatingPointError):
    recorded as diverged, with the step."""
    device = torch.device(config.device)
    n_train = len(data.train_y)
    if batch_size > n_train:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({n_train} samples) of "
                         f"{data.name}; use a smaller batch or 'full' for the whole set")
    torch.manual_seed(seed)
    model = build_model(config.model, data.image_shape, data.num_classes, width=config.width).to(device)
    optimizer = make_optimizer(optimizer_name, model, lr, config.weight_decay, overrides)
    steps_per_epoch = n_train // batch_size if config.drop_last else math.ceil(n_train / batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, config.schedule))
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    shuffle = torch.Generator().manual_seed(seed)
    record = {
        "optimizer": optimizer_name, "batch_size": batch_size, "seed": seed, "lr": lr,
        "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup_steps, "total_steps": total_steps,
        "initial_acc": evaluate(model, test_x, test_y, config.eval_batch_size),
        "history": [], "reached_epoch": None, "reached_seconds": None, "diverged": False, "diverged_step": None,
    }
    seconds, global_step = 0.0, 0
    model.train()
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(n_train, generator=shuffle).to(device)
        _sync(device)
        start = time.perf_counter()
        loss_sum, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_value = _forward_backward(model, optimizer, train_x[idx], train_y[idx], config.label_smoothing)
            if not math.isfinite(loss_value):
                record["diverged"], record["diverged_step"] = True, global_step
                break
            try:
                optimizer.step()
            except FloatingPointError:  # the optimizer refused a non-finite gradient or update; nothing changed
                record["diverged"], record["diverged_step"] = True, global_step
                break
            global_step += 1
            scheduler.step()
            loss_sum += loss_value * len(idx)
            seen += len(idx)
        _sync(device)
        seconds += time.perf_counter() - start
        if record["diverged"]:
            log.info("%s batch %d seed %d: loss became non-finite in epoch %d", optimizer_name, batch_size, seed,
                     epoch)
            break
        acc = evaluate(model, test_x, test_y, config.eval_batch_size)
        point = {"epoch": epoch, "seconds": seconds, "test_acc": acc, "train_loss": loss_sum / max(1, seen),
                 "lr_end": optimizer.param_groups[0]["lr"]}
        record["history"].append(point)
        if on_epoch is not None:
            on_epoch(point)
        if acc >= config.target and record["reached_epoch"] is None:
            record["reached_epoch"], record["reached_seconds"] = epoch, seconds
            if config.stop_at_target:
                break
    return record


# ----------------------------------------------------------------------------------------------------------
# command line


def _parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_named_value(text: str, what: str) -> tuple[str, str, object]:
    """'name.key=value' (or 'name=value' for --lr) -> (name, key, literal value; 'torch.<dtype>': that dtype)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: expected NAME{'.KEY' if what != '--lr' else ''}=VALUE")
    left, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(value, str) and value.startswith("torch."):
        dtype = getattr(torch, value[len("torch."):], None)
        if not isinstance(dtype, torch.dtype):
            raise argparse.ArgumentTypeError(f"{what} {text!r}: {value} is not a torch dtype")
        value = dtype
    if what == "--lr":
        return left, "lr", value
    if "." not in left:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: expected OPTIMIZER.KEY=VALUE, e.g. fop.damping=1e-3")
    name, key = left.split(".", 1)
    return name, key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fop-train",
        description="Time-to-accuracy study: train a model with several optimizers at several batch sizes and "
                    "seeds; write a table (markdown, JSON) and a plot of test accuracy vs time and epochs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default="digits", help=f"dataset: {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default=None, help="directory with the MNIST IDX files (for --data mnist)")
    p.add_argument("--imbalance", type=float, default=None,
                   help="make the training set long-tailed with this imbalance factor (largest/smallest class)")
    p.add_argument("--train-limit", type=int, default=None, help="use a random subset of this many training samples")
    p.add_argument("--model", default="cnn", help=f"model: {', '.join(MODELS)}")
    p.add_argument("--width", type=int, default=None, help="model width (channels / hidden size)")
    p.add_argument("--optimizers", default=None,
                   help="comma-separated optimizers (default: every available one; see --list)")
    p.add_argument("--batch-sizes", default="1024", help="comma-separated batch sizes; 'full' = the whole training set")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--epochs", type=int, default=20, help="epoch budget per run")
    p.add_argument("--target", type=float, default=95.0, help="target test accuracy in percent")
    p.add_argument("--no-stop", action="store_true", help="train the whole budget even after reaching the target")
    p.add_argument("--base-batch", type=int, default=256, help="batch size at which the base learning rates apply")
    p.add_argument("--lr", action="append", default=[], metavar="OPT=LR",
                   help="base learning rate of one optimizer, e.g. --lr fop=0.1 (repeatable)")
    p.add_argument("--lr-scaling", default="linear", choices=["linear", "sqrt", "none"])
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step", "constant"])
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the training loss")
    p.add_argument("--opt-arg", action="append", default=[], metavar="OPT.KEY=VALUE",
                   help="extra constructor argument of one optimizer, e.g. --opt-arg fop.damping=1e-3 (repeatable)")
    p.add_argument("--curvature-interval", type=int, default=None,
                   help="steps between curvature refreshes (K-FAC/FOP factor_interval and inverse_interval, "
                        "AdaFisher factor_interval); the optimizers' own defaults if unset")
    p.add_argument("--drop-last", action="store_true", help="drop the last incomplete batch of each epoch")
    p.add_argument("--eval-batch-size", type=int, default=4096)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default="out/train", help="output directory for table.md, results.json, accuracy.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list optimizers, models and datasets, then exit")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="train nothing: merge the runs of these results.json files (e.g. seeds run in separate "
                        "processes) and write the table, JSON and plot into --out")
    return p


def _backend_report() -> dict:
    try:
        import fop_kernels

        return {"version": fop_kernels.__version__, "backends": fop_kernels.available_backends()}
    except Exception as exc:  # noqa: BLE001 - the report records why the backend could not be described
        return {"error": f"{type(exc).__name__}: {exc}"}


def _constructor_defaults(name: str) -> dict:
    """The keyword defaults of an optimizer's constructor (so the JSON records every hyperparameter)."""
    import inspect

    params = inspect.signature(OPTIMIZERS[name].load().__init__).parameters.values()
    return {p.name: repr(p.default) if not isinstance(p.default, (int, float, str, bool, type(None), tuple))
            else p.default for p in params if p.default is not inspect.Parameter.empty}


def _listing() -> str:
    lines = ["optimizers:"]
    for name, spec in OPTIMIZERS.items():
        reason = _import_error(name)
        state = "available" if reason is None else f"not available ({reason})"
        lines.append(f"  {name:<10} base lr {spec.base_lr:g} at the base batch; {spec.target}; {state}")
    lines.append("models: " + ", ".join(MODELS))
    lines.append("datasets: " + ", ".join(DATASETS) + " (mnist needs --data-dir with the IDX files)")
    return "\n".join(lines)


def _write_outputs(out: str, meta: dict, runs: list[dict], target: float, title: str) -> str:
    os.makedirs(out, exist_ok=True)
    rows = summarize(runs)
    write_json(os.path.join(out, "results.json"), meta, runs, rows)
    table = f"# {title}\n\nCommand: `{meta['command']}`\n\n" + markdown_table(rows, target)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    plot_curves(os.path.join(out, "accuracy.png"), runs, target, title=title)
    return table


def _merge(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import json

    metas, runs = [], []
    for path in args.merge:
        try:
            with open(path) as f:
                result = json.load(f)
            metas.append(result["meta"])
            runs.extend(result["runs"])
        except (OSError, ValueError, KeyError) as exc:
            parser.error(f"--merge: cannot read runs from {path}: {exc}")
    targets = {m["config"]["target"] for m in metas}
    if len(targets) != 1:
        parser.error(f"--merge: the files have different targets {sorted(targets)}")
    target = targets.pop()
    keys = [(r["optimizer"], r["batch_size"], r["seed"]) for r in runs]
    if len(set(keys)) != len(keys):
        parser.error("--merge: the files repeat an (optimizer, batch size, seed) run")
    meta = {**metas[0], "command": " + ".join(m["command"] for m in metas), "merged_from": list(args.merge),
            "seeds": sorted({r["seed"] for r in runs})}
    runs.sort(key=lambda r: (r["seed"], meta["batch_sizes"].index(r["batch_size"])
                             if r["batch_size"] in meta["batch_sizes"] else r["batch_size"]))
    title = f"{meta['dataset']['name']}, {meta['config']['model']}, target {target:g}%"
    table = _write_outputs(args.out, meta, runs, target, title)
    print(table)
    return 0


def _checked_optimizers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The optimizers to run (all available ones by default); an unknown or unavailable name is a usage error."""
    valid = available_optimizers()
    names = _parse_list(args.optimizers) if args.optimizers else valid
    for name in names:
        if name not in OPTIMIZERS:
            parser.error(f"unknown optimizer {name!r}; valid: {', '.join(valid)}")
        if name not in valid:
            parser.error(f"optimizer {name!r} is not available in this installation ({_import_error(name)}); "
                         f"valid: {', '.join(valid)}")
    return names


def _checked_options(parser: argparse.ArgumentParser, args: argparse.Namespace, names: list[str]
                     ) -> tuple[list[int], dict[str, float], dict[str, dict]]:
    """(seeds, per-optimizer lr overrides, per-optimizer constructor arguments), after checking every scalar."""
    if args.model not in MODELS:
        parser.error(f"unknown model {args.model!r}; valid: {', '.join(MODELS)}")
    if args.data not in DATASETS:
        parser.error(f"unknown dataset {args.data!r}; valid: {', '.join(DATASETS)}")
    if not 0 < args.target <= 100:
        parser.error(f"--target is a test accuracy in percent, in (0, 100]; got {args.target}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.base_batch < 1:
        parser.error(f"--base-batch must be >= 1, got {args.base_batch}")
    if args.warmup_epochs < 0:
        parser.error(f"--warmup-epochs must be >= 0, got {args.warmup_epochs}")
    try:
        seeds = [int(s) for s in _parse_list(args.seeds)]
        lr_overrides = {n: v for n, _, v in (_parse_named_value(t, "--lr") for t in args.lr)}
        opt_args: dict[str, dict] = {}
        for text in args.opt_arg:
            n, key, value = _parse_named_value(text, "--opt-arg")
            opt_args.setdefault(n, {})[key] = value
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    if not seeds:
        parser.error("--seeds is empty")
    if args.curvature_interval is not None:
        if args.curvature_interval < 1:
            parser.error(f"--curvature-interval must be >= 1, got {args.curvature_interval}")
        for n in names:
            for key in OPTIMIZERS[n].interval_keys:
                opt_args.setdefault(n, {}).setdefault(key, args.curvature_interval)
    for n in list(lr_overrides) + list(opt_args):
        if n not in OPTIMIZERS:
            parser.error(f"unknown optimizer {n!r} in --lr/--opt-arg; valid: {', '.join(available_optimizers())}")
    return seeds, lr_overrides, opt_args


def _batch_sizes(parser: argparse.ArgumentParser, text: str, data: ImageDataset) -> list[int]:
    """--batch-sizes as integers ('full': the whole training set); each in [1, training set size]."""
    n_train = len(data.train_y)
    batch_sizes = []
    for tok in _parse_list(text):
        if tok == "full":
            batch_sizes.append(n_train)
            continue
        try:
            b = int(tok)
        except ValueError:
            parser.error(f"--batch-sizes: {tok!r} is neither an integer nor 'full'")
        if b < 1:
            parser.error(f"--batch-sizes: batch size must be >= 1, got {b}")
        if b > n_train:
            parser.error(f"batch size {b} is larger than the training set ({n_train} samples) of {data.name}; "
                         f"use a smaller batch or 'full' for the whole set")
        batch_sizes.append(b)
    if not batch_sizes:
        parser.error("--batch-sizes is empty")
    return batch_sizes


def _run_config(args: argparse.Namespace) -> RunConfig:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return RunConfig(model=args.model, width=args.width, epochs=args.epochs, target=args.target,
                     base_batch=args.base_batch, lr_scaling=args.lr_scaling, warmup_epochs=args.warmup_epochs,
                     schedule=args.schedule, weight_decay=args.weight_decay,
                     label_smoothing=args.label_smoothing, drop_last=args.drop_last,
                     stop_at_target=not args.no_stop, eval_batch_size=args.eval_batch_size, device=device)


def _hyperparameters(args: argparse.Namespace, names: list[str], lr_overrides: dict, opt_args: dict,
                     batch_sizes: list[int]) -> dict[str, dict]:
    """Per optimizer: its class, base lr, the lr used at each batch size and the keyword arguments it gets."""
    hyper = {}
    for n in names:
        spec = OPTIMIZERS[n]
        base_lr = float(lr_overrides.get(n, spec.base_lr))
        hyper[n] = {
            "class": spec.target, "base_lr": base_lr,
            "lr_by_batch": {str(b): scaled_lr(base_lr, b, args.base_batch, args.lr_scaling) for b in batch_sizes},
            "kwargs": {**spec.defaults, "weight_decay": args.weight_decay, **opt_args.get(n, {})},
            "constructor_defaults": _constructor_defaults(n),
        }
    return hyper


def _study_meta(argv: list[str] | None, data: ImageDataset, config: RunConfig, hyper: dict, batch_sizes: list[int],
                seeds: list[int]) -> dict:
    """What results.json records about the study: command, dataset, configuration, versions, start time."""
    device = config.device
    return {
        "command": " ".join(["fop-train"] + (sys.argv[1:] if argv is None else list(argv))),
        "dataset": {"name": data.name, "train": len(data.train_y), "test": len(data.test_y),
                    "image_shape": data.image_shape, "classes": data.num_classes,
                    "train_class_counts": data.class_counts()},
        "config": dataclasses.asdict(config),
        "optimizers": hyper,
        "batch_sizes": batch_sizes,
        "seeds": seeds,
        "device": device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(torch.device(device))})",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fop_kernels": _backend_report(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _train_all(data: ImageDataset, config: RunConfig, names: list[str], hyper: dict, opt_args: dict,
               batch_sizes: list[int], seeds: list[int], meta: dict, json_path: str, quiet: bool) -> list[dict]:
    """Every (seed, batch, optimizer) run in turn with a progress bar each; results.json rewritten after each."""
    from tqdm import tqdm

    runs: list[dict] = []
    total = len(seeds) * len(batch_sizes) * len(names)
    for seed in seeds:
        for batch in batch_sizes:
            for n in names:
                lr = hyper[n]["lr_by_batch"][str(batch)]
                desc = f"[{len(runs) + 1}/{total}] {n} b={batch} seed={seed}"
                with tqdm(total=config.epochs, desc=desc, unit="ep", disable=quiet, leave=True,
                          file=sys.stderr, dynamic_ncols=True) as bar:
                    def on_epoch(point, bar=bar):
                        bar.set_postfix(acc=f"{point['test_acc']:.2f}", loss=f"{point['train_loss']:.3f}",
                                        t=f"{point['seconds']:.1f}s")
                        bar.update(1)

                    record = run_one(data, n, batch, seed, config, lr, opt_args.get(n), on_epoch)
                runs.append(record)
                meta["finished_runs"] = len(runs)
                write_json(json_path, meta, runs, summarize(runs))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.list:
        print(_listing())
        return 0
    if args.merge:
        return _merge(parser, args)

    names = _checked_optimizers(parser, args)
    seeds, lr_overrides, opt_args = _checked_options(parser, args, names)
    try:
        data = load_dataset(args.data, args.data_dir, args.imbalance, args.train_limit)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    batch_sizes = _batch_sizes(parser, args.batch_sizes, data)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = _run_config(args)
    hyper = _hyperparameters(args, names, lr_overrides, opt_args, batch_sizes)
    meta = _study_meta(argv, data, config, hyper, batch_sizes, seeds)
    # construct every optimizer once before training, so a bad keyword or value fails before any run
    for n in names:
        try:
            probe = build_model(config.model, data.image_shape, data.num_classes, width=config.width)
            make_optimizer(n, probe, hyper[n]["lr_by_batch"][str(batch_sizes[0])], config.weight_decay,
                           opt_args.get(n))
        except (TypeError, ValueError) as exc:
            parser.error(f"{n}: {exc}")
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    runs = _train_all(data, config, names, hyper, opt_args, batch_sizes, seeds, meta, json_path, args.quiet)
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    title = f"{data.name}, {args.model}, target {args.target:g}%"
    table = _write_outputs(args.out, meta, runs, args.target, title)
    print(table)
    print(f"wrote {os.path.join(args.out, 'table.md')}, {json_path}, {os.path.join(args.out, 'accuracy.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
