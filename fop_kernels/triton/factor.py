"""Triton kernels for Kronecker-factor accumulation (formulas in fop_kernels.reference.factor).

- `accumulate_factor`: F <- keep * F + coef * X^T X with keep = 1 - decay, coef = decay * scale. A tiled GEMM over
  the upper-triangle tiles (bi <= bj) only; each program mirrors its tile into (bj, bi), and the EMA is the GEMM's
  epilogue, so F is read once and written once and X^T X is never materialized.
- `accumulate_factor_diag`: f <- keep * f + coef * sum_n X_n^2, one program per block of columns.
- conv forms: the same kernels with the rows of X being the im2col patches of x, gathered inside the kernel
  (implicit im2col, bias column of ones generated in place); coef carries the 1/L of the conv factor.

Accumulation is fp32 (fp64 when X or the state is fp64). fp32 dots run with input_precision="ieee" (no tf32), so
the result meets the fp32 tolerance of the reference. fp16/bf16 tiles go to tl.dot as they are on a GPU (fp32
accumulate); under the CPU interpreter every tile is converted to the accumulation dtype at load (bf16 arithmetic is
wrong there). `decay == 1` does not read the state (READ_STATE=False), like BLAS beta = 0. Triton < 3.5 has no
float64 tl.dot: there fp64 tiles are multiplied by broadcast-and-sum on smaller tiles (USE_DOT=False).

The launchers are torch.library custom ops (mutating their state argument) with fake kernels, so they trace under
torch.compile and pass torch.library.opcheck.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from fop_kernels._dispatch import interpreter_enabled, register
from fop_kernels.reference.factor import accumulation_dtype, conv_output_size

MAX_BLOCK = 128


def _version(v: str) -> tuple[int, int]:
    major, minor = (v.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


FP64_DOT = _version(triton.__version__) >= (3, 5)  # tl.dot accepts float64 tiles from triton 3.5


@triton.jit
def _dense_tile(x_ptr, rows, cols, n_rows, n_cols, stride_row, stride_col, LOAD_DTYPE: tl.constexpr):
    """X[rows, cols] (rows: BLOCK_K rows of X, cols: BLOCK columns), 0 outside X, as LOAD_DTYPE."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tile = tl.load(x_ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)
    return tile.to(LOAD_DTYPE)


@triton.jit
def _patch_tile(x_ptr, rows, cols, n_rows, n_image_cols, positions, out_w, kernel_area, kernel_w, height, width,
                stride_xn, stride_xc, stride_xh, stride_xw, conv_stride_h, conv_stride_w, pad_h, pad_w,
                dil_h, dil_w, BIAS: tl.constexpr, LOAD_DTYPE: tl.constexpr):
    """P[rows, cols] of the im2col matrix of x, gathered from x: row m = (n, oh, ow), column = (c, i, j) [+ bias].

    P[(n, oh, ow), c*kh*kw + i*kw + j] = x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw] (0 outside the image);
    the column n_image_cols (when BIAS) is all ones."""
    n = rows // positions
    pos = rows % positions
    oh = pos // out_w
    ow = pos % out_w
    c = cols // kernel_area
    ij = cols % kernel_area
    ki = ij // kernel_w
    kj = ij % kernel_w
    ih = oh[:, None] * conv_stride_h - pad_h + ki[None, :] * dil_h
    iw = ow[:, None] * conv_stride_w - pad_w + kj[None, :] * dil_w
    row_ok = rows[:, None] < n_rows
    mask = row_ok & (cols[None, :] < n_image_cols) & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
    ptrs = x_ptr + n[:, None] * stride_xn + c[None, :] * stride_xc + ih * stride_xh + iw * stride_xw
    tile = tl.load(ptrs, mask=mask, other=0.0).to(LOAD_DTYPE)
    if BIAS:
        tile = tl.where(row_ok & (cols[None, :] == n_image_cols), 1.0, tile).to(LOAD_DTYPE)
    return tile


@triton.jit
def _factor_ema_kernel(
    state_ptr, x_ptr,
    n_rows, dim, n_image_cols,
    stride_state_row, stride_state_col,
    stride_x0, stride_x1, stride_x2, stride_x3,
    positions, out_w, kernel_area, kernel_w, height, width,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    keep_hi, keep_lo, coef_hi, coef_lo,
    PATCHES: tl.constexpr, BIAS: tl.constexpr, READ_STATE: tl.constexpr, LOAD_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, USE_DOT: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One upper-triangle tile (bi <= bj) of F <- keep * F + coef * X^T X, mirrored into tile (bj, bi).

    Program t maps to the tile with t = bj (bj + 1) / 2 + bi. keep and coef arrive split as hi + lo fp32 parts
    so that fp64 states get fp64 coefficients. Tiles are loaded as LOAD_DTYPE."""
    t = tl.program_id(0).to(tl.int64)
    bj = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int64)
    bj = tl.where(bj * (bj + 1) // 2 > t, bj - 1, bj)
    bj = tl.where((bj + 1) * (bj + 2) // 2 <= t, bj + 1, bj)
    bi = t - bj * (bj + 1) // 2
    rows_i = bi * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    cols_j = bj * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC_DTYPE)
    for k0 in range(0, n_rows, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        if PATCHES:
            a = _patch_tile(x_ptr, ks, rows_i, n_rows, n_image_cols, positions, out_w, kernel_area, kernel_w,
                            height, width, stride_x0, stride_x1, stride_x2, stride_x3, conv_stride_h,
                            conv_stride_w, pad_h, pad_w, dil_h, dil_w, BIAS, LOAD_DTYPE)
            b = _patch_tile(x_ptr, ks, cols_j, n_rows, n_image_cols, positions, out_w, kernel_area, kernel_w,
                            height, width, stride_x0, stride_x1, stride_x2, stride_x3, conv_stride_h,
                            conv_stride_w, pad_h, pad_w, dil_h, dil_w, BIAS, LOAD_DTYPE)
        else:
            a = _dense_tile(x_ptr, ks, rows_i, n_rows, dim, stride_x0, stride_x1, LOAD_DTYPE)
            b = _dense_tile(x_ptr, ks, cols_j, n_rows, dim, stride_x0, stride_x1, LOAD_DTYPE)
        if USE_DOT:
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        else:  # acc[i, j] += sum_k a[k, i] b[k, j] without tl.dot (float64 on triton < 3.5)
            acc += tl.sum(a[:, :, None] * b[:, None, :], axis=0)
    update = acc * coef_hi + acc * coef_lo
    mask = (rows_i[:, None] < dim) & (cols_j[None, :] < dim)
    ptrs_ij = state_ptr + rows_i[:, None] * stride_state_row + cols_j[None, :] * stride_state_col
    out_ij = update
    if READ_STATE:
        old = tl.load(ptrs_ij, mask=mask, other=0.0).to(ACC_DTYPE)
        out_ij = old * keep_hi + old * keep_lo + update
    tl.store(ptrs_ij, out_ij.to(state_ptr.dtype.element_ty), mask=mask)
    if bi != bj:
        mask_t = (cols_j[:, None] < dim) & (rows_i[None, :] < dim)
        ptrs_ji = state_ptr + cols_j[:, None] * stride_state_row + rows_i[None, :] * stride_state_col
        out_ji = tl.trans(update)
        if READ_STATE:
            old_t = tl.load(ptrs_ji, mask=mask_t, other=0.0).to(ACC_DTYPE)
            out_ji = old_t * keep_hi + old_t * keep_lo + out_ji
        tl.store(ptrs_ji, out_ji.to(state_ptr.dtype.element_ty), mask=mask_t)


@triton.jit
def _diag_ema_kernel(
    state_ptr, x_ptr,
    n_rows, dim, n_image_cols, stride_state,
    stride_x0, stride_x1, stride_x2, stride_x3,
    positions, out_w, kernel_area, kernel_w, height, width,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    keep_hi, keep_lo, coef_hi, coef_lo,
    PATCHES: tl.constexpr, BIAS: tl.constexpr, READ_STATE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """f[cols] <- keep * f[cols] + coef * sum_rows X[rows, cols]^2 for one block of columns."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for k0 in range(0, n_rows, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        if PATCHES:
            tile = _patch_tile(x_ptr, ks, cols, n_rows, n_image_cols, positions, out_w, kernel_area, kernel_w,
                               height, width, stride_x0, stride_x1, stride_x2, stride_x3, conv_stride_h,
                               conv_stride_w, pad_h, pad_w, dil_h, dil_w, BIAS, ACC_DTYPE)
        else:
            tile = _dense_tile(x_ptr, ks, cols, n_rows, dim, stride_x0, stride_x1, ACC_DTYPE)
        acc += tl.sum(tile * tile, axis=0)
    update = acc * coef_hi + acc * coef_lo
    mask = cols < dim
    ptrs = state_ptr + cols * stride_state
    out = update
    if READ_STATE:
        old = tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        out = old * keep_hi + old * keep_lo + update
    tl.store(ptrs, out.to(state_ptr.dtype.element_ty), mask=mask)


def _fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _split(value: float) -> tuple[float, float]:
    """value = hi + lo with hi, lo representable in fp32 (lo carries what fp32 rounds away)."""
    hi = _fp32(value)
    return hi, _fp32(value - hi)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _gemm_settings(dim: int, n_rows: int, use_dot: bool = True) -> dict:
    """Square output tiles; under the interpreter large blocks (few programs), on a GPU 64/128 tiles (32 x 32 with
    a K step of 8 without tl.dot: the broadcast product holds BLOCK_K * BLOCK^2 values)."""
    if interpreter_enabled():
        return {"BLOCK": _block(dim, 16, MAX_BLOCK), "BLOCK_K": _block(n_rows, 16, MAX_BLOCK)}
    if not use_dot:
        return {"BLOCK": 32, "BLOCK_K": 8, "num_warps": 4, "num_stages": 2}
    block = 128 if dim >= 1024 else 64
    return {"BLOCK": block, "BLOCK_K": 32, "num_warps": 8 if block == 128 else 4, "num_stages": 3}


def _diag_settings(dim: int, n_rows: int) -> dict:
    if interpreter_enabled():
        return {"BLOCK": _block(dim, 16, MAX_BLOCK), "BLOCK_K": _block(n_rows, 16, MAX_BLOCK)}
    return {"BLOCK": _block(dim, 16, 128), "BLOCK_K": 64, "num_warps": 4}


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


# Geometry arguments of the dense form (unused by the kernels when PATCHES is False).
_NO_GEOMETRY = (1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1)


def _conv_args(x: torch.Tensor, kernel_size, stride, padding, dilation, bias: bool):
    """(n_rows, dim, n_image_cols, x strides, geometry args, positions L) of the implicit patch matrix of x."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    oh, ow = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    positions = oh * ow
    n_image_cols = c * kh * kw
    geometry = (positions, ow, kh * kw, kw, h, w, sh, sw, ph, pw, dh, dw)
    return n * positions, n_image_cols + int(bias), n_image_cols, tuple(x.stride()), geometry, positions


def _launch_factor(state, x, decay, coef, patches, bias, n_rows, dim, n_image_cols, x_strides, geometry):
    if dim == 0:
        return
    acc = accumulation_dtype(state, x)
    # half-precision tiles feed tl.dot as they are on a GPU (fp32 accumulate); the interpreter needs fp32 tiles
    upcast = interpreter_enabled() or x.dtype in (torch.float32, torch.float64) or acc == torch.float64
    use_dot = acc != torch.float64 or FP64_DOT
    settings = _gemm_settings(dim, n_rows, use_dot)
    tiles = triton.cdiv(dim, settings["BLOCK"])
    _factor_ema_kernel[(tiles * (tiles + 1) // 2,)](
        state, x, n_rows, dim, n_image_cols, state.stride(0), state.stride(1), *x_strides, *geometry,
        *_split(1.0 - decay), *_split(coef),
        PATCHES=patches, BIAS=bias, READ_STATE=decay != 1.0, LOAD_DTYPE=_TL_DTYPES[acc if upcast else x.dtype],
        ACC_DTYPE=_TL_DTYPES[acc],
        PRECISION="ieee", USE_DOT=use_dot, **settings,
    )


def _launch_diag(state, x, decay, coef, patches, bias, n_rows, dim, n_image_cols, x_strides, geometry):
    if dim == 0:
        return
    settings = _diag_settings(dim, n_rows)
    _diag_ema_kernel[(triton.cdiv(dim, settings["BLOCK"]),)](
        state, x, n_rows, dim, n_image_cols, state.stride(0), *x_strides, *geometry,
        *_split(1.0 - decay), *_split(coef),
        PATCHES=patches, BIAS=bias, READ_STATE=decay != 1.0, ACC_DTYPE=_TL_DTYPES[accumulation_dtype(state, x)],
        **settings,
    )


@torch.library.custom_op("fop_kernels::triton_accumulate_factor", mutates_args=("F",))
def _accumulate_factor_op(F: torch.Tensor, X: torch.Tensor, decay: float, coef: float) -> None:
    """F <- (1-decay) F + coef X^T X in place (triangle tiles, mirrored, EMA epilogue)."""
    n, d = X.shape
    _launch_factor(F, X, decay, coef, False, False, n, d, d, (X.stride(0), X.stride(1), 0, 0), _NO_GEOMETRY)


@_accumulate_factor_op.register_fake
def _(F, X, decay, coef):
    return None


@torch.library.custom_op("fop_kernels::triton_accumulate_factor_diag", mutates_args=("f",))
def _accumulate_factor_diag_op(f: torch.Tensor, X: torch.Tensor, decay: float, coef: float) -> None:
    """f <- (1-decay) f + coef sum_n X_n^2 in place."""
    n, d = X.shape
    _launch_diag(f, X, decay, coef, False, False, n, d, d, (X.stride(0), X.stride(1), 0, 0), _NO_GEOMETRY)


@_accumulate_factor_diag_op.register_fake
def _(f, X, decay, coef):
    return None


@torch.library.custom_op("fop_kernels::triton_accumulate_conv_factor", mutates_args=("F",))
def _accumulate_conv_factor_op(F: torch.Tensor, x: torch.Tensor, decay: float, scale: float, kernel_size: list[int],
                               stride: list[int], padding: list[int], dilation: list[int], bias: bool) -> None:
    """F <- (1-decay) F + decay scale P^T P / L, P the im2col patches of x gathered inside the kernel."""
    n_rows, dim, n_image_cols, strides, geometry, positions = _conv_args(x, kernel_size, stride, padding, dilation,
                                                                          bias)
    _launch_factor(F, x, decay, decay * scale / positions, True, bias, n_rows, dim, n_image_cols, strides, geometry)


@_accumulate_conv_factor_op.register_fake
def _(F, x, decay, scale, kernel_size, stride, padding, dilation, bias):
    return None


@torch.library.custom_op("fop_kernels::triton_accumulate_conv_factor_diag", mutates_args=("f",))
def _accumulate_conv_factor_diag_op(f: torch.Tensor, x: torch.Tensor, decay: float, scale: float,
                                    kernel_size: list[int], stride: list[int], padding: list[int],
                                    dilation: list[int], bias: bool) -> None:
    """f <- (1-decay) f + decay scale sum over patches of P^2 / L, patches gathered inside the kernel."""
    n_rows, dim, n_image_cols, strides, geometry, positions = _conv_args(x, kernel_size, stride, padding, dilation,
                                                                          bias)
    _launch_diag(f, x, decay, decay * scale / positions, True, bias, n_rows, dim, n_image_cols, strides, geometry)


@_accumulate_conv_factor_diag_op.register_fake
def _(f, x, decay, scale, kernel_size, stride, padding, dilation, bias):
    return None


_DEVICES = ("cuda", "cpu")  # cpu only under TRITON_INTERPRET=1 and only when forced (see fop_kernels._dispatch)


@register("accumulate_factor", "triton", devices=_DEVICES)
def accumulate_factor(F, X, decay, scale=1.0):
    """F <- (1-decay) F + decay * scale * X^T X in place (X an (..., d) tensor or a list of them); returns F."""
    blocks = [b.reshape(-1, b.shape[-1]) for b in (X if isinstance(X, (list, tuple)) else [X])]
    _accumulate_factor_op(F, blocks[0] if len(blocks) == 1 else torch.cat(blocks), float(decay),
                          float(decay) * float(scale))
    return F


@register("accumulate_factor_diag", "triton", devices=_DEVICES)
def accumulate_factor_diag(f, X, decay, scale=1.0):
    """f <- (1-decay) f + decay * scale * sum_n X_n^2 in place; returns f."""
    _accumulate_factor_diag_op(f, X, float(decay), float(decay) * float(scale))
    return f


@register("accumulate_conv_factor", "triton", devices=_DEVICES)
def accumulate_conv_factor(F, x, decay, kernel_size, stride=1, padding=0, dilation=1, bias=False, scale=1.0):
    """F <- (1-decay) F + decay * scale * P^T P / L with implicit im2col; returns F."""
    geometry = [list(v) if not isinstance(v, int) else [v, v] for v in (kernel_size, stride, padding, dilation)]
    _accumulate_conv_factor_op(F, x, float(decay), float(scale), *geometry, bool(bias))
    return F


@register("accumulate_conv_factor_diag", "triton", devices=_DEVICES)
def accumulate_conv_factor_diag(f, x, decay, kernel_size, stride=1, padding=0, dilation=1, bias=False, scale=1.0):
    """f <- (1-decay) f + decay * scale * sum over patches of P^2 / L with implicit im2col; returns f."""
    geometry = [list(v) if not isinstance(v, int) else [v, v] for v in (kernel_size, stride, padding, dilation)]
    _accumulate_conv_factor_diag_op(f, x, float(decay), float(scale), *geometry, bool(bias))
    return f
