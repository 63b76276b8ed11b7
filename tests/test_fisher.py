"""FOP's Fisher inner products and projection-and-combine: every backend against the float64 reference.

Outputs are poisoned: the `poisoned_outputs` fixture turns on torch's deterministic mode, in which every fresh
torch/ATen allocation (the ops' outputs included, C++ at::empty too) is filled with NaN, so an element a kernel
fails to write shows up. Triton runs under TRITON_INTERPRET=1 on machines without a GPU (tests/conftest.py).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TOLERANCES, assert_close, backends_for
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fop_kernels
from fop_kernels.reference import fisher as ref

CPU = torch.device("cpu")
SUMS_BACKENDS = backends_for("fisher_inner_products", CPU)
COMBINE_BACKENDS = backends_for("project_combine", CPU)
# Odd sizes (not multiples of any block), a one-row and a one-column layer, more columns than one column block
# (Triton's BLOCK_C is at most 256) and more rows than one row block.
MIXED_SHAPES = [(5, 7), (1, 9), (6, 1), (33, 70), (3, 300), (17, 130)]
DAMPING = 1e-3


@pytest.fixture
def poisoned_outputs():
    """Every uninitialized float allocation is NaN while the test runs."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4)).all(), "poisoning is not in effect"
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = fill


def make_layers(shapes, dtype=torch.float32, eig_dtype=torch.float32, correlated=0.3):
    """Random A~, D~ (D~ partly aligned with A~, like two sub-batch gradients) and eigenvalues >= 0 spanning
    a few decades (a few exact zeros, as clamped eigenvalues give)."""
    A, D, lG, lA = [], [], [], []
    for out, inp in shapes:
        a = torch.randn(out, inp, dtype=torch.float64)
        A.append(a.to(dtype))
        D.append((correlated * a + torch.randn(out, inp, dtype=torch.float64)).to(dtype))
        for n, lst in ((out, lG), (inp, lA)):
            lam = torch.rand(n, dtype=torch.float64) ** 3 * 4.0
            lam[torch.rand(n) < 0.1] = 0.0
            lst.append(lam.to(eig_dtype))
    return A, D, lG, lA


def as64(tensors):
    return [t.double() for t in tensors]


def oracle_sums(A, D, lG, lA, damping=DAMPING, mode="eigen"):
    """(float64 sums, float64 sums of absolute terms: the scale each sum's rounding error is relative to)."""
    exact = ref.fisher_inner_products(as64(A), as64(D), as64(lG), as64(lA), float(damping), mode)
    scale = ref.fisher_inner_products([a.abs() for a in as64(A)], [d.abs() for d in as64(D)], as64(lG), as64(lA),
                                      float(damping), mode)
    return exact, scale


def check_sums(got, A, D, lG, lA, damping=DAMPING, mode="eigen", rtol=None, what=""):
    exact, scale = oracle_sums(A, D, lG, lA, damping, mode)
    if rtol is None:
        rtol = max(TOLERANCES[a.dtype][1] for a in A + lG + lA)
    assert got.shape == exact.shape
    assert torch.isfinite(got).all(), f"{what}: non-finite sums {got}"
    err = (got.double() - exact).abs()
    bad = err > rtol * scale + 1e-30
    assert not bad.any(), f"{what}: sums off at {bad.nonzero().tolist()}: got {got[bad]}, expected {exact[bad]}"


def scalar_tolerance(sums64: torch.Tensor, rtol: float, unit_roundoff: float) -> torch.Tensor:
    """(L x 3) absolute tolerances for s, beta, eta computed in working precision from the given sums.

    beta* = d / e with d = c - s a and e = e0 - 2 s c + s^2 a, both differences that cancel when D~ is nearly
    parallel to A~ (a 1x1 layer always is): their rounding errors relative to |d| and e are
    u (|c| + |s a|) / |d| and u (e0 + 2 |s c| + s^2 a) / e. beta and eta get that condition number on top of rtol
    (eta depends on beta only through beta d and beta^2 e, so this bound covers it too)."""
    S1, S2, a, c, e0 = sums64.unbind(1)
    s = S2 / (S1 + ref.EPS)
    d = c - s * a
    e = e0 - 2 * s * c + s * s * a
    cond = (c.abs() + (s * a).abs()) / (d.abs() + 1e-300) + (e0 + 2 * (s * c).abs() + s * s * a) / (e.abs() + 1e-300)
    loose = rtol + 16 * unit_roundoff * cond
    return torch.stack([torch.full_like(s, rtol), loose, 2 * loose], 1)


def check_combine(U, scalars, A, D, sums, lG, lA, damping=DAMPING, mode="eigen", beta="adaptive", eta="adaptive",
                  beta_clip=(-0.5, 0.5), eta_clip=(0.0, 2.0), what=""):
    """U~ and the scalars against the float64 reference fed the same sums (tolerance of the worst input dtype;
    U~ relative to its largest element, the scalars relative to 1 and to their conditioning)."""
    U64, sc64 = ref.project_combine(as64(A), as64(D), sums.double(), as64(lG), as64(lA), float(damping), mode, beta,
                                    eta, beta_clip, eta_clip)
    rtol = max(TOLERANCES[t.dtype][1] for t in A + lG + lA + [sums])
    unit = 2.0**-53 if ref.working_dtype(A, D, lG, lA, sums) == torch.float64 else 2.0**-24
    tol = scalar_tolerance(sums.double(), rtol, unit)
    err = (scalars.double() - sc64).abs()
    assert torch.isfinite(scalars).all() and bool((err <= tol).all()), (
        f"{what} scalars: got {scalars.tolist()}, expected {sc64.tolist()}, tolerance {tol.tolist()}")
    if beta == "adaptive" and eta == "adaptive":
        low = torch.tensor([beta_clip[0], eta_clip[0]], dtype=torch.float64)
        high = torch.tensor([beta_clip[1], eta_clip[1]], dtype=torch.float64)
        inside = (scalars[:, 1:].double() >= low) & (scalars[:, 1:].double() <= high)
        assert inside.all(), f"{what}: beta/eta outside their clips: {scalars.tolist()}"
    assert len(U) == len(A)
    for i, (u, u64, a) in enumerate(zip(U, U64, A)):
        assert u.dtype == a.dtype and u.shape == a.shape, f"{what} U[{i}]: {u.dtype} {tuple(u.shape)}"
        subnormal_ulp = torch.finfo(a.dtype).smallest_normal * torch.finfo(a.dtype).eps  # output rounding near 0
        assert_close(u, u64, atol=rtol * float(u64.abs().max()) + subnormal_ulp, rtol=rtol, what=f"{what} U[{i}]")


# ------------------------------------------------------------------------------------------------------------------
# The five sums


@pytest.mark.parametrize("mode", ["eigen", "factored"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", SUMS_BACKENDS)
def test_sums_match_float64_reference(backend, dtype, mode, poisoned_outputs):
    A, D, lG, lA = make_layers(MIXED_SHAPES, dtype)
    got = fop_kernels.fisher_inner_products(A, D, lG, lA, DAMPING, mode, backend=backend)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_sums(got, A, D, lG, lA, DAMPING, mode, what=f"{backend}/{dtype}/{mode}")


@pytest.mark.parametrize("backend", SUMS_BACKENDS)
def test_sums_of_known_values(backend):
    """One 2x2 layer computed by hand: f = lG lA^T, w = f + 1."""
    A = [torch.tensor([[1.0, 2.0], [3.0, 4.0]])]
    D = [torch.tensor([[1.0, 0.0], [-1.0, 2.0]])]
    lG, lA = [torch.tensor([1.0, 3.0])], [torch.tensor([0.0, 1.0])]
    f = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    w = f + 1.0
    a, d = A[0], D[0]
    expected = torch.stack([(a * a * f).sum(), (a * d * f).sum(), (a * a / w).sum(), (a * d / w).sum(),
                            (d * d / w).sum()])
    got = fop_kernels.fisher_inner_products(A, D, lG, lA, 1.0, backend=backend)
    assert torch.allclose(got[0], expected, rtol=1e-6, atol=0), (got, expected)


@pytest.mark.parametrize("backend", SUMS_BACKENDS)
def test_sums_non_contiguous_inputs(backend, poisoned_outputs):
    shapes = [(6, 9), (1, 5), (7, 1), (11, 40)]
    A, D, lG, lA = make_layers(shapes)
    A_nc = [a.t().contiguous().t() for a in A]  # column-major
    D_nc = [torch.cat([d, torch.randn(d.shape[0], 3)], 1)[:, : d.shape[1]] for d in D]  # row stride > cols
    lG_nc = [torch.stack([g, torch.randn_like(g)], 1)[:, 0] for g in lG]  # stride 2
    assert not A_nc[0].is_contiguous() and not D_nc[0].is_contiguous() and not lG_nc[0].is_contiguous()
    got = fop_kernels.fisher_inner_products(A_nc, D_nc, lG_nc, lA, DAMPING, backend=backend)
    check_sums(got, A, D, lG, lA, what=backend)


@pytest.mark.parametrize("mode", ["eigen", "factored"])
@pytest.mark.parametrize("backend", SUMS_BACKENDS)
def test_many_mixed_layers_and_dtypes_in_one_call(backend, mode, poisoned_outputs):
    gen = torch.Generator().manual_seed(3)
    shapes = [tuple(int(v) for v in torch.randint(1, 48, (2,), generator=gen)) for _ in range(30)]
    A, D, lG, lA = make_layers(shapes)
    lowp = {i: (torch.bfloat16 if i % 3 == 1 else torch.float16) for i in range(0, 30, 4)}
    for i, dt in lowp.items():
        A[i], D[i] = A[i].to(dt), D[i].to(dt)
    got = fop_kernels.fisher_inner_products(A, D, lG, lA, DAMPING, mode, backend=backend)
    check_sums(got, A, D, lG, lA, DAMPING, mode, what=f"{backend}/{mode}")


@pytest.mark.parametrize("backend", SUMS_BACKENDS)
def test_float64_eigenvalues_make_float64_sums(backend):
    A, D, lG, lA = make_layers([(4, 5), (3, 2)], torch.float32, eig_dtype=torch.float64)
    got = fop_kernels.fisher_inner_products(A, D, lG, lA, DAMPING, backend=backend)
    assert got.dtype == torch.float64
    check_sums(got, A, D, lG, lA, rtol=1e-9)


@pytest.mark.parametrize("backend", SUMS_BACKENDS)
def test_damping_as_a_tensor_equals_damping_as_a_float(backend):
    A, D, lG, lA = make_layers([(5, 6), (2, 9)])
    for mode in ("eigen", "factored"):
        as_float = fop_kernels.fisher_inner_products(A, D, lG, lA, 0.25, mode, backend=backend)
        as_tensor = fop_kernels.fisher_inner_products(A, D, lG, lA, torch.tensor(0.25), mode, backend=backend)
        assert torch.equal(as_float, as_tensor)


def test_cpp_sums_do_not_depend_on_the_thread_count():
    if "cpp" not in SUMS_BACKENDS:
        pytest.skip("the native extension is not loaded")
    A, D, lG, lA = make_layers([(300, 200), (7, 5000), (64, 147)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fop_kernels.fisher_inner_products(A, D, lG, lA, DAMPING, backend="cpp")
        torch.set_num_threads(max(2, threads))
        many = fop_kernels.fisher_inner_products(A, D, lG, lA, DAMPING, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_triton_sums_use_one_launch_per_dtype_group(monkeypatch):
    if "triton" not in SUMS_BACKENDS:
        pytest.skip("triton is not available here")
    from fop_kernels.triton import fisher as tfisher

    launches = []
    kernel = tfisher._fisher_sums_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(tfisher, "_fisher_sums_kernel", Counting())
    A, D, lG, lA = make_layers([(3, 4), (5, 2), (2, 7), (4, 4), (6, 3)])
    A[1], D[1] = A[1].bfloat16(), D[1].bfloat16()
    fop_kernels.fisher_inner_products(A, D, lG, lA, DAMPING, backend="triton")
    assert len(launches) == 2


# ------------------------------------------------------------------------------------------------------------------
# Projection and combine


@pytest.mark.parametrize("mode", ["eigen", "factored"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", COMBINE_BACKENDS)
def test_combine_matches_float64_reference(backend, dtype, mode, poisoned_outputs):
    A, D, lG, lA = make_layers(MIXED_SHAPES, dtype)
    sums = oracle_sums(A, D, lG, lA, DAMPING, mode)[0].to(ref.working_dtype(A, lG))
    U, scalars = fop_kernels.project_combine(A, D, sums, lG, lA, DAMPING, mode, backend=backend)
    check_combine(U, scalars, A, D, sums, lG, lA, DAMPING, mode, what=f"{backend}/{dtype}/{mode}")


@pytest.mark.parametrize("beta,eta", [(0.3, "adaptive"), ("adaptive", 0.7), (-0.2, 1.5)])
@pytest.mark.parametrize("backend", COMBINE_BACKENDS)
def test_combine_fixed_beta_or_eta(backend, beta, eta, poisoned_outputs):
    A, D, lG, lA = make_layers(MIXED_SHAPES)
    sums = oracle_sums(A, D, lG, lA)[0].float()
    U, scalars = fop_kernels.project_combine(A, D, sums, lG, lA, DAMPING, beta=beta, eta=eta, backend=backend)
    check_combine(U, scalars, A, D, sums, lG, lA, beta=beta, eta=eta, what=backend)
    if beta != "adaptive":
        assert torch.all(scalars[:, 1] == torch.tensor(beta, dtype=torch.float32))
    if eta != "adaptive":
        assert torch.all(scalars[:, 2] == torch.tensor(eta, dtype=torch.float32))


@pytest.mark.parametrize("backend", COMBINE_BACKENDS)
def test_clamps_are_hit(backend, poisoned_outputs):
    """Rows of sums chosen so that beta* and eta* fall outside their clips. With an adaptive beta, beta d >= 0
    keeps eta* in [0, 2]; a fixed beta of the wrong sign pushes it out on either side."""
    A, D, lG, lA = make_layers([(3, 4)] * 4)
    sums = torch.tensor([
        [1.0, 0.0, 1.0, 3.0, 1.0],     # s = 0, d = 3, e = 1: beta* = 3 -> 0.5
        [1.0, 0.0, 1.0, -1.0, 1.0],    # d = -1, e = 1: beta* = -1 -> -0.5
        [2.0, 1.0, 4.0, 2.0, 1.0],     # s = 0.5, d = 0, e = 0: beta* = 0, eta* = 2
        [1.0, 0.0, 1.0, 0.1, 1.0],     # inside the clip: beta* = 0.1
    ])
    U, sc = fop_kernels.project_combine(A, D, sums, lG, lA, DAMPING, backend=backend)
    expected = torch.tensor([
        [0.0, 0.5, 2 * (1 + 1.5) / (1 + 3 + 0.25)],
        [0.0, -0.5, 2 * (1 + 0.5) / (1 + 1 + 0.25)],
        [0.5, 0.0, 2.0],
        [0.0, 0.1, 2 * 1.01 / 1.03],
    ])
    assert_close(sc, expected, atol=1e-6, rtol=1e-6, what=f"{backend} scalars")
    check_combine(U, sc, A, D, sums, lG, lA, what=backend)
    row1 = sums[1:2].repeat(4, 1)
    # fixed beta = 0.5 against d = -1: eta* = 2 (1 - 0.5) / (1 - 1 + 0.25) = 4 -> 2
    _, sc = fop_kernels.project_combine(A, D, row1, lG, lA, DAMPING, beta=0.5, backend=backend)
    assert torch.all(sc[:, 2] == 2.0) and torch.all(sc[:, 1] == 0.5)
    # fixed beta = 2: eta* = 2 (1 - 2) / (1 - 4 + 4) = -2 -> 0
    _, sc = fop_kernels.project_combine(A, D, row1, lG, lA, DAMPING, beta=2.0, backend=backend)
    assert torch.all(sc[:, 2] == 0.0) and torch.all(sc[:, 1] == 2.0)
    # custom clips
    _, sc = fop_kernels.project_combine(A, D, sums, lG, lA, DAMPING, beta_clip=(-0.1, 0.2), eta_clip=(0.5, 1.0),
                                        backend=backend)
    assert sc[0, 1] == pytest.approx(0.2) and sc[1, 1] == pytest.approx(-0.1) and sc[1, 2] == 1.0
    assert torch.all((sc[:, 2] >= 0.5) & (sc[:, 2] <= 1.0))


@pytest.mark.parametrize("mode", ["eigen", "factored"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", COMBINE_BACKENDS)
def test_beta0_eta1_is_exactly_the_kfac_update(backend, dtype, mode, poisoned_outputs):
    """U~ = A~ / w bit for bit (w as the reference forms it) whatever the sums hold. One exception: in float64
    the Triton kernel sums the factored damping's traces in its own order, so lambda (hence w) may differ from
    torch's in the last bit; there U~ must agree to a few ulp."""
    A, D, lG, lA = make_layers(MIXED_SHAPES, dtype)
    sums = torch.randn(len(A), 5).abs()
    U, sc = fop_kernels.project_combine(A, D, sums, lG, lA, DAMPING, mode, beta=0.0, eta=1.0, backend=backend)
    wd = ref.working_dtype(A, lG)
    last_bit_only = dtype == torch.float64 and mode == "factored" and backend == "triton"
    for i, (u, a, g, l) in enumerate(zip(U, A, lG, lA)):
        kfac = (a.to(wd) / ref.damping_weights(g, l, DAMPING, mode, wd)).to(dtype)
        if last_bit_only:
            assert_close(u, kfac, atol=0.0, rtol=1e-15, what=f"U[{i}]")
        else:
            assert torch.equal(u, kfac), f"U[{i}] differs from A~/w at {(u != kfac).sum()} elements"
    assert torch.all(sc[:, 1] == 0) and torch.all(sc[:, 2] == 1)


@pytest.mark.parametrize("backend", COMBINE_BACKENDS)
def test_combine_non_contiguous_inputs(backend, poisoned_outputs):
    shapes = [(6, 9), (1, 5), (7, 1), (11, 40)]
    A, D, lG, lA = make_layers(shapes)
    A_nc = [a.t().contiguous().t() for a in A]
    D_nc = [torch.cat([d, torch.randn(d.shape[0], 3)], 1)[:, : d.shape[1]] for d in D]
    lA_nc = [torch.stack([l, torch.randn_like(l)], 1)[:, 0] for l in lA]
    sums = oracle_sums(A, D, lG, lA)[0].float()
    sums_nc = torch.cat([sums, sums], 1)[:, :5]
    U, sc = fop_kernels.project_combine(A_nc, D_nc, sums_nc, lG, lA_nc, DAMPING, backend=backend)
    check_combine(U, sc, A, D, sums, lG, lA, what=backend)


@pytest.mark.parametrize("backend", COMBINE_BACKENDS)
def test_combine_many_mixed_layers_and_dtypes(backend, poisoned_outputs):
    gen = torch.Generator().manual_seed(5)
    shapes = [tuple(int(v) for v in torch.randint(1, 48, (2,), generator=gen)) for _ in range(30)]
    A, D, lG, lA = make_layers(shapes)
    for i in range(1, 30, 5):
        A[i], D[i] = A[i].bfloat16(), D[i].bfloat16()
    for mode in ("eigen", "factored"):
        sums = oracle_sums(A, D, lG, lA, DAMPING, mode)[0].float()
        U, sc = fop_kernels.project_combine(A, D, sums, lG, lA, DAMPING, mode, backend=backend)
        check_combine(U, sc, A, D, sums, lG, lA, DAMPING, mode, what=f"{backend}/{mode}")


@pytest.mark.parametrize("backend", COMBINE_BACKENDS)
def test_combine_damping_tensor_and_pipeline(backend):
    """Sums then combine on the same backend, damping given as a 0-dim tensor, against the float64 pipeline."""
    A, D, lG, lA = make_layers(MIXED_SHAPES)
    damping = torch.tensor(0.01, dtype=torch.float64)
    sums = fop_kernels.fisher_inner_products(A, D, lG, lA, damping, "factored", backend=backend)
    U, sc = fop_kernels.project_combine(A, D, sums, lG, lA, damping, "factored", backend=backend)
    U_f, sc_f = fop_kernels.project_combine(A, D, sums, lG, lA, 0.01, "factored", backend=backend)
    assert torch.equal(sc, sc_f) and all(torch.equal(u, v) for u, v in zip(U, U_f))
    sums64 = oracle_sums(A, D, lG, lA, 0.01, "factored")[0]
    U64, sc64 = ref.project_combine(as64(A), as64(D), sums64, as64(lG), as64(lA), 0.01, "factored")
    assert_close(sc, sc64, atol=1e-4, rtol=1e-4, what="scalars")
    for u, u64 in zip(U, U64):
        assert_close(u, u64, atol=1e-4 * float(u64.abs().max()), rtol=1e-4, what="U")


# ------------------------------------------------------------------------------------------------------------------
# Property-based: random layer sets on every backend present


# FOP_HYPOTHESIS_EXAMPLES=500 for a longer search than CI's 25 examples.
layer_shapes = st.lists(st.tuples(st.integers(1, 24), st.integers(1, 40)), min_size=1, max_size=4)


@settings(max_examples=int(os.environ.get("FOP_HYPOTHESIS_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=layer_shapes, dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       mode=st.sampled_from(["eigen", "factored"]), damping=st.floats(1e-6, 1.0),
       beta=st.one_of(st.just("adaptive"), st.floats(-1.0, 1.0)),
       eta=st.one_of(st.just("adaptive"), st.floats(0.0, 2.0)), seed=st.integers(0, 2**16))
def test_property_every_backend_matches_reference(shapes, dtype, mode, damping, beta, eta, seed):
    # U~ comes back in A~'s dtype: in fp16 it must stay under 65504; here |U~| <~ 2 * 10 / damping
    assume(dtype != torch.float16 or damping >= 1e-3)
    torch.manual_seed(seed)
    A, D, lG, lA = make_layers(shapes, dtype)
    for backend in SUMS_BACKENDS:
        sums = fop_kernels.fisher_inner_products(A, D, lG, lA, damping, mode, backend=backend)
        check_sums(sums, A, D, lG, lA, damping, mode, what=f"{backend} {shapes}")
    sums = oracle_sums(A, D, lG, lA, damping, mode)[0].float()
    for backend in COMBINE_BACKENDS:
        U, sc = fop_kernels.project_combine(A, D, sums, lG, lA, damping, mode, beta, eta, backend=backend)
        check_combine(U, sc, A, D, sums, lG, lA, damping, mode, beta, eta, what=f"{backend} {shapes}")


# ------------------------------------------------------------------------------------------------------------------
# torch.library registration


def _op_args(dtype=torch.float32):
    A, D, lG, lA = make_layers([(3, 5), (1, 4), (6, 1)], dtype)
    sums = oracle_sums(A, D, lG, lA)[0].float()
    return A, D, lG, lA, sums


def test_combine_scalars_are_project_combines_scalars_and_validate():
    """The public scalar op (used by the Cholesky-inverse FOP path) gives project_combine's s_proj, beta, eta."""
    A, D, lG, lA, sums = _op_args(torch.float64)
    for kw in (dict(), dict(beta=0.2), dict(eta=0.5, beta_clip=(-0.1, 0.1))):
        _, expected = ref.project_combine(A, D, sums.double(), lG, lA, DAMPING, **kw)
        got = fop_kernels.combine_scalars(sums.double(), **kw)
        assert got.dtype == torch.float64
        assert_close(got, expected, *TOLERANCES[torch.float64], what=f"combine_scalars {kw}")
    with pytest.raises(ValueError, match=r"sums must be \(layers, 5\)"):
        fop_kernels.combine_scalars(sums[:, :4])
    with pytest.raises(ValueError, match="beta_clip"):
        fop_kernels.combine_scalars(sums, beta_clip=(1.0, -1.0))


def test_opcheck_cpp_ops():
    if "cpp" not in SUMS_BACKENDS:
        pytest.skip("the native extension is not loaded")
    A, D, lG, lA, sums = _op_args()
    ops = torch.ops.fop_kernels
    for mode in ("eigen", "factored"):
        torch.library.opcheck(ops.fisher_inner_products.default, (A, D, lG, lA, DAMPING, mode))
        torch.library.opcheck(ops.project_combine.default,
                              (A, D, sums, lG, lA, DAMPING, mode, None, 0.5, -0.5, 0.5, 0.0, 2.0))


def test_opcheck_triton_ops():
    if "triton" not in SUMS_BACKENDS:
        pytest.skip("triton is not available here")
    from fop_kernels.triton import fisher as tfisher  # noqa: F401 - registers the custom ops

    A, D, lG, lA, sums = _op_args(torch.bfloat16)
    ops = torch.ops.fop_kernels
    torch.library.opcheck(ops.fisher_inner_products_triton.default, (A, D, lG, lA, DAMPING, None, "factored"))
    torch.library.opcheck(ops.project_combine_triton.default,
                          (A, D, sums, lG, lA, DAMPING, None, "eigen", 0.1, None, -0.5, 0.5, 0.0, 2.0))


_COMPILE_FOR_SM90 = r"""
import json
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fop_kernels.triton import fisher as F

T = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
report = []
for a_dtype, acc, factored, from_ptr in [("fp32", "fp32", False, False), ("bf16", "fp32", True, True),
                                         ("fp16", "fp32", True, False), ("fp64", "fp64", True, False)]:
    meta = dict(A_DTYPE=T[a_dtype], LG_DTYPE=tl.float32, LA_DTYPE=tl.float64, ACC=T[acc], FACTORED=factored,
                DAMPING_FROM_PTR=from_ptr, BLOCK_R=8, BLOCK_C=256, BLOCK_T=1024)
    sums_sig = {"layer_table_ptr": "*i64", "program_table_ptr": "*i64", "out_ptr": "*" + acc, "damping_bits": "i64",
                "damping_ptr": "*fp32", **{k: "constexpr" for k in meta}}
    comb_meta = dict(meta, ADAPTIVE_BETA=not from_ptr, ADAPTIVE_ETA=True)
    comb_sig = {"layer_table_ptr": "*i64", "program_table_ptr": "*i64", "sums_ptr": "*fp32", "sums_stride_r": "i64",
                "sums_stride_c": "i64", "scalars_ptr": "*" + acc, "damping_bits": "i64", "damping_ptr": "*fp32",
                **{k: "i64" for k in ("beta_bits", "eta_bits", "beta_lo_bits", "beta_hi_bits", "eta_lo_bits",
                                      "eta_hi_bits")}, **{k: "constexpr" for k in comb_meta}}
    target = GPUTarget("cuda", 90, 32)
    sums = triton.compile(ASTSource(fn=F._fisher_sums_kernel, signature=sums_sig, constexprs=meta), target=target,
                          options={"num_warps": F._NUM_WARPS})
    comb = triton.compile(ASTSource(fn=F._project_combine_kernel, signature=comb_sig, constexprs=comb_meta),
                          target=target, options={"num_warps": F._NUM_WARPS, "enable_fp_fusion": False})
    ptx = comb.asm["ptx"]
    report.append({"case": [a_dtype, acc, factored], "cubin": len(sums.asm["cubin"]) > 0 and len(comb.asm["cubin"]) > 0,
                   "combine_fma": ptx.count("fma.rn.f32") + ptx.count("fma.rn.f64"),
                   "combine_approx_div": ptx.count("div.full.f32") + ptx.count("div.approx.f32")})
print(json.dumps(report))
"""


def test_triton_kernels_compile_for_sm90_without_fma_in_the_combine():
    """The interpreter does not run Triton's compiler; this compiles every kernel variant to an sm_90 cubin (no GPU
    needed) and checks that the combine has no FMA contraction and no approximate division (exact K-FAC)."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("triton's ptxas is not available")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for case in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert case["cubin"], case
        assert case["combine_fma"] == 0 and case["combine_approx_div"] == 0, case


def test_cpu_dispatch_prefers_cpp_when_loaded():
    name, _ = fop_kernels.resolve("fisher_inner_products", "cpu")
    assert name == ("cpp" if "cpp" in SUMS_BACKENDS else "reference")
    name, _ = fop_kernels.resolve("project_combine", "cpu")
    assert name == ("cpp" if "cpp" in COMBINE_BACKENDS else "reference")


# ------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, raised before anything runs; inputs untouched


def _bad_cases():
    A, D, lG, lA = make_layers([(3, 4), (2, 5)])
    sums = torch.ones(2, 5)
    ok = dict(A_rot=A, D_rot=D, lG=lG, lA=lA, damping=DAMPING)
    cases = [
        (dict(A_rot=A[0]), TypeError, "A_rot must be a list"),
        (dict(A_rot=[]), ValueError, "A_rot is empty"),
        (dict(D_rot=D[:1]), ValueError, "D_rot has 1 layers"),
        (dict(D_rot=[D[0], D[1].t()]), ValueError, r"D_rot\[1\] has shape"),
        (dict(D_rot=[D[0], D[1].double()]), TypeError, r"D_rot\[1\] has dtype"),
        (dict(A_rot=[A[0], torch.zeros(0, 5)], D_rot=[D[0], torch.zeros(0, 5)]), ValueError, r"A_rot\[1\] is empty"),
        (dict(A_rot=[A[0], A[1].int()]), TypeError, r"A_rot\[1\] has unsupported dtype"),
        (dict(A_rot=[A[0], A[1][0]]), ValueError, r"A_rot\[1\] must be 2-D"),
        (dict(lG=[lG[0], lG[1][:1]]), ValueError, r"lG\[1\] has shape"),
        (dict(lA=[lA[0].half(), lA[1]]), TypeError, r"lA\[0\] has unsupported dtype"),
        (dict(lA=[l.to("meta") for l in lA]), ValueError, "lA is on meta"),
        (dict(damping=-1e-3), ValueError, "damping must be a finite value >= 0"),
        (dict(damping=float("nan")), ValueError, "damping must be a finite value >= 0"),
        (dict(damping=float("inf")), ValueError, "damping must be a finite value >= 0"),
        (dict(damping="1e-3"), TypeError, "damping must be a float"),
        (dict(damping=torch.ones(2)), ValueError, "damping must be 0-D"),
        (dict(damping=torch.tensor(1, dtype=torch.int32)), TypeError, "damping has unsupported dtype"),
        (dict(damping_mode="kron"), ValueError, "damping_mode must be one of"),
    ]
    combine_only = [
        (dict(sums=sums[:1]), ValueError, "sums has shape"),
        (dict(sums=sums.half()), TypeError, "sums has unsupported dtype"),
        (dict(sums=sums.to("meta")), ValueError, "sums is on meta"),
        (dict(beta="auto"), ValueError, "beta must be 'adaptive' or a float"),
        (dict(beta=float("nan")), ValueError, "beta must be finite"),
        (dict(eta=None), TypeError, "eta must be 'adaptive' or a float"),
        (dict(eta=float("inf")), ValueError, "eta must be finite"),
        (dict(beta_clip=(0.5, -0.5)), ValueError, "beta_clip must be"),
        (dict(eta_clip=(0.0, 1.0, 2.0)), ValueError, "eta_clip must be a pair"),
        (dict(eta_clip=(float("nan"), 1.0)), ValueError, "eta_clip must be"),
    ]
    return ok, sums, cases, combine_only


@pytest.mark.parametrize("op", ["fisher_inner_products", "project_combine"])
def test_bad_input_names_the_argument_and_mutates_nothing(op):
    ok, sums, cases, combine_only = _bad_cases()
    if op == "project_combine":
        ok = dict(ok, sums=sums)
        cases = cases + combine_only
    snapshot = {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in ok.items()}
    fn = getattr(fop_kernels, op)
    for backend in [None] + backends_for(op, CPU):
        for override, exc, msg in cases:
            with pytest.raises(exc, match=msg):
                fn(**dict(ok, **override), backend=backend)
    for k, v in ok.items():
        if isinstance(v, list):
            assert all(torch.equal(a, b) for a, b in zip(v, snapshot[k])), f"{k} was modified"


def test_cpp_ops_check_their_inputs_too():
    if "cpp" not in SUMS_BACKENDS:
        pytest.skip("the native extension is not loaded")
    A, D, lG, lA = make_layers([(3, 4)])
    with pytest.raises(RuntimeError, match="damping_mode must be"):
        torch.ops.fop_kernels.fisher_inner_products(A, D, lG, lA, 0.1, "kron")
    with pytest.raises(RuntimeError, match=r"lA\[0\] has shape"):
        torch.ops.fop_kernels.fisher_inner_products(A, D, lG, [lA[0][:2]], 0.1, "eigen")
    with pytest.raises(RuntimeError, match="sums must be a CPU tensor of shape"):
        torch.ops.fop_kernels.project_combine(A, D, torch.ones(2, 5), lG, lA, 0.1, "eigen", None, None,
                                              -0.5, 0.5, 0.0, 2.0)
