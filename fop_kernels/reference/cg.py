"""Batched conjugate gradient for FROG's row-wise systems, matrix-free.

Row r of B (R x D) is solved against F^_r = F_r / (tr F_r / D + 1e-10) + damping I with
F_r = X_s^T diag(row_weights[:, r]) X_s / s (X_s: s x D, row_weights: s x R).
One matvec for all rows: P -> ((X_s P^T) * w^)^T X_s / s + damping P, w^ the trace-normalized weights.
"""

from __future__ import annotations

import torch

TRACE_EPS = 1e-10


def normalized_row_weights(X_s: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """w^ = row_weights / (t_r + 1e-10) / s with t_r = tr(F_r) / D = sum_n w[n, r] |x_n|^2 / (s D)."""
    s, D = X_s.shape
    sq = X_s.square().sum(1)  # s
    t = (row_weights * sq[:, None]).sum(0) / (s * D)  # R
    return row_weights / (t + TRACE_EPS) / s


def row_matvec(X_s: torch.Tensor, w_hat: torch.Tensor, P: torch.Tensor, damping) -> torch.Tensor:
    """F^ P for all rows at once (R x D): ((X_s P^T) * w^)^T X_s + damping P."""
    return ((X_s @ P.T) * w_hat).T @ X_s + damping * P


def batched_cg(X_s, row_weights, B, damping, iters: int = 10, tol: float = 0.0, x0=None):
    """(X, residual norms): CG on every row at once; rows whose ||r|| <= tol ||b|| stop changing."""
    dt = torch.float64 if B.dtype == torch.float64 else torch.float32
    X_s, row_weights, Bf = X_s.to(dt), row_weights.to(dt), B.to(dt)
    w_hat = normalized_row_weights(X_s, row_weights)
    x = torch.zeros_like(Bf) if x0 is None else x0.to(dt).clone()
    r = Bf - row_matvec(X_s, w_hat, x, damping) if x0 is not None else Bf.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    threshold = (tol * Bf.norm(dim=1)) ** 2
    for _ in range(iters):
        active = rs > threshold
        Ap = row_matvec(X_s, w_hat, p, damping)
        pAp = (p * Ap).sum(1)
        alpha = torch.where(active & (pAp > 0), rs / torch.where(pAp > 0, pAp, 1.0), 0.0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * Ap
        rs_new = (r * r).sum(1)
        beta = torch.where(active & (rs > 0), rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
        p = torch.where(active[:, None], r + beta[:, None] * p, p)
        rs = torch.where(active, rs_new, rs)
    return x.to(B.dtype), rs.sqrt()
