"""Batched conjugate gradient for FROG's row-wise Fisher systems (formulas in fop_kernels.reference.cg)."""

from __future__ import annotations

from fop_kernels import _checks
from fop_kernels import reference as ref
from fop_kernels._dispatch import register, resolve

register("batched_cg", "reference")(ref.batched_cg)


def batched_cg(X_s, row_weights, B, damping, iters: int = 10, tol: float = 0.0, x0=None, *, backend: str | None = None):
    """Solve (F_r / (tr F_r / D) + damping I) x_r = b_r for every row r of B at once.

    F_r = X_s^T diag(row_weights[:, r]) X_s / s; X_s: s x D, row_weights: s x R, B: R x D.
    `iters` CG iterations, or fewer for rows whose residual drops under tol * |b_r| (those stop changing);
    warm start from x0. Returns (X: R x D, residual norms: R)."""
    _checks.tensor("X_s", X_s, ndim=2)
    dev = X_s.device
    _checks.tensor("row_weights", row_weights, ndim=2, device=dev)
    _checks.tensor("B", B, ndim=2, device=dev)
    s, D = X_s.shape
    R = B.shape[0]
    _checks.shape("row_weights", row_weights, (s, R))
    _checks.shape("B", B, (R, D))
    if x0 is not None:
        _checks.tensor("x0", x0, ndim=2, device=dev)
        _checks.shape("x0", x0, (R, D))
    damping = _checks.damping("damping", damping, device=dev)
    iters = _checks.integer("iters", iters, low=0)
    tol = _checks.nonnegative_float("tol", tol)
    _, fn = resolve("batched_cg", dev, backend)
    return fn(X_s, row_weights, B, damping, iters=iters, tol=tol, x0=x0)
