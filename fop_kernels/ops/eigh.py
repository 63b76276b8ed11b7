"""Batched symmetric eigendecomposition, damped inverse and eigenbasis refresh (reference: torch.linalg loops)."""

from __future__ import annotations

import torch

from fop_kernels import _checks
from fop_kernels import reference as ref
from fop_kernels._dispatch import register, resolve

register("eigh", "reference")(ref.eigh)
register("damped_inverse", "reference")(ref.damped_inverse)
register("eigh_refresh", "reference")(ref.eigh_refresh)
register("damped_cholesky_inverse", "reference")(ref.damped_cholesky_inverse)

SYMMETRY_RTOL = 1e-4
# Backends whose kernels check values themselves (finite, symmetric), next to the data and naming the index.
_NATIVE = ("cpp", "cuda")


def _check_structure(mats) -> list[torch.Tensor]:
    mats = _checks.tensor_list("mats", mats, ndim=2, dtypes=(torch.float32, torch.float64))
    for i, m in enumerate(mats):
        if m.shape[0] != m.shape[1]:
            raise ValueError(f"mats[{i}] is not square: shape {tuple(m.shape)}")
        if m.shape[0] == 0:
            raise ValueError(f"mats[{i}] is empty (0 x 0)")
        if m.dtype != mats[0].dtype:
            raise TypeError(f"mats[{i}] has dtype {m.dtype} but mats[0] has {mats[0].dtype}; use one dtype")
    return mats


def _check_values(mats: list[torch.Tensor]) -> None:
    """Every matrix finite and symmetric: max|M - M^T| <= SYMMETRY_RTOL max|M| (host syncs: reference path only)."""
    for i, m in enumerate(mats):
        amax = m.abs().max() if m.numel() else m.new_zeros(())
        if not bool(torch.isfinite(amax)):
            raise ValueError(f"mats[{i}] contains non-finite values (NaN or inf)")
        if m.numel() and bool((m - m.mT).abs().max() > SYMMETRY_RTOL * amax):
            raise ValueError(f"mats[{i}] is not symmetric (|M - M^T| > {SYMMETRY_RTOL} max|M|)")


def _check_companions(mats: list[torch.Tensor], others, name: str, vectors: bool) -> list[torch.Tensor]:
    others = _checks.tensor_list(name, others, ndim=1 if vectors else 2, dtypes=(torch.float32, torch.float64))
    if len(others) != len(mats):
        raise ValueError(f"{name} holds {len(others)} tensors for {len(mats)} matrices")
    for i, (m, t) in enumerate(zip(mats, others)):
        expected = m.shape[:1] if vectors else m.shape
        _checks.shape(f"{name}[{i}]", t, expected)
        if t.dtype != m.dtype or t.device != m.device:
            raise ValueError(f"{name}[{i}] is {t.dtype} on {t.device}, but mats[{i}] is {m.dtype} on {m.device}")
    return others


def _resolve(op: str, mats: list[torch.Tensor], backend: str | None, **others: list[torch.Tensor]):
    """The implementation for `op`; for non-native backends, value checks of the inputs here, and of the outputs
    after the call (so that no backend returns NaN silently)."""
    name, fn = resolve(op, mats[0].device, backend)
    if name in _NATIVE:
        return fn
    _check_values(mats)
    for what, ts in others.items():
        for i, t in enumerate(ts or ()):
            _checks.finite(f"{what}[{i}]", t)

    def checked(*args, **kwargs):
        out = fn(*args, **kwargs)
        results = [out] if op == "damped_inverse" else list(out)
        for i, ts in enumerate(zip(*results)):
            if not all(bool(torch.isfinite(t).all()) for t in ts):
                raise ValueError(f"{op}: the result for mats[{i}] is not finite (singular matrix with damping 0?)")
        return out

    return checked


def eigh(mats, clamp: bool = False, *, backend: str | None = None):
    """Eigenvalues (ascending) and eigenvectors of each symmetric matrix: ([l_i], [Q_i]), M_i = Q_i diag(l_i) Q_i^T.

    `mats`: a list of square float32/float64 matrices of any sizes (one dtype and device).
    `clamp=True` clamps eigenvalues at 0 (factors are PSD; negative values are rounding)."""
    mats = _check_structure(mats)
    return _resolve("eigh", mats, backend)(mats, clamp=clamp)


def damped_inverse(mats, damping, power: float = -1.0, eig=None, *, backend: str | None = None):
    """Q diag((l + damping)^power) Q^T per matrix (power -1: inverse, -0.5: inverse root), l clamped at 0.

    `eig=(evals, evecs)` reuses a decomposition from `eigh` instead of computing one. With damping 0 and power < 0
    a singular matrix raises an error rather than returning inf/NaN."""
    mats = _check_structure(mats)
    damping = _checks.damping("damping", damping, dtypes=(torch.float32, torch.float64), device=mats[0].device)
    power = float(power)
    if power != power or power in (float("inf"), float("-inf")):
        raise ValueError(f"power must be finite, got {power}")
    if eig is not None:
        evals, evecs = eig
        if len(evals) != len(mats) or len(evecs) != len(mats):
            raise ValueError(f"eig holds {len(evals)} decompositions for {len(mats)} matrices")
        eig = (_check_companions(mats, evals, "eig[0] (evals)", True),
               _check_companions(mats, evecs, "eig[1] (evecs)", False))
    fn = _resolve("damped_inverse", mats, backend, evals=eig and eig[0], evecs=eig and eig[1])
    return fn(mats, damping, power=power, eig=eig)


def eigh_refresh(mats, prev_evecs, iters: int = 1, clamp: bool = False, *, backend: str | None = None):
    """Cheap eigenbasis update from the previous eigenvectors (SOAP-style), per matrix M with previous basis Q:

    `iters` times Q <- qr(M Q) (columns ordered by decreasing Rayleigh quotient), then l = diag(Q^T M Q)
    ascending. About (iters + 1) matmuls and `iters` QRs instead of a full eigh: accurate when M changed little
    since Q was computed (an EMA factor between inverse updates). Returns ([l_i], [Q_i]) like `eigh`."""
    mats = _check_structure(mats)
    prev_evecs = _check_companions(mats, prev_evecs, "prev_evecs", False)
    iters = _checks.positive_int("iters", iters)
    fn = _resolve("eigh_refresh", mats, backend, prev_evecs=prev_evecs)
    return fn(mats, prev_evecs, iters=iters, clamp=clamp)


def damped_cholesky_inverse(M, lam, *, overwrite: bool = False,
                            backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """((M_b + lam_b I)^-1, info) for a (B, n, n) stack of symmetric float32/float64 matrices and one damping per
    matrix (`lam`, shape (B,)), by Cholesky: `info` (int32, (B,)) is nonzero where M_b + lam_b I has no Cholesky
    factor (not positive definite, or non-finite), and that inverse is then unspecified: the caller repairs or
    raises. The result is exactly symmetric. `overwrite=True`: M (contiguous, a scratch stack of the caller's) is
    overwritten with the inverses and returned, and no buffer of its size is made; M is then unspecified where
    info is nonzero."""
    if not isinstance(M, torch.Tensor) or M.dim() != 3 or M.shape[1] != M.shape[2]:
        raise ValueError(f"M must be a (B, n, n) tensor of square matrices, got "
                         f"{tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__}")
    if M.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"M must be float32 or float64, got {M.dtype}")
    if not isinstance(lam, torch.Tensor) or lam.shape != M.shape[:1] or lam.device != M.device:
        raise ValueError(f"lam must be a ({M.shape[0]},) tensor on {M.device} (one damping per matrix), got "
                         f"{tuple(lam.shape) if isinstance(lam, torch.Tensor) else type(lam).__name__}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if overwrite and not M.is_contiguous():
        raise ValueError("overwrite=True needs a contiguous M: the inverses are written into its storage")
    _, fn = resolve("damped_cholesky_inverse", M.device, backend)
    return fn(M, lam, overwrite)
