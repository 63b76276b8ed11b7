"""Registers the C++ (and CUDA) implementations of fop_kernels._C with the dispatcher.

One module per op family; each wraps torch.ops.fop_kernels.* and is imported only when the
extension loaded.
"""

import importlib
import pkgutil

from fop_kernels import _native

if _native.loaded():
    for _mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{_mod.name}")
