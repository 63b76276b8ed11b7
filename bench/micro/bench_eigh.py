"""Batched eigendecomposition and damped inverse on CPU: the op against its reference and plain torch.

Run: `make bench` (all microbenchmarks), or one file:
    .venv/bin/python -m pytest bench/micro/bench_eigh.py --benchmark-only -s
Groups (one per case; rows: reference, plain-torch alternatives, the op):
  - eigh resnet18 fp32: the Kronecker factors of a ResNet-18 (sizes 10, 28, 64, 128, 256, 512, 513, 577, 1153,
    2305, 4609). reference: the per-matrix torch.linalg.eigh loop; torch: the loop with LAPACK on one thread, and
    one batched torch.linalg.eigh per size class (stacking timed). Target: the op no slower than the best.
  - eigh 200x64 fp32/fp64: 200 matrices of size 64, the same rows. Target: the op >= 3x faster than the loop.
  - damped_inverse 200x64 fp32: reference (loop of eigh + reconstruction); torch: batched Cholesky inverse of
    M + damping I (power -1 only); the op.
  - eigh_refresh resnet18<=2305 fp32: reference (torch loop of subspace iteration) and full eigh (op) against
    eigh_refresh with 1 and 3 iterations from the previous eigenvectors, after one EMA step
    M <- 0.95 M + 0.05 X^T X / N. Accuracy (residual ||M Q - Q diag(l)||_F / ||M||_F, max relative eigenvalue
    error) goes into extra_info.
Inputs are SPD factors X^T X / N built in float64. GPU rows: `make gpu-check`.
"""

from __future__ import annotations

import pytest
import torch
from _timing import pick, short, timed

import fop_kernels
from fop_kernels import reference as ref

pytest.importorskip("pytest_benchmark")

RESNET18_SIZES = pick([10, 28, 64, 128, 256, 512, 513, 577, 1153, 2305, 4609], [10, 28, 64, 65])
MANY, SMALL = pick((200, 64), (12, 16))
DAMPING = 1e-3


def spd(sizes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(2 * n, n, dtype=torch.float64, generator=gen)
        out.append((x.mT @ x / (2 * n)).to(dtype))
    return out


def drift(mats, rho=0.05, seed=1):
    """One EMA factor update M <- (1 - rho) M + rho X^T X / N (the change between two inverse updates)."""
    fresh = spd([m.shape[0] for m in mats], torch.float64, seed)
    return [((1 - rho) * m.double() + rho * f).to(m.dtype) for m, f in zip(mats, fresh)]


def _have_cpp(op: str) -> bool:
    return fop_kernels.available_backends()["cpp"]["available"] and "cpp" in fop_kernels.implementations(op)


def _loop_1thread(mats):
    """The loop with LAPACK on one thread: on a loaded 2-core machine multi-threaded LAPACK on small matrices
    loses to its own OpenMP spin-waits, so this is a candidate for the best alternative too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ref.eigh(mats)
    finally:
        torch.set_num_threads(threads)


def _by_size(mats):
    """Indices of the matrices of each size, in first-seen order."""
    groups: dict[int, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault(m.shape[0], []).append(i)
    return list(groups.values())


def _batched_eigh(mats):
    """One torch.linalg.eigh per size class on the stacked matrices."""
    evals, evecs = [None] * len(mats), [None] * len(mats)
    for idx in _by_size(mats):
        l, q = torch.linalg.eigh(torch.stack([mats[i] for i in idx]))
        for j, i in enumerate(idx):
            evals[i], evecs[i] = l[j], q[j]
    return evals, evecs


def _batched_cholesky_inverse(mats, damping):
    """(M + damping I)^-1 by one batched Cholesky factorization and inverse per size class."""
    out = [None] * len(mats)
    for idx in _by_size(mats):
        stacked = torch.stack([mats[i] for i in idx])
        eye = torch.eye(stacked.shape[-1], dtype=stacked.dtype)
        inv = torch.cholesky_inverse(torch.linalg.cholesky(stacked + damping * eye))
        for j, i in enumerate(idx):
            out[i] = inv[j]
    return out


EIGH_ROWS = [("reference", "reference"), ("loop-1thread", "torch"), ("batched", "torch"), ("op", "fast")]
EIGH_FNS = {"reference": ref.eigh, "loop-1thread": _loop_1thread, "batched": _batched_eigh,
            "op": fop_kernels.eigh}


def _eigh_row(benchmark, impl, kind, mats, shape, dtype, rounds):
    if kind == "fast" and not _have_cpp("eigh"):
        pytest.skip("the C++ extension is not loaded")
    fn = EIGH_FNS[impl]
    if kind != "reference":
        evals, evecs = fn(mats)
        for m, l, q in zip(mats, evals, evecs):  # M v = Q diag(l) Q^T v on a random v (O(n^2), not O(n^3))
            v = torch.randn(m.shape[0], dtype=m.dtype)
            assert torch.allclose(q @ (l * (q.mT @ v)), m @ v, atol=1e-3 * float((m @ v).abs().max())), impl
    timed(benchmark, op="eigh", shape=shape, dtype=dtype, impl=impl, kind=kind, fn=lambda: fn(mats),
          rounds=rounds, reference=lambda: ref.eigh(mats))


@pytest.mark.parametrize("impl,kind", EIGH_ROWS, ids=[r[0] for r in EIGH_ROWS])
def test_eigh_resnet18(benchmark, impl, kind):
    _eigh_row(benchmark, impl, kind, spd(RESNET18_SIZES, torch.float32), "resnet18 factor set", "fp32", rounds=3)


@pytest.mark.parametrize("impl,kind", EIGH_ROWS, ids=[r[0] for r in EIGH_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_eigh_many_small(benchmark, dtype, impl, kind):
    _eigh_row(benchmark, impl, kind, spd([SMALL] * MANY, dtype), f"{MANY}x{SMALL}", short(dtype), rounds=15)


DAMPED_ROWS = [("reference", "reference"), ("batched-cholesky", "torch"), ("op", "fast")]


@pytest.mark.parametrize("impl,kind", DAMPED_ROWS, ids=[r[0] for r in DAMPED_ROWS])
def test_damped_inverse_many_small(benchmark, impl, kind):
    if kind == "fast" and not _have_cpp("damped_inverse"):
        pytest.skip("the C++ extension is not loaded")
    mats = spd([SMALL] * MANY, torch.float32)
    fns = {"reference": lambda: ref.damped_inverse(mats, DAMPING),
           "batched-cholesky": lambda: _batched_cholesky_inverse(mats, DAMPING),
           "op": lambda: fop_kernels.damped_inverse(mats, DAMPING)}
    for got, want in zip(fns[impl](), fns["reference"]()):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())), f"{impl} is wrong"
    timed(benchmark, op="damped_inverse", shape=f"{MANY}x{SMALL}", dtype="fp32", impl=impl, kind=kind,
          fn=fns[impl], rounds=15, reference=fns["reference"])


def refresh_accuracy(mats, evals, evecs) -> dict[str, float]:
    """Worst relative residual ||M Q - Q diag(l)||_F / ||M||_F and worst relative eigenvalue error (float64)."""
    resid, lerr = 0.0, 0.0
    for m, l, q in zip(mats, evals, evecs):
        m64, l64, q64 = m.double(), l.double(), q.double()
        resid = max(resid, float((m64 @ q64 - q64 * l64).norm() / m64.norm()))
        exact = torch.linalg.eigvalsh(m64)
        lerr = max(lerr, float((l64 - exact).abs().max() / exact.abs().max()))
    return {"residual": resid, "eigenvalue_rel_error": lerr}


REFRESH_ROWS = [("reference-1", "reference"), ("eigh", "fast"), ("refresh-1", "fast"), ("refresh-3", "fast")]


@pytest.mark.parametrize("impl,kind", REFRESH_ROWS, ids=[r[0] for r in REFRESH_ROWS])
def test_eigh_refresh_vs_eigh(benchmark, impl, kind):
    if kind == "fast" and not _have_cpp("eigh_refresh"):
        pytest.skip("the C++ extension is not loaded")
    sizes = RESNET18_SIZES[:-1]
    old = spd(sizes, torch.float32)
    _, q_old = fop_kernels.eigh(old)
    new = drift(old)
    fns = {"reference-1": lambda: ref.eigh_refresh(new, q_old, iters=1),
           "eigh": lambda: fop_kernels.eigh(new),
           "refresh-1": lambda: fop_kernels.eigh_refresh(new, q_old, iters=1),
           "refresh-3": lambda: fop_kernels.eigh_refresh(new, q_old, iters=3)}
    acc = refresh_accuracy(new, *fns[impl]())
    stale = refresh_accuracy(new, [(q * (m @ q)).sum(0) for m, q in zip(new, q_old)], q_old)
    timed(benchmark, op="eigh_refresh", shape="resnet18 factor set <= 2305", dtype="fp32", impl=impl, kind=kind,
          fn=fns[impl], rounds=3, reference=fns["reference-1"],
          info={"sizes": sizes, **acc, "stale_residual": stale["residual"]})
