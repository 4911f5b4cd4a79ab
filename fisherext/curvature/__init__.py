"""Matrix-free curvature of a model's mean loss over a data set: Hessian, Gauss-Newton and Fisher products
(``hvp``) and the same as linear operators (``HessianOperator``, ``GGNOperator``, ``FisherOperator``), eager
(``products``) or compiled by torch.compile (``compiled``, ``compile=True``)."""
from .operators import FisherOperator, GGNOperator, HessianOperator
from .products import hvp

__all__ = ["FisherOperator", "GGNOperator", "HessianOperator", "hvp"]
