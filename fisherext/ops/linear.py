r"""Kernel family K1 (fisher_accum): per-sample accumulations of a linear map's gradients.

A linear map (nn.Linear, or a convolution unfolded to positions t) sees inputs ``a`` of shape [N, I] or
[N, T, I] and receives output gradients ``delta`` of shape [N, O] or [N, T, O]. The per-sample weight
gradient is :math:`g_n = \sum_t \delta_{nt} a_{nt}^\top` (O x I), vectorized row-major (``vec(g)[o*I + i]``,
the order of ``weight.flatten()``). No op here writes the N x O x I per-sample gradients to memory at once;
scratch is bounded by a fixed chunk size independent of N. Half and bfloat16 inputs are accumulated in
float32; on CUDA the GEMMs whose operands are both inputs run on tensor cores (cuBLAS, float32 accumulation).

Kernels: ``csrc/fisher_accum_gemm.cpp`` (compositions of ATen GEMMs for any device: cuBLAS on CUDA, the CPU
BLAS on CPU), ``csrc/cpu/fisher_accum_cpu.cpp``, ``csrc/cuda/fisher_accum_cuda.cu``; checks shared by all:
``csrc/fisher_accum_common.h``. None of these ops is differentiable: a backward through one raises an
error naming it (``csrc/autograd.cpp``).
"""
from __future__ import annotations

import torch

from ._library import (
    check_like,
    check_nonempty,
    check_same_device,
    check_tensor,
    opmath_dtype,
    scalar_arg,
    tensor_arg,
)

# ---- mirrors of the C++ checks (checks.h) for the fake kernels ----


def _check_linear(op, a, delta, class_axis=False):
    """Mirror of check_linear: returns (N, C, T, I, O) for a [N,(T,)I] and delta [N,(C,)(T,)O]."""
    check_tensor(op, "a", a)
    check_like(op, "delta", delta, "a", a)
    if a.dim() not in (2, 3):
        raise ValueError(f"fisherext.{op}: argument 'a' must have shape [N, I] or [N, T, I], got {tuple(a.shape)}")
    extra = 1 if class_axis else 0
    if delta.dim() != a.dim() + extra:
        want = ("[N, C, O]" if a.dim() == 2 else "[N, C, T, O]") if class_axis else (
            "[N, O]" if a.dim() == 2 else "[N, T, O]")
        raise ValueError(
            f"fisherext.{op}: argument 'delta' must have shape {want} to match a {tuple(a.shape)}, "
            f"got {tuple(delta.shape)}"
        )
    check_nonempty(op, "a", a)
    check_nonempty(op, "delta", delta)
    N, T, I, O = a.shape[0], (a.shape[1] if a.dim() == 3 else 1), a.shape[-1], delta.shape[-1]
    C = delta.shape[1] if class_axis else 1
    if delta.shape[0] != N:
        raise ValueError(f"fisherext.{op}: 'a' and 'delta' disagree on N ({N} vs {delta.shape[0]})")
    if a.dim() == 3 and delta.shape[1 + extra] != T:
        raise ValueError(f"fisherext.{op}: 'a' and 'delta' disagree on T ({T} vs {delta.shape[1 + extra]})")
    return N, C, T, I, O


def _check_weight(op, weight, ref_name, ref, N):
    if weight is None:
        return
    check_like(op, "weight", weight, ref_name, ref)
    if weight.dim() != 1 or weight.shape[0] != N:
        raise ValueError(
            f"fisherext.{op}: argument 'weight' must have shape [{N}] (one weight per sample), "
            f"got {tuple(weight.shape)}"
        )


def _has_distinct_elements(t):
    """Mirror of has_distinct_elements: the strides, in increasing order, each exceed the largest offset
    reachable through the smaller ones (sufficient for one memory location per element)."""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


def _check_square_out(op, out, ref_name, ref, D):
    """Mirror of check_square_out: [D, D] on ref's device, in ref's dtype or (half/bfloat16 ref) float32."""
    check_tensor(op, "out", out)
    if out.dtype not in (ref.dtype, opmath_dtype(ref.dtype)):
        raise TypeError(
            f"fisherext.{op}: argument 'out' has dtype {out.dtype} but '{ref_name}' has {ref.dtype} "
            "(out must have its dtype, or float32 for float16/bfloat16)")
    check_same_device(op, "out", out, ref_name, ref)
    if out.dim() != 2 or tuple(out.shape) != (D, D):
        raise ValueError(f"fisherext.{op}: argument 'out' must have shape [{D}, {D}], got {tuple(out.shape)}")
    if not _has_distinct_elements(out):
        raise ValueError(
            f"fisherext.{op}: argument 'out' has elements that share memory (strides {list(out.stride())}, e.g. an "
            "expanded tensor); an in-place output needs one memory location per element")


def _check_rows(op, x):
    check_tensor(op, "x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"fisherext.{op}: argument 'x' must have shape [N, D] or [N, T, D], got {tuple(x.shape)}")
    check_nonempty(op, "x", x)
    return x.shape[0], x.shape[-1]


# ---- linear_sq_grad ----


def linear_sq_grad(a: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""Per-sample squared-gradient sum of a linear map (the diagonal-Fisher core).

    .. math:: S = \sum_n w_n \, g_n \odot g_n,\qquad g_n = \sum_t \delta_{nt} a_{nt}^\top \in \mathbb{R}^{O\times I}

    With ``delta`` the gradients of the per-sample negative log-likelihoods and ``w = 1/N``, ``S`` is the
    diagonal of the empirical Fisher ``F = (1/N) sum_n g_n g_n^T`` for the layer's weight (not the
    square of the summed gradient). For T = 1 this is one GEMM, ``(w delta^2)^T a^2``; for T > 1 each
    per-sample gradient is formed one register (CPU) or shared-memory (CUDA) tile at a time, squared
    into ``S`` and never stored, except for long sequences on CUDA (T >= 64 for half/bfloat16, 128
    otherwise), where batched GEMMs write a chunk of per-sample gradients, squared and summed by a GEMV.

    Args:
        a: layer inputs, [N, I] or [N, T, I].
        delta: output gradients, [N, O] or [N, T, O].
        weight: optional per-sample weights [N] (default all ones).

    Returns:
        [O, I] tensor, dtype of ``a``.
    """
    op = "linear_sq_grad"
    return torch.ops.fisherext.linear_sq_grad(tensor_arg(op, "a", a), tensor_arg(op, "delta", delta), weight)


@torch.library.register_fake("fisherext::linear_sq_grad")
def _linear_sq_grad_fake(a, delta, weight=None):
    N, _, _, I, O = _check_linear("linear_sq_grad", a, delta)
    _check_weight("linear_sq_grad", weight, "a", a, N)
    return a.new_empty((O, I))


# ---- linear_outer_accum_ ----


def linear_outer_accum_(out: torch.Tensor, a: torch.Tensor, delta: torch.Tensor,
                        weight: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    r"""Accumulate per-sample outer products of a linear map's gradients, in place.

    .. math:: \text{out} \mathrel{+}= \alpha \sum_n w_n\, \mathrm{vec}(g_n)\mathrm{vec}(g_n)^\top,
              \qquad g_n = \sum_t \delta_{nt} a_{nt}^\top

    ``out`` is [O*I, O*I] and symmetric: only its upper triangle is read, and the result is written
    exactly symmetric. A chunk of per-sample gradients (in the compute dtype) comes from one batched
    GEMM, and only the 512-wide tile rows on and above the diagonal are multiplied. Scratch: that chunk,
    of fixed size, never N x O x I.

    Args:
        out: the accumulator [O*I, O*I], updated in place; ``a``'s dtype, or float32 for float16/bfloat16
            ``a`` (then the sum is never rounded to half precision).
        a: layer inputs, [N, I] or [N, T, I].
        delta: output gradients, [N, O] or [N, T, O].
        weight: optional per-sample weights [N] (default all ones).
        alpha: the factor of the sum.

    Returns:
        ``out``.

    Raises:
        ValueError: ``out`` shares memory with ``a``, ``delta`` or ``weight``, or two of its elements share
            one location (an expanded tensor); or a shape, dtype or device does not match.
    """
    op = "linear_outer_accum_"
    torch.ops.fisherext.linear_outer_accum_(
        tensor_arg(op, "out", out), tensor_arg(op, "a", a), tensor_arg(op, "delta", delta), weight,
        scalar_arg(op, "alpha", alpha))
    return out


@torch.library.register_fake("fisherext::linear_outer_accum_")
def _linear_outer_accum_fake(out, a, delta, weight=None, alpha=1.0):
    N, _, _, I, O = _check_linear("linear_outer_accum_", a, delta)
    _check_weight("linear_outer_accum_", weight, "a", a, N)
    _check_square_out("linear_outer_accum_", out, "a", a, O * I)


# ---- sym_outer_accum_ and kfac_factor_update_ ----


def sym_outer_accum_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None,
                     alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    r"""Symmetric rank-k update of ``out`` [D, D], in place.

    .. math:: \text{out} \leftarrow \beta\,\text{out} + \alpha \sum_n w_n \sum_t x_{nt} x_{nt}^\top

    ``x`` is [N, D] (e.g. a chunk of per-sample gradients G [N, P] for a dense Fisher) or [N, T, D]
    (e.g. layer inputs over positions, for a Kronecker factor). Only the upper triangle of ``out`` is
    read; with ``beta = 0`` its old content is ignored (NaN included). GEMMs on the 512-wide tile rows on
    and above the diagonal (about half the work of the full product), then the lower triangle is mirrored.
    Half/bfloat16 rows are multiplied in their dtype on CUDA (tensor cores, float32 accumulation); with
    weights each side carries ``sqrt(|w|)`` (and one its sign), rounded once to ``x``'s dtype, so that weights
    far from 1 stay within float16's range.

    Args:
        out: the accumulator [D, D], updated in place; ``x``'s dtype, or float32 for float16/bfloat16 ``x``
            (then the sum is never rounded to half precision).
        x: [N, D] or [N, T, D].
        weight: optional per-sample weights [N] (default all ones).
        alpha: the factor of the sum.
        beta: the factor of the old ``out``.

    Returns:
        ``out``.

    Raises:
        ValueError: ``out`` shares memory with ``x`` or ``weight``, or two of its elements share one location
            (an expanded tensor); or a shape, dtype or device does not match.
    """
    op = "sym_outer_accum_"
    torch.ops.fisherext.sym_outer_accum_(
        tensor_arg(op, "out", out), tensor_arg(op, "x", x), weight,
        scalar_arg(op, "alpha", alpha), scalar_arg(op, "beta", beta))
    return out


@torch.library.register_fake("fisherext::sym_outer_accum_")
def _sym_outer_accum_fake(out, x, weight=None, alpha=1.0, beta=1.0):
    N, D = _check_rows("sym_outer_accum_", x)
    _check_weight("sym_outer_accum_", weight, "x", x, N)
    _check_square_out("sym_outer_accum_", out, "x", x, D)


def kfac_factor_update_(factor: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None,
                        decay: float | None = None) -> torch.Tensor:
    r"""Update a Kronecker factor (K-FAC's A = E[a a^T] or G = E[delta delta^T]) in place.

    With ``decay=None`` it accumulates the sum

    .. math:: \text{factor} \mathrel{+}= \sum_n w_n \sum_t x_{nt} x_{nt}^\top;

    with ``decay=b`` in [0, 1) it keeps a running average of per-batch means

    .. math:: \text{factor} \leftarrow b\,\text{factor} + (1 - b)\,\frac1N \sum_n w_n \sum_t x_{nt} x_{nt}^\top .

    A composition of :func:`sym_outer_accum_`, not an op of its own.

    Args:
        factor: the factor [D, D], updated in place.
        x: [N, D] or [N, T, D].
        weight: optional per-sample weights [N] (default all ones).
        decay: None (accumulate the sum) or the running average's b, in [0, 1).

    Returns:
        ``factor``.

    Raises:
        ValueError: ``decay`` is out of range, ``x`` is empty, or as :func:`sym_outer_accum_`.
    """
    op = "kfac_factor_update_"
    if decay is None:
        return sym_outer_accum_(factor, x, weight)
    decay = scalar_arg(op, "decay", decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"fisherext.{op}: argument 'decay' must be in [0, 1), got {decay}")
    if tensor_arg(op, "x", x).dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"fisherext.{op}: argument 'x' is empty (shape {tuple(x.shape)})")
    return sym_outer_accum_(factor, x, weight, alpha=(1.0 - decay) / x.shape[0], beta=decay)


# ---- class_gram ----


def class_gram(a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    r"""Per-sample class Gram matrices of a linear map's Jacobian.

    .. math:: K_n = J_n J_n^\top \in \mathbb{R}^{C\times C},\qquad
              J_n[c] = \mathrm{vec}\Big(\sum_t \delta_{nct} a_{nt}^\top\Big)

    where ``delta[n, c]`` is the output gradient of the c-th backpropagated vector (e.g. the c-th
    column of a square root of the loss Hessian, or the c-th logit). Summed over layers, the per-input
    Fisher trace is ``tr(F_n) = tr(Lambda_n K_n)`` (or ``tr(K_n)`` when ``delta`` already carries the
    square root of ``Lambda_n``). Batched GEMMs (cuBLAS on CUDA) over chunks of samples, in whichever
    exact form needs the fewest multiply-adds per sample: for T = 1, ``K_n = |a_n|^2 delta_n delta_n^T``
    (``I + C^2 O``); for T > 1 through the position Gram ``a_n a_n^T`` (``T^2 I + C T^2 O + C^2 T O``) or
    from the per-class gradients (``C T O I + C^2 O I``). Exactly symmetric.

    Args:
        a: [N, I] or [N, T, I].
        delta: [N, C, O] or [N, C, T, O].
    Returns:
        [N, C, C] tensor, dtype of ``a``.
    """
    op = "class_gram"
    return torch.ops.fisherext.class_gram(tensor_arg(op, "a", a), tensor_arg(op, "delta", delta))


@torch.library.register_fake("fisherext::class_gram")
def _class_gram_fake(a, delta):
    N, C, _, _, _ = _check_linear("class_gram", a, delta, class_axis=True)
    return a.new_empty((N, C, C))
