r"""The KL divergence of a model's predictive distribution under a parameter step against the Fisher's
quadratic form: :math:`\mathrm{KL}(p(\theta)\,\|\,p(\theta+\varepsilon v)) = \tfrac12 \varepsilon^2 v^\top F v
+ O(\varepsilon^3)`, over a range of steps."""
from __future__ import annotations

import torch
from torch import nn

from .._core.checks import check_eps, check_vectors
from .._core.conventions import check_deterministic, curvature_forward
from .._core.params import resolve_params
from ..capture.measures import per_sample_fisher
from ..perturb.finite_differences import as_logits, check_finite_logits, perturbed
from .._core.entry import entry_point


@entry_point
def kl_vs_fisher(model: nn.Module, x: torch.Tensor, v: torch.Tensor, eps_values, *, params=None) -> list[dict]:
    r"""Mean over the inputs of :math:`\mathrm{KL}(p(y|x,\theta)\,\|\,p(y|x,\theta+\varepsilon v))` against
    :math:`\tfrac12\varepsilon^2 v^\top F v` (true Fisher over the same inputs) for every ε.

    Returns one row per ε: ``{"eps", "kl", "half_quad", "ratio"}``; the ratio tends to 1 as ε → 0.
    Forward passes follow ``fisherext._core.conventions``.
    """
    eps_values = [check_eps(eps) for eps in eps_values]
    check_deterministic(model)
    selected = resolve_params(model, params)
    v = check_vectors(v, selected)
    with curvature_forward(model):
        quad = float(per_sample_fisher(model, x, kind="true", quantity="quad", v=v, params=params).mean())
        with torch.no_grad():
            base = as_logits(model(x))
            check_finite_logits(base)
            log_p = torch.log_softmax(base, -1)
        rows = []
        for eps in eps_values:
            with perturbed(model, v, eps, params=params), torch.no_grad():
                moved = as_logits(model(x))
            check_finite_logits(moved)
            log_q = torch.log_softmax(moved, -1)
            kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
            half = 0.5 * eps**2 * quad
            rows.append({"eps": eps, "kl": kl, "half_quad": half,
                         "ratio": kl / half if half > 0 else float("nan")})
    return rows
