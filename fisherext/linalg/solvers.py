r"""``fisherext.linalg.solvers``: iterative solvers for curvature systems :math:`(A + \lambda I)\,x = b`.

``A`` is any symmetric operator with ``A @ X`` for X [P] -> [P] and [P, K] -> [P, K] and
``A.shape == (P, P)``: a dense tensor, or fisherext's Hessian / GGN / Fisher operators. ``b`` is [P], or
[P, K] for K right-hand sides solved together (each column has its own step sizes and stopping test).
Every iteration is one matvec plus the fused vector updates of ``fisherext.ops`` (``cg_update_`` and
``cg_direction_``, ``lissa_update_``, ``neumann_update_``), which take their per-column scalars as
device tensors.

- :func:`cg`: (preconditioned) conjugate gradients; exact in at most P steps in exact arithmetic, needs
  :math:`A + \lambda I` positive definite.
- :func:`lissa`: the stochastic recurrence of Agarwal et al. (2017) used by Koh & Liang (2017) for
  influence functions, :math:`h_j = b + (1-d)\,h_{j-1} - A h_{j-1}/s`.
- :func:`neumann`: the truncated Neumann series :math:`\frac1s \sum_{k<T} (I - A/s)^k b`.

LiSSA and Neumann converge only when ``scale`` exceeds the largest eigenvalue of A (more precisely, when
every eigenvalue of :math:`(1-d)I - A/s` lies in [-1, 1]); both detect divergence and say so.
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import ops
from .._core.entry import entry_point

# LiSSA and Neumann test their iterates for divergence every this many iterations (and at the end): each
# test is a host sync, and a diverging recurrence grows geometrically, so a few steps of delay are harmless.
_CHECK_EVERY = 10


def _error(solver, msg):
    return ValueError(f"fisherext.solvers.{solver}: {msg}")


def _check_system(solver, A, b) -> int:
    """A square operator and b [P] or [P, K] of finite floats; returns P."""
    shape = getattr(A, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1] or not hasattr(A, "__matmul__"):
        raise TypeError(
            f"fisherext.solvers.{solver}: argument 'A' must be a square operator with A.shape == (P, P) and "
            f"A @ X, got {type(A).__name__}" + ("" if shape is None else f" of shape {tuple(shape)}"))
    P = int(shape[0])
    if not isinstance(b, torch.Tensor) or not b.is_floating_point():
        raise TypeError(f"fisherext.solvers.{solver}: argument 'b' must be a floating-point tensor, got "
                        f"{b.dtype if isinstance(b, torch.Tensor) else type(b).__name__}")
    if b.dim() not in (1, 2) or b.shape[0] != P or b.numel() == 0:
        raise _error(solver, f"argument 'b' must have shape [{P}] or [{P}, K] (A is {P} x {P}), got {tuple(b.shape)}")
    if not torch.isfinite(b).all():
        raise _error(solver, "argument 'b' has non-finite entries")
    return P


def _real(solver, name, value, *, positive=False, below_one=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fisherext.solvers.{solver}: argument '{name}' must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0) or (below_one and value >= 1):
        want = "> 0" if positive else ("in [0, 1)" if below_one else ">= 0")
        raise _error(solver, f"argument '{name}' must be finite and {want}, got {value}")
    return value


def _count(solver, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _error(solver, f"argument '{name}' must be a positive integer, got {value!r}")
    return value


def _matvec(solver, A, X):
    """A @ X, checked to have X's shape and dtype (the fused updates need both), contiguous."""
    Y = A @ X
    if not isinstance(Y, torch.Tensor) or Y.shape != X.shape or Y.dtype != X.dtype:
        got = f"{tuple(Y.shape)} {Y.dtype}" if isinstance(Y, torch.Tensor) else type(Y).__name__
        raise _error(solver, f"A @ X must return a tensor of X's shape and dtype {tuple(X.shape)} {X.dtype}, got {got}")
    return Y.contiguous()


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _column_norms(X):
    return torch.linalg.vector_norm(X.to(_compute_dtype(X.dtype)), dim=0)


def _rows(d, like):
    """A per-row vector d [P] broadcast against like ([P] or [P, K])."""
    return d if like.dim() == 1 else d[:, None]


@entry_point
def cg(A, b: torch.Tensor, *, damping: float = 0.0, tol: float = 1e-6, maxiter: int | None = None,
       preconditioner: torch.Tensor | None = None, x0: torch.Tensor | None = None, return_info: bool = False):
    r"""Solve :math:`(A + \lambda I)\,x = b` by (preconditioned) conjugate gradients.

    With :math:`M = \mathrm{diag}(\text{preconditioner}) + \lambda I` (or :math:`M = I`), per column:
    :math:`r_0 = b - (A+\lambda I)x_0`, :math:`p_0 = z_0 = M^{-1} r_0`, and for j = 0, 1, ...

    .. math:: \alpha_j = \frac{r_j^\top z_j}{p_j^\top (A+\lambda I) p_j},\quad
              x_{j+1} = x_j + \alpha_j p_j,\quad r_{j+1} = r_j - \alpha_j (A+\lambda I) p_j,\quad
              p_{j+1} = z_{j+1} + \frac{r_{j+1}^\top z_{j+1}}{r_j^\top z_j}\, p_j

    One matvec, one reduction (:math:`p^\top(A+\lambda I)p`) and the fused ``cg_update_`` (which also
    returns :math:`r^\top z` and :math:`r^\top r`) and ``cg_direction_`` per iteration.

    Args:
        A: symmetric operator (see the module doc); :math:`A + \lambda I` must be positive definite.
        b: [P] or [P, K]; the K columns are solved together, each with its own step sizes.
        damping: :math:`\lambda \ge 0`, added to A (and to the preconditioner).
        tol: a column stops when :math:`\|r\| \le \text{tol}\,\|b\|` (r the recursively updated
            residual). A stopped column is frozen (step 0) while the others continue.
        maxiter: at most this many iterations (matvecs); default :math:`\min(10P, 1000)`: 10P as
            scipy, capped because on a model-sized P a CG that has not converged in 1000 matvecs needs
            more damping or a better preconditioner, not more iterations. A warning says when a column
            did not converge.
        preconditioner: [P], the diagonal of (an approximation of) A, e.g.
            ``fisher(model, data, structure="diag").diag()``; it must be positive after adding damping.
        x0: starting point, shape of b (default 0).
        return_info: also return ``info = {"iterations": int, "residual_norm": Tensor ([] or [K]),
            "converged": Tensor (bool, [] or [K])}``.
    Returns:
        x (shape of b), or ``(x, info)``.
    Raises:
        ValueError: when :math:`p^\top(A+\lambda I)p \le 0` along a search direction (A + λI is not
            positive definite: add damping, or use a GGN/Fisher operator instead of the Hessian); on
            damping < 0, tol <= 0, b of the wrong size or non-finite.
    """
    P = _check_system("cg", A, b)
    damping = _real("cg", "damping", damping)
    tol = _real("cg", "tol", tol, positive=True)
    maxiter = min(10 * P, 1000) if maxiter is None else _count("cg", "maxiter", maxiter)
    b = b.contiguous()
    compute = _compute_dtype(b.dtype)

    def damped(X):
        AX = _matvec("cg", A, X)
        return AX + damping * X if damping else AX

    inv_diag = None
    if preconditioner is not None:
        if not isinstance(preconditioner, torch.Tensor) or preconditioner.shape != (P,):
            got = tuple(preconditioner.shape) if isinstance(preconditioner, torch.Tensor) else type(preconditioner).__name__
            raise _error("cg", f"argument 'preconditioner' must be a tensor of shape [{P}] (a diagonal), got {got}")
        diag = preconditioner.to(device=b.device, dtype=compute) + damping
        if not (torch.isfinite(diag) & (diag > 0)).all():
            raise _error("cg", "argument 'preconditioner' plus damping must be finite and positive everywhere")
        inv_diag = (1.0 / diag).to(b.dtype)

    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        if not isinstance(x0, torch.Tensor) or x0.shape != b.shape:
            raise _error("cg", f"argument 'x0' must have the shape {tuple(b.shape)} of 'b'")
        x = x0.to(device=b.device, dtype=b.dtype, copy=True).contiguous()
        r = (b - damped(x)).contiguous()
    z = r if inv_diag is None else r * _rows(inv_diag, r)
    p = z.clone().contiguous()
    rz = (r.to(compute) * z.to(compute)).sum(0)
    residual = _column_norms(r)
    target = tol * _column_norms(b)
    active = residual > target
    iterations = 0
    while iterations < maxiter and bool(active.any()):
        Ap = damped(p)
        pAp = (p.to(compute) * Ap.to(compute)).sum(0)
        if bool((active & ~(pAp > 0)).any()):
            worst = pAp[active].min().item()
            raise _error(
                "cg", f"the operator A + damping*I is not positive definite along a search direction "
                f"(p^T (A + damping I) p = {worst:.3g} at iteration {iterations}); add damping larger than "
                "-lambda_min(A), or use a GGN/Fisher operator (positive semi-definite) instead of the Hessian")
        alpha = torch.where(active, rz / pAp, torch.zeros_like(rz))
        rz_new, rr = ops.cg_update_(x, r, p, Ap, alpha, inv_diag)
        residual = torch.where(active, rr.sqrt(), residual)
        active = active & (residual > target)
        ops.cg_direction_(p, r, torch.where(active, rz_new / rz, torch.zeros_like(rz)), inv_diag)
        rz = rz_new
        iterations += 1
    if bool(active.any()):
        warnings.warn(
            f"fisherext.solvers.cg: {int(active.sum())} column(s) did not reach tol={tol:g} in {maxiter} iterations "
            f"(largest relative residual {(residual / target * tol).max().item():.3g}); raise maxiter or damping, "
            "or pass a preconditioner", stacklevel=2)
    if return_info:
        return x, {"iterations": iterations, "residual_norm": residual, "converged": ~active}
    return x


def _check_bounded(solver, X, bound, j):
    """Raise when a column of X exceeds `bound` (per column) or is not finite (see lissa's doc)."""
    if not bool((_column_norms(X) <= bound).all()):
        raise _error(
            solver, f"the iteration diverges (iterate norm beyond {bound.max().item():.3g} or not finite at step {j}): "
            "'scale' must exceed the largest eigenvalue of A (e.g. 1.1x the top eigenvalue from power iteration); "
            "a negative eigenvalue below -damping*scale diverges too (add damping, or use a GGN/Fisher operator)")


@entry_point
def lissa(A, b: torch.Tensor, *, scale: float, damping: float = 0.0, depth: int = 1000, repeats: int = 1,
          sample=None) -> torch.Tensor:
    r"""Approximate :math:`(A + d\,s\,I)^{-1} b` by the LiSSA recurrence (Agarwal et al.; Koh & Liang).

    With scale s and damping d:

    .. math:: h_0 = b, \qquad h_j = b + (1 - d)\,h_{j-1} - \frac{A_j h_{j-1}}{s}, \qquad
              \text{estimate} = \frac{h_{\text{depth}}}{s}

    where :math:`A_j` is ``A``, or ``sample()`` (a fresh minibatch operator per step, stochastic LiSSA,
    with :math:`\mathbb E[A_j] = A`). The fixed point h satisfies :math:`h = b + (1-d)h - Ah/s`, i.e.
    :math:`(A + d s I)\,h = s\,b`, so the estimate converges to

    .. math:: \frac{h}{s} = (A + d\,s\,I)^{-1}\, b

    the damping is relative to the scale: ``damping=d`` solves with :math:`\lambda = d\,s` (Koh & Liang's
    convention). The error after j steps is :math:`M^j` applied to the initial error with
    :math:`M = (1-d)I - A/s`: it converges when every eigenvalue of M lies in (-1, 1), i.e.
    :math:`-d s < \lambda(A) < (2 - d) s`, at the rate :math:`1 - d - \lambda_{\min}(A)/s`; in practice
    take s a little above :math:`\lambda_{\max}(A)`.

    Divergence test: with :math:`\|M_j\| \le 1` (symmetric :math:`A_j` with eigenvalues in
    :math:`[-ds, (2-d)s]`), :math:`h_j = \sum_{i \le j} M_j \cdots M_{j-i+1} b` has
    :math:`\|h_j\| \le (j+1)\|b\|`. So an iterate beyond :math:`2(j+1)\|b\|` (per column) or non-finite
    proves the scale too small (or A too indefinite for the damping), and raises ValueError. Tested every
    10 steps and at the end.

    Args:
        A: symmetric operator (see the module doc).
        b: [P] or [P, K].
        scale: s > 0, must exceed :math:`\lambda_{\max}(A)` (of every sampled operator).
        damping: d in [0, 1).
        depth: number of steps (matvecs) per repeat.
        repeats: independent runs averaged; useful only with ``sample`` (with a fixed A every run is
            the same, so it runs once).
        sample: optional callable returning an operator for each step.
    Returns:
        the estimate, shape of b.
    """
    _check_system("lissa", A, b)
    scale = _real("lissa", "scale", scale, positive=True)
    damping = _real("lissa", "damping", damping, below_one=True)
    depth = _count("lissa", "depth", depth)
    repeats = _count("lissa", "repeats", repeats)
    if sample is not None and not callable(sample):
        raise TypeError(f"fisherext.solvers.lissa: argument 'sample' must be callable or None, got {type(sample).__name__}")
    b = b.contiguous()
    b_norm = _column_norms(b)
    runs = repeats if sample is not None else 1
    total = torch.zeros_like(b, dtype=_compute_dtype(b.dtype))
    for _ in range(runs):
        h = b.clone()
        for j in range(1, depth + 1):
            ops.lissa_update_(h, b, _matvec("lissa", A if sample is None else sample(), h), damping, scale)
            if j % _CHECK_EVERY == 0 or j == depth:
                _check_bounded("lissa", h, 2 * (j + 1) * b_norm, j)
        total += h
    return (total / (runs * scale)).to(b.dtype)


@entry_point
def neumann(A, b: torch.Tensor, *, scale: float, terms: int = 100) -> torch.Tensor:
    r"""Approximate :math:`A^{-1} b` by the truncated Neumann series

    .. math:: A^{-1} b \approx \frac1s \sum_{k=0}^{T-1} \Big(I - \frac{A}{s}\Big)^k b

    (T = ``terms``), accumulated with ``neumann_update_``: :math:`t_0 = b`, :math:`t_k = t_{k-1} - A t_{k-1}/s`,
    sum of the :math:`t_k`. The truncation error is :math:`(I - A/s)^T A^{-1} b`: it converges when
    :math:`0 < \lambda(A) < 2s`, at the rate :math:`1 - \lambda_{\min}(A)/s`. This is LiSSA with d = 0 and
    a fixed A, written as a sum.

    Divergence test: with :math:`\|I - A/s\| \le 1`, :math:`\|t_k\| \le \|b\|`; a term beyond
    :math:`2\|b\|` (per column) or non-finite raises ValueError (increase ``scale`` above
    :math:`\lambda_{\max}(A)`). Tested every 10 terms and at the end.
    """
    _check_system("neumann", A, b)
    scale = _real("neumann", "scale", scale, positive=True)
    terms = _count("neumann", "terms", terms)
    b = b.contiguous()
    bound = 2 * _column_norms(b)
    term, acc = b.clone(), b.clone()
    for k in range(1, terms):
        ops.neumann_update_(term, acc, _matvec("neumann", A, term), scale)
        if k % _CHECK_EVERY == 0 or k == terms - 1:
            _check_bounded("neumann", term, bound, k)
    return acc / scale
