"""`python -m fop_kernels`: an environment report (versions, backends, device, build flags, ops)."""

import platform
import sys

import torch

import fop_kernels
from fop_kernels import _native
from fop_kernels._dispatch import _REGISTRY, _ensure_loaded


def report() -> str:
    _ensure_loaded()
    lines = [
        f"fop_kernels {fop_kernels.__version__}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
        f"torch {torch.__version__} (cuda {torch.version.cuda}, cuda available: {torch.cuda.is_available()})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001
        lines.append(f"triton not importable: {exc}")
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        lines.append(f"device: cpu, {torch.get_num_threads()} threads")
    lines.append(f"native build flags: {_native.build_info() or 'extension not loaded'}")
    lines.append("backends:")
    for name, st in fop_kernels.available_backends().items():
        lines.append(f"  {name:<10} {'yes' if st['available'] else 'no ':<4} {st['reason']}")
    lines.append("ops (backend: devices):")
    for op in sorted(_REGISTRY):
        impls = ", ".join(f"{b}: {'/'.join(i.devices)}" for b, i in _REGISTRY[op].items())
        lines.append(f"  {op:<28} {impls}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(report() + "\n")
