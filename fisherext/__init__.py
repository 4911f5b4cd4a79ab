"""fisherext: fast, correct Fisher information and curvature for PyTorch models.

The compiled kernels live in ``fisherext._C`` and are reached through ``torch.ops.fisherext``;
``fisherext.ops`` holds the documented Python wrappers, ``fisherext.reference`` their pure-PyTorch twins.
"""
import torch  # noqa: F401  (must be imported before the extension is loaded)

from . import gaussian, influence, linop, ops, reference, solvers, spectral, utils
from .ops import build_info
from .fisher import fisher
from .fisher_matrix import FisherMatrix
from .hvp import hvp
from .linop import LinearOperator
from .measures import per_sample_fisher
from .operators import FisherOperator, GGNOperator, HessianOperator
from .perturb import fd_quadratic, fd_quadratic_directions, input_sensitivity, kl_vs_fisher, perturbed

__version__ = "0.1.0"

__all__ = [
    "FisherMatrix", "FisherOperator", "GGNOperator", "HessianOperator", "LinearOperator", "build_info",
    "fd_quadratic", "fd_quadratic_directions", "fisher", "gaussian", "hvp", "influence", "input_sensitivity",
    "kl_vs_fisher", "linop", "ops", "per_sample_fisher", "perturbed", "reference", "solvers", "spectral", "utils",
    "__version__",
]
