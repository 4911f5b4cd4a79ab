"""Public entry points of the compiled kernels (documented in ``fisherext._ops``)."""
from ._ops import (
    axpy_list_,
    cg_direction_,
    cg_update_,
    class_gram,
    fd_fisher_reduce,
    kfac_factor_update_,
    linear_outer_accum_,
    linear_sq_grad,
    lissa_update_,
    neumann_update_,
    softmax_hessian_sqrt,
    softmax_hvp,
    sym_outer_accum_,
)

__all__ = [
    "axpy_list_",
    "cg_direction_",
    "cg_update_",
    "class_gram",
    "fd_fisher_reduce",
    "kfac_factor_update_",
    "linear_outer_accum_",
    "linear_sq_grad",
    "lissa_update_",
    "neumann_update_",
    "softmax_hessian_sqrt",
    "softmax_hvp",
    "sym_outer_accum_",
]
