"""The compiled kernels' Python entry points, one module per kernel family: ``linear`` (K1, per-sample
accumulations of a linear map's gradients), ``perturb`` (K2, finite differences in parameter space),
``softmax`` (the softmax cross-entropy Hessian) and ``solver_updates`` (the fused solver steps); each op's
wrapper, fake kernel, argument checks and docstring with the math sit together there.
``fisherext.reference`` holds their pure-PyTorch twins.
"""
from ._library import build_info
from .linear import class_gram, kfac_factor_update_, linear_outer_accum_, linear_sq_grad, sym_outer_accum_
from .perturb import fd_fisher_reduce, unflatten_axpy_
from .softmax import softmax_hessian_sqrt, softmax_hvp
from .solver_updates import cg_direction_, cg_update_, lissa_update_, neumann_update_

__all__ = [
    "build_info",
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
