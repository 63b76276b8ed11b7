"""Factor accumulation on CPU, dense and conv: the reference, plain torch and the C++ backend in one run.

Run: `make bench` (all microbenchmarks), or one file:
    .venv/bin/python -m pytest bench/micro/bench_factor.py --benchmark-only -s
Each group is one shape. Plain-torch alternatives: the one-call in-place BLAS form
F.addmm_(X^T, X, beta=1-decay, alpha=decay*scale) for the dense factor; einsum for the diagonal; for the conv
factor, F.unfold then addmm_ into F's image block with the bias row/column from the column sums (no
concatenated ones column); for the conv diagonal, the sum of squares of the unfolded tensor over samples and
positions. The C++ conv factor is timed with its method chosen by the flop count ("cpp") and with each method
forced. Triton is not timed here (on CPU it runs under the interpreter): see `make gpu-check`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F_nn
from _timing import pick, short, timed

import fop_kernels
from fop_kernels import reference as ref
from fop_kernels.reference.factor import conv_output_size

pytest.importorskip("pytest_benchmark")

DECAY = 0.05


def _have_cpp(op: str) -> bool:
    return "cpp" in fop_kernels.implementations(op) and fop_kernels.available_backends()["cpp"]["available"]


def _check(fns: dict, impl: str, state: torch.Tensor, *args) -> None:
    """The row `impl` computes what the reference computes (one call each on copies of the state)."""
    want, got = state.clone(), state.clone()
    fns["reference"](want, *args)
    fns[impl](got, *args)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())), f"{impl} differs"


DENSE = pick([(4096, 512), (1024, 1152), (512, 2305), (32768, 256)], [(64, 32), (33, 40)])
DENSE_FNS = {
    "reference": lambda F, X: ref.accumulate_factor(F, X, DECAY, 1.0 / X.shape[0]),
    "torch_addmm": lambda F, X: F.addmm_(X.T, X, beta=1 - DECAY, alpha=DECAY / X.shape[0]),
    "cpp": lambda F, X: fop_kernels.accumulate_factor(F, X, DECAY, 1.0 / X.shape[0], check_finite=False,
                                                      backend="cpp"),
}
DENSE_ROWS = [("reference", "reference"), ("torch_addmm", "torch"), ("cpp", "fast")]


@pytest.mark.parametrize("impl,kind", DENSE_ROWS, ids=[r[0] for r in DENSE_ROWS])
@pytest.mark.parametrize("N,d", DENSE, ids=[f"N{n}-d{d}" for n, d in DENSE])
def test_accumulate_factor(benchmark, N, d, impl, kind):
    if kind == "fast" and not _have_cpp("accumulate_factor"):
        pytest.skip("the C++ extension is not loaded")
    X, F = torch.randn(N, d), torch.randn(d, d)
    _check(DENSE_FNS, impl, F, X)
    timed(benchmark, op="accumulate_factor", shape=f"N={N} d={d}", dtype="fp32", impl=impl, kind=kind,
          fn=lambda: DENSE_FNS[impl](F, X), rounds=7, reference=lambda: DENSE_FNS["reference"](F, X))


DIAG = pick([(4096, 512, torch.float32), (65536, 64, torch.float32), (4096, 512, torch.bfloat16)],
            [(64, 32, torch.float32), (64, 32, torch.bfloat16)])
DIAG_FNS = {
    "reference": lambda f, X: ref.accumulate_factor_diag(f, X, DECAY, 1.0 / X.shape[0]),
    "torch_einsum": lambda f, X: f.mul_(1 - DECAY).add_(torch.einsum("nd,nd->d", X.float(), X.float()),
                                                        alpha=DECAY / X.shape[0]),
    "cpp": lambda f, X: fop_kernels.accumulate_factor_diag(f, X, DECAY, 1.0 / X.shape[0], check_finite=False,
                                                           backend="cpp"),
}
DIAG_ROWS = [("reference", "reference"), ("torch_einsum", "torch"), ("cpp", "fast")]


@pytest.mark.parametrize("impl,kind", DIAG_ROWS, ids=[r[0] for r in DIAG_ROWS])
@pytest.mark.parametrize("case", DIAG, ids=[f"N{n}-d{d}-{short(t)}" for n, d, t in DIAG])
def test_accumulate_factor_diag(benchmark, case, impl, kind):
    if kind == "fast" and not _have_cpp("accumulate_factor_diag"):
        pytest.skip("the C++ extension is not loaded")
    N, d, dtype = case
    X, f = torch.randn(N, d).to(dtype), torch.randn(d)
    _check(DIAG_FNS, impl, f, X)
    timed(benchmark, op="accumulate_factor_diag", shape=f"N={N} d={d}", dtype=short(dtype), impl=impl, kind=kind,
          fn=lambda: DIAG_FNS[impl](f, X), rounds=20, reference=lambda: DIAG_FNS["reference"](f, X))


def _positions(x, k, s, p) -> int:
    return conv_output_size(x.shape[2], k, s, p, 1) * conv_output_size(x.shape[3], k, s, p, 1)


def _torch_conv_factor(F, x, k, s, p):
    """F <- (1-decay) F + decay/(N L) P^T P with the bias row/column from P's column sums, P = unfold(x)."""
    n, L = x.shape[0], _positions(x, k, s, p)
    cols = F_nn.unfold(x, k, padding=p, stride=s)  # N x D x L
    d = cols.shape[1]
    P = cols.transpose(1, 2).reshape(-1, d)
    coef = DECAY / (n * L)
    F[:d, :d].addmm_(P.T, P, beta=1 - DECAY, alpha=coef)
    colsum = cols.sum((0, 2))
    F[:d, d].mul_(1 - DECAY).add_(colsum, alpha=coef)
    F[d, :d].mul_(1 - DECAY).add_(colsum, alpha=coef)
    F[d, d].mul_(1 - DECAY).add_(coef * n * L)
    return F


# (N, C, H, W, kernel, stride, padding): ResNet-18-like layers on CIFAR-sized inputs, and the width-16 layers of
# bench/studies/bench_step.py at batch 128
CONV = pick([(32, 64, 32, 32, 3, 1, 1), (64, 128, 16, 16, 3, 1, 1), (64, 256, 8, 8, 3, 2, 1),
             (128, 3, 32, 32, 3, 1, 1), (128, 16, 32, 32, 3, 1, 1), (128, 16, 32, 32, 3, 2, 1),
             (128, 32, 16, 16, 3, 1, 1), (128, 64, 8, 8, 3, 1, 1), (128, 128, 4, 4, 3, 1, 1)],
            [(2, 3, 8, 8, 3, 1, 1), (2, 4, 6, 6, 3, 2, 1)])
CPP_METHODS = {"cpp": 0, "cpp_patches": 1, "cpp_correlation": 2}  # auto (the flop count picks), forced
CONV_ROWS = [("reference", "reference"), ("torch_unfold_addmm", "torch")] + [(m, "fast") for m in CPP_METHODS]


def _conv_fns(N, L, k, s, p):
    cpp = {name: (lambda F, x, m=m: torch.ops.fop_kernels.accumulate_conv_factor_(
        F, x, DECAY, DECAY / (N * L), [k, k], [s, s], [p, p], [1, 1], True, m)) for name, m in CPP_METHODS.items()}
    return {"reference": lambda F, x: ref.accumulate_conv_factor(F, x, DECAY, k, s, p, 1, True, 1.0 / N),
            "torch_unfold_addmm": lambda F, x: _torch_conv_factor(F, x, k, s, p), **cpp}


@pytest.mark.parametrize("impl,kind", CONV_ROWS, ids=[r[0] for r in CONV_ROWS])
@pytest.mark.parametrize("case", CONV, ids=[f"N{c[0]}-C{c[1]}-H{c[2]}-k{c[4]}-s{c[5]}" for c in CONV])
def test_accumulate_conv_factor(benchmark, case, impl, kind):
    if kind == "fast" and not _have_cpp("accumulate_conv_factor"):
        pytest.skip("the C++ extension is not loaded")
    N, C, H, W, k, s, p = case
    if impl == "cpp_correlation" and s != 1:
        pytest.skip("the correlation method is for stride 1")
    x, F = torch.randn(N, C, H, W), torch.randn(C * k * k + 1, C * k * k + 1)
    fns = _conv_fns(N, _positions(x, k, s, p), k, s, p)
    _check(fns, impl, F, x)
    timed(benchmark, op="accumulate_conv_factor", shape=f"x={tuple(case[:4])} k={k} s={s}", dtype="fp32",
          impl=impl, kind=kind, fn=lambda: fns[impl](F, x), rounds=5, reference=lambda: fns["reference"](F, x))


CONV_DIAG_ROWS = [("reference", "reference"), ("torch_unfold", "torch"), ("cpp", "fast")]


def _torch_conv_diag(f, x, k, s, p):
    """f <- (1-decay) f + decay/(N L) [sum of squares of unfold(x) over samples and positions, N L]."""
    n, L = x.shape[0], _positions(x, k, s, p)
    cols = F_nn.unfold(x, k, padding=p, stride=s)
    d = cols.shape[1]
    coef = DECAY / (n * L)
    f[:d].mul_(1 - DECAY).add_(cols.square().sum((0, 2)), alpha=coef)
    f[d].mul_(1 - DECAY).add_(coef * n * L)
    return f


@pytest.mark.parametrize("impl,kind", CONV_DIAG_ROWS, ids=[r[0] for r in CONV_DIAG_ROWS])
@pytest.mark.parametrize("case", CONV[:3], ids=[f"N{c[0]}-C{c[1]}-H{c[2]}-k{c[4]}-s{c[5]}" for c in CONV[:3]])
def test_accumulate_conv_factor_diag(benchmark, case, impl, kind):
    if kind == "fast" and not _have_cpp("accumulate_conv_factor_diag"):
        pytest.skip("the C++ extension is not loaded")
    N, C, H, W, k, s, p = case
    x, f = torch.randn(N, C, H, W), torch.randn(C * k * k + 1)
    fns = {
        "reference": lambda f, x: ref.accumulate_conv_factor_diag(f, x, DECAY, k, s, p, 1, True, 1.0 / N),
        "torch_unfold": lambda f, x: _torch_conv_diag(f, x, k, s, p),
        "cpp": lambda f, x: fop_kernels.accumulate_conv_factor_diag(f, x, DECAY, k, s, p, 1, True, 1.0 / N,
                                                                    check_finite=False, backend="cpp"),
    }
    _check(fns, impl, f, x)
    timed(benchmark, op="accumulate_conv_factor_diag", shape=f"x={tuple(case[:4])} k={k} s={s}", dtype="fp32",
          impl=impl, kind=kind, fn=lambda: fns[impl](f, x), rounds=7, reference=lambda: fns["reference"](f, x))
