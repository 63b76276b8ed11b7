"""Batched eigh, damped inverse and eigenbasis refresh: every backend against the float64 reference.

The ops allocate their outputs (no out= form), so there is nothing to poison; instead every output is checked
to be finite and compared element-wise (eigenvalues, damped inverses) or through the float64 reconstruction
Q diag(l) Q^T (eigenvectors, whose signs are arbitrary). Accuracy rule for fp32: the error is at most twice
plain torch.linalg.eigh's error in the same dtype, plus a few ulps of max|M|.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fop_kernels
from fop_kernels import reference as ref
from tests.helpers import assert_close, backends_for

RESNET18_SMALL = [10, 28, 64, 128, 256, 512, 513, 577]
RESNET18_LARGE = [1153, 2305, 4609]
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def make_matrix(kind: str, n: int, dtype: torch.dtype, gen: torch.Generator | None = None) -> torch.Tensor:
    """A symmetric test matrix built in float64 and rounded once to `dtype` (exactly symmetric)."""
    if kind == "spd":
        x = torch.randn(n + 3, n, dtype=torch.float64, generator=gen)
        m = x.mT @ x / (n + 3)
    elif kind == "rank_deficient":  # X^T X with fewer rows than columns: zero eigenvalues
        x = torch.randn(max(1, n // 2), n, dtype=torch.float64, generator=gen)
        m = x.mT @ x
    elif kind == "diagonal":
        m = torch.diag(torch.rand(n, dtype=torch.float64, generator=gen) * 10)
    elif kind == "identity":
        m = torch.eye(n, dtype=torch.float64)
    elif kind == "indefinite":
        x = torch.randn(n, n, dtype=torch.float64, generator=gen)
        m = x + x.mT
    elif kind in ("ill_conditioned", "repeated"):  # Q diag(l) Q^T, Q random orthogonal
        q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
        if kind == "ill_conditioned":
            l = torch.logspace(-12, 3, n, dtype=torch.float64)
        else:  # clusters of equal eigenvalues, one of them negative
            l = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, -3.0], dtype=torch.float64).repeat(n // 6 + 1)[:n]
        m = (q * l) @ q.mT
    else:
        raise ValueError(kind)
    m = m.to(dtype)
    return (m + m.mT) / 2


def reconstruction_error(m: torch.Tensor, l: torch.Tensor, q: torch.Tensor) -> float:
    """max |Q diag(l) Q^T - M| in float64."""
    q64, l64 = q.double(), l.double()
    return float(((q64 * l64) @ q64.mT - m.double()).abs().max())


def orthogonality_error(q: torch.Tensor) -> float:
    q64 = q.double()
    return float((q64.mT @ q64 - torch.eye(q.shape[0], dtype=torch.float64)).abs().max())


def check_decomposition(mats, evals, evecs, clamp=False, what=""):
    """Eigenvalues vs float64 eigvalsh; reconstruction and orthogonality within 2x torch's own same-dtype error."""
    assert len(evals) == len(evecs) == len(mats)
    for i, (m, l, q) in enumerate(zip(mats, evals, evecs)):
        n = m.shape[0]
        assert l.shape == (n,) and q.shape == (n, n) and l.dtype == m.dtype == q.dtype, f"{what}[{i}] metadata"
        assert bool(torch.isfinite(l).all() and torch.isfinite(q).all()), f"{what}[{i}] non-finite output"
        assert bool((l[1:] >= l[:-1]).all()), f"{what}[{i}] eigenvalues not ascending"
        scale = float(m.abs().max()) or 1.0
        slack = 8 * n * EPS[m.dtype] * scale
        l64 = torch.linalg.eigvalsh(m.double())
        expected_l = l64.clamp_min(0) if clamp else l64
        l_torch, q_torch = torch.linalg.eigh(m)
        err_torch_l = float((l_torch.double() - l64).abs().max())
        assert_close(l, expected_l, atol=2 * err_torch_l + slack, rtol=0, what=f"{what}[{i}] eigenvalues")
        if clamp:
            assert bool((l >= 0).all()), f"{what}[{i}] clamped eigenvalues negative"
            continue
        err_torch = reconstruction_error(m, l_torch, q_torch)
        assert reconstruction_error(m, l, q) <= 2 * err_torch + slack, f"{what}[{i}] reconstruction"
        assert orthogonality_error(q) <= 2 * orthogonality_error(q_torch) + 8 * n * EPS[m.dtype], f"{what}[{i}] Q^TQ"


def mixed_list(sizes, dtype, kinds=("spd", "rank_deficient", "diagonal", "identity", "indefinite"), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [make_matrix(kinds[i % len(kinds)], n, dtype, gen) for i, n in enumerate(sizes)]


def eigh_backends():
    return backends_for("eigh", torch.device("cpu"))


def test_cpp_backend_is_registered():
    assert "cpp" in fop_kernels.implementations("eigh"), fop_kernels.available_backends()["cpp"]["reason"]
    assert fop_kernels.resolve("eigh", "cpu")[0] == "cpp"
    assert fop_kernels.resolve("eigh_refresh", "cpu")[0] == "cpp"


@pytest.mark.parametrize("backend", eigh_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["spd", "rank_deficient", "diagonal", "identity", "indefinite"])
def test_eigh_kinds(backend, dtype, kind):
    sizes = [1, 2, 5, 17, 33, 64, 64, 64, 100]
    mats = [make_matrix(kind, n, dtype) for n in sizes]
    evals, evecs = fop_kernels.eigh(mats, backend=backend)
    check_decomposition(mats, evals, evecs, what=f"{backend}/{kind}")


@pytest.mark.parametrize("backend", eigh_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_matches_reference_mixed_and_many_small(backend, dtype):
    mats = mixed_list([3, 64, 7, 64, 64, 200, 1, 64, 31] + [24] * 40, dtype)
    evals, evecs = fop_kernels.eigh(mats, backend=backend)
    ref_l, _ = ref.eigh(mats)
    for i, (a, b) in enumerate(zip(evals, ref_l)):
        scale = float(mats[i].abs().max()) or 1.0
        assert_close(a, b, atol=16 * mats[i].shape[0] * EPS[dtype] * scale, rtol=0, what=f"evals[{i}] vs reference")
    check_decomposition(mats, evals, evecs, what=backend)


SMALL_KINDS = ("spd", "rank_deficient", "indefinite", "ill_conditioned", "repeated", "diagonal", "identity")


@pytest.mark.parametrize("backend", eigh_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,count", [(2, 17), (3, 9), (16, 33), (31, 8), (63, 7), (64, 40)])
def test_eigh_small_groups(backend, dtype, n, count):
    """n <= 64: the C++ backend decomposes 16 (float) / 8 (double) matrices at once, one per vector lane. Counts
    that leave a group partly empty, kinds that converge at different rates in one group, a zero matrix, and
    entries scaled by 2^100 / 2^-100 (squares outside float32's range), against float64 and torch's own error."""
    gen = torch.Generator().manual_seed(100 * n + count)
    mats = [make_matrix(SMALL_KINDS[i % len(SMALL_KINDS)], n, dtype, gen) for i in range(count)]
    mats[count // 2] = torch.zeros(n, n, dtype=dtype)
    mats[1] = mats[1] * 2.0**100
    mats[-1] = mats[-1] * 2.0**-100
    evals, evecs = fop_kernels.eigh(mats, backend=backend)
    check_decomposition(mats, evals, evecs, what=f"{backend}/{n}x{count}")
    assert torch.equal(evals[count // 2], torch.zeros(n, dtype=dtype))
    ref_l, _ = ref.eigh(mats)
    for i, (a, b) in enumerate(zip(evals, ref_l)):
        scale = float(mats[i].abs().max()) or 1.0
        assert_close(a, b, atol=16 * n * EPS[dtype] * scale, rtol=0, what=f"evals[{i}] vs reference")


@pytest.mark.parametrize("backend", eigh_backends())
def test_eigh_clamp(backend):
    mats = [make_matrix("rank_deficient", n, torch.float32) for n in (4, 16, 64, 65)]
    mats.append(make_matrix("indefinite", 9, torch.float32))
    evals, evecs = fop_kernels.eigh(mats, clamp=True, backend=backend)
    check_decomposition(mats, evals, evecs, clamp=True, what=backend)
    unclamped, _ = fop_kernels.eigh(mats, backend=backend)
    for a, b in zip(evals, unclamped):
        assert torch.equal(a, b.clamp_min(0))


@pytest.mark.parametrize("backend", eigh_backends())
def test_one_by_one_and_identity(backend):
    mats = [torch.tensor([[2.5]]), torch.eye(1), torch.eye(7), torch.zeros(3, 3)]
    evals, evecs = fop_kernels.eigh(mats, backend=backend)
    assert torch.equal(evals[0], torch.tensor([2.5])) and evecs[0].abs().item() == 1.0
    assert torch.allclose(evals[2], torch.ones(7)) and orthogonality_error(evecs[2]) < 1e-6
    assert torch.equal(evals[3], torch.zeros(3))
    check_decomposition(mats, evals, evecs, what=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resnet18_factor_set_small(dtype):
    mats = mixed_list(RESNET18_SMALL, dtype, kinds=("spd", "rank_deficient"))
    evals, evecs = fop_kernels.eigh(mats, clamp=False, backend="cpp")
    check_decomposition(mats, evals, evecs, what="resnet18/cpp")


def test_threaded_lapack_matrices_beside_small_ones():
    """Matrices of 1024 and more are decomposed one by one outside the parallel region (LAPACK on every thread),
    the rest inside it: both paths in one call, each output in its own slot, for all three ops."""
    sizes = [5, 1024, 64, 64, 1031, 200, 24, 24]
    mats = mixed_list(sizes, torch.float64, kinds=("spd", "rank_deficient"))
    evals, evecs = fop_kernels.eigh(mats, backend="cpp")
    check_decomposition(mats, evals, evecs, what="threaded")
    ref_l, _ = ref.eigh(mats)
    for i, (a, b) in enumerate(zip(evals, ref_l)):
        assert_close(a, b, atol=16 * sizes[i] * EPS[torch.float64] * float(mats[i].abs().max()), rtol=0,
                     what=f"evals[{i}] vs reference")
    inv = fop_kernels.damped_inverse(mats, 1e-2, backend="cpp")
    for i, (h, e) in enumerate(zip(inv, ref.damped_inverse(mats, 1e-2))):
        assert_close(h, e, atol=1e-9 * float(e.abs().max()), rtol=0, what=f"damped_inverse[{i}] vs reference")
    l, _ = fop_kernels.eigh_refresh(mats, evecs, backend="cpp")
    for i in range(len(mats)):
        assert_close(l[i], evals[i], atol=1e-9 * float(evals[i].abs().max()), rtol=0, what=f"refresh evals[{i}]")
    broken = list(mats)
    broken[4] = broken[4].clone()
    broken[4][3, 7] = float("nan")
    with pytest.raises(RuntimeError, match=r"mats\[4\] contains non-finite"):
        fop_kernels.eigh(broken, backend="cpp")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resnet18_factor_set_full(dtype):
    mats = mixed_list(RESNET18_SMALL + RESNET18_LARGE, dtype, kinds=("spd", "rank_deficient"))
    evals, evecs = fop_kernels.eigh(mats, backend="cpp")
    check_decomposition(mats, evals, evecs, what="resnet18-full")
    inv = fop_kernels.damped_inverse(mats, 1e-3, eig=(evals, evecs), backend="cpp")
    # the reconstruction against the reference's from the same decomposition (fp32 inverses of these
    # rank-deficient factors have condition numbers up to ~1e7, so an fp64 residual would test LAPACK, not us)
    expected = ref.damped_inverse(mats, 1e-3, eig=(evals, evecs))
    for i, (m, h, e) in enumerate(zip(mats, inv, expected)):
        scale = float(e.abs().max())
        assert_close(h, e, atol=4 * m.shape[0] * EPS[dtype] * scale, rtol=0, what=f"damped_inverse[{i}]")
        if dtype == torch.float64:
            eye = torch.eye(m.shape[0], dtype=torch.float64)
            assert float((h @ (m + 1e-3 * eye) - eye).abs().max()) < 1e-6, f"H (M + d I) = I, matrix {i}"


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), seed=st.integers(0, 2**16),
       double=st.booleans())
def test_eigh_property_random_size_lists(sizes, seed, double):
    dtype = torch.float64 if double else torch.float32
    mats = mixed_list(sizes, dtype, seed=seed)
    evals, evecs = fop_kernels.eigh(mats)
    check_decomposition(mats, evals, evecs, what="hypothesis")


# ---- damped inverse ---------------------------------------------------------------------------------------------


def damped_oracle(m: torch.Tensor, damping: float, power: float) -> torch.Tensor:
    return ref.damped_inverse([m.double()], damping, power)[0]


@pytest.mark.parametrize("backend", backends_for("damped_inverse", torch.device("cpu")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("power", [-1.0, -0.5, -0.25, 1.0])
def test_damped_inverse_vs_float64(backend, dtype, power):
    mats = mixed_list([1, 6, 64, 64, 64, 150], dtype, kinds=("spd", "rank_deficient", "diagonal"))
    damping = 0.1
    out = fop_kernels.damped_inverse(mats, damping, power=power, backend=backend)
    same_dtype_ref = ref.damped_inverse(mats, damping, power)
    for i, (m, h, r) in enumerate(zip(mats, out, same_dtype_ref)):
        oracle = damped_oracle(m, damping, power)
        err_ref = float((r.double() - oracle).abs().max())
        scale = float(oracle.abs().max())
        assert h.dtype == dtype and h.shape == m.shape
        assert_close(h, oracle, atol=2 * err_ref + 8 * m.shape[0] * EPS[dtype] * scale, rtol=0,
                     what=f"damped_inverse[{i}] ({backend}, power {power})")


@pytest.mark.parametrize("backend", backends_for("damped_inverse", torch.device("cpu")))
def test_damped_inverse_reuses_decomposition(backend):
    mats = mixed_list([5, 32, 32, 90], torch.float64)
    eig = fop_kernels.eigh(mats, clamp=True)
    direct = fop_kernels.damped_inverse(mats, 1e-2, backend=backend)
    reused = fop_kernels.damped_inverse(mats, 1e-2, eig=eig, backend=backend)
    for a, b in zip(direct, reused):
        assert_close(a, b, atol=1e-9, rtol=1e-9, what="reuse")
    # a decomposition of other matrices is used as given (mats only fix the shapes)
    other = [2 * m for m in mats]
    from_eig = fop_kernels.damped_inverse(other, 1e-2, eig=eig, backend=backend)
    for a, b in zip(direct, from_eig):
        assert_close(b, a, atol=1e-9, rtol=1e-9, what="eig is used, not recomputed")
    for m, h in zip(mats, direct):
        eye = torch.eye(m.shape[0], dtype=torch.float64)
        assert_close(h @ (m + 1e-2 * eye), eye, atol=1e-8, rtol=0, what="H (M + d I) = I")


def test_damped_inverse_tensor_damping():
    mats = mixed_list([8, 20], torch.float64)
    a = fop_kernels.damped_inverse(mats, torch.tensor(0.3, dtype=torch.float64), power=-0.5)
    b = fop_kernels.damped_inverse(mats, 0.3, power=-0.5, backend="reference")
    for x, y in zip(a, b):
        assert_close(x, y, atol=1e-10, rtol=1e-10, what="tensor damping")


# ---- eigh_refresh -----------------------------------------------------------------------------------------------


def drifted(mats, rho, seed=1):
    """One EMA factor step M <- (1 - rho) M + rho X^T X / N: the change between two inverse updates."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in mats:
        n = m.shape[0]
        x = torch.randn(2 * n, n, dtype=torch.float64, generator=gen)
        out.append(((1 - rho) * m.double() + rho * x.mT @ x / (2 * n)).to(m.dtype))
    return out


@pytest.mark.parametrize("backend", backends_for("eigh_refresh", torch.device("cpu")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_refresh_exact_basis_is_a_fixed_point(backend, dtype):
    mats = mixed_list([1, 4, 30, 30, 64, 120], dtype, kinds=("spd", "diagonal", "identity"))
    _, q = fop_kernels.eigh(mats)
    evals, evecs = fop_kernels.eigh_refresh(mats, q, backend=backend)
    check_decomposition(mats, evals, evecs, what=f"refresh/{backend}")


@pytest.mark.parametrize("backend", backends_for("eigh_refresh", torch.device("cpu")))
def test_eigh_refresh_matches_reference_and_improves_with_iters(backend):
    old = mixed_list([16, 48, 48, 96], torch.float64, kinds=("spd",))
    new = drifted(old, rho=0.05)
    _, q_old = fop_kernels.eigh(old)
    residuals = []
    for iters in (1, 3):
        l, q = fop_kernels.eigh_refresh(new, q_old, iters=iters, backend=backend)
        l_ref, q_ref = ref.eigh_refresh(new, q_old, iters=iters)
        for i in range(len(new)):
            assert_close(l[i], l_ref[i], atol=1e-10, rtol=1e-10, what=f"refresh evals[{i}] vs reference")
            recon, recon_ref = (q[i] * l[i]) @ q[i].mT, (q_ref[i] * l_ref[i]) @ q_ref[i].mT
            assert_close(recon, recon_ref, atol=1e-9, rtol=0, what=f"refresh basis[{i}] vs reference")
            assert orthogonality_error(q[i]) < 1e-12
        residuals.append(max(float((m @ qq - qq * ll).norm() / m.norm()) for m, ll, qq in zip(new, l, q)))
    stale = max(float((m @ qq - qq * (qq * (m @ qq)).sum(0)).norm() / m.norm()) for m, qq in zip(new, q_old))
    assert residuals[1] < residuals[0] < stale, (stale, residuals)


def test_eigh_refresh_clamp():
    mats = [make_matrix("rank_deficient", n, torch.float32) for n in (10, 40)]
    _, q = fop_kernels.eigh(mats)
    l, _ = fop_kernels.eigh_refresh(mats, q, clamp=True)
    assert all(bool((x >= 0).all()) for x in l)


# ---- torch.compile and opcheck ----------------------------------------------------------------------------------


def test_ops_trace_under_torch_compile():
    mats = mixed_list([6, 6, 20], torch.float32, kinds=("spd",))

    def step(ms):
        l, q = torch.ops.fop_kernels.eigh(ms, True)
        inv = torch.ops.fop_kernels.damped_inverse(ms, torch.tensor(0.1, dtype=torch.float64), -1.0, l, q)
        rl, rq = torch.ops.fop_kernels.eigh_refresh(ms, q, 1, False)
        return [h.sum() for h in inv], rl

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got_inv, got_rl = compiled(mats)
    want_inv, want_rl = step(mats)
    for a, b in zip(got_inv + got_rl, want_inv + want_rl):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what="compiled vs eager")


def test_public_op_under_torch_compile():
    mats = mixed_list([5, 12], torch.float64, kinds=("spd",))
    compiled = torch.compile(lambda ms: fop_kernels.damped_inverse(ms, 0.1), backend="aot_eager")
    for a, b in zip(compiled(mats), ref.damped_inverse(mats, 0.1)):
        assert_close(a, b, atol=1e-10, rtol=1e-10, what="compiled public op")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    mats = mixed_list([3, 8, 8, 17], dtype, kinds=("spd",))
    l, q = torch.ops.fop_kernels.eigh(mats, False)
    damping = torch.tensor(0.1, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fop_kernels.eigh.default, (mats, False))
    torch.library.opcheck(torch.ops.fop_kernels.eigh.default, (mats, True))
    torch.library.opcheck(torch.ops.fop_kernels.damped_inverse.default, (mats, damping, -0.5, None, None))
    torch.library.opcheck(torch.ops.fop_kernels.damped_inverse.default, (mats, damping, -1.0, list(l), list(q)))
    torch.library.opcheck(torch.ops.fop_kernels.eigh_refresh.default, (mats, list(q), 2, False))


# ---- bad input --------------------------------------------------------------------------------------------------

BAD = (ValueError, TypeError, RuntimeError)


def _good(n=4, dtype=torch.float32):
    return make_matrix("spd", n, dtype)


def bad_lists():
    nan = _good(5)
    nan[1, 2] = float("nan")
    inf = _good(5)
    inf[0, 0] = float("inf")
    asym = _good(5)
    asym[0, 3] += 1.0
    return [
        ("empty", [], r"empty"),
        ("non_square", [_good(), _good(), torch.ones(3, 4)], r"mats\[2\].*not square"),
        ("not_2d", [_good(), torch.ones(2, 2, 2)], r"mats\[1\]"),
        ("zero_size", [_good(), torch.ones(0, 0)], r"mats\[1\].*empty"),
        ("wrong_dtype", [_good(), _good().half()], r"mats\[1\].*dtype"),
        ("int_dtype", [torch.eye(3, dtype=torch.int64)], r"mats\[0\].*dtype"),
        ("mixed_dtype", [_good(), _good(dtype=torch.float64)], r"mats\[1\].*dtype"),
        ("nan", [_good(), _good(), nan], r"mats\[2\].*non-finite"),
        ("inf", [_good(), inf], r"mats\[1\].*non-finite"),
        ("non_symmetric", [_good(), _good(), _good(), asym], r"mats\[3\].*not symmetric"),
    ]


@pytest.mark.parametrize("backend", eigh_backends())
@pytest.mark.parametrize("case", bad_lists(), ids=lambda c: c[0])
def test_bad_input_public_ops(backend, case):
    _, mats, pattern = case
    before = [m.clone() for m in mats]
    with pytest.raises(BAD, match=pattern):
        fop_kernels.eigh(mats, backend=backend)
    with pytest.raises(BAD, match=pattern):
        fop_kernels.damped_inverse(mats, 0.1, backend=backend)
    for a, b in zip(mats, before):
        assert torch.equal(a, b) or (a.dtype.is_floating_point and torch.equal(a.isnan(), b.isnan()))


@pytest.mark.parametrize("case", bad_lists(), ids=lambda c: c[0])
def test_bad_input_native_op_names_the_matrix(case):
    """The C++ op checks for itself (callers may bypass the public op): the error names the matrix index."""
    _, mats, pattern = case
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.fop_kernels.eigh(mats, False)
    if mats:
        with pytest.raises(RuntimeError, match=pattern):
            torch.ops.fop_kernels.damped_inverse(mats, torch.tensor(0.1), -1.0, None, None)
        if all(m.dim() == 2 and m.shape[0] == m.shape[1] for m in mats):
            with pytest.raises(RuntimeError, match=pattern):
                torch.ops.fop_kernels.eigh_refresh(mats, [torch.eye(m.shape[0], dtype=m.dtype) for m in mats], 1,
                                                   False)


@pytest.mark.parametrize("backend", eigh_backends())
def test_singular_without_damping_raises_instead_of_nan(backend):
    mats = [_good(4), make_matrix("rank_deficient", 6, torch.float32)]
    with pytest.raises(BAD, match=r"mats\[1\]"):
        fop_kernels.damped_inverse(mats, 0.0, backend=backend)
    out = fop_kernels.damped_inverse(mats, 0.0, power=1.0, backend=backend)  # a positive power is fine
    assert all(bool(torch.isfinite(h).all()) for h in out)


@pytest.mark.parametrize("backend", eigh_backends())
def test_bad_hyperparameters(backend):
    mats = [_good(3), _good(5)]
    l, q = fop_kernels.eigh(mats)
    with pytest.raises(BAD, match="damping"):
        fop_kernels.damped_inverse(mats, -1.0, backend=backend)
    with pytest.raises(BAD, match="damping"):
        fop_kernels.damped_inverse(mats, float("nan"), backend=backend)
    with pytest.raises(BAD, match="power"):
        fop_kernels.damped_inverse(mats, 0.1, power=float("inf"), backend=backend)
    with pytest.raises(BAD, match="decompositions|holds"):
        fop_kernels.damped_inverse(mats, 0.1, eig=(l[:1], q[:1]), backend=backend)
    with pytest.raises(BAD, match=r"evecs\)?\[1\]"):
        fop_kernels.damped_inverse(mats, 0.1, eig=(l, [q[0], q[0]]), backend=backend)
    bad_q = [q[0].clone(), q[1].clone()]
    bad_q[1][0, 0] = float("nan")
    with pytest.raises(BAD, match=r"\[1\]"):
        fop_kernels.damped_inverse(mats, 0.1, eig=(l, bad_q), backend=backend)
    with pytest.raises(BAD, match=r"\[1\]"):
        fop_kernels.eigh_refresh(mats, bad_q, backend=backend)
    with pytest.raises(BAD, match="iters"):
        fop_kernels.eigh_refresh(mats, q, iters=0, backend=backend)
    with pytest.raises(BAD, match=r"prev_evecs\[0\]"):
        fop_kernels.eigh_refresh(mats, [q[1], q[1]], backend=backend)


def test_native_op_bad_arguments():
    mats = [_good(3), _good(5)]
    l, q = torch.ops.fop_kernels.eigh(mats, False)
    with pytest.raises(RuntimeError, match="damping must be a finite value >= 0"):
        torch.ops.fop_kernels.damped_inverse(mats, torch.tensor(-0.5), -1.0, None, None)
    with pytest.raises(RuntimeError, match="pass both evals and evecs"):
        torch.ops.fop_kernels.damped_inverse(mats, torch.tensor(0.5), -1.0, list(l), None)
    with pytest.raises(RuntimeError, match=r"evecs\[1\] has shape"):
        torch.ops.fop_kernels.damped_inverse(mats, torch.tensor(0.5), -1.0, list(l), [q[0], q[0]])
    with pytest.raises(RuntimeError, match="iters must be >= 1"):
        torch.ops.fop_kernels.eigh_refresh(mats, list(q), 0, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_concurrent_lapack_sizes_after_set_num_threads(dtype):
    """Several 512-wide matrices (and smaller ones) after torch.set_num_threads: two syevd calls running at once
    inside the parallel region returned wrong eigenvectors (residual 0.25-3.7) once the thread count had been set;
    every LAPACK item now runs on its own, so all three ops stay exact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        mats = mixed_list([512, 512, 513, 200, 64, 10], dtype, kinds=("spd", "rank_deficient"), seed=4)
        evals, evecs = fop_kernels.eigh(mats, backend="cpp")
        check_decomposition(mats, evals, evecs, what="after set_num_threads")
        tol = 1e3 * EPS[dtype]  # the bug's errors were O(1)
        inv = fop_kernels.damped_inverse(mats, 1e-2, backend="cpp")  # batched against one matrix per call
        for i, (h, m) in enumerate(zip(inv, mats)):
            alone = fop_kernels.damped_inverse([m], 1e-2, backend="cpp")[0]
            assert_close(h, alone, atol=tol * float(alone.abs().max()), rtol=0, what=f"inverse[{i}]")
        l, _ = fop_kernels.eigh_refresh(mats, evecs, backend="cpp")
        for i in range(len(mats)):
            assert_close(l[i], evals[i], atol=tol * float(evals[i].abs().max()), rtol=0, what=f"refresh[{i}]")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", backends_for("damped_cholesky_inverse", torch.device("cpu")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,n", [(1, 1), (2, 5), (3, 64), (2, 130), (1, 600)])
def test_damped_cholesky_inverse_vs_float64(backend, dtype, B, n):
    """(M + lam I)^-1 against float64 torch.linalg.inv on fresh random PSD stacks, every element; exactly symmetric;
    info 0 for positive definite matrices and nonzero (only) for an indefinite one."""
    g = torch.Generator().manual_seed(B * 1000 + n)
    Z = torch.randn(B, n, max(1, n // 2), generator=g, dtype=torch.float64)
    M = Z @ Z.mT / n
    lam = torch.rand(B, generator=g, dtype=torch.float64) * 0.1 + 1e-2
    inv, info = fop_kernels.damped_cholesky_inverse(M.to(dtype), lam.to(dtype), backend=backend)
    expected = torch.linalg.inv(M + lam[:, None, None] * torch.eye(n, dtype=torch.float64))
    assert inv.shape == M.shape and inv.dtype == dtype and info.dtype == torch.int32 and info.tolist() == [0] * B
    assert torch.equal(inv, inv.mT)
    assert_close(inv.double(), expected, atol=1e3 * EPS[dtype] * float(expected.abs().max()), rtol=0,
                 what=f"{backend} {dtype} {(B, n)}")
    bad = M.to(dtype).clone()
    bad[-1].diagonal().sub_(10.0)
    _, info = fop_kernels.damped_cholesky_inverse(bad, lam.to(dtype), backend=backend)
    assert info[-1] != 0 and info[:-1].tolist() == [0] * (B - 1)


@pytest.mark.parametrize("backend", backends_for("damped_cholesky_inverse", torch.device("cpu")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,n", [(1, 1), (2, 5), (3, 64), (2, 130), (1, 600)])
def test_damped_cholesky_inverse_overwrite_is_the_same_inverse_in_place(backend, dtype, B, n):
    """overwrite=True writes the inverses into M itself (the result is M, its storage) and they equal the
    out-of-place op's bit for bit on fresh random stacks, poisoned around the matrices first (M is a view of a NaN
    buffer's middle: nothing outside it may be read or written); info is the same, an indefinite matrix included.
    Bit for bit only at the same alignment: MKL's potrf/potri round differently on storage that is not 64-byte
    aligned (seen on an AMD EPYC: 4.6e-5 apart in float32 at 4 bytes off), so the poisoned margin before M is 64
    bytes; a misaligned view gives the same inverse to rounding."""
    g = torch.Generator().manual_seed(7 * B + n)
    Z = torch.randn(B, n, max(1, n // 2), generator=g, dtype=torch.float64)
    M = (Z @ Z.mT / n).to(dtype)
    M[-1].diagonal().sub_(10.0 if B > 1 else 0.0)
    lam = (torch.rand(B, generator=g, dtype=torch.float64) * 0.1 + 1e-2).to(dtype)
    expected, expected_info = fop_kernels.damped_cholesky_inverse(M, lam, backend=backend)
    good = [b for b in range(B) if int(expected_info[b]) == 0]
    for margin in (64 // M.element_size(), 1):
        buffer = torch.full((B * n * n + 2 * margin,), float("nan"), dtype=dtype)
        scratch = buffer[margin:margin + B * n * n].view(B, n, n)
        scratch.copy_(M)
        inv, info = fop_kernels.damped_cholesky_inverse(scratch, lam, overwrite=True, backend=backend)
        assert inv.data_ptr() == scratch.data_ptr() and inv.shape == M.shape
        assert torch.equal(info, expected_info)
        if margin == 1:
            assert_close(inv[good].double(), expected[good].double(),
                         atol=1e2 * EPS[dtype] * float(expected[good].abs().max()), rtol=0, what="misaligned")
        else:
            assert torch.equal(inv[good], expected[good])
        assert bool(buffer[:margin].isnan().all()) and bool(buffer[margin + B * n * n:].isnan().all())


def test_damped_cholesky_inverse_rejects_bad_input():
    M = torch.eye(3).expand(2, 3, 3).clone()
    with pytest.raises(ValueError, match="M must be a"):
        fop_kernels.damped_cholesky_inverse(M[0], torch.ones(2))
    with pytest.raises(ValueError, match="lam must be"):
        fop_kernels.damped_cholesky_inverse(M, torch.ones(3))
    with pytest.raises(TypeError, match="float32 or float64"):
        fop_kernels.damped_cholesky_inverse(M.half(), torch.ones(2))
    with pytest.raises(ValueError, match="contiguous"):
        fop_kernels.damped_cholesky_inverse(M.mT, torch.ones(2), overwrite=True)
    with pytest.raises(TypeError, match="overwrite"):
        fop_kernels.damped_cholesky_inverse(M, torch.ones(2), overwrite=1)
