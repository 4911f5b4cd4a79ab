"""Public entry points of the compiled kernels (documented in ``fisherext._ops``)."""
from ._ops import (
    axpy_list_,
    class_gram,
    fd_fisher_reduce,
    kfac_factor_update_,
    linear_outer_accum_,
    linear_sq_grad,
    sym_outer_accum_,
)

__all__ = [
    "axpy_list_",
    "class_gram",
    "fd_fisher_reduce",
    "kfac_factor_update_",
    "linear_outer_accum_",
    "linear_sq_grad",
    "sym_outer_accum_",
]
