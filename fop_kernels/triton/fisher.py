"""Backend "triton" of fisher_inner_products and project_combine: multi-tensor kernels, one launch per dtype group.

Every layer of a dtype group (A~/D~ dtype, lG dtype, lA dtype) goes into one launch through two int64 device
tables: a layer table (pointers of A~, D~, lG, lA, U~; rows, cols, row strides; the layer's output row) and a
program table (layer slot, row block). A program covers BLOCK_R rows of one layer and walks its columns in
BLOCK_C blocks, so layers of any shape share a launch and no block is padded beyond one row block.

  sums:    S1 = sum A~^2 f, S2 = sum A~ D~ f, a = sum A~^2 / w, c = sum A~ D~ / w, e0 = sum D~^2 / w,
           f = lG lA^T; accumulated in fp32 (fp64 for fp64 inputs) and added atomically into the (L x 5) output
           (so the last bits may vary from run to run on a GPU).
  combine: s = S2 / (S1 + eps), d = c - s a, e = e0 - 2 s c + s^2 a, beta = clamp(d / (e + eps)),
           eta = clamp(2 (a + beta d) / (a + 2 beta d + beta^2 e + eps)), U~ = eta (A~ + beta (D~ - s A~)) / w,
           per layer on the device from the sums; a fixed beta/eta replaces the adaptive value.

w = lG lA^T + damping ("eigen") or (lG + sqrt(damping)/pi)(lA + sqrt(damping) pi)^T ("factored",
pi = sqrt(max(mean lA, eps) / max(mean lG, eps)) from fp64 traces computed on the device by every program).
Float hyperparameters travel as the int64 bits of their float64 value, so the kernels see exactly the Python
float (Triton would round a float argument to fp32). The combine is compiled without FMA contraction and divides
with round-to-nearest, so w and U~ round exactly like the reference's separate torch ops. Host side: tables
are built from shapes and data_ptrs and copied with one non-blocking upload from pinned memory; no host sync.
"""

from __future__ import annotations

import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from fop_kernels._dispatch import register

# layer table row (the layout _layer_entry reads): A, D, lG, lA, U pointers; rows, cols, ldA, ldD; output row
_FIELDS = 10
_MAX_BLOCK_C = 256
_TILE = 2048  # BLOCK_R * BLOCK_C elements per program step
_BLOCK_T = 1024  # trace reduction block (factored damping)
_NUM_WARPS = 8  # 8 elements per thread per tile: the five fp32 sums kernel accumulators fit without spilling

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}


@triton.jit
def _layer_entry(layer_table_ptr, slot, A_DTYPE: tl.constexpr, LG_DTYPE: tl.constexpr, LA_DTYPE: tl.constexpr):
    """Pointers, sizes and output row of one layer from the int64 layer table."""
    base = layer_table_ptr + slot * 10  # _FIELDS
    a_ptr = tl.load(base + 0).to(tl.pointer_type(A_DTYPE))
    d_ptr = tl.load(base + 1).to(tl.pointer_type(A_DTYPE))
    lg_ptr = tl.load(base + 2).to(tl.pointer_type(LG_DTYPE))
    la_ptr = tl.load(base + 3).to(tl.pointer_type(LA_DTYPE))
    u_ptr = tl.load(base + 4).to(tl.pointer_type(A_DTYPE))
    rows = tl.load(base + 5)
    cols = tl.load(base + 6)
    ld_a = tl.load(base + 7)
    ld_d = tl.load(base + 8)
    out_row = tl.load(base + 9)
    return a_ptr, d_ptr, lg_ptr, la_ptr, u_ptr, rows, cols, ld_a, ld_d, out_row


@triton.jit
def _damping_f64(damping_bits, damping_ptr, DAMPING_FROM_PTR: tl.constexpr):
    """The damping in float64: from a 0-dim device tensor, or from the bits of a Python float."""
    if DAMPING_FROM_PTR:
        damping = tl.load(damping_ptr).to(tl.float64)
    else:
        damping = damping_bits.to(tl.int64).to(tl.float64, bitcast=True)
    return damping


@triton.jit
def _factored_shift(lg_ptr, la_ptr, rows, cols, damping, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
    """(lambda_G, lambda_A) in ACC: pi = sqrt(max(tr lA / cols, eps) / max(tr lG / rows, eps)) from fp64 traces,
    lambda_A = sqrt(damping) pi, lambda_G = sqrt(damping) / pi (fp64, rounded once)."""
    offs = tl.arange(0, BLOCK_T)
    trace_g = tl.zeros([BLOCK_T], dtype=tl.float64)
    for start in range(0, rows, BLOCK_T):
        idx = start + offs
        trace_g += tl.load(lg_ptr + idx, mask=idx < rows, other=0.0).to(tl.float64)
    trace_a = tl.zeros([BLOCK_T], dtype=tl.float64)
    for start in range(0, cols, BLOCK_T):
        idx = start + offs
        trace_a += tl.load(la_ptr + idx, mask=idx < cols, other=0.0).to(tl.float64)
    eps = tl.full([], 1e-30, tl.float64)
    mean_g = tl.maximum(tl.sum(trace_g, axis=0) / rows.to(tl.float64), eps)
    mean_a = tl.maximum(tl.sum(trace_a, axis=0) / cols.to(tl.float64), eps)
    pi = tl.sqrt(mean_a / mean_g)
    root = tl.sqrt(damping)
    return (root / pi).to(ACC), (root * pi).to(ACC)


@triton.jit
def _row_setup(lg_ptr, la_ptr, rows, cols, row_block, damping, FACTORED: tl.constexpr, ACC: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """Row offsets and mask of this program's row block, lG there, and the damping terms in ACC."""
    offs_r = row_block * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    mask_r = offs_r < rows
    g = tl.load(lg_ptr + offs_r, mask=mask_r, other=0.0).to(ACC)
    if FACTORED:
        lam_g, lam_a = _factored_shift(lg_ptr, la_ptr, rows, cols, damping, ACC, BLOCK_T)
        g_shift = g + lam_g
        damp = lam_a
    else:
        g_shift = g
        damp = damping.to(ACC)
    return offs_r, mask_r, g, g_shift, damp


@triton.jit
def _weights(g, g_shift, la, damp, FACTORED: tl.constexpr):
    """f = lG lA^T and w (eigen: f + damping; factored: (lG + lambda_G)(lA + lambda_A)^T) for one tile."""
    f = g[:, None] * la[None, :]
    if FACTORED:
        w = g_shift[:, None] * (la + damp)[None, :]
    else:
        w = f + damp
    return f, w


@triton.jit
def _load_tile(a_ptr, d_ptr, la_ptr, ld_a, ld_d, offs_r, mask_r, col_start, cols, g, g_shift, damp,
               FACTORED: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """One (BLOCK_R x BLOCK_C) tile at column col_start: A~ (x), D~ (y), undamped f, damped w, its mask, its columns."""
    offs_c = col_start + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < cols
    mask = mask_r[:, None] & mask_c[None, :]
    x = tl.load(a_ptr + offs_r[:, None] * ld_a + offs_c[None, :], mask=mask, other=0.0).to(ACC)
    y = tl.load(d_ptr + offs_r[:, None] * ld_d + offs_c[None, :], mask=mask, other=0.0).to(ACC)
    la = tl.load(la_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    f, w = _weights(g, g_shift, la, damp, FACTORED)
    return x, y, f, w, mask, offs_c


@triton.jit(do_not_specialize=["damping_bits"])
def _fisher_sums_kernel(layer_table_ptr, program_table_ptr, out_ptr, damping_bits, damping_ptr,
                        A_DTYPE: tl.constexpr, LG_DTYPE: tl.constexpr, LA_DTYPE: tl.constexpr, ACC: tl.constexpr,
                        FACTORED: tl.constexpr, DAMPING_FROM_PTR: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[layer] += (sum A~^2 f, sum A~ D~ f, sum A~^2 / w, sum A~ D~ / w, sum D~^2 / w) over this row block."""
    pid = tl.program_id(0).to(tl.int64)
    slot = tl.load(program_table_ptr + 2 * pid)
    row_block = tl.load(program_table_ptr + 2 * pid + 1)
    a_ptr, d_ptr, lg_ptr, la_ptr, u_ptr, rows, cols, ld_a, ld_d, out_row = _layer_entry(
        layer_table_ptr, slot, A_DTYPE, LG_DTYPE, LA_DTYPE)
    damping = _damping_f64(damping_bits, damping_ptr, DAMPING_FROM_PTR)
    offs_r, mask_r, g, g_shift, damp = _row_setup(lg_ptr, la_ptr, rows, cols, row_block, damping, FACTORED, ACC,
                                                  BLOCK_R, BLOCK_T)
    acc_s1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc_s2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc_a = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc_c = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc_e = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for col_start in range(0, cols, BLOCK_C):
        x, y, f, w, mask, offs_c = _load_tile(a_ptr, d_ptr, la_ptr, ld_a, ld_d, offs_r, mask_r, col_start, cols, g,
                                              g_shift, damp, FACTORED, ACC, BLOCK_C)
        inv_w = 1.0 / tl.where(mask, w, 1.0)
        xx = x * x
        xy = x * y
        yy = y * y
        acc_s1 += xx * f
        acc_s2 += xy * f
        acc_a += xx * inv_w
        acc_c += xy * inv_w
        acc_e += yy * inv_w
    out = out_ptr + out_row * 5
    tl.atomic_add(out + 0, tl.sum(tl.sum(acc_s1, axis=1), axis=0))
    tl.atomic_add(out + 1, tl.sum(tl.sum(acc_s2, axis=1), axis=0))
    tl.atomic_add(out + 2, tl.sum(tl.sum(acc_a, axis=1), axis=0))
    tl.atomic_add(out + 3, tl.sum(tl.sum(acc_c, axis=1), axis=0))
    tl.atomic_add(out + 4, tl.sum(tl.sum(acc_e, axis=1), axis=0))


@triton.jit
def _to_output(u, A_DTYPE: tl.constexpr):
    """u (fp32/fp64) rounded to nearest-even in A_DTYPE. bf16 is rounded by hand on the fp32 bits (exact on a
    GPU too) because the interpreter's fp32 -> bf16 cast truncates."""
    if A_DTYPE == tl.bfloat16:
        bits = u.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        u32 = tl.where(u == u, rounded.to(tl.float32, bitcast=True), u.to(tl.float32))
        out = u32.to(tl.bfloat16)
    else:
        out = u.to(A_DTYPE)
    return out


@triton.jit
def _div(x, y, ACC: tl.constexpr):
    """x / y rounded to nearest (Triton's default fp32 division is approximate)."""
    if ACC == tl.float32:
        q = tl.div_rn(x, y)
    else:
        q = x / y
    return q


@triton.jit(do_not_specialize=["damping_bits", "beta_bits", "eta_bits", "beta_lo_bits", "beta_hi_bits",
                               "eta_lo_bits", "eta_hi_bits"])
def _project_combine_kernel(layer_table_ptr, program_table_ptr, sums_ptr, sums_stride_r, sums_stride_c, scalars_ptr,
                            damping_bits, damping_ptr,
                            beta_bits, eta_bits, beta_lo_bits, beta_hi_bits, eta_lo_bits, eta_hi_bits,
                            A_DTYPE: tl.constexpr, LG_DTYPE: tl.constexpr, LA_DTYPE: tl.constexpr,
                            ACC: tl.constexpr, FACTORED: tl.constexpr,
                            DAMPING_FROM_PTR: tl.constexpr, ADAPTIVE_BETA: tl.constexpr,
                            ADAPTIVE_ETA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_T: tl.constexpr):
    """s, beta, eta of the layer from its sums (written once, by row block 0) and U~ over this row block."""
    pid = tl.program_id(0).to(tl.int64)
    slot = tl.load(program_table_ptr + 2 * pid)
    row_block = tl.load(program_table_ptr + 2 * pid + 1)
    a_ptr, d_ptr, lg_ptr, la_ptr, u_ptr, rows, cols, ld_a, ld_d, out_row = _layer_entry(
        layer_table_ptr, slot, A_DTYPE, LG_DTYPE, LA_DTYPE)
    damping = _damping_f64(damping_bits, damping_ptr, DAMPING_FROM_PTR)

    sums = sums_ptr + out_row * sums_stride_r
    s1 = tl.load(sums).to(ACC)
    s2 = tl.load(sums + sums_stride_c).to(ACC)
    a = tl.load(sums + 2 * sums_stride_c).to(ACC)
    c = tl.load(sums + 3 * sums_stride_c).to(ACC)
    e0 = tl.load(sums + 4 * sums_stride_c).to(ACC)
    eps = tl.full([], 1e-30, tl.float64).to(ACC)
    s = _div(s2, s1 + eps, ACC)
    d = c - s * a
    e = (e0 - (2.0 * s) * c) + (s * s) * a
    if ADAPTIVE_BETA:
        beta = _div(d, e + eps, ACC)
        beta = tl.maximum(beta, beta_lo_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC),
                          propagate_nan=tl.PropagateNan.ALL)
        beta = tl.minimum(beta, beta_hi_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC),
                          propagate_nan=tl.PropagateNan.ALL)
    else:
        beta = beta_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    if ADAPTIVE_ETA:
        num = 2.0 * (a + beta * d)
        den = ((a + (2.0 * beta) * d) + (beta * beta) * e) + eps
        eta = _div(num, den, ACC)
        eta = tl.maximum(eta, eta_lo_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC),
                         propagate_nan=tl.PropagateNan.ALL)
        eta = tl.minimum(eta, eta_hi_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC),
                         propagate_nan=tl.PropagateNan.ALL)
    else:
        eta = eta_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    if row_block == 0:
        tl.store(scalars_ptr + out_row * 3 + 0, s)
        tl.store(scalars_ptr + out_row * 3 + 1, beta)
        tl.store(scalars_ptr + out_row * 3 + 2, eta)

    offs_r, mask_r, g, g_shift, damp = _row_setup(lg_ptr, la_ptr, rows, cols, row_block, damping, FACTORED, ACC,
                                                  BLOCK_R, BLOCK_T)
    for col_start in range(0, cols, BLOCK_C):
        x, y, f, w, mask, offs_c = _load_tile(a_ptr, d_ptr, la_ptr, ld_a, ld_d, offs_r, mask_r, col_start, cols, g,
                                              g_shift, damp, FACTORED, ACC, BLOCK_C)
        u = _div(eta * (x + beta * (y - s * x)), tl.where(mask, w, 1.0), ACC)
        tl.store(u_ptr + offs_r[:, None] * cols + offs_c[None, :], _to_output(u, A_DTYPE), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Host side


def _f64_bits(x: float) -> int:
    """The IEEE-754 bits of float64(x) as a signed int64 (decoded in the kernels by a bitcast)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _working_dtype(*lists) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for ts in lists for t in ts) else torch.float32


def _unit_col_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _blocks(max_cols: int) -> tuple[int, int]:
    block_c = min(_MAX_BLOCK_C, max(16, triton.next_power_of_2(max_cols)))
    return max(1, _TILE // block_c), block_c


def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 device tensor of `values`: pinned host memory and a non-blocking copy on CUDA (no host sync)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def _groups(A_rot, lG, lA):
    """{(A dtype, lG dtype, lA dtype): [layer indices]} in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, (A, g, a) in enumerate(zip(A_rot, lG, lA)):
        groups.setdefault((A.dtype, g.dtype, a.dtype), []).append(i)
    return groups


def _tables(A_rot, D_rot, lG, lA, U, idx, device):
    """(layer table, program table, BLOCK_R, BLOCK_C, number of programs, tensors the tables point into) for the
    layers `idx` of one dtype group. Columns with a stride other than 1 are copied contiguous first; the caller
    holds the last item until the launch is queued (the caching allocator orders any reuse after the kernel)."""
    keep, layer_rows, program_rows = [], [], []
    block_r, block_c = _blocks(max(A_rot[i].shape[1] for i in idx))
    for slot, i in enumerate(idx):
        A, D = _unit_col_stride(A_rot[i]), _unit_col_stride(D_rot[i])
        g, a = lG[i].contiguous(), lA[i].contiguous()
        keep += [A, D, g, a]
        rows, cols = A.shape
        u_ptr = U[i].data_ptr() if U is not None else 0
        layer_rows += [A.data_ptr(), D.data_ptr(), g.data_ptr(), a.data_ptr(), u_ptr, rows, cols,
                       A.stride(0), D.stride(0), i]
        for rb in range(triton.cdiv(rows, block_r)):
            program_rows += [slot, rb]
    table = _upload(layer_rows + program_rows, device)
    n_layer = _FIELDS * len(idx)
    return table[:n_layer], table[n_layer:], block_r, block_c, len(program_rows) // 2, keep


def _damping_args(damping: float, damping_tensor: Optional[torch.Tensor], like: torch.Tensor):
    if damping_tensor is None:
        return _f64_bits(damping), like, False
    return 0, damping_tensor, True


@torch.library.custom_op("fop_kernels::fisher_inner_products_triton", mutates_args=())
def _fisher_inner_products_op(A_rot: list[torch.Tensor], D_rot: list[torch.Tensor], lG: list[torch.Tensor],
                              lA: list[torch.Tensor], damping: float, damping_tensor: Optional[torch.Tensor],
                              damping_mode: str) -> torch.Tensor:
    device = A_rot[0].device
    acc = _working_dtype(A_rot, D_rot, lG, lA)
    out = torch.zeros((len(A_rot), 5), dtype=acc, device=device)
    damping_bits, damping_ptr, from_ptr = _damping_args(damping, damping_tensor, out)
    for (a_dtype, g_dtype, l_dtype), idx in _groups(A_rot, lG, lA).items():
        layer_table, program_table, block_r, block_c, n_programs, _keep = _tables(A_rot, D_rot, lG, lA, None, idx,
                                                                                  device)
        _fisher_sums_kernel[(n_programs,)](
            layer_table, program_table, out, damping_bits, damping_ptr,
            A_DTYPE=_TL_DTYPES[a_dtype], LG_DTYPE=_TL_DTYPES[g_dtype], LA_DTYPE=_TL_DTYPES[l_dtype],
            ACC=_TL_DTYPES[acc], FACTORED=damping_mode == "factored", DAMPING_FROM_PTR=from_ptr,
            BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_T=_BLOCK_T, num_warps=_NUM_WARPS)
    return out


@_fisher_inner_products_op.register_fake
def _(A_rot, D_rot, lG, lA, damping, damping_tensor, damping_mode):
    return A_rot[0].new_empty((len(A_rot), 5), dtype=_working_dtype(A_rot, D_rot, lG, lA))


@torch.library.custom_op("fop_kernels::project_combine_triton", mutates_args=())
def _project_combine_op(A_rot: list[torch.Tensor], D_rot: list[torch.Tensor], sums: torch.Tensor,
                        lG: list[torch.Tensor], lA: list[torch.Tensor], damping: float,
                        damping_tensor: Optional[torch.Tensor], damping_mode: str, beta: Optional[float],
                        eta: Optional[float], beta_lo: float, beta_hi: float, eta_lo: float,
                        eta_hi: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    device = A_rot[0].device
    acc = _working_dtype(A_rot, D_rot, lG, lA, [sums])
    U = [torch.empty(A.shape, dtype=A.dtype, device=device) for A in A_rot]
    scalars = torch.empty((len(A_rot), 3), dtype=acc, device=device)
    damping_bits, damping_ptr, from_ptr = _damping_args(damping, damping_tensor, scalars)
    for (a_dtype, g_dtype, l_dtype), idx in _groups(A_rot, lG, lA).items():
        layer_table, program_table, block_r, block_c, n_programs, _keep = _tables(A_rot, D_rot, lG, lA, U, idx,
                                                                                  device)
        _project_combine_kernel[(n_programs,)](
            layer_table, program_table, sums, sums.stride(0), sums.stride(1), scalars, damping_bits, damping_ptr,
            _f64_bits(0.0 if beta is None else beta), _f64_bits(1.0 if eta is None else eta),
            _f64_bits(beta_lo), _f64_bits(beta_hi), _f64_bits(eta_lo), _f64_bits(eta_hi),
            A_DTYPE=_TL_DTYPES[a_dtype], LG_DTYPE=_TL_DTYPES[g_dtype], LA_DTYPE=_TL_DTYPES[l_dtype],
            ACC=_TL_DTYPES[acc], FACTORED=damping_mode == "factored",
            DAMPING_FROM_PTR=from_ptr, ADAPTIVE_BETA=beta is None, ADAPTIVE_ETA=eta is None,
            BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_T=_BLOCK_T, num_warps=_NUM_WARPS, enable_fp_fusion=False)
    return U, scalars


@_project_combine_op.register_fake
def _(A_rot, D_rot, sums, lG, lA, damping, damping_tensor, damping_mode, beta, eta, beta_lo, beta_hi, eta_lo,
      eta_hi):
    dtype = _working_dtype(A_rot, D_rot, lG, lA, [sums])
    return [torch.empty(A.shape, dtype=A.dtype, device=A.device) for A in A_rot], sums.new_empty(
        (len(A_rot), 3), dtype=dtype)


def _split_damping(damping):
    if isinstance(damping, torch.Tensor):
        return 0.0, damping
    return float(damping), None


@register("fisher_inner_products", "triton", devices=("cuda", "cpu"))
def fisher_inner_products(A_rot, D_rot, lG, lA, damping, damping_mode="eigen"):
    """(L x 5) S1, S2, a, c, e0 per layer: one multi-tensor launch per dtype group."""
    value, tensor = _split_damping(damping)
    return _fisher_inner_products_op(list(A_rot), list(D_rot), list(lG), list(lA), value, tensor, damping_mode)


@register("project_combine", "triton", devices=("cuda", "cpu"))
def project_combine(A_rot, D_rot, sums, lG, lA, damping, damping_mode="eigen", beta="adaptive", eta="adaptive",
                    beta_clip=(-0.5, 0.5), eta_clip=(0.0, 2.0)):
    """([U~ per layer], (L x 3) s, beta, eta): scalars and U~ in one multi-tensor launch per dtype group."""
    value, tensor = _split_damping(damping)
    U, scalars = _project_combine_op(
        list(A_rot), list(D_rot), sums, list(lG), list(lA), value, tensor, damping_mode,
        None if beta == "adaptive" else float(beta), None if eta == "adaptive" else float(eta),
        float(beta_clip[0]), float(beta_clip[1]), float(eta_clip[0]), float(eta_clip[1]))
    return list(U), scalars
