"""K-FROG side by side with the public kfrog.py (Fullfix/frog-optimizer), imported at run time from a path.

    flock /tmp/fop_bench.lock .venv/bin/python bench/studies/compare_kfrog.py --public /path/to/frog-optimizer/kfrog.py

Same model (the ResNet-18-shaped CNN of fop_train.models.resnet18, 3x32x32 inputs, 10 classes) and batch for everyone.

- Update agreement (float64): one step from identical states, ours configured as the public code computes (Conv2d
  preconditioned, biases and the Linear head on the SGD path at lr, every sample in the input factor); reported
  per parameter as max |our update - public update| / max |our update|, the largest over the preconditioned conv
  weights and over everything else, and the relative Frobenius difference over all parameters. Second row: momentum
  0.9 and y_momentum 0.9 (one step: the bias correction makes the EMA equal this step's y_r).
- Step time (float32): full training steps (zero_grad, forward, backward, step) of SGD (momentum 0.9), ours and the
  public K-FROG at the same sample size and CG iterations, interleaved over rounds; medians and ratios.
- `--digits CONFIGS` (ours only, no public code needed with `--only digits`): the learning-rate study behind
  KFROG's default lr: fop_train.models.SmallCNN(1, 8, 10) on fop_train.data.load_digits(), batch 64 (`--digits-batch`),
  8 epochs, cosine schedule, seeds 0-2, 1 thread; CONFIGS is a ';'-list of `lr[:key=value key=value ...]`
  (values are Python literals).
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import math
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from fop import KFROG
from fop_train.data import load_digits
from fop_train.models import SmallCNN, resnet18
from torch import nn


def load_public_kfrog(path: str):
    """The public KFrog class from kfrog.py (a file, or the checkout folder holding it)."""
    file = path if path.endswith(".py") else os.path.join(path, "kfrog.py")
    if not os.path.isfile(file):
        raise SystemExit(f"--public: {file} not found")
    spec = importlib.util.spec_from_file_location("public_kfrog", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.KFrog


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def ours_as_public(model: nn.Module, **kw) -> KFROG:
    """KFROG computing what the public code computes: Conv2d only, biases on the SGD path at lr, no trust region."""
    return KFROG(model, fold_bias=False, lr_other_ratio=1.0, exclude=_linear_names(model), seed=0, kl_clip=None,
                 unpreconditioned="sgd", **kw)


def _one_step(model, opt, x, y) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def agreement(public, width: int, batch: int, **kw) -> str:
    torch.manual_seed(0)
    base = resnet18(width).double()
    x, y = torch.randn(batch, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (batch,))
    ours, pub = copy.deepcopy(base), copy.deepcopy(base)
    _one_step(ours, ours_as_public(ours, sample_size=None, **kw), x, y)
    _one_step(pub, public(pub.parameters(), pub, sample_size=None, **kw), x, y)
    conv_weights = {id(m.weight) for m in base.modules() if isinstance(m, nn.Conv2d)}
    worst = {"conv": 0.0, "other": 0.0}
    num = den = 0.0
    for p0, p1, p2 in zip(base.parameters(), ours.parameters(), pub.parameters()):
        d1, d2 = p1.detach() - p0.detach(), p2.detach() - p0.detach()
        num += float((d1 - d2).square().sum())
        den += float(d1.square().sum())
        scale = float(d1.abs().max())
        if scale > 0:
            key = "conv" if id(p0) in conv_weights else "other"
            worst[key] = max(worst[key], float((d1 - d2).abs().max()) / scale)
    settings = ", ".join(f"{k} {v}" for k, v in kw.items())
    return (f"| {settings} | {worst['conv']:.2e} | {worst['other']:.2e} | {(num / den) ** 0.5:.2e} |")


def agreement_section(public, args) -> list[str]:
    return [f"Update agreement, one step from identical states, resnet18(width {args.agree_width}), batch "
            f"{args.agree_batch}, float64, every sample in the input factor:", "",
            "| settings | conv weights: max rel. diff | other parameters | all: rel. Frobenius |",
            "| --- | --- | --- | --- |",
            agreement(public, args.agree_width, args.agree_batch, lr=0.1),
            agreement(public, args.agree_width, args.agree_batch, lr=0.1, momentum=0.9, y_momentum=0.9)]


def step_times(public, args) -> list[str]:
    torch.manual_seed(0)
    base = resnet18(args.width)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    s, k = args.sample_size, args.cg_iters
    makers = {
        "SGD (momentum 0.9)": lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
        f"K-FROG ours (as public: conv only, s {s}, {k} CG)":
            lambda m: ours_as_public(m, sample_size=s, cg_iters=k),
        f"K-FROG ours (defaults: Linear too, s {s}, {k} CG)": lambda m: KFROG(m, sample_size=s, cg_iters=k, seed=0),
        f"K-FROG public (s {s}, {k} CG)": lambda m: public(m.parameters(), m, sample_size=s, num_iters=k),
    }
    runs = {}
    for name, make in makers.items():
        model = copy.deepcopy(base)
        runs[name] = (model, make(model), [])
    for model, opt, _ in runs.values():  # warm-up
        _one_step(model, opt, x, y)
    for _ in range(args.rounds):
        for model, opt, times in runs.values():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                _one_step(model, opt, x, y)
                times.append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, (_, _, t) in runs.items()}
    names = list(med)
    sgd, ours, pub = med[names[0]], med[names[1]], med[names[3]]
    lines = [f"Step time, resnet18(width {args.width}), batch {args.batch}, float32, "
             f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds of {args.steps} steps; medians.", "",
             "| optimizer | median ms | ratio to SGD |", "| --- | --- | --- |"]
    lines += [f"| {name} | {t * 1e3:.1f} | {t / sgd:.2f}x |" for name, t in med.items()]
    lines.append(f"\nours / public = {ours / pub:.2f} (same computation; < 1: ours faster); "
                 f"ours {ours / sgd:.2f}x SGD, public {pub / sgd:.2f}x SGD.")
    return lines


def _digits_accuracy(data, lr: float, kw: dict, seed: int, batch: int, epochs: int = 8) -> float:
    torch.manual_seed(seed)
    model = SmallCNN(1, 8, 10)
    opt = KFROG(model, lr=lr, **kw)
    steps = epochs * math.ceil(len(data.train_y) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(epochs):
        perm = torch.randperm(len(data.train_y))
        for k in range(0, len(perm), batch):
            idx = perm[k:k + batch]
            try:
                _one_step(model, opt, data.train_x[idx], data.train_y[idx])
            except FloatingPointError:
                return float("nan")
            sched.step()
    with torch.no_grad():
        return (model(data.test_x).argmax(1) == data.test_y).float().mean().item()


def digits_study(configs: str, batch: int) -> list[str]:
    data = load_digits()
    lines = [f"K-FROG on digits: SmallCNN(1, 8, 10), batch {batch}, 8 epochs, cosine schedule, 1 thread; final test "
             "accuracy per seed (0, 1, 2; nan: a non-finite gradient stopped the run).", "",
             "| lr | other arguments | accuracy per seed | mean |", "| --- | --- | --- | --- |"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for config in configs.split(";"):
            lr, _, rest = config.partition(":")
            kw = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in rest.split())}
            accs = [_digits_accuracy(data, float(lr), kw, seed, batch) for seed in range(3)]
            lines.append(f"| {lr} | {rest or 'defaults'} | {', '.join(f'{a:.3f}' for a in accs)} | "
                         f"{statistics.mean(accs):.3f} |")
    finally:
        torch.set_num_threads(threads)
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--public", help="the public kfrog.py, or the checkout folder holding it")
    p.add_argument("--only", default="agree,steps", help="comma list of agree, steps, digits")
    p.add_argument("--digits", default="0.001;0.01;0.03;0.1;0.3;0.1:y_momentum=0.9;0.1:fold_bias=True;"
                   "0.1:sample_size=16;0.003:momentum=0.9;0.01:momentum=0.9;"
                   "0.01:momentum=0.9 exclude=['classifier.1','classifier.3'];0.01:momentum=0.9 eps=0.01",
                   help="digits configurations (see above)")
    p.add_argument("--digits-batch", type=int, default=64)
    p.add_argument("--width", type=int, default=16, help="resnet18 width of the step-time model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sample-size", type=int, default=256, help="s (the public default; >= batch: every sample)")
    p.add_argument("--cg-iters", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps per optimizer and round")
    p.add_argument("--agree-width", type=int, default=8)
    p.add_argument("--agree-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
    sections = args.only.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f}")
    if "digits" in sections:
        print("\n" + "\n".join(digits_study(args.digits, args.digits_batch)), flush=True)
    if {"agree", "steps"} & set(sections):
        if not args.public:
            p.error("--public is required for the agree and steps sections")
        public = load_public_kfrog(args.public)
        if "agree" in sections:
            print("\n" + "\n".join(agreement_section(public, args)), flush=True)
        if "steps" in sections:
            print("\n" + "\n".join(step_times(public, args)), flush=True)

if __name__ == "__main__":
    main()
