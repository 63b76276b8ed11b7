"""FOP's eigenbasis pipeline: the five Fisher inner products and the projection-and-combine.

Per layer, with rotated gradients A~ = Q_G^T g_avg Q_A and D~ = Q_G^T g_diff Q_A (out x in),
undamped eigenvalues f = lG lA^T and damped w:
  S1 = sum A~^2 f, S2 = sum A~ D~ f, a = sum A~^2 / w, c = sum A~ D~ / w, e0 = sum D~^2 / w
  s = S2 / (S1 + eps); d = c - s a; e = e0 - 2 s c + s^2 a
  beta = clamp(d / (e + eps)); eta = clamp(2 (a + beta d) / (a + 2 beta d + beta^2 e + eps))
  U~ = eta (A~ + beta (D~ - s A~)) / w

Arithmetic runs in float32, or in float64 when any input tensor is float64 ("the working dtype").
The factored damping's traces and pi are formed in float64 and rounded once to the working dtype,
so every backend forms the same w bit for bit.
"""

from __future__ import annotations

import torch

EPS = 1e-30


def working_dtype(*tensor_lists) -> torch.dtype:
    """float64 when any tensor in the given lists (or tensors) is float64, else float32."""
    for ts in tensor_lists:
        for t in ts if isinstance(ts, (list, tuple)) else (ts,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                return torch.float64
    return torch.float32


def factored_split(lG: torch.Tensor, lA: torch.Tensor, damping):
    """(lambda_G, lambda_A) in float64: pi = sqrt((sum lA / dim A) / (sum lG / dim G)),
    lambda_A = sqrt(damping) pi, lambda_G = sqrt(damping) / pi (means clamped at eps, so pi > 0)."""
    mean_A = (lA.double().sum() / lA.numel()).clamp_min(EPS)
    mean_G = (lG.double().sum() / lG.numel()).clamp_min(EPS)
    pi = torch.sqrt(mean_A / mean_G)
    root = torch.as_tensor(damping, dtype=torch.float64, device=lG.device).sqrt()
    return root / pi, root * pi


def damping_weights(lG: torch.Tensor, lA: torch.Tensor, damping, damping_mode: str = "eigen",
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """w (out x in) in `dtype` (default: the working dtype of lG, lA).

    "eigen": w = lG lA^T + damping; "factored": w = (lG + lambda_G)(lA + lambda_A)^T (see factored_split)."""
    dtype = dtype or working_dtype(lG, lA)
    lG, lA = lG.to(dtype), lA.to(dtype)
    if damping_mode == "eigen":
        damping = damping.to(dtype) if isinstance(damping, torch.Tensor) else damping
        return torch.outer(lG, lA) + damping
    if damping_mode == "factored":
        lam_G, lam_A = factored_split(lG, lA, damping)
        return torch.outer(lG + lam_G.to(dtype), lA + lam_A.to(dtype))
    raise ValueError(f"damping_mode must be 'eigen' or 'factored', got {damping_mode!r}")


def fisher_inner_products(A_rot, D_rot, lG, lA, damping, damping_mode: str = "eigen") -> torch.Tensor:
    """(L x 5) tensor of S1, S2, a, c, e0 per layer, in the working dtype."""
    dtype = working_dtype(A_rot, D_rot, lG, lA)
    rows = []
    for A, D, g, a in zip(A_rot, D_rot, lG, lA):
        w = damping_weights(g, a, damping, damping_mode, dtype)
        A, D = A.to(dtype), D.to(dtype)
        f = torch.outer(g.to(dtype), a.to(dtype))
        AA, AD, DD = A * A, A * D, D * D
        rows.append(torch.stack([(AA * f).sum(), (AD * f).sum(), (AA / w).sum(), (AD / w).sum(), (DD / w).sum()]))
    return torch.stack(rows)


def combine_scalars(sums: torch.Tensor, beta="adaptive", eta="adaptive", beta_clip=(-0.5, 0.5), eta_clip=(0.0, 2.0),
                    eps: float = EPS) -> torch.Tensor:
    """(L x 3) tensor of s_proj, beta, eta from the (L x 5) sums (a float beta/eta is used as given, unclamped)."""
    S1, S2, a, c, e0 = sums.unbind(1)
    s = S2 / (S1 + eps)
    d = c - s * a
    e = e0 - 2 * s * c + s * s * a
    if beta == "adaptive":
        b = (d / (e + eps)).clamp(*beta_clip)
    else:
        b = torch.full_like(s, float(beta))
    if eta == "adaptive":
        n = (2 * (a + b * d) / (a + 2 * b * d + b * b * e + eps)).clamp(*eta_clip)
    else:
        n = torch.full_like(s, float(eta))
    return torch.stack([s, b, n], dim=1)


def project_combine(A_rot, D_rot, sums, lG, lA, damping, damping_mode="eigen", beta="adaptive", eta="adaptive",
                    beta_clip=(-0.5, 0.5), eta_clip=(0.0, 2.0)):
    """([U~ per layer, dtype of A~], (L x 3) s_proj/beta/eta): U~ = eta (A~ + beta (D~ - s A~)) / w."""
    dtype = working_dtype(A_rot, D_rot, lG, lA, sums)
    scalars = combine_scalars(sums.to(dtype), beta, eta, beta_clip, eta_clip)
    out = []
    for i, (A, D, g, a) in enumerate(zip(A_rot, D_rot, lG, lA)):
        w = damping_weights(g, a, damping, damping_mode, dtype)
        s, b, n = scalars[i].unbind()
        Af, Df = A.to(dtype), D.to(dtype)
        out.append((n * (Af + b * (Df - s * Af)) / w).to(A.dtype))
    return out, scalars
