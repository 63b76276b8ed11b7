"""FROG and AdaFisher: step time against SGD and Adam, and side by side with the public implementations.

Run (one process, everything interleaved; the public code is imported at run time and never copied here):

    flock /tmp/fop_bench.lock .venv/bin/python bench/studies/bench_frog_adafisher.py \
        --frog-dir /path/to/Fullfix/frog-optimizer --adafisher-dir /path/to/AtlasAnalyticsLab/AdaFisher

`--frog-dir` (env FROG_DIR) holds the public `frog.py`; `--adafisher-dir` (env ADAFISHER_DIR) holds
`optimizers/AdaFisher.py`. A missing path skips that implementation with a message.

Sections (`--only steps,profile,cg,agree,digits`; default: all):
  steps   full training step (forward, backward, optimizer) on a ResNet-18-shaped CNN (BasicBlocks [2, 2, 2, 2],
          widths 32/64/128/256, CIFAR stem, 3x32x32 inputs, 10 classes) at batch 64; medians over interleaved rounds;
          ratios to SGD. AdaFisher's plain and refresh steps are reported apart. `--batch`, `--sample-size` (s).
  profile FROG's step() alone at that setting through torch.profiler: self time per aten op (conv = the sampled
          forward convs, convolution_backward = the weight-gradient convs, the rest: reductions and copies).
  cg      FROG's conv row systems at s = 24, 4 CG iterations, over the distinct conv shapes of that network: the conv
          matvec (conv + weight-gradient conv) against fop_kernels.batched_cg on materialized im2col patches.
  agree   our updates against the public ones on one model and batch (where the two compute the same thing).
  digits  the small CNN on sklearn's digits: AdaFisher with the public EMA constants against a proper average (and
          how far F~ moves from the damping), FROG with biases folded or on the SGD path, FROG's tau_linear.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from fop import FROG, AdaFisher
from fop.frog import ConvRowSystems, row_cg
from fop_train.models import resnet18
from torch import nn

import fop_kernels
from fop_kernels.reference.factor import conv_patches


# -- the public implementations, imported from a path ----------------------------------------------------------------
def load_public_frog(path: str | None):
    if not path:
        return None, "no --frog-dir / FROG_DIR given"
    file = path if path.endswith(".py") else os.path.join(path, "frog.py")
    if not os.path.isfile(file):
        return None, f"{file} not found"
    spec = importlib.util.spec_from_file_location("public_frog", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Frog, None


def load_public_adafisher(path: str | None):
    if not path:
        return None, "no --adafisher-dir / ADAFISHER_DIR given"
    file = path if path.endswith(".py") else os.path.join(path, "optimizers", "AdaFisher.py")
    if not os.path.isfile(file):
        return None, f"{file} not found"
    spec = importlib.util.spec_from_file_location("public_adafisher", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, None


# -- steps -----------------------------------------------------------------------------------------------------------
class Runner:
    """One optimizer on its own copy of the model; `refresh()` says whether its next step is a refresh step."""

    def __init__(self, name, model, make, refresh=lambda opt: False):
        self.name, self.model = name, model
        self.opt = make(model)
        self.refresh = refresh
        self.times = {"plain": [], "refresh": []}
        self.cpu = {"plain": [], "refresh": []}  # process CPU time: with one thread, unaffected by waiting for a core

    def step(self, x, y):
        kind = "refresh" if self.refresh(self.opt) else "plain"
        c0, t0 = time.process_time(), time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()
        self.times[kind].append(time.perf_counter() - t0)
        self.cpu[kind].append(time.process_time() - c0)


def bench_steps(args, public_frog, public_ada) -> list[str]:
    torch.manual_seed(0)
    base = resnet18(args.width)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    K, S = args.refresh_interval, args.sample_size
    runners = [
        Runner("SGD (momentum 0.9)", copy.deepcopy(base),
               lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)),
        *([] if args.frog_only else [Runner("Adam", copy.deepcopy(base),
                                            lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))]),
        Runner(f"FROG (ours, s {S}, 4 CG)", copy.deepcopy(base),
               lambda m: FROG(m, lr=0.01, momentum=0.9, sample_size=S, cg_iters=4)),
    ]
    if public_frog is not None:
        runners.append(Runner(f"FROG (public, s {S}, 4 CG)", copy.deepcopy(base),
                              lambda m: public_frog(m.parameters(), m, lr=0.01, momentum=0.9, sample_size=S,
                                                    num_iters=4)))
    if not args.frog_only:
        runners.append(Runner(f"AdaFisher (ours, interval {K})", copy.deepcopy(base),
                              lambda m: AdaFisher(m, factor_interval=K), lambda o: o.is_refresh_step()))
    if public_ada is not None and not args.frog_only:
        runners.append(Runner(f"AdaFisher (public, TCov {K})", copy.deepcopy(base),
                              lambda m: public_ada.AdaFisher(m, TCov=K), lambda o: o.steps % o.TCov == 0))
    for r in runners:  # warm-up: one refresh and one plain step each
        r.step(x, y), r.step(x, y)
        r.times = {"plain": [], "refresh": []}
        r.cpu = {"plain": [], "refresh": []}
    for _ in range(args.rounds):
        for r in runners:
            for _ in range(K):
                r.step(x, y)
    sgd = statistics.median(runners[0].times["plain"])
    sgd_cpu = statistics.median(runners[0].cpu["plain"])
    lines = [f"Step time, ResNet-18-shaped CNN (width {args.width}, batch {args.batch}, 3x32x32), "
             f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds of {K} steps; medians.", "",
             "| optimizer | step | median ms | p20-p80 ms | steps | ratio to SGD | median CPU ms | CPU ratio to SGD |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runners:
        for kind, ts in r.times.items():
            if not ts:
                continue
            q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
            med, cpu = statistics.median(ts), statistics.median(r.cpu[kind])
            lines.append(f"| {r.name} | {kind} | {med * 1e3:.1f} | {q[0] * 1e3:.1f}-{q[3] * 1e3:.1f} | {len(ts)} | "
                         f"{med / sgd:.2f}x | {cpu * 1e3:.1f} | {cpu / sgd_cpu:.2f}x |")
    named = {r.name.split(" (")[0] + ("/public" if "public" in r.name else ""): r for r in runners}
    ours_f, pub_f = named.get("FROG"), named.get("FROG/public")
    if ours_f and pub_f:
        ratio = statistics.median(pub_f.times["plain"]) / statistics.median(ours_f.times["plain"])
        cpu_ratio = statistics.median(pub_f.cpu["plain"]) / statistics.median(ours_f.cpu["plain"])
        lines.append(f"\nFROG: public step / our step = {ratio:.2f}x (target >= 1.5x); ours = "
                     f"{statistics.median(ours_f.times['plain']) / sgd:.2f}x SGD (target <= 1.3x). In CPU time: "
                     f"{cpu_ratio:.2f}x and {statistics.median(ours_f.cpu['plain']) / sgd_cpu:.2f}x.")
    ours_a, pub_a = named.get("AdaFisher"), named.get("AdaFisher/public")
    if ours_a:
        lines.append(f"AdaFisher plain step = {statistics.median(ours_a.times['plain']) / sgd:.3f}x SGD "
                     "(target within 3%).")
        if pub_a and ours_a.times["refresh"] and pub_a.times["refresh"]:
            ratio = statistics.median(pub_a.times["refresh"]) / statistics.median(ours_a.times["refresh"])
            lines.append(f"AdaFisher refresh step: public / ours = {ratio:.2f}x (target >= 3x).")
    return lines


# -- profile -------------------------------------------------------------------------------------------------------
def bench_profile(args) -> list[str]:
    """Where FROG's optimizer step (opt.step() alone, after forward and backward) spends its time, by aten op."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = resnet18(args.width)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    opt = FROG(model, lr=0.01, momentum=0.9, sample_size=args.sample_size, cg_iters=4)
    steps, total = 3, 0.0
    for k in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if k == 0:  # warm-up
            opt.step()
            continue
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            opt.step()
            total += time.perf_counter() - t0
    # the last profiled step, by op (self time: an op's own time, without the ops it calls)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    step_ms = total / steps * 1e3
    lines = [f"FROG step() profile (width {args.width}, batch {args.batch}, s {args.sample_size}, 4 CG), "
             f"{torch.get_num_threads()} threads: step() mean of {steps} = {step_ms:.1f} ms; the last one by op "
             "(self CPU time):", "", "| op | calls | self ms | share |", "| --- | --- | --- | --- |"]
    whole = sum(e.self_cpu_time_total for e in rows)
    for e in rows[:10]:
        lines.append(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
                     f"{e.self_cpu_time_total / whole:.0%} |")
    return lines


# -- cg --------------------------------------------------------------------------------------------------------------
def bench_cg(args) -> list[str]:
    torch.manual_seed(0)
    model = resnet18(args.width)
    shapes, hooks = {}, []

    def record(mod, inputs, output):
        shapes[(tuple(mod.weight.shape), mod.stride, mod.padding, tuple(inputs[0].shape[1:]))] = None

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    s, iters = 24, 4
    lines = [f"FROG conv row systems, s = {s}, {iters} CG iterations: medians of {args.cg_reps} interleaved pairs "
             "(ms).", "", "| weight | input | conv matvec | im2col + batched_cg | ratio |",
             "| --- | --- | --- | --- | --- |"]
    tot_conv = tot_patch = 0.0
    for (wshape, stride, padding, in_shape) in shapes:
        x = torch.randn(s, *in_shape)
        out = F.conv2d(x, torch.randn(wshape), stride=stride, padding=padding)
        y2 = torch.rand_like(out)
        B = torch.randn(wshape[0], math.prod(wshape[1:]))

        def conv_path(x=x, y2=y2, B=B, wshape=wshape, stride=stride, padding=padding):
            rows = ConvRowSystems(x, y2, wshape, stride, padding, (1, 1), 1, False, 1e-6)
            return row_cg(rows.matvec, rows.quad, B, iters)

        def patch_path(x=x, y2=y2, B=B, wshape=wshape, stride=stride, padding=padding):
            P = conv_patches(x, wshape[2:], stride, padding, 1)
            w = y2.permute(0, 2, 3, 1).reshape(-1, wshape[0])
            return fop_kernels.batched_cg(P, w, B, 1e-6, iters=iters)[0]

        conv_path(), patch_path()
        tc, tp = [], []
        for _ in range(args.cg_reps):
            t0 = time.perf_counter()
            conv_path()
            t1 = time.perf_counter()
            patch_path()
            tp.append(time.perf_counter() - t1)
            tc.append(t1 - t0)
        mc, mp = statistics.median(tc), statistics.median(tp)
        tot_conv += mc
        tot_patch += mp
        lines.append(f"| {wshape} s{stride[0]} | {in_shape} | {mc * 1e3:.2f} | {mp * 1e3:.2f} | {mp / mc:.2f}x |")
    lines.append(f"| all distinct shapes | | {tot_conv * 1e3:.1f} | {tot_patch * 1e3:.1f} | "
                 f"{tot_patch / tot_conv:.2f}x |")
    return lines


# -- agree -----------------------------------------------------------------------------------------------------------
def _max_rel_update_diff(m0, m1, m2) -> float:
    """max over parameters of |delta1 - delta2| / max|delta1| (delta: change from the common start m0)."""
    worst = 0.0
    for p0, p1, p2 in zip(m0.parameters(), m1.parameters(), m2.parameters()):
        p0, p1, p2 = p0.detach(), p1.detach(), p2.detach()
        d1, d2 = p1 - p0, p2 - p0
        scale = float(d1.abs().max())
        if scale > 0:
            worst = max(worst, float((d1 - d2).abs().max()) / scale)
    return worst


def bench_agree(args, public_frog, public_ada) -> list[str]:
    lines = ["Agreement with the public code (float64, one model and batch; max |our update - public update| "
             "relative to the largest update entry):", ""]
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (16,))
    if public_frog is not None:
        base = resnet18(8).double()
        ours, pub = copy.deepcopy(base), copy.deepcopy(base)
        o1 = FROG(ours, lr=0.01, momentum=0.9, sample_size=None, fold_bias=False, tau=1e-6, kl_clip=None,
                  unpreconditioned="sgd", exclude=_linear_names(ours))  # the public algorithm
        o2 = public_frog(pub.parameters(), pub, lr=0.01, momentum=0.9, sample_size=None)
        for m, o in ((ours, o1), (pub, o2)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        lines.append(f"- FROG, first step (whole batch, conv layers only, biases on the SGD path, as the public code): "
                     f"{_max_rel_update_diff(base, ours, pub):.2e}. The public CG adds 1e-10 to p^T A p and to the "
                     "old residual norm; ours does not, which shows where gradients are small.")
    if public_ada is not None:
        base = resnet18(8).double()
        ours, pub = copy.deepcopy(base), copy.deepcopy(base)
        o1 = AdaFisher(ours, factor_interval=2)
        o2 = public_ada.AdaFisher(pub, TCov=2)
        for m, o in ((ours, o1), (pub, o2)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        lines.append("- AdaFisher, first step (a refresh step): "
                     f"{_max_rel_update_diff(base, ours, pub):.2e}. The public conv H is divided by positions x patch "
                     "size instead of positions, which only moves it against the 1e-6 of the min-max normalization. "
                     "Later steps drift apart chaotically in both directions (lr / damping = 1 is a large step).")
    if len(lines) == 2:
        lines.append("- skipped: no public implementation given")
    return lines


# -- digits ----------------------------------------------------------------------------------------------------------
def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def train_digits(make, epochs: int, seed: int, data, batch: int = 64, track=None):
    """(test accuracy per epoch, seconds, tracked values) with a cosine learning-rate schedule."""
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = small_cnn()
    opt = make(model)
    steps = epochs * math.ceil(len(ytr) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    accs, tracked, t0 = [], [], time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr))
        for k in range(0, len(perm), batch):
            idx = perm[k:k + batch]
            opt.zero_grad()
            F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
            sched.step()
            if track is not None:
                tracked.append(track(opt))
        with torch.no_grad():
            accs.append((model(Xte).argmax(1) == yte).float().mean().item())
    return accs, time.perf_counter() - t0, tracked


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def bench_digits(args) -> list[str]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32)[:, None]
    X = (X - X.mean()) / X.std()
    yy = torch.tensor(d.target)
    perm = torch.randperm(len(yy), generator=torch.Generator().manual_seed(0))
    data = X[perm[:1437]], yy[perm[:1437]], X[perm[1437:]], yy[perm[1437:]]
    seeds = list(range(args.digits_seeds))

    def fmax(opt):
        r = opt.fisher_range()
        return max(hi for _, hi in r.values()) if r else float("nan")

    configs = [
        ("AdaFisher ema=public lr 1e-3 interval 100 (defaults)", lambda m: AdaFisher(m), fmax),
        ("AdaFisher ema=public lr 2e-3 interval 10", lambda m: AdaFisher(m, lr=2e-3, factor_interval=10), fmax),
        ("AdaFisher ema=average lr 0.1 interval 10",
         lambda m: AdaFisher(m, lr=0.1, factor_interval=10, ema="average"), fmax),
        ("AdaFisher ema=average lr 0.2 interval 10",
         lambda m: AdaFisher(m, lr=0.2, factor_interval=10, ema="average"), fmax),
        ("FROG lr 0.01 mom 0.9 (defaults: bias folded, tau_linear 0.3)",
         lambda m: FROG(m, lr=0.01, momentum=0.9), None),
        ("FROG ... fold_bias=False (biases on the SGD path)",
         lambda m: FROG(m, lr=0.01, momentum=0.9, fold_bias=False), None),
        ("FROG ... tau_linear=1e-6 (Linear damped like conv)",
         lambda m: FROG(m, lr=0.01, momentum=0.9, tau_linear=1e-6), None),
        ("FROG ... Linear layers excluded (SGD path, as the public code)",
         lambda m: FROG(m, lr=0.01, momentum=0.9, exclude=_linear_names(m)), None),
        ("SGD lr 0.05 mom 0.9", lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), None),
    ]
    lines = [f"Digits (sklearn, 1437 train / 360 test), small CNN, batch 64, {args.digits_epochs} epochs, cosine LR, "
             f"seeds {seeds}, 1 thread. Final test accuracy per seed, mean, first epoch reaching 95% (per seed), "
             "seconds per run, and for AdaFisher the largest F~ / damping over layers and entries: the maximum over "
             "the run and at the last step.", "",
             "| configuration | final acc per seed | mean | epoch to 95% | s/run | max F~/damping: run, last step |",
             "| --- | --- | --- | --- | --- | --- |"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, make, track in configs:
            finals, reach, secs, fm = [], [], [], []
            for seed in seeds:
                accs, sec, tracked = train_digits(make, args.digits_epochs, seed, data, track=track)
                finals.append(accs[-1])
                reach.append(next((str(i + 1) for i, a in enumerate(accs) if a >= 0.95), "-"))
                secs.append(sec)
                if tracked:
                    fm.append((max(tracked), tracked[-1]))
            fcol = f"{max(a for a, _ in fm):.3f}, {max(b for _, b in fm):.3f}" if fm else ""
            lines.append(f"| {name} | {', '.join(f'{a:.3f}' for a in finals)} | {statistics.mean(finals):.3f} | "
                         f"{', '.join(reach)} | {statistics.median(secs):.1f} | {fcol} |")
    finally:
        torch.set_num_threads(threads)
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frog-dir", default=os.environ.get("FROG_DIR"), help="public FROG checkout (env FROG_DIR)")
    p.add_argument("--adafisher-dir", default=os.environ.get("ADAFISHER_DIR"),
                   help="public AdaFisher checkout (env ADAFISHER_DIR)")
    p.add_argument("--only", default="steps,profile,cg,agree,digits")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--sample-size", type=int, default=24, help="FROG's s in the steps and profile sections")
    p.add_argument("--frog-only", action="store_true", help="steps: SGD and the two FROGs only")
    p.add_argument("--refresh-interval", type=int, default=4, help="AdaFisher refresh interval for the timing")
    p.add_argument("--cg-reps", type=int, default=7)
    p.add_argument("--digits-epochs", type=int, default=8)
    p.add_argument("--digits-seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*Full backward hook.*")
    public_frog, why_frog = load_public_frog(args.frog_dir)
    public_ada, why_ada = load_public_adafisher(args.adafisher_dir)
    if public_frog is None:
        print(f"public FROG skipped: {why_frog}")
    if public_ada is None:
        print(f"public AdaFisher skipped: {why_ada}")
    sections = args.only.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f}")
    for name, fn in (("steps", lambda: bench_steps(args, public_frog, public_ada)),
                     ("profile", lambda: bench_profile(args)), ("cg", lambda: bench_cg(args)),
                     ("agree", lambda: bench_agree(args, public_frog, public_ada)),
                     ("digits", lambda: bench_digits(args))):
        if name in sections:
            print("\n" + "\n".join(fn()), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
