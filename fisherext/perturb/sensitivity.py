r"""Fisher information sensitivity of the inputs (Martin & Elster): for input coordinate i and a direction
:math:`v` in parameter space,

.. math:: \mathrm{FIS}_i = \sum_c \partial_{x_i}\Big(\frac{d p_c}{d\varepsilon}\Big)\,
          \partial_{x_i}\Big(\frac{d \log p_c}{d\varepsilon}\Big),

exactly (forward mode in θ over reverse mode in x) or by central differences in θ.

Precision: the derivatives run in the model's dtype (autocast's, under ``torch.autocast``); their
products and the sum over classes are formed in the accumulation dtype, at least float32, so a float16 or
bfloat16 model gets float32 sensitivities (and float32 directions from
:func:`predicted_class_directions`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

from .._core.checks import check_choice, check_eps
from .._core.conventions import check_deterministic, checked_output, curvature_forward
from .._core.entry import entry_point
from .._core.params import resolve_params
from .._core.types import Params
from .._core.precision import check_step
from .finite_differences import as_logits, check_directions, moved_params, split_vector

METHODS = ("exact", "fd")


@entry_point
def predicted_class_directions(model: nn.Module, x: torch.Tensor, *, params: Params = None) -> torch.Tensor:
    r"""The normalized gradient of the predicted class's log-probability, one direction per input.

    .. math:: v_n = \frac{\nabla_\theta \log p(\hat y_n|x_n)}{\|\nabla_\theta \log p(\hat y_n|x_n)\|},
              \qquad \hat y_n = \arg\max_c p(c|x_n)

    (the default direction of seed 001), computed for all inputs in one batched pass (``vmap`` over
    ``torch.func.grad``).

    Args:
        model: a classifier returning logits [N, C].
        x: the inputs [N, ...].
        params: the parameters to differentiate (default: all that require grad), as names, modules or
            tensors.

    Returns:
        Tensor [N, P]: row n is :math:`v_n`, flat over the selected parameters in ``named_parameters()``
        order (the per-input layout that ``input_sensitivity`` and ``fd_quadratic`` take with
        ``per_input=True``); a zero gradient gives a zero row. In the parameters' dtype, at least float32
        (the gradient of a float16/bfloat16 model is normalized in float32, where its squares neither
        underflow nor overflow).
    """
    selected = resolve_params(model, params)
    names = [n for n, _ in selected]
    base = {n: p.detach() for n, p in selected}
    acc = torch.promote_types(selected[0][1].dtype, torch.float32)

    def one(x_n):
        def logp_hat(w):
            lp = torch.log_softmax(functional_call(model, w, (x_n.unsqueeze(0),)).squeeze(0), -1)
            return lp.max()

        g = torch.func.grad(logp_hat)(base)
        flat = torch.cat([g[n].reshape(-1) for n in names]).to(acc)
        return flat / flat.norm().clamp_min(torch.finfo(acc).tiny)

    return vmap(one)(x)


@entry_point
def input_sensitivity(model: nn.Module, x: torch.Tensor, v: torch.Tensor | None = None, *, method: str = "exact",
                      eps: float = 1e-3, per_input: bool = False, params: Params = None) -> torch.Tensor:
    r"""Fisher information sensitivity of every input coordinate (Martin & Elster).

    .. math:: \mathrm{FIS}_{n,i} = \sum_c \partial_{x_{n,i}}\Big(\frac{d p_c(x_n)}{d\varepsilon}\Big)\,
              \partial_{x_{n,i}}\Big(\frac{d \log p_c(x_n)}{d\varepsilon}\Big),
              \qquad p(x_n) = \mathrm{softmax}\, f(x_n; \theta + \varepsilon v),

    derivatives in ε at ε = 0: how strongly coordinate i of input n changes the Fisher quadratic
    :math:`v^\top F_n v = \sum_c \frac{dp_c}{d\varepsilon}\frac{d\log p_c}{d\varepsilon}` of that input
    alone (no mean over inputs).

    Args:
        model: a classifier returning logits [N, C].
        x: the inputs [N, ...], floating point (the sensitivity differentiates in x).
        v: one direction [P] shared by all inputs, flat over the selected parameters in
            ``named_parameters()`` order; with ``per_input=True`` one direction per input as the rows of
            [N, P]. Default (None): the per-input directions of :func:`predicted_class_directions`.
        method: ``"exact"`` (forward mode in θ over reverse mode in x) or ``"fd"`` (central differences
            in θ with step ``eps``, error :math:`O(\varepsilon^2)`, each input's own perturbed parameters
            in one batched pass).
        eps: the finite-difference step :math:`\varepsilon > 0` of ``method="fd"``.
        per_input: whether ``v`` holds one direction per input (rows [N, P]); ignored when ``v`` is None.
        params: the parameters v lives on (default: all that require grad), as names, modules or tensors.

    Returns:
        Tensor [N, \*x.shape[1:]]: :math:`\mathrm{FIS}_{n,i}`, shaped like the inputs, in the model's dtype,
        at least float32 (float32 for a float16/bfloat16 model).

    Raises:
        TypeError: ``x`` is not a floating-point tensor, ``v`` not a floating-point tensor, or the model
            does not return a tensor.
        ValueError: a 2-D ``v`` without ``per_input=True`` (the message says how to pass each case), a
            ``v`` of the wrong shape, device or with non-finite entries, a bad ``method`` or ``eps``, a
            non-deterministic model, or non-finite outputs.

    Warns:
        PrecisionWarning: for ``method="fd"``, ``eps`` below what the dtypes resolve
            (``fisherext._core.precision.check_step``), e.g. the default 1e-3 for float16 or
            bfloat16 parameters.

    The forward passes follow the curvature conventions stated in :mod:`fisherext.perturb`.
    """
    check_choice("method", method, METHODS)
    eps = check_eps(eps)
    check_deterministic(model)
    selected = resolve_params(model, params)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x: the inputs must be a floating-point tensor (sensitivity differentiates in x)")
    with curvature_forward(model):
        V = (predicted_class_directions(model, x, params=params) if v is None
             else check_directions(v, selected, x.shape[0], per_input))
        if method == "fd":
            check_step("input_sensitivity", selected, V, eps)
        return _sensitivity(model, selected, x, V, method, eps)


def _sensitivity(model, selected, x, V, method, eps):
    """input_sensitivity's work, once the arguments are checked."""
    names = [n for n, _ in selected]
    base = {n: p.detach() for n, p in selected}
    acc = torch.promote_types(selected[0][1].dtype, torch.float32)  # the products and class sums: >= float32

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
        J, lp, dJ, dlp = J.to(acc), lp.to(acc), dJ.to(acc), dlp.to(acc)
        col = (-1,) + (1,) * x_n.dim()
        # ∂x(d log p_c/dε) = dJ_c and ∂x(d p_c/dε) = ∂x(p_c d log p_c/dε) = p_c (dJ_c + (d log p_c/dε) J_c)
        return (lp.exp().reshape(col) * (dJ + dlp.reshape(col) * J) * dJ).sum(0), lp[None]

    def finite(x_n, v_n):
        grads, lps = [], []
        for sign in (1.0, -1.0):
            moved = moved_params(selected, v_n, sign * eps)
            J_log, lp = jacrev(lambda x_n: (log_probs(moved, x_n),) * 2, has_aux=True)(x_n)  # [C, *x], [C]
            J_log, lp = J_log.to(acc), lp.to(acc)   # differences and products of half values: in float32
            grads.append((lp.exp().reshape(-1, *([1] * x_n.dim())) * J_log, J_log))
            lps.append(lp)
        (dp_plus, dlog_plus), (dp_minus, dlog_minus) = grads
        return ((dp_plus - dp_minus) * (dlog_plus - dlog_minus)).sum(0) / (2 * eps) ** 2, torch.stack(lps)

    fn = exact if method == "exact" else finite
    fis, log_p = vmap(fn, in_dims=(0, 0 if V.dim() == 2 else None))(x.detach(), V.detach())
    checked_output(log_p)  # [N, S, C]: non-finite where the model's outputs were (rule 4)
    return fis
