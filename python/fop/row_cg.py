"""Conjugate gradient on every row of a batch of systems at once (FROG's and K-FROG's per-row Fisher solves).

Each row r of B (R x D) is its own system F^_r z_r = b_r; the solver never forms F^_r, it asks for products
(`matvec`: F^_r p_r for every row, `quad`: p_r^T F^_r p_r). As a generator (`row_cg_requests`) the solves of several
layers advance in lockstep, one collective per round across ranks (fop.distributed_rows).
"""

from __future__ import annotations

import torch

__all__ = ["cg_schedule", "row_cg", "row_cg_requests", "rowdot"]


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a_r, b_r> for every row r of two R x D matrices."""
    return torch.linalg.vecdot(a, b, dim=1)


def cg_schedule(iters: int, warm: bool) -> list[str]:
    """The requests `row_cg_requests` makes, in order: a matvec for the warm start's residual, iters - 1 matvecs,
    and a quad for the last iteration."""
    return ["matvec"] * (int(warm) + iters - 1) + ["quad"]


def row_cg_requests(B: torch.Tensor, iters: int, x0: torch.Tensor | None = None):
    """The CG of `row_cg` as a generator: yields ("matvec", P) or ("quad", P), receives F^ P (R x D) or p^T F^ p
    (R), and returns z. Several layers' solves can then advance in lockstep (one collective per round across ranks,
    fop.distributed_rows); the requests follow `cg_schedule(iters, x0 is not None)`."""
    if x0 is None:
        x = torch.zeros_like(B)
        r = B.clone()
    else:
        x = x0.clone()
        r = B - (yield "matvec", x0)
    p = r.clone()
    rs = rowdot(r, r)
    for k in range(iters):
        last = k == iters - 1
        if last:
            pAp = yield "quad", p
        else:
            Ap = yield "matvec", p
            pAp = rowdot(p, Ap)
        positive = pAp > 0
        alpha = torch.where(positive, rs / torch.where(positive, pAp, 1.0), 0.0)
        x.addcmul_(p, alpha[:, None])
        if last:
            break
        r.addcmul_(Ap, alpha[:, None], value=-1.0)
        rs_new = rowdot(r, r)
        nonzero = rs > 0
        beta = torch.where(nonzero, rs_new / torch.where(nonzero, rs, 1.0), 0.0)
        p.mul_(beta[:, None]).add_(r)
        rs = rs_new
    return x


def row_cg(matvec, quad, B: torch.Tensor, iters: int, x0: torch.Tensor | None = None) -> torch.Tensor:
    """Conjugate gradient on every row of B (R x D) at once: solve F^_r z_r = b_r, `iters` iterations.

    `matvec(P)` returns the rows F^_r p_r (R x D); `quad(P)` the scalars p_r^T F^_r p_r (R). From z = 0 (or x0).
    The last iteration only needs p^T F^ p (its residual is never used), so it calls `quad`, which costs half a
    matvec for a conv layer (the forward conv without the weight-gradient conv). Rows whose residual vanished
    stop moving (alpha = beta = 0). No host synchronization."""
    ops = {"matvec": matvec, "quad": quad}
    solve = row_cg_requests(B, iters, x0)
    kind, P = next(solve)
    try:
        while True:
            kind, P = solve.send(ops[kind](P))
    except StopIteration as done:
        return done.value
