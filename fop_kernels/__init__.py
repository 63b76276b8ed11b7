"""fop_kernels: fused kernels for Fisher-based second-order optimizers (FOP, K-FAC, FROG, AdaFisher).

Every op has a pure-torch reference (fop_kernels.reference) and fast implementations per backend
(triton, cuda, cpp); dispatch picks the fastest available for the tensors' device. Force one with
`backend=` or FOP_KERNELS_BACKEND.
"""

from fop_kernels._dispatch import BackendUnavailableError, available_backends, implementations, resolve
from fop_kernels._version import __version__
from fop_kernels.ops.cg import batched_cg
from fop_kernels.ops.eigh import damped_cholesky_inverse, damped_inverse, eigh, eigh_refresh
from fop_kernels.ops.factor import (
    accumulate_conv_factor,
    accumulate_conv_factor_diag,
    accumulate_factor,
    accumulate_factor_diag,
)
from fop_kernels.ops.fisher import combine_scalars, fisher_inner_products, project_combine

__all__ = [
    "BackendUnavailableError",
    "__version__",
    "accumulate_conv_factor",
    "accumulate_conv_factor_diag",
    "accumulate_factor",
    "accumulate_factor_diag",
    "available_backends",
    "batched_cg",
    "combine_scalars",
    "damped_cholesky_inverse",
    "damped_inverse",
    "eigh",
    "eigh_refresh",
    "fisher_inner_products",
    "implementations",
    "project_combine",
    "resolve",
]
