"""One command that validates and times every GPU path of fop_kernels and fop on a CUDA machine: `make gpu-check`.

    python3 bench/gpu_check.py [--budget-s 470] [--out DIR]      (DIR default: $FOP_GPU_CHECK_OUT or out/gpu-check)

Needs only the machine's own torch (>= 2.4) and triton (>= 3.2), no network and no venv. Parts, each stopped at
its time budget so that a partial run still reports (the report is rewritten after every part):
  build    the extension built in place against this torch, CUDA sources included (setup.py build_ext --inplace)
  tests    `pytest -m gpu tests` and the tests whose id names cuda (the device-parametrized ones), small sizes
  ops      every Triton and CUDA op against its reference, run in float64 on the same inputs, on ResNet-18 and
           GPT-2-small layer shapes in fp32/bf16/fp16, outputs poisoned with NaN first: ||out - ref|| / ||ref||
  sync     FOP and KFAC step() (plain and curvature steps) and their capture under
           torch.cuda.set_sync_debug_mode("error"): any host sync raises
  kernels  each kernel against its torch reference (CUDA events, median after warm-up) and against the device's
           measured copy bandwidth and matmul rate: achieved GB/s or TFLOP/s and the fraction of that roofline
  steps    FOP, KFAC, FROG, AdaFisher steps against SGD and AdamW: ResNet-18 on CIFAR shapes at batch 256 and
           1024, and a GPT-2-small-sized stack of 12 transformer blocks
Writes gpu-check.json and gpu-check.md (device, versions, date, every figure, the targets met or missed).
Without a CUDA device it stops before the first part, prints "no CUDA device: nothing to check" and the plan,
writes the report with that status and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = {  # name: (budget seconds, what it does)
    "build": (150, "build fop_kernels._C in place against this torch, CUDA sources included"),
    "tests": (60, "pytest -m gpu tests; pytest tests -k cuda (device-parametrized tests on cuda)"),
    "ops": (90, "every Triton/CUDA op vs its float64 reference, ResNet-18 and GPT-2-small shapes, fp32/bf16/fp16"),
    "sync": (25, "FOP/KFAC step() and capture under torch.cuda.set_sync_debug_mode('error')"),
    "kernels": (50, "kernel times vs torch (CUDA events) and vs measured copy bandwidth / matmul roofline"),
    "steps": (95, "FOP/KFAC/FROG/AdaFisher vs SGD/AdamW steps: ResNet-18 CIFAR batch 256/1024, GPT-2-small stack"),
}
TARGETS = [  # (key, what, threshold text)
    ("memory_bound", "memory-bound Triton kernels: achieved / measured copy bandwidth", ">= 0.80"),
    ("factor_gemm", "factor accumulation: rate / torch's GEMM rate on the same shape and precision", ">= 0.70"),
    ("factor_vs_reference", "factor accumulation: speed-up over its torch reference", ">= 1.5x"),
    ("eigh_vs_loop", "batched eigh (cuda backend): speed-up over the per-matrix torch.linalg.eigh loop", ">= 3x"),
    ("fop_vs_sgd", "FOP step / SGD step, ResNet-18 CIFAR, batch 1024 (mean over intervals)", "<= 1.3x"),
    ("host_syncs", "host syncs in an FOP/KFAC step (plain and curvature)", "0"),
]
MIN_TORCH, MIN_TRITON = (2, 4), (3, 2)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Budget:
    """A global deadline and one per part: a part stops starting new items once its own or the global time is up."""

    def __init__(self, total_s: float):
        self.start = time.monotonic()
        self.total = total_s
        self.part_end = self.start

    def begin(self, part_s: float) -> float:
        self.part_end = min(time.monotonic() + part_s, self.start + self.total)
        return self.left()

    def left(self) -> float:
        return max(0.0, self.part_end - time.monotonic())

    def over(self) -> bool:
        return self.left() <= 0.0


# ---- report -------------------------------------------------------------------------------------------------------


def environment() -> dict:
    """Versions and device, with nothing that needs CUDA to succeed."""
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "host": platform.node(), "cpus": os.cpu_count()}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        env["triton"] = f"not importable: {type(exc).__name__}: {exc}"
    env["cuda_available"] = bool(torch.cuda.is_available())
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update({"device": props.name, "capability": f"{props.major}.{props.minor}",
                    "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1)})
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip()
        except Exception as exc:  # noqa: BLE001
            env["nvidia_smi"] = f"unavailable: {exc}"
    problems = []
    if _version_tuple(torch.__version__) < MIN_TORCH:
        problems.append(f"torch {torch.__version__} is older than the supported {MIN_TORCH[0]}.{MIN_TORCH[1]}")
    if "not importable" not in env["triton"] and _version_tuple(env["triton"]) < MIN_TRITON:
        problems.append(f"triton {env['triton']} is older than the supported {MIN_TRITON[0]}.{MIN_TRITON[1]}")
    env["version_problems"] = problems
    return env


def evaluate_targets(report: dict) -> list[dict]:
    """Each target of TARGETS with its measured value(s) and 'met', 'missed' or 'not measured'."""
    parts = report.get("parts", {})
    kernels = parts.get("kernels", {}).get("results", [])
    out = []

    def row(key, values, ok):
        what, threshold = next((w, t) for k, w, t in TARGETS if k == key)
        status = "not measured" if not values else ("met" if ok else "missed")
        out.append({"target": key, "what": what, "threshold": threshold, "values": values, "status": status})

    mem = [(k["name"], k["fraction_of_copy_bw"]) for k in kernels if k.get("fraction_of_copy_bw") is not None
           and k.get("bound") == "memory" and k.get("backend") == "triton"]
    row("memory_bound", mem, all(v >= 0.8 for _, v in mem))
    gemm = [(k["name"], k["fraction_of_torch_gemm"]) for k in kernels if k.get("fraction_of_torch_gemm") is not None]
    row("factor_gemm", gemm, all(v >= 0.7 for _, v in gemm))
    fac = [(k["name"], k["speedup_vs_reference"]) for k in kernels if k["name"].startswith("accumulate_factor ")
           and k.get("speedup_vs_reference") is not None]
    row("factor_vs_reference", fac, all(v >= 1.5 for _, v in fac))
    eig = [(k["name"], k["speedup_vs_reference"]) for k in kernels if k["name"].startswith("eigh ")
           and k.get("speedup_vs_reference") is not None]
    row("eigh_vs_loop", eig, all(v >= 3.0 for _, v in eig))
    steps = parts.get("steps", {}).get("results", [])
    fop = [(f"{s['model']} batch {s['batch']}", s["mean_vs_sgd"]) for s in steps
           if s.get("optimizer") == "fop" and s.get("model") == "resnet18" and s.get("batch") == 1024
           and s.get("mean_vs_sgd") is not None]
    row("fop_vs_sgd", fop, all(v <= 1.3 for _, v in fop))
    sync = [(s["case"], s["syncs"]) for s in parts.get("sync", {}).get("results", []) if s.get("expect_none")]
    row("host_syncs", sync, all(v == 0 for _, v in sync))
    return out


def _md_table(rows: list[dict], cols: list[str]) -> list[str]:
    if not rows:
        return ["(none)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


MD_COLUMNS = {
    "tests": ["command", "status", "summary", "seconds"],
    "ops": ["op", "backend", "case", "dtype", "rel_error", "tolerance", "nan", "status"],
    "sync": ["case", "syncs", "expect_none", "status", "message"],
    "kernels": ["name", "backend", "dtype", "ms", "reference_ms", "speedup_vs_reference", "bound", "achieved",
                "fraction_of_copy_bw", "fraction_of_peak", "fraction_of_torch_gemm"],
    "steps": ["model", "batch", "optimizer", "median_ms", "mean_ms", "mean_vs_sgd", "status"],
}


def write_report(report: dict, out_dir: Path) -> None:
    """gpu-check.json and gpu-check.md under out_dir (rewritten after every part)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report["targets"] = evaluate_targets(report)
    (out_dir / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    env = report["environment"]
    md = [f"# fop-kernels GPU check: {report['status']}", "",
          f"Date {env['date']}; device {env.get('device', 'none')} (capability {env.get('capability', '-')}, "
          f"{env.get('sms', '-')} SMs, {env.get('memory_gib', '-')} GiB); python {env['python']}, torch "
          f"{env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}; nvidia-smi: "
          f"{env.get('nvidia_smi', '-')}.", ""]
    if env.get("version_problems"):
        md += ["Version problems: " + "; ".join(env["version_problems"]), ""]
    if report.get("roofline"):
        rf = report["roofline"]
        md += [f"Measured ceilings: copy {rf.get('copy_gbs', float('nan')):.0f} GB/s (read + write); matmul "
               + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in rf.items() if k.endswith("_tflops")), ""]
    md += ["## Targets", ""] + _md_table(
        [{**t, "values": ", ".join(f"{n}: {v:.3g}" if isinstance(v, float) else f"{n}: {v}" for n, v in t["values"])}
         for t in report["targets"]], ["what", "threshold", "status", "values"]) + [""]
    for name, part in report.get("parts", {}).items():
        md += [f"## {name}: {part['status']} ({part.get('seconds', 0):.0f} s)", ""]
        md += [f"- {n}" for n in part.get("notes", [])]
        if part.get("results") and name in MD_COLUMNS:
            md += [""] + _md_table(part["results"], MD_COLUMNS[name])
        md += [""]
    if report.get("plan"):
        md += ["## Plan", ""] + [f"- {p}" for p in report["plan"]]
    (out_dir / "gpu-check.md").write_text("\n".join(md) + "\n")


# ---- parts that need CUDA -----------------------------------------------------------------------------------------


def part_build(budget: Budget, part: dict) -> None:
    import torch

    major, minor = torch.cuda.get_device_capability()
    env = dict(os.environ, FOP_KERNELS_CUDA_ARCH_LIST=f"{major}.{minor}", MAX_JOBS=str(os.cpu_count() or 4))
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    part["notes"].append(f"command: FOP_KERNELS_CUDA_ARCH_LIST={major}.{minor} {' '.join(cmd[1:])}")
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget.left())
    except subprocess.TimeoutExpired as exc:
        part["status"] = "timed out"
        part["notes"].append(f"build stopped at the budget; last output: {_tail(exc.stdout)}")
        return
    if done.returncode != 0:
        part["status"] = "failed"
        part["notes"].append(f"exit {done.returncode}: {_tail(done.stdout + done.stderr, 3000)}")
        return
    import fop_kernels

    status = fop_kernels.available_backends()
    part["notes"] += [f"{b}: {s['available']} ({s['reason']})" for b, s in status.items()]
    part["status"] = "ok" if status["cuda"]["available"] and status["cpp"]["available"] else "failed"


def _tail(text, n: int = 800) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:].replace("\n", " | ")


def part_tests(budget: Budget, part: dict) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]))
    commands = [["-m", "gpu", "tests"], ["-m", "not slow and not gpu", "-k", "cuda", "tests"]]
    for args in commands:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *args]
        text = " ".join(["pytest", *cmd[3:]])
        if budget.over():
            part["results"].append({"command": text, "status": "not run (budget)"})
            continue
        t0 = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget.left())
            lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
            ok = done.returncode in (0, 5)  # 5: nothing selected
            part["results"].append({"command": text, "status": "ok" if ok else f"failed (exit {done.returncode})",
                                    "summary": lines[-1] if lines else "", "seconds": time.monotonic() - t0})
            if not ok:
                part["notes"].append(f"{text}: {_tail(done.stdout, 3000)}")
        except subprocess.TimeoutExpired as exc:
            part["results"].append({"command": text, "status": "timed out", "summary": _tail(exc.stdout, 300),
                                    "seconds": time.monotonic() - t0})
    statuses = [r["status"] for r in part["results"]]
    part["status"] = "ok" if all(s == "ok" for s in statuses) else "failed" if any(
        s.startswith("failed") for s in statuses) else "partial"


def resnet18_weight_shapes(num_classes: int = 10) -> list[tuple[int, int]]:
    """(out, in*kh*kw) of the Conv2d/Linear weights of the CIFAR ResNet-18 (fop_train.models.resnet18, width 64)."""
    shapes = [(64, 27)] + [(64, 576)] * 4
    for c_in, c_out in ((64, 128), (128, 256), (256, 512)):
        shapes += [(c_out, c_in * 9), (c_out, c_out * 9), (c_out, c_in), (c_out, c_out * 9), (c_out, c_out * 9)]
    return shapes + [(num_classes, 512)]


def gpt2_weight_shapes(layers: int = 12, dim: int = 768) -> list[tuple[int, int]]:
    """(out, in) of the Linear weights of a GPT-2-small block stack: qkv, proj, fc1, fc2 per block."""
    return [(3 * dim, dim), (dim, dim), (4 * dim, dim), (dim, 4 * dim)] * layers


# ResNet-18 CIFAR conv inputs at batch 256 (N, C, H, W, kernel, stride, padding), and dense layer inputs (rows, d)
CONV_CASES = [(256, 3, 32, 32, 3, 1, 1), (256, 64, 32, 32, 3, 1, 1), (256, 128, 16, 16, 3, 2, 1),
              (256, 256, 8, 8, 3, 1, 1), (256, 512, 4, 4, 3, 1, 1)]
DENSE_CASES = [("resnet18 fc", 256, 513), ("gpt2 qkv/fc1 input", 4096, 769), ("gpt2 fc2 input", 4096, 3073)]
SMALL_DENSE, SMALL_CONV = [("tiny", 33, 20)], [(2, 3, 6, 6, 3, 1, 1), (2, 4, 5, 5, 3, 2, 1)]
DTYPES = ("fp32", "bf16", "fp16")
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 2e-3}


def _dt(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[name]


def rel_error(out, ref) -> tuple[float, int]:
    """(||out - ref||_F / ||ref||_F in float64, number of NaN in out)."""
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-300)), int(o.isnan().sum())


def poison_allocator(nbytes: int, device: str = "cuda") -> None:
    """Hand NaN-filled blocks back to the caching allocator, so that outputs the op allocates start as NaN."""
    import torch

    blocks = [torch.full((max(1, nbytes // 4),), float("nan"), device=device) for _ in range(2)]
    del blocks


def check_case(results: list, op: str, backend: str, case: str, dtype: str, fast, reference, tol: float) -> None:
    """Run `fast()` and `reference()` (each returns a list of tensors) and record the worst relative error."""
    entry = {"op": op, "backend": backend, "case": case, "dtype": dtype, "tolerance": tol}
    try:
        outs, refs = fast(), reference()
        errs = [rel_error(o, r) for o, r in zip(outs, refs, strict=True)]
        entry["rel_error"] = max(e for e, _ in errs)
        entry["nan"] = sum(n for _, n in errs)
        ok = entry["nan"] == 0 and entry["rel_error"] <= tol and not math.isnan(entry["rel_error"])
        entry["status"] = "ok" if ok else "FAILED"
    except Exception as exc:  # noqa: BLE001 - one failing op must not stop the others
        entry.update({"status": "FAILED", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    results.append(entry)


def _op_cases(device: str, fast_backend: str = "triton", eigh_backend: str = "cuda", small: bool = False):
    """(op, backend, case, dtype, fast, reference, tolerance) for every Triton and CUDA op (generator: inputs are
    built lazily, one case at a time). `small`: tiny shapes, for testing this harness on CPU with other backends."""
    import torch

    import fop_kernels
    from fop_kernels import reference as ref

    decay = 0.05
    for dname in DTYPES:
        dt = _dt(dname)
        for label, n, d in (SMALL_DENSE if small else DENSE_CASES):
            X = torch.randn(n, d, device=device).to(dt)
            F0 = torch.randn(d, d, device=device)
            F0 = F0 + F0.T

            def dense(X=X, F0=F0, n=n):
                F = torch.full_like(F0, float("nan"))  # decay 1: every element must be written
                fop_kernels.accumulate_factor(F, X, 1.0, 1.0 / n, check_finite=False, backend=fast_backend)
                G = F0.clone()
                fop_kernels.accumulate_factor(G, X, decay, 1.0 / n, check_finite=False, backend=fast_backend)
                return [F, G]

            def dense_ref(X=X, F0=F0, n=n):
                return [ref.accumulate_factor(torch.zeros_like(F0, dtype=torch.float64), X.double(), 1.0, 1.0 / n),
                        ref.accumulate_factor(F0.double(), X.double(), decay, 1.0 / n)]

            yield "accumulate_factor", fast_backend, f"{label} X {n}x{d}", dname, dense, dense_ref, 1e-4

            def diag(X=X, n=n, d=d):
                f = torch.full((d,), float("nan"), device=device)
                fop_kernels.accumulate_factor_diag(f, X, 1.0, 1.0 / n, check_finite=False, backend=fast_backend)
                return [f]

            yield ("accumulate_factor_diag", fast_backend, f"{label} X {n}x{d}", dname, diag,
                   lambda X=X, n=n, d=d: [ref.accumulate_factor_diag(torch.zeros(d, dtype=torch.float64,
                                                                                 device=device), X.double(), 1.0,
                                                                     1.0 / n)], 1e-4)
        for N, C, H, W, k, s, p in (SMALL_CONV if small else CONV_CASES):
            x = torch.randn(N, C, H, W, device=device).to(dt)
            dim = C * k * k + 1
            label = f"resnet18 conv x=({N},{C},{H},{W}) k{k} s{s}"

            def conv(x=x, dim=dim, k=k, s=s, p=p, N=N):
                F = torch.full((dim, dim), float("nan"), device=device)
                fop_kernels.accumulate_conv_factor(F, x, 1.0, k, s, p, 1, True, 1.0 / N, check_finite=False,
                                                   backend=fast_backend)
                f = torch.full((dim,), float("nan"), device=device)
                fop_kernels.accumulate_conv_factor_diag(f, x, 1.0, k, s, p, 1, True, 1.0 / N, check_finite=False,
                                                        backend=fast_backend)
                return [F, f]

            def conv_ref(x=x, dim=dim, k=k, s=s, p=p, N=N):
                z = torch.zeros(dim, dim, dtype=torch.float64, device=device)
                zf = torch.zeros(dim, dtype=torch.float64, device=device)
                return [ref.accumulate_conv_factor(z, x.double(), 1.0, k, s, p, 1, True, 1.0 / N),
                        ref.accumulate_conv_factor_diag(zf, x.double(), 1.0, k, s, p, 1, True, 1.0 / N)]

            yield "accumulate_conv_factor(+diag)", fast_backend, label, dname, conv, conv_ref, 1e-4
        layer_sets = [("resnet18 layer set", resnet18_weight_shapes()),
                      ("gpt2-small 12-layer set", gpt2_weight_shapes())]
        for label, shapes in ([("tiny layer set", [(8, 27), (10, 16)])] if small else layer_sets):
            A = [torch.randn(sh, device=device).to(dt) for sh in shapes]
            D = [torch.randn(sh, device=device).to(dt) for sh in shapes]
            lG = [torch.rand(sh[0], device=device) for sh in shapes]
            lA = [torch.rand(sh[1], device=device) for sh in shapes]
            for mode in ("eigen", "factored"):
                def sums(A=A, D=D, lG=lG, lA=lA, mode=mode):
                    poison_allocator(4096, device)
                    return [fop_kernels.fisher_inner_products(A, D, lG, lA, 1e-3, mode, backend=fast_backend)]

                def sums_ref(A=A, D=D, lG=lG, lA=lA, mode=mode):
                    return [ref.fisher_inner_products([a.double() for a in A], [d.double() for d in D],
                                                      [g.double() for g in lG], [a.double() for a in lA], 1e-3,
                                                      mode)]

                yield "fisher_inner_products", fast_backend, f"{label} {mode}", dname, sums, sums_ref, 1e-4

                def combine(A=A, D=D, lG=lG, lA=lA, mode=mode):
                    s = ref.fisher_inner_products(A, D, lG, lA, 1e-3, mode)
                    poison_allocator(max(a.numel() for a in A) * 4, device)
                    U, scalars = fop_kernels.project_combine(A, D, s, lG, lA, 1e-3, mode, backend=fast_backend)
                    return [*U, scalars]

                def combine_ref(A=A, D=D, lG=lG, lA=lA, mode=mode):
                    s = ref.fisher_inner_products(A, D, lG, lA, 1e-3, mode)
                    U, scalars = ref.project_combine([a.double() for a in A], [d.double() for d in D], s.double(),
                                                     [g.double() for g in lG], [a.double() for a in lA], 1e-3, mode)
                    return [*U, scalars]

                # the output U~ is rounded to A~'s dtype: the tolerance is that dtype's
                yield ("project_combine", fast_backend, f"{label} {mode}", dname, combine, combine_ref,
                       TOLERANCE[dname])
            del A, D
        for R, Dm, s_, iters in ([(6, 40, 5, 3)] if small else [(512, 4608, 64, 10), (768, 3072, 32, 4)]):
            X_s, w, B = (torch.randn(s_, Dm, device=device).to(dt), torch.rand(s_, R, device=device),
                         torch.randn(R, Dm, device=device).to(dt))
            yield ("batched_cg", fast_backend, f"R={R} D={Dm} s={s_} iters={iters}", dname,
                   lambda X_s=X_s, w=w, B=B, iters=iters: [fop_kernels.batched_cg(X_s, w, B, 1e-3, iters=iters,
                                                                                   backend=fast_backend)[0]],
                   lambda X_s=X_s, w=w, B=B, iters=iters: [ref.batched_cg(X_s.double(), w.double(), B.double(),
                                                                           1e-3, iters=iters)[0]],
                   max(1e-3, TOLERANCE[dname]))
    for dname in ("fp32", "fp64"):
        dt = _dt(dname)
        tol = 1e-3 if dname == "fp32" else 1e-9
        eigh_sets = [("resnet18 factor set", [28, 64, 128, 256, 512, 513, 577, 1153, 2305, 4609]),
                     ("200 x 64", [64] * 200), ("gpt2-small factor set", [769, 3073, 768, 2304, 3072])]
        for label, sizes in ([("tiny set", [3, 8, 8, 17])] if small else eigh_sets):
            mats = []
            for n in sizes:
                Xm = torch.randn(2 * n, n, device=device, dtype=torch.float64)
                mats.append((Xm.T @ Xm / (2 * n)).to(dt))

            def eig(mats=mats):
                poison_allocator(max(m.numel() for m in mats) * 8, device)
                evals, evecs = fop_kernels.eigh(mats, backend=eigh_backend)
                # reconstruction M ~ Q diag(l) Q^T per matrix: compared with M itself (relative Frobenius error)
                inverses = fop_kernels.damped_inverse(mats, 1e-3, backend=eigh_backend)
                return [(q * l) @ q.T for l, q in zip(evals, evecs)] + inverses

            def eig_ref(mats=mats):
                inv = ref.damped_inverse([m.double() for m in mats], 1e-3)
                return [m.double() for m in mats] + inv

            yield "eigh + damped_inverse", eigh_backend, label, dname, eig, eig_ref, tol


def part_ops(budget: Budget, part: dict) -> None:
    import torch

    torch.manual_seed(0)
    cases = _op_cases("cuda")
    for op, backend, case, dtype, fast, reference, tol in cases:
        if budget.over():
            part["notes"].append(f"stopped at the budget before {op} {case} {dtype} and the cases after it")
            part["status"] = "partial"
            break
        check_case(part["results"], op, backend, case, dtype, fast, reference, tol)
        r = part["results"][-1]
        log(f"ops: {op} [{backend}] {case} {dtype}: {r['status']} rel {r.get('rel_error', float('nan')):.2e}")
        torch.cuda.empty_cache()
    else:
        part["status"] = "ok"
    unsupported = []
    import fop_kernels

    for dname in ("bf16", "fp16"):
        try:
            fop_kernels.eigh([torch.eye(4, device="cuda", dtype=_dt(dname))])
            unsupported.append(f"eigh accepted {dname} (expected a TypeError)")
        except (TypeError, ValueError) as exc:
            part["notes"].append(f"eigh/damped_inverse take fp32/fp64 only; {dname} raises: {str(exc)[:120]}")
    part["notes"] += unsupported
    if any(r["status"] != "ok" for r in part["results"]) or unsupported:
        part["status"] = "failed"


def _sync_count(fn) -> tuple[int, str]:
    """(1, message) when fn makes a synchronizing CUDA call under set_sync_debug_mode('error'), else (0, '')."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return 0, ""
    except RuntimeError as exc:
        return 1, str(exc).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _sync_config(part: dict, name: str, cls, extra: dict, check_finite: bool, device: str = "cuda",
                 size: tuple[int, int, int] = (64, 16, 32)) -> None:
    """Warm up one optimizer on a ResNet-18 (size: batch 64, width 16, 32 x 32 images), then count syncs in its
    capture and step() on a plain and on a curvature step."""
    import torch
    import torch.nn.functional as F
    from fop_train.models import resnet18

    torch.manual_seed(0)
    batch, width, image = size
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    model = resnet18(width=width).to(device)
    opt = cls(model, lr=0.01, damping=1e-2, factor_interval=2, inverse_interval=2, check_finite=check_finite,
              **extra)

    def backward():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()

    for _ in range(4):  # warm-up: kernels compiled, buffers allocated, curvature steps done
        backward()
        opt.step()
    label = f"{name} check_finite={check_finite}"
    for step_kind in ("plain", "curvature"):
        while opt.is_factor_step() != (step_kind == "curvature"):
            backward()
            opt.step()
        for what, fn in ((f"capture (forward+backward, {step_kind} step)", backward), (f"step() ({step_kind})",
                                                                                        opt.step)):
            n, msg = _sync_count(fn)
            part["results"].append({"case": f"{label} {what}", "syncs": n, "expect_none": not check_finite,
                                    "message": msg, "status": "ok" if n == 0 or check_finite else "FAILED"})
            log(f"sync: {label} {what}: {n} sync(s) {msg}")


def part_sync(budget: Budget, part: dict) -> None:
    from fop import FOP, KFAC

    configs = [("fop", FOP, {}), ("kfac", KFAC, {}),
               ("fop cholesky", FOP, {"damping_mode": "factored", "inverse_method": "cholesky"})]
    for name, cls, extra in configs:
        for check_finite in (False, True):
            if budget.over():
                part["notes"].append(f"stopped at the budget before {name} check_finite={check_finite}")
                part["status"] = "partial"
                return
            _sync_config(part, name, cls, extra, check_finite)
    part["notes"].append("check_finite=True checks gradients for NaN/inf before changing anything; a sync there is "
                         "reported, not counted against the zero-sync target")
    part["status"] = "failed" if any(r["status"] != "ok" for r in part["results"]) else "ok"


def cuda_time_ms(fn, warmup: int = 3, reps: int = 15) -> float:
    """Median of `reps` CUDA-event timings of fn() after `warmup` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def roofline_fractions(ms: float, nbytes: float, flops: float, copy_gbs: float, peak_tflops: float) -> dict:
    """Achieved GB/s and TFLOP/s at time ms, and the fraction of the roofline floor max(bytes/bw, flops/peak)."""
    sec = ms / 1e3
    gbs, tflops = nbytes / sec / 1e9, flops / sec / 1e12
    floor = max(nbytes / (copy_gbs * 1e9), flops / (peak_tflops * 1e12) if peak_tflops else 0.0)
    bound = "memory" if nbytes / (copy_gbs * 1e9) >= (flops / (peak_tflops * 1e12) if peak_tflops else 0.0) \
        else "compute"
    return {"gbs": gbs, "tflops": tflops, "bound": bound, "fraction_of_peak": floor / sec,
            "fraction_of_copy_bw": gbs / copy_gbs if bound == "memory" else None,
            "achieved": f"{gbs:.0f} GB/s" if bound == "memory" else f"{tflops:.1f} TFLOP/s"}


def _copy_gbs() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting the bytes read and written."""
    import torch

    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, reps=10)
    return 2 * src.numel() * 4 / (ms / 1e3) / 1e9


def measure_roofline(report: dict) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and matmul rates, measured once."""
    import torch

    rf = {"copy_gbs": _copy_gbs()}
    n = 8192
    for name, dt, tf32 in (("bf16_tflops", torch.bfloat16, False), ("fp16_tflops", torch.float16, False),
                           ("fp32_ieee_tflops", torch.float32, False), ("fp32_tf32_tflops", torch.float32, True)):
        a, b = torch.randn(n, n, device="cuda").to(dt), torch.randn(n, n, device="cuda").to(dt)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            ms = cuda_time_ms(lambda a=a, b=b: a @ b, warmup=3, reps=10)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        rf[name] = 2 * n**3 / (ms / 1e3) / 1e12
    report["roofline"] = rf
    log("roofline: " + ", ".join(f"{k} {v:.0f}" for k, v in rf.items()))
    return rf


def _factor_kernels(dname: str, dev: dict):
    """Dense, diagonal and conv factor accumulation on GPT-2's widest input (4096 x 3073) and a ResNet-18 conv."""
    import torch

    import fop_kernels
    from fop_kernels import reference as ref
    from fop_kernels.reference.factor import conv_patches

    dt = _dt(dname)
    esize = torch.finfo(dt).bits // 8
    n, d = (40, 33) if dev["small"] else (4096, 3073)
    X = torch.randn(n, d, device=dev["device"]).to(dt)
    F = torch.randn(d, d, device=dev["device"])
    f = torch.randn(d, device=dev["device"])
    yield (f"accumulate_factor X {n}x{d}", dev["fast"], dname,
           lambda: fop_kernels.accumulate_factor(F, X, 0.05, 1 / n, check_finite=False, backend=dev["fast"]),
           lambda: ref.accumulate_factor(F, X, 0.05, 1 / n), n * d * esize + 2 * d * d * 4, 2.0 * n * d * d,
           lambda: torch.mm(X.T, X))
    yield (f"accumulate_factor_diag X {n}x{d}", dev["fast"], dname,
           lambda: fop_kernels.accumulate_factor_diag(f, X, 0.05, 1 / n, check_finite=False, backend=dev["fast"]),
           lambda: ref.accumulate_factor_diag(f, X, 0.05, 1 / n), n * d * esize + 2 * d * 4, 2.0 * n * d, None)
    N, C, H, k = (2, 3, 5, 3) if dev["small"] else (256, 128, 16, 3)
    x = torch.randn(N, C, H, H, device=dev["device"]).to(dt)
    dim = C * k * k + 1
    Fc = torch.randn(dim, dim, device=dev["device"])

    def patches_gemm():
        P = conv_patches(x, k, 1, 1, 1, True)
        return torch.mm(P.T, P)

    yield (f"accumulate_conv_factor x=({N},{C},{H},{H}) k3", dev["fast"], dname,
           lambda: fop_kernels.accumulate_conv_factor(Fc, x, 0.05, k, 1, 1, 1, True, 1 / N, check_finite=False,
                                                      backend=dev["fast"]),
           lambda: ref.accumulate_conv_factor(Fc, x, 0.05, k, 1, 1, 1, True, 1 / N),
           x.numel() * esize + 2 * dim * dim * 4, 2.0 * N * H * H * dim * dim, patches_gemm)


def _fisher_kernels(dname: str, dev: dict):
    """Fisher sums and projection-and-combine on the GPT-2-small layer set (85M elements per tensor)."""
    import torch

    import fop_kernels
    from fop_kernels import reference as ref

    dt = _dt(dname)
    esize = torch.finfo(dt).bits // 8
    shapes = gpt2_weight_shapes(layers=1, dim=8) if dev["small"] else gpt2_weight_shapes()
    A = [torch.randn(s, device=dev["device"]).to(dt) for s in shapes]
    D = [torch.randn(s, device=dev["device"]).to(dt) for s in shapes]
    lG = [torch.rand(s[0], device=dev["device"]) for s in shapes]
    lA = [torch.rand(s[1], device=dev["device"]) for s in shapes]
    elems = sum(a.numel() for a in A)
    sums = ref.fisher_inner_products(A, D, lG, lA, 1e-3)
    yield ("fisher_inner_products gpt2-small set", dev["fast"], dname,
           lambda: fop_kernels.fisher_inner_products(A, D, lG, lA, 1e-3, backend=dev["fast"]),
           lambda: ref.fisher_inner_products(A, D, lG, lA, 1e-3), 2 * elems * esize, 12.0 * elems, None)
    yield ("project_combine gpt2-small set", dev["fast"], dname,
           lambda: fop_kernels.project_combine(A, D, sums, lG, lA, 1e-3, backend=dev["fast"]),
           lambda: ref.project_combine(A, D, sums, lG, lA, 1e-3), 3 * elems * esize, 8.0 * elems, None)


def _cg_kernels(dname: str, dev: dict):
    """FROG's batched CG at the GPU target size: per iteration two GEMMs (4 s R D flops) and about 7 passes over
    the R x D rows (fp32 working copies)."""
    import torch

    import fop_kernels
    from fop_kernels import reference as ref

    R, Dm, s, iters = (6, 40, 5, 3) if dev["small"] else (512, 4608, 64, 10)
    X_s = torch.randn(s, Dm, device=dev["device"]).to(_dt(dname))
    w, B = torch.rand(s, R, device=dev["device"]), torch.randn(R, Dm, device=dev["device"]).to(_dt(dname))
    yield (f"batched_cg R={R} D={Dm} s={s} iters={iters}", dev["fast"], dname,
           lambda: fop_kernels.batched_cg(X_s, w, B, 1e-3, iters=iters, backend=dev["fast"]),
           lambda: ref.batched_cg(X_s, w, B, 1e-3, iters=iters), iters * 7.0 * R * Dm * 4,
           iters * 4.0 * s * R * Dm, None)


def _eigh_kernels(label: str, sizes: list[int], dev: dict):
    """The cuSOLVER eigh against the per-matrix torch.linalg.eigh loop (about 9 n^3 flops per matrix)."""
    import torch

    import fop_kernels

    mats = []
    for n in sizes:
        Xm = torch.randn(2 * n, n, device=dev["device"])
        mats.append(Xm.T @ Xm / (2 * n))
    yield (f"eigh {label}", dev["eigh"], "fp32", lambda: fop_kernels.eigh(mats, backend=dev["eigh"]),
           lambda: [torch.linalg.eigh(m) for m in mats], sum(m.numel() for m in mats) * 4 * 3,
           sum(9.0 * m.shape[0] ** 3 for m in mats), None)


def _kernel_cases(device: str = "cuda", fast_backend: str = "triton", eigh_backend: str = "cuda",
                  small: bool = False):
    """(name, backend, dtype, fast, reference, bytes, flops, gemm) per kernel on one realistic shape and dtype;
    gemm: the torch.mm that computes the same product at the same precision (factor accumulation), or None.
    `small` and the other arguments: tiny shapes and CPU backends, for testing the cases on CPU."""
    dev = {"device": device, "fast": fast_backend, "eigh": eigh_backend, "small": small}
    for dname in ("fp32", "bf16"):
        yield from _factor_kernels(dname, dev)
        yield from _fisher_kernels(dname, dev)
        yield from _cg_kernels(dname, dev)
    yield from _eigh_kernels("200 x 64", [8 if small else 64] * (20 if small else 200), dev)
    yield from _eigh_kernels("resnet18 factor set", [3, 10, 17] if small else [28, 64, 128, 256, 512, 513, 577, 1153,
                                                                                2305, 4609], dev)


def part_kernels(budget: Budget, part: dict, report: dict) -> None:
    import torch

    torch.manual_seed(0)
    rf = measure_roofline(report)
    peak = {"fp32": rf["fp32_ieee_tflops"], "bf16": rf["bf16_tflops"]}
    for name, backend, dname, fast, reference, nbytes, flops, gemm in _kernel_cases():
        if budget.over():
            part["notes"].append(f"stopped at the budget before {name} {dname} and the kernels after it")
            part["status"] = "partial"
            break
        entry = {"name": name, "backend": backend, "dtype": dname}
        try:
            entry["ms"] = cuda_time_ms(fast)
            entry["reference_ms"] = cuda_time_ms(reference, warmup=1, reps=5)
            entry["speedup_vs_reference"] = entry["reference_ms"] / entry["ms"]
            entry.update(roofline_fractions(entry["ms"], nbytes, flops, rf["copy_gbs"], peak[dname]))
            if gemm is not None:
                old = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = False  # the Triton fp32 path is IEEE fp32, not tf32
                try:
                    entry["torch_gemm_ms"] = cuda_time_ms(gemm, warmup=2, reps=5)
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = old
                entry["fraction_of_torch_gemm"] = entry["torch_gemm_ms"] / entry["ms"]
            entry["status"] = "ok"
        except Exception as exc:  # noqa: BLE001
            entry.update({"status": "FAILED", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        part["results"].append(entry)
        log(f"kernels: {name} {dname}: {entry.get('ms', float('nan')):.3f} ms, reference "
            f"{entry.get('reference_ms', float('nan')):.3f} ms, {entry.get('achieved', '')}")
        torch.cuda.empty_cache()
    else:
        part["status"] = "ok"
    part["notes"].append("reference = the package's pure-torch reference (eigh: the per-matrix torch.linalg.eigh "
                         "loop); bytes = inputs read once + outputs written once; the accumulate_conv_factor "
                         "GEMM row materializes the patches (unfold) before torch.mm, timed together")
    if any(r["status"] != "ok" for r in part["results"]):
        part["status"] = "failed"


def gpt2_stack(layers: int = 12, dim: int = 768, heads: int = 12, classes: int = 1024):
    """A GPT-2-small-sized stack: `layers` pre-norm blocks (fop_train.models' transformer block: Linear qkv, proj,
    fc1, fc2) on (batch, tokens, dim) inputs, a LayerNorm and a Linear head per token."""
    from fop_train.models import _Block
    from torch import nn

    return nn.Sequential(*[_Block(dim, heads, 4) for _ in range(layers)], nn.LayerNorm(dim), nn.Linear(dim, classes))


def _make_optimizer(name: str, model):
    import torch
    from fop import FOP, FROG, KFAC, AdaFisher

    curvature = dict(lr=0.01, damping=1e-2, factor_interval=10, inverse_interval=10, check_finite=False)
    return {"sgd": lambda: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
            "adamw": lambda: torch.optim.AdamW(model.parameters(), lr=1e-3),
            "kfac": lambda: KFAC(model, **curvature),
            "fop": lambda: FOP(model, **curvature),
            "frog": lambda: FROG(model, lr=0.01, check_finite=False),
            "adafisher": lambda: AdaFisher(model, lr=1e-3, factor_interval=10, check_finite=False)}[name]()


STEPS = 20  # two factor/inverse intervals of 10


def _time_optimizer(name: str, base, x, y) -> dict:
    """Median and mean of STEPS full steps (zero_grad, forward, backward, step) after 3 warm-up steps."""
    import torch
    import torch.nn.functional as F

    model = copy.deepcopy(base)
    opt = _make_optimizer(name, model)

    def step():
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    events = []
    for _ in range(STEPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    ms = [s.elapsed_time(e) for s, e in events]
    return {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "status": "ok"}


def _step_inputs(model_name: str, batch: int):
    import torch
    from fop_train.models import resnet18

    torch.manual_seed(0)
    if model_name == "resnet18":
        return (resnet18().cuda(), torch.randn(batch, 3, 32, 32, device="cuda"),
                torch.randint(0, 10, (batch,), device="cuda"))
    return (gpt2_stack().cuda(), torch.randn(batch, 512, 768, device="cuda"),
            torch.randint(0, 1024, (batch, 512), device="cuda"))


def part_steps(budget: Budget, part: dict) -> None:
    import torch

    configs = [("resnet18", 256), ("resnet18", 1024), ("gpt2-small stack", 8)]
    names = ("sgd", "adamw", "kfac", "fop", "frog", "adafisher")
    for model_name, batch in configs:
        base, x, y = _step_inputs(model_name, batch)
        sgd_mean = None
        for name in names:
            if budget.over():
                part["notes"].append(f"stopped at the budget before {model_name} batch {batch} {name}")
                part["status"] = "partial"
                return
            entry = {"model": model_name, "batch": batch, "optimizer": name}
            try:
                entry.update(_time_optimizer(name, base, x, y))
                if name == "sgd":
                    sgd_mean = entry["mean_ms"]
                if sgd_mean:
                    entry["mean_vs_sgd"] = entry["mean_ms"] / sgd_mean
            except Exception as exc:  # noqa: BLE001
                entry.update({"status": "FAILED", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            part["results"].append(entry)
            log(f"steps: {model_name} batch {batch} {name}: median {entry.get('median_ms', float('nan')):.1f} ms, "
                f"mean {entry.get('mean_ms', float('nan')):.1f} ms, x SGD {entry.get('mean_vs_sgd', float('nan')):.2f}")
            torch.cuda.empty_cache()
    part["notes"].append(f"{STEPS} timed steps after 3 warm-up steps, fp32, factor/inverse interval 10 (KFAC, FOP), "
                         "AdaFisher factor interval 10, FROG defaults; mean = over whole intervals, curvature steps "
                         "included; GPT-2 stack: batch 8 x 512 tokens, d 768, 12 heads, 1024-way head")
    part["status"] = "failed" if any(r["status"] != "ok" for r in part["results"]) else "ok"


# ---- driver -------------------------------------------------------------------------------------------------------


def plan_lines() -> list[str]:
    return [f"{name} ({budget} s): {what}" for name, (budget, what) in PARTS.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("FOP_GPU_CHECK_OUT", "out/gpu-check"))
    p.add_argument("--budget-s", type=float, default=470.0, help="the whole run's time budget (default 470 s)")
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated parts to run (default: all)")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; parts: {list(PARTS)}")
    sys.path[:0] = [str(ROOT), str(ROOT / "python")]
    budget = Budget(args.budget_s)
    env = environment()
    report = {"status": "running", "environment": env, "parts": {}, "plan": plan_lines()}
    log(f"torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, python {env['python']}")
    for problem in env["version_problems"]:
        log(f"warning: {problem}")
    if not env["cuda_available"]:
        report["status"] = "no CUDA device: nothing to check"
        write_report(report, out_dir)
        print("no CUDA device: nothing to check")
        print("On a CUDA machine this command would run:")
        for line in plan_lines():
            print(f"  - {line}")
        print(f"report: {out_dir / 'gpu-check.md'}")
        return 0
    log(f"device {env['device']} (capability {env['capability']}); report in {out_dir}")
    runners = {"build": part_build, "tests": part_tests, "ops": part_ops, "sync": part_sync,
               "kernels": lambda b, pt: part_kernels(b, pt, report), "steps": part_steps}
    for name in only:
        part = {"status": "running", "results": [], "notes": []}
        report["parts"][name] = part
        left = budget.begin(PARTS[name][0])
        log(f"part {name}: {PARTS[name][1]} (budget {left:.0f} s)")
        t0 = time.monotonic()
        if left <= 0:
            part["status"] = "not run (global budget spent)"
        else:
            try:
                runners[name](budget, part)
            except Exception as exc:  # noqa: BLE001 - the report must still be written
                part["status"] = "failed"
                part["notes"].append(f"{type(exc).__name__}: {str(exc)[:500]}")
        part["seconds"] = time.monotonic() - t0
        log(f"part {name}: {part['status']} in {part['seconds']:.0f} s")
        write_report(report, out_dir)
    statuses = [p["status"] for p in report["parts"].values()]
    report["status"] = "ok" if all(s == "ok" for s in statuses) else "problems: " + ", ".join(
        f"{n} {p['status']}" for n, p in report["parts"].items() if p["status"] != "ok")
    write_report(report, out_dir)
    for t in report["targets"]:
        log(f"target {t['target']}: {t['status']} ({t['threshold']})")
    log(f"done: {report['status']}; {out_dir / 'gpu-check.md'}")
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
