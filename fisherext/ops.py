"""Public entry points of the compiled kernels (documented in ``fisherext._ops``)."""
from ._ops import (
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
    unflatten_axpy_,
)

__all__ = [
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
    "unflatten_axpy_",
]
