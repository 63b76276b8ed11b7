"""One registry for every public op: a reference implementation plus fast ones per backend.

Backends, in order of preference:
  triton     fused Triton kernels; CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, and only when forced)
  cuda       the CUDA half of the native extension fop_kernels._C
  cpp        the C++ half of the native extension (CPU tensors)
  reference  pure torch (fop_kernels.reference): the specification, always available

`FOP_KERNELS_BACKEND=<name>` or a `backend=` argument forces one backend; forcing one that is not
available, or that has no implementation of the op for the tensors' device, raises
`BackendUnavailableError` naming what is missing.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("triton", "cuda", "cpp", "reference")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "cpp", "reference"), "cpu": ("cpp", "reference")}


class BackendUnavailableError(RuntimeError):
    """A forced backend is missing, or has no implementation of an op for the given device."""


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    devices: tuple[str, ...]


_REGISTRY: dict[str, dict[str, _Impl]] = {}


def register(op: str, backend: str, devices: tuple[str, ...] = ("cpu", "cuda")):
    """Decorator: register `fn` as the `backend` implementation of `op` for tensors on `devices`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def wrap(fn):
        _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, tuple(devices))
        return fn

    return wrap


def _native_status() -> tuple[bool, bool, str]:
    from fop_kernels import _native

    return _native.loaded(), _native.has_cuda_kernels(), _native.load_error()


def _triton_status() -> tuple[bool, str]:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # noqa: BLE001 - any import failure means the backend is missing
        return False, f"triton is not importable ({type(exc).__name__}: {exc}); pip install 'triton>=3.2'"
    if torch.cuda.is_available():
        return True, "triton with a CUDA device"
    if interpreter_enabled():
        return True, "triton under TRITON_INTERPRET=1 (CPU tensors; for tests, not speed)"
    return False, "triton is installed but there is no CUDA device and TRITON_INTERPRET is not 1"


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> dict[str, dict[str, object]]:
    """{backend: {"available": bool, "reason": str}} for this install."""
    loaded, cuda_kernels, err = _native_status()
    triton_ok, triton_why = _triton_status()
    if loaded:
        cpp = (True, "fop_kernels._C loaded")
    else:
        cpp = (False, f"fop_kernels._C could not be loaded: {err}")
    if cuda_kernels and torch.cuda.is_available():
        cuda = (True, f"fop_kernels._C has CUDA kernels; device {torch.cuda.get_device_name()}")
    elif cuda_kernels:
        cuda = (False, "fop_kernels._C has CUDA kernels but torch sees no CUDA device")
    elif loaded:
        cuda = (False, f"fop_kernels._C was built without CUDA (torch {torch.__version__}, cuda {torch.version.cuda})")
    else:
        cuda = (False, cpp[1])
    status = {
        "triton": (triton_ok, triton_why),
        "cuda": cuda,
        "cpp": cpp,
        "reference": (True, "pure torch, always available"),
    }
    return {k: {"available": ok, "reason": why} for k, (ok, why) in status.items()}


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def implementations(op: str) -> dict[str, tuple[str, ...]]:
    """{backend: devices} registered for `op` (whether or not the backend is available here)."""
    _ensure_loaded()
    return {b: impl.devices for b, impl in _REGISTRY.get(op, {}).items()}


def resolve(op: str, device: torch.device | str, backend: str | None = None) -> tuple[str, Callable]:
    """Pick the implementation of `op` for tensors on `device`: forced (argument, then env) or the best available."""
    _ensure_loaded()
    if op not in _REGISTRY:
        raise KeyError(f"no op named {op!r}; known ops: {sorted(_REGISTRY)}")
    dev = _device_type(device)
    impls = _REGISTRY[op]
    forced = backend or os.environ.get("FOP_KERNELS_BACKEND") or None
    status = available_backends()
    if forced is not None:
        if forced not in BACKENDS:
            raise BackendUnavailableError(f"unknown backend {forced!r}; expected one of {BACKENDS}")
        if not status[forced]["available"]:
            raise BackendUnavailableError(f"backend {forced!r} is not available: {status[forced]['reason']}")
        impl = impls.get(forced)
        if impl is None or dev not in impl.devices:
            have = {b: i.devices for b, i in impls.items()}
            raise BackendUnavailableError(
                f"backend {forced!r} has no implementation of {op} for {dev} tensors (registered: {have})"
            )
        return forced, impl.fn
    for name in _AUTO_ORDER.get(dev, ("reference",)):
        impl = impls.get(name)
        if impl is not None and dev in impl.devices and status[name]["available"]:
            return name, impl.fn
    raise BackendUnavailableError(f"no available backend implements {op} for {dev} tensors")


_LOADED = False


def _ensure_loaded() -> None:
    """Import the modules whose decorators fill the registry (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for family in ("eigh", "factor", "fisher", "cg"):
        importlib.import_module(f"fop_kernels.ops.{family}")
    importlib.import_module("fop_kernels.cpp")
    if _triton_status()[0]:
        importlib.import_module("fop_kernels.triton")
