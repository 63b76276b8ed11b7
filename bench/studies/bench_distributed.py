"""Distributed step time and communication: FOP, K-FAC, FROG, K-FROG, AdaFisher against SGD under DDP, W gloo ranks.

Run (a script, not a pytest benchmark: it starts its own rank processes on 127.0.0.1):
    flock /tmp/fop_bench.lock .venv/bin/python bench/studies/bench_distributed.py --world 2 \\
        --out bench/results/distributed.json

`--optimizers` picks the runs (default sgd,kfac,fop; FROG and AdaFisher: sgd,frog,kfrog,adafisher). For FROG the
table also gives what gathering the sampled samples' inputs and output gradients would cost instead (the
alternative fop.distributed_rows rejects, docs/distributed.md).

Each rank runs with one thread. The optimizers train their own DDP copies of one CNN in interleaved rounds
(`--rounds` x `--steps` steps each, factor and inverse interval `--interval`), so a load change on the shared CPU hits
them alike. Reported, per optimizer: the median over rounds of the mean step time (forward, backward, step), the
median of the per-round ratios to DDP+SGD (paired within a round: robust to a load that changes between rounds);
the process CPU time per step of rank 0 (all its threads: the work done, unaffected by waiting for a loaded CPU);
bytes per step handed to collectives (DDP's buckets counted by a comm hook; the optimizer's from
`optimizer.comm.stats()`); and the bytes each rank wrote to its sockets (`wchar` of /proc/self/io, gloo's TCP
traffic) against the cost model of docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


def _wchar() -> int:
    """Bytes this process handed to write-like system calls (sockets included), Linux only."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def _counting_allreduce_hook(counter: dict):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        buf = bucket.buffer()
        counter["bytes"] += buf.numel() * buf.element_size()
        return allreduce_hook(state, bucket)

    return hook


def _rank_main(args) -> None:
    from fop import FOP, FROG, KFAC, KFROG, AdaFisher
    from fop.adafisher import additive_sizes
    from fop.distributed import cost_model
    from fop.distributed_rows import cost_model as rows_cost_model
    from fop.distributed_rows import gather_cost_model
    from fop_train.models import SmallCNN

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=timedelta(seconds=300))
    rank, world = args.rank, args.world
    hyper = dict(lr=0.01, momentum=0.9, damping=1e-2, kl_clip=1e-3, factor_interval=args.interval,
                 inverse_interval=args.interval)
    runs = {}
    rows = {"frog": lambda m: FROG(m, lr=0.01, momentum=0.9, sample_size=args.sample_size),
            "kfrog": lambda m: KFROG(m, lr=0.01, sample_size=args.sample_size),
            "adafisher": lambda m: AdaFisher(m, factor_interval=args.interval)}
    for name in args.optimizers.split(","):
        torch.manual_seed(0)
        model = SmallCNN(1, args.image, 10, width=args.width, hidden=args.hidden)
        ddp = DDP(model)
        counter = {"bytes": 0}
        ddp.register_comm_hook(None, _counting_allreduce_hook(counter))
        if name == "sgd":
            opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        elif name in rows:
            opt = rows[name](ddp)
        else:
            opt = (FOP if name == "fop" else KFAC)(ddp, **hyper)
        runs[name] = {"ddp": ddp, "opt": opt, "counter": counter, "times": [], "wchar": [], "ddp_bytes": [],
                      "opt_bytes": [], "cpu": []}
    gen = torch.Generator().manual_seed(100 + rank)
    data = [(torch.randn(args.batch, 1, args.image, args.image, generator=gen),
             torch.randint(0, 10, (args.batch,), generator=gen)) for _ in range(8)]

    def block(run, steps: int) -> tuple[float, int, int]:
        ddp, opt, counter = run["ddp"], run["opt"], run["counter"]
        counter["bytes"] = 0
        w0 = _wchar()
        c0 = time.process_time()
        t0 = time.perf_counter()
        for s in range(steps):
            x, y = data[s % len(data)]
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        elapsed = time.perf_counter() - t0
        run["cpu"].append((time.process_time() - c0) / steps)
        return elapsed / steps, (_wchar() - w0) / steps, counter["bytes"] / steps

    if "frog" in runs:  # per-sample sizes of what FROG would gather instead: each layer's input and output gradient
        run = runs["frog"]
        F.cross_entropy(run["ddp"](data[0][0]), data[0][1]).backward()
        capture = run["opt"].capture
        run["sample_numel"] = [r.a[0].numel() + r.dy[0].numel() for i in range(len(run["opt"].layers))
                               for r in capture.done(i)[:1]]
        run["opt"].zero_grad()
        capture.release()
        run["opt"]._arm()
    for run in runs.values():  # warm-up: first factor and inverse step, DDP's bucket rebuild
        block(run, 2)
    for _ in range(args.rounds):
        for name, run in runs.items():
            opt = run["opt"]
            before = dict(opt.comm.total_bytes) if name != "sgd" else {}
            t, w, b = block(run, args.steps)
            run["times"].append(t)
            run["wchar"].append(w)
            run["ddp_bytes"].append(b)
            if name != "sgd":
                after = opt.comm.total_bytes
                run["opt_bytes"].append({k: (after[k] - before.get(k, 0)) / args.steps for k in after})
    if rank == 0:
        out = {"world": world, "batch_per_rank": args.batch, "interval": args.interval, "steps": args.steps,
               "rounds": args.rounds, "torch": torch.__version__, "threads_per_rank": 1, "results": {}}
        sgd_t = statistics.median(runs["sgd"]["times"])
        for name, run in runs.items():
            t = statistics.median(run["times"])
            paired = sorted(a / b for a, b in zip(run["times"], runs["sgd"]["times"]))  # same round, same load
            res = {"step_s": t, "ratio_to_sgd": t / sgd_t, "paired_ratio_median": statistics.median(paired),
                   "paired_ratio_min": paired[0], "paired_ratio_max": paired[-1], "round_step_s": run["times"],
                   "cpu_step_s": statistics.median(run["cpu"][1:]),
                   "cpu_ratio_to_sgd": statistics.median(run["cpu"][1:]) / statistics.median(runs["sgd"]["cpu"][1:]),
                   "ddp_bytes_per_step": statistics.median(run["ddp_bytes"]),
                   "wchar_per_step": statistics.median(run["wchar"])}
            if name in rows:
                opt = run["opt"]
                kinds = sorted({k for d in run["opt_bytes"] for k in d})
                res["opt_bytes_per_step"] = {k: statistics.median(d.get(k, 0) for d in run["opt_bytes"])
                                             for k in kinds}
                res["opt_bytes_per_step"]["total"] = sum(res["opt_bytes_per_step"].values())
                kind = "adafisher" if name == "adafisher" else name
                fold = getattr(opt, "fold_bias", True)
                sizes = [additive_sizes(layer) for layer in opt.layers]
                plain = rows_cost_model(kind, opt.layers, world, fold_bias=fold, refresh=False, diagonal_sizes=sizes)
                refresh = rows_cost_model(kind, opt.layers, world, fold_bias=fold, refresh=True, diagonal_sizes=sizes)
                k = args.interval if name == "adafisher" else 1
                res["model_bytes_per_step"] = ((k - 1) * plain["total"] + refresh["total"]) / k
                res["model_parts"] = {"ordinary_step": plain, "refresh_step": refresh}
                if name == "frog":
                    res["gather_alternative_bytes_per_step"] = gather_cost_model(run["sample_numel"],
                                                                                 args.sample_size, world)
                res["layers"] = opt.preconditioned()
            elif name != "sgd":
                opt = run["opt"]
                kinds = sorted({k for d in run["opt_bytes"] for k in d})
                res["opt_bytes_per_step"] = {k: statistics.median(d.get(k, 0) for d in run["opt_bytes"])
                                             for k in kinds}
                res["opt_bytes_per_step"]["total"] = sum(res["opt_bytes_per_step"].values())
                plain = cost_model(opt.layers, world, half_batch=name == "fop", factor_step=False, inverse_step=False)
                curv = cost_model(opt.layers, world, half_batch=name == "fop", factor_step=True, inverse_step=True)
                res["model_bytes_per_step"] = ((args.interval - 1) * plain["total"] + curv["total"]) / args.interval
                res["model_parts"] = {"ordinary_step": plain, "factor_and_inverse_step": curv}
                owned = [i for i, r in enumerate(opt.comm.owners) if r == rank]
                dims = [layer.in_dim for layer in opt.layers] + [layer.out_dim for layer in opt.layers]
                res["rank0_broadcast_bytes_per_step"] = 4 * sum(dims[i] ** 2 + dims[i] for i in owned) / args.interval
                res["layers"] = opt.preconditioned()
            # what rank 0 writes to its sockets with W=2 (gloo): every all-reduce payload once (ring: 2(W-1)/W = 1),
            # the broadcasts it owns once, nothing for the broadcasts it receives
            wire = res["ddp_bytes_per_step"]
            if name in rows:  # all-reduces only
                wire += res["model_bytes_per_step"]
            elif name != "sgd":
                eigen = res["model_parts"]["factor_and_inverse_step"].get("eigen", 0) / args.interval
                wire += res["model_bytes_per_step"] - eigen + res["rank0_broadcast_bytes_per_step"]
            res["wire_model_rank0"] = wire if world == 2 else float("nan")
            out["results"][name] = res
        params = sum(p.numel() for p in runs["sgd"]["ddp"].parameters())
        out["params"] = params
        Path(args.out).write_text(json.dumps(out, indent=1))
    dist.destroy_process_group()


def _table(out: dict) -> str:
    sgd = out["results"]["sgd"]
    lines = [f"W={out['world']} gloo ranks (1 thread each), SmallCNN {out['params']} parameters, batch "
             f"{out['batch_per_rank']} per rank, factor = inverse interval {out['interval']}, "
             f"{out['rounds']} interleaved rounds x {out['steps']} steps",
             "",
             "| optimizer | step (ms) | x DDP+SGD: median of per-round ratios [min, max] | CPU time/step (ms), "
             "x DDP+SGD | DDP bytes/step | "
             "optimizer bytes/step (model) | (DDP + optimizer) "
             "/ DDP | rank-0 socket bytes/step: measured / model |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in out["results"].items():
        ob = r.get("opt_bytes_per_step", {}).get("total", 0)
        lines.append(f"| {name} | {1e3 * r['step_s']:.1f} | {r['paired_ratio_median']:.2f} "
                     f"[{r['paired_ratio_min']:.2f}, {r['paired_ratio_max']:.2f}] | {1e3 * r['cpu_step_s']:.1f}, "
                     f"{r['cpu_ratio_to_sgd']:.2f} | {r['ddp_bytes_per_step']:.0f} "
                     f"| {ob:.0f} ({r.get('model_bytes_per_step', 0):.0f}) | "
                     f"{(r['ddp_bytes_per_step'] + ob) / sgd['ddp_bytes_per_step']:.2f} | "
                     f"{r['wchar_per_step']:.0f} / {r['wire_model_rank0']:.0f} |")
    for name, r in out["results"].items():
        if "gather_alternative_bytes_per_step" in r:
            lines.append(f"\n{name}: gathering the sampled inputs and output gradients instead would hand "
                         f"{r['gather_alternative_bytes_per_step']:.0f} B/step to collectives, against "
                         f"{r['opt_bytes_per_step']['total']:.0f} for the summed row systems.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batch", type=int, default=128, help="samples per rank and step")
    p.add_argument("--image", type=int, default=16)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--interval", type=int, default=10, help="factor_interval = inverse_interval")
    p.add_argument("--steps", type=int, default=20, help="steps per optimizer and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--port", type=int, default=47651)
    p.add_argument("--optimizers", default="sgd,kfac,fop", help="comma-separated, sgd first: sgd, kfac, fop, frog, "
                   "kfrog, adafisher")
    p.add_argument("--sample-size", type=int, default=64, help="FROG's and K-FROG's s (per step, global batch)")
    p.add_argument("--out", default="bench/results/distributed.json")
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank is not None:
        _rank_main(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__] + sys.argv[1:]
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], env=env) for r in range(args.world)]
    codes = [p.wait(timeout=1800) for p in procs]
    if any(codes):
        sys.exit(f"ranks exited with {codes}")
    print(_table(json.loads(Path(args.out).read_text())))


if __name__ == "__main__":
    main()
