r"""Per-input Fisher measures: for every input n of a batch, :math:`\mathrm{tr}(F_n)` or :math:`v^\top F_n v`.

:math:`F_n = \sum_k w_k\, g_{nk} g_{nk}^\top` with :math:`g_{nk} = J_n^\top c_{nk}` the per-sample gradients
of the Fisher kind's output cotangents (``fisherext._core.likelihood``: the columns of
:math:`\Lambda_n^{1/2}` for "true", per position for outputs with positions; the data-label residual for
"empirical"; sampled-label residuals for "mc"). Hence

- trace: :math:`\mathrm{tr}(F_n) = \sum_k w_k \|g_{nk}\|^2`, per parameter from the capture engine's
  factored forms (a linear layer's from the per-sample Gram of its inputs and output gradients, the
  class-Gram kernel), the cotangents backpropagated a chunk at a time;
- quad: :math:`v^\top F_n v = \sum_k w_k (c_{nk}^\top J_n v)^2`, with :math:`J_n v` for all n from one
  forward-mode Jacobian-vector product (under ``conventions.curvature_forward``: padding rows constant,
  attention by the math kernel).

Both are the exact quantities over all parameters jointly (not a sum of per-tensor blocks).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jvp

from .._core.checks import check_choice, check_inputs, check_positive_int, check_vectors
from .._core.conventions import check_deterministic, checked_output, curvature_forward
from .._core.likelihood import KINDS, LOSSES, Cotangents
from .._core.params import resolve_params
from .accumulate import cotangent_step, footprint
from .engine import Capture
from .._core.entry import entry_point

QUANTITIES = ("trace", "quad")
_CHUNK_BYTES = 1 << 26


@entry_point
def per_sample_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, kind: str = "true",
                      quantity: str = "trace", v: torch.Tensor | None = None, loss: str = "cross_entropy",
                      params=None, mc_samples: int = 1, generator: torch.Generator | None = None,
                      class_dim: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """tr(F_n) or vᵀF_n v for every input of the batch ``x`` (see the module docstring): Tensor [N].

    ``y`` is needed for kind="empirical" (and names the class axis and the ignored positions of
    outputs with positions, as in ``fisherext.fisher``); ``v`` (a flat vector over the selected
    ``params``) for quantity="quad".
    """
    check_choice("kind", kind, KINDS)
    check_choice("quantity", quantity, QUANTITIES)
    check_choice("loss", loss, LOSSES)
    check_positive_int("mc_samples", mc_samples)
    check_inputs(model, x)
    if x.shape[0] == 0:
        raise ValueError("x: the batch is empty")
    opts = dict(mc_samples=mc_samples, generator=generator, class_dim=class_dim, ignore_index=ignore_index)
    if quantity == "quad":
        check_deterministic(model)
        selected = resolve_params(model, params)
        if v is None:
            raise TypeError("v: quantity='quad' needs a direction v over the selected parameters")
        return _quad(model, selected, x, y, kind, loss, check_vectors(v, selected), opts)
    with Capture(model, params) as cap, torch.no_grad():
        out = checked_output(cap.forward(x))
        cot = Cotangents(out, y, kind, loss, **opts)
        step = cotangent_step(*footprint(cap.uses, out), x.shape[0], cot.K, _CHUNK_BYTES)
        total = out.new_zeros(x.shape[0])
        for k0 in range(0, cot.K, step):
            k1 = min(cot.K, k0 + step)
            wk = cot.weights[k0:k1]
            for term in cap.backward(out, cot.chunk(k0, k1), last=k1 == cot.K):
                if term is not None:
                    total += term.sq_norms(wk)
        return total


def _quad(model, selected, x, y, kind, loss, v, opts):
    names = [n for n, _ in selected]
    primals = tuple(p.detach() for _, p in selected)
    tangents = tuple(t.view_as(p).to(p.dtype) for t, p in zip(v.split([p.numel() for p in primals]), primals))

    def outputs(*ps):
        return functional_call(model, dict(zip(names, ps)), (x,))

    with torch.no_grad(), curvature_forward(model):
        out, Jv = jvp(outputs, primals, tangents)
        cot = Cotangents(checked_output(out), y, kind, loss, **opts)
        total = out.new_zeros(x.shape[0])
        for k0 in range(0, cot.K, 64):
            k1 = min(cot.K, k0 + 64)
            c = cot.chunk(k0, k1)
            total += torch.einsum("k,kn->n", cot.weights[k0:k1], (c * Jv).flatten(2).sum(-1) ** 2)
        return total
