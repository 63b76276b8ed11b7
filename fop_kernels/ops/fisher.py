"""FOP's eigenbasis pipeline: the five Fisher inner products per layer and the projection-and-combine.

Formulas in fop_kernels.reference.fisher.
"""

from __future__ import annotations

import torch

from fop_kernels import _checks
from fop_kernels import reference as ref
from fop_kernels._dispatch import register, resolve

register("fisher_inner_products", "reference")(ref.fisher_inner_products)
register("project_combine", "reference")(ref.project_combine)

DAMPING_MODES = ("eigen", "factored")


def _check_layers(A_rot, D_rot, lG, lA, damping, damping_mode):
    A_rot = _checks.tensor_list("A_rot", A_rot, ndim=2)
    dev = A_rot[0].device
    D_rot = _checks.tensor_list("D_rot", D_rot, ndim=2)
    lG = _checks.tensor_list("lG", lG, ndim=1, dtypes=(torch.float32, torch.float64))
    lA = _checks.tensor_list("lA", lA, ndim=1, dtypes=(torch.float32, torch.float64))
    n = len(A_rot)
    for name, lst in (("D_rot", D_rot), ("lG", lG), ("lA", lA)):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} layers but A_rot has {n}")
        if lst[0].device != dev:
            raise ValueError(f"{name} is on {lst[0].device} but A_rot is on {dev}")
    for i in range(n):
        _checks.shape(f"D_rot[{i}]", D_rot[i], A_rot[i].shape)
        _checks.shape(f"lG[{i}]", lG[i], (A_rot[i].shape[0],))
        _checks.shape(f"lA[{i}]", lA[i], (A_rot[i].shape[1],))
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
    damping = _checks.nonnegative("damping", damping)
    return A_rot, D_rot, lG, lA, damping


def fisher_inner_products(A_rot, D_rot, lG, lA, damping, damping_mode: str = "eigen", *, backend: str | None = None):
    """(L x 5) fp32 tensor: per layer S1 = sum A~^2 f, S2 = sum A~ D~ f, a = sum A~^2/w, c = sum A~ D~/w,
    e0 = sum D~^2/w with f = lG lA^T and w per damping mode. All layers at once, no host sync."""
    A_rot, D_rot, lG, lA, damping = _check_layers(A_rot, D_rot, lG, lA, damping, damping_mode)
    _, fn = resolve("fisher_inner_products", A_rot[0].device, backend)
    return fn(A_rot, D_rot, lG, lA, damping, damping_mode=damping_mode)


def _check_choice(name, v, clip):
    if isinstance(v, str):
        if v != "adaptive":
            raise ValueError(f"{name} must be 'adaptive' or a float, got {v!r}")
    else:
        v = float(v)
    lo, hi = (float(c) for c in clip)
    if not lo <= hi:
        raise ValueError(f"{name}_clip must be (low, high) with low <= high, got {clip!r}")
    return v, (lo, hi)


def project_combine(A_rot, D_rot, sums, lG, lA, damping, damping_mode: str = "eigen", beta="adaptive",
                    eta="adaptive", beta_clip=(-0.5, 0.5), eta_clip=(0.0, 2.0), *, backend: str | None = None):
    """([U~ per layer], (L x 3) s_proj, beta, eta): U~ = eta (A~ + beta (D~ - s_proj A~)) / w.

    beta/eta "adaptive" use beta* = d/e and eta* = 2(a + beta d)/(a + 2 beta d + beta^2 e), clamped;
    a float fixes the value. beta=0, eta=1 gives the K-FAC update A~ / w exactly."""
    A_rot, D_rot, lG, lA, damping = _check_layers(A_rot, D_rot, lG, lA, damping, damping_mode)
    _checks.tensor("sums", sums, ndim=2, dtypes=(torch.float32, torch.float64), device=A_rot[0].device)
    _checks.shape("sums", sums, (len(A_rot), 5))
    beta, beta_clip = _check_choice("beta", beta, beta_clip)
    eta, eta_clip = _check_choice("eta", eta, eta_clip)
    _, fn = resolve("project_combine", A_rot[0].device, backend)
    return fn(A_rot, D_rot, sums, lG, lA, damping, damping_mode=damping_mode, beta=beta, eta=eta,
              beta_clip=beta_clip, eta_clip=eta_clip)
