"""Builds fop_kernels._C: the C++ sources always, the CUDA sources when torch has CUDA and nvcc is found.

Environment:
  FOP_KERNELS_FORCE_CPU=1          build the C++ sources only
  FOP_KERNELS_CUDA_ARCH_LIST       compute capabilities, default "8.0;9.0" (PTX added for the newest)
  FOP_KERNELS_LOCAL_VERSION        override the wheel's local version tag (default: +cpu or +cu<XY>)
"""

import glob
import os
import shutil

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _base_version():
    scope = {}
    with open(os.path.join(ROOT, "fop_kernels", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _want_cuda():
    import torch

    if os.environ.get("FOP_KERNELS_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and _cuda_home() is not None


def _gencode_flags():
    archs = os.environ.get("FOP_KERNELS_CUDA_ARCH_LIST", "8.0;9.0").replace(",", ";").split(";")
    archs = [a.strip().replace(".", "") for a in archs if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def _cusolver_dirs():
    """Headers and library dirs of the nvidia-cusolver/cublas wheels that come with a CUDA torch."""
    import importlib.util

    incs, libs = [], []
    spec = importlib.util.find_spec("nvidia")
    for base in list(spec.submodule_search_locations) if spec else []:
        for sub in ("cu13", "cu12", "cusolver", "cublas", "cusparse", "nvjitlink"):
            if os.path.isdir(os.path.join(base, sub, "include")):
                incs.append(os.path.join(base, sub, "include"))
            if os.path.isdir(os.path.join(base, sub, "lib")):
                libs.append(os.path.join(base, sub, "lib"))
    return incs, libs


def _cusolver_link_args(lib_dirs):
    for d in lib_dirs:
        for name in sorted(glob.glob(os.path.join(d, "libcusolver.so*"))):
            base = os.path.basename(name)
            if base != "libcusolver.so":
                return [f"-l:{base}", f"-Wl,-rpath,{d}"]
        if os.path.exists(os.path.join(d, "libcusolver.so")):
            return ["-lcusolver", f"-Wl,-rpath,{d}"]
    return ["-lcusolver"]


def _extension():
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if _want_cuda():
        os.environ.setdefault("CUDA_HOME", _cuda_home())
        incs, lib_dirs = _cusolver_dirs()
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        return cpp_extension.CUDAExtension(
            "fop_kernels._C",
            sources,
            include_dirs=incs,
            library_dirs=lib_dirs,
            define_macros=[("FOP_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", *_gencode_flags()]},
            extra_link_args=["-fopenmp", *_cusolver_link_args(lib_dirs)],
        ), "cu" + __import__("torch").version.cuda.replace(".", "")
    return cpp_extension.CppExtension(
        "fop_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
    ), "cpu"


ext, target = _extension()
local = os.environ.get("FOP_KERNELS_LOCAL_VERSION", target)

setup(
    version=f"{_base_version()}+{local}" if local else _base_version(),
    packages=["fop_kernels", "fop_kernels.reference", "fop_kernels.triton", "fop"],
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
