"""Factor accumulation (dense, diagonal, conv, conv diagonal) on every backend present against a float64 oracle.

The oracle is the reference run in float64 on the same (already rounded) inputs, so the error measured is the
backend's accumulation error alone. Triton runs under TRITON_INTERPRET=1 on CPU (small shapes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F_nn
from helpers import TOLERANCES, assert_close, backends_for, poison_
from hypothesis import given, settings
from hypothesis import strategies as st

import fop_kernels
from fop_kernels import reference as ref
from fop_kernels.reference.factor import conv_output_size, conv_patches

LOW_PRECISION = (torch.float16, torch.bfloat16)
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DENSE_SHAPES = [(1, 1), (1, 9), (7, 1), (7, 5), (33, 70), (130, 150), (40, 300)]


def _tol(dtype):
    """fp32 accumulation is required for every input dtype, so fp32 tolerances apply (1e-2 allowed for fp16/bf16)."""
    return TOLERANCES[torch.float32] if dtype not in LOW_PRECISION else TOLERANCES[dtype]


def _symmetric(d, dtype=torch.float32):
    A = torch.randn(d, d, dtype=torch.float64)
    return (A + A.T).to(dtype)


def _backends(op):
    names = backends_for(op, torch.device("cpu"))
    assert "reference" in names
    return names


# ---- dense factor ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backends("accumulate_factor"))
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("N,d", DENSE_SHAPES)
def test_accumulate_factor_matches_fp64(backend, dtype, N, d):
    X = torch.randn(N, d).to(dtype)
    F0 = _symmetric(d)
    F = F0.clone()
    out = fop_kernels.accumulate_factor(F, X, 0.3, scale=1.0 / N, backend=backend)
    assert out is F
    expected = ref.accumulate_factor(F0.double(), X.double(), 0.3, 1.0 / N)
    assert_close(F, expected, *_tol(dtype), what=f"accumulate_factor[{backend}] {dtype} {N}x{d}")


@pytest.mark.parametrize("backend", _backends("accumulate_factor"))
@pytest.mark.parametrize("N,d", [(5, 3), (33, 70), (40, 300)])
def test_accumulate_factor_decay_one_rewrites_every_element(backend, N, d):
    """decay = 1 never reads F: a NaN-poisoned F must come back as exactly scale * X^T X everywhere."""
    X = torch.randn(N, d)
    F = poison_(torch.empty(d, d))
    fop_kernels.accumulate_factor(F, X, 1.0, scale=0.5, backend=backend)
    assert_close(F, 0.5 * X.double().T @ X.double(), *TOLERANCES[torch.float32], what=f"poisoned F [{backend}]")


@pytest.mark.parametrize("backend", _backends("accumulate_factor"))
def test_accumulate_factor_nonsymmetric_state_and_fp64(backend):
    """The formula holds for any F (each tile reads its own F, the mirrored one too); a float64 state stays fp64."""
    X = torch.randn(21, 140, dtype=torch.float64)
    F0 = torch.randn(140, 140, dtype=torch.float64)
    F = F0.clone()
    fop_kernels.accumulate_factor(F, X, 0.2, scale=0.1, backend=backend)
    expected = 0.8 * F0 + 0.02 * X.T @ X
    assert_close(F, expected, *TOLERANCES[torch.float64], what=f"fp64 [{backend}]")


@pytest.mark.parametrize("d", [7, 140])
def test_triton_float64_without_tl_dot(monkeypatch, d):
    """Triton < 3.5 has no float64 tl.dot; the broadcast-and-sum product it gets instead (FP64_DOT False) matches
    the fp64 oracle, dense and conv (with bias), on a NaN-poisoned state and on an EMA step."""
    if "triton" not in _backends("accumulate_factor"):
        pytest.skip("triton is not usable here")
    import fop_kernels.triton.factor as triton_factor

    monkeypatch.setattr(triton_factor, "FP64_DOT", False)
    X = torch.randn(23, d, dtype=torch.float64)
    F = poison_(torch.empty(d, d, dtype=torch.float64))
    fop_kernels.accumulate_factor(F, X, 1.0, scale=0.5, backend="triton")
    assert_close(F, 0.5 * X.T @ X, *TOLERANCES[torch.float64], what="fp64 without tl.dot, decay 1")
    F0 = torch.randn(d, d, dtype=torch.float64)
    F = F0.clone()
    fop_kernels.accumulate_factor(F, X, 0.2, scale=0.1, backend="triton")
    assert_close(F, 0.8 * F0 + 0.02 * X.T @ X, *TOLERANCES[torch.float64], what="fp64 without tl.dot, EMA")
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    Fc = poison_(torch.empty(28, 28, dtype=torch.float64))
    fop_kernels.accumulate_conv_factor(Fc, x, 1.0, 3, 1, 1, 1, True, scale=0.5, backend="triton")
    P = conv_patches(x, 3, 1, 1, 1, bias=True)
    assert_close(Fc, 0.5 * P.T @ P / 20, *TOLERANCES[torch.float64], what="fp64 conv without tl.dot")


@pytest.mark.parametrize("backend", _backends("accumulate_factor"))
@pytest.mark.parametrize("d", [7, 140])
def test_float64_input_into_float32_state(backend, d):
    """X float64 with a float32 state: accumulated in float64, rounded once into F (single- and multi-tile)."""
    X = torch.randn(19, d, dtype=torch.float64)
    F0, f0 = _symmetric(d), torch.rand(d)
    F, f = F0.clone(), f0.clone()
    fop_kernels.accumulate_factor(F, X, 0.3, 0.2, backend=backend)
    fop_kernels.accumulate_factor_diag(f, X, 0.3, 0.2, backend=backend)
    assert F.dtype == torch.float32 and f.dtype == torch.float32
    assert_close(F, ref.accumulate_factor(F0.double(), X, 0.3, 0.2), *TOLERANCES[torch.float32], what=f"[{backend}]")
    assert_close(f, ref.accumulate_factor_diag(f0.double(), X, 0.3, 0.2), *TOLERANCES[torch.float32],
                 what=f"diag [{backend}]")


@pytest.mark.parametrize("backend", _backends("accumulate_factor"))
def test_accumulate_factor_noncontiguous(backend):
    base = torch.randn(150, 46)
    X = base[::3, ::2]  # 50 x 23, strides (138, 2)
    big = _symmetric(46)
    F = big[::2, ::2]  # 23 x 23 view with strides (92, 2)
    F0 = F.clone()
    untouched = big[1::2, 1::2].clone()
    fop_kernels.accumulate_factor(F, X, 0.4, backend=backend)
    assert_close(F, ref.accumulate_factor(F0.double(), X.double(), 0.4), *TOLERANCES[torch.float32],
                 what=f"strided [{backend}]")
    assert torch.equal(big[1::2, 1::2], untouched), "elements outside the F view changed"
    Xt = torch.randn(23, 50).T  # transposed view
    F1 = F0.clone()
    fop_kernels.accumulate_factor(F1, Xt, 0.4, backend=backend)
    assert_close(F1, ref.accumulate_factor(F0.double(), Xt.double(), 0.4), *TOLERANCES[torch.float32],
                 what=f"transposed X [{backend}]")


# ---- diagonal ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backends("accumulate_factor"))
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_accumulate_factor_rows_of_nd_tensors_and_lists(backend, dtype):
    """Rows given as (..., d) tensors (a channels-last view of NCHW output gradients, not one strided matrix) and as
    a list of them equal the factor of the stacked 2-D rows."""
    dys = [torch.randn(3, 6, 5, 4).to(dtype), torch.randn(2, 6, 5, 4).to(dtype)]  # two records, C = 6 channels
    views = [dy.movedim(1, -1) for dy in dys]
    stacked = torch.cat([v.reshape(-1, 6) for v in views]).double()
    F0 = _symmetric(6)
    for X, rows in ((views[0], stacked[:60]), (views, stacked)):
        F = F0.clone()
        assert fop_kernels.accumulate_factor(F, X, 0.3, scale=0.1, backend=backend) is F
        assert_close(F, ref.accumulate_factor(F0.double(), rows, 0.3, 0.1), *_tol(dtype),
                     what=f"accumulate_factor[{backend}] {dtype} {'list' if X is views else 'view'}")
        poisoned = poison_(torch.empty(6, 6))
        fop_kernels.accumulate_factor(poisoned, X, 1.0, scale=0.1, backend=backend)
        assert_close(poisoned, 0.1 * rows.T @ rows, *_tol(dtype), what=f"decay=1 [{backend}] {dtype}")


@pytest.mark.parametrize("X", [torch.randn(140_000, 64).bfloat16(),  # a dtype change: 3 chunks of rows
                               torch.randn(3, 64, 70_000).transpose(1, 2)],  # no single matrix: one chunk per sample
                         ids=["bf16-rows", "transposed-samples"])
def test_cpp_accumulate_factor_copies_in_chunks(X):
    """Inputs the C++ op must copy go through a reused buffer of about 16 MiB; the chunks add up to the whole."""
    if "cpp" not in _backends("accumulate_factor"):
        pytest.skip("the C++ extension is not loaded")
    rows = X.reshape(-1, 64).double()
    F0 = _symmetric(64)
    for decay in (0.4, 1.0):
        F = poison_(torch.empty(64, 64)) if decay == 1.0 else F0.clone()
        fop_kernels.accumulate_factor(F, X, decay, scale=1e-4, backend="cpp")
        expected = ref.accumulate_factor(F0.double(), rows, decay, 1e-4)
        assert_close(F, expected, *_tol(X.dtype), what=f"chunked {X.dtype} {tuple(X.shape)} decay {decay}")


@pytest.mark.parametrize("backend", _backends("accumulate_factor_diag"))
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("N,d", DENSE_SHAPES)
def test_accumulate_factor_diag_matches_fp64(backend, dtype, N, d):
    X = torch.randn(N, d).to(dtype)
    f0 = torch.rand(d)
    f = f0.clone()
    assert fop_kernels.accumulate_factor_diag(f, X, 0.1, scale=1.0 / N, backend=backend) is f
    expected = ref.accumulate_factor_diag(f0.double(), X.double(), 0.1, 1.0 / N)
    assert_close(f, expected, *_tol(dtype), what=f"diag[{backend}] {dtype} {N}x{d}")
    poisoned = poison_(torch.empty(d))
    fop_kernels.accumulate_factor_diag(poisoned, X, 1.0, scale=1.0 / N, backend=backend)
    assert_close(poisoned, X.double().square().mean(0), *_tol(dtype), what=f"diag decay=1 [{backend}]")


@pytest.mark.parametrize("backend", _backends("accumulate_factor_diag"))
def test_accumulate_factor_diag_noncontiguous(backend):
    X = torch.randn(40, 90)[::2, ::3]
    fbig = torch.rand(60)
    f = fbig[::2]
    f0 = f.clone()
    fop_kernels.accumulate_factor_diag(f, X, 0.5, backend=backend)
    assert_close(f, ref.accumulate_factor_diag(f0.double(), X.double(), 0.5), *TOLERANCES[torch.float32],
                 what=f"strided diag [{backend}]")


# ---- conv --------------------------------------------------------------------------------------------------------

# (N, C, H, W, kernel_size, stride, padding, dilation, bias)
CONV_CASES = [
    (2, 3, 6, 6, 1, 1, 0, 1, False),
    (2, 3, 7, 6, 3, 1, 1, 1, True),
    (3, 2, 9, 8, (2, 3), (2, 1), (1, 0), (1, 2), False),
    (1, 4, 10, 7, 3, 2, 0, 2, True),
    (2, 5, 5, 9, (3, 1), 1, (0, 2), 1, True),
    (1, 1, 1, 1, 1, 1, 0, 1, True),
    (2, 16, 6, 6, 3, 1, 1, 1, True),
    # taps that read only padding (zero patch columns, skipped by the patch method): a 1x1 map (8 of 9), a strided
    # 2x2 map (5 of 9), one image row (6 of 9), a dilation that leaves only the centre tap
    (2, 4, 1, 1, 3, 1, 1, 1, True),
    (3, 3, 2, 2, 3, 2, 1, 1, False),
    (2, 3, 1, 3, 3, 1, 1, 1, True),
    (2, 2, 3, 3, 3, 1, 2, 3, False),
]
CONV_IDS = [f"N{c[0]}C{c[1]}H{c[2]}W{c[3]}-k{c[4]}-s{c[5]}-p{c[6]}-d{c[7]}-b{int(c[8])}" for c in CONV_CASES]


def _conv_dim(C, k, bias):
    kh, kw = (k, k) if isinstance(k, int) else k
    return C * kh * kw + int(bias)


def test_conv_patches_match_conv2d_weight_order():
    """The spec's patch columns follow Conv2d's flattened weight: P W^T (+ bias) reproduces conv2d."""
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    conv = torch.nn.Conv2d(3, 4, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)).double()
    P = conv_patches(x, (2, 3), (2, 1), (1, 0), (1, 2), bias=True)
    W = torch.cat([conv.weight.flatten(1), conv.bias[:, None]], 1)
    y = conv(x)
    assert_close(P @ W.T, y.permute(0, 2, 3, 1).reshape(-1, 4), 1e-12, 1e-12, what="patches vs conv2d")


@pytest.mark.parametrize("backend", _backends("accumulate_conv_factor"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_accumulate_conv_factor_matches_materialized_patches(backend, dtype, case):
    N, C, H, W, k, s, p, dl, bias = case
    x = torch.randn(N, C, H, W).to(dtype)
    D = _conv_dim(C, k, bias)
    F0 = _symmetric(D)
    F = F0.clone()
    fop_kernels.accumulate_conv_factor(F, x, 0.25, k, s, p, dl, bias, scale=1.0 / N, backend=backend)
    P = conv_patches(x.double(), k, s, p, dl, bias)
    L = P.shape[0] // N
    expected = 0.75 * F0.double() + 0.25 / (N * L) * P.T @ P
    assert_close(F, expected, *_tol(dtype), what=f"conv factor [{backend}] {dtype} {case}")
    poisoned = poison_(torch.empty(D, D))
    fop_kernels.accumulate_conv_factor(poisoned, x, 1.0, k, s, p, dl, bias, scale=1.0 / N, backend=backend)
    assert_close(poisoned, P.T @ P / (N * L), *_tol(dtype), what=f"conv factor decay=1 [{backend}]")


@pytest.mark.parametrize("backend", _backends("accumulate_conv_factor_diag"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_accumulate_conv_factor_diag_matches_materialized_patches(backend, dtype, case):
    N, C, H, W, k, s, p, dl, bias = case
    x = torch.randn(N, C, H, W).to(dtype)
    D = _conv_dim(C, k, bias)
    f0 = torch.rand(D)
    f = f0.clone()
    fop_kernels.accumulate_conv_factor_diag(f, x, 0.25, k, s, p, dl, bias, scale=1.0 / N, backend=backend)
    P = conv_patches(x.double(), k, s, p, dl, bias)
    expected = 0.75 * f0.double() + 0.25 * P.square().mean(0)
    assert_close(f, expected, *_tol(dtype), what=f"conv diag [{backend}] {dtype} {case}")
    poisoned = poison_(torch.empty(D))
    fop_kernels.accumulate_conv_factor_diag(poisoned, x, 1.0, k, s, p, dl, bias, scale=1.0 / N, backend=backend)
    assert_close(poisoned, P.square().mean(0), *_tol(dtype), what=f"conv diag decay=1 [{backend}]")


@pytest.mark.parametrize("op", ["accumulate_conv_factor", "accumulate_conv_factor_diag"])
@pytest.mark.parametrize("backend", _backends("accumulate_conv_factor"))
def test_conv_channels_last_input(op, backend):
    x = torch.randn(2, 4, 6, 5).to(memory_format=torch.channels_last)
    D = 4 * 9 + 1
    state = _symmetric(D) if op == "accumulate_conv_factor" else torch.rand(D)
    expected = getattr(ref, op)(state.double(), x.double().contiguous(), 0.5, 3, 1, 1, 1, True, 0.5)
    getattr(fop_kernels, op)(state, x, 0.5, 3, 1, 1, 1, True, 0.5, backend=backend)
    assert_close(state, expected, *TOLERANCES[torch.float32], what=f"{op} channels_last [{backend}]")


# ---- the two C++ conv-factor methods, each forced --------------------------------------------------------------

CPP_METHODS = {1: "patches", 2: "correlation"}


def _cpp_conv_factor(F, x, decay, scale, geom, method):
    """The raw C++ op with its method forced (the public op picks one by a flop count)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), bias = geom
    L = conv_output_size(x.shape[2], kh, sh, ph, dh) * conv_output_size(x.shape[3], kw, sw, pw, dw)
    torch.ops.fop_kernels.accumulate_conv_factor_(F, x, decay, decay * scale / L, [kh, kw], [sh, sw], [ph, pw],
                                                  [dh, dw], bias, method)


def _geom(k, s, p, dl, bias):
    pair = [(v, v) if isinstance(v, int) else tuple(v) for v in (k, s, p, dl)]
    return (*pair, bias)


METHOD_CASES = [(m, c) for m in CPP_METHODS
                for c in CONV_CASES + [(3, 6, 12, 11, 3, 1, 1, 1, True), (2, 3, 9, 9, 5, 1, 2, 1, False)]
                if m == 1 or c[5] == 1]  # correlation: stride 1 only (others rejected: test_correlation_needs_stride_1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method,case", METHOD_CASES, ids=[f"{CPP_METHODS[m]}-{c}" for m, c in METHOD_CASES])
def test_cpp_conv_factor_methods_match_materialized_patches(method, dtype, case):
    if "cpp" not in _backends("accumulate_conv_factor"):
        pytest.skip("the C++ extension is not loaded")
    N, C, H, W, k, s, p, dl, bias = case
    geom = _geom(k, s, p, dl, bias)
    x = torch.randn(N, C, H, W).to(dtype)
    D = _conv_dim(C, k, bias)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    F0 = _symmetric(D, state_dtype)
    F = F0.clone()
    _cpp_conv_factor(F, x, 0.25, 1.0 / N, geom, method)
    P = conv_patches(x.double(), k, s, p, dl, bias)
    L = P.shape[0] // N
    tol = TOLERANCES[torch.float64] if dtype == torch.float64 else _tol(dtype)
    assert_close(F, 0.75 * F0.double() + 0.25 / (N * L) * P.T @ P, *tol, what=f"{CPP_METHODS[method]} {case}")
    poisoned = poison_(torch.empty(D, D, dtype=state_dtype))
    _cpp_conv_factor(poisoned, x, 1.0, 1.0 / N, geom, method)
    assert_close(poisoned, P.T @ P / (N * L), *tol, what=f"{CPP_METHODS[method]} decay=1 {case}")


@pytest.mark.parametrize("method", CPP_METHODS)
def test_cpp_conv_factor_in_sample_chunks(method):
    """Batches larger than one chunk (about 16 MiB of patches or padded image per chunk: here 2 to 3 chunks) sum
    to the factor of the whole batch, bias row and column included."""
    if "cpp" not in _backends("accumulate_conv_factor"):
        pytest.skip("the C++ extension is not loaded")
    x = torch.randn(300, 4, 30, 30)
    geom = _geom(3, 1, 1, 1, True)
    P = conv_patches(x.double(), 3, 1, 1, 1, True)
    L = P.shape[0] // 300
    F0 = _symmetric(37)
    F = F0.clone()
    _cpp_conv_factor(F, x, 0.25, 1.0 / 300, geom, method)
    # float32 sums over 300 x 900 = 270,000 rows: a rounding error of about sqrt(rows) eps32 |F| (3e-5 at |F| ~ 1),
    # which one thread's summation order reached against the float64 reference (1.2e-5 on an entry of 0.04)
    expected = 0.75 * F0.double() + 0.25 / (300 * L) * P.T @ P
    atol = 4 * (300 * L) ** 0.5 * torch.finfo(torch.float32).eps * float(expected.abs().max())
    assert_close(F, expected, atol, TOLERANCES[torch.float32][1], what=f"{CPP_METHODS[method]} in chunks")


def test_correlation_needs_stride_1():
    if "cpp" not in _backends("accumulate_conv_factor"):
        pytest.skip("the C++ extension is not loaded")
    F = _symmetric(2 * 9)
    before = F.clone()
    with pytest.raises(RuntimeError, match="correlation method needs stride 1"):
        _cpp_conv_factor(F, torch.randn(2, 2, 6, 6), 0.5, 1.0, _geom(3, 2, 1, 1, False), 2)
    assert torch.equal(F, before)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 3), C=st.integers(1, 5), H=st.integers(1, 9), W=st.integers(1, 9),
       kh=st.integers(1, 4), kw=st.integers(1, 4), ph=st.integers(0, 3), pw=st.integers(0, 3),
       dh=st.integers(1, 3), dw=st.integers(1, 3), bias=st.booleans())
def test_hypothesis_conv_correlation_method(N, C, H, W, kh, kw, ph, pw, dh, dw, bias):
    """Stride-1 geometry of every kind (padding wider than the kernel, dilation, kernels wider than the image)."""
    if "cpp" not in _backends("accumulate_conv_factor"):
        pytest.skip("the C++ extension is not loaded")
    if H + 2 * ph < dh * (kh - 1) + 1 or W + 2 * pw < dw * (kw - 1) + 1:
        return  # the kernel does not fit (rejected by the op, tested in test_bad_conv_geometry)
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    geom = ((kh, kw), (1, 1), (ph, pw), (dh, dw), bias)
    D = C * kh * kw + int(bias)
    F0 = _symmetric(D, torch.float64)
    expected = ref.accumulate_conv_factor(F0.clone(), x, 0.5, *geom, 1.0)
    for method in CPP_METHODS:
        F = F0.clone()
        _cpp_conv_factor(F, x, 0.5, 1.0, geom, method)
        assert_close(F, expected, *TOLERANCES[torch.float64], what=f"{CPP_METHODS[method]} {x.shape} {geom}")


# ---- property-based over shapes, every backend -------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(N=st.integers(1, 24), d=st.integers(1, 40), decay=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
       dtype=st.sampled_from(INPUT_DTYPES))
def test_hypothesis_dense_and_diag(N, d, decay, dtype):
    X = torch.randn(N, d).to(dtype)
    F0, f0 = _symmetric(d), torch.rand(d)
    F_exp = ref.accumulate_factor(F0.double(), X.double(), decay, 0.5)
    f_exp = ref.accumulate_factor_diag(f0.double(), X.double(), decay, 0.5)
    for backend in _backends("accumulate_factor"):
        F, f = F0.clone(), f0.clone()
        fop_kernels.accumulate_factor(F, X, decay, 0.5, backend=backend)
        fop_kernels.accumulate_factor_diag(f, X, decay, 0.5, backend=backend)
        assert_close(F, F_exp, *_tol(dtype), what=f"hypothesis dense [{backend}] N={N} d={d}")
        assert_close(f, f_exp, *_tol(dtype), what=f"hypothesis diag [{backend}] N={N} d={d}")


@settings(max_examples=10, deadline=None)
@given(N=st.integers(1, 3), C=st.integers(1, 4), H=st.integers(1, 8), W=st.integers(1, 8),
       kh=st.integers(1, 3), kw=st.integers(1, 3), sh=st.integers(1, 2), sw=st.integers(1, 2),
       ph=st.integers(0, 1), pw=st.integers(0, 1), dh=st.integers(1, 2), dw=st.integers(1, 2), bias=st.booleans())
def test_hypothesis_conv(N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, bias):
    if H + 2 * ph < dh * (kh - 1) + 1 or W + 2 * pw < dw * (kw - 1) + 1:
        return  # the kernel does not fit (rejected by the op, tested in test_bad_conv_geometry)
    x = torch.randn(N, C, H, W)
    geom = ((kh, kw), (sh, sw), (ph, pw), (dh, dw), bias)
    D = C * kh * kw + int(bias)
    F0, f0 = _symmetric(D), torch.rand(D)
    F_exp = ref.accumulate_conv_factor(F0.double(), x.double(), 0.5, *geom, 1.0)
    f_exp = ref.accumulate_conv_factor_diag(f0.double(), x.double(), 0.5, *geom, 1.0)
    for backend in _backends("accumulate_conv_factor"):
        F, f = F0.clone(), f0.clone()
        fop_kernels.accumulate_conv_factor(F, x, 0.5, *geom, 1.0, backend=backend)
        fop_kernels.accumulate_conv_factor_diag(f, x, 0.5, *geom, 1.0, backend=backend)
        assert_close(F, F_exp, *TOLERANCES[torch.float32], what=f"hypothesis conv [{backend}] {x.shape} {geom}")
        assert_close(f, f_exp, *TOLERANCES[torch.float32], what=f"hypothesis conv diag [{backend}] {geom}")


# ---- routing, opcheck --------------------------------------------------------------------------------------------


def test_cpu_default_is_the_cpp_backend_when_built():
    want = "cpp" if fop_kernels.available_backends()["cpp"]["available"] else "reference"
    for op in ("accumulate_factor", "accumulate_factor_diag", "accumulate_conv_factor", "accumulate_conv_factor_diag"):
        assert fop_kernels.resolve(op, "cpu")[0] == want


def test_opcheck_triton_ops():
    if "triton" not in _backends("accumulate_factor"):
        pytest.skip("triton is not usable here")
    import fop_kernels.triton.factor  # noqa: F401 - registers the custom ops

    ops = torch.ops.fop_kernels
    X, F, f = torch.randn(9, 6), _symmetric(6), torch.rand(6)
    x, Fc, fc = torch.randn(2, 2, 5, 4), _symmetric(2 * 9 + 1), torch.rand(2 * 9 + 1)
    geom = ([3, 3], [1, 1], [1, 1], [1, 1], True)
    torch.library.opcheck(ops.triton_accumulate_factor.default, (F, X, 0.3, 0.1))
    torch.library.opcheck(ops.triton_accumulate_factor_diag.default, (f, X, 0.3, 0.1))
    torch.library.opcheck(ops.triton_accumulate_conv_factor.default, (Fc, x, 0.3, 0.1, *geom))
    torch.library.opcheck(ops.triton_accumulate_conv_factor_diag.default, (fc, x, 0.3, 0.1, *geom))


def test_opcheck_cpp_ops():
    if "cpp" not in _backends("accumulate_factor"):
        pytest.skip("the C++ extension is not loaded")
    ops = torch.ops.fop_kernels
    X, F, f = torch.randn(9, 300), _symmetric(300), torch.rand(300)
    x, Fc, fc = torch.randn(2, 2, 5, 4), _symmetric(2 * 9 + 1), torch.rand(2 * 9 + 1)
    geom = ([3, 3], [1, 1], [1, 1], [1, 1], True)
    torch.library.opcheck(ops.accumulate_factor_.default, (F, [X, X[:4]], 0.3, 0.1))
    torch.library.opcheck(ops.accumulate_factor_diag_.default, (f, X, 0.3, 0.1))
    torch.library.opcheck(ops.accumulate_conv_factor_.default, (Fc, x, 0.3, 0.1, *geom))
    torch.library.opcheck(ops.accumulate_conv_factor_diag_.default, (fc, x, 0.3, 0.1, *geom))


# ---- bad input: a clear error naming the argument, state untouched ------------------------------------------------


def _expect_error(exc, match, fn, state):
    before = state.clone()
    with pytest.raises(exc, match=match):
        fn()
    assert torch.equal(state, before), "state changed on error"


@pytest.mark.parametrize("backend", _backends("accumulate_factor"))
def test_bad_input_dense(backend):
    X, F, f = torch.randn(5, 4), _symmetric(4), torch.rand(4)
    acc, diag = fop_kernels.accumulate_factor, fop_kernels.accumulate_factor_diag
    kw = {"backend": backend}
    _expect_error(ValueError, "decay", lambda: acc(F, X, -0.1, **kw), F)
    _expect_error(ValueError, "decay", lambda: acc(F, X, 1.5, **kw), F)
    _expect_error(ValueError, "decay", lambda: diag(f, X, 2.0, **kw), f)
    _expect_error(ValueError, "scale", lambda: acc(F, X, 0.1, float("inf"), **kw), F)
    _expect_error(ValueError, r"F has shape \(4, 4\), expected \(3, 3\)", lambda: acc(F, X[:, :3], 0.1, **kw), F)
    _expect_error(ValueError, "f has shape", lambda: diag(f, X[:, :3], 0.1, **kw), f)
    _expect_error(ValueError, "X must have rows", lambda: acc(F, X[0], 0.1, **kw), F)
    _expect_error(ValueError, "non-empty list", lambda: acc(F, [], 0.1, **kw), F)
    _expect_error(ValueError, r"F has shape \(4, 4\), expected \(3, 3\)", lambda: acc(F, [X, X[:, :3]], 0.1, **kw), F)
    _expect_error(TypeError, "X has unsupported dtype", lambda: acc(F, X.int(), 0.1, **kw), F)
    _expect_error(TypeError, "F has unsupported dtype", lambda: acc(F.half(), X, 0.1, **kw), F)
    _expect_error(TypeError, "X must be a torch.Tensor", lambda: acc(F, X.numpy(), 0.1, **kw), F)
    _expect_error(ValueError, "X is on meta", lambda: acc(F, X.to("meta"), 0.1, **kw), F)
    bad = X.clone()
    bad[2, 1] = float("nan")
    _expect_error(ValueError, "X contains non-finite", lambda: acc(F, bad, 0.1, **kw), F)
    _expect_error(ValueError, "X contains non-finite", lambda: acc(F, [X, bad], 0.1, **kw), F)
    bad[2, 1] = float("inf")
    _expect_error(ValueError, "X contains non-finite", lambda: diag(f, bad, 0.1, **kw), f)


def test_check_finite_false_skips_the_check():
    """The optimizer's opt-out: no sync, and a NaN in X then propagates (it is the caller's job to check)."""
    X, F = torch.randn(5, 4), _symmetric(4)
    X[0, 0] = float("nan")
    fop_kernels.accumulate_factor(F, X, 0.1, check_finite=False)
    assert F.isnan().any()


@pytest.mark.parametrize("op", ["accumulate_conv_factor", "accumulate_conv_factor_diag"])
def test_bad_conv_geometry(op):
    x = torch.randn(2, 3, 5, 5)
    state = _symmetric(28) if op == "accumulate_conv_factor" else torch.rand(28)
    fn = getattr(fop_kernels, op)
    _expect_error(ValueError, "x must be 4-D", lambda: fn(state, x[0], 0.1, 3, bias=True), state)
    _expect_error(ValueError, "does not fit", lambda: fn(state, x, 0.1, 3, dilation=3, bias=True), state)
    _expect_error(ValueError, "invalid conv geometry", lambda: fn(state, x, 0.1, 3, stride=0, bias=True), state)
    _expect_error(ValueError, "kernel_size must be an int or a pair", lambda: fn(state, x, 0.1, (3, 3, 3)), state)
    name = "F" if op == "accumulate_conv_factor" else "f"
    _expect_error(ValueError, f"{name} has shape", lambda: fn(state, x, 0.1, 3, bias=False), state)
    bad = x.clone()
    bad[1, 2, 3, 4] = float("nan")
    _expect_error(ValueError, "x contains non-finite", lambda: fn(state, bad, 0.1, 3, padding=1, bias=True), state)


def test_unfold_reference_agrees_with_explicit_loop():
    """An independent oracle for one geometry: patches built by explicit indexing."""
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    k, s, p, dl = (2, 2), (2, 1), (1, 1), (1, 2)
    xp = F_nn.pad(x, (p[1], p[1], p[0], p[0]))
    oh = (5 + 2 * p[0] - dl[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (4 + 2 * p[1] - dl[1] * (k[1] - 1) - 1) // s[1] + 1
    rows = []
    for i in range(oh):
        for j in range(ow):
            rows.append(torch.stack([xp[0, c, i * s[0] + a * dl[0], j * s[1] + b * dl[1]]
                                     for c in range(2) for a in range(k[0]) for b in range(k[1])]))
    assert_close(conv_patches(x, k, s, p, dl), torch.stack(rows), 0, 0, what="unfold vs loop")
