"""C++ batched CG (torch.ops.fop_kernels.batched_cg, csrc/cg.cpp) registered as backend "cpp" for CPU tensors.

Two GEMMs per iteration into preallocated buffers and one parallel pass over the rows that does the whole CG vector
step of each row while it is in cache. A tensor damping is read once on the host (CPU tensors: no device sync).
"""

from __future__ import annotations

import torch

from fop_kernels._dispatch import register


@torch.library.register_fake("fop_kernels::batched_cg")
def _batched_cg_fake(X_s, row_weights, B, damping, iters, tol, x0):
    dt = torch.float64 if B.dtype == torch.float64 else torch.float32
    return torch.empty_like(B), B.new_empty(B.shape[0], dtype=dt)


@register("batched_cg", "cpp", devices=("cpu",))
def batched_cg(X_s, row_weights, B, damping, iters=10, tol=0.0, x0=None):
    """(X, residual norms): CG on every row at once; see fop_kernels.reference.cg."""
    return torch.ops.fop_kernels.batched_cg(X_s, row_weights, B, float(damping), int(iters), float(tol), x0)
