"""FOP's eigenbasis pipeline: the five Fisher inner products per layer and the projection-and-combine.

Formulas in fop_kernels.reference.fisher. Conventions (every backend): arithmetic in float32, or float64
when any input tensor is float64; A_rot[i] and D_rot[i] share a dtype (fp32, fp64, fp16 or bf16); U~ comes
back in A_rot[i]'s dtype. `damping` is a float >= 0 or a 0-dim tensor on the layers' device
(fop_kernels._checks.damping, shared by every backend: a CPU tensor's value is checked, a device tensor's is
never read on the host, so no sync). Neither op mutates its inputs, so no value checks (NaN/inf) are made:
those would cost a host sync per call.
"""

from __future__ import annotations

import math

import torch

from fop_kernels import _checks
from fop_kernels import reference as ref
from fop_kernels._dispatch import register, resolve

register("fisher_inner_products", "reference")(ref.fisher_inner_products)
register("project_combine", "reference")(ref.project_combine)
register("combine_scalars", "reference")(ref.combine_scalars)

DAMPING_MODES = ("eigen", "factored")
_EIGEN_DTYPES = (torch.float32, torch.float64)


def _check_layers(A_rot, D_rot, lG, lA, damping, damping_mode):
    A_rot = _checks.tensor_list("A_rot", A_rot, ndim=2)
    dev = A_rot[0].device
    D_rot = _checks.tensor_list("D_rot", D_rot, ndim=2)
    lG = _checks.tensor_list("lG", lG, ndim=1, dtypes=_EIGEN_DTYPES)
    lA = _checks.tensor_list("lA", lA, ndim=1, dtypes=_EIGEN_DTYPES)
    n = len(A_rot)
    for name, lst in (("D_rot", D_rot), ("lG", lG), ("lA", lA)):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} layers but A_rot has {n}")
        if lst[0].device != dev:
            raise ValueError(f"{name} is on {lst[0].device} but A_rot is on {dev}")
    for i in range(n):
        if A_rot[i].numel() == 0:
            raise ValueError(f"A_rot[{i}] is empty (shape {tuple(A_rot[i].shape)}); every layer needs out, in >= 1")
        _checks.shape(f"D_rot[{i}]", D_rot[i], A_rot[i].shape)
        if D_rot[i].dtype != A_rot[i].dtype:
            raise TypeError(f"D_rot[{i}] has dtype {D_rot[i].dtype} but A_rot[{i}] has {A_rot[i].dtype}")
        _checks.shape(f"lG[{i}]", lG[i], (A_rot[i].shape[0],))
        _checks.shape(f"lA[{i}]", lA[i], (A_rot[i].shape[1],))
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
    damping = _checks.damping("damping", damping, dtypes=_EIGEN_DTYPES, device=dev)
    return A_rot, D_rot, lG, lA, damping


def fisher_inner_products(A_rot, D_rot, lG, lA, damping, damping_mode: str = "eigen", *, backend: str | None = None):
    """(L x 5) tensor on the layers' device: per layer S1 = sum A~^2 f, S2 = sum A~ D~ f, a = sum A~^2/w,
    c = sum A~ D~/w, e0 = sum D~^2/w with f = lG lA^T and w = f + damping ("eigen") or
    (lG + sqrt(damping)/pi)(lA + sqrt(damping) pi)^T ("factored", pi = sqrt(mean lA / mean lG)).
    float32 (float64 when an input is float64). All layers at once, no host sync."""
    A_rot, D_rot, lG, lA, damping = _check_layers(A_rot, D_rot, lG, lA, damping, damping_mode)
    _, fn = resolve("fisher_inner_products", A_rot[0].device, backend)
    return fn(A_rot, D_rot, lG, lA, damping, damping_mode=damping_mode)


def _check_choice(name, v, clip):
    if isinstance(v, str):
        if v != "adaptive":
            raise ValueError(f"{name} must be 'adaptive' or a float, got {v!r}")
    elif isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be 'adaptive' or a float, got {type(v).__name__}")
    else:
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
    if not isinstance(clip, (list, tuple)) or len(clip) != 2:
        raise ValueError(f"{name}_clip must be a pair (low, high), got {clip!r}")
    lo, hi = (float(c) for c in clip)
    if math.isnan(lo) or math.isnan(hi) or not lo <= hi:
        raise ValueError(f"{name}_clip must be (low, high) with low <= high, got {clip!r}")
    return v, (lo, hi)


def project_combine(A_rot, D_rot, sums, lG, lA, damping, damping_mode: str = "eigen", beta="adaptive",
                    eta="adaptive", beta_clip=(-0.5, 0.5), eta_clip=(0.0, 2.0), *, backend: str | None = None):
    """([U~ per layer], (L x 3) s_proj, beta, eta): U~ = eta (A~ + beta (D~ - s_proj A~)) / w.

    s_proj = S2 / (S1 + eps); with d = c - s a and e = e0 - 2 s c + s^2 a, "adaptive" beta and eta are
    beta* = clamp(d / e, beta_clip) and eta* = clamp(2 (a + beta d) / (a + 2 beta d + beta^2 e), eta_clip);
    a float fixes the value (unclamped). beta=0, eta=1 gives the K-FAC update A~ / w exactly.
    U~[i] has A_rot[i]'s dtype; the scalars are float32 (float64 when an input is float64). No host sync."""
    A_rot, D_rot, lG, lA, damping = _check_layers(A_rot, D_rot, lG, lA, damping, damping_mode)
    _checks.tensor("sums", sums, ndim=2, dtypes=_EIGEN_DTYPES, device=A_rot[0].device)
    _checks.shape("sums", sums, (len(A_rot), 5))
    beta, beta_clip = _check_choice("beta", beta, beta_clip)
    eta, eta_clip = _check_choice("eta", eta, eta_clip)
    _, fn = resolve("project_combine", A_rot[0].device, backend)
    return fn(A_rot, D_rot, sums, lG, lA, damping, damping_mode=damping_mode, beta=beta, eta=eta,
              beta_clip=beta_clip, eta_clip=eta_clip)


def combine_scalars(sums, beta="adaptive", eta="adaptive", beta_clip=(-0.5, 0.5), eta_clip=(0.0, 2.0), *,
                    backend: str | None = None):
    """(L x 3) s_proj, beta, eta from the (L x 5) sums S1, S2, a, c, e0 (the formulas of project_combine).

    For preconditioners that form F g and F_w^-1 g without an eigenbasis (K-FAC's Cholesky inverses): the sums are
    then plain inner products, and U = eta (F_w^-1 g_avg + beta (F_w^-1 g_diff - s_proj F_w^-1 g_avg)). No host
    sync; the scalars have the dtype of `sums`."""
    _checks.tensor("sums", sums, ndim=2, dtypes=_EIGEN_DTYPES)
    if sums.shape[1] != 5:
        raise ValueError(f"sums must be (layers, 5): S1, S2, a, c, e0; got shape {tuple(sums.shape)}")
    beta, beta_clip = _check_choice("beta", beta, beta_clip)
    eta, eta_clip = _check_choice("eta", eta, eta_clip)
    _, fn = resolve("combine_scalars", sums.device, backend)
    return fn(sums, beta=beta, eta=eta, beta_clip=beta_clip, eta_clip=eta_clip)
