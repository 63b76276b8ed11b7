"""C++ factor accumulation (torch.ops.fop_kernels.accumulate_*_, csrc/factor.cpp) registered as backend "cpp".

- dense factor: tiled syrk (about half a GEMM's flops for large d) with the EMA applied per tile; rows given as
  (..., d) views or lists are copied in chunks of about 16 MiB, never whole;
- dense diagonal: one fused pass over X (no N x d temporary);
- conv factor, stride 1: no patches at all: the image-wide correlations of x with itself for every kernel-tap
  offset from one oneDNN weight-gradient convolution, minus thin border strips; other strides (or when the flop
  count says so): channels-last patches gathered in one copy, then the syrk; either way in chunks of samples of
  about 16 MiB of temporaries; the bias row and column from windowed sums of sum_n x (no concat);
- conv diagonal: no im2col at all: sum_n x^2 per channel, then a windowed sum per kernel tap.
Which of them beats the reference, and by how much, is in bench/RESULTS.md#factor-accumulation-and-batched-cg.
"""

from __future__ import annotations

import torch

from fop_kernels._dispatch import register
from fop_kernels.reference.factor import conv_output_size


@torch.library.register_fake("fop_kernels::accumulate_factor_")
def _accumulate_factor_fake(F, X, decay, coef):
    return None


@torch.library.register_fake("fop_kernels::accumulate_factor_diag_")
def _accumulate_factor_diag_fake(f, X, decay, coef):
    return None


@torch.library.register_fake("fop_kernels::accumulate_conv_factor_")
def _accumulate_conv_factor_fake(F, x, decay, coef, kernel_size, stride, padding, dilation, bias, method=0):
    return None


@torch.library.register_fake("fop_kernels::accumulate_conv_factor_diag_")
def _accumulate_conv_factor_diag_fake(f, x, decay, coef, kernel_size, stride, padding, dilation, bias):
    return None


def _pairs(*values):
    return [[v, v] if isinstance(v, int) else [int(e) for e in v] for v in values]


def _positions(x, kernel_size, stride, padding, dilation) -> int:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pairs(kernel_size, stride, padding, dilation)
    return conv_output_size(x.shape[2], kh, sh, ph, dh) * conv_output_size(x.shape[3], kw, sw, pw, dw)


@register("accumulate_factor", "cpp", devices=("cpu",))
def accumulate_factor(F, X, decay, scale=1.0):
    """F <- (1-decay) F + decay * scale * X^T X in place (blocked syrk; X an (..., d) tensor or a list of them, each
    copied in bounded chunks where it must be copied at all); returns F."""
    blocks = list(X) if isinstance(X, (list, tuple)) else [X]
    torch.ops.fop_kernels.accumulate_factor_(F, blocks, float(decay), float(decay) * float(scale))
    return F


@register("accumulate_factor_diag", "cpp", devices=("cpu",))
def accumulate_factor_diag(f, X, decay, scale=1.0):
    """f <- (1-decay) f + decay * scale * sum_n X_n^2 in place (one fused pass); returns f."""
    torch.ops.fop_kernels.accumulate_factor_diag_(f, X, float(decay), float(decay) * float(scale))
    return f


@register("accumulate_conv_factor", "cpp", devices=("cpu",))
def accumulate_conv_factor(F, x, decay, kernel_size, stride=1, padding=0, dilation=1, bias=False, scale=1.0):
    """F <- (1-decay) F + decay * scale * P^T P / L (shifted correlations or gathered patches); returns F."""
    coef = float(decay) * float(scale) / _positions(x, kernel_size, stride, padding, dilation)
    torch.ops.fop_kernels.accumulate_conv_factor_(F, x, float(decay), coef,
                                                  *_pairs(kernel_size, stride, padding, dilation), bool(bias))
    return F


@register("accumulate_conv_factor_diag", "cpp", devices=("cpu",))
def accumulate_conv_factor_diag(f, x, decay, kernel_size, stride=1, padding=0, dilation=1, bias=False, scale=1.0):
    """f <- (1-decay) f + decay * scale * sum over patches of P^2 / L (windowed sums, no im2col); returns f."""
    coef = float(decay) * float(scale) / _positions(x, kernel_size, stride, padding, dilation)
    torch.ops.fop_kernels.accumulate_conv_factor_diag_(f, x, float(decay), coef,
                                                       *_pairs(kernel_size, stride, padding, dilation), bool(bias))
    return f
