"""Batched symmetric eigendecomposition and damped inverse (reference: a loop over torch.linalg.eigh)."""

from __future__ import annotations

import torch

from fop_kernels import _checks
from fop_kernels import reference as ref
from fop_kernels._dispatch import register, resolve

register("eigh", "reference")(ref.eigh)
register("damped_inverse", "reference")(ref.damped_inverse)

SYMMETRY_RTOL = 1e-4


def _check_mats(mats) -> list[torch.Tensor]:
    mats = _checks.tensor_list("mats", mats, ndim=2, dtypes=(torch.float32, torch.float64))
    for i, m in enumerate(mats):
        if m.shape[0] != m.shape[1]:
            raise ValueError(f"mats[{i}] is not square: shape {tuple(m.shape)}")
        if m.dtype != mats[0].dtype:
            raise TypeError(f"mats[{i}] has dtype {m.dtype} but mats[0] has {mats[0].dtype}; use one dtype")
        amax = m.abs().max() if m.numel() else m.new_zeros(())
        if not bool(torch.isfinite(amax)):
            raise ValueError(f"mats[{i}] contains non-finite values (NaN or inf)")
        if bool((m - m.mT).abs().max() > SYMMETRY_RTOL * amax) if m.numel() else False:
            raise ValueError(f"mats[{i}] is not symmetric (|M - M^T| > {SYMMETRY_RTOL} max|M|)")
    return mats


def eigh(mats, clamp: bool = False, *, backend: str | None = None):
    """Eigenvalues (ascending) and eigenvectors of each symmetric matrix: ([l_i], [Q_i]), M_i = Q_i diag(l_i) Q_i^T.

    `clamp=True` clamps eigenvalues at 0 (factors are PSD; negative values are rounding)."""
    mats = _check_mats(mats)
    _, fn = resolve("eigh", mats[0].device, backend)
    return fn(mats, clamp=clamp)


def damped_inverse(mats, damping, power: float = -1.0, eig=None, *, backend: str | None = None):
    """Q diag((l + damping)^power) Q^T per matrix (power -1: inverse, -0.5: inverse root), l clamped at 0.

    `eig=(evals, evecs)` reuses a decomposition from `eigh` instead of computing one."""
    mats = _check_mats(mats)
    damping = _checks.nonnegative("damping", damping)
    if eig is not None:
        evals, evecs = eig
        if len(evals) != len(mats) or len(evecs) != len(mats):
            raise ValueError(f"eig holds {len(evals)} decompositions for {len(mats)} matrices")
    _, fn = resolve("damped_inverse", mats[0].device, backend)
    return fn(mats, damping, power=float(power), eig=eig)
