"""FOP's eigenbasis pipeline: the five Fisher inner products and the projection-and-combine.

Per layer, with rotated gradients A~ = Q_G^T g_avg Q_A and D~ = Q_G^T g_diff Q_A (out x in),
undamped eigenvalues f = lG lA^T and damped w:
  S1 = sum A~^2 f, S2 = sum A~ D~ f, a = sum A~^2 / w, c = sum A~ D~ / w, e0 = sum D~^2 / w
  s = S2 / (S1 + eps); d = c - s a; e = e0 - 2 s c + s^2 a
  beta = clamp(d / (e + eps)); eta = clamp(2 (a + beta d) / (a + 2 beta d + beta^2 e + eps))
  U~ = eta (A~ + beta (D~ - s A~)) / w
"""

from __future__ import annotations

import torch

EPS = 1e-30


def damping_weights(lG: torch.Tensor, lA: torch.Tensor, damping, damping_mode: str = "eigen") -> torch.Tensor:
    """w (out x in): "eigen": lG lA^T + damping; "factored": (lG + sqrt(damping)/pi)(lA + sqrt(damping) pi)^T,
    pi = sqrt((sum lA / dim A) / (sum lG / dim G))."""
    lG = lG.double() if lG.dtype == torch.float64 else lG.float()
    lA = lA.to(lG.dtype)
    if damping_mode == "eigen":
        return torch.outer(lG, lA) + damping
    if damping_mode == "factored":
        pi = torch.sqrt((lA.sum() / lA.numel()) / (lG.sum() / lG.numel()).clamp_min(EPS)).clamp_min(EPS)
        root = damping**0.5 if not isinstance(damping, torch.Tensor) else damping.sqrt()
        return torch.outer(lG + root / pi, lA + root * pi)
    raise ValueError(f"damping_mode must be 'eigen' or 'factored', got {damping_mode!r}")


def fisher_inner_products(A_rot, D_rot, lG, lA, damping, damping_mode: str = "eigen") -> torch.Tensor:
    """(L x 5) tensor of S1, S2, a, c, e0 per layer (fp32, or fp64 for fp64 inputs)."""
    rows = []
    for A, D, g, a in zip(A_rot, D_rot, lG, lA):
        w = damping_weights(g, a, damping, damping_mode)
        A, D = A.to(w.dtype), D.to(w.dtype)
        f = torch.outer(g, a).to(w.dtype)
        AD = A * D
        AA, DD = A * A, D * D
        rows.append(torch.stack([(AA * f).sum(), (AD * f).sum(), (AA / w).sum(), (AD / w).sum(), (DD / w).sum()]))
    return torch.stack(rows)


def combine_scalars(sums: torch.Tensor, beta="adaptive", eta="adaptive", beta_clip=(-0.5, 0.5), eta_clip=(0.0, 2.0),
                    eps: float = EPS) -> torch.Tensor:
    """(L x 3) tensor of s_proj, beta, eta from the (L x 5) sums."""
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
    """([U~ per layer], (L x 3) s_proj/beta/eta): U~ = eta (A~ + beta (D~ - s A~)) / w."""
    scalars = combine_scalars(sums, beta, eta, beta_clip, eta_clip)
    out = []
    for i, (A, D, g, a) in enumerate(zip(A_rot, D_rot, lG, lA)):
        w = damping_weights(g, a, damping, damping_mode)
        s, b, n = scalars[i].to(w.dtype).unbind()
        Af, Df = A.to(w.dtype), D.to(w.dtype)
        out.append((n * (Af + b * (Df - s * Af)) / w).to(A.dtype))
    return out, scalars
