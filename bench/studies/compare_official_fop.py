"""Our FOP beside the official FOP code (Kelares/HyperFisher @ bbf208e, folder fop/, built on ASDL), in one process.

The official code is imported at run time from `--official-dir` (or FOP_OFFICIAL_DIR): the folder holding its
`fop.py`. It needs ASDL (`asdfghjkl==0.1a5`, pure Python): importable, or installed into a folder given by
`--asdl-dir` (or ASDL_DIR), e.g. `pip install --no-deps --target PATH/TO/asdl asdfghjkl==0.1a5`. Nothing of it is
copied here. Without the folder the script prints why and exits 0.

1. Timing on a 225k-parameter MNIST CNN (no batch-coupled layers) at batch 2048 from the real MNIST IDX files:
   SGD, the official FOP (two half-batch forward/backward passes per step, an extra full-batch MC-Fisher pass on
   curvature steps, then SGD) and our FOP variants named by `--ours`: the MC Fisher (as the official) or the
   empirical one (`mc`/`empirical`), eigendecompositions or Cholesky inverses (`_cholesky`, as ASDL), one backward
   on the batch or two half-batch passes (`_2pass`: split="backward", as the official), and `sgd_2pass`: SGD over
   the same two half-batch passes; stepped in turn, in a shuffled order every round. Reported: median plain step,
   median curvature step, mean over whole intervals, ratios to one-pass SGD, and each overhead over the SGD step
   with the same passes (sgd_2pass for the official step and the `_2pass` variants), i.e. optimizer work alone.
2. Update directions at equal Fisher estimate and damping form: the official step computes its Kronecker factors
   (MC Fisher, pi-split damping); the same factors are loaded into our FOP (damping_mode="factored"), and both
   precondition the same batch. Reported: relative difference per layer.

    flock /tmp/fop_bench.lock .venv/bin/python bench/studies/compare_official_fop.py \\
        --official-dir PATH/TO/hyperfisher/fop --asdl-dir PATH/TO/asdl
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from fop import FOP
from fop_train.data import load_mnist
from torch import nn


class MnistCNN(nn.Module):
    """conv(1->32, 3x3) -> pool -> conv(32->64, 3x3) -> pool -> fc(3136->64) -> fc(64->10): 220,234 parameters
    (220,064 without biases)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=bias)
        self.fc1 = nn.Linear(64 * 7 * 7, 64, bias=bias)
        self.fc2 = nn.Linear(64, 10, bias=bias)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def import_official(official_dir: str, asdl_dir: str | None):
    if asdl_dir:
        sys.path.insert(0, asdl_dir)
    spec = importlib.util.spec_from_file_location("official_fop", os.path.join(official_dir, "fop.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # prints nothing at import; its classes print on construction
    import asdl

    if not torch.cuda.is_available():  # ASDL wraps its phases in torch.cuda.nvtx ranges, which CPU builds lack
        _stub_nvtx()
    return module, asdl


def _stub_nvtx():
    """Replace the `nvtx` module that ASDL's modules imported with no-op ranges (CPU torch has no NVTX)."""
    import contextlib
    import types

    stub = types.SimpleNamespace(range=lambda *a, **k: contextlib.nullcontext(), range_push=lambda *a, **k: 0,
                                 range_pop=lambda *a, **k: 0, mark=lambda *a, **k: None)
    for name, mod in list(sys.modules.items()):
        if name.startswith("asdl") and getattr(mod, "nvtx", None) is torch.cuda.nvtx:
            mod.nvtx = stub


class Quiet:
    """Silence the official code's prints (it prints on construction and on some steps)."""

    def __enter__(self):
        self._stdout = sys.stdout
        sys.stdout = open(os.devnull, "w")

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self._stdout


def official_optimizer(official, asdl, model, args, interval, ema_decay=0.05, damping=None):
    cfg = asdl.PreconditioningConfig(data_size=args.batch, damping=args.damping if damping is None else damping,
                                     ema_decay=ema_decay, preconditioner_upd_interval=interval,
                                     curvature_upd_interval=interval,
                                     ignore_modules=[nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm])
    with Quiet():
        maker = official.FOPGradientMaker(model, cfg, beta_adaptive=True, eta_adaptive=True)
    sgd = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    return maker, sgd


def time_steps(args, official, asdl, data):
    torch.manual_seed(0)
    base = MnistCNN()
    names = ["sgd", "sgd_2pass", "official"] + [f"ours_{v}" for v in args.ours]
    models = {n: copy.deepcopy(base) for n in names}
    sgds = {n: torch.optim.SGD(models[n].parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
            for n in ("sgd", "sgd_2pass")}
    maker, off_sgd = official_optimizer(official, asdl, models["official"], args, args.interval,
                                        damping=args.timing_damping)
    ours = {n: FOP(models[n], lr=args.lr, momentum=0.9, weight_decay=5e-4, damping=args.timing_damping,
                   damping_mode="factored", factor_interval=args.interval, inverse_interval=args.interval,
                   factor_decay=1 - 0.95 ** (1 / args.interval),  # the official ema_decay 0.05 per update
                   fisher="mc" if n.startswith("ours_mc") else "empirical",
                   inverse_method="cholesky" if "cholesky" in n else "eigh",
                   split="backward" if n.endswith("2pass") else "half_batch")
            for n in names[2:]}

    def step(name, x, y):
        m = models[name]
        if name in sgds:  # sgd_2pass: the two half-batch passes of the official step (gradient accumulation)
            sgds[name].zero_grad()
            passes = 2 if name == "sgd_2pass" else 1
            for xb, yb in zip(x.chunk(passes), y.chunk(passes)):
                (F.cross_entropy(m(xb), yb) / passes).backward()
            sgds[name].step()
        elif name == "official":
            m.zero_grad()
            with Quiet():
                maker.run(m, x, y, F.cross_entropy, label_smoothing=0.0)
            off_sgd.step()
        else:  # split="backward": two half-batch passes, as the official code; else one backward on the batch
            opt = ours[name]
            opt.zero_grad()
            passes = 2 if opt.split == "backward" else 1
            total = 0.0
            for xb, yb in zip(x.chunk(passes), y.chunk(passes)):
                logits = m(xb)
                if opt.fisher == "mc":
                    opt.fisher_backward(logits)
                loss = F.cross_entropy(logits, yb) / passes
                loss.backward()
                total = total + loss.detach()
            losses[name] = total
            opt.step()

    times = {n: [] for n in names}
    losses = {}
    g = torch.Generator().manual_seed(0)
    total = args.warmup + args.steps
    for i in range(total):
        idx = torch.randint(0, len(data.train_y), (args.batch,), generator=g)
        x, y = data.train_x[idx], data.train_y[idx]
        order = list(names)
        random.Random(i).shuffle(order)  # a fresh order every round: no step always follows the same other step
        for n in order:
            t = time.perf_counter()
            step(n, x, y)
            if i >= args.warmup:
                times[n].append(time.perf_counter() - t)
    print("final training loss of ours: " + ", ".join(f"{n} {float(v):.3f}" for n, v in losses.items()))
    return names, times


def report_times(args, names, times):
    k = args.interval
    rows = {}
    for n in names:
        curv = [t for i, t in enumerate(times[n]) if (i + args.warmup) % k == 0]
        plain = [t for i, t in enumerate(times[n]) if (i + args.warmup) % k != 0]
        rows[n] = (statistics.median(plain), statistics.median(curv), statistics.fmean(times[n]))
    sgd = rows["sgd"]
    lines = [f"MNIST CNN 220,234 params, batch {args.batch}, interval {k}, damping {args.timing_damping} "
             f"(pi-split), lr {args.lr}, threads {torch.get_num_threads()}, "
             f"{args.steps} measured steps after {args.warmup} warm-up (all optimizers stepped in turn, in a "
             "shuffled order every round)", "",
             "| optimizer | plain step ms (x SGD) | curvature step ms (x SGD) | mean step ms (x SGD) |",
             "| --- | --- | --- | --- |"]
    for n in names:
        p, c, m = rows[n]
        lines.append(f"| {n} | {p * 1e3:.0f} ({p / sgd[0]:.2f}x) | {c * 1e3:.0f} ({c / sgd[1]:.2f}x) | "
                     f"{m * 1e3:.0f} ({m / sgd[2]:.2f}x) |")
    lines.append("\nOverheads are over the SGD step with the same passes (the official step and ours_*_2pass run two "
                 "half-batch passes: sgd_2pass; one-pass variants: sgd), so they count optimizer work alone.")
    sgd2 = rows["sgd_2pass"]
    off = rows["official"][2] / sgd2[2] - 1
    for n in names[3:]:
        ours = rows[n][2] / (sgd2 if n.endswith("_2pass") else sgd)[2] - 1
        lines.append(f"\n{n}: overhead over SGD {ours:.3f} vs official {off:.3f} -> ratio {ours / off:.2f} "
                     f"(target <= 0.33); curvature step official / ours = {rows['official'][1] / rows[n][1]:.2f} "
                     f"(target >= 2)")
    return "\n".join(lines)


def compare_directions(args, official, asdl, data):
    """Same batch, same Kronecker factors (taken from the official step), factored damping: compare updates.

    Without biases: ASDL's Kronecker factor A leaves the bias out and preconditions a bias by (G + lambda_G)^-1
    alone, where we treat the bias as a column of ones in A (docs/design.md), so the weights alone match exactly."""
    torch.manual_seed(1)
    model_o = MnistCNN(bias=False).double()
    model_u = copy.deepcopy(model_o)
    x = data.train_x[: args.batch].double()
    y = data.train_y[: args.batch]
    maker, _ = official_optimizer(official, asdl, model_o, args, 1, ema_decay=1.0)
    model_o.zero_grad()
    with Quiet():
        maker.run(model_o, x, y, F.cross_entropy, label_smoothing=0.0)
    official_dir = {n: p.grad.detach().clone() for n, p in model_o.named_parameters()}

    opt = FOP(model_u, lr=1.0, momentum=0.0, damping=args.damping, damping_mode="factored",
              factor_interval=10**9, inverse_interval=10**9, factor_dtype=torch.float64)
    modules = dict(model_o.named_modules())
    for i, layer in enumerate(opt.layers):
        kron = maker._get_module_symmatrix(modules[layer.name], official_shape_kron(asdl))
        opt.factors_A[i], opt.factors_G[i] = kron.A.detach().clone(), kron.B.detach().clone()
    opt.factor_updates, opt.steps = 1, 1
    opt._decompose()
    opt.capture.release()
    opt._arm_for(opt.steps)
    before = {n: p.detach().clone() for n, p in model_u.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(model_u(x), y).backward()
    opt.step()
    lines = ["| parameter | |ours - official| / |official| |", "| --- | --- |"]
    worst = 0.0
    for n, p in model_u.named_parameters():
        ours = before[n] - p.detach()
        rel = float((ours - official_dir[n]).norm() / official_dir[n].norm())
        worst = max(worst, rel)
        lines.append(f"| {n} | {rel:.2e} |")
    stats = {k: {a: round(float(b), 4) for a, b in v.items()} for k, v in opt.last_stats().items()}
    return (f"Update directions, float64, bias-free CNN, batch {args.batch}, damping {args.damping} (pi-split), "
            "factors from the official MC-Fisher step:\n\n" + "\n".join(lines)
            + f"\n\nworst relative difference {worst:.2e}; our s_proj/beta/eta per layer: {stats}")


def official_shape_kron(asdl):
    from asdl.matrices import SHAPE_KRON

    return SHAPE_KRON


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official-dir", default=os.environ.get("FOP_OFFICIAL_DIR"),
                   help="folder with the official fop.py (Kelares/HyperFisher @ bbf208e, fop/)")
    p.add_argument("--asdl-dir", default=os.environ.get("ASDL_DIR"), help="folder where asdfghjkl==0.1a5 is installed")
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DIR"),
                   help="the folder with the MNIST IDX files (default: $MNIST_DIR)")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.002, help="timing run (0.01 diverged at damping 1e-2)")
    p.add_argument("--damping", type=float, default=1e-3, help="damping of the direction comparison")
    p.add_argument("--timing-damping", type=float, default=1e-2, help="damping of the timing run (official default)")
    p.add_argument("--ours", nargs="+", default=["mc", "empirical", "mc_cholesky", "empirical_cholesky",
                                                 "mc_cholesky_2pass", "empirical_cholesky_2pass"],
                   choices=[f + c + t for f in ("mc", "empirical") for c in ("", "_cholesky") for t in ("", "_2pass")],
                   help="our variants to time")
    p.add_argument("--skip-directions", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    args = p.parse_args()
    if not args.official_dir or not os.path.isfile(os.path.join(args.official_dir, "fop.py")):
        print(f"skipped: the official FOP code is absent (--official-dir / FOP_OFFICIAL_DIR = {args.official_dir!r} "
              "holds no fop.py); fetch Kelares/HyperFisher, check out bbf208e and pass its fop/ folder")
        return
    try:
        official, asdl = import_official(args.official_dir, args.asdl_dir)
    except ImportError as e:
        print(f"skipped: the official FOP code needs ASDL (asdfghjkl==0.1a5): {e}; pass --asdl-dir")
        return
    if not args.data_dir:
        p.error("--data-dir (or MNIST_DIR): the folder with the MNIST IDX files is needed")
    data = load_mnist(args.data_dir)
    if not args.skip_directions:
        print(compare_directions(args, official, asdl, data))
    if not args.skip_timing:
        print()
        print(report_times(args, *time_steps(args, official, asdl, data)))


if __name__ == "__main__":
    main()
