"""How each damped Kronecker factor (M + lam I)^-1 is held, chosen per factor from a flop cost model.

Two exact reductions come first, then a choice among three forms (docs/design.md, "Damped inverses: the cost model"):

- Support. Rows of a PSD factor that are exactly zero (input columns that were zero in every sample the EMA has
  seen: the padding taps of a 3x3 conv on 1x1 maps, a dead input) are exact eigenvectors with eigenvalue 0. With
  S the other rows and P_S the selection, (M + lam I)^-1 = P_S^T (M_S + lam I)^-1 P_S + (I - P_S^T P_S) / lam, so
  only the s x s block M_S is decomposed and multiplied (timm's ResNet-18 at 32x32: layer4's 4608-wide input
  factors have s = 512).
- Sample space. With M_S = Z^T Z (Z: r x s, the EMA's stacked sqrt-weighted rows; r the samples it has seen),
  the Woodbury identity gives (Z^T Z + lam I)^-1 = (I - Z^T (lam I + Z Z^T)^-1 Z) / lam: an r x r Cholesky instead
  of an s x s one, and X (M_S + lam)^-1 = (X - ((X Z^T) K^-1) Z) / lam, K = lam I + Z Z^T.

Forms of the (support) block, with d = s its size, m the other side's size (the rows of the gradient matrix it
multiplies), k the inverse interval, r the sample rank (None when the factor is held densely):

    "inverse":  decomposition d^3 (Cholesky + inverse)          per product 2 m d^2
    "cholesky": decomposition d^3 / 3 (the factor L kept)       per product 2 m d^2 x 1.5 (two triangular solves,
                                                                 measured 0.9-2.0x one GEMM with the inverse)
    "woodbury": decomposition r^2 d + r^3 / 3                   per product 4 m d r + 2 m r^2

`choose_form` returns the form of least decomposition / k + per-product cost; "eigh" (an eigendecomposition,
about five Cholesky inverses on CPU, and twice the products: rotate and unrotate) never wins this model, and is
used only where the eigenbasis itself is needed (damping_mode="eigen").
"""

from __future__ import annotations

import functools

import torch

FORMS = ("inverse", "cholesky", "woodbury")
SOLVE_SLOWDOWN = 1.5  # two triangular solves against one GEMM with the inverse: 0.9-2.0x measured (2 threads, loaded)


def form_costs(d: int, m: int, interval: int, rank: int | None = None) -> dict[str, float]:
    """Flops per step (decomposition amortized over `interval`, one product) of each form of a d x d damped block
    that multiplies m-row gradient matrices; "woodbury" only when the sample rank `rank` is known."""
    costs = {"inverse": d ** 3 / interval + 2 * m * d ** 2,
             "cholesky": d ** 3 / (3 * interval) + SOLVE_SLOWDOWN * 2 * m * d ** 2}
    if rank is not None:
        costs["woodbury"] = (rank ** 2 * d + rank ** 3 / 3) / interval + 4 * m * d * rank + 2 * m * rank ** 2
    return costs


def choose_form(d: int, m: int, interval: int, rank: int | None = None) -> str:
    """The form of least cost (form_costs); ties go to the earlier of FORMS."""
    costs = form_costs(d, m, interval, rank)
    return min(costs, key=lambda f: (costs[f], FORMS.index(f)))


def keeps_samples(rank: int, d: int, m: int, interval: int) -> bool:
    """Whether a factor's sample rows (rank rows, d wide) are still worth keeping: Woodbury is the cheapest form
    at that rank (once the rank has grown past it, it only grows: the EMA never forgets a direction exactly)."""
    return choose_form(d, m, interval, rank) == "woodbury"


SUPPORT_ALIGN = 64  # supports of factors 8x this wide or more are padded to a multiple of it: BLAS ran a 2303-wide
# product at 0.6x the speed of a 2304-wide one (2 cores, AVX-512)
SUPPORT_MIN_SAVING = 1 / 8  # a support is used only where it drops at least this share of the rows


def support(M: torch.Tensor, within: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sorted indices of the rows of the symmetric matrix M with any nonzero entry (padded with zero rows up to a
    multiple of SUPPORT_ALIGN when M is at least 8 SUPPORT_ALIGN wide), or None when that keeps more than
    1 - SUPPORT_MIN_SAVING of the rows (the gathers and scatters would cost more than the rows saved). Exact either
    way: a zero row is an eigenvector of M with eigenvalue 0 whether or not it is in the support. A row with a
    nonzero diagonal entry is in the support, so where those alone fill more than that share the answer is None
    without reading the rest of M (a dense factor: n entries read, not n^2). `within`: sorted rows outside which M
    is known to be zero (K-FAC's nonzero_columns_A), so that only its block is read. At most two host syncs."""
    n = M.shape[0]
    align = SUPPORT_ALIGN if n >= 8 * SUPPORT_ALIGN else 1
    widest = (1 - SUPPORT_MIN_SAVING) * n

    def aligned(count: int) -> int:
        return -(-count // align) * align

    if aligned(int(torch.count_nonzero(M.diagonal()))) > widest:
        return None
    if within is None:
        nonzero = M.any(dim=1)  # on the values: no boolean copy of M (half the time)
    else:
        nonzero = torch.zeros(n, dtype=torch.bool, device=M.device)
        nonzero[within] = M.index_select(0, within).index_select(1, within).any(dim=1)
    count = int(nonzero.sum())
    size = aligned(count)
    if size > widest:
        return None
    pad = torch.nonzero(~nonzero).flatten()[:size - count]
    return torch.cat([torch.nonzero(nonzero).flatten(), pad]).sort().values


def in_own_dtype(product):
    """A product method `product(self, X)` made to multiply in `self.dtype` (X cast to it) and return the result in
    X's dtype: every form multiplies in its own dtype, whatever its input's (`.to` is no copy when they agree)."""

    @functools.wraps(product)
    def run(self, X: torch.Tensor) -> torch.Tensor:
        return product(self, X.to(self.dtype)).to(X.dtype)

    return run


class Woodbury:
    """(Z^T Z + lam I)^-1 of a (B, s, s) stack held in sample space: Z (B, r, s) and the lower Cholesky factor L of
    K = lam I + Z Z^T (B, r, r); lam (B,)."""

    def __init__(self, Z: torch.Tensor, lam: torch.Tensor):
        self.Z = Z
        self.lam = lam.to(Z.dtype)
        K = torch.bmm(Z, Z.mT)
        K.diagonal(dim1=1, dim2=2).add_(self.lam[:, None])
        L, info = torch.linalg.cholesky_ex(K)
        if bool(info.any()):  # K >= lam I is positive definite; only non-finite input gets here
            raise FloatingPointError("the sample-space matrix lam I + Z Z^T has no Cholesky factor (non-finite "
                                     "factor samples?); nothing was changed")
        self.L = L

    def subset(self, keep: list[int]) -> Woodbury:
        out = Woodbury.__new__(Woodbury)
        out.Z, out.lam, out.L = self.Z[keep], self.lam[keep], self.L[keep]
        return out

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it multiplies in (the factors': the form subtracts, so it is never rounded lower)."""
        return self.Z.dtype

    @in_own_dtype
    def right(self, X: torch.Tensor) -> torch.Tensor:
        """X (Z^T Z + lam)^-1 = (X - (X Z^T) K^-1 Z) / lam for a (B, m, s) stack (computed in Z's dtype, returned in
        X's, as every product here)."""
        T = torch.cholesky_solve(torch.bmm(X, self.Z.mT).mT, self.L).mT
        return (X - torch.bmm(T, self.Z)) / self.lam[:, None, None]

    @in_own_dtype
    def left(self, X: torch.Tensor) -> torch.Tensor:
        """(Z^T Z + lam)^-1 X = (X - Z^T K^-1 (Z X)) / lam for a (B, s, m) stack."""
        T = torch.cholesky_solve(torch.bmm(self.Z, X), self.L)
        return (X - torch.bmm(self.Z.mT, T)) / self.lam[:, None, None]

    @in_own_dtype
    def factor_right(self, X: torch.Tensor) -> torch.Tensor:
        """X Z^T Z (the undamped block) for a (B, m, s) stack."""
        return torch.bmm(torch.bmm(X, self.Z.mT), self.Z)

    @in_own_dtype
    def factor_left(self, X: torch.Tensor) -> torch.Tensor:
        """Z^T Z X for a (B, s, m) stack."""
        return torch.bmm(self.Z.mT, torch.bmm(self.Z, X))


SHARED_BLOCK_MIN = 256  # FOP's undamped blocks at least this wide are the factors themselves (one GEMM per block),
# not a stacked copy: at width 64 the copies were two generations of layer3's 3 x 2304^2 stack at a refresh


class DenseBlock:
    """A dense damped core (kfac.DampedFactor) beside the undamped block M_S (B, s, s) for the factor products FOP
    needs (None where the optimizer needs none: K-FAC keeps no copy), multiplied in `dtype` (the product dtype)
    and returned in the input's. M is a (B, s, s) stack, or a list of the B matrices themselves (references to the
    immutable factors or their support blocks, multiplied one GEMM each: no stack-sized copy)."""

    def __init__(self, M: torch.Tensor | list[torch.Tensor] | None, core, dtype: torch.dtype):
        self.M, self.core, self.dtype = M, core, dtype

    def subset(self, keep: list[int]) -> DenseBlock:
        if self.M is None:
            M = None
        else:
            M = [self.M[j] for j in keep] if isinstance(self.M, list) else self.M[keep]
        return DenseBlock(M, self.core.subset(keep), self.dtype)

    def right(self, X: torch.Tensor) -> torch.Tensor:
        return self.core.right(X)

    def left(self, X: torch.Tensor) -> torch.Tensor:
        return self.core.left(X)

    def _undamped(self) -> torch.Tensor | list[torch.Tensor]:
        if self.M is None:
            raise RuntimeError("this damped inverse was made without its undamped block (factor_products=False)")
        return self.M

    @in_own_dtype
    def factor_right(self, X: torch.Tensor) -> torch.Tensor:
        """X M_S for a (B, m, s) stack."""
        M = self._undamped()
        if isinstance(M, torch.Tensor):
            return torch.bmm(X, M)
        out = X.new_empty(X.shape[0], X.shape[1], M[0].shape[1])
        for j, Mj in enumerate(M):
            torch.mm(X[j], Mj, out=out[j])
        return out

    @in_own_dtype
    def factor_left(self, X: torch.Tensor) -> torch.Tensor:
        """M_S X for a (B, s, m) stack."""
        M = self._undamped()
        if isinstance(M, torch.Tensor):
            return torch.bmm(M, X)
        out = X.new_empty(X.shape[0], M[0].shape[0], X.shape[2])
        for j, Mj in enumerate(M):
            torch.mm(Mj, X[j], out=out[j])
        return out


class Side:
    """One side's damped inverse (M + lam I)^-1 of a (B, n, n) stack whose layers share a support of size s
    (`index` (B, s), None: all n rows) around a block core (Woodbury or DenseBlock) that works on s-wide stacks; lam
    (B,) the damping (needed outside the support only; None with no index)."""

    def __init__(self, n: int, index: torch.Tensor | None, lam: torch.Tensor, core, form: str):
        self.n, self.index, self.lam, self.core, self.form = n, index, lam, core, form

    def subset(self, keep: list[int]) -> Side:
        return Side(self.n, None if self.index is None else self.index[keep],
                    None if self.lam is None else self.lam[keep], self.core.subset(keep), self.form)

    def _cols(self, X: torch.Tensor) -> torch.Tensor:
        return self.index[:, None, :].expand(X.shape[0], X.shape[1], -1)

    def _rows(self, X: torch.Tensor) -> torch.Tensor:
        return self.index[:, :, None].expand(X.shape[0], -1, X.shape[2])

    def support_columns(self, X: torch.Tensor) -> torch.Tensor:
        """The support columns of a (B, m, n) stack: (B, m, s)."""
        return X.gather(2, self._cols(X))

    def scatter_columns(self, out: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """`out` (B, m, n) with its support columns set to Y (B, m, s), in place."""
        return out.scatter_(2, self._cols(out), Y)

    def on_support_columns(self, X: torch.Tensor, fn) -> torch.Tensor:
        """fn applied to the support columns of a (B, m, n) stack, zero in the other columns."""
        return self.scatter_columns(torch.zeros_like(X), fn(self.support_columns(X)))

    def right(self, X: torch.Tensor) -> torch.Tensor:
        """X (M + lam)^-1 for a (B, m, n) stack: the support columns through the core, the others / lam."""
        if self.index is None:
            return self.core.right(X)
        out = X / self.lam.to(X.dtype)[:, None, None]
        return self.scatter_columns(out, self.core.right(self.support_columns(X)))

    def left(self, X: torch.Tensor) -> torch.Tensor:
        """(M + lam)^-1 X for a (B, n, m) stack."""
        if self.index is None:
            return self.core.left(X)
        idx = self._rows(X)
        out = X / self.lam.to(X.dtype)[:, None, None]
        return out.scatter_(1, idx, self.core.left(X.gather(1, idx)))

    def factor_right(self, X: torch.Tensor) -> torch.Tensor:
        """X M (undamped) for a (B, m, n) stack: zero outside the support columns."""
        if self.index is None:
            return self.core.factor_right(X)
        return self.on_support_columns(X, self.core.factor_right)

    def factor_left(self, X: torch.Tensor) -> torch.Tensor:
        """M X (undamped) for a (B, n, m) stack."""
        if self.index is None:
            return self.core.factor_left(X)
        idx = self._rows(X)
        return torch.zeros_like(X).scatter_(1, idx, self.core.factor_left(X.gather(1, idx)))


def update_row_count(capture, i: int) -> int:
    """Rows (samples x positions) of layer i's factor update from its full records: both factors' rank grows by at
    most this much."""
    layer = capture.layers[i]
    return sum(layer.type.output_rows(layer, r.dy, capture.tokens).numel() // layer.out_dim
               for r in capture.records[i] if r.full and r.dy is not None)


def input_rows(capture, i: int) -> torch.Tensor:
    """The rows X of layer i's input-factor update (its layer type's factor_input_rows: im2col patches for a conv,
    a column of ones for a bias), so that the update is A <- (1 - rho) A + rho X^T X / rows (as
    Capture.update_input_factor)."""
    layer = capture.layers[i]
    recs = [r for r in capture.records[i] if r.full and r.dy is not None]
    return layer.type.factor_input_rows(layer, [r.a for r in recs], capture.tokens)


def output_rows(capture, i: int, dy_scale: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """(rows Y, c) of layer i's output-factor update G <- (1 - rho) G + rho c Y^T Y (as Capture.update_output_factor:
    c = N_total for a mean-reduced loss, 1 / N_total for a summed one)."""
    recs = [r for r in capture.records[i] if r.full and r.dy is not None]
    layer = capture.layers[i]
    Y = torch.cat([layer.type.output_rows(layer, r.dy, capture.tokens).reshape(-1, layer.out_dim) for r in recs])
    if dy_scale is not None:
        Y = Y * dy_scale.to(device=Y.device, dtype=Y.dtype)
    n_total = sum(r.n for r in recs)
    return Y, (1.0 / n_total if capture.loss_reduction == "sum" else float(n_total))
