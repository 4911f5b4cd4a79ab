"""The capture engine: per-sample gradients of every layer, recorded from one forward and backward pass,
reduced into a Fisher (``fisher``: diag, full, block, kfac) or per-input measures (``per_sample_fisher``)."""
from .api import fisher
from .matrix import FisherMatrix
from .measures import per_sample_fisher

__all__ = ["FisherMatrix", "fisher", "per_sample_fisher"]
