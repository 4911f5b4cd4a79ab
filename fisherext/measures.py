r"""Per-input Fisher measures: for every input n of a batch, :math:`\mathrm{tr}(F_n)` or :math:`v^\top F_n v`.

:math:`F_n = \sum_k w_k\, J_n^\top r_{nk} r_{nk}^\top J_n` with :math:`J_n` the Jacobian of the model
output for input n and :math:`r_{nk}` the output cotangents of the Fisher kind (``fisherext.fisher``):
the columns of :math:`\Lambda_n^{1/2}` for "true", the data-label residual for "empirical", sampled-label
residuals for "mc". Hence

- trace: :math:`\mathrm{tr}(F_n) = \sum_k w_k\, r_{nk}^\top K_n r_{nk}` with the Jacobian Gram
  :math:`K_n = J_n J_n^\top` (C×C), built layer by layer by the class-Gram kernel from one batched
  backward pass of the C output directions (for "true" this is :math:`\mathrm{tr}(\Lambda_n K_n)`);
- quad: :math:`v^\top F_n v = \sum_k w_k (r_{nk}^\top J_n v)^2`, with :math:`J_n v` for all n from one
  forward-mode Jacobian-vector product.

Both are the exact quantities over all parameters jointly (not a sum of per-tensor blocks).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jvp

from .capture import Capture, check_batchnorm, resolve_params
from .fisher import KINDS, LOSSES, _check_inputs, output_cotangents
from .utils import check_choice

QUANTITIES = ("trace", "quad")


def per_sample_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, kind: str = "true",
                      quantity: str = "trace", v: torch.Tensor | None = None, loss: str = "cross_entropy",
                      params=None, mc_samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """tr(F_n) or vᵀF_n v for every input of the batch ``x`` (see the module docstring): Tensor [N].

    ``y`` is needed for kind="empirical"; ``v`` (a flat vector over the selected ``params``) for
    quantity="quad".
    """
    check_choice("kind", kind, KINDS)
    check_choice("quantity", quantity, QUANTITIES)
    check_choice("loss", loss, LOSSES)
    _check_inputs(model, x)
    if x.shape[0] == 0:
        raise ValueError("x: the batch is empty")
    if quantity == "quad":
        check_batchnorm(model)
        return _quad(model, resolve_params(model, params), x, y, kind, loss, v, mc_samples, generator)
    with Capture(model, params) as cap:
        out = cap.forward(x)
        with torch.no_grad():
            cot, wk = output_cotangents(out, y, kind, loss, mc_samples, generator, 0)
        N, C = out.shape
        eye = torch.eye(C, dtype=out.dtype, device=out.device)[:, None, :].expand(C, N, C)
        cap.backward(out, eye)
        with torch.no_grad():
            gram = sum(layer.gram() for layer in cap.layers)  # [N, C, C]
            return torch.einsum("k,knc,ncd,knd->n", wk, cot, gram, cot)


def _quad(model, selected, x, y, kind, loss, v, mc_samples, generator):
    P = sum(p.numel() for _, p in selected)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v: quantity='quad' needs a tensor of length {P}, got {type(v).__name__}")
    if not v.is_floating_point() or v.dim() != 1 or v.shape[0] != P:
        raise ValueError(f"v: expected a floating-point vector of length {P}, got {v.dtype} {tuple(v.shape)}")
    names = [n for n, _ in selected]
    primals = tuple(p.detach() for _, p in selected)
    tangents = tuple(t.view_as(p).to(p.dtype) for t, p in zip(v.split([p.numel() for p in primals]), primals))

    def outputs(*ps):
        return functional_call(model, dict(zip(names, ps)), (x,))

    with torch.no_grad():
        out, Jv = jvp(outputs, primals, tangents)
        cot, wk = output_cotangents(out, y, kind, loss, mc_samples, generator, 0)
        return torch.einsum("k,kn->n", wk, torch.einsum("knc,nc->kn", cot, Jv) ** 2)
