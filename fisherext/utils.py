"""Flat-vector helpers: a flat vector concatenates parameter tensors in the order given."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``tensors`` (flattened, in order) into one 1-D tensor."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("flatten: argument 'tensors' is empty")
    return torch.cat([t.reshape(-1) for t in tensors])


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


def check_choice(name: str, value, allowed) -> None:
    """Raises ValueError naming the argument when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")



def check_positive_int(name: str, value, optional: bool = False):
    """Returns ``value`` when it is an int ≥ 1 (or None, when ``optional``); else ValueError naming it."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return value


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite: one min/max pass per tensor (NaN propagates through
    both, ±inf lands in one) and a single host sync. ``torch.isfinite(t).all()`` is 6-10x slower on CPU
    (a boolean mask, an unvectorized reduction) and syncs once per tensor."""
    ends = [torch.stack(torch.aminmax(t.detach().reshape(-1))).double() for t in tensors if t.numel()]
    return not ends or bool(torch.isfinite(torch.cat(ends)).all())
