"""Python side of the compiled ops: loading ``fisherext._C``, fake (meta) kernels, and thin wrappers.

Every op is declared in ``csrc/fisherext.cpp``; its CPU kernel is in ``csrc/cpu/``, its CUDA kernel in
``csrc/cuda/``, and its pure-PyTorch twin in ``fisherext/reference.py``.

Notation. A linear map (nn.Linear, or a convolution unfolded to positions t) sees inputs
``a`` of shape [N, I] or [N, T, I] and receives output gradients ``delta`` of shape [N, O] or
[N, T, O]. The per-sample weight gradient is ``g_n = sum_t delta_nt a_nt^T`` (O x I), vectorized
row-major (``vec(g)[o*I + i]``, the order of ``weight.flatten()``). No op here writes the N x O x I
per-sample gradients to memory; scratch is bounded by a fixed chunk size independent of N.
Half and bfloat16 inputs are accumulated in float32.
"""
from __future__ import annotations

import torch

from . import _C  # registers torch.ops.fisherext.* (torch must be imported first)

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def build_info() -> dict:
    """What was compiled: version, torch, whether CUDA kernels were built, arch list, and op names."""
    from . import __version__

    info = dict(_C.build_info())
    info["version"] = __version__
    info["torch"] = torch.__version__
    info["ops"] = sorted(
        name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("fisherext::")
    )
    return info


# ---------------------------------------------------------------------------------------------------
# Argument checks for the fake kernels (the compiled kernels run the same checks in C++: checks.h).


def _check_tensor(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fisherext.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT:
        raise TypeError(
            f"fisherext.{op}: argument '{name}' must be a floating-point tensor "
            f"(float16/bfloat16/float32/float64), got {t.dtype}"
        )


def _check_like(op, name, t, ref_name, ref):
    _check_tensor(op, name, t)
    if t.dtype != ref.dtype:
        raise TypeError(f"fisherext.{op}: argument '{name}' has dtype {t.dtype} but '{ref_name}' has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"fisherext.{op}: argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}")


def _check_linear(op, a, delta, class_axis=False):
    """Returns (N, C, T, I, O) for a [N,(T,)I] and delta [N,(C,)(T,)O]."""
    _check_tensor(op, "a", a)
    _check_like(op, "delta", delta, "a", a)
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
    for name, t in (("a", a), ("delta", delta)):
        if t.numel() == 0:
            raise ValueError(f"fisherext.{op}: argument '{name}' is empty (shape {tuple(t.shape)})")
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
    _check_like(op, "weight", weight, ref_name, ref)
    if weight.dim() != 1 or weight.shape[0] != N:
        raise ValueError(
            f"fisherext.{op}: argument 'weight' must have shape [{N}] (one weight per sample), "
            f"got {tuple(weight.shape)}"
        )


def _check_square_out(op, out, ref_name, ref, D):
    _check_like(op, "out", out, ref_name, ref)
    if out.dim() != 2 or tuple(out.shape) != (D, D):
        raise ValueError(f"fisherext.{op}: argument 'out' must have shape [{D}, {D}], got {tuple(out.shape)}")


def _check_rows(op, x):
    _check_tensor(op, "x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"fisherext.{op}: argument 'x' must have shape [N, D] or [N, T, D], got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"fisherext.{op}: argument 'x' is empty (shape {tuple(x.shape)})")
    return x.shape[0], x.shape[-1]


# ---------------------------------------------------------------------------------------------------
# Fake kernels (shape/dtype propagation for torch.compile, FakeTensor and meta tensors).


@torch.library.register_fake("fisherext::linear_sq_grad")
def _linear_sq_grad_fake(a, delta, weight=None):
    N, _, _, I, O = _check_linear("linear_sq_grad", a, delta)
    _check_weight("linear_sq_grad", weight, "a", a, N)
    return a.new_empty((O, I))


@torch.library.register_fake("fisherext::linear_outer_accum_")
def _linear_outer_accum_fake(out, a, delta, weight=None, alpha=1.0):
    N, _, _, I, O = _check_linear("linear_outer_accum_", a, delta)
    _check_weight("linear_outer_accum_", weight, "a", a, N)
    _check_square_out("linear_outer_accum_", out, "a", a, O * I)


@torch.library.register_fake("fisherext::sym_outer_accum_")
def _sym_outer_accum_fake(out, x, weight=None, alpha=1.0, beta=1.0):
    N, D = _check_rows("sym_outer_accum_", x)
    _check_weight("sym_outer_accum_", weight, "x", x, N)
    _check_square_out("sym_outer_accum_", out, "x", x, D)


@torch.library.register_fake("fisherext::class_gram")
def _class_gram_fake(a, delta):
    N, C, _, _, _ = _check_linear("class_gram", a, delta, class_axis=True)
    return a.new_empty((N, C, C))


# ---------------------------------------------------------------------------------------------------
# Public wrappers (fisherext.ops.*).


def _tensor_arg(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fisherext.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    return t


def _scalar_arg(op, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fisherext.{op}: argument '{name}' must be a real number, got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"fisherext.{op}: argument '{name}' must be finite, got {value}")
    return float(value)


def linear_sq_grad(a: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""Per-sample squared-gradient sum of a linear map (the diagonal-Fisher core).

    .. math:: S = \sum_n w_n \, g_n \odot g_n,\qquad g_n = \sum_t \delta_{nt} a_{nt}^\top \in \mathbb{R}^{O\times I}

    With ``delta`` the gradients of the per-sample negative log-likelihoods and ``w = 1/N``, ``S`` is the
    diagonal of the empirical Fisher ``F = (1/N) sum_n g_n g_n^T`` for the layer's weight (not the
    square of the summed gradient). For T = 1 this is one GEMM, ``(w delta^2)^T a^2``; for T > 1 each
    per-sample gradient is formed one register (CPU) or shared-memory (CUDA) tile at a time, squared
    into ``S`` and never stored.

    Args:
        a: layer inputs, [N, I] or [N, T, I].
        delta: output gradients, [N, O] or [N, T, O].
        weight: optional per-sample weights [N] (default all ones).
    Returns:
        [O, I] tensor, dtype of ``a``.
    """
    op = "linear_sq_grad"
    return torch.ops.fisherext.linear_sq_grad(_tensor_arg(op, "a", a), _tensor_arg(op, "delta", delta), weight)


def linear_outer_accum_(out: torch.Tensor, a: torch.Tensor, delta: torch.Tensor,
                        weight: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    r"""Accumulate per-sample outer products of a linear map's gradients, in place.

    .. math:: \text{out} \mathrel{+}= \alpha \sum_n w_n\, \mathrm{vec}(g_n)\mathrm{vec}(g_n)^\top,
              \qquad g_n = \sum_t \delta_{nt} a_{nt}^\top

    ``out`` is [O*I, O*I] and symmetric: only its upper triangle is read, and the result is written
    exactly symmetric. Only tiles on or above the diagonal are multiplied. Scratch: a chunk of
    per-sample gradients of fixed size, never N x O x I. Returns ``out``.
    """
    op = "linear_outer_accum_"
    torch.ops.fisherext.linear_outer_accum_(
        _tensor_arg(op, "out", out), _tensor_arg(op, "a", a), _tensor_arg(op, "delta", delta), weight,
        _scalar_arg(op, "alpha", alpha))
    return out


def sym_outer_accum_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None,
                     alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    r"""Symmetric rank-k update of ``out`` [D, D], in place.

    .. math:: \text{out} \leftarrow \beta\,\text{out} + \alpha \sum_n w_n \sum_t x_{nt} x_{nt}^\top

    ``x`` is [N, D] (e.g. a chunk of per-sample gradients G [N, P] for a dense Fisher) or [N, T, D]
    (e.g. layer inputs over positions, for a Kronecker factor). Only the upper triangle of ``out`` is
    read; with ``beta = 0`` its old content is ignored (NaN included). Returns ``out``.
    """
    op = "sym_outer_accum_"
    torch.ops.fisherext.sym_outer_accum_(
        _tensor_arg(op, "out", out), _tensor_arg(op, "x", x), weight,
        _scalar_arg(op, "alpha", alpha), _scalar_arg(op, "beta", beta))
    return out


def kfac_factor_update_(factor: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None,
                        decay: float | None = None) -> torch.Tensor:
    r"""Update a Kronecker factor (K-FAC's A = E[a a^T] or G = E[delta delta^T]) in place.

    With ``decay=None`` it accumulates the sum: ``factor += sum_n w_n sum_t x_nt x_nt^T``.
    With ``decay=b`` in [0, 1) it keeps a running average of per-batch means:
    ``factor <- b * factor + (1 - b) * (1/N) sum_n w_n sum_t x_nt x_nt^T``.
    ``x`` is [N, D] or [N, T, D]. Returns ``factor``.
    """
    op = "kfac_factor_update_"
    if decay is None:
        return sym_outer_accum_(factor, x, weight)
    decay = _scalar_arg(op, "decay", decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"fisherext.{op}: argument 'decay' must be in [0, 1), got {decay}")
    if _tensor_arg(op, "x", x).dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"fisherext.{op}: argument 'x' is empty (shape {tuple(x.shape)})")
    return sym_outer_accum_(factor, x, weight, alpha=(1.0 - decay) / x.shape[0], beta=decay)


def class_gram(a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    r"""Per-sample class Gram matrices of a linear map's Jacobian.

    .. math:: K_n = J_n J_n^\top \in \mathbb{R}^{C\times C},\qquad
              J_n[c] = \mathrm{vec}\Big(\sum_t \delta_{nct} a_{nt}^\top\Big)

    where ``delta[n, c]`` is the output gradient of the c-th backpropagated vector (e.g. the c-th
    column of a square root of the loss Hessian, or the c-th logit). Summed over layers, the per-input
    Fisher trace is ``tr(F_n) = tr(Lambda_n K_n)`` (or ``tr(K_n)`` when ``delta`` already carries the
    square root of ``Lambda_n``). Computed from the position Gram ``a_n a_n^T`` or from the per-class
    gradients, whichever needs fewer flops; exactly symmetric.

    Args:
        a: [N, I] or [N, T, I].
        delta: [N, C, O] or [N, C, T, O].
    Returns:
        [N, C, C] tensor, dtype of ``a``.
    """
    op = "class_gram"
    return torch.ops.fisherext.class_gram(_tensor_arg(op, "a", a), _tensor_arg(op, "delta", delta))
