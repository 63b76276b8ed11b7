"""C++/CUDA batched eigendecomposition (torch.ops.fop_kernels.eigh, damped_inverse, eigh_refresh) and the C++
damped Cholesky inverse (damped_cholesky_inverse, CPU).

Registers the native ops as backend "cpp" for CPU tensors and, when fop_kernels._C was built with its CUDA
sources, as backend "cuda" for CUDA tensors; adds the fake implementations that let them trace under
torch.compile. The native kernels check every matrix (square, one float dtype, finite, symmetric) and name the
offending index, so the public ops skip their own value checks for these backends.
"""

from __future__ import annotations

import torch

from fop_kernels import _native
from fop_kernels._dispatch import register

_DEVICES = ("cpu", "cuda") if _native.has_cuda_kernels() else ("cpu",)


@torch.library.register_fake("fop_kernels::eigh")
def _eigh_fake(mats, clamp=False):
    return [m.new_empty(m.shape[:1]) for m in mats], [m.new_empty(m.shape) for m in mats]


@torch.library.register_fake("fop_kernels::damped_inverse")
def _damped_inverse_fake(mats, damping, power=-1.0, evals=None, evecs=None):
    return [m.new_empty(m.shape) for m in mats]


@torch.library.register_fake("fop_kernels::eigh_refresh")
def _eigh_refresh_fake(mats, prev_evecs, iters=1, clamp=False):
    return [m.new_empty(m.shape[:1]) for m in mats], [m.new_empty(m.shape) for m in mats]


@torch.library.register_fake("fop_kernels::damped_cholesky_inverse")
def _damped_cholesky_inverse_fake(M, lam):
    return M.new_empty(M.shape), M.new_empty(M.shape[:1], dtype=torch.int32)


@torch.library.register_fake("fop_kernels::damped_cholesky_inverse_")
def _damped_cholesky_inverse_in_place_fake(M, lam):
    return M.new_empty(M.shape[:1], dtype=torch.int32)


def _damping_tensor(damping, like: torch.Tensor) -> torch.Tensor:
    """A float damping becomes a 0-d float64 CPU tensor (no device copy); a tensor is passed as is."""
    if isinstance(damping, torch.Tensor):
        return damping
    return torch.tensor(float(damping), dtype=torch.float64)


def _cpu_or_cuda(fn):
    register(fn.__name__, "cpp", ("cpu",))(fn)
    if "cuda" in _DEVICES:
        register(fn.__name__, "cuda", ("cuda",))(fn)
    return fn


@_cpu_or_cuda
def eigh(mats: list[torch.Tensor], clamp: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per matrix M = Q diag(l) Q^T with l ascending (clamped at 0 with `clamp`)."""
    evals, evecs = torch.ops.fop_kernels.eigh(list(mats), clamp)
    return list(evals), list(evecs)


@_cpu_or_cuda
def damped_inverse(mats: list[torch.Tensor], damping, power: float = -1.0, eig=None) -> list[torch.Tensor]:
    """Per matrix Q diag((max(l, 0) + damping)^power) Q^T; reuses `eig` = (evals, evecs) when given."""
    evals, evecs = (None, None) if eig is None else (list(eig[0]), list(eig[1]))
    return list(torch.ops.fop_kernels.damped_inverse(list(mats), _damping_tensor(damping, mats[0]), float(power),
                                                     evals, evecs))


@_cpu_or_cuda
def eigh_refresh(mats: list[torch.Tensor], prev_evecs: list[torch.Tensor], iters: int = 1,
                 clamp: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`iters` subspace-iteration steps Q <- qr(M Q) from `prev_evecs`, then l = diag(Q^T M Q) ascending."""
    evals, evecs = torch.ops.fop_kernels.eigh_refresh(list(mats), list(prev_evecs), int(iters), clamp)
    return list(evals), list(evecs)


@register("damped_cholesky_inverse", "cpp", ("cpu",))
def damped_cholesky_inverse(M: torch.Tensor, lam: torch.Tensor,
                            overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """((M_b + lam_b I)^-1, info) by LAPACK potrf/potri in place on one copy (csrc/cholesky.cpp), or on M itself
    with `overwrite` (the result is M)."""
    if overwrite:
        return M, torch.ops.fop_kernels.damped_cholesky_inverse_(M, lam)
    return torch.ops.fop_kernels.damped_cholesky_inverse(M, lam)
