"""The one timing helper of the microbenchmarks: every row of a group goes through `timed`.

A group is one op on one shape and dtype. Its rows are of three kinds, run in this order within the group (the
collection order is fixed by bench/micro/conftest.py):
  reference  the package's pure-torch reference (fop_kernels.reference), the specification;
  torch      a plain-torch alternative (what a user would write instead: a batched call, an in-place BLAS form);
  fast       a backend of the package (cpp; triton/cuda when the benchmarks run on a GPU).
Each row stores its median (pytest-benchmark) and, in extra_info, its ratios: `ratio_vs_reference` =
t_reference / t_row and `ratio_vs_best_torch` = t_best_torch_alternative / t_row (> 1: this row is faster);
fast rows also the median of back-to-back ratios against the reference (`speedup_interleaved`, with p20/p80),
the robust figure on a shared CPU. `FOP_BENCH_SMOKE=1` (`make bench-smoke`): tiny shapes, one round, no warm-up.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import torch

KINDS = ("reference", "torch", "fast")


def smoke() -> bool:
    """True for the CI run: tiny shapes, one round (FOP_BENCH_SMOKE=1)."""
    return os.environ.get("FOP_BENCH_SMOKE", "0") == "1"


def short(dtype: torch.dtype) -> str:
    """fp32, bf16, ... for torch.float32, torch.bfloat16, ..."""
    return {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def pick(full, tiny):
    """The full-size cases, or the tiny ones in smoke mode."""
    return tiny if smoke() else full


@dataclass
class Row:
    module: str
    op: str
    shape: str
    dtype: str
    impl: str
    kind: str
    median: float
    ratios: dict[str, float] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return f"{self.op} {self.shape} {self.dtype}"


ROWS: list[Row] = []


def interleaved_speedup(reference, fast, pairs: int = 9) -> tuple[float, float, float]:
    """(median, p20, p80) over `pairs` of t_reference / t_fast, the two timed back to back."""
    reference(), fast()
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        reference()
        t1 = time.perf_counter()
        fast()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    ratios.sort()
    return statistics.median(ratios), ratios[int(0.2 * (pairs - 1))], ratios[int(round(0.8 * (pairs - 1)))]


def timed(benchmark, *, op: str, shape: str, dtype: str, impl: str, kind: str, fn, rounds: int, reference=None,
          pairs: int = 9, info: dict | None = None) -> Row:
    """Time `fn` as row `impl` of the group (op, shape, dtype); ratios against the rows of the group timed before
    it (see the module docstring). `reference`: the reference callable, for the interleaved ratio of fast rows."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    tiny = smoke()
    row = Row(benchmark.fullname.split("::")[0], op, shape, dtype, impl, kind, float("nan"))
    benchmark.group = row.group
    benchmark.extra_info.update({"op": op, "shape": shape, "dtype": dtype, "impl": impl, "kind": kind,
                                 "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu",
                                 "smoke": tiny, **(info or {})})
    benchmark.pedantic(fn, rounds=1 if tiny else rounds, iterations=1, warmup_rounds=0 if tiny else 1)
    row.median = benchmark.stats.stats.median
    earlier = [r for r in ROWS if r.group == row.group and r.module == row.module]
    base = next((r.median for r in earlier if r.kind == "reference"), None)
    alternatives = [r.median for r in earlier if r.kind == "torch"]
    if base is not None:
        row.ratios["ratio_vs_reference"] = base / row.median
    if alternatives:
        row.ratios["ratio_vs_best_torch"] = min(alternatives) / row.median
    if kind == "fast" and reference is not None:
        med, p20, p80 = interleaved_speedup(reference, fn, pairs=1 if tiny else pairs)
        row.ratios.update({"speedup_interleaved": med, "speedup_p20": p20, "speedup_p80": p80})
    benchmark.extra_info.update(row.ratios)
    ROWS.append(row)
    return row


def summary_lines(rows: list[Row]) -> list[str]:
    """The table printed at the end of a run: op, shape, dtype, backend, median, ratios."""
    head = ["op", "shape", "dtype", "backend", "kind", "median ms", "vs reference", "vs best torch", "interleaved"]
    body = []
    for r in rows:
        ratio = r.ratios
        body.append([r.op, r.shape, r.dtype, r.impl, r.kind, f"{r.median * 1e3:.3f}",
                     f"{ratio['ratio_vs_reference']:.2f}x" if "ratio_vs_reference" in ratio else "",
                     f"{ratio['ratio_vs_best_torch']:.2f}x" if "ratio_vs_best_torch" in ratio else "",
                     f"{ratio['speedup_interleaved']:.2f}x" if "speedup_interleaved" in ratio else ""])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = " | ".join("{:<%d}" % w for w in widths)
    return [fmt.format(*head), "-+-".join("-" * w for w in widths)] + [fmt.format(*b) for b in body]
