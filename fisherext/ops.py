"""Public entry points of the compiled kernels (documented in ``fisherext._ops``)."""
from ._ops import (
    class_gram,
    fd_fisher_reduce,
    kfac_factor_update_,
    linear_outer_accum_,
    linear_sq_grad,
    sym_outer_accum_,
    unflatten_axpy_,
)

__all__ = [
    "class_gram",
    "fd_fisher_reduce",
    "kfac_factor_update_",
    "linear_outer_accum_",
    "linear_sq_grad",
    "sym_outer_accum_",
    "unflatten_axpy_",
]
