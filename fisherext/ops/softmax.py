r"""The softmax cross-entropy Hessian of each logit row (part of kernel family K3).

Per logit row :math:`z` with :math:`p = \mathrm{softmax}(z)`, the Hessian of :math:`-\log \mathrm{softmax}(z)_y` is
:math:`H = \mathrm{diag}(p) - p p^\top` for every label y: ``softmax_hvp`` applies it to vectors
(Gauss-Newton / Fisher-vector products; differentiable, its derivative registered here),
``softmax_hessian_sqrt`` factors it into square-root columns (true-Fisher backprop; autograd passes it
through, ``csrc/autograd.cpp``).

Kernels: ``csrc/cpu/softmax_cpu.cpp``, ``csrc/cuda/softmax_cuda.cu``; checks shared by both:
``csrc/softmax_common.h``.
"""
from __future__ import annotations

import torch

from ._library import check_like, check_logits, opmath_dtype, tensor_arg

# ---- softmax_hvp ----


def softmax_hvp(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    r"""Softmax cross-entropy Hessian of each logit row applied to vectors.

    With :math:`p_n = \mathrm{softmax}(z_n)` for the logit rows :math:`z_n` of ``logits`` [N, C],

    .. math:: \text{out}_n = H_n u_n = p_n \odot u_n - p_n\,(p_n^\top u_n),
              \qquad H_n = \nabla^2_{z} \big(-\log \mathrm{softmax}(z)_y\big)\big|_{z_n}
              = \mathrm{diag}(p_n) - p_n p_n^\top

    (independent of the label y). ``H_n`` is also the Fisher of the categorical distribution in logit space,
    so ``J^T softmax_hvp(z, J v)`` is a Gauss-Newton / Fisher-vector product. ``u`` is [N, C], or [K, N, C]
    for K directions sharing the logits (p is formed once per row). No 1/N: each row is one sample's Hessian.

    Numerically stable (the row max is subtracted before exp) and computed as :math:`p \odot (u - p^\top u)`.
    Half and bfloat16 are computed in float32 and rounded once. Differentiable with respect to both
    arguments (``d/du`` is the op itself since H is symmetric; ``d/dlogits`` is
    :math:`\text{out} \odot (g - p^\top g) - p\,(g^\top \text{out})` for the cotangent g).

    Args:
        logits: [N, C].
        u: [N, C], or [K, N, C] for K directions.

    Returns:
        a tensor of u's shape and dtype.
    """
    op = "softmax_hvp"
    return torch.ops.fisherext.softmax_hvp(tensor_arg(op, "logits", logits), tensor_arg(op, "u", u))


def _check_u(op, u, logits):
    check_like(op, "u", u, "logits", logits)
    if u.dim() not in (2, 3) or u.shape[-2:] != logits.shape:
        N, C = logits.shape
        raise ValueError(
            f"fisherext.{op}: argument 'u' must have shape {tuple(logits.shape)} or [K, {N}, {C}] to match "
            f"'logits', got {tuple(u.shape)}")
    if u.numel() == 0:
        raise ValueError(f"fisherext.{op}: argument 'u' is empty (shape {tuple(u.shape)})")


@torch.library.register_fake("fisherext::softmax_hvp")
def _softmax_hvp_fake(logits, u):
    check_logits("softmax_hvp", "logits", logits)
    _check_u("softmax_hvp", u, logits)
    return torch.empty_like(u, memory_format=torch.contiguous_format)


# The derivative of softmax_hvp. With out = H u = p ⊙ (u − s), s = pᵀu, per row and direction:
#   d/du:  H is symmetric, so the cotangent g maps to H g: the op itself.
#   d/dz:  dp_c/dz_i = p_c (δ_ci − p_i) and ds/dz_i = p_i (u_i − s) = out_i give
#          ∂out_c/∂z_i = p_c (δ_ci − p_i)(u_c − s) − p_c out_i, hence
#          (gᵀ ∂out/∂z)_i = out_i (g_i − pᵀg) − p_i (gᵀout),  summed over the K directions sharing z.
# Composed of differentiable ops, so it can be differentiated again.


def _softmax_hvp_setup_context(ctx, inputs, output):
    logits, _ = inputs
    ctx.save_for_backward(logits, output)


def _softmax_hvp_backward(ctx, grad):
    logits, out = ctx.saved_tensors
    grad_logits = grad_u = None
    if ctx.needs_input_grad[1]:
        grad_u = torch.ops.fisherext.softmax_hvp(logits, grad)
    if ctx.needs_input_grad[0]:
        dtype = opmath_dtype(logits.dtype)
        p = torch.softmax(logits.to(dtype), dim=-1)
        g, o = grad.to(dtype), out.to(dtype)
        gz = o * (g - (p * g).sum(-1, keepdim=True)) - p * (g * o).sum(-1, keepdim=True)
        grad_logits = (gz.sum(0) if gz.dim() == 3 else gz).to(logits.dtype)
    return grad_logits, grad_u


torch.library.register_autograd(
    "fisherext::softmax_hvp", _softmax_hvp_backward, setup_context=_softmax_hvp_setup_context)


# ---- softmax_hessian_sqrt ----


def softmax_hessian_sqrt(logits: torch.Tensor) -> torch.Tensor:
    r"""Square-root columns of the softmax cross-entropy Hessian of each logit row.

    With :math:`p_n = \mathrm{softmax}(z_n)`, returns S of shape [C, N, C] with

    .. math:: S[k, n, :] = \sqrt{p_{nk}}\,(e_k - p_n), \qquad
              \sum_k S[k, n, :]\, S[k, n, :]^\top = \mathrm{diag}(p_n) - p_n p_n^\top = \Lambda_n

    (using :math:`\sum_k p_{nk} = 1`). Backpropagating the C slices ``S[k]`` as output cotangents gives
    per-sample gradients :math:`g_{nk} = J_n^\top S[k, n]` with :math:`\sum_k g_{nk} g_{nk}^\top = J_n^\top
    \Lambda_n J_n`, the true Fisher of sample n, in one batched backward (``kind="true"`` in
    :func:`fisherext.capture.fisher`). Stable softmax; half/bfloat16 computed in float32.

    Not differentiable: the output never requires grad (autograd passes the op through, ``csrc/autograd.cpp``),
    since the factor is a constant cotangent for backprop, formed from detached logits.

    Args:
        logits: [N, C].

    Returns:
        S, [C, N, C] in the dtype of ``logits``.
    """
    return torch.ops.fisherext.softmax_hessian_sqrt(tensor_arg("softmax_hessian_sqrt", "logits", logits))


@torch.library.register_fake("fisherext::softmax_hessian_sqrt")
def _softmax_hessian_sqrt_fake(logits):
    check_logits("softmax_hessian_sqrt", "logits", logits)
    N, C = logits.shape
    return logits.new_empty((C, N, C))
