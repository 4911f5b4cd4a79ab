"""fisherext.gaussian: closed-form Fisher/KL/score of normals against autograd, torch.distributions and
Monte Carlo (seed 000's study built on them is tests/test_experiments_gaussian_kl.py).

Independent oracles:
- scores: autograd of torch.distributions log_prob (not of this module's log-density);
- Fisher: the Hessian of θ ↦ KL(p_θ0 ‖ p_θ) at θ = θ0 equals F(θ0) (= E[ggᵀ] = −E[∇² log p]) exactly;
  the KL there is torch.distributions.kl_divergence, differentiated twice by autograd. Also the Kronecker
  form ½ Jᵀ(Σ⁻¹⊗Σ⁻¹)J with J = ∂vec(LLᵀ)/∂tril(L) by autograd, and a large-n Monte-Carlo E[ggᵀ];
- KL: torch.distributions.kl_divergence (tight) and a Monte-Carlo mean of log p0 − log p1 (loose).

Seed 000's sum-then-outer "empirical Fisher" (Σg)(Σg)ᵀ/n is reproduced to show that it fails.
"""
import math

import pytest
import torch
from torch.autograd.functional import hessian, jacobian
from torch.func import jacfwd
from torch.distributions import MultivariateNormal, Normal, kl_divergence

import fisherext.gaussian as G
from support.gaussian import close, f64, gen, mvn


def randn(*shape, seed, device="cpu"):
    """float64 normal draws from a seeded CPU generator, moved to `device` (the same values on every device)."""
    return torch.randn(*shape, generator=gen(seed), dtype=f64).to(device)


def torch_mvn(mu, L):
    return MultivariateNormal(mu, scale_tril=L, validate_args=False)


def kl_hessian(kl_of_theta, theta0):
    """∇²_θ KL(p_θ0 ‖ p_θ) at θ = θ0 — the Fisher information at θ0."""
    return hessian(kl_of_theta, theta0.clone())


# ------------------------------------------------------------------------------------ univariate


@pytest.mark.parametrize("param", G.PARAMS)
def test_univariate_score_matches_autograd(param, device):
    mu, sigma = torch.tensor(0.7, dtype=f64, device=device), torch.tensor(1.3, dtype=f64, device=device)
    x = randn(50, seed=1, device=device) * 2
    theta = G.univariate_pack(mu, sigma, param).requires_grad_(True)
    m, s = G.univariate_unpack(theta, param)
    lp = Normal(m, s).log_prob(x)
    auto = torch.stack([torch.autograd.grad(lp[i], theta, retain_graph=True)[0] for i in range(len(x))])
    close(G.univariate_score(x, mu, sigma, param), auto)
    close(G.univariate_log_prob(x, mu, sigma), Normal(mu, sigma).log_prob(x))


@pytest.mark.parametrize("param", G.PARAMS)
def test_univariate_fisher_is_kl_hessian(param, device):
    mu, sigma = torch.tensor(-0.4, dtype=f64, device=device), torch.tensor(0.8, dtype=f64, device=device)
    theta0 = G.univariate_pack(mu, sigma, param)

    def kl(theta):
        return kl_divergence(Normal(mu, sigma), Normal(*G.univariate_unpack(theta, param)))

    F = G.univariate_fisher(mu, sigma, param)
    close(F, kl_hessian(kl, theta0))
    expected = torch.diag(torch.tensor([1 / 0.64, 2 / 0.64 if param == "sigma" else 2.0], dtype=f64, device=device))
    close(F, expected)


def test_univariate_kl_matches_torch_and_monte_carlo(device):
    for m0, s0, m1, s1 in [(0.0, 1.0, 0.5, 2.0), (1.2, 0.3, 1.1, 0.35), (-2.0, 3.0, 1.0, 0.5)]:
        args = [torch.tensor(v, dtype=f64, device=device) for v in (m0, s0, m1, s1)]
        kl = G.univariate_kl(*args)
        close(kl, kl_divergence(Normal(args[0], args[1]), Normal(args[2], args[3])))
        x = args[0] + args[1] * randn(200_000, seed=2, device=device)
        d = Normal(args[0], args[1]).log_prob(x) - Normal(args[2], args[3]).log_prob(x)
        assert abs(d.mean() - kl) < 5 * d.std() / math.sqrt(len(x))
    # nearby distributions: no cancellation (torch's form loses all digits at 1e-9)
    kl = G.univariate_kl(1.0, 2.0, 1.0, 2.0 * (1 + 1e-9))
    assert kl.item() == pytest.approx(1e-18, rel=1e-6)   # ½·F_σσ·Δσ² = ½·(2/4)·(2e-9)² = 1e-18


# ---------------------------------------------------------------------------------- multivariate


@pytest.mark.parametrize("diag", G.DIAGS)
def test_pack_unpack_round_trip(diag, device):
    mu, L = mvn(5, device=device)
    theta = G.mvn_pack(mu, L, diag)
    assert theta.shape == (G.mvn_num_params(5),) == (20,)
    rows, cols = torch.tril_indices(5, 5, device=device)
    raw = L[rows, cols]
    expected = torch.where(rows == cols, raw.log(), raw) if diag == "log" else raw
    close(theta, torch.cat([mu, expected]))
    mu2, L2 = G.mvn_unpack(theta, 5, diag)
    close(mu2, mu)
    close(L2, L)


@pytest.mark.parametrize("diag", G.DIAGS)
@pytest.mark.parametrize("d", [1, 4])
def test_mvn_score_matches_autograd(d, diag, device):
    mu, L = mvn(d, seed=d, device=device)
    x = randn(7, d, seed=3, device=device) * 1.5
    theta = G.mvn_pack(mu, L, diag).requires_grad_(True)
    lp = torch_mvn(*G.mvn_unpack(theta, d, diag)).log_prob(x)
    auto = torch.stack([torch.autograd.grad(lp[i], theta, retain_graph=True)[0] for i in range(len(x))])
    close(G.mvn_score(x, mu, L, diag), auto)
    close(G.mvn_log_prob(x, mu, L), torch_mvn(mu, L).log_prob(x))
    delta = randn(theta.numel(), seed=4, device=device)
    close(G.mvn_score_dot(x, mu, L, delta, diag), auto @ delta)


@pytest.mark.parametrize("diag", G.DIAGS)
@pytest.mark.parametrize("d", [1, 3, 6])
def test_mvn_fisher_is_kl_hessian(d, diag, device):
    mu, L = mvn(d, seed=10 + d, device=device)
    p0 = torch_mvn(mu, L)

    def kl(theta):
        return kl_divergence(p0, torch_mvn(*G.mvn_unpack(theta, d, diag)))

    F = G.mvn_fisher(mu, L, diag)
    close(F, kl_hessian(kl, G.mvn_pack(mu, L, diag)))
    # this module's KL has the same Hessian
    close(F, kl_hessian(lambda t: G.mvn_kl(mu, L, *G.mvn_unpack(t, d, diag)), G.mvn_pack(mu, L, diag)))


def test_mvn_fisher_matches_kronecker_form(device):
    """F_LL = ½ Jᵀ(Σ⁻¹⊗Σ⁻¹)J, J = ∂vec(LLᵀ)/∂tril(L); μ block Σ⁻¹; cross blocks 0."""
    d = 5
    mu, L = mvn(d, seed=7, device=device)
    rows, cols = torch.tril_indices(d, d, device=device)

    def vec_sigma(ell):
        Lm = torch.zeros(d, d, dtype=f64, device=device).index_put((rows, cols), ell)
        return (Lm @ Lm.T).reshape(-1)

    J = jacobian(vec_sigma, L[rows, cols])
    Sinv = torch.cholesky_inverse(L)
    F = G.mvn_fisher(mu, L)
    close(F[d:, d:], 0.5 * J.T @ torch.kron(Sinv, Sinv) @ J)
    close(F[:d, :d], Sinv)
    assert F[:d, d:].abs().max() == 0 and F[d:, :d].abs().max() == 0


def test_mvn_d1_is_univariate(device):
    mu, L = torch.tensor([0.3], dtype=f64, device=device), torch.tensor([[1.7]], dtype=f64, device=device)
    for diag, param in zip(G.DIAGS, G.PARAMS):
        close(G.mvn_fisher(mu, L, diag), G.univariate_fisher(mu[0], L[0, 0], param))
    uni = [torch.tensor(v, dtype=f64, device=device) for v in (0.3, 1.7, 0.5, 1.87)]
    close(G.mvn_kl(mu, L, mu + 0.2, L * 1.1), G.univariate_kl(*uni))


@pytest.mark.parametrize("diag", G.DIAGS)
def test_fisher_quad_and_mv_match_dense_d10(diag, device):
    mu, L = mvn(10, seed=5, device=device)
    F = G.mvn_fisher(mu, L, diag)
    V = randn(4, F.shape[0], seed=6, device=device)
    close(G.mvn_fisher_quad(mu, L, V, diag), torch.einsum("ki,ij,kj->k", V, F, V))
    close(G.mvn_fisher_quad(mu, L, V[0], diag), V[0] @ F @ V[0])
    close(G.mvn_fisher_mv(mu, L, V, diag), V @ F)
    assert torch.equal(F, F.T)
    assert torch.linalg.eigvalsh(F).min() > 0


def test_fisher_quad_matches_dense_d100(device):
    mu, L = mvn(100, seed=8, device=device)
    F = G.mvn_fisher(mu, L)
    assert F.shape == (5150, 5150)
    v = randn(5150, seed=9, device=device)
    close(G.mvn_fisher_quad(mu, L, v), v @ (F @ v))
    close(G.mvn_fisher_mv(mu, L, v), F @ v)


@pytest.mark.parametrize("d", [1, 5, 20])
def test_mvn_kl_matches_torch(d, device):
    mu0, L0 = mvn(d, seed=20 + d, device=device)
    mu1, L1 = mvn(d, seed=40 + d, device=device)
    close(G.mvn_kl(mu0, L0, mu1, L1), kl_divergence(torch_mvn(mu0, L0), torch_mvn(mu1, L1)))
    assert G.mvn_kl(mu0, L0, mu0, L0).item() == 0.0


def test_mvn_kl_matches_monte_carlo(device):
    mu0, L0 = mvn(4, seed=1, device=device)
    mu1, L1 = mvn(4, seed=2, device=device)
    x = mu0 + randn(200_000, 4, seed=3, device=device) @ L0.T
    d = G.mvn_log_prob(x, mu0, L0) - G.mvn_log_prob(x, mu1, L1)
    assert abs(d.mean() - G.mvn_kl(mu0, L0, mu1, L1)) < 5 * d.std() / math.sqrt(len(x))


# ----------------------------------------------------------------------------------- empirical


def test_empirical_fisher_converges_to_true_fisher(device):
    """Per-sample mean of outer products vs exact F, entry-wise within 5 standard errors (n = 200000)."""
    d, n = 3, 200_000
    mu, L = mvn(d, seed=11, device=device)
    x = mu + randn(n, d, seed=12, device=device) @ L.T
    g = G.mvn_score(x, mu, L)                                            # [n, 9]
    Fhat = G.empirical_fisher(g)
    se = (g[:, :, None] * g[:, None, :]).std(0) / math.sqrt(n)
    F = G.mvn_fisher(mu, L)
    assert ((Fhat - F).abs() <= 5 * se).all()
    close(G.empirical_fisher(g.split(30_000)), Fhat)                    # streamed chunks
    v = randn(g.shape[1], seed=13, device=device)
    close(G.empirical_fisher_quad(g, v), v @ Fhat @ v)
    close(G.mvn_empirical_fisher_quad(x, mu, L, v, chunk_size=70_000), v @ Fhat @ v)


def score_dots(x, mu, L, u, diag="raw"):
    """g_iᵀu for every sample: d/dt log p_{θ+tu}(x_i) at t = 0 by forward-mode autograd through
    torch.distributions (one pass for all samples)."""
    theta = G.mvn_pack(mu, L, diag)
    return jacfwd(lambda t: torch_mvn(*G.mvn_unpack(theta + t * u, len(mu), diag)).log_prob(x))(
        torch.zeros((), dtype=f64, device=u.device))


@pytest.mark.parametrize("diag", G.DIAGS)
@pytest.mark.parametrize("chunk_size", [None, 300])
def test_sampled_fisher_quad_is_the_mean_over_the_generators_draws(diag, chunk_size, device):
    """x_i = μ + L z_i with z_i drawn from the generator chunk after chunk: the mean of (g_iᵀu)² and its
    standard error √(s²/n), s² the unbiased sample variance."""
    d, n = 4, 1000
    mu, L = mvn(d, seed=30, device=device)
    u = randn(G.mvn_num_params(d), seed=31, device=device)
    quad, se = G.mvn_sampled_fisher_quad(mu, L, u, n, diag, generator=gen(32), chunk_size=chunk_size)
    assert quad.shape == () and se.shape == ()
    g = gen(32)
    sizes = [n] if chunk_size is None else [300, 300, 300, 100]
    z = torch.cat([torch.randn(k, d, generator=g, dtype=f64) for k in sizes]).to(device)   # drawn as the study does
    q = score_dots(mu + z @ L.T, mu, L, u, diag) ** 2
    close(quad, q.mean(), tol=1e-9)
    close(se, q.std() / math.sqrt(n), tol=1e-9)
    close(G.mvn_empirical_fisher_quad(mu + z @ L.T, mu, L, u, diag, chunk_size=128), quad, tol=1e-9)


def test_sampled_fisher_quad_converges_to_the_exact_quadratic(device):
    mu, L = mvn(3, seed=33, device=device)
    u = randn(G.mvn_num_params(3), seed=34, device=device)
    quad, se = G.mvn_sampled_fisher_quad(mu, L, u, 200_000, generator=gen(35))
    exact = G.mvn_fisher_quad(mu, L, u)
    assert abs(quad - exact) < 5 * se
    assert se < 0.02 * exact


def test_public_api_is_the_closed_forms():   # CPU only: inspects the module, no tensors
    """Every public name is exported and documented; the internal helpers are private."""
    public = {n for n in vars(G) if not n.startswith("_") and callable(getattr(G, n))
              and getattr(getattr(G, n), "__module__", None) == G.__name__}
    assert public == set(G.__all__) - {"DIAGS", "PARAMS"}
    for name in public:
        doc = getattr(G, name).__doc__
        assert "Returns:" in doc, name
    for helper in ("check_mvn", "split_delta", "tri_solve", "whitened_quad_stats"):
        assert not hasattr(G, helper), helper


# ------------------------------------------------------------------------ seed 000's bugs fail


def test_seed_sum_then_outer_empirical_fisher_is_wrong(device):
    """(Σg)(Σg)ᵀ/n is rank one: its 'ratio' uᵀFu/uᵀF_bug u is 1/χ²₁-distributed over directions
    (and infinite orthogonally to Σg), while the per-sample mean of outer products gives ratios ≈ 1."""
    d, n = 10, 10_000
    mu, L = mvn(d, seed=21, device=device)
    x = mu + randn(n, d, seed=22, device=device) @ L.T
    g = G.mvn_score(x, mu, L)
    s = g.sum(0)
    F_bug = torch.outer(s, s) / n
    F_good = G.empirical_fisher(g)
    assert torch.linalg.matrix_rank(F_bug) == 1
    U = randn(200, g.shape[1], seed=23, device=device)
    true_q = G.mvn_fisher_quad(mu, L, U)
    good = true_q / torch.einsum("ki,ij,kj->k", U, F_good, U)
    bug = true_q / torch.einsum("ki,ij,kj->k", U, F_bug, U)
    assert (good - 1).abs().max() < 0.1
    assert bug.log().abs().median() > math.log(2)          # typical error beyond a factor 2
    assert (bug.log().abs() > math.log(10)).float().mean() > 0.1
    # a direction orthogonal to Σg: the true quadratic form is positive, the seed's "Fisher" gives 0
    u = U[0] - (U[0] @ s) / (s @ s) * s
    assert G.mvn_fisher_quad(mu, L, u) > 0.1 and (u @ F_bug @ u).abs() < 1e-12 * (U[0] @ F_bug @ U[0]).abs()
    # and the KL study along such a direction: KL is positive, the seed's ½ΔᵀF_bugΔ is 0
    r = 1e-3
    kl = G.mvn_kl(mu, L, *G.mvn_unpack(G.mvn_pack(mu, L) + r * u / u.norm(), d))
    assert kl > 0 and abs(0.5 * r**2 * (u @ F_bug @ u) / (u @ u)) < 1e-10 * kl


# --------------------------------------------------------------------------------- misc / errors


def test_float32(device):
    mu, L = mvn(6, seed=2, device=device)
    F32 = G.mvn_fisher(mu.float(), L.float())
    assert F32.dtype == torch.float32
    torch.testing.assert_close(F32.double(), G.mvn_fisher(mu, L), rtol=1e-5, atol=1e-5 * F32.abs().max().item())
    x = torch.randn(5, 6, generator=gen(1)).to(device)
    torch.testing.assert_close(G.mvn_score(x, mu.float(), L.float()).double(), G.mvn_score(x.double(), mu, L),
                               rtol=1e-4, atol=1e-4)


def test_errors_name_the_argument(device):
    mu, L = mvn(3, device=device)

    def zeros(*shape):
        return torch.zeros(*shape, dtype=f64, device=device)

    bad_upper = L.clone()
    bad_upper[0, 2] = 0.1
    bad_diag = L.clone()
    bad_diag[1, 1] = -0.2
    cases = [
        (lambda: G.univariate_fisher(0.0, 0.0), "sigma"),
        (lambda: G.univariate_fisher(0.0, -1.0), "sigma"),
        (lambda: G.univariate_kl(0.0, 1.0, 0.0, -1.0), "sigma1"),
        (lambda: G.univariate_score(zeros(3), 0.0, 1.0, param="var"), "param"),
        (lambda: G.mvn_fisher(mu, bad_upper), "L"),
        (lambda: G.mvn_fisher(mu, bad_diag), "L"),
        (lambda: G.mvn_fisher(mu[:2], L), "mu"),
        (lambda: G.mvn_fisher(mu, L[:2]), "L"),
        (lambda: G.mvn_fisher(mu, L, diag="exp"), "diag"),
        (lambda: G.mvn_kl(mu, L, mu, bad_diag), "L1"),
        (lambda: G.mvn_kl(mu, L, *mvn(4, device=device)), "L1"),
        (lambda: G.mvn_score(zeros(5, 4), mu, L), "x"),
        (lambda: G.mvn_fisher_quad(mu, L, zeros(8)), "delta"),
        (lambda: G.mvn_fisher_mv(mu, L, zeros(10)), "v"),
        (lambda: G.mvn_fisher(mu, torch.full_like(L, float("nan")).tril()), "L"),
        (lambda: G.empirical_fisher(torch.zeros(0, 3, device=device)), "scores"),
        (lambda: G.mvn_unpack(zeros(5), 3), "theta"),
        (lambda: G.mvn_empirical_fisher_quad(zeros(0, 3), mu, L, zeros(9)), "x"),
        (lambda: G.mvn_empirical_fisher_quad(zeros(5, 3), mu, L, zeros(2, 9)), "delta"),
        (lambda: G.mvn_sampled_fisher_quad(mu, L, zeros(9), 1), "n"),
        (lambda: G.mvn_sampled_fisher_quad(mu, L, zeros(9), 10, chunk_size=0), "chunk_size"),
        (lambda: G.mvn_sampled_fisher_quad(mu, L, zeros(2, 9), 10), "delta"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=rf"^fisherext\.\w+: argument '{name}' "):
            fn()
