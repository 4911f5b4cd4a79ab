r"""Spectra of symmetric curvature operators: extreme eigenpairs, traces and spectral densities.

Every function takes any ``A`` accepted by ``fisherext.linalg.as_operator`` (a LinearOperator, a square
symmetric tensor, a FisherMatrix) and touches it only through products ``A @ X``, so Hessian, GGN and
Fisher operators over a whole data set work without forming a P×P matrix.

- ``power_iteration``: top-k eigenpairs by magnitude (subspace iteration with Rayleigh–Ritz);
- ``lanczos``: k extreme eigenpairs from a Krylov space with full reorthogonalization;
- ``hutchinson_trace``: tr(A) from random probes;
- ``slq_density``: the spectral density by stochastic Lanczos quadrature.

Random draws use ``generator`` on its own device (the CPU when None) and are then moved to the operator's
device, so a seeded generator gives the same probes on every device.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .linop import as_operator
from .._core.checks import check_choice, check_positive_int
from .._core.data import progress_bar
from .._core.entry import entry_point

WHICH = ("largest", "smallest", "magnitude")
DISTRIBUTIONS = ("rademacher", "gaussian")
BLOCK_ELEMENTS = 1 << 20   # probe entries per product A @ Z (memory per block, not a tuning knob)


def _check_k(k, P: int) -> None:
    check_positive_int("k", k)
    if k > P:
        raise ValueError(f"k: asked for {k} eigenpairs of a {P} x {P} operator; k must be at most P = {P}")


def _check_krylov_dim(m, k: int) -> None:
    check_positive_int("m", m)
    if m < k:
        raise ValueError(f"m: the Krylov dimension must be at least k = {k}, got {m}")


def _probes(shape, distribution: str, generator, A) -> torch.Tensor:
    """Random probes of ``shape`` in A's dtype on A's device: Rademacher (±1) or standard Gaussian."""
    device = generator.device if generator is not None else torch.device("cpu")
    if distribution == "gaussian":
        Z = torch.randn(shape, generator=generator, dtype=A.dtype, device=device)
    else:
        Z = torch.randint(0, 2, shape, generator=generator, device=device).to(A.dtype).mul_(2).sub_(1)
    return Z.to(A.device)


@entry_point(name="spectral.power_iteration")
def power_iteration(A, k: int = 1, *, maxiter: int = 100, tol: float = 1e-6,
                    generator: torch.Generator | None = None, progress: bool = False):
    r"""The k eigenpairs of largest magnitude, by subspace (block power) iteration with Rayleigh–Ritz.

    Start from a random orthonormal :math:`X_0 \in \mathbb{R}^{P\times k}`. Each iteration computes
    :math:`Y = A X_i` (one product with k columns), the Rayleigh–Ritz pairs of :math:`\mathrm{span}(X_i)`
    from :math:`H = X_i^\top Y = S\,\Theta\,S^\top` (ordered by :math:`|\theta|`, decreasing), and their
    residuals :math:`r_j = Y s_j - \theta_j X_i s_j = A u_j - \theta_j u_j` with :math:`u_j = X_i s_j`.
    It stops when :math:`\max_j \|r_j\| \le \mathrm{tol}\cdot\max_j|\theta_j|`, and otherwise continues
    from :math:`X_{i+1} = \mathrm{orth}(Y)` (QR). All k vectors converge together, with no deflation, at
    rate :math:`|\lambda_{k+1}| / |\lambda_j|` per iteration (eigenvalues ordered by magnitude); a pair
    :math:`\pm\lambda` inside the block is resolved, where single-vector power iteration would oscillate.
    Eigenvalues keep their sign (a Hessian has negative ones). Eigenvalue errors are about
    :math:`\|r_j\|^2/\mathrm{gap}`, eigenvector angles about :math:`\|r_j\|/\mathrm{gap}`.

    Args:
        A: anything :func:`~fisherext.linalg.as_operator` accepts (a LinearOperator, a ``FisherMatrix``,
            a square symmetric tensor).
        k: the number of eigenpairs, 1 <= k <= P.
        maxiter: at most this many iterations (products with k columns).
        tol: the relative residual :math:`\max_j \|r_j\| / \max_j |\theta_j|` to stop at, >= 0.
        generator: the source of the random start (None: the global generator).
        progress: a progress bar over the iterations.

    Returns:
        (eigenvalues [k] by decreasing magnitude, eigenvectors [P, k] orthonormal, signs arbitrary), in
        the operator's dtype and device. Warns (RuntimeWarning) when ``maxiter`` iterations end before
        the tolerance is met, and returns the last Ritz pairs.

    Raises:
        ValueError: k not in [1, P], maxiter < 1, tol < 0; A a tensor that is not square and symmetric.
        TypeError: A is no operator.
    """
    A = as_operator(A)
    P = A.shape[0]
    _check_k(k, P)
    check_positive_int("maxiter", maxiter)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol: must be a non-negative number, got {tol!r}")
    X = torch.linalg.qr(_probes((P, k), "gaussian", generator, A)).Q
    for _ in progress_bar(range(maxiter), progress, "power_iteration"):
        Y = A @ X
        H = X.T @ Y
        theta, S = torch.linalg.eigh(0.5 * (H + H.T))
        order = theta.abs().argsort(descending=True)
        theta, S = theta[order], S[:, order]
        U = X @ S
        residual = torch.linalg.vector_norm(Y @ S - U * theta, dim=0).max()
        if residual <= tol * theta.abs().max():
            return theta, U
        X = torch.linalg.qr(Y).Q
    warnings.warn(f"power_iteration: no convergence in maxiter={maxiter} iterations (largest residual "
                  f"{residual.item():.3g}, tol · |λ|max = {tol * theta.abs().max().item():.3g})", RuntimeWarning)
    return theta, U


def _lanczos_basis(A, v: torch.Tensor, m: int, *, restart: bool, generator=None, progress: bool = False):
    r"""Lanczos with full reorthogonalization: an orthonormal basis Q [P, j] (j ≤ m ≤ P) of the Krylov
    space of ``v`` and the tridiagonal :math:`T = Q^\top A Q` as (alpha [j], beta [j-1]), float64 on the CPU.

    Each new :math:`A q_j` is orthogonalized against all of Q, twice (one classical Gram–Schmidt pass
    loses orthogonality in proportion to the condition; a second pass restores it to working precision,
    so Ritz values do not come back as spurious copies). When :math:`\beta_j` falls to rounding level,
    span(Q) is invariant under A: with ``restart=False`` the basis stops there (the quadrature of ``v`` is
    then exact); with ``restart=True`` it continues from a random vector orthogonal to Q with
    :math:`\beta_j = 0` (T block-diagonal), so it reaches m vectors even for repeated eigenvalues.
    """
    P = A.shape[0]
    Q = torch.empty(P, m, dtype=A.dtype, device=A.device)
    alpha, beta = [], []
    eps = torch.finfo(A.dtype).eps
    anorm = 0.0   # running Gershgorin bound on ‖T‖, the scale of "rounding level" for β
    q = v / torch.linalg.vector_norm(v)
    for j in progress_bar(range(m), progress, "lanczos"):
        Q[:, j] = q
        w = A @ q
        alpha.append((q @ w).item())
        basis = Q[:, :j + 1]
        for _ in range(2):
            w = w - basis @ (basis.T @ w)
        b = torch.linalg.vector_norm(w).item()
        anorm = max(anorm, abs(alpha[-1]) + b + (beta[-1] if beta else 0.0))
        if j + 1 == m:
            break
        if b > math.sqrt(P) * eps * anorm:
            beta.append(b)
            q = w / b
            continue
        if not restart:
            break
        w = _probes((P,), "gaussian", generator, A)
        for _ in range(2):
            w = w - basis @ (basis.T @ w)
        beta.append(0.0)
        q = w / torch.linalg.vector_norm(w)
    j = len(alpha)
    return (torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64), Q[:, :j])


def _ritz(alpha: torch.Tensor, beta: torch.Tensor):
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal T = tridiag(beta, alpha, beta)."""
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    return torch.linalg.eigh(T)


@entry_point(name="spectral.lanczos")
def lanczos(A, k: int, *, which: str = "largest", m: int | None = None,
            generator: torch.Generator | None = None, progress: bool = False):
    r"""k extreme eigenpairs by the Lanczos method with full reorthogonalization.

    From a random Gaussian start, m steps build an orthonormal basis :math:`Q_m` of the Krylov space
    :math:`\mathcal{K}_m(A, v) = \mathrm{span}(v, Av, \dots, A^{m-1}v)` and the tridiagonal
    :math:`T_m = Q_m^\top A Q_m`. With :math:`T_m = S\,\Theta\,S^\top` (``torch.linalg.eigh``), the Ritz
    values :math:`\theta_i` approximate eigenvalues of A, extreme ones first, and the Ritz vectors are
    :math:`Q_m s_i`, with residual :math:`\|A Q_m s_i - \theta_i Q_m s_i\| = \beta_m |e_m^\top s_i|`.
    If the Krylov space becomes invariant (breakdown, :math:`\beta_j = 0`), its Ritz pairs are exact and
    the basis continues from a random vector orthogonal to it; with :math:`m \ge P` the result is exact
    (up to rounding). Cost: m products A @ v and :math:`O(P m^2)` for the reorthogonalization.

    Args:
        A: anything :func:`~fisherext.linalg.as_operator` accepts.
        k: the number of eigenpairs, 1 <= k <= P.
        which: "largest" (algebraically largest, decreasing), "smallest" (algebraically smallest,
            increasing) or "magnitude" (largest :math:`|\lambda|`, decreasing magnitude).
        m: Krylov dimension, at least k (default min(P, max(2k + 20, 40)); values above P act as P).
        generator: the source of the random start (None: the global generator).
        progress: a progress bar over the Lanczos steps.

    Returns:
        (eigenvalues [k], eigenvectors [P, k] orthonormal, signs arbitrary) in the operator's dtype and device.

    Raises:
        ValueError: k not in [1, P], m < k, an unknown ``which``; A a tensor that is not square and symmetric.
        TypeError: A is no operator.
    """
    A = as_operator(A)
    P = A.shape[0]
    _check_k(k, P)
    check_choice("which", which, WHICH)
    if m is None:
        m = max(2 * k + 20, 40)
    else:
        _check_krylov_dim(m, k)
    alpha, beta, Q = _lanczos_basis(A, _probes((P,), "gaussian", generator, A), min(m, P),
                                    restart=True, generator=generator, progress=progress)
    theta, S = _ritz(alpha, beta)
    key = {"largest": -theta, "smallest": theta, "magnitude": -theta.abs()}[which]
    chosen = key.argsort(stable=True)[:k]
    return (theta[chosen].to(A.device, A.dtype), Q @ S[:, chosen].to(A.device, A.dtype))


@entry_point(name="spectral.hutchinson_trace")
def hutchinson_trace(A, n: int = 100, *, distribution: str = "rademacher", block_size: int | None = None,
                     generator: torch.Generator | None = None, return_std: bool = False, progress: bool = False):
    r"""Hutchinson's estimate of tr(A): :math:`\hat t = \frac1n \sum_{i=1}^n z_i^\top A z_i` with
    :math:`\mathbb{E}[z z^\top] = I`, unbiased.

    For Rademacher probes (independent ±1 entries) :math:`\mathrm{Var}(z^\top A z) = 2\sum_{i\ne j}A_{ij}^2`,
    the smallest over probes with i.i.d. zero-mean unit-variance entries; for Gaussian probes it is
    :math:`2\|A\|_F^2`. The standard error reported is :math:`s/\sqrt n`, with s the sample standard
    deviation of the n values :math:`z_i^\top A z_i` (nan for n = 1). Probes go through ``A @ Z`` in
    blocks of ``block_size`` columns (default: about 2²⁰ probe entries per block, at most n).

    Args:
        A: anything :func:`~fisherext.linalg.as_operator` accepts.
        n: the number of probes.
        distribution: "rademacher" or "gaussian".
        block_size: probes per product ``A @ Z``.
        generator: the source of the probes (None: the global generator).
        return_std: also return the standard error.
        progress: a progress bar over the blocks of probes.

    Returns:
        the estimate, a 0-d tensor in the operator's dtype and device (no host sync), or (estimate,
        standard error) with ``return_std=True``.

    Raises:
        ValueError: n or block_size < 1, an unknown distribution; A a tensor that is not square and symmetric.
        TypeError: A is no operator.
    """
    A = as_operator(A)
    P = A.shape[0]
    check_positive_int("n", n)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if block_size is None:
        block_size = max(1, min(n, BLOCK_ELEMENTS // P))
    else:
        check_positive_int("block_size", block_size)
    starts = range(0, n, block_size)
    values = []
    for start in progress_bar(starts, progress, "hutchinson_trace", total=len(starts)):
        Z = _probes((P, min(block_size, n - start)), distribution, generator, A)
        values.append((Z * (A @ Z)).sum(0))
    values = torch.cat(values)
    estimate = values.mean()
    if not return_std:
        return estimate
    std_error = values.std() / math.sqrt(n) if n > 1 else torch.full_like(estimate, math.nan)
    return estimate, std_error


@dataclass(frozen=True)
class SpectralDensity:
    """The result of ``slq_density``; unpacks as ``grid, density = slq_density(A)``.

    grid, density: [G] float64 on the CPU. nodes, weights: [n, m] float64 on the CPU, the Ritz values θ and
    weights τ of each probe (a probe whose Krylov space closed after j < m steps has zero weights, and
    zero nodes, past j).
    """
    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor

    def __iter__(self):
        return iter((self.grid, self.density))


@entry_point(name="spectral.slq_density")
def slq_density(A, *, m: int = 80, n: int = 10, grid: torch.Tensor | None = None, sigma: float | None = None,
                points: int = 1000, generator: torch.Generator | None = None, progress: bool = False) -> SpectralDensity:
    r"""The spectral density of A by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani,
    Krishnan & Xiao 2019).

    The density smoothed by a Gaussian kernel :math:`g_\sigma`,
    :math:`\phi_\sigma(t) = \frac1P \sum_{j=1}^P g_\sigma(t - \lambda_j) = \frac1P\mathrm{tr}\,g_\sigma(tI - A)`,
    is a trace and is estimated with Rademacher probes z (:math:`\|z\|^2 = P`), each through Gauss
    quadrature: for :math:`q = z/\sqrt P`, m Lanczos steps give :math:`T_m = S\Theta S^\top` and
    :math:`q^\top f(A) q \approx \sum_i \tau_i f(\theta_i)` with nodes :math:`\theta_i` and weights
    :math:`\tau_i = (e_1^\top s_i)^2` (exact for polynomials f of degree < 2m). Hence

    .. math:: \hat\phi(t) = \frac1n \sum_{l=1}^n \sum_{i=1}^m \tau_i^{(l)}\, g_\sigma(t - \theta_i^{(l)}),
              \qquad g_\sigma(x) = \frac{e^{-x^2/2\sigma^2}}{\sigma\sqrt{2\pi}} .

    Normalization: :math:`\sum_i \tau_i^{(l)} = \|q\|^2 = 1` for every probe, so :math:`\hat\phi` integrates
    to 1 over the real line (a probability density, not P times one); :math:`\sum_i \tau_i\theta_i =
    q^\top A q` is an unbiased estimate of tr(A)/P.

    Args:
        A: anything :func:`~fisherext.linalg.as_operator` accepts.
        m: Lanczos steps per probe (values above P act as P).
        n: number of probes.
        grid: points [G] at which to evaluate the density (default: ``points`` equally spaced points over
            [min θ − 5σ, max θ + 5σ]).
        sigma: kernel width (default: 1% of the range of the nodes, or of their magnitude if they coincide).
        points: the size of the default grid.
        generator: the source of the probes (None: the global generator).
        progress: a progress bar over the probes.

    Returns:
        a SpectralDensity (grid, density, nodes, weights), which unpacks as (grid, density).

    Raises:
        ValueError: m, n or points < 1, sigma <= 0, a grid that is not a non-empty 1-D floating-point
            tensor; A a tensor that is not square and symmetric.
        TypeError: A is no operator, grid no tensor.
    """
    A = as_operator(A)
    P = A.shape[0]
    check_positive_int("m", m)
    check_positive_int("n", n)
    check_positive_int("points", points)
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float))
                              or not math.isfinite(sigma) or sigma <= 0):
        raise ValueError(f"sigma: must be a positive number, got {sigma!r}")
    if grid is not None:
        if not isinstance(grid, torch.Tensor):
            raise TypeError(f"grid: expected a 1-D tensor, got {type(grid).__name__}")
        if grid.dim() != 1 or grid.numel() == 0 or not grid.is_floating_point():
            raise ValueError(f"grid: expected a non-empty 1-D floating-point tensor, got {grid.dtype} "
                             f"of shape {tuple(grid.shape)}")
    m = min(m, P)
    nodes = torch.zeros(n, m, dtype=torch.float64)
    weights = torch.zeros(n, m, dtype=torch.float64)
    for probe in progress_bar(range(n), progress, "slq_density"):
        alpha, beta, _ = _lanczos_basis(A, _probes((P,), "rademacher", generator, A), m, restart=False)
        theta, S = _ritz(alpha, beta)
        nodes[probe, :theta.numel()] = theta
        weights[probe, :theta.numel()] = S[0] ** 2
    used = nodes[weights > 0]   # not the zero padding of probes that stopped early
    lo, hi = used.min().item(), used.max().item()
    if sigma is None:
        sigma = 0.01 * ((hi - lo) or max(abs(hi), 1.0))
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, points, dtype=torch.float64)
    grid = grid.to("cpu", torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes.reshape(1, -1)) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = kernel @ weights.reshape(-1) / n
    return SpectralDensity(grid, density, nodes, weights)
