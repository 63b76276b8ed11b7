"""The per-factor damped inverses of inverse_method="auto" (fop.inverse_choice): the Woodbury (sample-space) form
and the support reduction against the dense damped inverse, the cost model, the deflated eigendecomposition, and
K-FAC/FOP steps in these forms against the dense Cholesky path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fop import FOP, KFAC, inverse_choice
from fop.inverse_choice import DenseBlock, Side, Woodbury, choose_form, form_costs, keeps_samples, support
from fop.kfac import DampedFactor, InverseBucket, deflated_eigh
from helpers import TOLERANCES, assert_close
from torch import nn

SHAPES = [(1, 3, 7, 5), (2, 5, 19, 8), (3, 16, 40, 1), (2, 1, 6, 9)]  # (B, r, s, m)


def _low_rank(B, r, s, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(B, r, s, generator=g, dtype=torch.float64)
    lam = torch.rand(B, generator=g, dtype=torch.float64) * 0.5 + 1e-2
    return Z.to(dtype), lam


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,r,s,m", SHAPES)
def test_woodbury_matches_dense_damped_inverse(B, r, s, m, dtype):
    Z, lam = _low_rank(B, r, s, dtype, seed=B * 100 + r)
    Zd = Z.double()
    dense = torch.linalg.inv(Zd.mT @ Zd + lam[:, None, None] * torch.eye(s, dtype=torch.float64))
    g = torch.Generator().manual_seed(7)
    X = torch.randn(B, m, s, generator=g, dtype=torch.float64)
    core = Woodbury(Z, lam)
    atol, rtol = TOLERANCES[dtype]
    scale = float(dense.abs().max())  # the inverse reaches 1/lam: compare relative to its size
    for got, expected, what in ((core.right(X.to(dtype)), X @ dense, "right"),
                                (core.left(X.mT.to(dtype)), dense @ X.mT, "left"),
                                (core.factor_right(X.to(dtype)), X @ Zd.mT @ Zd, "factor_right"),
                                (core.factor_left(X.mT.to(dtype)), Zd.mT @ Zd @ X.mT, "factor_left")):
        assert got.dtype == dtype and bool(torch.isfinite(got).all())
        assert_close(got, expected, atol=atol * scale * 10, rtol=rtol * 10, what=f"{what} {dtype} {(B, r, s, m)}")


def _supported_samples(B, r, n, g):
    """Two fixed supports of 4 of n columns and sample rows Z (B, r, n) nonzero only on them (float64)."""
    sup = [torch.tensor([0, 3, 4, 9]), torch.tensor([1, 2, 7, 11])]
    Z = torch.zeros(B, r, n, dtype=torch.float64)
    for b, idx in enumerate(sup):
        Z[b][:, idx] = torch.randn(r, idx.numel(), generator=g, dtype=torch.float64)
    return sup, Z


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["inverse", "cholesky", "woodbury"])
def test_side_on_a_support_matches_the_dense_damped_inverse(form, dtype):
    """A factor with exactly zero rows (inputs never nonzero): its inverse on the support block, 1/lam elsewhere.
    The result tensors are written in full: every element is compared (no NaN from a missed column)."""
    B, n, r, m = 2, 12, 3, 5
    g = torch.Generator().manual_seed(3)
    sup, Z = _supported_samples(B, r, n, g)
    M = Z.mT @ Z
    lam = torch.tensor([0.3, 0.05], dtype=torch.float64)
    for b, idx in enumerate(sup):
        assert torch.equal(support(M[b]), idx)
    index = torch.stack(sup)
    if form == "woodbury":
        core = Woodbury(torch.stack([Z[b][:, idx] for b, idx in enumerate(sup)]).to(dtype), lam)
    else:
        block = torch.stack([M[b][idx][:, idx] for b, idx in enumerate(sup)]).to(dtype)
        core = DenseBlock(block, DampedFactor.of(block, lam, form == "cholesky"), block.dtype)
    side = Side(n, index, lam, core, form)
    dense = torch.linalg.inv(M + lam[:, None, None] * torch.eye(n, dtype=torch.float64))
    X = torch.randn(B, m, n, generator=g, dtype=torch.float64)
    atol, rtol = TOLERANCES[dtype]
    assert_close(side.right(X.to(dtype)), X @ dense, atol * 100, rtol * 10, "right")
    assert_close(side.left(X.mT.to(dtype)), dense @ X.mT, atol * 100, rtol * 10, "left")
    assert_close(side.factor_right(X.to(dtype)), X @ M, atol * 10, rtol * 10, "factor_right")
    assert_close(side.factor_left(X.mT.to(dtype)), M @ X.mT, atol * 10, rtol * 10, "factor_left")
    sub = side.subset([1])
    assert_close(sub.right(X[1:].to(dtype)), X[1:] @ dense[1:], atol * 100, rtol * 10, "subset right")


def _supported_bucket(dtype, g, B=2, o=4, n=12, r=3):
    """(bucket, G, A, (G + lam_G)^-1, (A + lam_A)^-1): an InverseBucket in `dtype` whose A side is held on the
    supports of _supported_samples, beside its float64 factors and dense damped inverses."""
    sup, ZA = _supported_samples(B, r, n, g)
    A = ZA.mT @ ZA
    ZG = torch.randn(B, 2 * o, o, generator=g, dtype=torch.float64)
    G = ZG.mT @ ZG
    lam_A, lam_G = torch.tensor([0.3, 0.05], dtype=torch.float64), torch.tensor([0.2, 0.1], dtype=torch.float64)
    block = torch.stack([A[b][idx][:, idx] for b, idx in enumerate(sup)]).to(dtype)
    Ainv = Side(n, torch.stack(sup), lam_A, DenseBlock(block, DampedFactor.of(block, lam_A, False), dtype), "inverse")
    Ginv = Side(o, None, lam_G, DenseBlock(G.to(dtype), DampedFactor.of(G.to(dtype), lam_G, False), dtype), "inverse")
    bucket = InverseBucket([0, 1], list(G.to(dtype)), list(A.to(dtype)), Ginv, Ainv)
    PG = torch.linalg.inv(G + lam_G[:, None, None] * torch.eye(o, dtype=torch.float64))
    PA = torch.linalg.inv(A + lam_A[:, None, None] * torch.eye(n, dtype=torch.float64))
    return bucket, G, A, PG, PA


def _gradient(bucket, g, zero_outside: bool) -> torch.Tensor:
    """A random float64 (B, o, n) stack for `bucket`, zero outside its A support when `zero_outside`."""
    B, o, n = len(bucket.index), bucket.Ginv.n, bucket.Ainv.n
    M = torch.randn(B, o, n, generator=g, dtype=torch.float64)
    if zero_outside:
        A = bucket.Ainv
        M = A.scatter_columns(torch.zeros_like(M), A.support_columns(M))
    return M


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("outside", ["zero", "nonzero"])
def test_bucket_products_with_a_support_on_the_input_side(outside, dtype):
    """InverseBucket.precondition and .fisher where A's inverse is held on a support: a gradient exactly zero
    outside it (a conv's padding-only taps; the G side then works on the support columns alone) and one that is
    not (every column goes through), against the dense float64 products; every element compared."""
    g = torch.Generator().manual_seed(11)
    bucket, G, A, PG, PA = _supported_bucket(dtype, g)
    M = _gradient(bucket, g, outside == "zero")
    expected = PG @ M @ PA
    atol, rtol = TOLERANCES[dtype]
    core, (inside,), expand = bucket.on_support([M.to(dtype)])  # the step's route: the S columns alone if zero
    assert (core is not bucket) == (outside == "zero")
    for route, got in (("every column", bucket.precondition(M.to(dtype))),
                       ("on_support", expand(core.precondition(inside)))):
        assert got.dtype == dtype and got.shape == M.shape
        assert_close(got, expected, atol * 100 * float(expected.abs().max()), rtol * 10,
                     f"precondition {outside} {route}")
    fisher = G @ M @ A
    assert_close(bucket.fisher(M.to(dtype)), fisher, atol * 10 * float(fisher.abs().max()), rtol * 10,
                 f"fisher {outside}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("outside", ["both zero", "difference nonzero", "both nonzero"])
def test_fop_update_on_a_support_matches_the_dense_one(outside, dtype):
    """FOP's damped-inverse update (products, five sums, combination) on A's support columns alone where both
    gradients are zero outside it, and on every column where one is not, against the dense float64 formulas."""
    g = torch.Generator().manual_seed(13)
    bucket, G, A, PG, PA = _supported_bucket(dtype, g)
    V = _gradient(bucket, g, outside != "both nonzero")
    D = _gradient(bucket, g, outside == "both zero")
    opt = FOP(nn.Linear(3, 2))
    core, (Vs, Ds), expand = bucket.on_support([V.to(dtype), D.to(dtype)])  # as FOP's step: the support form
    assert (core is not bucket) == (outside == "both zero") and Vs.shape[2] == (4 if outside == "both zero" else 12)
    U_core, (_, sums, scalars, mean_sq) = opt._inverse_update(core, Vs, Ds)
    U = expand(U_core)
    FV, PV, PD = G @ V @ A, PG @ V @ PA, PG @ D @ PA
    expected_sums = torch.stack([(X * Y).sum((1, 2)) for X, Y in ((V, FV), (D, FV), (V, PV), (D, PV), (D, PD))], 1)
    atol, rtol = TOLERANCES[dtype]
    assert_close(sums, expected_sums, atol * 100 * float(expected_sums.abs().max()), rtol * 10, f"sums {outside}")
    s, beta, eta = (t.view(-1, 1, 1) for t in scalars.double().unbind(1))
    expected = eta * (PV + beta * (PD - s * PV))
    assert U.dtype == dtype and U.shape == V.shape
    assert_close(U, expected, atol * 100 * float(expected.abs().max()), rtol * 10, f"update {outside}")
    assert bool((beta != 0).all())  # the difference enters: a combination that drops PD would fail
    expected_sq = PV.square().sum((1, 2))  # |P g_avg|^2 per entry, the graft's scale
    assert_close(mean_sq, expected_sq, atol * 100 * float(expected_sq.max()), rtol * 10, f"|P V|^2 {outside}")


def test_support_is_none_for_a_full_factor_and_exact_for_zero_rows():
    M = torch.eye(4)
    assert support(M) is None
    M[2, 2] = 0.0
    assert torch.equal(support(M), torch.tensor([0, 1, 3]))
    M[2, 0] = M[0, 2] = 1e-30  # a tiny entry keeps the row in the support (exact, no threshold)
    assert support(M) is None


def test_support_of_a_wide_factor_is_aligned_and_worth_its_gathers():
    """Wide factors: the support is padded with zero rows to a multiple of 64 (sorted, the nonzero rows all in);
    none where it would drop less than 1/8 of the rows."""
    n = 4608
    M = torch.zeros(n, n)
    live = torch.arange(4, n, 9)[:-3]  # a 3x3 conv's centre taps, three channels dead: 509 rows
    M[live, live] = 1.0
    idx = support(M)
    assert idx.numel() == 512 and bool((idx.diff() > 0).all()) and bool(torch.isin(live, idx).all())
    M = torch.eye(2304)
    M[5, 5] = 0.0  # 2303 of 2304 rows
    assert support(M) is None
    M[:300, :300] = 0.0  # 2004 rows, padded to 2048 > 7/8 of 2304 = 2016
    assert support(M) is None
    M[:400, :400] = 0.0  # 1904 -> 1920
    assert support(M).numel() == 1920


def test_cost_model_choices():
    # ResNet-18 at 32x32: a layer4 input factor on its support (512) after one batch of 64 rows: sample space
    assert choose_form(512, 512, 10, rank=64) == "woodbury"
    # the same rank past half the width: dense again, and the samples are no longer kept
    assert choose_form(512, 512, 10, rank=400) == "inverse"
    assert keeps_samples(64, 512, 512, 10) and not keeps_samples(400, 512, 512, 10)
    # unknown rank (a dense factor): an explicit inverse, or the Cholesky factor where d >> m * interval
    assert choose_form(2304, 256, 10) == "inverse"
    assert choose_form(3137, 64, 10) == "cholesky"
    costs = form_costs(100, 10, 5, rank=20)
    assert set(costs) == set(inverse_choice.FORMS) and all(c > 0 for c in costs.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deflated_eigh_matches_the_full_decomposition(dtype):
    g = torch.Generator().manual_seed(5)
    n, idx = 9, torch.tensor([1, 4, 5, 8])
    X = torch.zeros(6, n, dtype=torch.float64)
    X[:, idx] = torch.randn(6, idx.numel(), generator=g, dtype=torch.float64)
    mats = [(X.T @ X).to(dtype), torch.eye(3, dtype=dtype) * 2]
    seen = []

    def decompose(ms):
        seen.extend(m.shape[0] for m in ms)
        return [list(t) for t in zip(*(torch.linalg.eigh(m) for m in ms))]

    evals, evecs = deflated_eigh(decompose)(mats)
    assert seen == [4, 3]  # the zero rows never reach the decomposition
    atol, rtol = TOLERANCES[dtype]
    for M, l, Q in zip(mats, evals, evecs):
        assert l.shape == (M.shape[0],) and Q.shape == M.shape
        assert_close(Q @ torch.diag(l) @ Q.mT, M, atol * 10, rtol * 10, "reconstruction")
        assert_close(Q.mT @ Q, torch.eye(M.shape[0], dtype=dtype), atol * 10, rtol, "orthonormal")


class _Sparse(nn.Module):
    """A 3x3 conv on 1x1 maps (only the centre tap of its 27 input columns is nonzero: support 3 + bias) and a Linear
    wider than the batch: the support and the Woodbury forms both appear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 1 * 1 + 36, 5)

    def forward(self, x):
        a, b = x[:, :3].reshape(-1, 3, 1, 1), x[:, 3:]
        return self.fc(torch.cat([F.relu(self.conv(a)).flatten(1), b], 1))


def _run(opt_cls, model, steps, **kwargs):
    opt = opt_cls(model, **{**dict(lr=0.1, damping=1e-2, factor_interval=1, inverse_interval=2, kl_clip=None,
                                   factor_dtype=torch.float64), **kwargs})
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(6, 39, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("opt_cls", [KFAC, FOP])
def test_auto_forms_match_the_dense_cholesky_path(opt_cls):
    """inverse_method="auto" (support reduction, Woodbury while the rank is low, dense once it has grown) against
    the dense Cholesky inverses of the whole factors, over steps where the samples accumulate and then go dense."""
    torch.manual_seed(0)
    m = _Sparse().double()
    m_auto, m_dense = copy.deepcopy(m), copy.deepcopy(m)
    forms = []
    for steps in (1, 2, 3, 6):
        m_auto, m_dense = copy.deepcopy(m), copy.deepcopy(m)
        auto = _run(opt_cls, m_auto, steps)
        _run(opt_cls, m_dense, steps, inverse_method="cholesky")
        for p1, p2 in zip(m_auto.parameters(), m_dense.parameters()):
            torch.testing.assert_close(p1, p2, rtol=1e-9, atol=1e-12)
        forms.append({(auto.layers[b.index[0]].name, side.form, side.index is not None)
                      for b in auto.buckets for side in (b.Ginv, b.Ainv)})
    assert ("conv", "inverse", True) in forms[0]  # the conv's A on its support of 4 rows
    assert ("fc", "woodbury", False) in forms[0]  # the Linear's 41-wide A from 6 rows
    assert ("fc", "woodbury", False) not in forms[-1]  # 36 rows: dense again
    assert auto.samples_A[1] is None


@pytest.mark.parametrize("opt_cls", [KFAC, FOP])
def test_the_trust_region_on_the_support_form_matches_the_dense_path(opt_cls, monkeypatch):
    """With the KL clip binding (the default kl_clip at lr 1), the step's trust region and scale run on the support
    columns of the conv's bucket (InverseBucket.on_support, its update written at full width after the scale):
    the same parameters as the dense Cholesky inverses of the whole factors, over steps that refresh and steps that
    do not."""
    routes, nus = [], []
    on_support, kl_factor = InverseBucket.on_support, KFAC._kl_factor

    def recorded(bucket, Ms):
        out = on_support(bucket, Ms)
        routes.append(out[0] is not bucket)
        return out

    def recorded_nu(opt, buckets, quadratic):
        nu = kl_factor(opt, buckets, quadratic)
        nus.append(float(nu))
        return nu

    monkeypatch.setattr(InverseBucket, "on_support", recorded)
    monkeypatch.setattr(KFAC, "_kl_factor", recorded_nu)
    torch.manual_seed(0)
    m = _Sparse().double()
    m_auto, m_dense = copy.deepcopy(m), copy.deepcopy(m)
    _run(opt_cls, m_auto, 4, lr=1.0, kl_clip=1e-3)
    assert any(routes) and nus and max(nus) < 1.0  # the support route was taken, and the clip bound every step
    _run(opt_cls, m_dense, 4, lr=1.0, kl_clip=1e-3, inverse_method="cholesky")
    for p1, p2 in zip(m_auto.parameters(), m_dense.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("inverse_method", ["auto", "cholesky"])
def test_only_fop_keeps_the_undamped_blocks(inverse_method):
    """The dense damped-inverse cores hold the undamped factor block only where the optimizer multiplies by it
    (FOP's G V A): K-FAC's hold none, and asking one for a factor product says so."""
    cores = {}
    for opt_cls in (KFAC, FOP):
        torch.manual_seed(0)
        opt = _run(opt_cls, _Sparse().double(), 2, inverse_method=inverse_method)
        cores[opt_cls] = [side.core for b in opt.buckets for side in (b.Ginv, b.Ainv)
                          if isinstance(side.core, DenseBlock)]
        assert cores[opt_cls]
    assert all(core.M is None for core in cores[KFAC]) and all(core.M is not None for core in cores[FOP])
    with pytest.raises(RuntimeError, match="without its undamped block"):
        cores[KFAC][0].factor_right(torch.zeros(1, 1, 1, dtype=torch.float64))


def test_samples_are_kept_at_the_support_width():
    """A factor's samples are dropped once Woodbury no longer wins at its support (Z's nonzero columns): the conv's
    28-wide A (support 4) fed 6 rows would be kept at its full width but not at 4; the Linear's dense A is kept."""
    opt = _run(KFAC, _Sparse().double(), 1)
    conv = [layer.name for layer in opt.layers].index("conv")
    fc = [layer.name for layer in opt.layers].index("fc")
    assert keeps_samples(6, 28, 4, 2) and not keeps_samples(6, 4, 4, 2)
    assert opt.samples_A[conv] is None
    assert opt.samples_A[fc] is not None and opt.samples_A[fc].shape == (6, 41)


def test_auto_state_dict_resumes_bit_for_bit():
    torch.manual_seed(1)
    m = _Sparse().double()
    ref_model = copy.deepcopy(m)
    ref = _run(KFAC, ref_model, 3)
    resumed_model = copy.deepcopy(m)
    first = _run(KFAC, resumed_model, 3)
    sd = copy.deepcopy(first.state_dict())
    assert any(z for z in sd["curvature"]["samples"])  # the samples travel with the state
    fresh = KFAC(resumed_model, lr=0.1, damping=1e-2, factor_interval=1, inverse_interval=2, kl_clip=None,
                 factor_dtype=torch.float64)
    fresh.load_state_dict(sd)
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        x, y = torch.randn(6, 39, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)
        for model, opt in ((ref_model, ref), (resumed_model, fresh)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for p1, p2 in zip(ref_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,s,m", [(1, 3, 2), (3, 17, 5), (2, 64, 33)])
def test_dense_block_of_shared_matrices_multiplies_as_the_stack(dtype, B, s, m):
    """The undamped block held as a list of the matrices themselves (no stacked copy) gives the stacked block's
    products from both sides, on fresh random inputs of several shapes and dtypes."""
    g = torch.Generator().manual_seed(B * 100 + s)
    mats = [torch.randn(s, s, generator=g, dtype=torch.float64).to(dtype) for _ in range(B)]
    core = DampedFactor(inv=torch.eye(s, dtype=dtype).expand(B, s, s).contiguous())
    shared, stacked = DenseBlock(mats, core, dtype), DenseBlock(torch.stack(mats), core, dtype)
    X = torch.randn(B, m, s, generator=g, dtype=dtype)
    tol = dict(rtol=TOLERANCES[dtype][0], atol=TOLERANCES[dtype][1] * s)
    torch.testing.assert_close(shared.factor_right(X), stacked.factor_right(X), **tol)
    torch.testing.assert_close(shared.factor_left(X.mT), stacked.factor_left(X.mT), **tol)
    keep = [B - 1]
    torch.testing.assert_close(shared.subset(keep).factor_right(X[keep]), X[keep] @ mats[B - 1], **tol)


def test_fop_multiplies_by_its_wide_factors_without_copying_them(monkeypatch):
    """FOP's dense blocks at least SHARED_BLOCK_MIN wide keep the factors themselves (the very tensors of
    opt.factors_A, no copy) for G V A, and its steps equal those with stacked copies (the threshold raised past
    every block) to rounding."""
    def run(min_width):
        monkeypatch.setattr(inverse_choice, "SHARED_BLOCK_MIN", min_width)
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(39, 12), nn.Tanh(), nn.Linear(12, 5)).double()
        opt = _run(FOP, model, 5, inverse_method="cholesky")
        return model, opt

    (shared_model, shared), (copied_model, _) = run(13), run(10 ** 9)
    cores = [side.core for b in shared.buckets for side in (b.Ginv, b.Ainv)]
    lists = [core for core in cores if isinstance(core.M, list)]
    assert lists and any(isinstance(core.M, torch.Tensor) for core in cores)  # A (40 wide) shared, G (12) not
    for core in lists:
        assert all(any(Mj is A for A in shared.factors_A) for Mj in core.M)
    for p1, p2 in zip(shared_model.parameters(), copied_model.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n,live", [(10, [0, 3, 4]), (600, list(range(0, 600, 9))), (600, list(range(0, 600, 2)))])
def test_support_within_known_rows_is_the_support(n, live):
    """support(M, within) reads only the block of the rows M is known to be nonzero on and gives support(M), on
    fresh random PSD matrices zero outside `within` (some of whose rows are zero too)."""
    g = torch.Generator().manual_seed(n + len(live))
    within = torch.tensor(live)
    Z = torch.zeros(n, 7, dtype=torch.float64)
    Z[within] = torch.randn(len(live), 7, generator=g, dtype=torch.float64)
    Z[within[::3]] = 0.0  # rows known possibly nonzero that are zero
    M = Z @ Z.T
    expected = support(M)
    got = support(M, within)
    assert (got is None) == (expected is None)
    if expected is not None:
        assert torch.equal(got, expected)
