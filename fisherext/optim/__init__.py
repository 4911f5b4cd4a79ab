"""Optimizers built on the curvature engines: SAM, adaptive SAM and FisherSAM (``sam``), K-FAC natural
gradient (``natural``), and the curvature learning rate η = 1/λ_max with a comparison of optimizers run
at it (``learning_rate``; its ``OPTIMIZERS`` names the optimizers it knows)."""
from .learning_rate import OptimizerComparison, compare_optimizers, curvature_learning_rate, max_eigenvalue
from .natural import NaturalGradient
from .sam import SAM, FisherSAM

__all__ = ["SAM", "FisherSAM", "NaturalGradient", "OptimizerComparison", "compare_optimizers",
           "curvature_learning_rate", "max_eigenvalue"]
