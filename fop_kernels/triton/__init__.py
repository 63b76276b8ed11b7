"""Fused Triton kernels, one module per op family; each registers its launchers with the dispatcher.

Imported only when triton is usable (a CUDA device, or TRITON_INTERPRET=1 for CPU tests).
"""

import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
