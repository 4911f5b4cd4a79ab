"""The selected parameters of a model, and flat vectors over them.

A flat vector concatenates the selected parameter tensors, each flattened, in
``model.named_parameters()`` order: the layout of every vector the package takes or returns.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .checks import all_finite
from .entry import entry_point


def resolve_params(model: nn.Module, params=None) -> list[tuple[str, nn.Parameter]]:
    """Selected parameters as (qualified name, parameter), in ``model.named_parameters()`` order.

    ``params``: None (every parameter with requires_grad), or an iterable of parameter names, modules
    (all their parameters) or parameter tensors.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        if isinstance(params, (str, nn.Module, torch.Tensor)):
            params = [params]
        ids: set[int] = set()
        by_name = dict(named)
        for item in params:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"params: the model has no parameter named {item!r}")
                ids.add(id(by_name[item]))
            elif isinstance(item, nn.Module):
                ids.update(id(p) for p in item.parameters())
            elif isinstance(item, torch.Tensor):
                if not any(p is item for _, p in named):
                    raise ValueError("params: a tensor in 'params' is not a parameter of the model")
                ids.add(id(item))
            else:
                raise TypeError(f"params: expected parameter names, modules or tensors, got {type(item).__name__}")
        chosen = [(n, p) for n, p in named if id(p) in ids]
    if not chosen:
        raise ValueError("params: no parameters selected (none requires grad, or the subset is empty)")
    for name, p in chosen:
        if not p.is_floating_point():
            raise TypeError(f"params: parameter {name!r} is not floating point ({p.dtype})")
    if not all_finite([p for _, p in chosen]):
        name = next(name for name, p in chosen if not torch.isfinite(p).all())
        raise ValueError(f"params: parameter {name!r} has non-finite values")
    return chosen


@entry_point
def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``tensors`` (flattened, in order) into one 1-D tensor."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("flatten: argument 'tensors' is empty")
    return torch.cat([t.reshape(-1) for t in tensors])


@entry_point
def unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat ``vec`` into views shaped like the tensors of ``like`` (inverse of ``flatten``)."""
    like = list(like)
    total = sum(t.numel() for t in like)
    if vec.dim() != 1 or vec.numel() != total:
        raise ValueError(
            f"unflatten: argument 'vec' must be 1-D with {total} elements (the total size of 'like'), "
            f"got shape {tuple(vec.shape)}"
        )
    return [chunk.view_as(t) for chunk, t in zip(vec.split([t.numel() for t in like]), like)]
