"""Python side of the compiled ops: loading ``fisherext._C``, fake (meta) kernels, and thin wrappers.

Every op is declared in ``csrc/fisherext.cpp``; its CPU kernel is in ``csrc/cpu/``, its CUDA kernel in
``csrc/cuda/``, and its pure-PyTorch twin in ``fisherext/reference.py``.

Notation. A linear map (nn.Linear, or a convolution unfolded to positions t) sees inputs
``a`` of shape [N, I] or [N, T, I] and receives output gradients ``delta`` of shape [N, O] or
[N, T, O]. The per-sample weight gradient is ``g_n = sum_t delta_nt a_nt^T`` (O x I), vectorized
row-major (``vec(g)[o*I + i]``, the order of ``weight.flatten()``). No op here writes the N x O x I
per-sample gradients to memory; scratch is bounded by a fixed chunk size independent of N.
Half and bfloat16 inputs are accumulated in float32.

Kernel family K2 (perturb): ``unflatten_axpy_`` sets parameters to ``theta_saved ± eps v`` for every
tensor in one pass (and copies them back), and ``fd_fisher_reduce`` turns the logits at ``theta ± eps v`` into per-sample Fisher
quadratics and KL divergences in one pass over each row.

Kernel family K3 (hvp): the softmax cross-entropy Hessian ``H = diag(p) - p p^T`` of each logit row applied
to vectors (``softmax_hvp``, differentiable) or factored into square-root columns (``softmax_hessian_sqrt``),
and the fused flat-vector updates of the linear solvers in ``fisherext.solvers`` (``cg_update_``,
``cg_direction_``, ``lissa_update_``, ``neumann_update_``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

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
# Argument checks for the fake kernels (the compiled kernels run the same checks in C++: checks.h), except
# overlap between arguments (an in-place output sharing memory with another argument, checks.h
# check_no_overlap): that needs the arguments' addresses, and a meta tensor has none (data pointer 0). An
# output overlapping itself shows in its strides, and is checked here too.


def _check_tensor(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fisherext.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT:
        raise TypeError(
            f"fisherext.{op}: argument '{name}' must be a floating-point tensor "
            f"(float16/bfloat16/float32/float64), got {t.dtype}"
        )


def _check_same_device(op, name, t, ref_name, ref):
    if t.device != ref.device:
        raise ValueError(f"fisherext.{op}: argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}")


def _check_like(op, name, t, ref_name, ref):
    _check_tensor(op, name, t)
    if t.dtype != ref.dtype:
        raise TypeError(f"fisherext.{op}: argument '{name}' has dtype {t.dtype} but '{ref_name}' has {ref.dtype}")
    _check_same_device(op, name, t, ref_name, ref)


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


def _has_distinct_elements(t):
    """Mirror of has_distinct_elements in checks.h: the strides, in increasing order, each exceed the largest
    offset reachable through the smaller ones (sufficient for one memory location per element)."""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


def _check_square_out(op, out, ref_name, ref, D):
    _check_like(op, "out", out, ref_name, ref)
    if out.dim() != 2 or tuple(out.shape) != (D, D):
        raise ValueError(f"fisherext.{op}: argument 'out' must have shape [{D}, {D}], got {tuple(out.shape)}")
    if not _has_distinct_elements(out):
        raise ValueError(
            f"fisherext.{op}: argument 'out' has elements that share memory (strides {list(out.stride())}, e.g. an "
            "expanded tensor); an in-place output needs one memory location per element")


def _check_rows(op, x):
    _check_tensor(op, "x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"fisherext.{op}: argument 'x' must have shape [N, D] or [N, T, D], got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"fisherext.{op}: argument 'x' is empty (shape {tuple(x.shape)})")
    return x.shape[0], x.shape[-1]


def _check_unflatten_axpy(op, out, x, v):
    """Mirror of check_unflatten_axpy in perturb_common.h."""
    if len(out) == 0:
        raise ValueError(f"fisherext.{op}: argument 'out' is an empty list")
    _check_tensor(op, "x", x)
    for i, t in enumerate(out):
        _check_like(op, f"out[{i}]", t, "x", x)
        if not t.is_contiguous():
            raise ValueError(f"fisherext.{op}: argument 'out[{i}]' must be contiguous")
    total = sum(t.numel() for t in out)
    for name, t in [("x", x)] + ([("v", v)] if v is not None else []):
        _check_like(op, name, t, "x", x)
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"fisherext.{op}: argument '{name}' must be a contiguous 1-D tensor, got shape "
                             f"{list(t.shape)}")
        if t.numel() != total:
            raise ValueError(f"fisherext.{op}: argument '{name}' has {t.numel()} elements but the tensors of "
                             f"'out' have {total} together")


def _check_finite_scalar(op, name, value, positive):
    """Mirror of check_finite_scalar in checks.h (the schema has already made the value a float)."""
    if not math.isfinite(value):
        raise ValueError(f"fisherext.{op}: argument '{name}' must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"fisherext.{op}: argument '{name}' must be > 0, got {value}")


def _check_logits(op, name, t):
    _check_tensor(op, name, t)
    if t.dim() != 2:
        raise ValueError(f"fisherext.{op}: argument '{name}' must have shape [N, C], got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"fisherext.{op}: argument '{name}' is empty (shape {tuple(t.shape)})")


def _check_same_shape(op, name, t, ref_name, ref):
    _check_like(op, name, t, ref_name, ref)
    if t.shape != ref.shape:
        raise ValueError(
            f"fisherext.{op}: argument '{name}' must have the shape {tuple(ref.shape)} of '{ref_name}', "
            f"got {tuple(t.shape)}")


def _opmath_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_u(op, u, logits):
    _check_like(op, "u", u, "logits", logits)
    if u.dim() not in (2, 3) or u.shape[-2:] != logits.shape:
        N, C = logits.shape
        raise ValueError(
            f"fisherext.{op}: argument 'u' must have shape {tuple(logits.shape)} or [K, {N}, {C}] to match "
            f"'logits', got {tuple(u.shape)}")
    if u.numel() == 0:
        raise ValueError(f"fisherext.{op}: argument 'u' is empty (shape {tuple(u.shape)})")


def _check_flat(op, name, x):
    """Mirror of check_flat in hvp_common.h: a contiguous nonempty [P] or [P, K]; returns (P, K, columns)."""
    _check_tensor(op, name, x)
    if x.dim() not in (1, 2):
        raise ValueError(f"fisherext.{op}: argument '{name}' must have shape [P] or [P, K], got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"fisherext.{op}: argument '{name}' is empty (shape {tuple(x.shape)})")
    if not x.is_contiguous():
        raise ValueError(f"fisherext.{op}: argument '{name}' must be contiguous")
    return x.shape[0], (x.shape[1] if x.dim() == 2 else 1), x.dim() == 2


def _check_flat_like(op, name, t, ref_name, ref):
    _check_same_shape(op, name, t, ref_name, ref)
    if not t.is_contiguous():
        raise ValueError(f"fisherext.{op}: argument '{name}' must be contiguous")


def _check_column_scalar(op, name, s, ref_name, ref, dims):
    """A per-column scalar: [] for [P] vectors, [K] for [P, K]; the compute dtype of the vectors."""
    _check_tensor(op, name, s)
    want = _opmath_dtype(ref.dtype)
    if s.dtype != want:
        raise TypeError(
            f"fisherext.{op}: argument '{name}' must have dtype {want} (the compute dtype of '{ref_name}' "
            f"{ref.dtype}), got {s.dtype}")
    _check_same_device(op, name, s, ref_name, ref)
    _, K, columns = dims
    if tuple(s.shape) != ((K,) if columns else ()):
        want_shape = f"[{K}] (one per column)" if columns else "[]"
        raise ValueError(
            f"fisherext.{op}: argument '{name}' must have shape {want_shape} for '{ref_name}' of shape "
            f"{tuple(ref.shape)}, got {tuple(s.shape)}")


def _check_inv_diag(op, inv_diag, ref_name, ref, dims):
    if inv_diag is None:
        return
    _check_like(op, "inv_diag", inv_diag, ref_name, ref)
    P = dims[0]
    if tuple(inv_diag.shape) != (P,):
        raise ValueError(
            f"fisherext.{op}: argument 'inv_diag' must have shape [{P}] (one entry per row of '{ref_name}'), "
            f"got {tuple(inv_diag.shape)}")


def _check_damping(op, damping):
    _check_finite_scalar(op, "damping", damping, positive=False)
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"fisherext.{op}: argument 'damping' must be in [0, 1), got {damping}")


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


@torch.library.register_fake("fisherext::unflatten_axpy_")
def _unflatten_axpy_fake(out, x, v, eps):
    _check_unflatten_axpy("unflatten_axpy_", out, x, v)
    _check_finite_scalar("unflatten_axpy_", "eps", eps, positive=False)


@torch.library.register_fake("fisherext::fd_fisher_reduce")
def _fd_fisher_reduce_fake(logits_plus, logits_minus, logits_0, eps):
    op = "fd_fisher_reduce"
    _check_logits(op, "logits_plus", logits_plus)
    _check_same_shape(op, "logits_minus", logits_minus, "logits_plus", logits_plus)
    if logits_0 is not None:
        _check_same_shape(op, "logits_0", logits_0, "logits_plus", logits_plus)
    _check_finite_scalar(op, "eps", eps, positive=True)
    dtype = _opmath_dtype(logits_plus.dtype)
    return tuple(logits_plus.new_empty(logits_plus.shape[:1], dtype=dtype) for _ in range(3))


@torch.library.register_fake("fisherext::softmax_hvp")
def _softmax_hvp_fake(logits, u):
    _check_logits("softmax_hvp", "logits", logits)
    _check_u("softmax_hvp", u, logits)
    return torch.empty_like(u, memory_format=torch.contiguous_format)


@torch.library.register_fake("fisherext::softmax_hessian_sqrt")
def _softmax_hessian_sqrt_fake(logits):
    _check_logits("softmax_hessian_sqrt", "logits", logits)
    N, C = logits.shape
    return logits.new_empty((C, N, C))


@torch.library.register_fake("fisherext::cg_update_")
def _cg_update_fake(x, r, p, Ap, alpha, inv_diag=None):
    op = "cg_update_"
    dims = _check_flat(op, "x", x)
    for name, t in (("r", r), ("p", p), ("Ap", Ap)):
        _check_flat_like(op, name, t, "x", x)
    _check_column_scalar(op, "alpha", alpha, "x", x, dims)
    _check_inv_diag(op, inv_diag, "x", x, dims)
    return torch.empty_like(alpha), torch.empty_like(alpha)


@torch.library.register_fake("fisherext::cg_direction_")
def _cg_direction_fake(p, r, beta, inv_diag=None):
    op = "cg_direction_"
    dims = _check_flat(op, "p", p)
    _check_flat_like(op, "r", r, "p", p)
    _check_column_scalar(op, "beta", beta, "p", p, dims)
    _check_inv_diag(op, inv_diag, "p", p, dims)


@torch.library.register_fake("fisherext::lissa_update_")
def _lissa_update_fake(h, v, Hh, damping, scale):
    op = "lissa_update_"
    _check_flat(op, "h", h)
    _check_flat_like(op, "v", v, "h", h)
    _check_flat_like(op, "Hh", Hh, "h", h)
    _check_damping(op, damping)
    _check_finite_scalar(op, "scale", scale, positive=True)


@torch.library.register_fake("fisherext::neumann_update_")
def _neumann_update_fake(term, acc, Aterm, scale):
    op = "neumann_update_"
    _check_flat(op, "term", term)
    _check_flat_like(op, "acc", acc, "term", term)
    _check_flat_like(op, "Aterm", Aterm, "term", term)
    _check_finite_scalar(op, "scale", scale, positive=True)


# ---------------------------------------------------------------------------------------------------
# Autograd of softmax_hvp. With out = H u = p ⊙ (u − s), s = pᵀu, per row and direction:
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
        dtype = _opmath_dtype(logits.dtype)
        p = torch.softmax(logits.to(dtype), dim=-1)
        g, o = grad.to(dtype), out.to(dtype)
        gz = o * (g - (p * g).sum(-1, keepdim=True)) - p * (g * o).sum(-1, keepdim=True)
        grad_logits = (gz.sum(0) if gz.dim() == 3 else gz).to(logits.dtype)
    return grad_logits, grad_u


torch.library.register_autograd(
    "fisherext::softmax_hvp", _softmax_hvp_backward, setup_context=_softmax_hvp_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public wrappers (fisherext.ops.*).


def _tensor_arg(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fisherext.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    return t


def _tensor_list_arg(op, name, tensors):
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"fisherext.{op}: argument '{name}' must be a list of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        _tensor_arg(op, f"{name}[{i}]", t)
    return list(tensors)


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
    per-sample gradients of fixed size, never N x O x I. ``out`` must not share memory with ``a``,
    ``delta`` or ``weight``, nor two of its elements one location (an expanded tensor): ValueError.
    Returns ``out``.
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
    read; with ``beta = 0`` its old content is ignored (NaN included). ``out`` must not share memory with
    ``x`` or ``weight``, nor two of its elements one location (an expanded tensor): ValueError.
    Returns ``out``.
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


def unflatten_axpy_(out: Sequence[torch.Tensor], x: torch.Tensor, v: torch.Tensor | None = None,
                    eps: float = 0.0) -> Sequence[torch.Tensor]:
    r"""Set every tensor of a list from a flat vector, in place: the parameter perturbation step.

    .. math:: \text{out}_i \leftarrow x[o_i : o_i + n_i] + \varepsilon\, v[o_i : o_i + n_i],
              \qquad n_i = \text{out}_i\text{.numel()},\quad o_i = n_0 + \dots + n_{i-1}

    With ``out`` the parameters, ``x`` a flat saved copy of them (``fisherext.utils.flatten``) and ``v`` a
    flat direction in the same order, this sets ``theta = theta_saved + eps v`` for all parameter tensors
    at once (``eps`` may be negative), so evaluating at ``theta ± eps v`` perturbs along the whole
    direction, not one tensor at a time. With ``v=None`` it copies ``x`` back bit for bit: the restore
    step (never add ``-eps v`` back: that drifts).

    Every tensor of ``out`` must be contiguous (elements pair up in memory order) and have the dtype and
    device of ``x``, and share memory with no other tensor of the list; ``x`` and ``v`` are contiguous 1-D
    tensors of ``sum_i n_i`` elements and must not overlap ``out`` (ValueError otherwise; ``x`` and ``v``
    may overlap each other). Half and bfloat16 are computed in float32 and rounded once. One parallel pass
    on CPU; one kernel launch on CUDA (several only when a launch's metadata fills up), in the style of
    apex's multi_tensor_apply. The list travels to the kernel once, not once per operand, which is what
    makes a perturb/restore of a model with hundreds of parameter tensors cheap. Not differentiable:
    call it under ``torch.no_grad()``.

    Returns ``out``.
    """
    try:
        # Straight to the op: this runs once per perturbation, and checking a long list element by
        # element in Python would cost more than the kernel. The C++ checks name the argument.
        torch.ops.fisherext.unflatten_axpy_.default(out, x, v, eps)
    except (TypeError, RuntimeError):
        # The schema's parser rejected an argument's type: name it the way every other op does.
        op = "unflatten_axpy_"
        _tensor_list_arg(op, "out", out)
        _tensor_arg(op, "x", x)
        if v is not None:
            _tensor_arg(op, "v", v)
        _scalar_arg(op, "eps", eps)
        raise
    return out


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
    eps = _scalar_arg(op, "eps", eps)
    _check_finite_scalar(op, "eps", eps, positive=True)
    if logits_0 is not None:
        _tensor_arg(op, "logits_0", logits_0)
    return torch.ops.fisherext.fd_fisher_reduce(
        _tensor_arg(op, "logits_plus", logits_plus), _tensor_arg(op, "logits_minus", logits_minus), logits_0, eps)


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

    Returns:
        a tensor of u's shape and dtype.
    """
    op = "softmax_hvp"
    return torch.ops.fisherext.softmax_hvp(_tensor_arg(op, "logits", logits), _tensor_arg(op, "u", u))


def softmax_hessian_sqrt(logits: torch.Tensor) -> torch.Tensor:
    r"""Square-root columns of the softmax cross-entropy Hessian of each logit row.

    With :math:`p_n = \mathrm{softmax}(z_n)`, returns S of shape [C, N, C] with

    .. math:: S[k, n, :] = \sqrt{p_{nk}}\,(e_k - p_n), \qquad
              \sum_k S[k, n, :]\, S[k, n, :]^\top = \mathrm{diag}(p_n) - p_n p_n^\top = \Lambda_n

    (using :math:`\sum_k p_{nk} = 1`). Backpropagating the C slices ``S[k]`` as output cotangents gives
    per-sample gradients :math:`g_{nk} = J_n^\top S[k, n]` with :math:`\sum_k g_{nk} g_{nk}^\top = J_n^\top
    \Lambda_n J_n`, the true Fisher of sample n, in one batched backward (``kind="true"`` in
    ``fisherext.fisher``). Stable softmax; half/bfloat16 computed in float32. Output dtype of ``logits``.

    Not differentiable: the output never requires grad (autograd passes the op through), since the
    factor is a constant cotangent for backprop, formed from detached logits.
    """
    return torch.ops.fisherext.softmax_hessian_sqrt(_tensor_arg("softmax_hessian_sqrt", "logits", logits))


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
    partials. ``x`` and ``r`` must not overlap each other or ``p``, ``Ap``, ``alpha``, ``inv_diag``
    (ValueError). Returns ``(rz, rr)``.
    """
    op = "cg_update_"
    return torch.ops.fisherext.cg_update_(
        _tensor_arg(op, "x", x), _tensor_arg(op, "r", r), _tensor_arg(op, "p", p), _tensor_arg(op, "Ap", Ap),
        _tensor_arg(op, "alpha", alpha), None if inv_diag is None else _tensor_arg(op, "inv_diag", inv_diag))


def cg_direction_(p: torch.Tensor, r: torch.Tensor, beta: torch.Tensor,
                  inv_diag: torch.Tensor | None = None) -> torch.Tensor:
    r"""The conjugate-gradient direction update, in place: per column k,

    .. math:: p \leftarrow z + \beta_k\, p, \qquad z = \mathrm{inv\_diag} \odot r \ (z = r \text{ without})

    Shapes and dtypes as in :func:`cg_update_` (``beta`` [] or [K] in the compute dtype, any strides);
    ``p`` must not overlap ``r``, ``beta`` or ``inv_diag`` (ValueError). Returns ``p``.
    """
    op = "cg_direction_"
    torch.ops.fisherext.cg_direction_(
        _tensor_arg(op, "p", p), _tensor_arg(op, "r", r), _tensor_arg(op, "beta", beta),
        None if inv_diag is None else _tensor_arg(op, "inv_diag", inv_diag))
    return p


def lissa_update_(h: torch.Tensor, v: torch.Tensor, Hh: torch.Tensor, damping: float, scale: float) -> torch.Tensor:
    r"""One LiSSA recurrence step (Agarwal et al.; Koh & Liang), in place:

    .. math:: h \leftarrow v + (1 - d)\, h - \frac{H h}{s}

    with ``Hh`` the operator applied to the current h, damping d in [0, 1) and scale s > 0. Its fixed
    point is :math:`h = s\,(H + d s I)^{-1} v`. Computed in the compute dtype and rounded once. ``h`` must
    not overlap ``v`` or ``Hh`` (ValueError). Returns ``h``.
    """
    op = "lissa_update_"
    damping, scale = _scalar_arg(op, "damping", damping), _scalar_arg(op, "scale", scale)
    torch.ops.fisherext.lissa_update_(
        _tensor_arg(op, "h", h), _tensor_arg(op, "v", v), _tensor_arg(op, "Hh", Hh), damping, scale)
    return h


def neumann_update_(term: torch.Tensor, acc: torch.Tensor, Aterm: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One step of the Neumann series :math:`\sum_k (I - A/s)^k b`, in place:

    .. math:: \text{term} \leftarrow \text{term} - \frac{A\,\text{term}}{s}, \qquad
              \text{acc} \leftarrow \text{acc} + \text{term}

    with ``Aterm`` the operator applied to the current term and scale s > 0; ``acc`` adds the rounded new
    term. ``term`` and ``acc`` must not overlap each other or ``Aterm`` (ValueError). Returns ``(term, acc)``.
    """
    op = "neumann_update_"
    scale = _scalar_arg(op, "scale", scale)
    torch.ops.fisherext.neumann_update_(
        _tensor_arg(op, "term", term), _tensor_arg(op, "acc", acc), _tensor_arg(op, "Aterm", Aterm), scale)
    return term, acc
