"""Kronecker-factor accumulation (K-FAC's A and G, AdaFisher's diagonals), dense and conv (im2col) forms.

Conventions (every backend): fp32 accumulation (fp64 when X or the state is fp64); `decay == 1` overwrites
the state without reading it; the conv forms divide by the number L of output positions per sample.

Non-finite inputs: with `check_finite=True` (the default) the op raises before touching the state when X
holds NaN/inf, because one bad batch would poison the running factor for good. That check is one reduction
over X and a host sync; an optimizer that checks its inputs itself (once for all layers) passes
`check_finite=False` to keep the step free of syncs.
"""

from __future__ import annotations

import torch

from fop_kernels import _checks
from fop_kernels import reference as ref
from fop_kernels._dispatch import register, resolve
from fop_kernels.reference.factor import conv_output_size

for _name in ("accumulate_factor", "accumulate_factor_diag", "accumulate_conv_factor", "accumulate_conv_factor_diag"):
    register(_name, "reference")(getattr(ref, _name))

_STATE_DTYPES = (torch.float32, torch.float64)


def _check_common(name_state: str, state: torch.Tensor, name_x: str, X: torch.Tensor, decay,
                  scale) -> tuple[float, float]:
    _checks.tensor(name_state, state, dtypes=_STATE_DTYPES)
    _checks.tensor(name_x, X, device=state.device)
    decay = _checks.unit_interval("decay", decay)
    scale = float(scale)
    if not (scale == scale) or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {scale}")
    return decay, scale


def _check_values(name_x: str, X: torch.Tensor, check_finite: bool) -> None:
    if check_finite:
        _checks.finite(name_x, X)


def _row_blocks(X) -> list[torch.Tensor]:
    """X as a list of (..., d) row tensors (one tensor, or a list/tuple of them)."""
    blocks = list(X) if isinstance(X, (list, tuple)) else [X]
    if not blocks:
        raise ValueError("X must be a tensor or a non-empty list of tensors")
    return blocks


def accumulate_factor(F, X, decay, scale: float = 1.0, *, check_finite: bool = True, backend: str | None = None):
    """F <- (1-decay) F + decay * scale * X^T X in place; returns F. Any float dtype, fp32 accumulation.

    X holds the rows: an (..., d) tensor (every leading index is a row, so a channels-last view of a conv output
    gradient needs no copy) or a list of them (their rows stacked, without a concatenating copy)."""
    blocks = _row_blocks(X)
    decay, scale = _check_common("F", F, "X", blocks[0], decay, scale)
    for b in blocks:
        _checks.tensor("X", b, device=F.device)
        if b.dim() < 2:
            raise ValueError(f"X must have rows: shape (..., d) with at least 2 dims, got {tuple(b.shape)}")
        _checks.shape("F", F, (b.shape[-1], b.shape[-1]))
        _check_values("X", b, check_finite)
    _, fn = resolve("accumulate_factor", F.device, backend)
    return fn(F, blocks, decay, scale)


def accumulate_factor_diag(f, X, decay, scale: float = 1.0, *, check_finite: bool = True,
                           backend: str | None = None):
    """f <- (1-decay) f + decay * scale * sum_n X_n^2 in place (X: N x d). Returns f."""
    decay, scale = _check_common("f", f, "X", X, decay, scale)
    if X.dim() != 2:
        raise ValueError(f"X must be 2-D (N x d), got shape {tuple(X.shape)}")
    _checks.shape("f", f, (X.shape[1],))
    _check_values("X", X, check_finite)
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
    out = [conv_output_size(x.shape[2 + a], k[a], s[a], p[a], d[a]) for a in range(2)]
    if min(out) < 1:
        raise ValueError(f"kernel_size={k} with dilation={d} does not fit x of spatial size {tuple(x.shape[2:])} "
                         f"padded by {p} (output size {tuple(out)})")
    return k, s, p, d


def accumulate_conv_factor(F, x, decay, kernel_size, stride=1, padding=0, dilation=1, bias: bool = False,
                           scale: float = 1.0, *, check_finite: bool = True, backend: str | None = None):
    """F <- (1-decay) F + decay * scale * P^T P / L, P the im2col patches of x ((N*L) x (C*kh*kw [+1 for bias])).

    L is the number of output positions per sample; pass scale = 1/N for the mean over samples and positions."""
    decay, scale = _check_common("F", F, "x", x, decay, scale)
    k, s, p, d = _check_conv(x, kernel_size, stride, padding, dilation)
    dim = x.shape[1] * k[0] * k[1] + int(bias)
    _checks.shape("F", F, (dim, dim))
    _check_values("x", x, check_finite)
    _, fn = resolve("accumulate_conv_factor", F.device, backend)
    return fn(F, x, decay, k, s, p, d, bias, scale)


def accumulate_conv_factor_diag(f, x, decay, kernel_size, stride=1, padding=0, dilation=1, bias: bool = False,
                                scale: float = 1.0, *, check_finite: bool = True, backend: str | None = None):
    """f <- (1-decay) f + decay * scale * sum over patches of P^2 / L (diagonal of the conv input factor)."""
    decay, scale = _check_common("f", f, "x", x, decay, scale)
    k, s, p, d = _check_conv(x, kernel_size, stride, padding, dilation)
    _checks.shape("f", f, (x.shape[1] * k[0] * k[1] + int(bias),))
    _check_values("x", x, check_finite)
    _, fn = resolve("accumulate_conv_factor_diag", f.device, backend)
    return fn(f, x, decay, k, s, p, d, bias, scale)
