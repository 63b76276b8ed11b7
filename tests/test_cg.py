"""Batched CG (FROG's row-wise systems) on every backend present: against torch.linalg.solve on the explicit
matrices, against the float64 reference, tolerance freezing, warm start, opcheck and bad input.
Triton runs under TRITON_INTERPRET=1 on CPU (small shapes)."""

from __future__ import annotations

import pytest
import torch
from helpers import backends_for
from hypothesis import given, settings
from hypothesis import strategies as st

import fop_kernels
from fop_kernels import reference as ref

BACKENDS = backends_for("batched_cg", torch.device("cpu"))


def explicit_systems(X_s: torch.Tensor, w: torch.Tensor, damping: float) -> torch.Tensor:
    """R x D x D: F_r / (tr F_r / D + 1e-10) + damping I with F_r = X_s^T diag(w[:, r]) X_s / s, built explicitly."""
    s, D = X_s.shape
    mats = []
    for r in range(w.shape[1]):
        F = X_s.T @ (w[:, r, None] * X_s) / s
        mats.append(F / (F.trace() / D + 1e-10) + damping * torch.eye(D, dtype=X_s.dtype))
    return torch.stack(mats)


def problem(s, R, D, dtype=torch.float64):
    return (torch.randn(s, D, dtype=torch.float64).to(dtype), torch.rand(s, R, dtype=torch.float64).to(dtype),
            torch.randn(R, D, dtype=torch.float64).to(dtype))


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s,R,D", [(5, 6, 8), (12, 3, 7), (1, 1, 1), (3, 4, 1), (20, 2, 12)])
def test_matches_linalg_solve_after_D_iterations(backend, s, R, D):
    X_s, w, B = problem(s, R, D)
    damping = 0.05
    x, res = fop_kernels.batched_cg(X_s, w, B, damping, iters=D, backend=backend)
    A = explicit_systems(X_s, w, damping)
    exact = torch.linalg.solve(A, B.unsqueeze(-1)).squeeze(-1)
    assert x.dtype == torch.float64 and res.shape == (R,)
    assert rel_err(x, exact) < 1e-7, f"[{backend}] CG after D iterations vs solve: {rel_err(x, exact):.3e}"
    true_res = (B - (A @ x.unsqueeze(-1)).squeeze(-1)).norm(dim=1)
    assert torch.allclose(res, true_res, atol=1e-7 * float(B.norm())), f"[{backend}] residual norms"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,limit", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("s,R,D", [(7, 5, 33), (24, 10, 130)])
def test_low_precision_inputs_vs_fp64(backend, dtype, limit, s, R, D):
    """fp32 arithmetic inside for fp32/fp16/bf16 inputs; the solution comes back in B's dtype."""
    X_s, w, B = problem(s, R, D, dtype)
    x, res = fop_kernels.batched_cg(X_s, w, B, 0.1, iters=4, backend=backend)
    x_ref, res_ref = ref.batched_cg(X_s.double(), w.double(), B.double(), 0.1, iters=4)
    assert x.dtype == dtype and res.dtype == torch.float32
    assert rel_err(x, x_ref) < limit, f"[{backend}] {dtype}: {rel_err(x, x_ref):.3e}"
    assert rel_err(res, res_ref) < max(limit, 1e-4), f"[{backend}] residual {dtype}: {rel_err(res, res_ref):.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend):
    X_s, w, B = problem(9, 4, 30)
    Xn = torch.stack([X_s, -X_s], 2)[..., 0]  # strides (60, 2)
    wn = w.T.contiguous().T
    Bn = torch.stack([B, -B], 1)[:, 0]  # rows 60 apart
    assert not (Xn.is_contiguous() or wn.is_contiguous() or Bn.is_contiguous())
    x, _ = fop_kernels.batched_cg(Xn, wn, Bn, 0.01, iters=5, backend=backend)
    x_ref, _ = ref.batched_cg(X_s, w, B, 0.01, iters=5)
    assert rel_err(x, x_ref) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_tol_freezes_converged_rows(backend):
    """Once a row's residual is under tol |b_r| it stops changing: more iterations leave it bit-identical."""
    X_s, w, B = problem(6, 5, 10)
    B[3] = 0.0  # converged from the start: stays exactly 0, no NaN
    tol, K = 1e-4, 14
    runs = [fop_kernels.batched_cg(X_s, w, B, 0.05, iters=k, tol=tol, backend=backend) for k in range(K + 1)]
    b_norm = B.norm(dim=1)
    x_final, res_final = runs[-1]
    assert bool((res_final <= tol * b_norm).all()), f"[{backend}] not every row converged in {K} iterations"
    assert torch.equal(x_final[3], torch.zeros(10, dtype=torch.float64)) and float(res_final[3]) == 0.0
    for r in range(5):
        first = next(k for k, (_, res) in enumerate(runs) if res[r] <= tol * b_norm[r])
        for k in range(first, K + 1):
            assert torch.equal(runs[k][0][r], x_final[r]), f"[{backend}] row {r} changed after converging at {first}"
            assert runs[k][1][r] == res_final[r]
    firsts = {next(k for k, (_, res) in enumerate(runs) if res[r] <= tol * b_norm[r]) for r in (0, 1, 2, 4)}
    assert max(firsts) > 1, "the test needs rows that take several iterations"


@pytest.mark.parametrize("backend", BACKENDS)
def test_warm_start(backend):
    X_s, w, B = problem(8, 4, 12)
    A = explicit_systems(X_s, w, 0.05)
    exact = torch.linalg.solve(A, B.unsqueeze(-1)).squeeze(-1)
    x, res = fop_kernels.batched_cg(X_s, w, B, 0.05, iters=0, x0=exact, backend=backend)
    assert torch.equal(x, exact) and float(res.max()) < 1e-10 * float(B.norm())
    x, res = fop_kernels.batched_cg(X_s, w, B, 0.05, iters=3, x0=exact, backend=backend)
    assert rel_err(x, exact) < 1e-10
    x0 = torch.randn_like(B)
    x, res = fop_kernels.batched_cg(X_s, w, B, 0.05, iters=3, x0=x0, backend=backend)
    x_ref, res_ref = ref.batched_cg(X_s, w, B, 0.05, iters=3, x0=x0)
    assert rel_err(x, x_ref) < 1e-10 and rel_err(res, res_ref) < 1e-10
    x, _ = fop_kernels.batched_cg(X_s, w, B, 0.05, iters=12, x0=x0, backend=backend)
    assert rel_err(x, exact) < 1e-7, "CG from a warm start is exact after D iterations too"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_damping(backend):
    X_s, w, B = problem(5, 3, 9)
    x_t, _ = fop_kernels.batched_cg(X_s, w, B, torch.tensor(0.02, dtype=torch.float64), iters=4, backend=backend)
    x_f, _ = fop_kernels.batched_cg(X_s, w, B, 0.02, iters=4, backend=backend)
    assert rel_err(x_t, x_f) < 1e-12


@settings(max_examples=10, deadline=None)
@given(s=st.integers(1, 8), R=st.integers(1, 6), D=st.integers(1, 40), iters=st.integers(0, 5),
       tol=st.sampled_from([0.0, 1e-3, 0.5]), warm=st.booleans(), damping=st.sampled_from([1e-2, 0.1, 1.0]))
def test_hypothesis_every_backend_vs_reference(s, R, D, iters, tol, warm, damping):
    """Damped (SPD) systems of any shape. Undamped systems with s < D are singular: CG's <p, Ap> is then rounding
    noise and backends legitimately differ, so damping = 0 is tested on full-rank systems only (below)."""
    X_s, w, B = problem(s, R, D)
    x0 = torch.randn_like(B) if warm else None
    x_ref, res_ref = ref.batched_cg(X_s, w, B, damping, iters=iters, tol=tol, x0=x0)
    for backend in BACKENDS:
        x, res = fop_kernels.batched_cg(X_s, w, B, damping, iters=iters, tol=tol, x0=x0, backend=backend)
        assert torch.isfinite(x).all() and torch.isfinite(res).all()
        assert rel_err(x, x_ref) < 1e-8, f"[{backend}] x: {rel_err(x, x_ref):.3e}"
        assert rel_err(res, res_ref) < 1e-6 or float((res - res_ref).abs().max()) < 1e-9 * float(B.norm())


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_damping_full_rank(backend):
    X_s, w, B = problem(16, 3, 6)
    w += 0.1  # every weight positive: F_r is positive definite
    x, _ = fop_kernels.batched_cg(X_s, w, B, 0.0, iters=6, backend=backend)
    exact = torch.linalg.solve(explicit_systems(X_s, w, 0.0), B.unsqueeze(-1)).squeeze(-1)
    assert rel_err(x, exact) < 1e-7


def test_cpu_default_is_the_cpp_backend_when_built():
    want = "cpp" if fop_kernels.available_backends()["cpp"]["available"] else "reference"
    assert fop_kernels.resolve("batched_cg", "cpu")[0] == want


def test_opcheck():
    X_s, w, B = problem(5, 3, 9, torch.float32)
    x0 = torch.randn_like(B)
    ops = torch.ops.fop_kernels
    if "triton" in BACKENDS:
        import fop_kernels.triton.cg  # noqa: F401 - registers the custom op

        torch.library.opcheck(ops.triton_batched_cg.default, (X_s, w, B, torch.tensor(0.01), 3, 0.0, None))
        torch.library.opcheck(ops.triton_batched_cg.default, (X_s, w, B, torch.tensor(0.01), 2, 1e-3, x0))
    if "cpp" in BACKENDS:
        torch.library.opcheck(ops.batched_cg.default, (X_s, w, B, 0.01, 3, 0.0, None))
        torch.library.opcheck(ops.batched_cg.default, (X_s, w, B, 0.01, 2, 1e-3, x0))
    if not {"triton", "cpp"} & set(BACKENDS):
        pytest.skip("no custom-op backend here")


def test_bad_input_names_the_argument():
    X_s, w, B = problem(5, 3, 9)
    cg = fop_kernels.batched_cg
    with pytest.raises(ValueError, match=r"row_weights has shape \(5, 2\), expected \(5, 3\)"):
        cg(X_s, w[:, :2], B, 0.1)
    with pytest.raises(ValueError, match=r"row_weights has shape"):
        cg(X_s[:4], w, B, 0.1)
    with pytest.raises(ValueError, match=r"B has shape \(3, 8\), expected \(3, 9\)"):
        cg(X_s, w, B[:, :8], 0.1)
    with pytest.raises(ValueError, match=r"x0 has shape"):
        cg(X_s, w, B, 0.1, x0=B[:2])
    with pytest.raises(ValueError, match="damping must be a finite value >= 0"):
        cg(X_s, w, B, -1e-3)
    with pytest.raises(ValueError, match="tol must be >= 0"):
        cg(X_s, w, B, 0.1, tol=-1.0)
    with pytest.raises(ValueError, match="iters must be >= 0"):
        cg(X_s, w, B, 0.1, iters=-1)
    with pytest.raises(ValueError, match="B is on meta"):
        cg(X_s, w, B.to("meta"), 0.1)
    with pytest.raises(TypeError, match="X_s has unsupported dtype"):
        cg(X_s.int(), w, B, 0.1)
    with pytest.raises(ValueError, match="X_s must be 2-D"):
        cg(X_s[0], w, B, 0.1)
