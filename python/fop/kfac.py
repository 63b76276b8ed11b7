"""K-FAC in the eigenbasis of the Kronecker factors: the curvature machinery FOP builds on."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import fop_kernels
from fop import inverse_choice
from fop._base import (
    UNPRECONDITIONED,
    CurvatureOptimizer,
    check_choice,
    check_float,
    check_int,
    check_outer_hyperparameters,
    check_schedule,
    eval_schedule,
    grafted_direction,
    layer_device_tensor,
    rms_per_entry,
    stack_dot,
    state_counter,
)
from fop._layers import TOKEN_MODES, kfac_support, without_blocks
from fop.distributed import CommView, make_comm, will_synchronize
from fop.inverse_choice import DenseBlock, Side, Woodbury, support

logger = logging.getLogger("fop")

DAMPING_MODES = ("eigen", "factored")
FISHER_TYPES = ("empirical", "mc")
INVERSE_METHODS = ("auto", "eigh", "cholesky")
IN_PLACE_MIN_BYTES = 2**23  # input factors from this size (8 MiB) may be updated in place on their live columns: a
# fresh 85 MB factor took 18-85 ms to fault in on a 2-core VM, three per refresh at ResNet-18 width 64


def _stack(tensors: list[torch.Tensor], groups: int) -> torch.Tensor:
    """Per-layer tensors as one stack of entries: stacked (groups 1), or their (groups, ...) blocks concatenated."""
    return torch.stack(tensors) if groups == 1 else torch.cat(tensors)


class Blocks:
    """The entries of a bucket's stacks: `groups` consecutive blocks per layer (a grouped conv's groups, each with
    its own factors; 1 for every other layer), entry j * groups + k the block k of layer index[j]."""

    index: list[int]
    groups: int = 1

    @property
    def size(self) -> int:
        """Entries of the stacks."""
        return len(self.index) * self.groups

    def entries(self, keep: list[int]) -> list[int]:
        """The entries of the layers at positions `keep`."""
        g = self.groups
        return keep if g == 1 else [j * g + k for j in keep for k in range(g)]

    def entry_layers(self) -> list[int]:
        """The layer index of every entry."""
        return [i for i in self.index for _ in range(self.groups)]

    def of_layer(self, j: int):
        """The entries of the layer at position j: j itself, or the slice of its blocks."""
        g = self.groups
        return j if g == 1 else slice(j * g, (j + 1) * g)

    def as_blocks(self, M: torch.Tensor | None) -> torch.Tensor | None:
        """A (layers, out, in) stack of gradient matrices as its (layers groups, out / groups, in) blocks (a view:
        block k of a layer is its rows k out/groups to (k+1) out/groups - 1)."""
        g = self.groups
        return M if g == 1 or M is None else M.reshape(-1, M.shape[1] // g, M.shape[2])

    def layer_matrix(self, U: torch.Tensor, j: int) -> torch.Tensor:
        """The out x in matrix of the layer at position j from an entry stack."""
        return U[j] if self.groups == 1 else U[self.of_layer(j)].reshape(-1, U.shape[2])


class Bucket(Blocks):
    """Layers whose gradient matrices have one shape (out x in) and one block count: their eigenvectors stacked for
    bmm, one entry per block (Blocks). QA is None for layers with a diagonal input factor (embeddings): its eigenbasis
    is the identity and lA the diagonal itself. `product_dtype` (None: the factors' dtype): the dtype the rotations
    multiply in, by `bases`, the eigenvectors in it (the same tensors in the factors' dtype; the eigenvectors
    themselves stay exact for the refresh and the state)."""

    def __init__(self, index: list[int], QG, lG, QA, lA, groups: int = 1, product_dtype: torch.dtype | None = None):
        self.index = index  # layer indices
        self.groups = groups
        self.QG, self.lG, self.QA, self.lA = QG, lG, QA, lA  # (B,o,o), (B,o), (B,i,i) or None, (B,i); B entries
        self.product_dtype = product_dtype
        pd = QG.dtype if product_dtype is None else product_dtype
        self.bases = (QG.to(pd), None if QA is None else QA.to(pd))

    @property
    def dtype(self) -> torch.dtype:
        return self.QG.dtype

    def rotate(self, M: torch.Tensor) -> torch.Tensor:
        """Q_G^T M Q_A for a (B, o, i) stack (multiplied in the product dtype, returned in M's)."""
        QG, QA = self.bases
        out = torch.bmm(QG.mT, M.to(QG.dtype))
        return (out if QA is None else torch.bmm(out, QA)).to(M.dtype)

    def unrotate(self, M: torch.Tensor) -> torch.Tensor:
        """Q_G M Q_A^T for a (B, o, i) stack."""
        QG, QA = self.bases
        out = torch.bmm(QG, M.to(QG.dtype))
        return (out if QA is None else torch.bmm(out, QA.mT)).to(M.dtype)

    def subset(self, keep: list[int]) -> Bucket:
        """The bucket of the layers at positions `keep` (copies; for a step where some layers have no gradient)."""
        e = self.entries(keep)
        return Bucket([self.index[j] for j in keep], self.QG[e], self.lG[e], None if self.QA is None else self.QA[e],
                      self.lA[e], self.groups, self.product_dtype)


def _eigh_forms(M: torch.Tensor):
    """Safer ways to decompose a symmetric PSD M after LAPACK failed on it, each a callable returning (l, Q) in
    float64: float64; the block of its nonzero rows (zero rows of a factor are exact eigenvectors with eigenvalue
    0, and they are what makes LAPACK fail on conv inputs of 1x1 maps); shifted M + s I (same eigenvectors, l - s);
    a symmetric jitter of relative size 1e-7; and the SVD (for a PSD matrix its singular values and left vectors,
    a clamped eigendecomposition)."""
    D = M.double()
    n = D.shape[0]
    scale = float(D.diagonal().abs().mean()) or 1.0

    def deflated():
        nz = torch.nonzero(D.abs().sum(1) > 0).flatten()
        l = torch.zeros(n, dtype=D.dtype, device=D.device)
        Q = torch.zeros(n, n, dtype=D.dtype, device=D.device)
        zero = torch.ones(n, dtype=torch.bool, device=D.device)
        zero[nz] = False
        lz, Qz = torch.linalg.eigh(D[nz][:, nz])
        z = torch.nonzero(zero).flatten()
        Q[z, torch.arange(z.numel(), device=D.device)] = 1.0
        Q[nz[:, None], torch.arange(z.numel(), n, device=D.device)] = Qz
        l[z.numel():] = lz
        return l, Q

    def shifted():
        l, Q = torch.linalg.eigh(D + scale * 1e-3 * torch.eye(n, dtype=D.dtype, device=D.device))
        return l - scale * 1e-3, Q

    def jittered():
        E = torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=D.dtype).to(D.device)
        return torch.linalg.eigh(D + 1e-7 * scale * 0.5 * (E + E.mT))

    def svd():
        U, S, _ = torch.linalg.svd(D)
        return S.flip(0), U.flip(1)

    return [("float64", lambda: torch.linalg.eigh(D)), ("nonzero block", deflated), ("shifted", shifted),
            ("jittered", jittered), ("svd", svd)]


def robust_eigh(mats: list[torch.Tensor], names: list[str], decompose=None):
    """([l], [Q]) of every matrix as `fop_kernels.eigh(mats, clamp=True)` (or `decompose(mats)`), each decomposed on
    its support (`deflated_eigh`); a matrix whose decomposition fails is retried in the forms of `_eigh_forms`
    (logged), and only if every form fails the error names it (`names[i]`)."""
    decompose = deflated_eigh(decompose or (lambda ms: fop_kernels.eigh(ms, clamp=True)))
    try:
        return decompose(mats)
    except RuntimeError:  # one failing matrix fails the batch: find it below
        pass
    evals, evecs = [], []
    for M, name in zip(mats, names):
        try:
            (l,), (Q,) = decompose([M])
        except RuntimeError as err:
            for form, fn in _eigh_forms(M):
                try:
                    l, Q = fn()
                except RuntimeError:
                    continue
                if bool(torch.isfinite(l).all()) and bool(torch.isfinite(Q).all()):
                    logger.warning("eigendecomposition of %s failed (%s); used the %s form", name, err, form)
                    l, Q = l.clamp_min(0).to(M.dtype), Q.to(M.dtype)
                    break
            else:
                raise RuntimeError(f"eigendecomposition of {name} failed in every form (float64, nonzero block, "
                                   f"shifted, jittered, SVD): {err}") from err
        evals.append(l)
        evecs.append(Q)
    return evals, evecs


def deflated_eigh(decompose):
    """`decompose` (a list of matrices -> ([l], [Q])) applied to the support block M_S of each matrix (its rows with
    a nonzero entry, fop.inverse_choice.support): the other rows are exact eigenvectors with eigenvalue 0, so
    l = [0, l_S], Q = [e_j for the zero rows j | Q_S embedded in the support rows]. Exact; a 4608-wide input factor
    of a 3x3 conv on 1x1 maps (support 512) costs a 512-wide decomposition. One host sync per matrix."""

    def run(mats: list[torch.Tensor]):
        index = [support(M) for M in mats]
        evals, evecs = decompose([M if idx is None else M[idx][:, idx] for M, idx in zip(mats, index)])
        out_l, out_Q = [], []
        for M, idx, l, Q in zip(mats, index, evals, evecs):
            if idx is None:
                out_l.append(l)
                out_Q.append(Q)
                continue
            n, s = M.shape[0], idx.numel()
            zero = torch.ones(n, dtype=torch.bool, device=M.device)
            zero[idx] = False
            z = torch.nonzero(zero).flatten()
            full_Q = torch.zeros(n, n, dtype=Q.dtype, device=M.device)
            full_Q[z, torch.arange(n - s, device=M.device)] = 1.0
            full_Q[idx[:, None], torch.arange(n - s, n, device=M.device)] = Q
            out_l.append(torch.cat([l.new_zeros(n - s), l]))
            out_Q.append(full_Q)
        return out_l, out_Q

    return run


def on_schedule(step: int, interval: int) -> bool:
    """Whether `step` refreshes curvature kept every `interval` steps: every multiple of the interval, and while the
    statistics are young (step < interval) at steps 0, 1, 2, 4, 8, ...: curvature from the first batch alone, at a
    random initialization, must not steer a long interval (1 + log2(interval) extra refreshes)."""
    return step % interval == 0 or (step < interval and step & (step - 1) == 0)


def factor_weight(rho: float, steps: int) -> float:
    """w = 1 - (1 - rho)^steps, the weight of a factor update `steps` (>= 1) steps after the layer's last one: what
    `steps` updates of weight rho would give the latest statistics together, so that the factors' memory is about
    1/rho steps at any factor_interval (docs/optimizers.md, "The factors' memory")."""
    return 1.0 - (1.0 - rho) ** steps


def keeps_cholesky_factor(n: int, m: int, interval: int) -> bool:
    """Whether a damped n x n factor that multiplies m-wide gradient matrices is kept as its Cholesky factor L (two
    triangular solves per product) rather than inverted. The inverse costs 2 n^3 / 3 more flops per inversion; the
    solves run slower than one GEMM (2 m n^2 flops) by up to a quarter on large n (bench/RESULTS.md), twice per step
    for FOP: keep L when n > 3 m interval (MNIST's 3137-wide fc1 input factor; no ResNet-18 factor)."""
    return n > 3 * m * interval


class DampedFactor:
    """(M_b + lam_b I)^-1 of a (B, n, n) stack, held as the inverse itself (in the product dtype: the products cast
    their input to it and the result back) or as lower Cholesky factors L (row-major, so a resumed run multiplies
    exactly as the original)."""

    def __init__(self, inv: torch.Tensor | None = None, chol: torch.Tensor | None = None):
        if (inv is None) == (chol is None):
            raise ValueError("a DampedFactor holds exactly one of inv and chol")
        self.inv, self.chol = inv, chol

    @classmethod
    def of(cls, M: torch.Tensor, lam: torch.Tensor, keep_factor: bool, names: list[str] | None = None,
           product_dtype: torch.dtype | None = None, sources: list[torch.Tensor] | None = None) -> DampedFactor:
        """By Cholesky. A matrix whose Cholesky fails (rounding made it indefinite) is retried as its
        eigendecomposition with eigenvalues clamped at 0 (fop_kernels.damped_inverse with power 1), then in
        float64, then with the damping raised to 1e-6 of the mean diagonal; only if all fail the error names the
        matrix (`names[b]`). The inverse is rounded to `product_dtype` (None: M's) once it is made; a kept
        Cholesky factor stays in M's dtype (triangular solves). `sources`: the B matrices M was stacked from, given
        when M is the caller's scratch copy: it is then overwritten (inverted in place, no second stack-sized
        buffer) and a repair reads the source."""
        matrices = M if sources is None else sources  # what a repair reads: M itself is overwritten when scratch

        def repaired(b: int) -> torch.Tensor:
            return cls._repaired_cholesky(matrices[b], lam[b], f"matrix {b}" if names is None else names[b])

        if not keep_factor:  # LAPACK in place on the host (fop_kernels.damped_cholesky_inverse), on M or on a copy
            inv, info = fop_kernels.damped_cholesky_inverse(M, lam.to(M.dtype), overwrite=sources is not None)
            for b in torch.nonzero(info).flatten().tolist():  # one host sync per inversion step
                inv[b] = torch.cholesky_inverse(repaired(b)).mT
            return cls(inv=inv if product_dtype is None else inv.to(product_dtype))
        damped = M if sources is not None else M.clone()
        damped.diagonal(dim1=1, dim2=2).add_(lam.to(M.dtype)[:, None])
        L, info = torch.linalg.cholesky_ex(damped)
        for b in torch.nonzero(info).flatten().tolist():
            L[b] = repaired(b)
        return cls(chol=L.contiguous())

    @staticmethod
    def _repaired_cholesky(M: torch.Tensor, lam: torch.Tensor, name: str) -> torch.Tensor:
        if not bool(torch.isfinite(M).all()):
            raise FloatingPointError(f"{name} is non-finite (NaN or inf); nothing was changed")
        M = 0.5 * (M + M.mT)  # the factor's rounding-level asymmetry (Cholesky itself reads one triangle)
        lam = lam.to(M.dtype)
        try:
            repaired = fop_kernels.damped_inverse([M], lam, power=1.0)[0]
        except RuntimeError:
            repaired = None
        floor = 1e-6 * M.diagonal().double().abs().mean().clamp_min(1e-30)
        candidates = [repaired, None if repaired is None else repaired.double(),
                      M.double() + torch.eye(M.shape[0], dtype=torch.float64, device=M.device) * (lam + floor)]
        for C in candidates:
            if C is None:
                continue
            L, info = torch.linalg.cholesky_ex(0.5 * (C + C.mT))
            if int(info) == 0 and bool(torch.isfinite(L).all()):
                return L.to(M.dtype)
        raise FloatingPointError(f"the damped {name} has no Cholesky factor even in float64 with the damping "
                                 f"raised to 1e-6 of its mean diagonal (damping {float(lam):.3g}); nothing was "
                                 "changed")

    def subset(self, keep: list[int]) -> DampedFactor:
        return DampedFactor(**{k: v[keep] for k, v in self.state.items()})

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return {"inv": self.inv} if self.inv is not None else {"chol": self.chol}

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it multiplies in: the inverse's (the product dtype) or the kept Cholesky factor's."""
        return (self.chol if self.inv is None else self.inv).dtype

    @inverse_choice.in_own_dtype
    def right(self, X: torch.Tensor) -> torch.Tensor:
        """X (M + lam)^-1 = X L^-T L^-1 for a (B, m, n) stack."""
        if self.inv is not None:
            return torch.bmm(X, self.inv)
        Y = torch.linalg.solve_triangular(self.chol.mT, X, upper=True, left=False)
        return torch.linalg.solve_triangular(self.chol, Y, upper=False, left=False)

    @inverse_choice.in_own_dtype
    def left(self, X: torch.Tensor) -> torch.Tensor:
        """(M + lam)^-1 X = L^-T L^-1 X for a (B, n, m) stack."""
        if self.inv is not None:
            return torch.bmm(self.inv, X)
        Y = torch.linalg.solve_triangular(self.chol, X, upper=False)
        return torch.linalg.solve_triangular(self.chol.mT, Y, upper=True)


class InverseBucket(Blocks):
    """Layers of one shape and block count (and, for inverse_method="auto", one support size and form per side) for
    the damped-inverse path: the factors of the last inversion (G, A, stacked for bmm, one entry per block) and their
    damped inverses (G + lambda_G I)^-1, (A + lambda_A I)^-1 as fop.inverse_choice.Side objects; `samples` the sample
    rows (ZG, ZA) they were built from (lists per layer, None where a side was held densely; for state_dict)."""

    def __init__(self, index: list[int], Gs: list[torch.Tensor], As: list[torch.Tensor], Ginv: Side, Ainv: Side,
                 samples=None, groups: int = 1):
        self.index = index
        self.groups = groups
        self.Gs, self.As = Gs, As  # per layer, the factors of the last inversion (references: factors are immutable)
        self.Ginv, self.Ainv = Ginv, Ainv  # damped inverses
        self.samples = samples or ([None] * len(index), [None] * len(index))

    @property
    def dtype(self) -> torch.dtype:
        return self.As[0].dtype

    def on_support(self, Ms: list[torch.Tensor]) -> tuple[InverseBucket, list[torch.Tensor], Callable]:
        """(bucket, stacks, expand) for (B, o, i) stacks `Ms` that a step multiplies and combines: where A's inverse
        is held on a support S and, on the host, every stack is exactly zero outside S (a conv's taps that only
        ever see padding, channels dead on this batch; one count of nonzeros each, no device to sync), a bucket
        whose A side is the s x s core, the stacks' S columns, and `expand` that puts a (B, o, s) result back in
        (B, o, i), zero outside S; otherwise this bucket, `Ms` and the identity (on an accelerator every column goes
        through). Products, inner products and combinations on the S columns then cost |S| / i of the full ones."""
        A = self.Ainv
        if A.index is not None and Ms[0].device.type == "cpu":
            inside = [A.support_columns(M) for M in Ms]  # gathered once: counted, then multiplied
            if all(int(torch.count_nonzero(x)) == int(torch.count_nonzero(M)) for x, M in zip(inside, Ms)):
                inner = Side(A.index.shape[1], None, None, A.core, A.form)
                core = InverseBucket(self.index, self.Gs, self.As, self.Ginv, inner, self.samples, self.groups)
                shape = Ms[0].shape
                return core, inside, lambda Y: A.scatter_columns(Y.new_zeros(shape), Y)
        return self, Ms, lambda Y: Y

    def precondition(self, M: torch.Tensor) -> torch.Tensor:
        """(G + lambda_G)^-1 M (A + lambda_A)^-1 for a (B, o, i) stack. Where A's inverse is held on a support S,
        the columns of M outside S are M's / lambda_A (where they are zero, the step calls this on `on_support`'s
        bucket and S columns alone). M is cast to the A side's product dtype once and the result back once (each
        side casts only what is not in its dtype already)."""
        pd = self.Ainv.core.dtype
        return self.Ginv.left(self.Ainv.right(M.to(pd))).to(M.dtype)

    def fisher(self, M: torch.Tensor) -> torch.Tensor:
        """G M A (the undamped factors of the last inversion) for a (B, o, i) stack: zero outside A's support, so
        the G side works on the support columns alone. Cast as `precondition`."""
        A, pd = self.Ainv, self.Ainv.core.dtype
        if A.index is None:
            return self.Ginv.factor_left(A.factor_right(M.to(pd))).to(M.dtype)
        return A.on_support_columns(M, lambda X: self.Ginv.factor_left(A.core.factor_right(X.to(pd))).to(M.dtype))

    def subset(self, keep: list[int]) -> InverseBucket:
        e = self.entries(keep)
        return InverseBucket([self.index[j] for j in keep], [self.Gs[j] for j in keep], [self.As[j] for j in keep],
                             self.Ginv.subset(e), self.Ainv.subset(e),
                             tuple([z[j] for j in keep] for z in self.samples), self.groups)


@dataclass
class BucketFactors:
    """What one shape class of layers (`idx`: one gradient shape and block count) brings to the damped-inverse forms:
    their factors G, A and sample rows ZG, ZA (None: held densely) per layer, the block count `groups`, the damping of
    each block's sides (`lam_G`, `lam_A`: the factored damping split by pi) and each block's name for errors."""

    idx: list[int]
    Gs: list[torch.Tensor]
    As: list[torch.Tensor]
    ZGs: list
    ZAs: list
    groups: int
    lam_G: torch.Tensor
    lam_A: torch.Tensor
    names: list[str]
    nonzero_A: list | None = None  # per layer, the columns its A can be nonzero on (None: any), for support()

    def entries(self, js: list[int]) -> list[int]:
        """The block entries of the layers at positions `js` (one per layer, `groups` per grouped layer)."""
        g = self.groups
        return js if g == 1 else [j * g + k for j in js for k in range(g)]

    def blocks(self, Ms: list[torch.Tensor]) -> list[torch.Tensor]:
        """One matrix per block, views of the per-layer factors."""
        return [B for M in Ms for B in ([M] if self.groups == 1 else M.unbind(0))]


class InverseForms:
    """A damped-inverse path's forms (DenseInverses, ChosenInverses), made for one product dtype (the dtype the dense
    inverses and factor copies are held in: the factors' own dtype by default, where `.to` is no copy) and for an
    optimizer that multiplies by the undamped factors too (`factor_products`: FOP's G V A) or not (K-FAC)."""

    def __init__(self, product_dtype: torch.dtype, factor_products: bool):
        self.product_dtype, self.factor_products = product_dtype, factor_products

    def dense_block(self, M: torch.Tensor, damped: DampedFactor) -> DenseBlock:
        """The dense core of the damped inverse `damped` of the stack M, with M in the product dtype beside it only
        where the factor products need it."""
        return DenseBlock(M.to(self.product_dtype) if self.factor_products else None, damped, self.product_dtype)

    def inverted_block(self, M: torch.Tensor, lam: torch.Tensor, keep_factor: bool, names: list[str],
                       sources: list[torch.Tensor]) -> DenseBlock:
        """The dense core of (M + lam I)^-1 for the fresh stack M of the matrices `sources` (the factors or their
        support blocks), inverted in place: no second stack-sized buffer. The factor products' undamped block is
        `sources` itself where it is wide and in the product dtype (inverse_choice.SHARED_BLOCK_MIN), else a copy."""
        if not self.factor_products:
            kept = None
        elif self.product_dtype != M.dtype:
            kept = M.to(self.product_dtype)
        elif M.shape[-1] >= inverse_choice.SHARED_BLOCK_MIN:
            kept = list(sources)
        else:
            kept = M.clone()
        damped = DampedFactor.of(M, lam, keep_factor, names, self.product_dtype, sources)
        return DenseBlock(kept, damped, self.product_dtype)


class DenseInverses(InverseForms):
    """inverse_method="cholesky", as ASDL and the official code: one InverseBucket per shape class, dense damped
    inverses of the whole factors, each kept as its Cholesky factor where `keeps_cholesky_factor` says so. The
    inverses themselves are saved in the state (keys Ainv|Achol, Ginv|Gchol) and restored as they were."""

    method = "cholesky"
    keeps_samples = False

    def buckets(self, f: BucketFactors, interval: int) -> list[InverseBucket]:
        o, i = f.blocks(f.Gs)[0].shape[0], f.blocks(f.As)[0].shape[0]  # a block's gradient matrix is o x i
        keep_G, keep_A = (keeps_cholesky_factor(n, m, interval) for n, m in ((o, i), (i, o)))
        sides = []
        for Ms, lam, keep, side in ((f.Gs, f.lam_G, keep_G, "G"), (f.As, f.lam_A, keep_A, "A")):
            M = _stack(Ms, f.groups)
            names = [f"factor {side} of layer {n}" for n in f.names]
            sides.append(Side(M.shape[1], None, lam, self.inverted_block(M, lam, keep, names, f.blocks(Ms)),
                              "cholesky" if keep else "inverse"))
        return [InverseBucket(f.idx, f.Gs, f.As, *sides, groups=f.groups)]

    def saved(self, bucket: InverseBucket, j: int, e) -> dict[str, torch.Tensor]:
        """Layer j's damped inverses (or Cholesky factors), `e` its block entries, in the factors' dtype (an inverse
        rounded to the product dtype converts back to it exactly)."""
        out = {f"A{k}": v[e].to(bucket.dtype) for k, v in bucket.Ainv.core.core.state.items()}
        out.update({f"G{k}": v[e].to(bucket.dtype) for k, v in bucket.Ginv.core.core.state.items()})
        return out

    def loaded(self, kfac: KFAC, entry: dict, layer, shape_A: tuple, shape_G: tuple) -> dict:
        shapes = {"A": shape_A, "G": shape_G}
        for side, shape in (("A", shape_A), ("G", shape_G)):
            forms = [form for form in ("inv", "chol") if side + form in entry]
            if len(forms) != 1:
                raise ValueError(f"state_dict inverse of layer {layer.name} needs one of {side}inv, {side}chol")
            shapes[side + forms[0]] = shape
        return {k: kfac._loaded(entry, k, shape, layer, f"inverse {k}") for k, shape in shapes.items()}

    def restored(self, kfac: KFAC, groups: list[list[int]], moved: list, decomposed_at: int) -> list[InverseBucket]:
        """The saved inverses, stacked per shape class as `buckets` stacks them."""
        def damped(idx, side, g):
            form = "inv" if side + "inv" in moved[idx[0]] else "chol"
            M, core = (_stack([moved[i][k] for i in idx], g) for k in (side, side + form))
            damped = DampedFactor(**{form: core.to(self.product_dtype) if form == "inv" else core})
            return Side(M.shape[1], None, None, self.dense_block(M, damped), "inverse" if form == "inv" else "cholesky")

        out = []
        for idx in groups:
            g = kfac.layers[idx[0]].type.blocks(kfac.layers[idx[0]])
            out.append(InverseBucket(idx, [moved[i]["G"] for i in idx], [moved[i]["A"] for i in idx],
                                     damped(idx, "G", g), damped(idx, "A", g), groups=g))
        return out


class ChosenInverses(InverseForms):
    """inverse_method="auto" with factored damping: per factor its support (fop.inverse_choice.support) and the form
    the cost model prices lowest (`choose_form`: explicit inverse, kept Cholesky factor or Woodbury on the sample
    rows), layers grouped by (support sizes, forms, sample ranks). A grouped layer keeps its blocks in one bucket,
    held densely on their whole width. The state keeps the factors and samples of the last inversion, from which a
    load redoes it (the inverses are not saved)."""

    method = "auto"
    keeps_samples = True

    def buckets(self, f: BucketFactors, interval: int) -> list[InverseBucket]:
        g = f.groups
        G_ents, A_ents = f.blocks(f.Gs), f.blocks(f.As)
        o, i = G_ents[0].shape[0], A_ents[0].shape[0]
        plans = []
        for j in range(len(f.idx)):
            plan = []
            within_A = None if f.nonzero_A is None else f.nonzero_A[j]
            for M, Z, m, within in ((f.Gs[j], f.ZGs[j], i, None), (f.As[j], f.ZAs[j], o, within_A)):
                sup = support(M, within) if g == 1 else None
                width = M.shape[-1] if sup is None else sup.numel()
                rank = None if Z is None or g != 1 else Z.shape[0]
                form = inverse_choice.choose_form(width, m, interval, rank)
                plan.append((sup, width, form, None if form != "woodbury" else rank))
            plans.append(plan)
        classes: dict[tuple, list[int]] = {}
        for j, plan in enumerate(plans):
            classes.setdefault(tuple((w, form, r) for _, w, form, r in plan), []).append(j)
        out = []
        for key, js in classes.items():
            ents = f.entries(js)
            sides = []
            for k, (Ms, Zs, lam, side) in enumerate(((G_ents, f.ZGs, f.lam_G, "G"), (A_ents, f.ZAs, f.lam_A, "A"))):
                _, form, _ = key[k]
                sups = [plans[j][k][0] for j in js] if g == 1 else [None] * len(ents)
                index = None if sups[0] is None else torch.stack(sups)
                lam_k = lam[ents]
                if form == "woodbury":
                    Z = torch.stack([Zs[j] if sup is None else Zs[j][:, sup] for j, sup in zip(js, sups)])
                    core = Woodbury(Z, lam_k)
                else:
                    sources = [Ms[e] if sup is None else Ms[e][sup][:, sup] for e, sup in zip(ents, sups)]
                    names = [f"factor {side} of layer {f.names[e]}" for e in ents]
                    core = self.inverted_block(torch.stack(sources), lam_k, form == "cholesky", names, sources)
                sides.append(Side(Ms[0].shape[0], index, lam_k, core, form))
            out.append(InverseBucket([f.idx[j] for j in js], [f.Gs[j] for j in js], [f.As[j] for j in js], *sides,
                                     samples=([f.ZGs[j] for j in js], [f.ZAs[j] for j in js]), groups=g))
        return out

    def saved(self, bucket: InverseBucket, j: int, e) -> dict[str, torch.Tensor]:
        """Layer j's sample rows of the last inversion, where a side was held by them."""
        return {k: Z[j] for k, Z in (("ZG", bucket.samples[0]), ("ZA", bucket.samples[1])) if Z[j] is not None}

    def loaded(self, kfac: KFAC, entry: dict, layer, shape_A: tuple, shape_G: tuple) -> dict:
        out = {k: kfac._loaded(entry, k, shape, layer, f"inverse {k}") for k, shape in (("A", shape_A), ("G", shape_G))}
        out.update(ZA=kfac._loaded_samples(entry, "ZA", layer.in_dim, layer, "inverse ZA"),
                   ZG=kfac._loaded_samples(entry, "ZG", layer.out_dim, layer, "inverse ZG"))
        return out

    def restored(self, kfac: KFAC, groups: list[list[int]], moved: list, decomposed_at: int) -> list[InverseBucket]:
        """The inversion of the last decomposition step redone from its factors and samples, at its damping."""
        root = math.sqrt(eval_schedule("damping", kfac.damping, max(decomposed_at, 0), low_open=True))
        return [b for idx in groups for b in kfac._inverse_buckets(
            idx, *([moved[i][k] for i in idx] for k in ("G", "A", "ZG", "ZA")), root)]


INVERSE_FORMS = {"cholesky": DenseInverses, "auto": ChosenInverses}  # the damped-inverse paths by inverse_method


class KFAC(CurvatureOptimizer):
    r"""K-FAC with eigenbasis preconditioning (docs/design.md, "K-FAC").

    Per preconditioned layer with gradient matrix V = [dW | db] (out x in), or per block of a grouped conv (its
    groups: V_j the block's out/groups rows, A_j, G_j its factors; K-FAC's Fisher is block-diagonal over them):

    - every `factor_interval` steps: A <- (1-w) A + w a^T a / rows,  G <- (1-w) G + w g^T g / N with
      w = 1 - (1-rho)^k, rho = `factor_decay` per step and k the steps since the layer's last update (the first
      update sets A, G to the batch statistics): the factors forget at the same rate per step, about 1/rho steps,
      whatever the interval (`factor_weight`); before the first interval has passed also at steps 1, 2, 4, 8, ...
      (`on_schedule`), and the same for the decompositions;
    - every `inverse_interval` steps: A = Q_A diag(l_A) Q_A^T, G = Q_G diag(l_G) Q_G^T (eigenvalues clamped at 0),
      batched over all layers by `fop_kernels.eigh`;
    - every step: V~ = Q_G^T V Q_A,  U = Q_G (V~ / w) Q_A^T, with
      "eigen" damping w = l_G l_A^T + lambda (exact Tikhonov damping of A kron G), or
      "factored" w = (l_G + sqrt(lambda)/pi)(l_A + sqrt(lambda) pi)^T, pi = sqrt((tr A/dim A)/(tr G/dim G));
    - or, with factored damping and inverse_method "auto" (default) or "cholesky": every `inverse_interval` steps
      the damped inverses (A + sqrt(lambda) pi I)^-1 and (G + sqrt(lambda)/pi I)^-1 ("auto": per factor on its
      support, in the form fop.inverse_choice picks), and every step U = G_d^-1 V A_d^-1: the same update as
      "factored" in the eigenbasis, without eigendecompositions (as the official FOP code);
    - KL clipping (on by default): nu = min(1, sqrt(kl_clip / sum_l lr^2 <U_l, V_l>)) scales U <- nu U;
    - every other parameter: an Adam-like diagonal direction at the per-entry RMS of the (clipped) preconditioned
      directions (unpreconditioned="graft", `_unpreconditioned_directions`), or nu g (unpreconditioned="sgd");
    - the outer update (CurvatureOptimizer): weight decay, momentum, learning rate, on these directions.

    Layers of one shape are rotated together with bmm. Until the first decomposition exists (a forward pass
    before the optimizer was built, say) the step uses the plain gradient.

    Args:
        params_or_model: the model, or parameters / param groups with `model=` given.
        lr: learning rate (official FOP code: 0.1; its run script 0.01).
        momentum: heavy-ball momentum on the preconditioned direction (0.5; the official code's SGD uses 0.9, which
            under the KL clip grows the logits without bound on MNIST and BERT: docs/optimizers.md "Defaults").
        weight_decay: L2 weight decay added to the direction (coupled, as the official code) or, with
            `decoupled=True`, applied to the parameters as in AdamW: p <- (1 - lr wd) p.
        damping: lambda, a float or a callable of the step count (paper: 1e-5 to 1e-3; official default 1e-2).
        damping_mode: "factored" (default: the official code's pi-split, which damps each factor) or "eigen", see
            above.
        factor_decay: rho per step (0.05: the factors average about the last 20 steps at any factor_interval).
            The official code's ema_decay 0.05 is per update: at its interval 10 that is rho = 1 - 0.95^(1/10).
        factor_interval, inverse_interval: steps between factor updates / eigendecompositions (official run
            script: 10 and 10; paper: 5 to 200).
        kl_clip: a trust region on the step's predicted KL divergence, lr^2 <U, F_w U> summed over layers, in
            which the update is scaled down to kl_clip (default 1e-3, as kfac-pytorch; docs/optimizers.md has the
            measurements behind it); None turns it off.
        fisher: "empirical" (factors from the training backward) or "mc" (G from a sampled-label backward that
            the user triggers with `optimizer.fisher_backward(logits)` after the forward of each step).
        factor_dtype: float32 or float64 for the factors and their eigendecompositions.
        product_dtype: None (default: factor_dtype), torch.bfloat16, or float32 with float64 factors: the dtype of
            the per-step preconditioner products. The damped inverses (and the factor copies FOP multiplies by) are
            rounded to it once per inversion, the eigenvectors copied to it once per decomposition; every step the
            gradient stacks are multiplied in it and the results returned in factor_dtype. bfloat16 runs them on
            bf16 matrix units (AMX CPUs, tensor cores) at a relative rounding of 2^-9: on ResNet-18 the directions
            differ from float32's by 0.3-1.7% in norm (bench/RESULTS.md). Kept Cholesky factors and the Woodbury
            forms (a difference of two terms) stay in factor_dtype. float16 is refused (1/lambda overflows it).
        eigh_refresh_iters: 0 (default): a full eigendecomposition on every inverse step; k > 0: only the first is
            full, later ones run k subspace iterations (Q <- qr(M Q)) from the previous eigenvectors through
            `fop_kernels.eigh_refresh`: a few matmuls and a QR instead of an eigh (large factors on CPU; in one
            process only, distributed runs decompose in full).
        inverse_method: "auto" (default): with damping_mode="factored", each damped factor on its support (rows not
            exactly zero) as an explicit inverse, a kept Cholesky factor or the Woodbury form over the EMA's sample
            rows, whichever fop.inverse_choice's cost model prices lowest; with "eigen" damping or
            eigh_refresh_iters, the eigenbasis ("eigh", each factor decomposed on its support); a grouped conv's
            blocks are held densely (an inverse or a Cholesky factor per block, docs/layers.md). "eigh", or
            "cholesky" (needs damping_mode="factored"): dense Cholesky inverses of the whole factors. On the
            damped-inverse paths a damping schedule is read on inverse steps only, since the damping is inside the
            inverses. Cholesky inverses cost about a fifth of an eigendecomposition on CPU (bench/RESULTS.md);
            distributed runs invert on every rank (and hold the factors densely: no sample rows).
        unpreconditioned: what the parameters of no preconditioned layer (embeddings, norms, unsupported layers) take
            as direction: "graft" (default): an Adam-like diagonal direction at the per-entry scale of this step's
            preconditioned directions (`_unpreconditioned_directions`; docs/optimizers.md "One scale"), or "sgd":
            the gradient, times the KL clip's nu (the former behaviour).
        precondition_norms: False (default): LayerNorm/RMSNorm parameters take the `unpreconditioned` step; True:
            one Kronecker block per feature, A_c over [xhat_c, 1] and G_c = mean g_c^2 (fop._layers.PerSampleNormType;
            one process only). Off by default: on the tiny transformers measured it helped the real-data ViT by up to
            3 points and BERT's overfit but raised the fixed-batch ViT probe's median loss (docs/layers.md).
        max_update_norm: None (default) or a positive float: the global norm of the step's directions (before lr and
            momentum) clipped to it, as the official FOP training script's clip at 10.
        linear_tokens: how a Linear applied over leading (token) dims (N, T, ..., d) forms its factors (Eschenhagen et
            al. 2023): "expand" (default) makes every token a row, A = sum a a^T / (N T), G = sum g g^T / N;
            "reduce" averages a and sums g over each sample's tokens first, A = sum_n a_n a_n^T / N,
            G = sum_n g_n g_n^T / N (cheaper: N rows instead of N T). docs/layers.md has the measurement.
        exclude, loss_reduction, check_finite, grad_scaler: see CurvatureOptimizer.
        distributed: None (on when torch.distributed runs more than one rank), False, True or a
            fop.distributed.DistributedOptions: factors averaged over ranks, eigendecompositions sharded (grouped
            convs and embeddings raise: one process only).
    """

    factor_products = False  # K-FAC multiplies by the damped inverses alone: no undamped factor blocks are kept

    def __init__(self, params_or_model, lr: float = 0.1, momentum: float = 0.5, weight_decay: float = 0.0, *,
                 decoupled: bool = False, damping=1e-3, damping_mode: str = "factored", factor_decay: float = 0.05,
                 factor_interval: int = 10, inverse_interval: int = 10, kl_clip: float | None = 1e-3,
                 fisher: str = "empirical", factor_dtype: torch.dtype = torch.float32,
                 product_dtype: torch.dtype | None = None, eigh_refresh_iters: int = 0,
                 inverse_method: str = "auto", max_update_norm: float | None = None, linear_tokens: str = "expand",
                 unpreconditioned: str = "graft", precondition_norms: bool = False,
                 model=None, exclude=None,
                 loss_reduction: str = "mean", check_finite: bool = True, grad_scaler=None, distributed=None):
        check_outer_hyperparameters(lr, momentum, weight_decay)
        self.damping = check_schedule("damping", damping, low_open=True)
        self.damping_mode = check_choice("damping_mode", damping_mode, DAMPING_MODES)
        self.factor_decay = check_float("factor_decay", factor_decay, low=0.0, high=1.0, low_open=True)
        self.factor_interval = check_int("factor_interval", factor_interval)
        self.inverse_interval = check_int("inverse_interval", inverse_interval)
        self.kl_clip = None if kl_clip is None else check_float("kl_clip", kl_clip, low=0.0, low_open=True)
        self.max_update_norm = (None if max_update_norm is None else
                                check_float("max_update_norm", max_update_norm, low=0.0, low_open=True))
        self.fisher = check_choice("fisher", fisher, FISHER_TYPES)
        self.factor_dtype = check_choice("factor_dtype", factor_dtype, (torch.float32, torch.float64))
        if product_dtype is torch.float16:
            raise ValueError("product_dtype=torch.float16 is refused: the damped inverses' entries scale as "
                             "1 / damping and float16 overflows past 65504; use torch.bfloat16 (float32's range)")
        product_dtype = check_choice("product_dtype", product_dtype,
                                     (None, torch.bfloat16, torch.float32, torch.float64))
        self.product_dtype = self.factor_dtype if product_dtype is None else product_dtype
        self.eigh_refresh_iters = check_int("eigh_refresh_iters", eigh_refresh_iters, low=0)
        self.inverse_method = check_choice("inverse_method", inverse_method, INVERSE_METHODS)
        self.linear_tokens = check_choice("linear_tokens", linear_tokens, TOKEN_MODES)
        self.unpreconditioned = check_choice("unpreconditioned", unpreconditioned, UNPRECONDITIONED)
        if self.inverse_method == "cholesky" and self.damping_mode != "factored":
            raise ValueError("inverse_method='cholesky' needs damping_mode='factored': the exact Tikhonov damping of "
                             "A kron G ('eigen') has no Kronecker-factored inverse")
        if self.inverse_method == "cholesky" and self.eigh_refresh_iters:
            raise ValueError("eigh_refresh_iters refreshes eigendecompositions; it does not apply to "
                             "inverse_method='cholesky'")
        # "auto": damped inverses chosen per factor (fop.inverse_choice) unless the eigenbasis itself is needed: the
        # exact Tikhonov damping ("eigen") or the eigenbasis refresh
        self.uses_inverses = self.inverse_method == "cholesky" or (
            self.inverse_method == "auto" and self.damping_mode == "factored" and not self.eigh_refresh_iters)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, decoupled=bool(decoupled))
        given = params_or_model if isinstance(params_or_model, nn.Module) else model  # DDP-wrapped or not
        if not isinstance(precondition_norms, bool):
            raise ValueError(f"precondition_norms must be True or False, got {precondition_norms!r}")
        if precondition_norms:
            self.layer_support = kfac_support
        if will_synchronize(given, distributed):  # fop.distributed averages and shards one matrix per factor
            self.layer_support = without_blocks(self.layer_support, "distributed K-FAC/FOP")
        super().__init__(params_or_model, defaults, model=model, exclude=exclude, loss_reduction=loss_reduction,
                         check_finite=check_finite, grad_scaler=grad_scaler)
        n = len(self.layers)
        self.factors_A: list[torch.Tensor | None] = [None] * n
        self.factors_G: list[torch.Tensor | None] = [None] * n
        # inverse_method="auto": each factor's sample rows Z (factor = Z^T Z: the EMA's sqrt-weighted rows) while
        # the sample-space form is the cheapest (fop.inverse_choice.keeps_samples); None once held densely
        self.samples_A: list[torch.Tensor | None] = [None] * n
        self.samples_G: list[torch.Tensor | None] = [None] * n
        # the columns each A can be nonzero on, where known (a conv's live taps; fop.kfac._updated_input_factor)
        self.nonzero_columns_A: list[torch.Tensor | None] = [None] * n
        self.factor_updates = 0  # how many factor updates have run (host int)
        self.factor_updated_at: list[int] = [-1] * n  # step of each layer's last factor update, -1: none yet
        self.buckets: list[Bucket] | list[InverseBucket] = []
        self.decomposed_at = -1  # step of the last eigendecomposition, -1: none yet
        self.capture.stat_dtype = self.factor_dtype
        first = self.layers[0].weight if self.layers else next(p for g in self.param_groups for p in g["params"])
        view = CommView(self.layers, self.factor_dtype, first.device, self.capture, self.fisher,
                        half_batch_now=lambda: self._needs_half_batch(self.steps), factor_step_now=self.is_factor_step,
                        decompose=robust_eigh)
        self.comm = make_comm(view, given, distributed, self._needs_half_batch(0))
        self.capture.tokens = self.linear_tokens
        self._warned_plain: set[tuple[str, str]] = set()  # (layer, reason) of plain-update warnings given
        diagonal = [layer.name for layer in self.layers if len(layer.type.input_factor_shape(layer)) == 1]
        if diagonal and self.inverse_method == "auto":  # the damped-inverse forms hold dense factors only
            self.uses_inverses = False
        if diagonal and (self.inverse_method == "cholesky" or self.comm.active):
            raise ValueError(f"layers {diagonal} have a diagonal input factor (embeddings), which K-FAC/FOP support "
                             "with inverse_method='eigh' or 'auto' in one process; leave them out with exclude=[...]")
        # the damped-inverse path's forms (DenseInverses, ChosenInverses), None on the eigenbasis path
        self.inverses = (INVERSE_FORMS[self.inverse_method](self.product_dtype, self.factor_products)
                         if self.uses_inverses else None)
        # the sample rows are kept in one process only (distributed factors are averaged densely over ranks), for the
        # empirical Fisher (the MC Fisher's hook reduces its output gradients to Grams at once)
        self._tracks_samples = (self.inverses is not None and self.inverses.keeps_samples and not self.comm.active
                                and self.fisher == "empirical")
        self._arm()

    # -- when to capture, update, decompose ----------------------------------------------------------------------
    def is_factor_step(self, step: int | None = None) -> bool:
        """Whether step `step` (default: the next one) updates the factors."""
        step = self.steps if step is None else step
        return bool(self.layers) and (on_schedule(step, self.factor_interval) or self.factor_updates == 0)

    def _needs_half_batch(self, step: int) -> bool:
        return False

    def _half_grads_in_hooks(self) -> bool:
        """Whether the capture hooks reduce each record's first half to its gradient (FOP in one process)."""
        return False

    def _arm(self) -> None:
        full = self.is_factor_step(self.steps)
        if full or self._needs_half_batch(self.steps):
            mc = full and self.fisher == "mc"  # the training output gradients then serve no factor
            self.capture.arm(full=full, keep_outputs=mc, keep_dy=not mc, half_grads=self._half_grads_in_hooks())

    # -- the MC Fisher helper -------------------------------------------------------------------------------------
    @torch.no_grad()
    def fisher_backward(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """fisher="mc": backpropagate a loss with labels sampled from softmax(logits) to the captured layers.

        Call it after the forward pass of each step, before or after `loss.backward()` (then the training backward
        needs `retain_graph=True`); a no-op on steps that do not update factors. The sampled loss is summed over
        samples, so its output gradients are per-sample gradients; `.grad` is not touched."""
        if self.fisher != "mc":
            raise RuntimeError(f"fisher_backward is for fisher='mc'; this optimizer uses fisher={self.fisher!r}")
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError(f"logits must be an (N, classes) tensor, got "
                             f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
        outputs = self.capture.mc_outputs()
        if not (self.capture.armed and self.capture.full) or not outputs:
            return
        with torch.enable_grad():
            probs = torch.softmax(logits.detach().float(), dim=1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            self.capture.mc_active = True
            try:
                torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
            finally:
                self.capture.mc_active = False
        self.capture.drop_outputs()

    def _has_grad(self, i: int) -> bool:
        """Whether every parameter of layer i has a gradient this step (a layer without is skipped, as torch's
        optimizers skip such parameters: no direction, no factor update), and per-sample statistics: a layer that
        saw a broadcast batch of 1, or whose call the hooks could not capture, is skipped the same way
        (Capture.plain_reason)."""
        return all(p.grad is not None for p in self.layers[i].params) and self.capture.plain_reason(i) is None

    def _validate_before_step(self) -> None:
        for i, layer in enumerate(self.layers):
            reason = self.capture.plain_reason(i)
            if reason is not None and (layer.name, reason) not in self._warned_plain:
                self._warned_plain.add((layer.name, reason))
                logger.warning("layer %s takes the plain update on this step: %s (warned once)", layer.name, reason)
        missing = [self.layers[i].name for i in range(len(self.layers))
                   if self._has_grad(i) and not self.capture.done(i)] if self.capture.armed else []
        if missing and len(missing) < len(self.layers):
            raise RuntimeError(f"layers {missing} have gradients but took no part in the forward/backward pass of "
                               "this step as the hooks saw it (called with a keyword argument, or outside the model?); "
                               "leave them out with exclude=[...] (their parameters then get the plain update)")
        if (self.fisher == "mc" and self.is_factor_step() and self.capture.has_factor_data()
                and not self.capture.has_factor_data(mc=True)):
            raise RuntimeError("fisher='mc': this step updates the factors but optimizer.fisher_backward(logits) "
                               "was not called after the forward pass")

    # -- curvature: computed into new tensors, committed by step() (see CurvatureOptimizer.step) -------------------
    _step_attrs = ("factors_A", "factors_G", "samples_A", "samples_G", "factor_updates", "factor_updated_at", "buckets",
                   "decomposed_at")

    def _update_factors(self, inv_scale) -> bool:
        """One factor update of every layer with a gradient from the captured records, into new tensors; False if
        nothing was captured."""
        mc = self.fisher == "mc"
        active = [i for i in range(len(self.layers)) if self._has_grad(i)]
        if not active or not all(self.capture.has_layer_factor_data(i, mc=mc) for i in active):
            return False
        new_A, new_G = list(self.factors_A), list(self.factors_G)
        new_ZA, new_ZG = list(self.samples_A), list(self.samples_G)
        new_at = list(self.factor_updated_at)
        # a step that also inverts replaces every bucket, so none keeps the old A: it may be updated in place
        in_place = not self.comm.active and on_schedule(self.steps, self.inverse_interval)
        checked_A = {}  # what of an A changed, where not all of it: its block updated in place
        with self.comm.agree():  # distributed: a rank that fails here must not leave the others in the all-reduce
            if self.comm.active and len(active) < len(self.layers):
                raise RuntimeError(f"layers {[self.layers[i].name for i in range(len(self.layers)) if i not in active]}"
                                   " have no gradient on this factor step; distributed K-FAC/FOP needs every layer")
            for i in active:
                layer = self.layers[i]
                if self.factors_A[i] is None:
                    decay, dev = 1.0, layer.weight.device
                    A = torch.zeros(layer.type.input_factor_shape(layer), dtype=self.factor_dtype, device=dev)
                    G = torch.zeros(layer.type.output_factor_shape(layer), dtype=self.factor_dtype, device=dev)
                    self.capture.update_input_factor(i, A, decay)
                    self.nonzero_columns_A[i] = self.capture.live_input_columns(i)
                else:
                    decay = factor_weight(self.factor_decay, self.steps - self.factor_updated_at[i])
                    G = self.factors_G[i].clone()
                    A, checked_A[i] = self._updated_input_factor(i, decay, in_place)
                self.capture.update_output_factor(i, G, decay, mc=mc, dy_scale=inv_scale)
                new_A[i], new_G[i], new_at[i] = A, G, self.steps
                if self._tracks_samples and layer.type.blocks(layer) == 1:  # grouped: held densely per block
                    new_ZA[i], new_ZG[i] = self._grown_samples(i, decay, self.factors_A[i] is None, inv_scale)
        self.comm.all_reduce_factors(new_A, new_G)  # distributed: average over ranks
        for i in active:
            name = self.layers[i].name
            self._to_check += [(f"factor A of layer {name}", checked_A.get(i, new_A[i])),
                               (f"factor G of layer {name}", new_G[i])]
        self.factors_A, self.factors_G = new_A, new_G
        self.samples_A, self.samples_G = new_ZA, new_ZG
        self.factor_updated_at = new_at
        self.factor_updates += 1
        return True

    def _updated_input_factor(self, i: int, decay: float, in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's A after this factor update and what of it changed (all of it, or the block updated in place:
        the finiteness check reads that). A new tensor, except where `in_place` (no bucket keeps the old A)
        and the old A is large (IN_PLACE_MIN_BYTES) and can be nonzero only on the columns this update's rows can
        fill (a conv's taps that read only zero padding are exactly zero: layer4 of a ResNet-18 at 32x32, 4608-wide
        factors with 512 live columns): then the old A is updated on those columns alone, in place, and its old
        block goes to self._undo, which a failed step writes back. `nonzero_columns_A[i]` tracks the columns A can be
        nonzero on (None: any, or not known; recomputed from A when needed)."""
        old = self.factors_A[i]
        cols = self.capture.live_input_columns(i)
        known = self.nonzero_columns_A[i]
        if cols is not None and in_place and old.dim() == 2 and old.numel() * old.element_size() >= IN_PLACE_MIN_BYTES:
            if known is None:
                known = torch.nonzero(old.any(dim=1)).flatten()
            if bool(torch.isin(known, cols).all()):
                index = (cols[:, None], cols[None, :])
                block = old[index]
                self._undo.append(lambda: old.index_put_(index, block))
                written = self.capture.update_input_factor_on_columns(i, old, decay, cols)
                self.nonzero_columns_A[i] = cols
                return old, written
        A = old.clone()
        self.capture.update_input_factor(i, A, decay)
        self.nonzero_columns_A[i] = None if cols is None or known is None else torch.unique(torch.cat([known, cols]))
        return A, A

    def _grown_samples(self, i: int, decay: float, first: bool, inv_scale) -> list[torch.Tensor | None]:
        """[Z_A, Z_G] of layer i after this factor update, the EMA kept exactly in sample space:
        Z <- [sqrt(1 - rho) Z; sqrt(rho c) X] (X this update's rows, c their weight: 1/rows for A, N for G), so that
        Z^T Z is the updated factor. None once a side is held densely: when the rank would pass the point where the
        Woodbury form stops being the cheapest (fop.inverse_choice.keeps_samples) at the factor's width or, on the
        host, at its support (Z's nonzero columns, where the inversion works: layer4 of a ResNet-18 at 32x32 would
        otherwise carry 4608-wide samples long past the rank where its 512-wide support is held densely)."""
        layer = self.layers[i]
        rows = inverse_choice.update_row_count(self.capture, i)
        out = []
        for side, old, d, m in (("A", self.samples_A[i], layer.in_dim, layer.out_dim),
                                ("G", self.samples_G[i], layer.out_dim, layer.in_dim)):
            rank = rows + (0 if first or old is None else old.shape[0])
            if (old is None and not first) or not inverse_choice.keeps_samples(rank, d, m, self.inverse_interval):
                out.append(None)
                continue
            if side == "A":
                X, c = inverse_choice.input_rows(self.capture, i), 1.0 / rows
            else:
                X, c = inverse_choice.output_rows(self.capture, i, inv_scale)
            fresh = X.to(self.factor_dtype) * math.sqrt(decay * c)
            Z = fresh if first else torch.cat([old * math.sqrt(1.0 - decay), fresh])
            if Z.device.type == "cpu" and not inverse_choice.keeps_samples(rank, int(Z.any(dim=0).sum()), m,
                                                                            self.inverse_interval):
                Z = None
            out.append(Z)
        return out

    def _ready(self) -> list[int]:
        """Layers that have factors (every layer once each has had a gradient on a factor step)."""
        return [i for i, A in enumerate(self.factors_A) if A is not None]

    def _decompose(self) -> None:
        """Eigendecompose every A and G in one batched call and stack them by layer shape (or invert them)."""
        if self.uses_inverses:
            self._invert()
            return
        ready = self._ready()
        dense = [i for i in ready if self.factors_A[i].dim() > 1]  # a diagonal A (embeddings) is its own eigenbasis
        groups = {i: self.layers[i].type.blocks(self.layers[i]) for i in ready}

        def blocks(M: torch.Tensor, i: int) -> list[torch.Tensor]:  # a grouped layer's factors: one per block
            return [M] if groups[i] == 1 else list(M.unbind(0))

        def block_names(side: str, i: int) -> list[str]:
            name = f"factor {side} of layer {self.layers[i].name}"
            return [name] if groups[i] == 1 else [f"{name} group {k}" for k in range(groups[i])]

        # a factor may carry rounding-level asymmetry (GEMMs of X^T X in torch); the eigensolvers need it exact
        mats = [0.5 * (M + M.mT) for M in ([M for i in dense for M in blocks(self.factors_A[i], i)]
                                           + [M for i in ready for M in blocks(self.factors_G[i], i)])]
        names = [n for i in dense for n in block_names("A", i)] + [n for i in ready for n in block_names("G", i)]
        prev = {i: (None if b.QA is None else b.QA[b.of_layer(j)], b.QG[b.of_layer(j)]) for b in self.buckets
                if isinstance(b, Bucket) for j, i in enumerate(b.index)}
        if self.eigh_refresh_iters and all(i in prev for i in ready) and prev and not self.comm.active:
            previous = ([M for i in dense for M in blocks(prev[i][0], i)]
                        + [M for i in ready for M in blocks(prev[i][1], i)])
            try:
                evals, evecs = fop_kernels.eigh_refresh(mats, previous, iters=self.eigh_refresh_iters, clamp=True)
            except RuntimeError as err:
                logger.warning("eigenbasis refresh failed (%s); decomposing in full", err)
                evals, evecs = robust_eigh(mats, names)
        else:
            evals, evecs = self.comm.eigh(mats, names) if self.comm.active else robust_eigh(mats, names)
        as_layers = [[None] * len(self.layers) for _ in range(4)]
        k = 0
        for side, index in ((0, dense), (2, ready)):
            for i in index:  # a grouped layer's eigenpairs stacked over its blocks: (g, d), (g, d, d)
                g = groups[i]
                l, Q = (evals[k], evecs[k]) if g == 1 else (torch.stack(evals[k:k + g]), torch.stack(evecs[k:k + g]))
                as_layers[side][i], as_layers[side + 1][i] = l, Q
                k += g
        for i in ready:
            if self.factors_A[i].dim() == 1:
                as_layers[0][i] = self.factors_A[i].clamp_min(0)
        self._set_buckets(*as_layers)
        self.decomposed_at = self.steps

    def _by_shape(self, like: list[torch.Tensor | None]) -> list[list[int]]:
        """Indices of the layers with `like[i]` grouped by (gradient shape, blocks, device, dtype of `like[i]`), in
        layer order."""
        by_shape: dict[tuple, list[int]] = {}
        for i, layer in enumerate(self.layers):
            if like[i] is not None:
                key = (layer.shape, layer.type.blocks(layer), like[i].device, like[i].dtype, like[i].dim())
                by_shape.setdefault(key, []).append(i)
        return list(by_shape.values())

    def _make_buckets(self, lA, QA, lG, QG) -> list[Bucket]:
        """Buckets of the layers i with lA[i] (lists indexed by layer, None where a layer has none; QA[i] None for
        a diagonal input factor: such layers form their own buckets)."""
        like = [QA[i] if QA[i] is not None else lA[i] for i in range(len(self.layers))]
        out = []
        for idx in self._by_shape(like):
            g = self.layers[idx[0]].type.blocks(self.layers[idx[0]])
            out.append(Bucket(idx, _stack([QG[i] for i in idx], g), _stack([lG[i] for i in idx], g),
                              None if QA[idx[0]] is None else _stack([QA[i] for i in idx], g),
                              _stack([lA[i] for i in idx], g), g, self.product_dtype))
        return out

    def _set_buckets(self, lA, QA, lG, QG) -> None:
        self.buckets = self._make_buckets(lA, QA, lG, QG)

    def _invert(self) -> None:
        """The damped-inverse path: per layer shape, stack A and G and invert A + sqrt(lambda) pi I and
        G + sqrt(lambda)/pi I, pi = sqrt((tr A/dim A)/(tr G/dim G)) (means clamped at 1e-30, as the factored
        damping of the eigenbasis path). Factors are averaged over ranks already, so every rank inverts alike."""
        root = math.sqrt(eval_schedule("damping", self.damping, self.steps, low_open=True))
        buckets = []
        for idx in self._by_shape(self.factors_A):
            buckets += self._inverse_buckets(idx, [self.factors_G[i] for i in idx], [self.factors_A[i] for i in idx],
                                             [self.samples_G[i] for i in idx], [self.samples_A[i] for i in idx], root)
        self.buckets = buckets
        self.decomposed_at = self.steps

    def _inverse_buckets(self, idx: list[int], Gs, As, ZGs, ZAs, root: float) -> list[InverseBucket]:
        """InverseBuckets of the layers `idx` (one gradient shape and block count) from their factors and sample rows
        (None: held densely), in the forms of this optimizer's inverse method (`self.inverses`: DenseInverses,
        ChosenInverses). The factored damping sqrt(lambda) is split per block by pi = sqrt((tr A / dim A) / (tr G /
        dim G)): lambda_G = sqrt(lambda) / pi, lambda_A = sqrt(lambda) pi."""
        g = self.layers[idx[0]].type.blocks(self.layers[idx[0]])

        def mean_diagonal(Ms: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([M.diagonal(dim1=-2, dim2=-1).double().mean(-1).reshape(-1) for M in Ms]).clamp_min(1e-30)

        pi = torch.sqrt(mean_diagonal(As) / mean_diagonal(Gs))
        names = [n for j in idx for n in ([self.layers[j].name] if g == 1 else
                                          [f"{self.layers[j].name} group {k}" for k in range(g)])]
        factors = BucketFactors(idx, Gs, As, ZGs, ZAs, g, root / pi, root * pi, names,
                                [self.nonzero_columns_A[i] for i in idx])
        return self.inverses.buckets(factors, self.inverse_interval)

    def _active_buckets(self) -> list:
        """The buckets restricted to the layers with a gradient this step (the buckets themselves when all have)."""
        out = []
        for b in self.buckets:
            keep = [j for j, i in enumerate(b.index) if self._has_grad(i)]
            if len(keep) == len(b.index):
                out.append(b)
            elif keep:
                out.append(b.subset(keep))
        return out

    def _curvature_step(self, inv_scale):
        if not self.layers:
            return {}
        step = self.steps
        if self.is_factor_step(step):
            updated = self._update_factors(inv_scale)
            if updated and (on_schedule(step, self.inverse_interval) or self.decomposed_at < 0
                            or len(self._ready()) > sum(len(b.index) for b in self.buckets)):
                self._decompose()
        elif on_schedule(step, self.inverse_interval) and self.factor_updates > 0:
            self._decompose()
        buckets = self._active_buckets()
        if not buckets:
            return {}
        # the damped inverses hold their damping (read on inversion steps); the eigenbasis divides by it every step
        damping = None if self.uses_inverses else eval_schedule("damping", self.damping, step, low_open=True)
        return self._precondition(buckets, damping, inv_scale)

    def _sub_batches(self, buckets: list):
        """What a step needs to form its second gradient (FOP: the sample counts of the sub-batches), or None for a
        step with one gradient. K-FAC: None."""
        return None

    def _bucket_gradients(self, bucket: Bucket, inv_scale, sub_batches) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(V stack, difference stack or None) for a bucket: K-FAC has no second gradient."""
        return torch.stack([self.layers[i].grad_matrix(bucket.dtype) for i in bucket.index]), None

    def _combine(self, buckets: list, A_rot: list, D_rot: list | None, lG: list, lA: list,
                 damping: float) -> tuple[list, tuple | None]:
        """(the rotated update U~ per block, the step's statistics or None); K-FAC: V~ / w through project_combine
        with beta=0, eta=1, no statistics."""
        sums = A_rot[0].new_zeros(len(A_rot), 5)
        U_rot, _ = fop_kernels.project_combine(A_rot, A_rot, sums, lG, lA, damping, self.damping_mode,
                                               beta=0.0, eta=1.0)
        return U_rot, None

    def _inverse_update(self, bucket: InverseBucket, V: torch.Tensor,
                        D: torch.Tensor | None) -> tuple[torch.Tensor, tuple | None]:
        """Damped inverses: (the update stack of a bucket, its statistics or None); K-FAC: G_d^-1 V A_d^-1, None.
        `_precondition` hands over the support form where there is one (InverseBucket.on_support)."""
        return bucket.precondition(V), None

    def _precondition(self, buckets: list, damping: float | None, inv_scale) -> dict[int, torch.Tensor]:
        """{id(param): direction} of the layers in `buckets` (and, under the KL clip, of every other parameter).

        The template steps hand their values on explicitly: `_sub_batches` -> `_bucket_gradients` (V, D per bucket)
        -> `_inverse_update` per bucket or `_combine` over all blocks (updates and statistics parts) ->
        `_update_scale` (the KL clip over updates, gradients and statistics). On the damped-inverse path a bucket
        whose gradients are zero outside A's support (InverseBucket.on_support) goes through all of these on the
        support columns alone and is written out at full width once, scaled."""
        sub_batches = self._sub_batches(buckets)
        V_stacks, D_stacks, updates, stats = [], [], [], []
        expands = [None] * len(buckets)
        for b in buckets:
            V, D = (b.as_blocks(M) for M in self._bucket_gradients(b, inv_scale, sub_batches))
            V_stacks.append(V)
            D_stacks.append(D)
        if self.uses_inverses:
            for k, b in enumerate(buckets):
                V, D = V_stacks[k], D_stacks[k]
                core, Ms, expands[k] = b.on_support([V] if D is None else [V, D])
                V_stacks[k], D_stacks[k] = Ms[0], (None if D is None else Ms[1])
                U, part = self._inverse_update(core, V_stacks[k], D_stacks[k])
                updates.append(U)
                stats.append(part)
        else:
            have_diff = all(D is not None for D in D_stacks)
            A_rot = [M for b, V in zip(buckets, V_stacks) for M in b.rotate(V).unbind(0)]
            D_rot = [M for b, D in zip(buckets, D_stacks) for M in b.rotate(D).unbind(0)] if have_diff else None
            lG = [M for b in buckets for M in b.lG.unbind(0)]
            lA = [M for b in buckets for M in b.lA.unbind(0)]
            U_rot, part = self._combine(buckets, A_rot, D_rot, lG, lA, damping)
            stats.append(part)
            start = 0
            for b in buckets:
                updates.append(b.unrotate(torch.stack(U_rot[start:start + b.size])))
                start += b.size
        scale, nu = self._update_scale(buckets, updates, V_stacks, D_stacks,
                                       None if any(part is None for part in stats) else stats)
        if scale is not None:
            for U in updates:
                U.mul_(scale.to(U.dtype))
        updates = [U if e is None else e(U) for U, e in zip(updates, expands)]
        directions = {}
        for b, U in zip(buckets, updates):
            for j, i in enumerate(b.index):
                layer = self.layers[i]
                for p, d in zip(layer.params, layer.split(b.layer_matrix(U, j))):
                    directions[id(p)] = d
        self._unpreconditioned_directions(directions, nu)
        if self.max_update_norm is not None:
            self._clip_update_norm_(directions)
        return directions

    def _unpreconditioned_directions(self, directions: dict[int, torch.Tensor], nu: torch.Tensor | None) -> None:
        """The directions of the parameters with a gradient that no layer preconditions, added to `directions`.

        unpreconditioned="graft": an Adam-like diagonal direction g / (sqrt(v^) + 1e-8), v <- b2 v + (1 - b2) g^2
        (b2 = 0.999, v^ = v / (1 - b2^t), a new tensor in state "graft_sq", t in "graft_step"), times s =
        `_graft_scale`, for K-FAC the RMS per entry of the preconditioned directions of this step,
        sqrt(sum_l ||U_l||^2 / sum_l numel(U_l)) (after the KL clip): every entry moves at the scale of a
        preconditioned one, whatever the gradient's own scale.
        unpreconditioned="sgd": the gradient times the KL clip's nu (the plain gradient without the clip)."""
        others = [p for g in self.param_groups for p in g["params"] if p.grad is not None and id(p) not in directions]
        if not others:
            return
        if self.unpreconditioned == "sgd":
            if nu is not None:  # the trust region covers the whole step
                for p in others:
                    directions[id(p)] = p.grad * nu.to(p.grad.dtype)
            return
        pre = list(directions.values())
        if not pre:  # nothing preconditioned this step: the plain gradient
            return
        scale = self._graft_scale(pre, nu)
        for p in others:
            directions[id(p)] = grafted_direction(self.state[p], p.grad, scale)

    def _graft_scale(self, preconditioned: list[torch.Tensor], nu: torch.Tensor | None) -> torch.Tensor:
        """s, the scale of the grafted directions: the RMS per entry of this step's (clipped) preconditioned
        directions, `rms_per_entry`."""
        return rms_per_entry(preconditioned)

    def _clip_update_norm_(self, directions: dict[int, torch.Tensor]) -> None:
        """Every direction (the preconditioned ones and the other parameters' gradients) times
        min(1, max_update_norm / ||all directions||), as the official FOP script's clip_grad_norm_ after
        preconditioning."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        every = [directions.get(id(p), p.grad) for p in params]
        norm = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(every)]))
        factor = (self.max_update_norm / (norm + 1e-6)).clamp(max=1.0)
        for p, d in zip(params, every):
            directions[id(p)] = d * factor.to(d.dtype)

    def _update_scale(self, buckets: list, updates: list[torch.Tensor], V_stacks: list[torch.Tensor],
                      D_stacks: list[torch.Tensor | None],
                      stats: list[tuple] | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the factor every update is multiplied by, the KL clip's nu for every other parameter): 0-d device tensors,
        None for 1. `stats`: the statistics parts of `_combine`/`_inverse_update`, None if any is None.
        K-FAC: both are the KL clip's nu."""
        if self.kl_clip is None:
            return None, None
        nu = self._kl_factor(buckets, [stack_dot(U, V) for U, V in zip(updates, V_stacks)])
        return nu, nu

    def _kl_factor(self, buckets: list, quadratic: list[torch.Tensor]) -> torch.Tensor:
        """nu = min(1, sqrt(kl_clip / sum_l lr_l^2 q_l)) from q_l = <U_l, F_w U_l> per layer (a tensor per bucket,
        one entry per block; K-FAC's U = F_w^-1 V gives q = <U, V>): scaled by nu, the step's predicted KL
        divergence (its squared F_w-norm) is at most kl_clip. On the device."""
        lr_of = {id(p): g["lr"] for g in self.param_groups for p in g["params"]}
        total = None
        for b, q in zip(buckets, quadratic):
            if b.groups > 1:  # one q per block: a layer's q is the sum over its blocks
                q = q.view(len(b.index), b.groups).sum(1)
            lrs = torch.tensor([lr_of[id(self.layers[i].weight)] ** 2 for i in b.index], dtype=q.dtype)
            part = (q * lrs.to(q.device)).sum()
            total = part if total is None else total + part
        return torch.sqrt(self.kl_clip / total.clamp_min(1e-30)).clamp(max=1.0)

    # -- state -------------------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        extra = super()._extra_state()
        eig = [None] * len(self.layers)
        inverse = [None] * len(self.layers)
        for b in self.buckets:
            for j, i in enumerate(b.index):
                e = b.of_layer(j)  # a grouped layer's entries: (groups, ...) stacks
                if isinstance(b, InverseBucket):
                    inverse[i] = {"A": b.As[j], "G": b.Gs[j], **self.inverses.saved(b, j, e)}
                else:
                    eig[i] = {"lA": b.lA[e], "QG": b.QG[e], "lG": b.lG[e]}
                    if b.QA is not None:
                        eig[i]["QA"] = b.QA[e]
        extra.update(inverse_method=self.inverse_method, factor_updates=self.factor_updates,
                     factor_updated_at=list(self.factor_updated_at), decomposed_at=self.decomposed_at,
                     factors=[None if A is None else {"A": A, "G": G} for A, G in zip(self.factors_A, self.factors_G)],
                     eigen=eig, inverse=inverse,
                     samples=[{k: Z for k, Z in (("A", ZA), ("G", ZG)) if Z is not None}
                              for ZA, ZG in zip(self.samples_A, self.samples_G)])
        return extra

    def _loaded_update_steps(self, extra: dict, factors: list, steps: int) -> list[int]:
        """extra["factor_updated_at"] checked: per layer -1 (no factors) or a step before `steps`. A state_dict
        saved before it was kept (the decay per update) gives each layer with factors the last scheduled factor step."""
        n = len(self.layers)
        saved = extra.get("factor_updated_at")
        if saved is None:
            last = max((s for s in range(max(steps - 2 * self.factor_interval, 0), steps)
                        if on_schedule(s, self.factor_interval)), default=0)
            return [-1 if f is None else last for f in factors]
        if not isinstance(saved, list) or len(saved) != n:
            raise ValueError(f"state_dict holds factor_updated_at of {len(saved) if isinstance(saved, list) else '?'} "
                             f"layers, this optimizer preconditions {n}")
        at = [state_counter({"at": v}, "at", f"state_dict factor_updated_at of layer {layer.name}", low=-1)
              for v, layer in zip(saved, self.layers)]
        for v, layer, f in zip(at, self.layers, factors):
            if v >= steps or (v < 0) != (f is None):
                raise ValueError(f"state_dict factor_updated_at of layer {layer.name} is {v}, which does not fit "
                                 f"{steps} steps {'without' if f is None else 'with'} its factors")
        return at

    def _loaded_samples(self, entry: dict, key: str, width: int, layer, what: str) -> torch.Tensor | None:
        """entry[key] (absent: None) checked as an r x width sample matrix (r >= 1) like `_loaded`."""
        t = entry.get(key)
        if t is None:
            return None
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < 1:
            raise ValueError(f"state_dict {what} of layer {layer.name} is not a (rows, {width}) matrix")
        return self._loaded(entry, key, (t.shape[0], width), layer, what)

    def _loaded(self, entry: dict, key: str, shape: tuple, layer, what: str) -> torch.Tensor:
        """entry[key] checked (a tensor of `shape` in the factor dtype, finite) and moved to the layer's device."""
        t = entry[key]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != self.factor_dtype:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"state_dict {what} of layer {layer.name} is {got}, expected {self.factor_dtype} "
                             f"{tuple(shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"state_dict {what} of layer {layer.name} contains non-finite values")
        return layer_device_tensor(t, layer.weight)

    def _load_extra_state(self, extra: dict) -> dict:
        new = super()._load_extra_state(extra)
        n = len(self.layers)
        method = extra.get("inverse_method")
        if method is not None and method != self.inverse_method:
            raise ValueError(f"state_dict was saved with inverse_method={method!r}, this optimizer uses "
                             f"{self.inverse_method!r}")
        new["nonzero_columns_A"] = [None] * n  # not saved: recomputed from a loaded A when needed
        new["factor_updates"] = state_counter(extra, "factor_updates")
        new["decomposed_at"] = state_counter(extra, "decomposed_at", low=-1)
        factors = extra["factors"]
        if not isinstance(factors, list) or len(factors) != n:
            raise ValueError(f"state_dict holds factors of {len(factors) if isinstance(factors, list) else '?'} "
                             f"layers, this optimizer preconditions {n}")
        new["factors_A"], new["factors_G"] = [None] * n, [None] * n
        for i, (layer, f) in enumerate(zip(self.layers, factors)):
            if f is not None:
                new["factors_A"][i] = self._loaded(f, "A", layer.type.input_factor_shape(layer), layer, "factor A")
                new["factors_G"][i] = self._loaded(f, "G", layer.type.output_factor_shape(layer), layer, "factor G")
        new["factor_updated_at"] = self._loaded_update_steps(extra, new["factors_A"], new["steps"])
        samples = extra.get("samples") or [{}] * n
        if not isinstance(samples, list) or len(samples) != n:
            raise ValueError(f"state_dict holds samples of {len(samples) if isinstance(samples, list) else '?'} "
                             f"layers, this optimizer preconditions {n}")
        new["samples_A"] = [self._loaded_samples(z, "A", layer.in_dim, layer, "samples A")
                            for layer, z in zip(self.layers, samples)]
        new["samples_G"] = [self._loaded_samples(z, "G", layer.out_dim, layer, "samples G")
                            for layer, z in zip(self.layers, samples)]
        key, other = ("inverse", "eigen") if self.uses_inverses else ("eigen", "inverse")
        saved = extra.get(key) or []
        if not any(e is not None for e in saved) and any(e is not None for e in extra.get(other) or []):
            raise ValueError(f"state_dict holds {other} decompositions (inverse_method="
                             f"{'eigh' if other == 'eigen' else 'cholesky'!r}), this optimizer uses "
                             f"inverse_method={self.inverse_method!r}")
        if saved and len(saved) != n:
            raise ValueError(f"state_dict holds {len(saved)} {key} entries for {n} layers")
        moved: list[dict | None] = [None] * n
        for i, (layer, e) in enumerate(zip(self.layers, saved)):
            if e is None:
                continue
            if new["factors_A"][i] is None:
                raise ValueError(f"state_dict has a decomposition but no factors for layer {layer.name}")
            shape_A, shape_G = layer.type.input_factor_shape(layer), layer.type.output_factor_shape(layer)
            if key == "inverse":
                moved[i] = self.inverses.loaded(self, e, layer, shape_A, shape_G)
                continue
            # a grouped layer's: stacked over its blocks, (g, d, d) and (g, d)
            shapes = {"QA": shape_A, "lA": shape_A[:-1], "QG": shape_G, "lG": shape_G[:-1]}
            if new["factors_A"][i].dim() == 1:  # a diagonal input factor has no QA
                shapes = {"lA": shape_A, "QG": shape_G, "lG": shape_G[:-1]}
            moved[i] = {k: self._loaded(e, k, shape, layer, f"{key} {k}") for k, shape in shapes.items()}
        if new["decomposed_at"] >= 0 and any(A is not None for A in new["factors_A"]) and not any(moved):
            raise ValueError(f"state_dict says a decomposition was made at step {new['decomposed_at']} but holds "
                             f"no {key} entries")
        if key == "eigen":
            new["buckets"] = self._make_buckets(*([None if e is None else e.get(k) for e in moved]
                                                  for k in ("lA", "QA", "lG", "QG")))
        else:
            groups = self._by_shape([None if e is None else e["A"] for e in moved])
            new["buckets"] = self.inverses.restored(self, groups, moved, new["decomposed_at"])
        return new
