"""Builds fop_kernels._C: the C++ sources always, the CUDA sources when torch has CUDA and nvcc is found.

Environment:
  FOP_KERNELS_FORCE_CPU=1          build the C++ sources only
  FOP_KERNELS_CUDA_ARCH_LIST       compute capabilities, default "8.0;9.0" (PTX added for the newest)
  FOP_KERNELS_BUILD_BASE           the build directory (default build/); wheels for other targets use their own
  FOP_KERNELS_LOCAL_VERSION        override the wheel's local version tag (default: +cpu or +cu<XY>)
  CUDA_HOME                        the CUDA toolkit whose nvcc compiles csrc/cuda (default: nvcc on PATH)
  FOP_KERNELS_CUSOLVER_ROOT        a directory with include/cusolverDn.h and lib/libcusolver.so* (default: the
                                   toolkit, else the nvidia-cusolver wheel beside torch: site-packages/nvidia/cu13)
"""

import glob
import os
import shutil

from setuptools import find_packages, setup
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
    if nvcc is None:
        return None
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    # a copied/wrapped nvcc (e.g. /usr/local/bin/nvcc) sits outside its toolkit: prefer the toolkit with cudart
    for candidate in (home, "/usr/local/cuda"):
        if glob.glob(os.path.join(candidate, "lib*", "libcudart.so*")):
            return candidate
    return home


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


def _cusolver_roots():
    """Directories with include/cusolverDn.h: an explicit root, the toolkit, the nvidia wheels beside torch."""
    import importlib.util

    roots = [os.environ.get("FOP_KERNELS_CUSOLVER_ROOT", ""), _cuda_home() or ""]
    spec = importlib.util.find_spec("nvidia")
    for base in list(spec.submodule_search_locations) if spec else []:
        roots += [os.path.join(base, sub) for sub in ("cu13", "cu12", "cusolver", "cublas")]
    return [r for r in roots if r and os.path.exists(os.path.join(r, "include", "cusolverDn.h"))]


def _cusolver_build_args():
    """(include dirs, library dirs, link args) for cuSOLVER. The nvidia wheels ship only versioned libraries
    (libcusolver.so.12), so link that file by name; at run time it is found through torch (which loads it) or an
    rpath relative to the installed extension (site-packages/fop_kernels/ -> site-packages/nvidia/<sub>/lib)."""
    roots = _cusolver_roots()
    if not roots:
        raise RuntimeError(
            "cuSOLVER headers not found: set FOP_KERNELS_CUSOLVER_ROOT, or install the CUDA torch whose "
            "nvidia-cusolver wheel provides site-packages/nvidia/cu13/include, or FOP_KERNELS_FORCE_CPU=1"
        )
    incs = [os.path.join(r, "include") for r in roots]
    for root in roots:
        for libdir in (os.path.join(root, "lib"), os.path.join(root, "lib64")):
            names = sorted(glob.glob(os.path.join(libdir, "libcusolver.so*")))
            if not names:
                continue
            versioned = [os.path.basename(n) for n in names if os.path.basename(n) != "libcusolver.so"]
            link = [f"-l:{versioned[0]}"] if versioned else ["-lcusolver"]
            rpath = [f"-Wl,-rpath,$ORIGIN/../nvidia/{os.path.basename(root)}/lib"] if "nvidia" in root else []
            return incs, [libdir], link + rpath
    raise RuntimeError(f"libcusolver.so* not found under {roots}")


def _extension():
    cxx = ["-O3", "-std=c++20", "-fopenmp"]  # torch >= 2.14 headers require C++20
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if _want_cuda():
        os.environ.setdefault("CUDA_HOME", _cuda_home())
        incs, lib_dirs, link = _cusolver_build_args()
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        return cpp_extension.CUDAExtension(
            "fop_kernels._C",
            sources,
            include_dirs=incs,
            library_dirs=lib_dirs,
            define_macros=[("FOP_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", *_gencode_flags()]},
            extra_link_args=["-fopenmp", *link],
        ), "cu" + __import__("torch").version.cuda.replace(".", "")
    return cpp_extension.CppExtension(
        "fop_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
    ), "cpu"


ext, target = _extension()
local = os.environ.get("FOP_KERNELS_LOCAL_VERSION", target)

setup(
    version=f"{_base_version()}+{local}" if local else _base_version(),
    packages=find_packages(include=["fop_kernels", "fop_kernels.*"])
    + find_packages("python", include=["fop", "fop.*", "fop_train", "fop_train.*"]),
    ext_modules=[ext],
    # one build per command line: `setup.py build --build-base X bdist_wheel` would compile twice, because
    # BuildExtension appends its flags to the extension on every run and ninja then sees new commands
    options={"build": {"build_base": os.environ.get("FOP_KERNELS_BUILD_BASE", "build")}},
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
