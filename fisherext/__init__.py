"""fisherext: fast, correct Fisher information and curvature for PyTorch models.

Layers, each importing only from the ones below it:

- applications: ``fisherext.influence``, ``fisherext.ewc``, ``fisherext.optim``, ``fisherext.attacks``,
  ``fisherext.detect``, ``fisherext.experiments``;
- engines: ``fisherext.capture`` (per-sample gradients: ``fisher``, ``per_sample_fisher``),
  ``fisherext.curvature`` (matrix-free products: ``hvp``, the operators), ``fisherext.perturb``
  (finite differences, input sensitivity), ``fisherext.gaussian`` (closed forms);
- ``fisherext.linalg``: operators, solvers, spectra;
- ``fisherext._core``: shared checks, data streaming, likelihoods, conventions (private);
- ``fisherext.ops``: the compiled kernels (``fisherext._C``, reached through ``torch.ops.fisherext``),
  with their pure-PyTorch twins in ``fisherext.reference``.
"""
import torch  # noqa: F401  (must be imported before the extension is loaded)

from . import attacks, detect, ewc, experiments, gaussian, influence, linalg, ops, optim, reference
from ._core.params import flatten, unflatten
from ._core.precision import PrecisionWarning
from ._version import __version__
from .capture import FisherMatrix, fisher, per_sample_fisher
from .curvature import FisherOperator, GGNOperator, HessianOperator, hvp
from .experiments import kl_vs_fisher
from .influence import InfluenceFunctions
from .linalg import LinearOperator, linop, solvers, spectral
from .ops import build_info
from .perturb import fd_quadratic, fd_quadratic_directions, input_sensitivity, perturbed


__all__ = [
    "FisherMatrix", "FisherOperator", "GGNOperator", "HessianOperator", "InfluenceFunctions", "LinearOperator",
    "PrecisionWarning",
    "attacks", "build_info", "detect", "ewc", "experiments", "fd_quadratic", "fd_quadratic_directions", "fisher",
    "flatten", "gaussian", "hvp", "influence", "input_sensitivity", "kl_vs_fisher", "linalg", "linop", "ops",
    "optim", "per_sample_fisher", "perturbed", "reference", "solvers", "spectral", "unflatten", "__version__",
]

# Modules of earlier versions, with where their contents went.
_MOVED = {
    "utils": "fisherext.flatten and fisherext.unflatten",
    "measures": "fisherext.per_sample_fisher",
    "fisher_matrix": "fisherext.FisherMatrix",
    "operators": "fisherext.curvature (fisherext.HessianOperator, GGNOperator, FisherOperator)",
    "demo": "fisherext.experiments.demo",
}


def __getattr__(name):
    if name in _MOVED:
        raise AttributeError(f"module 'fisherext' has no attribute {name!r}: it moved to {_MOVED[name]}")
    raise AttributeError(f"module 'fisherext' has no attribute {name!r}")
