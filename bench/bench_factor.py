"""Factor accumulation on CPU: the pure-torch reference against the C++ backend, side by side in one run.

Run: flock /tmp/fop_bench.lock .venv/bin/python -m pytest bench/bench_factor.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds -s
Each group is one shape; a fast row prints its speed-up over the reference twice: the ratio of the pytest-benchmark
medians, and the median of back-to-back (interleaved) ratios, the robust one on a shared CPU; both go in extra_info.
"torch_addmm" is the one-call in-place torch form F.addmm_(X^T, X, beta=1-decay, alpha=decay*scale), kept as a
yardstick for the C++ tiled syrk. Triton is not timed here: on CPU it runs under the interpreter.
"""

from __future__ import annotations

import pytest
import torch
from _timing import timed_against_reference

import fop_kernels
from fop_kernels import reference as ref

pytest.importorskip("pytest_benchmark")

DECAY = 0.05
_MEDIANS: dict[tuple[str, str], float] = {}


def _have_cpp(op: str) -> bool:
    return "cpp" in fop_kernels.implementations(op) and fop_kernels.available_backends()["cpp"]["available"]


def _run(benchmark, group: str, impl: str, fn, rounds: int, reference=None):
    timed_against_reference(benchmark, _MEDIANS, group, impl, fn, rounds, reference)

DENSE = [(4096, 512), (1024, 1152), (512, 2305), (32768, 256)]


@pytest.mark.parametrize("impl", ["reference", "torch_addmm", "cpp"])
@pytest.mark.parametrize("N,d", DENSE, ids=[f"N{n}-d{d}" for n, d in DENSE])
def test_accumulate_factor(benchmark, N, d, impl):
    if impl == "cpp" and not _have_cpp("accumulate_factor"):
        pytest.skip("the C++ extension is not loaded")
    X, F = torch.randn(N, d), torch.randn(d, d)
    fns = {
        "reference": lambda: ref.accumulate_factor(F, X, DECAY, 1.0 / N),
        "torch_addmm": lambda: F.addmm_(X.T, X, beta=1 - DECAY, alpha=DECAY / N),
        "cpp": lambda: fop_kernels.accumulate_factor(F, X, DECAY, 1.0 / N, check_finite=False, backend="cpp"),
    }
    _run(benchmark, f"accumulate_factor N={N} d={d}", impl, fns[impl], rounds=7, reference=fns["reference"])


DIAG = [(4096, 512), (65536, 64), (4096, 512, torch.bfloat16)]


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("case", DIAG, ids=["N4096-d512", "N65536-d64", "N4096-d512-bf16"])
def test_accumulate_factor_diag(benchmark, case, impl):
    if impl == "cpp" and not _have_cpp("accumulate_factor_diag"):
        pytest.skip("the C++ extension is not loaded")
    N, d = case[:2]
    X, f = torch.randn(N, d).to(case[2] if len(case) > 2 else torch.float32), torch.randn(d)
    fns = {
        "reference": lambda: ref.accumulate_factor_diag(f, X, DECAY, 1.0 / N),
        "cpp": lambda: fop_kernels.accumulate_factor_diag(f, X, DECAY, 1.0 / N, check_finite=False, backend="cpp"),
    }
    _run(benchmark, f"accumulate_factor_diag N={N} d={d} {X.dtype}", impl, fns[impl], rounds=20,
         reference=fns["reference"])


# (N, C, H, W, kernel, stride, padding): ResNet-18-like layers on CIFAR-sized inputs
CONV = [(32, 64, 32, 32, 3, 1, 1), (64, 128, 16, 16, 3, 1, 1), (64, 256, 8, 8, 3, 2, 1)]
# the ResNet-18 width-16 layers of bench/bench_step.py at batch 128, for the two C++ methods forced
CONV_W16 = [(128, 3, 32, 32, 3, 1, 1), (128, 16, 32, 32, 3, 1, 1), (128, 16, 32, 32, 3, 2, 1),
            (128, 32, 16, 16, 3, 1, 1), (128, 64, 8, 8, 3, 1, 1), (128, 128, 4, 4, 3, 1, 1)]
CPP_METHODS = {"cpp": 0, "cpp_patches": 1, "cpp_correlation": 2}  # auto (the flop count picks), forced


@pytest.mark.parametrize("impl", ["reference", *CPP_METHODS])
@pytest.mark.parametrize("case", CONV + CONV_W16,
                         ids=[f"N{c[0]}-C{c[1]}-H{c[2]}-k{c[4]}-s{c[5]}" for c in CONV + CONV_W16])
def test_accumulate_conv_factor(benchmark, case, impl):
    if impl != "reference" and not _have_cpp("accumulate_conv_factor"):
        pytest.skip("the C++ extension is not loaded")
    N, C, H, W, k, s, p = case
    if impl == "cpp_correlation" and s != 1:
        pytest.skip("the correlation method is for stride 1")
    x, F = torch.randn(N, C, H, W), torch.randn(C * k * k + 1, C * k * k + 1)
    L = ((H + 2 * p - k) // s + 1) * ((W + 2 * p - k) // s + 1)
    fns = {
        "reference": lambda: ref.accumulate_conv_factor(F, x, DECAY, k, s, p, 1, True, 1.0 / N),
        **{name: (lambda m=m: torch.ops.fop_kernels.accumulate_conv_factor_(
            F, x, DECAY, DECAY / (N * L), [k, k], [s, s], [p, p], [1, 1], True, m)) for name, m in CPP_METHODS.items()},
    }
    _run(benchmark, f"accumulate_conv_factor x={tuple(case[:4])} k={k} s={s}", impl, fns[impl], rounds=5,
         reference=fns["reference"])


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("case", CONV, ids=[f"C{c[1]}-H{c[2]}-k{c[4]}-s{c[5]}" for c in CONV])
def test_accumulate_conv_factor_diag(benchmark, case, impl):
    if impl == "cpp" and not _have_cpp("accumulate_conv_factor_diag"):
        pytest.skip("the C++ extension is not loaded")
    N, C, H, W, k, s, p = case
    x, f = torch.randn(N, C, H, W), torch.randn(C * k * k + 1)
    fns = {
        "reference": lambda: ref.accumulate_conv_factor_diag(f, x, DECAY, k, s, p, 1, True, 1.0 / N),
        "cpp": lambda: fop_kernels.accumulate_conv_factor_diag(f, x, DECAY, k, s, p, 1, True, 1.0 / N,
                                                               check_finite=False, backend="cpp"),
    }
    _run(benchmark, f"accumulate_conv_factor_diag x={tuple(case[:4])} k={k} s={s}", impl, fns[impl], rounds=7,
         reference=fns["reference"])
