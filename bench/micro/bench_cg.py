"""Batched CG on CPU (FROG's row-wise systems): the reference, an exact plain-torch solve and the C++ backend.

Run: `make bench` (all microbenchmarks), or one file:
    .venv/bin/python -m pytest bench/micro/bench_cg.py --benchmark-only -s
Each group is one problem size (rows R, dim D, samples s, CG iterations). The plain-torch alternative solves
every row's system exactly instead of iterating: F^_r = X_s^T diag(w^_r) X_s + damping I has rank s plus a
shift, so by the Woodbury identity x_r = (b_r - X_s^T (sqrt(w^_r) * y_r)) / damping with
y_r = (damping I + diag(sqrt(w^_r)) X_s X_s^T diag(sqrt(w^_r)))^-1 sqrt(w^_r) * (X_s b_r): one batched s x s
Cholesky solve for all rows. (It is exact where CG after `iters` steps is not; its speed says whether iterating
pays at these sizes.) Triton is not timed here (on CPU it runs under the interpreter): see `make gpu-check`.
"""

from __future__ import annotations

import pytest
import torch
from _timing import pick, timed

import fop_kernels
from fop_kernels import reference as ref
from fop_kernels.reference.cg import normalized_row_weights, row_matvec

pytest.importorskip("pytest_benchmark")

DAMPING = 1e-3

# (rows R, dim D, samples s, iterations): the GPU target size, a ResNet-18 conv layer, a linear head
CASES = pick([(512, 4608, 64, 10), (128, 1152, 24, 4), (10, 512, 24, 4)], [(8, 64, 8, 2), (3, 40, 5, 2)])


def woodbury_solve(X_s, row_weights, B, damping):
    """The exact solution of every row system (see the module docstring)."""
    w_hat = normalized_row_weights(X_s, row_weights)  # s x R
    root = w_hat.T.sqrt()  # R x s
    gram = X_s @ X_s.T  # s x s
    K = root[:, :, None] * gram * root[:, None, :] + damping * torch.eye(X_s.shape[0], dtype=X_s.dtype)
    rhs = root * (B @ X_s.T)  # R x s
    y = torch.cholesky_solve(rhs[:, :, None], torch.linalg.cholesky(K))[:, :, 0]
    return (B - (root * y) @ X_s) / damping


ROWS = [("reference", "reference"), ("woodbury", "torch"), ("cpp", "fast")]


@pytest.mark.parametrize("impl,kind", ROWS, ids=[r[0] for r in ROWS])
@pytest.mark.parametrize("case", CASES, ids=[f"R{c[0]}-D{c[1]}-s{c[2]}-it{c[3]}" for c in CASES])
def test_batched_cg(benchmark, case, impl, kind):
    if kind == "fast" and not ("cpp" in fop_kernels.implementations("batched_cg")
                               and fop_kernels.available_backends()["cpp"]["available"]):
        pytest.skip("the C++ extension is not loaded")
    R, D, s, iters = case
    X_s, w, B = torch.randn(s, D), torch.rand(s, R), torch.randn(R, D)
    fns = {
        "reference": lambda: ref.batched_cg(X_s, w, B, DAMPING, iters=iters)[0],
        "woodbury": lambda: woodbury_solve(X_s, w, B, DAMPING),
        "cpp": lambda: fop_kernels.batched_cg(X_s, w, B, DAMPING, iters=iters, backend="cpp")[0],
    }
    if impl == "woodbury":  # the exact solve satisfies the system (checked in float64: fp32 cancels in 1/damping)
        X64, w64, B64 = X_s.double(), w.double(), B.double()
        x = woodbury_solve(X64, w64, B64, DAMPING)
        residual = row_matvec(X64, normalized_row_weights(X64, w64), x, DAMPING)
        assert torch.allclose(residual, B64, rtol=1e-6, atol=1e-6 * float(B.abs().max())), "woodbury"
    elif impl != "reference":
        assert torch.allclose(fns[impl](), fns["reference"](), rtol=1e-3, atol=1e-3), f"{impl} differs"
    timed(benchmark, op="batched_cg", shape=f"R={R} D={D} s={s} iters={iters}", dtype="fp32", impl=impl,
          kind=kind, fn=fns[impl], rounds=7, reference=fns["reference"], pairs=7)
