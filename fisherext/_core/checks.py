"""Argument checks shared by every entry point: choices, counts, finite-difference steps, flat vectors
over the selected parameters and model inputs."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


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


def check_eps(eps, positive=True, name="eps") -> float:
    """A finite-difference step: a finite number (positive unless ``positive=False``), named ``name``."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"{name}: must be a finite number, got {eps!r}")
    if positive and eps <= 0:
        raise ValueError(f"{name}: must be positive, got {eps!r}")
    return float(eps)


def check_vectors(v, selected, n=None) -> torch.Tensor:
    """v as [P] (one direction) or, when n is given, also [n, P]: n rows, or any number for n="K"."""
    P = sum(p.numel() for _, p in selected)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v: expected a tensor of length {P}, got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"v: expected a floating-point tensor, got {v.dtype}")
    rows_ok = n is not None and v.dim() == 2 and v.shape[1] == P and (n == "K" or v.shape[0] == n)
    if tuple(v.shape) != (P,) and not rows_ok:
        want = f"[{P}]" + ("" if n is None else f" or [{n}, {P}]")
        raise ValueError(f"v: expected shape {want} over the {len(selected)} selected parameter tensors, "
                         f"got {tuple(v.shape)}")
    device = selected[0][1].device
    if v.device != device:
        raise ValueError(f"v: is on {v.device} but the parameters are on {device}")
    if not all_finite([v]):
        raise ValueError("v: has non-finite entries")
    return v


def check_inputs(model, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"data: inputs x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point() and not any(isinstance(m, nn.Embedding) for m in model.modules()):
        raise TypeError(f"data: inputs x have dtype {x.dtype}; the model needs floating-point inputs")



def check_float_batch(name: str, x, *, finite: bool = False) -> None:
    """``x`` a non-empty floating-point batch [N, ...] (and finite, with ``finite``): TypeError or
    ValueError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of inputs [N, ...], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: the inputs must be floating point, got {x.dtype}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch [N, ...], got shape {tuple(x.shape)}")
    if finite and not all_finite([x]):
        raise ValueError(f"{name}: has non-finite entries")
