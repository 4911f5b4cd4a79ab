r"""``fisherext.linalg.solvers``: iterative solvers for curvature systems :math:`(A + \lambda I)\,x = b`.

``A`` is anything :func:`fisherext.linalg.as_operator` accepts: a LinearOperator (fisherext's Hessian /
GGN / Fisher operators, a ``FisherMatrix``, the results of operator algebra) or a square symmetric
tensor. ``b`` is [P], or [P, K] for K right-hand sides solved together as columns (each column has its
own step sizes and stopping test); it is converted to A's dtype. ``damping`` is always the absolute
:math:`\lambda` of :math:`A + \lambda I`. Every iteration is one product ``A @ X`` with all K columns
plus the fused vector updates of ``fisherext.ops`` (``cg_update_`` and ``cg_direction_``,
``lissa_update_``, ``neumann_update_``), which take their per-column scalars as device tensors.

- :func:`cg`: (preconditioned) conjugate gradients; exact in at most P steps in exact arithmetic, needs
  :math:`A + \lambda I` positive definite. :class:`InverseOperator` wraps it as the operator
  :math:`(A + \lambda I)^{-1}`.
- :func:`lissa`: the stochastic recurrence of Agarwal et al. (2017) used by Koh & Liang (2017) for
  influence functions, :math:`h_j = b + h_{j-1} - (A + \lambda I) h_{j-1}/s`.
- :func:`neumann`: the truncated Neumann series :math:`\frac1s \sum_{k<T} (I - (A + \lambda I)/s)^k b`.

LiSSA and Neumann converge only when ``scale`` exceeds the largest eigenvalue of :math:`A + \lambda I`
(more precisely, when every eigenvalue of :math:`I - (A + \lambda I)/s` lies in (-1, 1)); both detect
divergence and say so.
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import ops
from .._core.data import progress_bar
from .._core.entry import entry_point, entry_points
from .linop import LinearOperator, as_operator, check_columns, check_damping

# LiSSA and Neumann test their iterates for divergence every this many iterations (and at the end): each
# test is a host sync, and a diverging recurrence grows geometrically, so a few steps of delay are harmless.
_CHECK_EVERY = 10


def _error(solver, msg):
    return ValueError(f"fisherext.solvers.{solver}: {msg}")


def _check_system(A, b) -> tuple[LinearOperator, torch.Tensor]:
    """A as an operator and b as [P] or [P, K] finite columns of A's dtype, contiguous."""
    A = as_operator(A)
    b = check_columns("b", b, A)
    if b.numel() == 0:
        raise ValueError(f"b: has no columns, got shape {tuple(b.shape)}")
    if not torch.isfinite(b).all():
        raise ValueError("b: has non-finite entries")
    return A, b.contiguous()


def _real(name, value, *, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}: must be finite and {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return value


def _matvec(solver, A, X, damping=0.0):
    """(A + damping I) X, checked to have X's shape and dtype (the fused updates need both), contiguous."""
    Y = A @ X
    if not isinstance(Y, torch.Tensor) or Y.shape != X.shape or Y.dtype != X.dtype:
        got = f"{tuple(Y.shape)} {Y.dtype}" if isinstance(Y, torch.Tensor) else type(Y).__name__
        raise _error(solver, f"A @ X must return a tensor of X's shape and dtype {tuple(X.shape)} {X.dtype}, got {got}")
    return (torch.add(Y, X, alpha=damping) if damping else Y).contiguous()


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _column_norms(X):
    return torch.linalg.vector_norm(X.to(_compute_dtype(X.dtype)), dim=0)


def _rows(d, like):
    """A per-row vector d [P] broadcast against like ([P] or [P, K])."""
    return d if like.dim() == 1 else d[:, None]


def _check_preconditioner(preconditioner, P):
    if preconditioner is not None and (not isinstance(preconditioner, torch.Tensor) or preconditioner.shape != (P,)):
        got = tuple(preconditioner.shape) if isinstance(preconditioner, torch.Tensor) else type(preconditioner).__name__
        raise ValueError(f"preconditioner: must be a tensor of shape [{P}] (a diagonal), got {got}")


def _check_maxiter(maxiter, P):
    return min(10 * P, 1000) if maxiter is None else _count("maxiter", maxiter)


@entry_point(name="solvers.cg")
def cg(A, b: torch.Tensor, *, damping: float = 0.0, tol: float = 1e-6, maxiter: int | None = None,
       preconditioner: torch.Tensor | None = None, x0: torch.Tensor | None = None, return_info: bool = False,
       progress: bool = False):
    r"""Solve :math:`(A + \lambda I)\,x = b` by (preconditioned) conjugate gradients.

    With :math:`M = \mathrm{diag}(\text{preconditioner}) + \lambda I` (or :math:`M = I`), per column:
    :math:`r_0 = b - (A+\lambda I)x_0`, :math:`p_0 = z_0 = M^{-1} r_0`, and for j = 0, 1, ...

    .. math:: \alpha_j = \frac{r_j^\top z_j}{p_j^\top (A+\lambda I) p_j},\quad
              x_{j+1} = x_j + \alpha_j p_j,\quad r_{j+1} = r_j - \alpha_j (A+\lambda I) p_j,\quad
              p_{j+1} = z_{j+1} + \frac{r_{j+1}^\top z_{j+1}}{r_j^\top z_j}\, p_j

    One product ``A @ p`` with all K columns, one reduction (:math:`p^\top(A+\lambda I)p`) and the fused
    ``cg_update_`` (which also returns :math:`r^\top z` and :math:`r^\top r`) and ``cg_direction_`` per
    iteration.

    Args:
        A: anything :func:`~fisherext.linalg.as_operator` accepts (a LinearOperator, a ``FisherMatrix``,
            a square symmetric tensor); :math:`A + \lambda I` must be positive definite.
        b: [P] or [P, K]; the K columns are solved together, each with its own step sizes.
        damping: the absolute :math:`\lambda \ge 0`, added to A (and to the preconditioner).
        tol: a column stops when :math:`\|r\| \le \text{tol}\,\|b\|` (r the recursively updated
            residual). A stopped column is frozen (step 0) while the others continue.
        maxiter: at most this many iterations (products); default :math:`\min(10P, 1000)`: 10P as
            scipy, capped because on a model-sized P a CG that has not converged in 1000 products needs
            more damping or a better preconditioner, not more iterations. A warning says when a column
            did not converge.
        preconditioner: [P], the diagonal of (an approximation of) A, e.g.
            ``fisher(model, data, structure="diag").diag()``; it must be positive after adding damping.
        x0: starting point, shape of b (default 0).
        return_info: also return ``info = {"iterations": int, "residual_norm": Tensor ([] or [K]),
            "converged": Tensor (bool, [] or [K])}``.
        progress: a progress bar over the iterations.

    Returns:
        x (shape of b, in A's dtype), or ``(x, info)``.

    Raises:
        ValueError: when :math:`p^\top(A+\lambda I)p \le 0` along a search direction (A + λI is not
            positive definite: add damping, or use a GGN/Fisher operator instead of the Hessian); on
            damping < 0, tol <= 0, b of the wrong size or non-finite.
        TypeError: A is no operator, b no floating-point tensor.
    """
    A, b = _check_system(A, b)
    P = A.shape[0]
    damping = check_damping(damping)
    tol = _real("tol", tol, positive=True)
    maxiter = _check_maxiter(maxiter, P)
    _check_preconditioner(preconditioner, P)
    compute = _compute_dtype(b.dtype)

    inv_diag = None
    if preconditioner is not None:
        diag = preconditioner.to(device=b.device, dtype=compute) + damping
        if not (torch.isfinite(diag) & (diag > 0)).all():
            raise ValueError("preconditioner: plus damping must be finite and positive everywhere")
        inv_diag = (1.0 / diag).to(b.dtype)

    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        if not isinstance(x0, torch.Tensor) or x0.shape != b.shape:
            raise ValueError(f"x0: must have the shape {tuple(b.shape)} of 'b'")
        x = x0.to(device=b.device, dtype=b.dtype, copy=True).contiguous()
        r = (b - _matvec("cg", A, x, damping)).contiguous()
    z = r if inv_diag is None else r * _rows(inv_diag, r)
    p = z.clone().contiguous()
    rz = (r.to(compute) * z.to(compute)).sum(0)
    residual = _column_norms(r)
    target = tol * _column_norms(b)
    active = residual > target
    iterations = 0
    for _ in progress_bar(range(maxiter), progress, "solvers.cg"):
        if not bool(active.any()):
            break
        Ap = _matvec("cg", A, p, damping)
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


@entry_points
class InverseOperator(LinearOperator):
    r"""The inverse :math:`(A + \lambda I)^{-1}` as an operator: its product with B [P, K] solves
    :math:`(A + \lambda I)\,X = B` for all K columns together by :func:`cg` (one product of A with all K
    columns per iteration).

    The products are as accurate as CG's stopping test: per column
    :math:`\|B - (A + \lambda I) X\| \le \text{tol}\,\|B\|`; a column that does not get there in
    ``maxiter`` iterations warns. :math:`(A + \lambda I)^{-1}` is symmetric, so the result is a
    LinearOperator like any other (``dense()``, the algebra, spectral methods).

    Args:
        A: anything :func:`~fisherext.linalg.as_operator` accepts; :math:`A + \lambda I` must be
            positive definite.
        damping: the absolute :math:`\lambda \ge 0`.
        tol: CG's relative residual per column (see :func:`cg`).
        maxiter: CG's iteration limit (default :math:`\min(10P, 1000)`).
        preconditioner: [P], the diagonal of (an approximation of) A, or None.

    Raises:
        TypeError: A is no operator.
        ValueError: damping < 0, tol <= 0, maxiter < 1, a preconditioner of the wrong shape; at a
            product, when :math:`A + \lambda I` is not positive definite.
    """

    def __init__(self, A, damping: float = 0.0, *, tol: float = 1e-6, maxiter: int | None = None,
                 preconditioner: torch.Tensor | None = None):
        A = as_operator(A)
        self.damping = check_damping(damping)
        self.tol = _real("tol", tol, positive=True)
        self.maxiter = _check_maxiter(maxiter, A.shape[0])
        _check_preconditioner(preconditioner, A.shape[0])
        super().__init__(A.shape[0], A.dtype, A.device)
        self.operator, self.preconditioner = A, preconditioner

    def _matmat(self, X):
        if X.shape[1] == 0:
            return X.clone()
        return cg(self.operator, X, damping=self.damping, tol=self.tol, maxiter=self.maxiter,
                  preconditioner=self.preconditioner)


def _check_bounded(solver, X, bound, j):
    """Raise when a column of X exceeds `bound` (per column) or is not finite (see lissa's doc)."""
    if not bool((_column_norms(X) <= bound).all()):
        raise _error(
            solver, f"the iteration diverges (iterate norm beyond {bound.max().item():.3g} or not finite at step {j}): "
            "'scale' must exceed the largest eigenvalue of A + damping*I (e.g. 1.1x the top eigenvalue from power "
            "iteration); a negative eigenvalue below -damping diverges too (add damping, or use a GGN/Fisher operator)")


@entry_point(name="solvers.lissa")
def lissa(A, b: torch.Tensor, *, scale: float, damping: float = 0.0, depth: int = 1000, repeats: int = 1,
          sample=None, progress: bool = False) -> torch.Tensor:
    r"""Approximate :math:`(A + \lambda I)^{-1} b` by the LiSSA recurrence (Agarwal et al.; Koh & Liang).

    With scale s and the absolute damping :math:`\lambda`:

    .. math:: h_0 = b, \qquad h_j = b + h_{j-1} - \frac{(A_j + \lambda I)\, h_{j-1}}{s}
              = b + (1 - d)\,h_{j-1} - \frac{A_j h_{j-1}}{s}, \quad d = \frac{\lambda}{s}, \qquad
              \text{estimate} = \frac{h_{\text{depth}}}{s}

    (the kernel ``lissa_update_`` takes the relative factor d, derived here), where :math:`A_j` is ``A``,
    or ``sample()`` (a fresh minibatch operator per step, stochastic LiSSA, with
    :math:`\mathbb E[A_j] = A`). The fixed point satisfies :math:`(A + \lambda I)\,h = s\,b`, so the
    estimate converges to

    .. math:: \frac{h}{s} = (A + \lambda I)^{-1}\, b .

    The error after j steps is :math:`M^j` applied to the initial error with
    :math:`M = I - (A + \lambda I)/s`: it converges when every eigenvalue of M lies in (-1, 1), i.e.
    :math:`-\lambda < \lambda_i(A) < 2s - \lambda`, at the rate :math:`1 - (\lambda_{\min}(A) + \lambda)/s`;
    in practice take s a little above :math:`\lambda_{\max}(A) + \lambda`.

    Divergence test: with :math:`\|M_j\| \le 1`, :math:`h_j = \sum_{i \le j} M_j \cdots M_{j-i+1} b` has
    :math:`\|h_j\| \le (j+1)\|b\|`. So an iterate beyond :math:`2(j+1)\|b\|` (per column) or non-finite
    proves the scale too small (or A too indefinite for the damping), and raises ValueError. Tested every
    10 steps and at the end.

    Args:
        A: anything :func:`~fisherext.linalg.as_operator` accepts.
        b: [P] or [P, K] (K right-hand sides as columns).
        scale: s > 0, must exceed :math:`\lambda_{\max}(A) + \lambda` (of every sampled operator).
        damping: the absolute :math:`\lambda \ge 0`, below ``scale``. (Earlier versions took the relative
            factor d = λ/s here; pass ``damping=d * scale`` for Koh & Liang's convention.)
        depth: number of steps (products) per repeat.
        repeats: independent runs averaged; useful only with ``sample`` (with a fixed A every run is
            the same, so it runs once).
        sample: optional callable returning an operator (anything ``as_operator`` accepts) for each step;
            its randomness is its own (e.g. a ``torch.Generator`` it draws from).
        progress: a progress bar over the steps.

    Returns:
        the estimate, shape of b, in A's dtype.

    Raises:
        ValueError: damping >= scale (the recurrence would need a relative factor
            :math:`d = \lambda / s \ge 1`); scale <= 0, damping < 0; depth or repeats < 1; b of the wrong
            shape or non-finite; when the iteration diverges (scale too small).
        TypeError: A is no operator, b no floating-point tensor, sample not callable.
    """
    A, b = _check_system(A, b)
    scale = _real("scale", scale, positive=True)
    damping = check_damping(damping)
    if damping >= scale:
        raise ValueError(f"damping: the absolute λ = {damping:g} must be below scale = {scale:g} (the recurrence "
                         f"uses the relative factor damping / scale = {damping / scale:g}, which must be in [0, 1)); "
                         "raise scale above the largest eigenvalue of A + damping*I")
    depth = _count("depth", depth)
    repeats = _count("repeats", repeats)
    if sample is not None and not callable(sample):
        raise TypeError(f"sample: must be callable or None, got {type(sample).__name__}")
    relative = damping / scale
    b_norm = _column_norms(b)
    runs = repeats if sample is not None else 1
    total = torch.zeros_like(b, dtype=_compute_dtype(b.dtype))
    for step in progress_bar(range(runs * depth), progress, "solvers.lissa"):
        j = step % depth + 1
        if j == 1:
            h = b.clone()
        operator = A if sample is None else as_operator(sample())
        ops.lissa_update_(h, b, _matvec("lissa", operator, h), relative, scale)
        if j % _CHECK_EVERY == 0 or j == depth:
            _check_bounded("lissa", h, 2 * (j + 1) * b_norm, j)
        if j == depth:
            total += h
    return (total / (runs * scale)).to(b.dtype)


@entry_point(name="solvers.neumann")
def neumann(A, b: torch.Tensor, *, scale: float, damping: float = 0.0, terms: int = 100,
            progress: bool = False) -> torch.Tensor:
    r"""Approximate :math:`(A + \lambda I)^{-1} b` by the truncated Neumann series

    .. math:: (A + \lambda I)^{-1} b \approx \frac1s \sum_{k=0}^{T-1} \Big(I - \frac{A + \lambda I}{s}\Big)^k b

    (T = ``terms``), accumulated with ``neumann_update_``: :math:`t_0 = b`,
    :math:`t_k = t_{k-1} - (A + \lambda I) t_{k-1}/s`, sum of the :math:`t_k`. The truncation error is
    :math:`(I - (A + \lambda I)/s)^T (A + \lambda I)^{-1} b`: it converges when
    :math:`0 < \lambda_i(A) + \lambda < 2s`, at the rate :math:`1 - (\lambda_{\min}(A) + \lambda)/s`. This
    is LiSSA with a fixed A, written as a sum.

    Divergence test: with :math:`\|I - (A + \lambda I)/s\| \le 1`, :math:`\|t_k\| \le \|b\|`; a term
    beyond :math:`2\|b\|` (per column) or non-finite raises ValueError (increase ``scale`` above
    :math:`\lambda_{\max}(A) + \lambda`). Tested every 10 terms and at the end.

    Args:
        A: anything :func:`~fisherext.linalg.as_operator` accepts.
        b: [P] or [P, K] (K right-hand sides as columns).
        scale: s > 0, must exceed :math:`\lambda_{\max}(A) + \lambda`.
        damping: the absolute :math:`\lambda \ge 0`.
        terms: T, the number of terms (T - 1 products).
        progress: a progress bar over the terms.

    Returns:
        the estimate, shape of b, in A's dtype.

    Raises:
        ValueError: scale <= 0, damping < 0, terms < 1, b of the wrong shape or non-finite; when the
            series diverges (scale too small).
        TypeError: A is no operator, b no floating-point tensor.
    """
    A, b = _check_system(A, b)
    scale = _real("scale", scale, positive=True)
    damping = check_damping(damping)
    terms = _count("terms", terms)
    bound = 2 * _column_norms(b)
    term, acc = b.clone(), b.clone()
    for k in progress_bar(range(1, terms), progress, "solvers.neumann"):
        ops.neumann_update_(term, acc, _matvec("neumann", A, term, damping), scale)
        if k % _CHECK_EVERY == 0 or k == terms - 1:
            _check_bounded("neumann", term, bound, k)
    return acc / scale
