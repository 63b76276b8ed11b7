"""nn.MultiheadAttention preconditioned (fop._attention) against left to the grafted step, side by side in one run.

    python bench/studies/attention.py --seeds 0,1,2 --threads 1            # the overfit probe
    python bench/studies/attention.py --cost --width 64 --threads 2        # what it costs per step

Probe: K-FAC and FOP with only `lr` set on the ViT of tests/test_defaults.py (fop_train.models.EncoderViT, torch's
nn.TransformerEncoder, 3 x 32 x 32 images, width 32, one fixed batch of 32 per seed, 30 steps), once with the
attention projections preconditioned (the default) and once with every nn.MultiheadAttention excluded (their
weights then take the grafted step, as before they were supported). Prints the final loss per seed, the median,
and how many runs "fall and stay down" (tests/test_defaults.py's criterion: finite, last < 0.8 x first and
< 3 x lowest + 0.05).

Cost (`--cost`): median ms per step (forward, backward, step) of SGD, K-FAC and FOP at their defaults on a wider
EncoderViT (batch 64, 64 tokens), with and without the attention preconditioned, interleaved round by round, and the
ratios to SGD; plus the forward+backward alone with the capture armed on every step (K-FAC `factor_interval=1`)
against the same model with attention excluded: the price of the explicit projections' identity products.
Ratios only: the machine may be shared.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import fop
import torch
import torch.nn.functional as F
from fop_train.models import EncoderViT
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import test_defaults  # noqa: E402  (the probe's model, batch, loop and criterion are the tests')


def attention_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


def probe_run(optimizer: str, lr: float, seed: int, attention: bool) -> list[float]:
    """tests/test_defaults.py's 30-step fixed-batch run of its ViT (the same model, batch and criterion)."""
    kwargs = {} if attention else {"exclude": attention_modules(test_defaults._vit()[0])}
    return test_defaults.overfit(test_defaults._vit, optimizer, lr, seed=seed, **kwargs)


def probe(args) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| optimizer | lr | attention | final loss per seed | median | fall and stay down |")
    print("| --- | --- | --- | --- | --- | --- |")
    for optimizer in ("KFAC", "FOP"):
        for lr in (float(v) for v in args.lrs.split(",")):
            for attention in (True, False):
                runs = [probe_run(optimizer, lr, s, attention) for s in seeds]
                finals = [r[-1] for r in runs]
                print(f"| {optimizer} | {lr:g} | {'preconditioned' if attention else 'excluded (graft)'} | "
                      f"{' / '.join(f'{v:.3g}' for v in finals)} | {statistics.median(finals):.3g} | "
                      f"{sum(map(test_defaults.falls_and_stays_down, runs))}/{len(runs)} |", flush=True)


def cost(args) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    configs = {"SGD": (torch.optim.SGD, dict(lr=0.01, momentum=0.9), True)}
    for name in ("KFAC", "FOP"):
        for attention in (True, False):
            configs[f"{name}{'' if attention else ' (attention excluded)'}"] = (getattr(fop, name), {}, attention)
    configs["KFAC factors every step"] = (fop.KFAC, dict(factor_interval=1, inverse_interval=50), True)
    configs["KFAC factors every step (attention excluded)"] = (fop.KFAC, dict(factor_interval=1,
                                                                               inverse_interval=50), False)
    runs = {}
    for label, (cls, kwargs, attention) in configs.items():
        torch.manual_seed(0)
        model = EncoderViT(3, 32, 10, width=args.width, depth=2, heads=4, ffn=2 * args.width)
        if cls is torch.optim.SGD:
            opt = cls(model.parameters(), **kwargs)
        else:
            opt = cls(model, lr=0.05, **kwargs, **({} if attention else {"exclude": attention_modules(model)}))
        runs[label] = (model, opt)
    times = {label: [] for label in runs}
    fb = {label: [] for label in runs if label.startswith("KFAC factors")}
    for r in range(args.warmup + args.rounds):
        for label, (model, opt) in runs.items():
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if r >= args.warmup:
                times[label].append(t2 - t0)
                if label in fb:
                    fb[label].append(t1 - t0)
    sgd = statistics.median(times["SGD"])
    print(f"EncoderViT width {args.width}, batch {args.batch}, 64 tokens, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads")
    print("| configuration | median ms / step | x SGD | median ms forward+backward |")
    print("| --- | --- | --- | --- |")
    for label, ts in times.items():
        med = statistics.median(ts)
        fwd = f"{1e3 * statistics.median(fb[label]):.1f}" if label in fb else ""
        print(f"| {label} | {1e3 * med:.1f} | {med / sgd:.2f} | {fwd} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lrs", default="0.01,0.1,1.0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cost", action="store_true", help="time steps instead of the probe")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("fop").setLevel(logging.ERROR)
    cost(args) if args.cost else probe(args)


if __name__ == "__main__":
    main()
