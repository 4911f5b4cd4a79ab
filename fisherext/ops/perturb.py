r"""Kernel family K2 (perturb): finite differences in parameter space.

``unflatten_axpy_`` sets parameters to :math:`\theta_{saved} \pm \varepsilon v` for every tensor in one pass
(and copies them back bit for bit), and ``fd_fisher_reduce`` turns the logits at
:math:`\theta \pm \varepsilon v` into per-sample Fisher quadratics and KL divergences in one pass over each row.

Kernels: ``csrc/cpu/perturb_cpu.cpp``, ``csrc/cuda/perturb_cuda.cu`` (one launch over the list:
``csrc/cuda/multi_tensor_apply.cuh``); checks and per-row math shared by both: ``csrc/perturb_common.h``.
Neither op is differentiable: autograd passes them through, so their outputs never require grad
(``csrc/autograd.cpp``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ._library import (
    check_finite_scalar,
    check_like,
    check_logits,
    check_same_shape,
    check_tensor,
    opmath_dtype,
    scalar_arg,
    tensor_arg,
)


def _tensor_list_arg(op, name, tensors):
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"fisherext.{op}: argument '{name}' must be a list of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        tensor_arg(op, f"{name}[{i}]", t)
    return list(tensors)


# ---- unflatten_axpy_ ----


def unflatten_axpy_(out: Sequence[torch.Tensor], x: torch.Tensor, v: torch.Tensor | None = None,
                    eps: float = 0.0) -> Sequence[torch.Tensor]:
    r"""Set every tensor of a list from a flat vector, in place: the parameter perturbation step.

    .. math:: \text{out}_i \leftarrow x[o_i : o_i + n_i] + \varepsilon\, v[o_i : o_i + n_i],
              \qquad n_i = \text{out}_i\text{.numel()},\quad o_i = n_0 + \dots + n_{i-1}

    With ``out`` the parameters, ``x`` a flat saved copy of them (:func:`fisherext.flatten`) and ``v`` a
    flat direction in the same order, this sets ``theta = theta_saved + eps v`` for all parameter tensors
    at once (``eps`` may be negative), so evaluating at ``theta ± eps v`` perturbs along the whole
    direction, not one tensor at a time. With ``v=None`` it copies ``x`` back bit for bit: the restore
    step (never add ``-eps v`` back: that drifts).

    Half and bfloat16 are computed in float32 and rounded once. One parallel pass
    on CPU; one kernel launch on CUDA (several only when a launch's metadata fills up), in the style of
    apex's multi_tensor_apply. The list travels to the kernel once, not once per operand, which is what
    makes a perturb/restore of a model with hundreds of parameter tensors cheap. Not differentiable:
    call it under ``torch.no_grad()``.

    Args:
        out: the tensors to set, each contiguous with the dtype and device of ``x``.
        x: a contiguous 1-D tensor of :math:`\sum_i n_i` elements.
        v: None (copy ``x`` back), or a direction like ``x``.
        eps: the step, of any sign.

    Returns:
        ``out``.

    Raises:
        ValueError: a tensor of ``out`` is not contiguous, has another dtype or device than ``x``, or shares
            memory with another tensor of the list; or ``x`` or ``v`` has the wrong size or overlaps ``out``
            (``x`` and ``v`` may overlap each other).
    """
    try:
        # Straight to the op: this runs once per perturbation, and checking a long list element by
        # element in Python would cost more than the kernel. The C++ checks name the argument.
        torch.ops.fisherext.unflatten_axpy_.default(out, x, v, eps)
    except (TypeError, RuntimeError):
        # The schema's parser rejected an argument's type: name it the way every other op does.
        op = "unflatten_axpy_"
        _tensor_list_arg(op, "out", out)
        tensor_arg(op, "x", x)
        if v is not None:
            tensor_arg(op, "v", v)
        scalar_arg(op, "eps", eps)
        raise
    return out


def _check_unflatten_axpy(op, out, x, v):
    """Mirror of check_unflatten_axpy (perturb_common.h)."""
    if len(out) == 0:
        raise ValueError(f"fisherext.{op}: argument 'out' is an empty list")
    check_tensor(op, "x", x)
    for i, t in enumerate(out):
        check_like(op, f"out[{i}]", t, "x", x)
        if not t.is_contiguous():
            raise ValueError(f"fisherext.{op}: argument 'out[{i}]' must be contiguous")
    total = sum(t.numel() for t in out)
    for name, t in [("x", x)] + ([("v", v)] if v is not None else []):
        check_like(op, name, t, "x", x)
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"fisherext.{op}: argument '{name}' must be a contiguous 1-D tensor, got shape "
                             f"{list(t.shape)}")
        if t.numel() != total:
            raise ValueError(f"fisherext.{op}: argument '{name}' has {t.numel()} elements but the tensors of "
                             f"'out' have {total} together")


@torch.library.register_fake("fisherext::unflatten_axpy_")
def _unflatten_axpy_fake(out, x, v, eps):
    _check_unflatten_axpy("unflatten_axpy_", out, x, v)
    check_finite_scalar("unflatten_axpy_", "eps", eps, positive=False)


# ---- fd_fisher_reduce ----


def fd_fisher_reduce(logits_plus: torch.Tensor, logits_minus: torch.Tensor, logits_0: torch.Tensor | None,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per-sample central-difference Fisher quadratic and KL divergences from perturbed logits.

    ``logits_plus`` and ``logits_minus`` [N, C] are a softmax classifier's logits at
    :math:`\theta + \varepsilon v` and :math:`\theta - \varepsilon v`; ``logits_0`` (or ``None``) those at
    :math:`\theta`. With :math:`p^\pm = \mathrm{softmax}(\text{logits}^\pm)`, it returns three [N] tensors:

    .. math::
        \text{quad}_n = \frac{1}{(2\varepsilon)^2} \sum_c (\log p^+_{nc} - \log p^-_{nc})(p^+_{nc} - p^-_{nc})
                      = v^\top F_n v + O(\varepsilon^2)

    where :math:`F_n = J_n^\top \Lambda_n J_n` is sample n's true Fisher (:math:`J_n` the Jacobian of the
    logits, :math:`\Lambda_n = \mathrm{diag}(p_n) - p_n p_n^\top`): both differences are
    :math:`2\varepsilon` times the directional derivatives of log p and p, whose product summed over
    classes is :math:`(Jv)^\top \Lambda (Jv)`. It is also the symmetrized KL divergence
    :math:`(\mathrm{KL}(p^+\|p^-) + \mathrm{KL}(p^-\|p^+)) / (2\varepsilon)^2`. No 1/N: average over n
    for the mean-normalized Fisher :math:`F = \frac1N \sum_n F_n`. And

    - with ``logits_0``: ``kl_plus`` :math:`= \mathrm{KL}(p^0\|p^+)`, ``kl_minus``
      :math:`= \mathrm{KL}(p^0\|p^-)`, each :math:`\tfrac12 \varepsilon^2 v^\top F_n v + O(\varepsilon^3)`,
      and their sum is :math:`\varepsilon^2 v^\top F_n v + O(\varepsilon^4)`;
    - without: ``kl_plus`` :math:`= \mathrm{KL}(p^-\|p^+)`, ``kl_minus`` :math:`= \mathrm{KL}(p^+\|p^-)`,
      each :math:`2 \varepsilon^2 v^\top F_n v + O(\varepsilon^3)`, with sum :math:`(2\varepsilon)^2\,\text{quad}`.

    Computed in one pass over each row with an online log-sum-exp (running max, rescaled sums), from
    :math:`\sum_c (\log p^+_c - \log p^-_c)(p^+_c - p^-_c) = E_{p^+}[\Delta] - E_{p^-}[\Delta]`,
    :math:`\Delta = \text{logits}^+ - \text{logits}^-`, and
    :math:`\mathrm{KL}(p\|q) = E_p[l_p - l_q] + \mathrm{lse}(l_q) - \mathrm{lse}(l_p)`. Logits must be finite.
    CPU: rows in parallel; CUDA: one warp per row with shuffle reductions.

    The computation and the outputs are in the compute dtype: float32 for half/bfloat16 logits (the KL
    terms are O(eps^2) and would underflow in half precision), else the logits' dtype. The estimate's
    error is about ``u / eps`` (cancellation; u the unit roundoff of the logits) plus ``eps^2``
    (truncation), smallest near ``eps = u^(1/3)``: about 5e-3 for float32 logits, 6e-6 for float64.

    Args:
        logits_plus, logits_minus: [N, C] logits at theta + eps v and theta - eps v.
        logits_0: [N, C] logits at theta, or None.
        eps: the step used for the perturbation, > 0.
    Returns:
        ``(quad, kl_plus, kl_minus)``, each [N].
    """
    op = "fd_fisher_reduce"
    eps = scalar_arg(op, "eps", eps)
    check_finite_scalar(op, "eps", eps, positive=True)
    if logits_0 is not None:
        tensor_arg(op, "logits_0", logits_0)
    return torch.ops.fisherext.fd_fisher_reduce(
        tensor_arg(op, "logits_plus", logits_plus), tensor_arg(op, "logits_minus", logits_minus), logits_0, eps)


@torch.library.register_fake("fisherext::fd_fisher_reduce")
def _fd_fisher_reduce_fake(logits_plus, logits_minus, logits_0, eps):
    op = "fd_fisher_reduce"
    check_logits(op, "logits_plus", logits_plus)
    check_same_shape(op, "logits_minus", logits_minus, "logits_plus", logits_plus)
    if logits_0 is not None:
        check_same_shape(op, "logits_0", logits_0, "logits_plus", logits_plus)
    check_finite_scalar(op, "eps", eps, positive=True)
    dtype = opmath_dtype(logits_plus.dtype)
    return tuple(logits_plus.new_empty(logits_plus.shape[:1], dtype=dtype) for _ in range(3))
