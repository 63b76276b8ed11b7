"""Batched CG on CPU: the pure-torch reference against the C++ backend, side by side in one run.

Run: flock /tmp/fop_bench.lock .venv/bin/python -m pytest bench/bench_cg.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds -s
Each group is one problem size; the C++ row prints its speed-up over the reference twice: the ratio of medians and
the median of back-to-back (interleaved) ratios, the robust one on a shared CPU. Triton is not
timed here: on CPU it runs under the interpreter.
"""

from __future__ import annotations

import pytest
import torch
from _timing import interleaved_speedup

import fop_kernels
from fop_kernels import reference as ref

pytest.importorskip("pytest_benchmark")

_MEDIANS: dict[tuple[str, str], float] = {}


# (rows R, dim D, samples s, iterations): the GPU target size, a ResNet-18 conv layer, a linear head
CASES = [(512, 4608, 64, 10), (128, 1152, 24, 4), (10, 512, 24, 4)]


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("case", CASES, ids=[f"R{c[0]}-D{c[1]}-s{c[2]}-it{c[3]}" for c in CASES])
def test_batched_cg(benchmark, case, impl):
    if impl == "cpp" and not ("cpp" in fop_kernels.implementations("batched_cg")
                              and fop_kernels.available_backends()["cpp"]["available"]):
        pytest.skip("the C++ extension is not loaded")
    R, D, s, iters = case
    X_s, w, B = torch.randn(s, D), torch.rand(s, R), torch.randn(R, D)
    fns = {
        "reference": lambda: ref.batched_cg(X_s, w, B, 1e-3, iters=iters),
        "cpp": lambda: fop_kernels.batched_cg(X_s, w, B, 1e-3, iters=iters, backend="cpp"),
    }
    group = f"batched_cg R={R} D={D} s={s} iters={iters}"
    benchmark.group = group
    benchmark.extra_info.update({"impl": impl, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "device": "cpu"})
    benchmark.pedantic(fns[impl], rounds=7, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    _MEDIANS[(group, impl)] = median
    base = _MEDIANS.get((group, "reference"))
    if impl != "reference":
        interleaved, p20, p80 = interleaved_speedup(fns["reference"], fns[impl], pairs=7)
        benchmark.extra_info.update({"speedup_interleaved": interleaved, "speedup_p20": p20, "speedup_p80": p80})
        line = f"\n[{group}] {impl}: {median * 1e3:.2f} ms"
        if base is not None:
            benchmark.extra_info["speedup_of_medians"] = base / median
            line += f", reference {base * 1e3:.2f} ms, ratio of medians {base / median:.2f}x"
        print(f"{line}, interleaved speed-up {interleaved:.2f}x (p20-p80 {p20:.2f}-{p80:.2f})")
