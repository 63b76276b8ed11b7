"""Pure-torch implementation of every op: the specification, the CPU fallback and the test oracle.

Imports only torch. One module per op family, with the same function names as the public ops.
"""

from fop_kernels.reference.cg import batched_cg
from fop_kernels.reference.eigh import damped_cholesky_inverse, damped_inverse, eigh, eigh_refresh
from fop_kernels.reference.factor import (
    accumulate_conv_factor,
    accumulate_conv_factor_diag,
    accumulate_factor,
    accumulate_factor_diag,
)
from fop_kernels.reference.fisher import combine_scalars, damping_weights, fisher_inner_products, project_combine

__all__ = [
    "accumulate_conv_factor",
    "accumulate_conv_factor_diag",
    "accumulate_factor",
    "accumulate_factor_diag",
    "batched_cg",
    "combine_scalars",
    "damped_cholesky_inverse",
    "damped_inverse",
    "damping_weights",
    "eigh",
    "eigh_refresh",
    "fisher_inner_products",
    "project_combine",
]
