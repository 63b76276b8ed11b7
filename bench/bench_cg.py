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
from _timing import timed_against_reference

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
    timed_against_reference(benchmark, _MEDIANS, f"batched_cg R={R} D={D} s={s} iters={iters}", impl, fns[impl],
                            rounds=7, reference=fns["reference"], pairs=7)
