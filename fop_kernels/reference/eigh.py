"""Batched symmetric eigendecomposition and damped inverse: a loop over torch.linalg.eigh."""

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
