"""Triton batched conjugate gradient for FROG's row-wise systems (formulas in fop_kernels.reference.cg).

Every iteration is two GEMMs over X_s (torch.mm into preallocated buffers) and one fused Triton kernel, one program
per row r, that does the rest of the CG step in place:

    Ap_r  = (F_r / t_r) p_r + damping p_r        (the GEMM part arrives in ap; damping is added here)
    alpha = <r_r, r_r> / <p_r, Ap_r>,  x_r += alpha p_r,  r_r -= alpha Ap_r
    beta  = <r_r, r_r>_new / <r_r, r_r>,  p_r = r_r + beta p_r

Rows whose squared residual is at or under threshold_r = (tol |b_r|)^2 are frozen (not touched). The loop count is
a host integer and every scalar (residuals, thresholds, damping) stays on the device: no host syncs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fop_kernels._dispatch import interpreter_enabled, register
from fop_kernels.reference.cg import normalized_row_weights

MAX_BLOCK_D = 1024


@triton.jit
def _cg_row_step_kernel(
    x_ptr, r_ptr, p_ptr, ap_ptr, rs_ptr, threshold_ptr, damping_ptr,
    dim, stride_row,
    ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One CG step of row r (see the module docstring); rs[r] <- |r_r|^2 after the step. Frozen rows are skipped."""
    row = tl.program_id(0).to(tl.int64)
    base = row * stride_row
    rs = tl.load(rs_ptr + row)
    if rs > tl.load(threshold_ptr + row):
        damping = tl.load(damping_ptr).to(ACC_DTYPE)
        pap_acc = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
        for d0 in range(0, dim, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            mask = offs < dim
            p = tl.load(p_ptr + base + offs, mask=mask, other=0.0)
            ap = tl.load(ap_ptr + base + offs, mask=mask, other=0.0) + damping * p
            pap_acc += p * ap
        pap = tl.sum(pap_acc, axis=0)
        alpha = tl.where(pap > 0, rs / tl.where(pap > 0, pap, 1.0), 0.0)
        rs_acc = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
        for d0 in range(0, dim, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            mask = offs < dim
            p = tl.load(p_ptr + base + offs, mask=mask, other=0.0)
            ap = tl.load(ap_ptr + base + offs, mask=mask, other=0.0) + damping * p
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0) + alpha * p
            r = tl.load(r_ptr + base + offs, mask=mask, other=0.0) - alpha * ap
            tl.store(x_ptr + base + offs, x, mask=mask)
            tl.store(r_ptr + base + offs, r, mask=mask)
            rs_acc += r * r
        rs_new = tl.sum(rs_acc, axis=0)
        beta = tl.where(rs > 0, rs_new / tl.where(rs > 0, rs, 1.0), 0.0)
        for d0 in range(0, dim, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            mask = offs < dim
            r = tl.load(r_ptr + base + offs, mask=mask, other=0.0)
            p = tl.load(p_ptr + base + offs, mask=mask, other=0.0)
            tl.store(p_ptr + base + offs, r + beta * p, mask=mask)
        tl.store(rs_ptr + row, rs_new)


def _block_d(dim: int) -> int:
    cap = MAX_BLOCK_D if interpreter_enabled() else 1024
    return max(16, min(cap, triton.next_power_of_2(max(dim, 1))))


@torch.library.custom_op("fop_kernels::triton_batched_cg", mutates_args=())
def _batched_cg_op(X_s: torch.Tensor, row_weights: torch.Tensor, B: torch.Tensor, damping: torch.Tensor,
                   iters: int, tol: float, x0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, residual norms) of the damped row-wise systems; see the module docstring."""
    dt = torch.float64 if B.dtype == torch.float64 else torch.float32
    X_s = X_s.to(dt).contiguous()
    w_hat = normalized_row_weights(X_s, row_weights.to(dt))  # s x R
    Bf = B.to(dt)
    R, D = Bf.shape
    damping_t = damping.to(device=B.device, dtype=dt).reshape(())
    T = torch.empty(X_s.shape[0], R, device=B.device, dtype=dt)
    Ap = torch.empty(R, D, device=B.device, dtype=dt)
    if x0 is None:
        x = torch.zeros(R, D, device=B.device, dtype=dt)
        r = Bf.clone()
    else:
        x = x0.to(dt).clone()
        torch.mm(X_s, x.T, out=T).mul_(w_hat)
        r = Bf - torch.mm(T.T, X_s, out=Ap) - damping_t * x
    r = r.contiguous()
    p = r.clone()
    rs = (r * r).sum(1)
    threshold = (tol * Bf.norm(dim=1)) ** 2
    block_d = _block_d(D)
    for _ in range(iters):
        torch.mm(X_s, p.T, out=T).mul_(w_hat)
        torch.mm(T.T, X_s, out=Ap)
        _cg_row_step_kernel[(R,)](x, r, p, Ap, rs, threshold, damping_t, D, D,
                                 ACC_DTYPE=tl.float64 if dt == torch.float64 else tl.float32, BLOCK_D=block_d)
    return x.to(B.dtype), rs.sqrt()


@_batched_cg_op.register_fake
def _(X_s, row_weights, B, damping, iters, tol, x0):
    dt = torch.float64 if B.dtype == torch.float64 else torch.float32
    return torch.empty_like(B), B.new_empty(B.shape[0], dtype=dt)


@register("batched_cg", "triton", devices=("cuda", "cpu"))  # cpu only under TRITON_INTERPRET=1, when forced
def batched_cg(X_s, row_weights, B, damping, iters=10, tol=0.0, x0=None):
    """(X, residual norms): CG on every row at once, the row updates fused in one Triton kernel per iteration."""
    if not isinstance(damping, torch.Tensor):
        dt = torch.float64 if B.dtype == torch.float64 else torch.float32
        damping = torch.full((), float(damping), dtype=dt, device=B.device)
    return _batched_cg_op(X_s, row_weights, B, damping, int(iters), float(tol), x0)
