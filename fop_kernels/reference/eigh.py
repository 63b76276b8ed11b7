"""Batched symmetric eigendecomposition and damped inverses: a loop over torch.linalg.eigh, and a batched Cholesky
inverse."""

from __future__ import annotations

import torch


def eigh(mats: list[torch.Tensor], clamp: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per matrix M = Q diag(l) Q^T with l ascending; with `clamp`, l <- max(l, 0)."""
    evals, evecs = [], []
    for m in mats:
        l, q = torch.linalg.eigh(m)
        evals.append(l.clamp_min(0) if clamp else l)
        evecs.append(q)
    return evals, evecs


def damped_inverse(
    mats: list[torch.Tensor],
    damping: float,
    power: float = -1.0,
    eig: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Per matrix Q diag((l + damping)^power) Q^T, l clamped at 0; reuses `eig` = (evals, evecs) if given."""
    evals, evecs = eig if eig is not None else eigh(mats, clamp=True)
    return [(q * (l.clamp_min(0) + damping).pow(power)) @ q.mT for l, q in zip(evals, evecs)]


def damped_cholesky_inverse(M: torch.Tensor, lam: torch.Tensor,
                            overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """((M_b + lam_b I)^-1, info) for a (B, n, n) stack by Cholesky: info_b (int32) > 0 where M_b + lam_b I has no
    Cholesky factor (the inverse is then unspecified). `overwrite`: the inverses are written into M, returned."""
    damped = M.clone()
    damped.diagonal(dim1=1, dim2=2).add_(lam.to(M.dtype)[:, None])
    L, info = torch.linalg.cholesky_ex(damped)
    inv = torch.cholesky_inverse(L).mT
    return (M.copy_(inv) if overwrite else inv.contiguous()), (info > 0).to(torch.int32)


def eigh_refresh(
    mats: list[torch.Tensor], prev_evecs: list[torch.Tensor], iters: int = 1, clamp: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Cheap update of an eigenbasis from the previous one (SOAP-style subspace iteration), per matrix:

    repeat `iters` times: Z = M Q with Z's columns ordered by decreasing Rayleigh quotient diag(Q^T M Q),
    Q <- qr(Z).Q; then l = diag(Q^T M Q) sorted ascending with Q's columns. Exact when Q already spans the
    eigenvectors; otherwise each step contracts the error by the eigenvalue gaps."""
    evals, evecs = [], []
    for m, q in zip(mats, prev_evecs):
        for _ in range(iters):
            mq = m @ q
            order = (q * mq).sum(-2).argsort(descending=True)
            q = torch.linalg.qr(mq[:, order]).Q
        l, order = (q * (m @ q)).sum(-2).sort()
        evals.append(l.clamp_min(0) if clamp else l)
        evecs.append(q[:, order])
    return evals, evecs
