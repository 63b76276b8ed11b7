"""The native build: the CUDA source compiles with nvcc alone, the CMake build passes its C++ test, and a built
CUDA wheel (from `make wheel-cuda`) links cuSOLVER and registers CUDA kernels.

The CUDA checks need headers this machine only has inside the CUDA build venv (`make wheel-cuda` creates
.venv-cuda: torch 2.14.1+cu130 and its nvidia-cusolver wheel); they are skipped, with the reason, without it.
Set FOP_KERNELS_CUDA_VENV to use another venv with a CUDA torch.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_VENV = os.environ.get("FOP_KERNELS_CUDA_VENV", os.path.join(ROOT, ".venv-cuda"))


def _cuda_venv_paths():
    """(python, torch include dir, nvidia include dir) of the CUDA build venv, or a skip naming what is missing."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    python = os.path.join(CUDA_VENV, "bin", "python")
    site = glob.glob(os.path.join(CUDA_VENV, "lib", "python3*", "site-packages"))
    torch_inc = [os.path.join(s, "torch", "include") for s in site]
    torch_inc = [d for d in torch_inc if os.path.exists(os.path.join(d, "c10", "cuda", "impl", "cuda_cmake_macros.h"))]
    nv_inc = [d for s in site for d in glob.glob(os.path.join(s, "nvidia", "cu1*", "include"))
              if os.path.exists(os.path.join(d, "cusolverDn.h"))]
    if not (os.path.exists(python) and torch_inc and nv_inc):
        pytest.skip(f"no CUDA torch with cuSOLVER headers in {CUDA_VENV} (run `make wheel-cuda` to create it)")
    return python, torch_inc[0], nv_inc[0]


def test_cuda_source_compiles_with_nvcc(tmp_path):
    """csrc/cuda/*.cu compile for sm_90 against the CUDA torch's headers and cuSOLVER (no GPU needed)."""
    _, torch_inc, nv_inc = _cuda_venv_paths()
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    assert sources, "no CUDA sources in csrc/cuda"
    for src in sources:
        cmd = ["nvcc", "-std=c++20", "-c", src, "-o", str(tmp_path / "out.o"), "-I", torch_inc,
               "-I", os.path.join(torch_inc, "torch", "csrc", "api", "include"), "-I", nv_inc,
               "-gencode=arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC", "-DFOP_KERNELS_WITH_CUDA=1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"nvcc failed on {src}:\n{proc.stderr[-4000:]}"
        assert (tmp_path / "out.o").stat().st_size > 0


def test_cuda_wheel_links_cusolver_and_registers_cuda_kernels(tmp_path):
    """The +cu wheel that `make wheel-cuda` left in dist/: NEEDED entries and the dispatcher's CUDA kernels."""
    python, _, _ = _cuda_venv_paths()
    wheels = sorted(glob.glob(os.path.join(ROOT, "dist", "fop_kernels-*+cu*-*.whl")), key=os.path.getmtime)
    if not wheels:
        pytest.skip("no CUDA wheel in dist/ (run `make wheel-cuda`)")
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extractall(tmp_path)
    (so,) = glob.glob(str(tmp_path / "fop_kernels" / "_C*.so"))
    if shutil.which("readelf"):
        needed = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
        for lib in ("libc10_cuda.so", "libtorch_cpu.so", "libcusolver.so", "libcudart.so"):
            assert lib in needed, f"{so} does not link {lib}:\n{needed}"
    code = (f"import torch; torch.ops.load_library({so!r}); "
            "print(torch._C._dispatch_dump('fop_kernels::eigh')); "
            "print(torch._C._dispatch_dump('fop_kernels::damped_inverse'))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.count("CUDA: registered") == 2 and out.count("CPU: registered") == 2, out


@pytest.mark.slow
def test_cmake_build_and_ctest():
    """`make cmake-test`: find_package(Torch) build of the module and the C++ test (1-3 minutes: slow)."""
    if shutil.which("cmake") is None or shutil.which("make") is None:
        pytest.skip("cmake or make not on PATH")
    proc = subprocess.run(["make", "cmake-test", f"VPY={sys.executable}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "100% tests passed" in proc.stdout
