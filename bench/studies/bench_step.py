"""Step time of FOP and KFAC against SGD and AdamW on a ResNet-18-layout CNN (or, with `--model`, the real-width
models of bench/studies/wide_models.py: timm's ResNet-18 layout, ConvNeXt-atto-like, ViT-tiny-like), side by side in
one process.

Each round times one full step (zero_grad, forward, backward, optimizer.step) of every optimizer in turn, each on
its own copy of the same model and batch, so that machine noise hits all of them alike. Reported per optimizer:
median plain step, median refresh step (factor update + decomposition: the steps `fop.kfac.on_schedule` picks), the
interval mean ((k - 1) plain + refresh) / k that a long run averages, its ratio to SGD's, the measured mean, and for
KFAC/FOP the decompositions per refresh amortized over the interval (in SGD steps) and the split per phase (ms per
step, averaged over the measured steps): capture (hooks: forward+backward time beyond SGD's), factors,
decompositions, gradients (stacking; FOP: the half-batch GEMM), products (rotations or damped inverses),
sums+combine, outer update.
`--memory` runs each optimizer in a fresh subprocess and reports its peak memory (CUDA: max allocated;
CPU: peak RSS growth over the process's RSS after building the model and data).

    flock /tmp/fop_bench.lock .venv/bin/python bench/studies/bench_step.py --width 16 --batch 128 --steps 30
    .venv/bin/python bench/studies/bench_step.py --model resnet18-timm --width 64 --batch 64 --steps 20
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from fop import FOP, KFAC
from fop.kfac import INVERSE_METHODS, on_schedule
from fop_train.models import resnet18
from wide_models import WIDE_MODELS

OPTIMIZERS = ("sgd", "adamw", "kfac", "fop")
PRODUCT_DTYPES = {"default": None, "bfloat16": torch.bfloat16}
MODEL_NAMES = ("layout",) + tuple(WIDE_MODELS)


def build(args):
    """The benchmarked model: fop_train.models.resnet18(width) ("layout") or one of wide_models (ResNet-18 at
    `width`)."""
    if args.model == "layout":
        return resnet18(args.width)
    if args.model == "resnet18-timm":
        return WIDE_MODELS[args.model](args.width)
    return WIDE_MODELS[args.model]()


def make_optimizer(name, model, args):
    curvature = dict(lr=args.lr, damping=args.damping, factor_interval=args.interval, inverse_interval=args.interval,
                     weight_decay=5e-4, eigh_refresh_iters=args.eigh_refresh_iters, damping_mode=args.damping_mode,
                     inverse_method=args.inverse_method, product_dtype=PRODUCT_DTYPES[args.product_dtype])
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
    if name == "kfac":
        return KFAC(model, **curvature)
    return FOP(model, split=args.split, **curvature)


def forward_backward(name, model, x, y, args):
    """One backward on the batch; with --split backward, FOP and KFAC run two half-batch passes (mean losses halved):
    FOP needs them, and KFAC (gradient accumulation, the same update) gets them too so that FOP against KFAC
    compares optimizer work alone; SGD and AdamW keep one pass unless --same-passes (then the ratios compare
    optimizer work alone: at large batches one full-batch pass can cost more than two half-batch ones on CPU)."""
    two = args.split == "backward" and (name in ("fop", "kfac") or args.same_passes)
    passes = 2 if two else 1
    for xb, yb in zip(x.chunk(passes), y.chunk(passes)):
        (F.cross_entropy(model(xb), yb) / passes).backward()


PHASES = ("_update_factors", "_decompose", "_bucket_gradients", "_combine", "_precondition", "_outer_update")


def instrument(opt, sync):
    """Wrap the optimizer's phase methods with timers (seconds accumulated per phase)."""
    totals = dict.fromkeys(PHASES, 0.0)
    for name in PHASES:
        fn = getattr(opt, name)

        def timed(*a, _fn=fn, _name=name, **k):
            sync()
            t = time.perf_counter()
            out = _fn(*a, **k)
            sync()
            totals[_name] += time.perf_counter() - t
            return out

        setattr(opt, name, timed)
    return totals


def run(args):
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    base = build(args).to(dev)
    x = torch.randn(args.batch, 3, args.image, args.image, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    names = args.only or list(OPTIMIZERS)
    models = {n: copy.deepcopy(base) for n in names}
    opts = {n: make_optimizer(n, models[n], args) for n in names}
    phases = {n: instrument(o, sync) for n, o in opts.items() if isinstance(o, KFAC)}
    fb = {n: [] for n in names}
    st = {n: [] for n in names}
    total_steps = args.warmup + args.steps
    for step in range(total_steps):
        if step == args.warmup:
            for p in phases.values():
                for k in p:
                    p[k] = 0.0
        for n in names:
            m, o = models[n], opts[n]
            sync()
            t0 = time.perf_counter()
            o.zero_grad(set_to_none=True)
            forward_backward(n, m, x, y, args)
            sync()
            t1 = time.perf_counter()
            o.step()
            sync()
            t2 = time.perf_counter()
            if step >= args.warmup:
                fb[n].append(t1 - t0)
                st[n].append(t2 - t1)
    return names, fb, st, phases, sum(p.numel() for p in base.parameters())


def summarize(args, names, fb, st, phases, n_params):
    """Per optimizer: the median plain step, the median refresh step (factor update + decomposition: the steps
    `on_schedule` picks, young statistics' extra refreshes included), the interval mean ((k - 1) plain + refresh) / k
    that a long run averages, and the measured mean."""
    k = args.interval
    rows = {}
    for n in names:
        tot = [a + b for a, b in zip(fb[n], st[n])]
        refresh = [i + args.warmup for i in range(len(tot)) if on_schedule(i + args.warmup, k)]
        curv = [t for i, t in enumerate(tot) if i + args.warmup in refresh]
        plain = [t for i, t in enumerate(tot) if i + args.warmup not in refresh]
        p = statistics.median(plain) if plain else float("nan")
        c = statistics.median(curv) if curv else float("nan")
        rows[n] = dict(plain=p, curvature=c, interval=((k - 1) * p + c) / k, mean=statistics.fmean(tot),
                       fb=statistics.fmean(fb[n]), refreshes=len(curv))
    sgd = rows.get("sgd")
    lines = [f"model {args.model}, width {args.width} ({n_params / 1e6:.2f}M params), batch {args.batch}, "
             f"{args.image}x{args.image}, device {args.device}, threads {torch.get_num_threads()}, interval {k}, "
             f"eigh_refresh_iters {args.eigh_refresh_iters}, damping_mode {args.damping_mode}, damping {args.damping}, "
             f"inverse_method {args.inverse_method}, product_dtype {args.product_dtype}, FOP split {args.split}"
             f"{' (SGD and AdamW too)' if args.same_passes and args.split == 'backward' else ''}, "
             f"{args.steps} measured steps after {args.warmup} warm-up",
             "", "| optimizer | plain step (ms, median) | refresh step (ms, median) | interval mean (ms) | "
             "interval mean / SGD | measured mean (ms) |", "| --- | --- | --- | --- | --- | --- |"]
    for n in names:
        r = rows[n]
        ratio = r["interval"] / sgd["interval"] if sgd else float("nan")
        lines.append(f"| {n} | {r['plain'] * 1e3:.1f} | {r['curvature'] * 1e3:.1f} | {r['interval'] * 1e3:.1f} | "
                     f"{ratio:.3f} | {r['mean'] * 1e3:.1f} |")
    if sgd and "kfac" in rows and "fop" in rows:
        kf, fo = rows["kfac"]["interval"] - sgd["interval"], rows["fop"]["interval"] - sgd["interval"]
        lines += ["", f"interval means: KFAC / SGD {rows['kfac']['interval'] / sgd['interval']:.3f}, "
                      f"FOP / SGD {rows['fop']['interval'] / sgd['interval']:.3f}, "
                      f"FOP extra over KFAC / KFAC overhead over SGD {(fo - kf) / kf:.3f}"]
    if sgd:
        for n in phases:
            per_refresh = phases[n]["_decompose"] / max(rows[n]["refreshes"], 1)
            lines.append(f"{n}: decompositions {per_refresh * 1e3:.1f} ms per refresh, amortized over the interval "
                         f"{per_refresh / k * 1e3:.1f} ms per step = {per_refresh / k / sgd['interval']:.3f} SGD steps")
    if phases:
        lines += ["", "| phase (ms per step, mean) | " + " | ".join(phases) + " |",
                  "| --- |" + " --- |" * len(phases)]
        steps = args.steps

        def cell(n, key):
            p = phases[n]
            if key == "capture":
                return (rows[n]["fb"] - sgd["fb"]) * 1e3 if sgd else float("nan")
            if key == "rotate":
                return (p["_precondition"] - p["_bucket_gradients"] - p["_combine"]) / steps * 1e3
            return p[key] / steps * 1e3

        labels = (("capture (hooks)", "capture"), ("factors", "_update_factors"), ("decompositions", "_decompose"),
                  ("gradients (FOP: half-batch GEMM)", "_bucket_gradients"),
                  ("products (rotate or damped inverses)", "rotate"),
                  ("sums + combine", "_combine"), ("outer update", "_outer_update"))
        for label, key in labels:
            lines.append(f"| {label} | " + " | ".join(f"{cell(n, key):.1f}" for n in phases) + " |")
    return "\n".join(lines), rows


def memory(args):
    """Peak memory per optimizer, each in a fresh subprocess."""
    out = {}
    for n in args.only or OPTIMIZERS:
        cmd = [sys.executable, __file__, "--memory-child", n, "--model", args.model, "--width", str(args.width),
               "--batch", str(args.batch), "--damping", str(args.damping),
               "--eigh-refresh-iters", str(args.eigh_refresh_iters), "--damping-mode", args.damping_mode,
               "--inverse-method", args.inverse_method, "--split", args.split, "--product-dtype", args.product_dtype,
               *(["--same-passes"] if args.same_passes else []),
               "--image", str(args.image), "--interval", str(args.interval), "--device", args.device,
               "--steps", str(args.memory_steps), "--warmup", "0"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])
    lines = ["| optimizer | peak memory (MiB) | vs SGD | vs KFAC | optimizer-held at step (MiB) |",
             "| --- | --- | --- | --- | --- |"]
    for n, r in out.items():
        mib = r["peak"] / 2**20
        vs = {b: (r["peak"] / out[b]["peak"] if b in out else float("nan")) for b in ("sgd", "kfac")}
        lines.append(f"| {n} | {mib:.1f} | {vs['sgd']:.3f} | {vs['kfac']:.3f} | {r['held'] / 2**20:.1f} |")
    what = ("CUDA max allocated" if args.device == "cuda"
            else "CPU: peak RSS growth after model and data are built, coarse")
    return f"Peak memory ({what}), {args.memory_steps} steps:\n\n" + "\n".join(lines)


def memory_child(args):
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args).to(dev)
    x = torch.randn(args.batch, 3, args.image, args.image, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    opt = make_optimizer(args.memory_child, model, args)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as f:
            start = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    held = 0
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=True)
        forward_backward(args.memory_child, model, x, y, args)
        held = max(held, held_bytes(opt))
        opt.step()
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    print(json.dumps({"peak": peak, "held": held}))


def held_bytes(opt) -> int:
    """Bytes of distinct storages the optimizer holds when step() starts: its state (momentum, factors,
    eigenvectors) and the hooks' captured inputs and output gradients."""
    tensors = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if isinstance(opt, KFAC):
        tensors += [t for t in opt.factors_A + opt.factors_G if t is not None]
        tensors += [t for b in opt.buckets for t in vars(b).values() if isinstance(t, torch.Tensor)]
        tensors += [t for recs in opt.capture.records for r in recs for t in (r.a, r.dy) if t is not None]
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODEL_NAMES, default="layout",
                   help="layout: fop_train.models.resnet18 (3x3 stem, no pooling); or a wide_models net")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base width (64: the standard model)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--interval", type=int, default=10, help="factor_interval = inverse_interval")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--damping", type=float, help="KFAC/FOP damping (default: the library's)")
    p.add_argument("--eigh-refresh-iters", type=int, default=0, help="KFAC/FOP eigh_refresh_iters")
    p.add_argument("--damping-mode", choices=("eigen", "factored"), help="default: the library's")
    p.add_argument("--inverse-method", choices=INVERSE_METHODS,
                   help="default: the library's; cholesky needs --damping-mode factored")
    p.add_argument("--product-dtype", choices=tuple(PRODUCT_DTYPES), default="default",
                   help="KFAC/FOP product_dtype (default: the library's, the factors' dtype)")
    p.add_argument("--split", choices=("half_batch", "backward"), default="half_batch",
                   help="FOP's split; backward: FOP and KFAC run two half-batch passes per step (SGD, AdamW one)")
    p.add_argument("--same-passes", action="store_true",
                   help="with --split backward: SGD and AdamW run the two half-batch passes too")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="*", choices=OPTIMIZERS)
    p.add_argument("--memory", action="store_true", help="also measure peak memory (one subprocess each)")
    p.add_argument("--memory-only", action="store_true", help="peak memory alone, no step timing")
    p.add_argument("--memory-steps", type=int, default=12,
                   help="steps per memory subprocess (steps 0, 1, 2 are refreshes: 3 covers one)")
    p.add_argument("--memory-child", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    args = p.parse_args()
    defaults = inspect.signature(KFAC).parameters  # unset curvature options: the library's defaults
    for name in ("damping", "damping_mode", "inverse_method"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name].default)
    if args.memory_child:
        memory_child(args)
        return
    if not args.memory_only:
        text, _ = summarize(args, *run(args))
        print(text)
    if args.memory or args.memory_only:
        print()
        print(memory(args))


if __name__ == "__main__":
    main()
