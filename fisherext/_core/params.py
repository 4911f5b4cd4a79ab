"""The selected parameters of a model, and flat vectors over them.

A flat vector concatenates the selected parameter tensors, each flattened, in
``model.named_parameters()`` order: the layout of every vector the package takes or returns. For a model
compiled by ``torch.compile(model)`` that is the order and the names of the original module
(:func:`original_module`): ``fc.weight``, not ``_orig_mod.fc.weight``.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from .checks import all_finite
from .distributed import check_unsharded
from .entry import entry_point


_COMPILED_PREFIX = "_orig_mod."  # how torch.compile's wrapper names the parameters of the module it wraps


def _compiled_wrapper_type():
    """torch.compile's module wrapper class, or None while torch.compile has never been used: the wrapper
    lives in torch._dynamo, whose import takes about a second, so it is looked up only once it is loaded
    (torch.compile loads it before any wrapper can exist)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is the module ``torch.compile(module)`` returns (an ``OptimizedModule``)."""
    wrapper = _compiled_wrapper_type()
    return wrapper is not None and isinstance(model, wrapper)


def original_module(model: nn.Module) -> nn.Module:
    """The module fisherext works on: for ``compiled = torch.compile(model)`` (an ``OptimizedModule``, whose
    parameters are named ``_orig_mod.<name>`` and whose forward runs TorchDynamo) the original ``model``,
    for any other module the module itself.

    Every entry point taking a model runs the original module's forward eagerly: the capture engine
    records a forward by hooks and a ``TorchFunctionMode`` on the submodules, finite differences move the
    parameters between forwards, and the torch.func transforms (``functional_call``, ``vmap``, ``jvp``)
    trace the forward themselves, all of which a forward compiled by dynamo would hide or compile again.
    The parameters are the same tensors, so the results are the original module's; the compiled model's
    forward is never traced, and the ``compile=`` option of the curvature products compiles its own graph
    of the original module. Code that calls the wrapper itself does so inside
    ``conventions.curvature_forward``, where the wrapper stands in for the original module
    (``conventions.original_forward``).
    """
    return model._orig_mod if is_compiled(model) else model


def resolve_params(model: nn.Module, params=None) -> list[tuple[str, nn.Parameter]]:
    """Selected parameters as (qualified name, parameter), in ``model.named_parameters()`` order, the names
    and order of :func:`original_module` for a compiled model.

    ``params``: None (every parameter with requires_grad), or an iterable of parameter names, modules
    (all their parameters) or parameter tensors. For a compiled model the names may be given either way,
    ``fc.weight`` as in the original module or ``_orig_mod.fc.weight`` as the wrapper lists it.
    """
    compiled = is_compiled(model)
    model = original_module(model)
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
                name = item.removeprefix(_COMPILED_PREFIX) if compiled else item
                if name not in by_name:
                    raise ValueError(f"params: the model has no parameter named {item!r}")
                ids.add(id(by_name[name]))
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
    check_unsharded(model, chosen)
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
