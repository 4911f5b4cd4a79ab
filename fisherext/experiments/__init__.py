"""The experiments: the suite that ``fisherext suite`` runs (one module per experiment, the registry and
runner :mod:`fisherext.experiments.suite`, the report writer :mod:`fisherext.experiments.report`), the
studies built on the engines (the Gaussian KL study of seed 000, the model-level KL against the Fisher),
and the demo."""
from . import gaussian_kl, report, suite
from .model_kl import kl_vs_fisher
from .suite import run_suite

__all__ = ["gaussian_kl", "kl_vs_fisher", "report", "run_suite", "suite"]
