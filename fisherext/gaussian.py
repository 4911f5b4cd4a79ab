r"""Closed-form Fisher information and KL divergence for univariate and multivariate normals.

The exact reference behind the Gaussian KL study (seed 000, ``fisherext.experiments.gaussian_kl``): for a Gaussian
:math:`p_\theta`, the KL divergence to a perturbed Gaussian and the Fisher quadratic form agree to
second order,

.. math::  \mathrm{KL}(p_\theta \,\|\, p_{\theta+\Delta}) = \tfrac12\,\Delta^\top F(\theta)\,\Delta + O(\|\Delta\|^3),

and the ½ is not optional. :math:`F(\theta) = \mathbb{E}_{x\sim p_\theta}[g g^\top] =
-\mathbb{E}_{x\sim p_\theta}[\nabla^2_\theta \log p_\theta(x)]` with the score
:math:`g = \nabla_\theta \log p_\theta(x)`; it is the Fisher of *one* observation (a mean over samples,
not a sum), so the empirical estimate from n draws is :math:`\hat F = \frac1n\sum_i g_i g_i^\top`.

Parameter vectors (the layout every function here uses)
-------------------------------------------------------
Univariate :math:`\mathcal N(\mu, \sigma^2)`: :math:`\theta = (\mu, \sigma)` for ``param="sigma"`` or
:math:`\theta = (\mu, \log\sigma)` for ``param="log_sigma"``. Functions always take ``sigma`` itself
(σ > 0); ``param`` only says in which coordinates scores, Fisher and perturbations are expressed.

Multivariate :math:`\mathcal N(\mu, \Sigma)`, :math:`\Sigma = LL^\top` with L lower triangular and a
positive diagonal (a Cholesky factor):

.. math::  \theta = \big(\mu_0, \dots, \mu_{d-1},\; \ell_{00}, \ell_{10}, \ell_{11}, \ell_{20}, \ell_{21},
           \ell_{22}, \dots\big),

i.e. μ followed by the lower-triangular entries of L in row-major order, exactly the order of
``torch.tril_indices(d, d)``; P = d + d(d+1)/2 parameters (d = 100 gives P = 5150). With
``diag="raw"`` (default) the coordinate of a diagonal entry is :math:`L_{jj}` itself; with
``diag="log"`` it is :math:`\log L_{jj}` (off-diagonal entries are always raw). For d = 1,
``diag="raw"`` is the univariate ``param="sigma"`` and ``diag="log"`` is ``param="log_sigma"``.

Closed forms (derivations in the function docstrings)
-----------------------------------------------------
- univariate: :math:`F_{(\mu,\sigma)} = \mathrm{diag}(1/\sigma^2, 2/\sigma^2)`,
  :math:`F_{(\mu,\log\sigma)} = \mathrm{diag}(1/\sigma^2, 2)`.
- multivariate: the μ block is :math:`\Sigma^{-1}`, the μ–L cross blocks are 0, and the L block is
  :math:`F_{(ij),(kl)} = \delta_{jl}\,[(\Sigma^{-1})_{ik} + \delta_{ij}\delta_{kl}/L_{jj}^2]` for
  i ≥ j, k ≥ l (raw diagonal) — the Gaussian Fisher
  :math:`\tfrac12\mathrm{tr}(\Sigma^{-1}\partial_a\Sigma\,\Sigma^{-1}\partial_b\Sigma)` with
  :math:`\partial\Sigma/\partial L_{ij} = E_{ij}L^\top + LE_{ji}` worked out exactly.
  Hence :math:`F v` and :math:`\Delta^\top F\Delta` cost two triangular solves and are computed without
  forming F (``mvn_fisher_mv``, ``mvn_fisher_quad``); ``mvn_fisher`` builds the dense P×P matrix when
  it is wanted (212 MB in float64 at d = 100).
- empirical: :math:`\hat F = \frac1n\sum_i g_i g_i^\top` from scores (``empirical_fisher``), and its
  quadratic form from scores, from given samples, or from n fresh draws with its standard error
  (``empirical_fisher_quad``, ``mvn_empirical_fisher_quad``, ``mvn_sampled_fisher_quad``), never forming
  the n×P scores or the P×P matrix where they are not given.

Randomness comes from a ``generator`` (a CPU ``torch.Generator``; None: the global one), drawn on the
CPU so a seeded generator gives the same values on every device. Scalar results are 0-d tensors.

What not to do (seed 000)
-------------------------
The seed compared KL with :math:`\Delta^\top F\Delta` (no ½: its ratios are off by exactly 2) and built
its multivariate "empirical Fisher" as the outer product of the *summed* gradient,
:math:`\frac1n(\sum_i g_i)(\sum_i g_i)^\top` — a rank-one matrix with one degree of freedom, zero in
every direction orthogonal to :math:`\sum_i g_i`, instead of the mean of per-sample outer products
:math:`\frac1n\sum_i g_i g_i^\top` (``empirical_fisher``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ._core.checks import check_choice, check_positive_int
from ._core.entry import entry_point

#: The univariate layouts: θ = (μ, σ) or θ = (μ, log σ).
PARAMS = ("sigma", "log_sigma")
#: The multivariate layouts of the diagonal of L in θ: raw :math:`L_{jj}` or :math:`\log L_{jj}`.
DIAGS = ("raw", "log")

__all__ = [
    "DIAGS", "PARAMS",
    "empirical_fisher", "empirical_fisher_quad", "mvn_empirical_fisher_quad", "mvn_fisher", "mvn_fisher_mv",
    "mvn_fisher_quad", "mvn_kl", "mvn_log_prob", "mvn_num_params", "mvn_pack", "mvn_sampled_fisher_quad",
    "mvn_score", "mvn_score_dot", "mvn_unpack",
    "random_mvn", "univariate_fisher", "univariate_kl", "univariate_log_prob", "univariate_pack",
    "univariate_score", "univariate_unpack",
]

_LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------- checks


def _tensor(name, value, like=None):
    """``value`` as a floating tensor (Python numbers take ``like``'s dtype/device, else the default dtype)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a tensor or a real number, got {type(value).__name__}")
    if like is not None:
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    return torch.tensor(float(value), dtype=torch.get_default_dtype())


def _finite(name, t):
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains non-finite values")


def _check_sigma(name, sigma):
    _finite(name, sigma)
    if not bool((sigma > 0).all()):
        raise ValueError(f"{name}: the standard deviation must be positive, got {sigma.detach().min().item()}")


def _check_mvn(mu, L, mu_name="mu", L_name="L"):
    """Validate (μ [d], L [d, d] lower triangular with a positive diagonal); return d."""
    if not isinstance(L, torch.Tensor) or not L.is_floating_point():
        raise TypeError(f"{L_name}: expected a floating-point tensor")
    if not isinstance(mu, torch.Tensor) or not mu.is_floating_point():
        raise TypeError(f"{mu_name}: expected a floating-point tensor")
    if L.dim() != 2 or L.shape[0] != L.shape[1] or L.shape[0] == 0:
        raise ValueError(f"{L_name}: expected a non-empty square matrix [d, d], got shape {tuple(L.shape)}")
    d = L.shape[0]
    if mu.shape != (d,):
        raise ValueError(f"{mu_name}: expected shape ({d},) to match {L_name} {tuple(L.shape)}, got {tuple(mu.shape)}")
    if mu.dtype != L.dtype or mu.device != L.device:
        raise ValueError(f"{mu_name}: dtype/device {mu.dtype}/{mu.device} differ from {L_name}'s {L.dtype}/{L.device}")
    _finite(mu_name, mu)
    _finite(L_name, L)
    if bool((torch.triu(L.detach(), 1) != 0).any()):
        raise ValueError(f"{L_name}: must be lower triangular (its strictly upper part must be exactly zero)")
    if not bool((torch.diagonal(L) > 0).all()):
        raise ValueError(f"{L_name}: the diagonal of the Cholesky factor must be positive, "
                         f"got min {torch.diagonal(L).detach().min().item()}")
    return d


def _check_vector(name, v, P, like):
    """A parameter-space vector (or a batch [..., P]) matching dtype/device of ``like``."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor [..., {P}], got {type(v).__name__}")
    if not v.is_floating_point() or v.dim() == 0 or v.shape[-1] != P:
        raise ValueError(f"{name}: expected a floating-point tensor [..., {P}], got {v.dtype} {tuple(v.shape)}")
    _finite(name, v)
    return v.to(dtype=like.dtype, device=like.device)


def _check_samples(x, d, like):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x: expected a floating-point tensor [..., d]")
    if x.dim() == 0 or x.shape[-1] != d:
        raise ValueError(f"x: expected shape [..., {d}], got {tuple(x.shape)}")
    return x.to(dtype=like.dtype, device=like.device)


# ------------------------------------------------------------------------------------ univariate


@entry_point
def univariate_pack(mu, sigma, param: str = "sigma") -> torch.Tensor:
    r"""The parameter vector of :math:`\mathcal N(\mu, \sigma^2)`.

    Args:
        mu: the mean (a number or a one-element tensor).
        sigma: the standard deviation σ > 0 (a number or a one-element tensor; its dtype wins).
        param: ``"sigma"`` for θ = (μ, σ), ``"log_sigma"`` for θ = (μ, log σ).

    Returns:
        Tensor [2]: θ.

    Raises:
        TypeError: ``mu`` or ``sigma`` is neither a real number nor a floating-point tensor.
        ValueError: σ is not finite and positive, or ``param`` is unknown.
    """
    check_choice("param", param, PARAMS)
    sigma = _tensor("sigma", sigma)
    mu = _tensor("mu", mu, sigma)
    _check_sigma("sigma", sigma)
    s = sigma if param == "sigma" else torch.log(sigma)
    return torch.stack([mu.reshape(()), s.reshape(())])


@entry_point
def univariate_unpack(theta: torch.Tensor, param: str = "sigma"):
    """The inverse of :func:`univariate_pack`. Differentiable in θ.

    Args:
        theta: Tensor [2], θ = (μ, σ) or (μ, log σ).
        param: ``"sigma"`` or ``"log_sigma"``, the layout of ``theta``.

    Returns:
        (μ, σ): two 0-d tensors.

    Raises:
        ValueError: ``theta`` is not a tensor of shape (2,), or ``param`` is unknown.
    """
    check_choice("param", param, PARAMS)
    if not isinstance(theta, torch.Tensor) or theta.shape != (2,):
        raise ValueError(f"theta: expected a tensor of shape (2,), got {getattr(theta, 'shape', type(theta))}")
    return theta[0], (theta[1] if param == "sigma" else torch.exp(theta[1]))


@entry_point
def univariate_log_prob(x, mu, sigma) -> torch.Tensor:
    r"""The log-density of :math:`\mathcal N(\mu, \sigma^2)`, elementwise.

    .. math:: \log p(x) = -\tfrac12\log 2\pi - \log\sigma - \frac{(x-\mu)^2}{2\sigma^2}

    Args:
        x: the points (a tensor of any shape, or a number).
        mu: the mean (broadcast against ``x``).
        sigma: the standard deviation σ > 0 (broadcast against ``x``).

    Returns:
        Tensor of the broadcast shape of ``x``, ``mu``, ``sigma``.

    Raises:
        TypeError: an argument is neither a real number nor a floating-point tensor.
        ValueError: σ is not finite and positive.
    """
    sigma = _tensor("sigma", sigma)
    mu = _tensor("mu", mu, sigma)
    x = _tensor("x", x, sigma)
    _check_sigma("sigma", sigma)
    return -0.5 * _LOG_2PI - torch.log(sigma) - 0.5 * ((x - mu) / sigma) ** 2


@entry_point
def univariate_score(x, mu, sigma, param: str = "sigma") -> torch.Tensor:
    r"""The per-sample score :math:`\nabla_\theta \log p(x)` of :math:`\mathcal N(\mu, \sigma^2)`.

    With :math:`u = (x-\mu)/\sigma`: :math:`\partial_\mu = u/\sigma`,
    :math:`\partial_\sigma = (u^2 - 1)/\sigma`, :math:`\partial_{\log\sigma} = u^2 - 1`.

    Args:
        x: the samples (any shape).
        mu: the mean.
        sigma: the standard deviation σ > 0.
        param: ``"sigma"`` for θ = (μ, σ), ``"log_sigma"`` for θ = (μ, log σ).

    Returns:
        Tensor [\*x.shape, 2]: the score of each sample in the θ layout.

    Raises:
        TypeError: an argument is neither a real number nor a floating-point tensor.
        ValueError: σ is not finite and positive, or ``param`` is unknown.
    """
    check_choice("param", param, PARAMS)
    sigma = _tensor("sigma", sigma)
    mu = _tensor("mu", mu, sigma)
    x = _tensor("x", x, sigma)
    _check_sigma("sigma", sigma)
    u = (x - mu) / sigma
    ds = u * u - 1.0
    if param == "sigma":
        ds = ds / sigma
    return torch.stack(torch.broadcast_tensors(u / sigma, ds), dim=-1)


@entry_point
def univariate_fisher(mu, sigma, param: str = "sigma") -> torch.Tensor:
    r"""The exact Fisher information of one draw from :math:`\mathcal N(\mu, \sigma^2)`.

    :math:`F = \mathbb E[g g^\top]` with the score of :func:`univariate_score`:
    :math:`\mathbb E[u^2] = 1`, :math:`\mathbb E[u(u^2-1)] = 0`, :math:`\mathbb E[(u^2-1)^2] = 2`, so
    :math:`F_{(\mu,\sigma)} = \mathrm{diag}(1/\sigma^2,\ 2/\sigma^2)` and
    :math:`F_{(\mu,\log\sigma)} = \mathrm{diag}(1/\sigma^2,\ 2)` (independent of μ). It is the Fisher of
    one observation; n independent draws carry n F.

    Args:
        mu: the mean (unused by the value, checked for type).
        sigma: the standard deviation σ > 0, a scalar.
        param: ``"sigma"`` or ``"log_sigma"``, the coordinates of F.

    Returns:
        Tensor [2, 2]: F.

    Raises:
        TypeError: ``mu`` or ``sigma`` is neither a real number nor a floating-point tensor.
        ValueError: σ is not a finite positive scalar, or ``param`` is unknown.
    """
    check_choice("param", param, PARAMS)
    sigma = _tensor("sigma", sigma)
    _tensor("mu", mu, sigma)
    _check_sigma("sigma", sigma)
    if sigma.numel() != 1:
        raise ValueError(f"sigma: expected a scalar, got shape {tuple(sigma.shape)}")
    s2 = sigma.reshape(()) ** 2
    second = 2.0 / s2 if param == "sigma" else torch.full_like(s2, 2.0)
    zero = torch.zeros_like(s2)
    return torch.stack([torch.stack([1.0 / s2, zero]), torch.stack([zero, second])])


@entry_point
def univariate_kl(mu0, sigma0, mu1, sigma1) -> torch.Tensor:
    r"""The KL divergence of two univariate normals, elementwise:
    :math:`\mathrm{KL}(\mathcal N(\mu_0,\sigma_0^2)\,\|\,\mathcal N(\mu_1,\sigma_1^2))`.

    .. math:: \log\frac{\sigma_1}{\sigma_0} + \frac{\sigma_0^2 + (\mu_0-\mu_1)^2}{2\sigma_1^2} - \frac12
              = \tfrac12\big[e^2 + 2(e - \mathrm{log1p}(e)) + ((\mu_1-\mu_0)/\sigma_1)^2\big],
              \quad e = (\sigma_0 - \sigma_1)/\sigma_1,

    the right-hand form avoiding the cancellation of the left one for nearby distributions (the KL is
    accurate to relative precision even when it is 1e-12).

    Args:
        mu0: the mean of the first normal.
        sigma0: its standard deviation (> 0; its dtype wins for Python numbers).
        mu1: the mean of the second normal.
        sigma1: its standard deviation (> 0).

    Returns:
        Tensor of the broadcast shape of the arguments (0-d for scalars).

    Raises:
        TypeError: an argument is neither a real number nor a floating-point tensor.
        ValueError: a standard deviation is not finite and positive.
    """
    sigma0 = _tensor("sigma0", sigma0)
    sigma1 = _tensor("sigma1", sigma1, sigma0)
    mu0 = _tensor("mu0", mu0, sigma0)
    mu1 = _tensor("mu1", mu1, sigma0)
    _check_sigma("sigma0", sigma0)
    _check_sigma("sigma1", sigma1)
    e = (sigma0 - sigma1) / sigma1
    z = (mu1 - mu0) / sigma1
    return 0.5 * (e * e + 2.0 * (e - torch.log1p(e)) + z * z)


# ---------------------------------------------------------------------------------- multivariate


@entry_point
def mvn_num_params(d: int) -> int:
    """The number of parameters of a d-dimensional normal in the θ layout.

    Args:
        d: the dimension.

    Returns:
        P = d + d(d+1)/2 (μ plus the lower triangle of L), a Python int (a size, not a computed value).
    """
    return d + d * (d + 1) // 2


def _tril(d, device):
    rows, cols = torch.tril_indices(d, d, device=device)
    return rows, cols, (rows == cols)


@entry_point
def mvn_pack(mu: torch.Tensor, L: torch.Tensor, diag: str = "raw") -> torch.Tensor:
    """The parameter vector θ = (μ, tril(L)) of :math:`\\mathcal N(\\mu, LL^\\top)` (module docstring).

    Args:
        mu: the mean [d].
        L: the Cholesky factor [d, d]: lower triangular with a positive diagonal.
        diag: ``"raw"`` (the diagonal coordinates are :math:`L_{jj}`) or ``"log"`` (:math:`\\log L_{jj}`).

    Returns:
        Tensor [P]: μ followed by the lower-triangular entries of L in ``torch.tril_indices`` order.

    Raises:
        TypeError: ``mu`` or ``L`` is not a floating-point tensor.
        ValueError: the shapes do not match, the entries are not finite, L is not lower triangular with
            a positive diagonal, or ``diag`` is unknown.
    """
    check_choice("diag", diag, DIAGS)
    d = _check_mvn(mu, L)
    rows, cols, on_diag = _tril(d, L.device)
    ell = L[rows, cols]
    if diag == "log":
        ell = torch.where(on_diag, torch.log(torch.where(on_diag, ell, torch.ones_like(ell))), ell)
    return torch.cat([mu, ell])


@entry_point
def mvn_unpack(theta: torch.Tensor, d: int, diag: str = "raw"):
    """The inverse of :func:`mvn_pack`. Differentiable in θ.

    Args:
        theta: Tensor [P], P = :func:`mvn_num_params` (d).
        d: the dimension.
        diag: ``"raw"`` or ``"log"``, the layout of the diagonal coordinates of ``theta``.

    Returns:
        (μ [d], L [d, d]). With ``diag="raw"`` the diagonal of L is whatever θ holds: it is a Cholesky
        factor only where those entries are positive.

    Raises:
        ValueError: ``d`` is not a positive int, ``theta`` not a floating-point tensor of shape (P,), or
            ``diag`` is unknown.
    """
    check_choice("diag", diag, DIAGS)
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"d: expected a positive int, got {d!r}")
    P = mvn_num_params(d)
    if not isinstance(theta, torch.Tensor) or theta.shape != (P,) or not theta.is_floating_point():
        raise ValueError(f"theta: expected a floating-point tensor of shape ({P},) for d={d}, "
                         f"got {getattr(theta, 'shape', type(theta))}")
    rows, cols, on_diag = _tril(d, theta.device)
    ell = theta[d:]
    if diag == "log":
        ell = torch.where(on_diag, torch.exp(ell), ell)
    L = torch.zeros(d, d, dtype=theta.dtype, device=theta.device).index_put((rows, cols), ell)
    return theta[:d], L


def _tri_solve(L, B):
    """L⁻¹ B for lower-triangular L."""
    return torch.linalg.solve_triangular(L, B, upper=False)


@entry_point
def random_mvn(d: int, *, generator: torch.Generator | None = None, dtype=torch.float64, device=None):
    r"""A well-conditioned random normal (μ, L).

    :math:`\mu \sim \mathcal N(0, I)`, :math:`\Sigma = AA^\top/(2d) + \tfrac12 I` with
    :math:`A \sim \mathcal N(0, 1)^{d\times 2d}` (for large d the eigenvalues of Σ fill about
    [0.59, 3.4]; all ≥ ½ for any d), L = cholesky(Σ).

    Args:
        d: the dimension.
        generator: the source of randomness (a CPU generator; None: the global generator). The draws are
            made on the CPU and moved, so a seeded generator gives the same normal on every device.
        dtype: the floating-point dtype.
        device: where the result lives.

    Returns:
        (μ [d], L [d, d]).

    Raises:
        ValueError: ``d`` is not a positive int.
    """
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"d: expected a positive int, got {d!r}")
    mu = torch.randn(d, generator=generator, dtype=dtype)
    A = torch.randn(d, 2 * d, generator=generator, dtype=dtype)
    Sigma = A @ A.T / (2 * d) + 0.5 * torch.eye(d, dtype=dtype)
    L = torch.linalg.cholesky(Sigma)
    return mu.to(device), L.to(device)


@entry_point
def mvn_log_prob(x: torch.Tensor, mu: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    r"""The log-density of :math:`\mathcal N(\mu, LL^\top)`.

    .. math:: \log p(x) = -\tfrac d2\log 2\pi - \sum_j \log L_{jj} - \tfrac12\|z\|^2,
              \qquad z = L^{-1}(x-\mu).

    Args:
        x: the points [..., d].
        mu: the mean [d].
        L: the Cholesky factor [d, d].

    Returns:
        Tensor [\*x.shape[:-1]].

    Raises:
        TypeError: an argument is not a floating-point tensor.
        ValueError: the shapes do not match, or (μ, L) is not a valid normal (see :func:`mvn_pack`).
    """
    d = _check_mvn(mu, L)
    x = _check_samples(x, d, L)
    z = _tri_solve(L, (x - mu).reshape(-1, d).T).T.reshape(x.shape)
    return -0.5 * d * _LOG_2PI - torch.log(torch.diagonal(L)).sum() - 0.5 * (z * z).sum(-1)


@entry_point
def mvn_score(x: torch.Tensor, mu: torch.Tensor, L: torch.Tensor, diag: str = "raw") -> torch.Tensor:
    r"""The per-sample scores :math:`g_i = \nabla_\theta \log p(x_i)` in the θ layout.

    With :math:`z = L^{-1}(x-\mu)` and :math:`w = L^{-\top} z = \Sigma^{-1}(x-\mu)`:

    - μ part: :math:`w`;
    - L part: :math:`\partial/\partial L` of :math:`-\log\det L - \tfrac12 z^\top z` is
      :math:`L^{-\top}(zz^\top - I) = w z^\top - L^{-\top}`, whose lower triangle is
      :math:`w_i z_j - \delta_{ij}/L_{jj}` (:math:`L^{-\top}` is upper triangular with diagonal
      :math:`1/L_{jj}`); for ``diag="log"`` the diagonal entries are multiplied by :math:`L_{jj}`.

    Built entry-wise on the tril indices (never an n×d×d intermediate).

    Args:
        x: the samples [n, d] (or one sample [d]).
        mu: the mean [d].
        L: the Cholesky factor [d, d].
        diag: ``"raw"`` or ``"log"``, the layout of the diagonal coordinates.

    Returns:
        Tensor [n, P]: row i is :math:`g_i`.

    Raises:
        TypeError: an argument is not a floating-point tensor.
        ValueError: the shapes do not match, (μ, L) is not a valid normal, or ``diag`` is unknown.
    """
    check_choice("diag", diag, DIAGS)
    d = _check_mvn(mu, L)
    x = _check_samples(x, d, L)
    x = x.reshape(-1, d)
    z = _tri_solve(L, (x - mu).T)                                  # [d, n]
    w = torch.linalg.solve_triangular(L.T, z, upper=True).T    # [n, d]
    z = z.T
    rows, cols, on_diag = _tril(d, L.device)
    Ld = torch.diagonal(L)[cols]
    dL = w[:, rows] * z[:, cols] - torch.where(on_diag, 1.0 / Ld, torch.zeros_like(Ld))
    if diag == "log":
        dL = dL * torch.where(on_diag, Ld, torch.ones_like(Ld))
    return torch.cat([w, dL], dim=1)


def _split_delta(delta, mu, L, diag):
    """Δ [..., P] → (Δμ [..., d], ΔL [..., d, d]) in raw-L coordinates (log diagonal: ΔL_jj = L_jj Δθ_jj)."""
    d = L.shape[0]
    rows, cols, on_diag = _tril(d, L.device)
    dl = delta[..., d:]
    if diag == "log":
        dl = dl * torch.where(on_diag, torch.diagonal(L)[cols], torch.ones_like(cols, dtype=L.dtype))
    dL = torch.zeros(*delta.shape[:-1], d, d, dtype=L.dtype, device=L.device)
    dL[..., rows, cols] = dl
    return delta[..., :d], dL


def _whitened_delta(delta, mu, L, diag):
    """(a, A) = (L⁻¹Δμ [..., d], L⁻¹ΔL [..., d, d]): the step in the whitened coordinates of the closed
    forms."""
    dmu, dL = _split_delta(delta, mu, L, diag)
    return _tri_solve(L, dmu.unsqueeze(-1)).squeeze(-1), _tri_solve(L, dL)


@entry_point
def mvn_fisher_quad(mu: torch.Tensor, L: torch.Tensor, delta: torch.Tensor, diag: str = "raw") -> torch.Tensor:
    r"""The exact Fisher quadratic form :math:`\Delta^\top F \Delta` without forming F (no ½ here).

    For the μ part :math:`\Delta_\mu^\top\Sigma^{-1}\Delta_\mu = \|L^{-1}\Delta_\mu\|^2`. For the L part
    the Gaussian Fisher quadratic is :math:`\tfrac12\mathrm{tr}(\Sigma^{-1}d\Sigma\,\Sigma^{-1}d\Sigma)`
    with :math:`d\Sigma = \Delta_L L^\top + L\Delta_L^\top`. Writing :math:`A = L^{-1}\Delta_L` (lower
    triangular, diagonal :math:`\Delta_{L,jj}/L_{jj}`), :math:`L^{-1}d\Sigma L^{-\top} = A + A^\top`, so

    .. math:: \tfrac12\|A + A^\top\|_F^2 = \|A\|_F^2 + \mathrm{tr}(A^2) = \|A\|_F^2 + \sum_j A_{jj}^2 .

    The μ–L cross term is zero. For ``diag="log"`` the diagonal coordinates are first mapped by the
    chain rule, :math:`\Delta_{L,jj} = L_{jj}\Delta\theta_{jj}`. Cost: two triangular solves. F is the
    Fisher of one draw.

    Args:
        mu: the mean [d].
        L: the Cholesky factor [d, d].
        delta: one step [P], or a batch of steps [..., P] (each evaluated separately).
        diag: ``"raw"`` or ``"log"``, the layout of the diagonal coordinates.

    Returns:
        Tensor [\*delta.shape[:-1]]: 0-d for one step.

    Raises:
        TypeError: an argument is not a floating-point tensor.
        ValueError: ``delta`` does not end in P or has non-finite entries, (μ, L) is not a valid normal,
            or ``diag`` is unknown.
    """
    check_choice("diag", diag, DIAGS)
    d = _check_mvn(mu, L)
    delta = _check_vector("delta", delta, mvn_num_params(d), L)
    a, A = _whitened_delta(delta, mu, L, diag)
    Ad = torch.diagonal(A, dim1=-2, dim2=-1)
    return (a * a).sum(-1) + (A * A).sum((-2, -1)) + (Ad * Ad).sum(-1)


@entry_point
def mvn_fisher_mv(mu: torch.Tensor, L: torch.Tensor, v: torch.Tensor, diag: str = "raw") -> torch.Tensor:
    r"""The exact Fisher-vector product :math:`F v` without forming F.

    μ part :math:`\Sigma^{-1}v_\mu`; L part (raw diagonal, V the lower-triangular matrix of
    :math:`v_L`): :math:`\mathrm{tril}(\Sigma^{-1}V) + \mathrm{diag}(V_{jj}/L_{jj}^2)`, which is the
    polarization of :func:`mvn_fisher_quad`. ``diag="log"`` applies the chain-rule factor
    :math:`D = \mathrm{diag}(1,\dots,L_{jj},\dots)` on both sides (:math:`F_{\log} = D F_{\rm raw} D`).

    Args:
        mu: the mean [d].
        L: the Cholesky factor [d, d].
        v: one vector [P], or a batch [..., P] (each multiplied separately).
        diag: ``"raw"`` or ``"log"``, the layout of the diagonal coordinates.

    Returns:
        Tensor [..., P], shaped like ``v``.

    Raises:
        TypeError: an argument is not a floating-point tensor.
        ValueError: ``v`` does not end in P or has non-finite entries, (μ, L) is not a valid normal, or
            ``diag`` is unknown.
    """
    check_choice("diag", diag, DIAGS)
    d = _check_mvn(mu, L)
    v = _check_vector("v", v, mvn_num_params(d), L)
    vmu, V = _split_delta(v, mu, L, diag)
    out_mu = torch.linalg.solve_triangular(L.T, _tri_solve(L, vmu.unsqueeze(-1)), upper=True).squeeze(-1)
    SV = torch.linalg.solve_triangular(L.T, _tri_solve(L, V), upper=True)   # Σ⁻¹ V
    rows, cols, on_diag = _tril(d, L.device)
    Ldiag = torch.diagonal(L)
    Ld = Ldiag[cols]
    out_L = SV[..., rows, cols] + torch.where(on_diag, V[..., rows, cols] / Ld ** 2, torch.zeros_like(Ld))
    if diag == "log":
        out_L = out_L * torch.where(on_diag, Ld, torch.ones_like(Ld))
    return torch.cat([out_mu, out_L], dim=-1)


@entry_point
def mvn_fisher(mu: torch.Tensor, L: torch.Tensor, diag: str = "raw") -> torch.Tensor:
    r"""The exact dense Fisher information of θ = (μ, tril(L)) for one draw.

    .. math::
        F = \begin{pmatrix}\Sigma^{-1} & 0\\ 0 & F_{LL}\end{pmatrix},\qquad
        (F_{LL})_{(ij),(kl)} = \tfrac12\mathrm{tr}\big(\Sigma^{-1}\tfrac{\partial\Sigma}{\partial L_{ij}}
            \Sigma^{-1}\tfrac{\partial\Sigma}{\partial L_{kl}}\big)
          = \delta_{jl}\big[(\Sigma^{-1})_{ik} + \delta_{ij}\delta_{kl}/L_{jj}^2\big]

    (i ≥ j, k ≥ l; :math:`\partial\Sigma/\partial L_{ij} = E_{ij}L^\top + LE_{ji}`). Derivation: with
    :math:`A_{ij} = L^{-1}E_{ij} = (L^{-1})_{:,i}e_j^\top`, the trace is
    :math:`\langle A_{ij},A_{kl}\rangle + \mathrm{tr}(A_{ij}A_{kl})`; the first term is
    :math:`\delta_{jl}(L^{-\top}L^{-1})_{ik} = \delta_{jl}(\Sigma^{-1})_{ik}`, the second (both lower
    triangular) only sees diagonals, :math:`(A_{ij})_{mm} = \delta_{mj}(L^{-1})_{ji}`, non-zero only for
    i = j. So :math:`F_{LL}` couples entries of the same column of L only: in column-major order it is
    block diagonal with blocks :math:`(\Sigma^{-1})_{j:,j:} + e_0e_0^\top/L_{jj}^2`. It equals the
    Kronecker form :math:`\tfrac12 J^\top(\Sigma^{-1}\otimes\Sigma^{-1})J`, J the Jacobian of
    vec(Σ) w.r.t. tril(L) (checked in the tests). ``diag="log"``: :math:`F_{\log} = DFD` with
    :math:`D_{jj} = L_{jj}` on the diagonal coordinates.

    The matrix is assembled one column of L at a time (d block writes, no loop over entries); at
    d = 100 it is 5150² float64 = 212 MB. When only :math:`F v` or :math:`\Delta^\top F\Delta` is
    needed, use :func:`mvn_fisher_mv` / :func:`mvn_fisher_quad`.

    Args:
        mu: the mean [d].
        L: the Cholesky factor [d, d].
        diag: ``"raw"`` or ``"log"``, the layout of the diagonal coordinates.

    Returns:
        Tensor [P, P]: F, symmetric positive definite.

    Raises:
        TypeError: ``mu`` or ``L`` is not a floating-point tensor.
        ValueError: (μ, L) is not a valid normal (see :func:`mvn_pack`), or ``diag`` is unknown.
    """
    check_choice("diag", diag, DIAGS)
    d = _check_mvn(mu, L)
    P = mvn_num_params(d)
    eye = torch.eye(d, dtype=L.dtype, device=L.device)
    Linv = _tri_solve(L, eye)
    Sinv = Linv.T @ Linv
    Sinv = 0.5 * (Sinv + Sinv.T)
    F = torch.zeros(P, P, dtype=L.dtype, device=L.device)
    F[:d, :d] = Sinv
    Ldiag = torch.diagonal(L)
    i_all = torch.arange(d, device=L.device)
    for j in range(d):
        i = i_all[j:]
        idx = d + i * (i + 1) // 2 + j               # row-major tril position of (i, j)
        block = Sinv[j:, j:].clone()
        block[0, 0] += 1.0 / Ldiag[j] ** 2
        F[idx[:, None], idx[None, :]] = block
    if diag == "log":
        rows, cols, on_diag = _tril(d, L.device)
        D = torch.cat([torch.ones(d, dtype=L.dtype, device=L.device),
                       torch.where(on_diag, Ldiag[cols], torch.ones_like(cols, dtype=L.dtype))])
        F *= D[:, None]
        F *= D[None, :]
    return F


@entry_point
def mvn_kl(mu0: torch.Tensor, L0: torch.Tensor, mu1: torch.Tensor, L1: torch.Tensor) -> torch.Tensor:
    r"""The KL divergence of two multivariate normals:
    :math:`\mathrm{KL}(\mathcal N(\mu_0, L_0L_0^\top)\,\|\,\mathcal N(\mu_1, L_1L_1^\top))`.

    .. math::
        \tfrac12\big[\mathrm{tr}(\Sigma_1^{-1}\Sigma_0) + (\mu_1-\mu_0)^\top\Sigma_1^{-1}(\mu_1-\mu_0)
        - d + \ln\det\Sigma_1 - \ln\det\Sigma_0\big]

    computed with triangular solves and without cancellation: with :math:`M = L_1^{-1}L_0` (lower
    triangular), :math:`\mathrm{tr}(\Sigma_1^{-1}\Sigma_0) = \|M\|_F^2` and
    :math:`\ln\det\Sigma_1 - \ln\det\Sigma_0 = -2\sum_j\log M_{jj}`. Let
    :math:`D = M - I = L_1^{-1}(L_0 - L_1)` (formed from the difference, so O(‖Δ‖) entries keep full
    relative precision) and :math:`z = L_1^{-1}(\mu_1-\mu_0)`; then

    .. math:: \mathrm{KL} = \tfrac12\Big[\sum_{i\ne j}D_{ij}^2 + \sum_j\big(D_{jj}^2 + 2(D_{jj}
              - \mathrm{log1p}(D_{jj}))\big) + \|z\|^2\Big].

    Args:
        mu0: the mean of the first normal [d].
        L0: its Cholesky factor [d, d].
        mu1: the mean of the second normal [d].
        L1: its Cholesky factor [d, d] (same dtype and device as ``L0``).

    Returns:
        0-d tensor: the KL divergence.

    Raises:
        TypeError: an argument is not a floating-point tensor.
        ValueError: a pair is not a valid normal (see :func:`mvn_pack`), or the two differ in dimension,
            dtype or device.
    """
    d = _check_mvn(mu0, L0, "mu0", "L0")
    d1 = _check_mvn(mu1, L1, "mu1", "L1")
    if d1 != d:
        raise ValueError(f"L1: dimension {d1} differs from L0's {d}")
    if L1.dtype != L0.dtype or L1.device != L0.device:
        raise ValueError(f"L1: dtype/device {L1.dtype}/{L1.device} differ from L0's {L0.dtype}/{L0.device}")
    D = _tri_solve(L1, L0 - L1)
    z = _tri_solve(L1, (mu1 - mu0).unsqueeze(-1)).squeeze(-1)
    e = torch.diagonal(D)
    off = (D * D).sum() - (e * e).sum()
    return 0.5 * (off + (e * e + 2.0 * (e - torch.log1p(e))).sum() + (z * z).sum())



@entry_point
def mvn_score_dot(x: torch.Tensor, mu: torch.Tensor, L: torch.Tensor, delta: torch.Tensor,
                  diag: str = "raw") -> torch.Tensor:
    r"""The per-sample directional derivatives :math:`g_i^\top\Delta` without forming the scores.

    With :math:`z_i = L^{-1}(x_i-\mu)`, :math:`a = L^{-1}\Delta_\mu`, :math:`A = L^{-1}\Delta_L`:
    :math:`g_i^\top\Delta = a^\top z_i + z_i^\top A z_i - \mathrm{tr}(A)` (the L part is
    :math:`\langle L^{-\top}(z z^\top - I), \Delta_L\rangle`). O(n d²), no n×P array.

    Args:
        x: the samples [n, d] (or one sample [d]).
        mu: the mean [d].
        L: the Cholesky factor [d, d].
        delta: one direction [P].
        diag: ``"raw"`` or ``"log"``, the layout of the diagonal coordinates.

    Returns:
        Tensor [n].

    Raises:
        TypeError: an argument is not a floating-point tensor.
        ValueError: the shapes do not match (``delta`` must be one vector [P]), the entries are not
            finite, (μ, L) is not a valid normal, or ``diag`` is unknown.
    """
    check_choice("diag", diag, DIAGS)
    d = _check_mvn(mu, L)
    x = _check_samples(x, d, L).reshape(-1, d)
    delta = _check_direction(delta, d, L)
    a, A = _whitened_delta(delta, mu, L, diag)
    z = _tri_solve(L, (x - mu).T).T                                  # [n, d]
    return z @ a + ((z @ A.T) * z).sum(-1) - torch.diagonal(A).sum()


def _check_direction(delta, d, like):
    """One step [P] (not a batch) for the sample-based quadratics."""
    delta = _check_vector("delta", delta, mvn_num_params(d), like)
    if delta.dim() != 1:
        raise ValueError(f"delta: expected a single vector [P], got shape {tuple(delta.shape)}")
    return delta


# ----------------------------------------------------------------------------------- empirical


@entry_point
def empirical_fisher(scores: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    r"""The empirical Fisher :math:`\hat F = \frac1n\sum_i g_i g_i^\top` from per-sample scores.

    The chunks are accumulated as :math:`G_k^\top G_k`, one GEMM each, so no n×P×P tensor is ever built;
    the normalization is the mean over all n samples.

    Not to be confused with seed 000's :math:`\frac1n(\sum_i g_i)(\sum_i g_i)^\top` (outer product of
    the summed gradient, what ``log_prob(samples).sum().backward()`` followed by an outer product
    gives; do not do this). Its expectation is F, but it is a rank-one matrix built from one random
    vector: along a fixed direction u it is :math:`u^\top F u` times a single :math:`\chi^2_1` draw
    (KL/quadratic ratios from 0.4 to 100, 10-90% range, over random directions at d = 10, n = 10⁴),
    and it is 0 in every direction orthogonal to :math:`\sum_i g_i`. The outer product of the *mean*
    gradient, :math:`\bar g\bar g^\top`, is worse still: about F/n.

    Args:
        scores: a tensor [n, P] (row i is :math:`g_i`, e.g. from :func:`mvn_score`) or an iterable of
            such chunks (streamed).

    Returns:
        Tensor [P, P]: :math:`\hat F`.

    Raises:
        ValueError: a chunk is not a floating-point [n, P] tensor, the chunks differ in P, or there are
            no samples.
    """
    chunks = [scores] if isinstance(scores, torch.Tensor) else scores
    total, n = None, 0
    for k, G in enumerate(chunks):
        if not isinstance(G, torch.Tensor) or not G.is_floating_point() or G.dim() != 2:
            raise ValueError(f"scores: expected floating-point tensors [n, P], chunk {k} is "
                             f"{getattr(G, 'dtype', type(G).__name__)} {tuple(getattr(G, 'shape', ()))}")
        if total is None:
            total = torch.zeros(G.shape[1], G.shape[1], dtype=G.dtype, device=G.device)
        elif G.shape[1] != total.shape[0]:
            raise ValueError(f"scores: chunk {k} has {G.shape[1]} columns, expected {total.shape[0]}")
        total.addmm_(G.T, G)
        n += G.shape[0]
    if total is None or n == 0:
        raise ValueError("scores: no samples")
    return total / n


@entry_point
def empirical_fisher_quad(scores: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    r"""The empirical Fisher quadratic form without forming :math:`\hat F` (no ½ here).

    .. math:: \Delta^\top\hat F\Delta = \frac1n\sum_i (g_i^\top\Delta)^2

    Args:
        scores: the per-sample scores [n, P], n ≥ 1.
        delta: one step [P], or K steps as the rows of [K, P] (each evaluated separately).

    Returns:
        0-d tensor for one step, Tensor [K] for K.

    Raises:
        TypeError: ``delta`` is not a tensor.
        ValueError: ``scores`` is not a non-empty [n, P], or ``delta`` does not end in P or has
            non-finite entries.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores: expected a non-empty tensor [n, P], got {getattr(scores, 'shape', type(scores))}")
    delta = _check_vector("delta", delta, scores.shape[1], scores)
    return ((delta @ scores.T) ** 2).mean(-1)


@entry_point
def mvn_empirical_fisher_quad(x: torch.Tensor, mu: torch.Tensor, L: torch.Tensor, delta: torch.Tensor,
                              diag: str = "raw", chunk_size: int = 65536) -> torch.Tensor:
    r"""The empirical Fisher quadratic form of a normal from given samples (no ½ here).

    .. math:: \Delta^\top\hat F\Delta = \frac1n\sum_i (g_i^\top\Delta)^2

    with :math:`g_i^\top\Delta` as in :func:`mvn_score_dot`, in chunks of ``chunk_size`` samples (never
    the n×P scores nor the P×P matrix).

    Args:
        x: the samples [n, d], n ≥ 1.
        mu: the mean [d].
        L: the Cholesky factor [d, d].
        delta: one step [P].
        diag: ``"raw"`` or ``"log"``, the layout of the diagonal coordinates.
        chunk_size: samples per chunk.

    Returns:
        0-d tensor: :math:`\Delta^\top\hat F\Delta`.

    Raises:
        TypeError: an argument is not a floating-point tensor.
        ValueError: the shapes do not match (``delta`` must be one vector [P]), there are no samples,
            the entries are not finite, (μ, L) is not a valid normal, ``diag`` is unknown, or
            ``chunk_size`` is not a positive int.
    """
    check_choice("diag", diag, DIAGS)
    d = _check_mvn(mu, L)
    x = _check_samples(x, d, L).reshape(-1, d)
    if x.shape[0] == 0:
        raise ValueError("x: no samples")
    delta = _check_direction(delta, d, L)
    chunk_size = check_positive_int("chunk_size", chunk_size)

    def whitened(start, stop):
        return _tri_solve(L, (x[start:stop] - mu).T).T

    return _whitened_quad_stats(whitened, x.shape[0], _whitened_delta(delta, mu, L, diag), chunk_size)[0]


@entry_point
def mvn_sampled_fisher_quad(mu: torch.Tensor, L: torch.Tensor, delta: torch.Tensor, n: int, diag: str = "raw", *,
                            generator: torch.Generator | None = None,
                            chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The empirical Fisher quadratic form over n fresh draws of the normal, with its standard error.

    .. math:: \Delta^\top\hat F\Delta = \frac1n\sum_{i=1}^n q_i, \qquad
              q_i = (g_i^\top\Delta)^2 = (a^\top z_i + z_i^\top A z_i - \mathrm{tr}A)^2,

    for :math:`x_i = \mu + L z_i`, :math:`z_i \sim \mathcal N(0, I)`, with :math:`a = L^{-1}\Delta_\mu`
    and :math:`A = L^{-1}\Delta_L` (:func:`mvn_score_dot`): the whitened :math:`z_i = L^{-1}(x_i-\mu)`
    that the score needs are drawn directly, in chunks, so neither the samples, the n×P scores nor the
    P×P matrix are held. The standard error is :math:`\sqrt{s^2/n}` with :math:`s^2` the unbiased sample
    variance of the :math:`q_i` (relative error :math:`\approx\sqrt{2/n}` when :math:`g^\top\Delta` is
    close to Gaussian). The expectation is the exact :func:`mvn_fisher_quad`.

    Args:
        mu: the mean [d].
        L: the Cholesky factor [d, d].
        delta: one step [P].
        n: the number of draws, ≥ 2.
        diag: ``"raw"`` or ``"log"``, the layout of the diagonal coordinates.
        generator: the source of randomness (a CPU generator; None: the global generator). The draws are
            made on the CPU, chunk after chunk, and moved to L's device, so a seeded generator gives the
            same samples on every device.
        chunk_size: draws per chunk (default: about 4M numbers, at least 1024 draws).

    Returns:
        (quad, standard_error): two 0-d tensors.

    Raises:
        TypeError: an argument is not a floating-point tensor.
        ValueError: ``n`` is not an int ≥ 2, ``delta`` is not one finite vector [P], (μ, L) is not a
            valid normal, ``diag`` is unknown, or ``chunk_size`` is not a positive int.
    """
    check_choice("diag", diag, DIAGS)
    d = _check_mvn(mu, L)
    delta = _check_direction(delta, d, L)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n: expected an int >= 2, got {n!r}")
    chunk_size = check_positive_int("chunk_size", chunk_size, optional=True) or max(1024, (1 << 22) // d)

    def draw(start, stop):
        return torch.randn(stop - start, d, generator=generator, dtype=L.dtype).to(L.device)

    return _whitened_quad_stats(draw, n, _whitened_delta(delta, mu, L, diag), chunk_size)


def _whitened_quad_stats(get_z, n, whitened_delta, chunk_size):
    """Mean and standard error of q_i = (aᵀz_i + z_iᵀAz_i − tr A)² over the whitened z_i = L⁻¹(x_i − μ)
    given chunk-wise by get_z(start, stop), (a, A) = whitened_delta."""
    a, A = whitened_delta
    s1 = torch.zeros((), dtype=A.dtype, device=A.device)
    s2 = torch.zeros((), dtype=A.dtype, device=A.device)
    trA = torch.diagonal(A).sum()
    for start in range(0, n, chunk_size):
        z = get_z(start, min(n, start + chunk_size))
        s = torch.addmv(-trA.expand(z.shape[0]), z, a)
        s += torch.einsum("ni,ni->n", z @ A.T, z)
        q = s * s
        s1 += q.sum()
        s2 += q.dot(q)
    mean = s1 / n
    var = (s2 / n - mean * mean) * n / max(n - 1, 1)
    return mean, torch.sqrt(var.clamp_min(0) / n)
