"""A model as a function of its selected parameters, and gradients that tolerate unused parameters."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .checks import check_vectors
from .conventions import check_deterministic, checked_output
from .params import original_module, resolve_params


class FunctionalModel:
    """A model as a function of its selected parameters: flat vectors [P] ↔ per-parameter tensors.

    ``model`` is the original module of a model compiled by ``torch.compile`` (``params.original_module``):
    ``functional_call`` and the torch.func transforms run its forward eagerly, and a ``compile=`` product
    traces that forward into a graph of its own."""

    def __init__(self, model: nn.Module, params=None):
        check_deterministic(model)
        self.model = original_module(model)
        self.selected = resolve_params(model, params)
        self.names = [n for n, _ in self.selected]
        self.params = [p for _, p in self.selected]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.P = sum(self.sizes)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    def leaves(self) -> list[torch.Tensor]:
        """The current parameter values as fresh leaves that require grad: products differentiate with
        respect to these, so frozen parameters work and the model's ``.grad`` stays untouched."""
        return [p.detach().requires_grad_() for p in self.params]

    def unflat(self, v: torch.Tensor) -> list[torch.Tensor]:
        """[P] → one view per parameter."""
        return [t.view(s) for t, s in zip(v.split(self.sizes), self.shapes)]

    def outputs(self, x, params: dict, offset: int = 0) -> torch.Tensor:
        """The model's outputs for the batch x at ``params`` ({name: tensor}), checked by
        ``conventions.checked_output`` (``offset``: the batch's first sample in the data)."""
        return checked_output(functional_call(self.model, params, (x,)), offset)

    def vectors(self, v) -> tuple[torch.Tensor, bool]:
        """One vector v [P] or K vectors as the columns of v [P, K] → (the vectors as rows [K, P] in the
        parameters' dtype, the form the per-batch products take; whether v was one vector)."""
        P = self.P
        if isinstance(v, torch.Tensor) and v.is_floating_point() and tuple(v.shape) != (P,) \
                and not (v.dim() == 2 and v.shape[0] == P):
            hint = "; vectors are columns: pass v.T" if v.dim() == 2 and v.shape[1] == P else ""
            raise ValueError(f"v: expected shape [{P}] or [{P}, K] (K vectors as columns) over the "
                             f"{len(self.selected)} selected parameter tensors, got {tuple(v.shape)}{hint}")
        single = not isinstance(v, torch.Tensor) or v.dim() != 2
        rows = check_vectors(v, self.selected) if single else check_vectors(v.T, self.selected, "K")
        return (rows[None] if single else rows).to(self.dtype), single


def grads(outputs, leaves, grad_outputs, retain_graph=False, create_graph=False) -> list[torch.Tensor]:
    """autograd.grad that gives zeros for the parameters an output does not depend on."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not pairs:
        return [torch.zeros_like(p) for p in leaves]
    got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], retain_graph=retain_graph,
                              create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(got, leaves)]
