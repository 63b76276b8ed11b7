"""FOP's Fisher inner products and projection-and-combine on CPU: the torch reference against the fused C++
backend, side by side in one run, on the layer set of a ResNet-18.

Run: flock /tmp/fop_bench.lock .venv/bin/python -m pytest bench/bench_fisher.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds -s
Layers: the 21 preconditioned weights of torchvision's ResNet-18 (ImageNet head), flattened to out x (in*kh*kw):
conv1 64x147, 4 x 64x576, 128x576, 3 x 128x1152, 128x64 (downsample), ..., 3 x 512x4608, 512x256, fc 1000x512;
11.7 M elements per tensor. Each group is one op and one (dtype, damping mode); the cpp row prints its speed-up
over the reference (ratio of medians) and stores it in extra_info. Triton is not timed here: on CPU it runs
under the interpreter.
"""

from __future__ import annotations

import pytest
import torch

import fop_kernels
from fop_kernels import reference as ref

pytest.importorskip("pytest_benchmark")

DAMPING = 1e-3
_MEDIANS: dict[tuple[str, str], float] = {}


def resnet18_weight_shapes(num_classes: int = 1000) -> list[tuple[int, int]]:
    """(out, in*kh*kw) of every Conv2d and Linear weight of torchvision's resnet18."""
    shapes = [(64, 3 * 7 * 7)] + [(64, 64 * 9)] * 4
    for c_in, c_out in ((64, 128), (128, 256), (256, 512)):
        shapes += [(c_out, c_in * 9), (c_out, c_out * 9), (c_out, c_in), (c_out, c_out * 9), (c_out, c_out * 9)]
    return shapes + [(num_classes, 512)]


def _layers(dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = resnet18_weight_shapes()
    A = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    D = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    lG = [torch.rand(s[0], generator=gen) for s in shapes]
    lA = [torch.rand(s[1], generator=gen) for s in shapes]
    return A, D, lG, lA


def _have_cpp() -> bool:
    return fop_kernels.available_backends()["cpp"]["available"] and "cpp" in fop_kernels.implementations(
        "fisher_inner_products")


def _run(benchmark, group: str, impl: str, fn, rounds: int):
    benchmark.group = group
    benchmark.extra_info.update({"impl": impl, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "device": "cpu", "layers": "resnet18 (21 weights, 11.7M elements)"})
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    _MEDIANS[(group, impl)] = median
    base = _MEDIANS.get((group, "reference"))
    if impl != "reference" and base is not None:
        benchmark.extra_info["speedup_vs_reference"] = base / median
        print(f"\n[{group}] {impl}: {median * 1e3:.2f} ms, reference {base * 1e3:.2f} ms, "
              f"speed-up {base / median:.2f}x")


CASES = [(torch.float32, "eigen"), (torch.float32, "factored"), (torch.bfloat16, "eigen")]
IDS = ["fp32-eigen", "fp32-factored", "bf16-eigen"]


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("dtype,mode", CASES, ids=IDS)
def test_fisher_inner_products(benchmark, dtype, mode, impl):
    if impl == "cpp" and not _have_cpp():
        pytest.skip("the C++ extension is not loaded")
    A, D, lG, lA = _layers(dtype)
    fns = {
        "reference": lambda: ref.fisher_inner_products(A, D, lG, lA, DAMPING, mode),
        "cpp": lambda: fop_kernels.fisher_inner_products(A, D, lG, lA, DAMPING, mode, backend="cpp"),
    }
    _run(benchmark, f"fisher_inner_products resnet18 {dtype} {mode}", impl, fns[impl], rounds=9)


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("dtype,mode", CASES, ids=IDS)
def test_project_combine(benchmark, dtype, mode, impl):
    if impl == "cpp" and not _have_cpp():
        pytest.skip("the C++ extension is not loaded")
    A, D, lG, lA = _layers(dtype)
    sums = ref.fisher_inner_products(A, D, lG, lA, DAMPING, mode)
    fns = {
        "reference": lambda: ref.project_combine(A, D, sums, lG, lA, DAMPING, mode),
        "cpp": lambda: fop_kernels.project_combine(A, D, sums, lG, lA, DAMPING, mode, backend="cpp"),
    }
    _run(benchmark, f"project_combine resnet18 {dtype} {mode}", impl, fns[impl], rounds=9)


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_fop_eigenbasis_step(benchmark, impl):
    """Both ops back to back, as one FOP step runs them (fp32, eigen damping)."""
    if impl == "cpp" and not _have_cpp():
        pytest.skip("the C++ extension is not loaded")
    A, D, lG, lA = _layers(torch.float32)

    def step():
        if impl == "reference":
            return ref.project_combine(A, D, ref.fisher_inner_products(A, D, lG, lA, DAMPING), lG, lA, DAMPING)
        sums = fop_kernels.fisher_inner_products(A, D, lG, lA, DAMPING, backend="cpp")
        return fop_kernels.project_combine(A, D, sums, lG, lA, DAMPING, backend="cpp")

    _run(benchmark, "FOP eigenbasis step (sums + combine) resnet18 fp32 eigen", impl, step, rounds=9)
