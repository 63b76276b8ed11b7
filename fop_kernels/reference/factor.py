"""Kronecker-factor accumulation: F <- (1-decay) F + decay * scale * X^T X, its diagonal, and the conv forms.

Conventions shared by every backend:
- accumulation in float32 for float32/float16/bfloat16 inputs, in float64 when X or the state is float64;
- `decay == 1` overwrites the state: its old contents are not read (BLAS `beta = 0`), so a state full of
  NaN (freshly allocated) becomes exactly `scale * X^T X`;
- conv: P is the im2col patch matrix of x ((N*L) x (C*kh*kw [+1 bias column of ones]), L output positions
  per sample) and the conv factor is divided by L: `F <- (1-decay) F + decay * scale * P^T P / L`
  (with `scale = 1/N` that is the K-FAC mean over samples and positions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_nn


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _ema_(state: torch.Tensor, update: torch.Tensor, decay: float, coef: float) -> torch.Tensor:
    """state <- (1-decay) state + coef * update; state is not read when decay == 1."""
    if decay == 1.0:
        return state.copy_(update.mul_(coef))
    return state.mul_(1.0 - decay).add_(update.to(state.dtype), alpha=coef)


def accumulate_factor(F: torch.Tensor, X, decay: float, scale: float = 1.0) -> torch.Tensor:
    """F <- (1-decay) F + decay * scale * X^T X in place, fp32 accumulation; returns F. X: an (..., d) tensor whose
    leading indices are rows, or a list of them (rows stacked)."""
    blocks = list(X) if isinstance(X, (list, tuple)) else [X]
    Xa = torch.cat([b.reshape(-1, b.shape[-1]) for b in blocks]).to(accumulation_dtype(F, *blocks))
    return _ema_(F, Xa.T @ Xa, decay, decay * scale)


def accumulate_factor_diag(f: torch.Tensor, X: torch.Tensor, decay: float, scale: float = 1.0) -> torch.Tensor:
    """f <- (1-decay) f + decay * scale * sum_n X_n^2 in place (X: N x d); returns f."""
    return _ema_(f, X.to(accumulation_dtype(f, X)).square().sum(0), decay, decay * scale)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output positions of a conv along one axis: floor((size + 2 p - d (k - 1) - 1) / s) + 1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_patches(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, bias: bool = False) -> torch.Tensor:
    """im2col patches of x (N, C, H, W) as an (N*L) x (C*kh*kw [+1]) matrix, L output positions.

    Column c*kh*kw + i*kw + j holds x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw] (0 outside the image),
    the order of Conv2d's flattened weight; the bias column is all ones."""
    cols = F_nn.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # N x D x L
    P = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if bias:
        P = torch.cat([P, P.new_ones(P.shape[0], 1)], dim=1)
    return P


def _positions(x, kernel_size, stride, padding, dilation) -> int:
    pair = [(v, v) if isinstance(v, int) else tuple(v) for v in (kernel_size, stride, padding, dilation)]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pair
    return (conv_output_size(x.shape[2], kh, sh, ph, dh) * conv_output_size(x.shape[3], kw, sw, pw, dw))


def accumulate_conv_factor(F, x, decay, kernel_size, stride=1, padding=0, dilation=1, bias=False, scale=1.0):
    """F <- (1-decay) F + decay * scale * P^T P / L with P the im2col patches of x (see conv_patches)."""
    P = conv_patches(x.to(accumulation_dtype(F, x)), kernel_size, stride, padding, dilation, bias)
    L = _positions(x, kernel_size, stride, padding, dilation)
    return accumulate_factor(F, P, decay, scale / L)


def accumulate_conv_factor_diag(f, x, decay, kernel_size, stride=1, padding=0, dilation=1, bias=False, scale=1.0):
    """f <- (1-decay) f + decay * scale * sum over patches of P^2 / L (the diagonal of the conv factor)."""
    P = conv_patches(x.to(accumulation_dtype(f, x)), kernel_size, stride, padding, dilation, bias)
    L = _positions(x, kernel_size, stride, padding, dilation)
    return accumulate_factor_diag(f, P, decay, scale / L)
