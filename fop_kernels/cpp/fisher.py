"""Backend "cpp" of fisher_inner_products and project_combine: the fused C++ kernels of csrc/fisher.cpp.

torch.ops.fop_kernels.fisher_inner_products / project_combine (CPU impls) get fake implementations here so
they trace under torch.compile.
"""

from __future__ import annotations

import torch

from fop_kernels._dispatch import register

_ops = torch.ops.fop_kernels


def _working_dtype(*lists) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for ts in lists for t in ts) else torch.float32


@torch.library.register_fake("fop_kernels::fisher_inner_products")
def _fisher_inner_products_fake(A_rot, D_rot, lG, lA, damping, damping_mode):
    return A_rot[0].new_empty((len(A_rot), 5), dtype=_working_dtype(A_rot, D_rot, lG, lA))


@torch.library.register_fake("fop_kernels::project_combine")
def _project_combine_fake(A_rot, D_rot, sums, lG, lA, damping, damping_mode, beta, eta, beta_lo, beta_hi, eta_lo,
                          eta_hi):
    dtype = _working_dtype(A_rot, D_rot, lG, lA, [sums])
    return [torch.empty(A.shape, dtype=A.dtype, device=A.device) for A in A_rot], sums.new_empty(
        (len(A_rot), 3), dtype=dtype)


def _damping_value(damping) -> float:
    """The damping as a float; a 0-dim CPU tensor is read directly (CPU memory: no device sync)."""
    return float(damping)


@register("fisher_inner_products", "cpp", devices=("cpu",))
def fisher_inner_products(A_rot, D_rot, lG, lA, damping, damping_mode="eigen"):
    """(L x 5) S1, S2, a, c, e0 per layer: one parallel, vectorized pass over A~ and D~ (fop_kernels._C)."""
    return _ops.fisher_inner_products(list(A_rot), list(D_rot), list(lG), list(lA), _damping_value(damping),
                                      damping_mode)


@register("project_combine", "cpp", devices=("cpu",))
def project_combine(A_rot, D_rot, sums, lG, lA, damping, damping_mode="eigen", beta="adaptive", eta="adaptive",
                    beta_clip=(-0.5, 0.5), eta_clip=(0.0, 2.0)):
    """([U~ = eta (A~ + beta (D~ - s A~)) / w per layer], (L x 3) s, beta, eta): one pass (fop_kernels._C)."""
    U, scalars = _ops.project_combine(
        list(A_rot), list(D_rot), sums, list(lG), list(lA), _damping_value(damping), damping_mode,
        None if beta == "adaptive" else float(beta), None if eta == "adaptive" else float(eta),
        float(beta_clip[0]), float(beta_clip[1]), float(eta_clip[0]), float(eta_clip[1]))
    return list(U), scalars
