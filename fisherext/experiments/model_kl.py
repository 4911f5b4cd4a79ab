r"""The KL divergence of a model's predictive distribution under a parameter step against the Fisher's
quadratic form: :math:`\mathrm{KL}(p(\theta)\,\|\,p(\theta+\varepsilon v)) = \tfrac12 \varepsilon^2 v^\top F v
+ O(\varepsilon^3)`, over a range of steps."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .._core.checks import check_eps, check_vectors
from .._core.conventions import check_deterministic, curvature_forward
from .._core.entry import entry_point
from .._core.params import resolve_params
from .._core.types import Params
from ..capture.measures import per_sample_fisher
from ..perturb.finite_differences import as_logits, check_finite_logits, perturbed


@entry_point
def kl_vs_fisher(model: nn.Module, x: torch.Tensor, v: torch.Tensor, eps_values: Iterable[float], *,
                 params: Params = None) -> list[dict]:
    r"""The mean KL divergence under a parameter step against half the Fisher quadratic form, per step.

    For every step ε of ``eps_values``:

    .. math:: \mathrm{kl} = \frac1N\sum_n \mathrm{KL}\big(p(y|x_n,\theta)\,\|\,p(y|x_n,\theta+\varepsilon v)\big),
              \qquad \mathrm{half\_quad} = \tfrac12\varepsilon^2 v^\top F v,
              \quad F = \frac1N\sum_n F_n,

    :math:`F_n` the true Fisher of input n (exact, over the classes), the same mean over the inputs on
    both sides; ``ratio`` = kl / half_quad tends to 1 as ε → 0 (deviation :math:`O(\varepsilon)`).

    Args:
        model: a classifier returning logits [N, C].
        x: the inputs [N, ...].
        v: one direction [P], flat over the selected parameters in ``named_parameters()`` order.
        eps_values: the steps ε (finite, positive), in the order of the rows.
        params: the parameters v lives on (default: all that require grad), as names, modules or tensors.

    Returns:
        One dict per ε, ``{"eps", "kl", "half_quad", "ratio"}``: a report row of Python floats (measured
        figures for a table, not tensors for further computation); ``ratio`` is NaN where half_quad is 0.

    Raises:
        TypeError: ``v`` is not a floating-point tensor, or the model does not return a tensor.
        ValueError: ``v`` is not a [P] vector of finite entries on the parameters' device, a step is not
            finite and positive, the model is not deterministic, or its outputs are not finite. The
            parameters are restored bit for bit in every case.

    The forward passes follow the curvature conventions stated in :mod:`fisherext.perturb`.
    """
    eps_values = [check_eps(eps) for eps in eps_values]
    check_deterministic(model)
    selected = resolve_params(model, params)
    v = check_vectors(v, selected)
    with curvature_forward(model):
        with torch.no_grad():  # the model's outputs checked first, before any other work
            base = as_logits(model(x))
            check_finite_logits(base)
            log_p = torch.log_softmax(base, -1)
        quad = float(per_sample_fisher(model, x, kind="true", quantity="quad", v=v, params=params).mean())
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
