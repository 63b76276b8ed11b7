"""Kronecker-factor accumulation (K-FAC's A and G, AdaFisher's diagonals), dense and conv (im2col) forms."""

from __future__ import annotations

import torch

from fop_kernels import _checks
from fop_kernels import reference as ref
from fop_kernels._dispatch import register, resolve

for _name in ("accumulate_factor", "accumulate_factor_diag", "accumulate_conv_factor", "accumulate_conv_factor_diag"):
    register(_name, "reference")(getattr(ref, _name))

_STATE_DTYPES = (torch.float32, torch.float64)


def _check_common(name_state: str, state: torch.Tensor, X: torch.Tensor, decay, scale) -> tuple[float, float]:
    _checks.tensor(name_state, state, dtypes=_STATE_DTYPES)
    _checks.tensor("X", X, device=state.device)
    decay = _checks.unit_interval("decay", decay)
    scale = float(scale)
    if not (scale == scale) or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {scale}")
    return decay, scale


def accumulate_factor(F, X, decay, scale: float = 1.0, *, backend: str | None = None):
    """F <- (1-decay) F + decay * scale * X^T X in place (X: N x d, any float dtype; fp32 accumulation). Returns F."""
    decay, scale = _check_common("F", F, X, decay, scale)
    if X.dim() != 2:
        raise ValueError(f"X must be 2-D (N x d), got shape {tuple(X.shape)}")
    _checks.shape("F", F, (X.shape[1], X.shape[1]))
    _, fn = resolve("accumulate_factor", F.device, backend)
    return fn(F, X, decay, scale)


def accumulate_factor_diag(f, X, decay, scale: float = 1.0, *, backend: str | None = None):
    """f <- (1-decay) f + decay * scale * sum_n X_n^2 in place (X: N x d). Returns f."""
    decay, scale = _check_common("f", f, X, decay, scale)
    if X.dim() != 2:
        raise ValueError(f"X must be 2-D (N x d), got shape {tuple(X.shape)}")
    _checks.shape("f", f, (X.shape[1],))
    _, fn = resolve("accumulate_factor_diag", f.device, backend)
    return fn(f, X, decay, scale)


def _pair(name, v):
    v = (v, v) if isinstance(v, int) else tuple(v)
    if len(v) != 2 or any(int(e) != e for e in v):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return tuple(int(e) for e in v)


def _check_conv(x, kernel_size, stride, padding, dilation):
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    k, s, p, d = (_pair(n, v) for n, v in
                  (("kernel_size", kernel_size), ("stride", stride), ("padding", padding), ("dilation", dilation)))
    if min(k) < 1 or min(s) < 1 or min(d) < 1 or min(p) < 0:
        raise ValueError(f"invalid conv geometry kernel_size={k} stride={s} padding={p} dilation={d}")
    return k, s, p, d


def accumulate_conv_factor(F, x, decay, kernel_size, stride=1, padding=0, dilation=1, bias: bool = False,
                           scale: float = 1.0, *, backend: str | None = None):
    """F <- (1-decay) F + decay * scale * P^T P, P the im2col patches of x ((N*L) x (C*kh*kw [+1 for bias]))."""
    decay, scale = _check_common("F", F, x, decay, scale)
    k, s, p, d = _check_conv(x, kernel_size, stride, padding, dilation)
    dim = x.shape[1] * k[0] * k[1] + int(bias)
    _checks.shape("F", F, (dim, dim))
    _, fn = resolve("accumulate_conv_factor", F.device, backend)
    return fn(F, x, decay, k, s, p, d, bias, scale)


def accumulate_conv_factor_diag(f, x, decay, kernel_size, stride=1, padding=0, dilation=1, bias: bool = False,
                                scale: float = 1.0, *, backend: str | None = None):
    """f <- (1-decay) f + decay * scale * sum over patches of P^2 (diagonal of the conv input factor)."""
    decay, scale = _check_common("f", f, x, decay, scale)
    k, s, p, d = _check_conv(x, kernel_size, stride, padding, dilation)
    _checks.shape("f", f, (x.shape[1] * k[0] * k[1] + int(bias),))
    _, fn = resolve("accumulate_conv_factor_diag", f.device, backend)
    return fn(f, x, decay, k, s, p, d, bias, scale)
