"""Kronecker-factor accumulation: F <- (1-decay) F + decay * scale * X^T X, and its diagonal."""

from __future__ import annotations

import torch
import torch.nn.functional as F_nn


def accumulate_factor(F: torch.Tensor, X: torch.Tensor, decay: float, scale: float = 1.0) -> torch.Tensor:
    """F <- (1-decay) F + decay * scale * X^T X in place (X: N x d), fp32 accumulation; returns F."""
    Xf = X.float()
    F.mul_(1.0 - decay).add_((Xf.T @ Xf).to(F.dtype), alpha=decay * scale)
    return F


def accumulate_factor_diag(f: torch.Tensor, X: torch.Tensor, decay: float, scale: float = 1.0) -> torch.Tensor:
    """f <- (1-decay) f + decay * scale * sum_n X_n^2 in place (X: N x d); returns f."""
    f.mul_(1.0 - decay).add_(X.float().square().sum(0).to(f.dtype), alpha=decay * scale)
    return f


def conv_patches(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, bias: bool = False) -> torch.Tensor:
    """im2col patches of x (N, C, H, W) as an (N*L) x (C*kh*kw [+1]) matrix, L output positions."""
    cols = F_nn.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # N x D x L
    P = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if bias:
        P = torch.cat([P, P.new_ones(P.shape[0], 1)], dim=1)
    return P


def accumulate_conv_factor(F, x, decay, kernel_size, stride=1, padding=0, dilation=1, bias=False, scale=1.0):
    """F <- (1-decay) F + decay * scale * P^T P with P the im2col patches of x (see conv_patches)."""
    return accumulate_factor(F, conv_patches(x, kernel_size, stride, padding, dilation, bias), decay, scale)


def accumulate_conv_factor_diag(f, x, decay, kernel_size, stride=1, padding=0, dilation=1, bias=False, scale=1.0):
    """f <- (1-decay) f + decay * scale * sum over patches of P^2 (the diagonal of P^T P)."""
    return accumulate_factor_diag(f, conv_patches(x, kernel_size, stride, padding, dilation, bias), decay, scale)
