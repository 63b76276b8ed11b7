"""Loads the native extension fop_kernels._C, recording why it failed rather than failing the import."""

from __future__ import annotations

import importlib

import torch

_state: dict[str, object] = {"tried": False, "loaded": False, "error": "", "info": {}}


def _load() -> None:
    if _state["tried"]:
        return
    _state["tried"] = True
    try:
        importlib.import_module("fop_kernels._C")
        raw = torch.ops.fop_kernels.build_info()
        _state["info"] = dict(kv.split("=", 1) for kv in raw.split(";") if "=" in kv)
        _state["loaded"] = True
    except Exception as exc:  # noqa: BLE001 - any failure leaves the reference backend serving
        _state["error"] = (
            f"{type(exc).__name__}: {exc} (torch {torch.__version__}, cuda {torch.version.cuda}); "
            "rebuild with `make install` or `pip install --no-build-isolation -e .`"
        )


def loaded() -> bool:
    """True when fop_kernels._C is importable and its ops are registered."""
    _load()
    return bool(_state["loaded"])


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA sources."""
    _load()
    return _state["info"].get("cuda") == "1"


def load_error() -> str:
    """Why the extension did not load ('' when it did)."""
    _load()
    return str(_state["error"])


def build_info() -> dict[str, str]:
    """The flags the extension reports about its own build."""
    _load()
    return dict(_state["info"])


def require() -> None:
    """Raise a diagnostic naming versions and the fix when a native op is called without the extension."""
    if not loaded():
        raise RuntimeError(f"fop_kernels native extension unavailable: {load_error()}")
