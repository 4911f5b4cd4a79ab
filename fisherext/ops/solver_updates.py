r"""Fused flat-vector updates of the linear solvers in ``fisherext.linalg.solvers`` (part of kernel family K3), so
that a solver iteration is one matvec plus one launch.

Vectors are contiguous [P], or [P, K] with K right-hand sides as columns; the per-column scalars
(``alpha``, ``beta``) are [] or [K] in the compute dtype (float32 for half/bfloat16 vectors, else theirs),
so a solver feeds its own device-side reductions back without a host sync. None of these ops is
differentiable (they run under no_grad): autograd passes them through (``csrc/autograd.cpp``).

Kernels: ``csrc/cpu/solver_update_cpu.cpp``, ``csrc/cuda/solver_update_cuda.cu``; checks and per-element math
shared by both: ``csrc/solver_update_common.h``.
"""
from __future__ import annotations

import torch

from ._library import (
    check_finite_scalar,
    check_like,
    check_same_device,
    check_same_shape,
    check_tensor,
    opmath_dtype,
    scalar_arg,
    tensor_arg,
)

# ---- mirrors of the C++ checks (solver_update_common.h) for the fake kernels ----


def _check_flat(op, name, x):
    """Mirror of check_flat (solver_update_common.h): a contiguous nonempty [P] or [P, K]; returns (P, K, columns)."""
    check_tensor(op, name, x)
    if x.dim() not in (1, 2):
        raise ValueError(f"fisherext.{op}: argument '{name}' must have shape [P] or [P, K], got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"fisherext.{op}: argument '{name}' is empty (shape {tuple(x.shape)})")
    if not x.is_contiguous():
        raise ValueError(f"fisherext.{op}: argument '{name}' must be contiguous")
    return x.shape[0], (x.shape[1] if x.dim() == 2 else 1), x.dim() == 2


def _check_flat_like(op, name, t, ref_name, ref):
    check_same_shape(op, name, t, ref_name, ref)
    if not t.is_contiguous():
        raise ValueError(f"fisherext.{op}: argument '{name}' must be contiguous")


def _check_column_scalar(op, name, s, ref_name, ref, dims):
    """A per-column scalar: [] for [P] vectors, [K] for [P, K]; the compute dtype of the vectors."""
    check_tensor(op, name, s)
    want = opmath_dtype(ref.dtype)
    if s.dtype != want:
        raise TypeError(
            f"fisherext.{op}: argument '{name}' must have dtype {want} (the compute dtype of '{ref_name}' "
            f"{ref.dtype}), got {s.dtype}")
    check_same_device(op, name, s, ref_name, ref)
    _, K, columns = dims
    if tuple(s.shape) != ((K,) if columns else ()):
        want_shape = f"[{K}] (one per column)" if columns else "[]"
        raise ValueError(
            f"fisherext.{op}: argument '{name}' must have shape {want_shape} for '{ref_name}' of shape "
            f"{tuple(ref.shape)}, got {tuple(s.shape)}")


def _check_inv_diag(op, inv_diag, ref_name, ref, dims):
    if inv_diag is None:
        return
    check_like(op, "inv_diag", inv_diag, ref_name, ref)
    P = dims[0]
    if tuple(inv_diag.shape) != (P,):
        raise ValueError(
            f"fisherext.{op}: argument 'inv_diag' must have shape [{P}] (one entry per row of '{ref_name}'), "
            f"got {tuple(inv_diag.shape)}")


def _check_damping(op, damping):
    check_finite_scalar(op, "damping", damping, positive=False)
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"fisherext.{op}: argument 'damping' must be in [0, 1), got {damping}")


# ---- cg_update_ ----


def cg_update_(x: torch.Tensor, r: torch.Tensor, p: torch.Tensor, Ap: torch.Tensor, alpha: torch.Tensor,
               inv_diag: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The fused conjugate-gradient step: update the iterate and residual, and reduce the new residual.

    Vectors are contiguous [P], or [P, K] with K right-hand sides as columns; ``alpha`` holds one step
    per column ([] or [K]) in the compute dtype (float32 for half/bfloat16 vectors, else their dtype), so a
    solver feeds its own device-side reductions back without a host sync. ``alpha`` and ``inv_diag`` may
    have any strides (e.g. one step expanded to all columns); non-contiguous ones are copied (K and P
    elements). Per column k, in place:

    .. math:: x \mathrel{+}= \alpha_k\, p, \qquad r \mathrel{-}= \alpha_k\, A p

    and, of the new (stored) r, with :math:`z = \mathrm{inv\_diag} \odot r` (``z = r`` without a
    preconditioner), returns the per-column

    .. math:: rz_k = \sum_i r_{ik} z_{ik}, \qquad rr_k = \sum_i r_{ik}^2

    (shape of ``alpha``, compute dtype). The sums accumulate in float64 on both backends (the op is
    memory-bound) from fixed chunks combined in a fixed order, so they do not depend on the thread count.
    One parallel pass on CPU; on CUDA one update-and-partial-sum launch plus a tiny one combining the
    partials.

    Args:
        x: the iterate [P] or [P, K], updated in place.
        r: the residual, like ``x``, updated in place.
        p: the search direction, like ``x``.
        Ap: the operator applied to ``p``, like ``x``.
        alpha: the step of each column, [] or [K], compute dtype.
        inv_diag: optional diagonal preconditioner, like ``x`` (default none).

    Returns:
        ``(rz, rr)``, each shaped like ``alpha`` in the compute dtype.

    Raises:
        ValueError: ``x`` or ``r`` overlaps the other or ``p``, ``Ap``, ``alpha``, ``inv_diag``; or a shape,
            dtype or device does not match.
    """
    op = "cg_update_"
    return torch.ops.fisherext.cg_update_(
        tensor_arg(op, "x", x), tensor_arg(op, "r", r), tensor_arg(op, "p", p), tensor_arg(op, "Ap", Ap),
        tensor_arg(op, "alpha", alpha), None if inv_diag is None else tensor_arg(op, "inv_diag", inv_diag))


@torch.library.register_fake("fisherext::cg_update_")
def _cg_update_fake(x, r, p, Ap, alpha, inv_diag=None):
    op = "cg_update_"
    dims = _check_flat(op, "x", x)
    for name, t in (("r", r), ("p", p), ("Ap", Ap)):
        _check_flat_like(op, name, t, "x", x)
    _check_column_scalar(op, "alpha", alpha, "x", x, dims)
    _check_inv_diag(op, inv_diag, "x", x, dims)
    return torch.empty_like(alpha), torch.empty_like(alpha)


# ---- cg_direction_ ----


def cg_direction_(p: torch.Tensor, r: torch.Tensor, beta: torch.Tensor,
                  inv_diag: torch.Tensor | None = None) -> torch.Tensor:
    r"""The conjugate-gradient direction update, in place: per column k,

    .. math:: p \leftarrow z + \beta_k\, p, \qquad z = \mathrm{inv\_diag} \odot r \ (z = r \text{ without})

    Shapes and dtypes as in :func:`cg_update_`.

    Args:
        p: the search direction [P] or [P, K], updated in place.
        r: the residual, like ``p``.
        beta: the coefficient of each column, [] or [K] in the compute dtype (any strides).
        inv_diag: optional diagonal preconditioner, like ``p`` (default none).

    Returns:
        ``p``.

    Raises:
        ValueError: ``p`` overlaps ``r``, ``beta`` or ``inv_diag``; or a shape, dtype or device does not
            match.
    """
    op = "cg_direction_"
    torch.ops.fisherext.cg_direction_(
        tensor_arg(op, "p", p), tensor_arg(op, "r", r), tensor_arg(op, "beta", beta),
        None if inv_diag is None else tensor_arg(op, "inv_diag", inv_diag))
    return p


@torch.library.register_fake("fisherext::cg_direction_")
def _cg_direction_fake(p, r, beta, inv_diag=None):
    op = "cg_direction_"
    dims = _check_flat(op, "p", p)
    _check_flat_like(op, "r", r, "p", p)
    _check_column_scalar(op, "beta", beta, "p", p, dims)
    _check_inv_diag(op, inv_diag, "p", p, dims)


# ---- lissa_update_ ----


def lissa_update_(h: torch.Tensor, v: torch.Tensor, Hh: torch.Tensor, damping: float, scale: float) -> torch.Tensor:
    r"""One LiSSA recurrence step (Agarwal et al.; Koh & Liang), in place:

    .. math:: h \leftarrow v + (1 - d)\, h - \frac{H h}{s}

    with ``Hh`` the operator applied to the current h, damping d in [0, 1) and scale s > 0. Its fixed
    point is :math:`h = s\,(H + d s I)^{-1} v`. Computed in the compute dtype and rounded once.

    Args:
        h: the iterate [P] or [P, K], updated in place.
        v: the right-hand side, like ``h``.
        Hh: the operator applied to ``h``, like ``h``.
        damping: the kernel's relative damping d, in [0, 1).
        scale: the scale s, > 0.

    Returns:
        ``h``.

    Raises:
        ValueError: ``h`` overlaps ``v`` or ``Hh``, a scalar is out of range, or a shape, dtype or device
            does not match.
    """
    op = "lissa_update_"
    damping, scale = scalar_arg(op, "damping", damping), scalar_arg(op, "scale", scale)
    torch.ops.fisherext.lissa_update_(
        tensor_arg(op, "h", h), tensor_arg(op, "v", v), tensor_arg(op, "Hh", Hh), damping, scale)
    return h


@torch.library.register_fake("fisherext::lissa_update_")
def _lissa_update_fake(h, v, Hh, damping, scale):
    op = "lissa_update_"
    _check_flat(op, "h", h)
    _check_flat_like(op, "v", v, "h", h)
    _check_flat_like(op, "Hh", Hh, "h", h)
    _check_damping(op, damping)
    check_finite_scalar(op, "scale", scale, positive=True)


# ---- neumann_update_ ----


def neumann_update_(term: torch.Tensor, acc: torch.Tensor, Aterm: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One step of the Neumann series :math:`\sum_k (I - A/s)^k b`, in place:

    .. math:: \text{term} \leftarrow \text{term} - \frac{A\,\text{term}}{s}, \qquad
              \text{acc} \leftarrow \text{acc} + \text{term}

    ``acc`` adds the rounded new term.

    Args:
        term: the current term [P] or [P, K], updated in place.
        acc: the partial sum, like ``term``, updated in place.
        Aterm: the operator applied to ``term``, like ``term``.
        scale: the scale s, > 0.

    Returns:
        ``(term, acc)``.

    Raises:
        ValueError: ``term`` or ``acc`` overlaps the other or ``Aterm``, ``scale`` is out of range, or a
            shape, dtype or device does not match.
    """
    op = "neumann_update_"
    scale = scalar_arg(op, "scale", scale)
    torch.ops.fisherext.neumann_update_(
        tensor_arg(op, "term", term), tensor_arg(op, "acc", acc), tensor_arg(op, "Aterm", Aterm), scale)
    return term, acc


@torch.library.register_fake("fisherext::neumann_update_")
def _neumann_update_fake(term, acc, Aterm, scale):
    op = "neumann_update_"
    _check_flat(op, "term", term)
    _check_flat_like(op, "acc", acc, "term", term)
    _check_flat_like(op, "Aterm", Aterm, "term", term)
    check_finite_scalar(op, "scale", scale, positive=True)
