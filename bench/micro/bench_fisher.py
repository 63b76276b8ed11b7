"""FOP's Fisher inner products and projection-and-combine on CPU, on the layer set of a ResNet-18: the reference,
plain torch and the fused C++ backend, side by side in one run.

Run: `make bench` (all microbenchmarks), or one file:
    .venv/bin/python -m pytest bench/micro/bench_fisher.py --benchmark-only -s
Layers: the 21 preconditioned weights of torchvision's ResNet-18 (ImageNet head), flattened to out x (in*kh*kw):
conv1 64x147, 4 x 64x576, 128x576, 3 x 128x1152, 128x64 (downsample), ..., 3 x 512x4608, 512x256, fc 1000x512;
11.7 M elements per tensor. Each group is one op and one (dtype, damping mode). Plain-torch alternatives: for the
sums, S1 and S2 as the bilinear forms lG^T (A~ * A~) lA and lG^T (A~ * D~) lA (no f = lG lA^T formed) and the
three weighted sums against 1/w computed once; for the combine, U~ = (c1 A~ + c2 D~) / w with c1 = eta (1 - beta s),
c2 = eta beta (one fused multiply-add instead of four passes). Triton is not timed here (on CPU it runs under the
interpreter): see `make gpu-check`.
"""

from __future__ import annotations

import pytest
import torch
from _timing import pick, short, timed

import fop_kernels
from fop_kernels import reference as ref

pytest.importorskip("pytest_benchmark")

DAMPING = 1e-3


def resnet18_weight_shapes(num_classes: int = 1000) -> list[tuple[int, int]]:
    """(out, in*kh*kw) of every Conv2d and Linear weight of torchvision's resnet18."""
    shapes = [(64, 3 * 7 * 7)] + [(64, 64 * 9)] * 4
    for c_in, c_out in ((64, 128), (128, 256), (256, 512)):
        shapes += [(c_out, c_in * 9), (c_out, c_out * 9), (c_out, c_in), (c_out, c_out * 9), (c_out, c_out * 9)]
    return shapes + [(num_classes, 512)]


SHAPES = pick(resnet18_weight_shapes(), [(8, 27), (16, 72), (10, 16)])
LAYERS = pick("resnet18 (21 weights, 11.7M elements)", "3 tiny layers")


def _layers(dtype):
    gen = torch.Generator().manual_seed(0)
    A = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    D = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    lG = [torch.rand(s[0], generator=gen) for s in SHAPES]
    lA = [torch.rand(s[1], generator=gen) for s in SHAPES]
    return A, D, lG, lA


def _have_cpp() -> bool:
    return fop_kernels.available_backends()["cpp"]["available"] and "cpp" in fop_kernels.implementations(
        "fisher_inner_products")


def torch_sums(A_rot, D_rot, lG, lA, damping, mode):
    """(L x 5) S1, S2, a, c, e0 with the bilinear forms for S1, S2 and 1/w formed once per layer."""
    rows = []
    for A, D, g, a in zip(A_rot, D_rot, lG, lA):
        A, D = A.float(), D.float()
        inv_w = ref.damping_weights(g, a, damping, mode, torch.float32).reciprocal_()
        AA, AD = A * A, A * D
        rows.append(torch.stack([g @ AA @ a, g @ AD @ a, torch.vdot(AA.view(-1), inv_w.view(-1)),
                                 torch.vdot(AD.view(-1), inv_w.view(-1)), torch.vdot((D * D).view(-1),
                                                                                     inv_w.view(-1))]))
    return torch.stack(rows)


def torch_combine(A_rot, D_rot, sums, lG, lA, damping, mode):
    """U~ = (c1 A~ + c2 D~) / w per layer, c1 = eta (1 - beta s), c2 = eta beta from combine_scalars."""
    scalars = ref.combine_scalars(sums.float())
    s, b, n = scalars.unbind(1)
    c1, c2 = n * (1 - b * s), n * b
    out = []
    for i, (A, D, g, a) in enumerate(zip(A_rot, D_rot, lG, lA)):
        w = ref.damping_weights(g, a, damping, mode, torch.float32)
        out.append(torch.addcmul(A.float() * c1[i], D.float(), c2[i]).div_(w).to(A.dtype))
    return out, scalars


CASES = [(torch.float32, "eigen"), (torch.float32, "factored"), (torch.bfloat16, "eigen")]
IDS = ["fp32-eigen", "fp32-factored", "bf16-eigen"]
ROWS = [("reference", "reference"), ("torch", "torch"), ("cpp", "fast")]


def _close(got, want, dtype) -> bool:
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    return all(torch.allclose(g.float(), w.float(), rtol=tol, atol=tol * float(w.float().abs().max()))
               for g, w in zip(got, want))


@pytest.mark.parametrize("impl,kind", ROWS, ids=[r[0] for r in ROWS])
@pytest.mark.parametrize("dtype,mode", CASES, ids=IDS)
def test_fisher_inner_products(benchmark, dtype, mode, impl, kind):
    if kind == "fast" and not _have_cpp():
        pytest.skip("the C++ extension is not loaded")
    A, D, lG, lA = _layers(dtype)
    fns = {
        "reference": lambda: ref.fisher_inner_products(A, D, lG, lA, DAMPING, mode),
        "torch": lambda: torch_sums(A, D, lG, lA, DAMPING, mode),
        "cpp": lambda: fop_kernels.fisher_inner_products(A, D, lG, lA, DAMPING, mode, backend="cpp"),
    }
    assert torch.allclose(fns[impl](), fns["reference"](), rtol=1e-3), f"{impl} differs from the reference"
    timed(benchmark, op="fisher_inner_products", shape=LAYERS, dtype=f"{short(dtype)} {mode}", impl=impl,
          kind=kind, fn=fns[impl], rounds=9, reference=fns["reference"])


@pytest.mark.parametrize("impl,kind", ROWS, ids=[r[0] for r in ROWS])
@pytest.mark.parametrize("dtype,mode", CASES, ids=IDS)
def test_project_combine(benchmark, dtype, mode, impl, kind):
    if kind == "fast" and not _have_cpp():
        pytest.skip("the C++ extension is not loaded")
    A, D, lG, lA = _layers(dtype)
    sums = ref.fisher_inner_products(A, D, lG, lA, DAMPING, mode)
    fns = {
        "reference": lambda: ref.project_combine(A, D, sums, lG, lA, DAMPING, mode),
        "torch": lambda: torch_combine(A, D, sums, lG, lA, DAMPING, mode),
        "cpp": lambda: fop_kernels.project_combine(A, D, sums, lG, lA, DAMPING, mode, backend="cpp"),
    }
    assert _close(fns[impl]()[0], fns["reference"]()[0], dtype), f"{impl} differs from the reference"
    timed(benchmark, op="project_combine", shape=LAYERS, dtype=f"{short(dtype)} {mode}", impl=impl, kind=kind,
          fn=fns[impl], rounds=9, reference=fns["reference"])


@pytest.mark.parametrize("impl,kind", ROWS, ids=[r[0] for r in ROWS])
def test_fop_eigenbasis_step(benchmark, impl, kind):
    """Both ops back to back, as one FOP step runs them (fp32, eigen damping)."""
    if kind == "fast" and not _have_cpp():
        pytest.skip("the C++ extension is not loaded")
    A, D, lG, lA = _layers(torch.float32)
    fns = {
        "reference": lambda: ref.project_combine(A, D, ref.fisher_inner_products(A, D, lG, lA, DAMPING), lG, lA,
                                                 DAMPING),
        "torch": lambda: torch_combine(A, D, torch_sums(A, D, lG, lA, DAMPING, "eigen"), lG, lA, DAMPING, "eigen"),
        "cpp": lambda: fop_kernels.project_combine(
            A, D, fop_kernels.fisher_inner_products(A, D, lG, lA, DAMPING, backend="cpp"), lG, lA, DAMPING,
            backend="cpp"),
    }
    timed(benchmark, op="FOP sums + combine", shape=LAYERS, dtype="fp32 eigen", impl=impl, kind=kind,
          fn=fns[impl], rounds=9, reference=fns["reference"])
