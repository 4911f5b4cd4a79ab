r"""Fisher information sensitivity of the inputs (Martin & Elster): for input coordinate i and a direction
:math:`v` in parameter space,

.. math:: \mathrm{FIS}_i = \sum_c \partial_{x_i}\Big(\frac{d p_c}{d\varepsilon}\Big)\,
          \partial_{x_i}\Big(\frac{d \log p_c}{d\varepsilon}\Big),

exactly (forward mode in θ over reverse mode in x) or by central differences in θ.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

from .._core.checks import check_choice, check_eps, check_vectors
from .._core.conventions import check_deterministic, checked_output, curvature_forward
from .._core.params import resolve_params
from .finite_differences import as_logits, moved_params, split_vector
from .._core.entry import entry_point

METHODS = ("exact", "fd")


@entry_point
def predicted_class_directions(model: nn.Module, x: torch.Tensor, *, params=None) -> torch.Tensor:
    r"""Per input n, :math:`v_n = \nabla_\theta \log p(\hat y_n|x_n) / \|\cdot\|` with :math:`\hat y_n` the
    predicted class (the default direction of seed 001): Tensor [N, P]."""
    selected = resolve_params(model, params)
    names = [n for n, _ in selected]
    base = {n: p.detach() for n, p in selected}

    def one(x_n):
        def logp_hat(w):
            lp = torch.log_softmax(functional_call(model, w, (x_n.unsqueeze(0),)).squeeze(0), -1)
            return lp.max()

        g = torch.func.grad(logp_hat)(base)
        flat = torch.cat([g[n].reshape(-1) for n in names])
        return flat / flat.norm().clamp_min(torch.finfo(flat.dtype).tiny)

    return vmap(one)(x)


@entry_point
def input_sensitivity(model: nn.Module, x: torch.Tensor, v: torch.Tensor | None = None, *, method: str = "exact",
                      eps: float = 1e-3, params=None) -> torch.Tensor:
    """Fisher information sensitivity of every input coordinate (module docstring): [N, *x.shape[1:]].

    ``v``: [P] or [N, P]; default: the normalized gradient of the predicted class's log-probability,
    per input. ``method="exact"`` uses forward mode in θ over reverse mode in x; ``"fd"`` central
    differences in θ (each input's own perturbed parameters, in one batched pass). Forward passes follow
    ``fisherext._core.conventions``.
    """
    check_choice("method", method, METHODS)
    eps = check_eps(eps)
    check_deterministic(model)
    selected = resolve_params(model, params)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x: the inputs must be a floating-point tensor (sensitivity differentiates in x)")
    with curvature_forward(model):
        V = predicted_class_directions(model, x, params=params) if v is None else check_vectors(v, selected,
                                                                                               x.shape[0])
        return _sensitivity(model, selected, x, V, method, eps)


def _sensitivity(model, selected, x, V, method, eps):
    """input_sensitivity's work, once the arguments are checked."""
    names = [n for n, _ in selected]
    base = {n: p.detach() for n, p in selected}

    def log_probs(w, x_n):
        return torch.log_softmax(as_logits(functional_call(model, w, (x_n.unsqueeze(0),))).squeeze(0), -1)

    def exact(x_n, v_n):
        tangent = dict(zip(names, split_vector(v_n, selected)))

        def grads_in_x(w):  # ∂x log p_c [C, *x] and log p_c [C] at parameters w
            return jacrev(lambda x: (log_probs(w, x),) * 2, has_aux=True)(x_n)

        # Forward mode in θ over reverse mode in x. Not jacrev over jvp: reverse-differentiating the
        # forward-mode derivative gave wrong values through LayerNorm (seen on torch 2.14; the tests
        # compare both orders' target against an explicit autograd loop).
        (J, lp), (dJ, dlp) = jvp(grads_in_x, (base,), (tangent,))
        col = (-1,) + (1,) * x_n.dim()
        # ∂x(d log p_c/dε) = dJ_c and ∂x(d p_c/dε) = ∂x(p_c d log p_c/dε) = p_c (dJ_c + (d log p_c/dε) J_c)
        return (lp.exp().reshape(col) * (dJ + dlp.reshape(col) * J) * dJ).sum(0), lp[None]

    def finite(x_n, v_n):
        grads, lps = [], []
        for sign in (1.0, -1.0):
            moved = moved_params(selected, v_n, sign * eps)
            J_log, lp = jacrev(lambda x_n: (log_probs(moved, x_n),) * 2, has_aux=True)(x_n)  # [C, *x], [C]
            grads.append((lp.exp().reshape(-1, *([1] * x_n.dim())) * J_log, J_log))
            lps.append(lp)
        (dp_plus, dlog_plus), (dp_minus, dlog_minus) = grads
        return ((dp_plus - dp_minus) * (dlog_plus - dlog_minus)).sum(0) / (2 * eps) ** 2, torch.stack(lps)

    fn = exact if method == "exact" else finite
    fis, log_p = vmap(fn, in_dims=(0, 0 if V.dim() == 2 else None))(x.detach(), V.detach())
    checked_output(log_p)  # [N, S, C]: non-finite where the model's outputs were (rule 4)
    return fis
