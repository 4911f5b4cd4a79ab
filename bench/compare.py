"""Relative errors of a result against its float64 reference, on the CPU in float64.

A result is a tensor, or (K-FAC) a list of (A, G) factor pairs, one per layer.
"""
from __future__ import annotations

import torch


def to_cpu64(result):
    """The result detached, in float64 on the CPU (a list of factor pairs pair by pair)."""
    if isinstance(result, torch.Tensor):
        return result.detach().to("cpu", torch.float64, copy=True)  # a copy: in-place ops write their input again
    return [tuple(to_cpu64(t) for t in pair) for pair in result]


def relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    """max |result − expected| / max |expected| (an all-zero ``expected`` divides by 1)."""
    if not isinstance(result, torch.Tensor):
        raise ValueError(f"result is a {type(result).__name__}, the reference a tensor")
    if result.shape != expected.shape:
        raise ValueError(f"result has shape {tuple(result.shape)}, the reference {tuple(expected.shape)}")
    if not torch.isfinite(result).all():
        raise ValueError("result has non-finite values")
    scale = expected.abs().max().item() or 1.0
    return (result - expected).abs().max().item() / scale


def kfac_error(result, expected) -> float:
    r"""The largest relative error over layers of :math:`A/\lVert A\rVert`, :math:`G/\lVert G\rVert` and
    :math:`\lVert A\rVert\lVert G\rVert`: only the Kronecker product G ⊗ A is defined, not how an impl
    splits its scale between the two factors."""
    if isinstance(result, torch.Tensor) or len(result) != len(expected):
        got = "a tensor" if isinstance(result, torch.Tensor) else f"{len(result)} layers"
        raise ValueError(f"result has {got}, the reference {len(expected)} layers")
    errors = []
    for (A, G), (A_ref, G_ref) in zip(result, expected):
        norms = []
        for factor, ref in ((A, A_ref), (G, G_ref)):
            norm, ref_norm = factor.norm(), ref.norm()
            errors.append(relative_error(factor / norm, ref / ref_norm))
            norms.append((norm, ref_norm))
        product, ref_product = norms[0][0] * norms[1][0], norms[0][1] * norms[1][1]
        errors.append(abs((product - ref_product) / ref_product).item())
    return max(errors)
