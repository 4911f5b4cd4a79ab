"""The experiments: studies built on the engines (the Gaussian KL study of seed 000, the model-level KL
against the Fisher), and the demo that ``make run`` runs."""
from . import gaussian_kl
from .model_kl import kl_vs_fisher

__all__ = ["gaussian_kl", "kl_vs_fisher"]
