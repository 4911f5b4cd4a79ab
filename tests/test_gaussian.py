"""fisherext.gaussian: closed-form Fisher/KL/score of normals against autograd, torch.distributions and
Monte Carlo, and seed 000's study KL(p_θ‖p_{θ+Δ}) / (½ΔᵀFΔ) → 1.

Independent oracles:
- scores: autograd of torch.distributions log_prob (not of this module's log-density);
- Fisher: the Hessian of θ ↦ KL(p_θ0 ‖ p_θ) at θ = θ0 equals F(θ0) (= E[ggᵀ] = −E[∇² log p]) exactly;
  the KL there is torch.distributions.kl_divergence, differentiated twice by autograd. Also the Kronecker
  form ½ Jᵀ(Σ⁻¹⊗Σ⁻¹)J with J = ∂vec(LLᵀ)/∂tril(L) by autograd, and a large-n Monte-Carlo E[ggᵀ];
- KL: torch.distributions.kl_divergence (tight) and a Monte-Carlo mean of log p0 − log p1 (loose).

Seed 000's two bugs are reproduced to show they fail: the "empirical Fisher" (Σg)(Σg)ᵀ/n
(sum-then-outer) and the comparison of KL with ΔᵀFΔ (no ½).
"""
import math

import pytest
import torch
from torch.autograd.functional import hessian, jacobian
from torch.distributions import MultivariateNormal, Normal, kl_divergence

import fisherext.gaussian as G
from fisherext.experiments import gaussian_kl as S

f64 = torch.float64
TOL = 1e-10


def close(actual, expected, tol=TOL):
    """Equal to relative precision ``tol`` of the largest entry of ``expected``."""
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def mvn(d, seed=0):
    return G.random_mvn(d, generator=gen(seed))


def torch_mvn(mu, L):
    return MultivariateNormal(mu, scale_tril=L, validate_args=False)


def kl_hessian(kl_of_theta, theta0):
    """∇²_θ KL(p_θ0 ‖ p_θ) at θ = θ0 — the Fisher information at θ0."""
    return hessian(kl_of_theta, theta0.clone())


# ------------------------------------------------------------------------------------ univariate


@pytest.mark.parametrize("param", G.PARAMS)
def test_univariate_score_matches_autograd(param):
    mu, sigma = torch.tensor(0.7, dtype=f64), torch.tensor(1.3, dtype=f64)
    x = torch.randn(50, generator=gen(1), dtype=f64) * 2
    theta = G.univariate_pack(mu, sigma, param).requires_grad_(True)
    m, s = G.univariate_unpack(theta, param)
    lp = Normal(m, s).log_prob(x)
    auto = torch.stack([torch.autograd.grad(lp[i], theta, retain_graph=True)[0] for i in range(len(x))])
    close(G.univariate_score(x, mu, sigma, param), auto)
    close(G.univariate_log_prob(x, mu, sigma), Normal(mu, sigma).log_prob(x))


@pytest.mark.parametrize("param", G.PARAMS)
def test_univariate_fisher_is_kl_hessian(param):
    mu, sigma = torch.tensor(-0.4, dtype=f64), torch.tensor(0.8, dtype=f64)
    theta0 = G.univariate_pack(mu, sigma, param)

    def kl(theta):
        return kl_divergence(Normal(mu, sigma), Normal(*G.univariate_unpack(theta, param)))

    F = G.univariate_fisher(mu, sigma, param)
    close(F, kl_hessian(kl, theta0))
    expected = torch.diag(torch.tensor([1 / 0.64, 2 / 0.64 if param == "sigma" else 2.0], dtype=f64))
    close(F, expected)


def test_univariate_kl_matches_torch_and_monte_carlo():
    for m0, s0, m1, s1 in [(0.0, 1.0, 0.5, 2.0), (1.2, 0.3, 1.1, 0.35), (-2.0, 3.0, 1.0, 0.5)]:
        args = [torch.tensor(v, dtype=f64) for v in (m0, s0, m1, s1)]
        kl = G.univariate_kl(*args)
        close(kl, kl_divergence(Normal(args[0], args[1]), Normal(args[2], args[3])))
        x = args[0] + args[1] * torch.randn(200_000, generator=gen(2), dtype=f64)
        d = Normal(args[0], args[1]).log_prob(x) - Normal(args[2], args[3]).log_prob(x)
        assert abs(d.mean() - kl) < 5 * d.std() / math.sqrt(len(x))
    # nearby distributions: no cancellation (torch's form loses all digits at 1e-9)
    kl = G.univariate_kl(1.0, 2.0, 1.0, 2.0 * (1 + 1e-9))
    assert kl.item() == pytest.approx(1e-18, rel=1e-6)   # ½·F_σσ·Δσ² = ½·(2/4)·(2e-9)² = 1e-18


# ---------------------------------------------------------------------------------- multivariate


@pytest.mark.parametrize("diag", G.DIAGS)
def test_pack_unpack_round_trip(diag):
    mu, L = mvn(5)
    theta = G.mvn_pack(mu, L, diag)
    assert theta.shape == (G.mvn_num_params(5),) == (20,)
    rows, cols = torch.tril_indices(5, 5)
    raw = L[rows, cols]
    expected = torch.where(rows == cols, raw.log(), raw) if diag == "log" else raw
    close(theta, torch.cat([mu, expected]))
    mu2, L2 = G.mvn_unpack(theta, 5, diag)
    close(mu2, mu)
    close(L2, L)


@pytest.mark.parametrize("diag", G.DIAGS)
@pytest.mark.parametrize("d", [1, 4])
def test_mvn_score_matches_autograd(d, diag):
    mu, L = mvn(d, seed=d)
    x = torch.randn(7, d, generator=gen(3), dtype=f64) * 1.5
    theta = G.mvn_pack(mu, L, diag).requires_grad_(True)
    lp = torch_mvn(*G.mvn_unpack(theta, d, diag)).log_prob(x)
    auto = torch.stack([torch.autograd.grad(lp[i], theta, retain_graph=True)[0] for i in range(len(x))])
    close(G.mvn_score(x, mu, L, diag), auto)
    close(G.mvn_log_prob(x, mu, L), torch_mvn(mu, L).log_prob(x))
    delta = torch.randn(theta.numel(), generator=gen(4), dtype=f64)
    close(G.mvn_score_dot(x, mu, L, delta, diag), auto @ delta)


@pytest.mark.parametrize("diag", G.DIAGS)
@pytest.mark.parametrize("d", [1, 3, 6])
def test_mvn_fisher_is_kl_hessian(d, diag):
    mu, L = mvn(d, seed=10 + d)
    p0 = torch_mvn(mu, L)

    def kl(theta):
        return kl_divergence(p0, torch_mvn(*G.mvn_unpack(theta, d, diag)))

    F = G.mvn_fisher(mu, L, diag)
    close(F, kl_hessian(kl, G.mvn_pack(mu, L, diag)))
    # this module's KL has the same Hessian
    close(F, kl_hessian(lambda t: G.mvn_kl(mu, L, *G.mvn_unpack(t, d, diag)), G.mvn_pack(mu, L, diag)))


def test_mvn_fisher_matches_kronecker_form():
    """F_LL = ½ Jᵀ(Σ⁻¹⊗Σ⁻¹)J, J = ∂vec(LLᵀ)/∂tril(L); μ block Σ⁻¹; cross blocks 0."""
    d = 5
    mu, L = mvn(d, seed=7)
    rows, cols = torch.tril_indices(d, d)

    def vec_sigma(ell):
        Lm = torch.zeros(d, d, dtype=f64).index_put((rows, cols), ell)
        return (Lm @ Lm.T).reshape(-1)

    J = jacobian(vec_sigma, L[rows, cols])
    Sinv = torch.cholesky_inverse(L)
    F = G.mvn_fisher(mu, L)
    close(F[d:, d:], 0.5 * J.T @ torch.kron(Sinv, Sinv) @ J)
    close(F[:d, :d], Sinv)
    assert F[:d, d:].abs().max() == 0 and F[d:, :d].abs().max() == 0


def test_mvn_d1_is_univariate():
    mu, L = torch.tensor([0.3], dtype=f64), torch.tensor([[1.7]], dtype=f64)
    for diag, param in zip(G.DIAGS, G.PARAMS):
        close(G.mvn_fisher(mu, L, diag), G.univariate_fisher(mu[0], L[0, 0], param))
    uni = [torch.tensor(v, dtype=f64) for v in (0.3, 1.7, 0.5, 1.87)]
    close(G.mvn_kl(mu, L, mu + 0.2, L * 1.1), G.univariate_kl(*uni))


@pytest.mark.parametrize("diag", G.DIAGS)
def test_fisher_quad_and_mv_match_dense_d10(diag):
    mu, L = mvn(10, seed=5)
    F = G.mvn_fisher(mu, L, diag)
    V = torch.randn(4, F.shape[0], generator=gen(6), dtype=f64)
    close(G.mvn_fisher_quad(mu, L, V, diag), torch.einsum("ki,ij,kj->k", V, F, V))
    close(G.mvn_fisher_quad(mu, L, V[0], diag), V[0] @ F @ V[0])
    close(G.mvn_fisher_mv(mu, L, V, diag), V @ F)
    assert torch.equal(F, F.T)
    assert torch.linalg.eigvalsh(F).min() > 0


def test_fisher_quad_matches_dense_d100():
    mu, L = mvn(100, seed=8)
    F = G.mvn_fisher(mu, L)
    assert F.shape == (5150, 5150)
    v = torch.randn(5150, generator=gen(9), dtype=f64)
    close(G.mvn_fisher_quad(mu, L, v), v @ (F @ v))
    close(G.mvn_fisher_mv(mu, L, v), F @ v)


@pytest.mark.parametrize("d", [1, 5, 20])
def test_mvn_kl_matches_torch(d):
    mu0, L0 = mvn(d, seed=20 + d)
    mu1, L1 = mvn(d, seed=40 + d)
    close(G.mvn_kl(mu0, L0, mu1, L1), kl_divergence(torch_mvn(mu0, L0), torch_mvn(mu1, L1)))
    assert G.mvn_kl(mu0, L0, mu0, L0).item() == 0.0


def test_mvn_kl_matches_monte_carlo():
    mu0, L0 = mvn(4, seed=1)
    mu1, L1 = mvn(4, seed=2)
    x = mu0 + torch.randn(200_000, 4, generator=gen(3), dtype=f64) @ L0.T
    d = G.mvn_log_prob(x, mu0, L0) - G.mvn_log_prob(x, mu1, L1)
    assert abs(d.mean() - G.mvn_kl(mu0, L0, mu1, L1)) < 5 * d.std() / math.sqrt(len(x))


# ----------------------------------------------------------------------------------- empirical


def test_empirical_fisher_converges_to_true_fisher():
    """Per-sample mean of outer products vs exact F, entry-wise within 5 standard errors (n = 200000)."""
    d, n = 3, 200_000
    mu, L = mvn(d, seed=11)
    x = mu + torch.randn(n, d, generator=gen(12), dtype=f64) @ L.T
    g = G.mvn_score(x, mu, L)                                            # [n, 9]
    Fhat = G.empirical_fisher(g)
    se = (g[:, :, None] * g[:, None, :]).std(0) / math.sqrt(n)
    F = G.mvn_fisher(mu, L)
    assert ((Fhat - F).abs() <= 5 * se).all()
    close(G.empirical_fisher(g.split(30_000)), Fhat)                    # streamed chunks
    v = torch.randn(g.shape[1], generator=gen(13), dtype=f64)
    close(G.empirical_fisher_quad(g, v), v @ Fhat @ v)
    close(G.mvn_empirical_fisher_quad(x, mu, L, v, chunk_size=70_000), v @ Fhat @ v)


# ---------------------------------------------------------------------- seed 000 study: the ratio

SMALL = 1e-4
RADII = (1e-4, 1e-3, 1e-2, 1e-1)
CASES = [(d, which) for d in (1, 10, 100) for which in S.WHICH]


def case_generator(d, which):
    return gen(1000 * d + S.WHICH.index(which))


@pytest.mark.parametrize("diag", G.DIAGS)
@pytest.mark.parametrize("d,which", CASES)
def test_ratio_true_fisher(d, which, diag):
    rows = S.kl_vs_fisher_study(d, which, "true", radii=RADII, generator=case_generator(d, which), diag=diag)
    ratios = [r["ratio"] for r in rows]
    assert abs(ratios[0] - 1) < 0.01, ratios
    # the deviation is O(radius): it shrinks (or stays at rounding level) as the radius goes down
    dev = [abs(q - 1) for q in ratios]
    assert all(dev[i] <= 1.5 * dev[i + 1] + 1e-9 for i in range(len(dev) - 1)), ratios
    for r in rows:
        assert r["quad_half"] == pytest.approx(r["radius"] ** 2 * rows[0]["quad_half"] / SMALL ** 2, rel=1e-12)


# n per d so that the relative standard error (SE) of uᵀF̂u is about 0.25-0.32%, making the 1% tolerance
# 3-4 SE (the small-radius ratio is uᵀFu / uᵀF̂u: pure Monte-Carlo error, no O(radius) term left):
# - d = 1: gᵀu mixes u_μ·z/σ and u_σ·(z²−1)/σ; in the σ direction (gᵀu)² has relative variance
#   (E(z²−1)⁴ − 4)/4 = 14, so n = 14/0.0025² ≈ 2.4e6 (cheap at d = 1);
# - d = 10: the L part of gᵀu is a quadratic form in few variables, heavier-tailed than Gaussian: n = 1e6;
# - d = 100: gᵀu is nearly Gaussian, relative variance of (gᵀu)² ≈ 2, n = 2e5 gives SE ≈ √(2/n) = 0.32%
#   (the cost is n·d² and drawing n·d normals; 2e5 keeps the file near 20 s on 2 cores).
# Each study reports its own SE, which is checked as well.
EMPIRICAL_N = {1: 2_400_000, 10: 1_000_000, 100: 200_000}


@pytest.mark.slow
@pytest.mark.parametrize("d,which", CASES)
def test_ratio_empirical_fisher(d, which):
    n = EMPIRICAL_N[d]
    rows = S.kl_vs_fisher_study(d, which, "empirical", n=n, radii=(SMALL, 1e-2), generator=case_generator(d, which))
    first = rows[0]
    rel_se = first["quad_half_se"] / first["quad_half"]
    assert rel_se < 0.0035, rel_se
    assert abs(first["ratio"] - 1) < 0.01, (first["ratio"], rel_se)
    # same direction and samples at every radius: ½ΔᵀF̂Δ scales as radius²
    assert rows[1]["quad_half"] == pytest.approx(first["quad_half"] * (1e-2 / SMALL) ** 2, rel=1e-12)


def test_study_uses_whitened_samples_consistently():
    """The study's empirical quadratic equals mvn_empirical_fisher_quad on the same draws."""
    d, n = 4, 5000
    mu, L = mvn(d, seed=3)
    rows = S.kl_vs_fisher_study(d, "both", "empirical", n=n, radii=(1.0,), generator=gen(4), mu=mu, L=L)
    g = gen(4)
    u = torch.randn(G.mvn_num_params(d), generator=g, dtype=f64)
    u /= u.norm()
    x = mu + torch.randn(n, d, generator=g, dtype=f64) @ L.T
    close(torch.tensor(2 * rows[0]["quad_half"], dtype=f64), G.mvn_empirical_fisher_quad(x, mu, L, u), tol=1e-9)


# ------------------------------------------------------------------------ seed 000's bugs fail


def test_seed_sum_then_outer_empirical_fisher_is_wrong():
    """(Σg)(Σg)ᵀ/n is rank one: its 'ratio' uᵀFu/uᵀF_bug u is 1/χ²₁-distributed over directions
    (and infinite orthogonally to Σg), while the per-sample mean of outer products gives ratios ≈ 1."""
    d, n = 10, 10_000
    mu, L = mvn(d, seed=21)
    x = mu + torch.randn(n, d, generator=gen(22), dtype=f64) @ L.T
    g = G.mvn_score(x, mu, L)
    s = g.sum(0)
    F_bug = torch.outer(s, s) / n
    F_good = G.empirical_fisher(g)
    assert torch.linalg.matrix_rank(F_bug) == 1
    U = torch.randn(200, g.shape[1], generator=gen(23), dtype=f64)
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


@pytest.mark.parametrize("d,which", CASES)
def test_seed_missing_half_gives_factor_two(d, which):
    """Comparing KL with ΔᵀFΔ instead of ½ΔᵀFΔ: ΔᵀFΔ / KL → 2, not 1."""
    row = S.kl_vs_fisher_study(d, which, "true", radii=(SMALL,), generator=case_generator(d, which))[0]
    assert 2 * row["quad_half"] / row["kl"] == pytest.approx(2.0, rel=0.01)
    assert abs(2 * row["quad_half"] / row["kl"] - 1) > 0.9


# --------------------------------------------------------------------------------- misc / errors


def test_study_rows_and_table():
    rows = S.kl_vs_fisher_grid(ds=(1, 3), kinds=("true",), radii=(1e-3, 1e-2))
    assert len(rows) == 2 * 3 * 2
    assert set(rows[0]) == {"d", "which", "kind", "n", "radius", "kl", "quad_half", "ratio", "quad_half_se"}
    table = S.format_ratio_table(rows)
    assert table.count("\n") == 3 and "d=3 both true" in table


def test_study_invalid_cholesky_gives_nan():
    """A radius that pushes σ (the diagonal of L, raw) below 0 leaves the family: NaN, not an error."""
    mu, L = torch.zeros(1, dtype=f64), torch.full((1, 1), 0.5, dtype=f64)
    seen = set()
    for seed in range(10):
        row = S.kl_vs_fisher_study(1, "L", radii=(2.0,), generator=gen(seed), mu=mu, L=L)[0]
        sign = torch.randn(2, generator=gen(seed), dtype=f64)[1].sign().item()   # the study's direction
        assert math.isnan(row["kl"]) == (0.5 + 2.0 * sign < 0)
        seen.add(sign)
    assert seen == {-1.0, 1.0}
    # the log-diagonal parameterization is valid for every radius
    row = S.kl_vs_fisher_study(1, "L", radii=(2.0,), generator=gen(0), mu=mu, L=L, diag="log")[0]
    assert math.isfinite(row["kl"]) and row["kl"] > 0


def test_float32():
    mu, L = mvn(6, seed=2)
    F32 = G.mvn_fisher(mu.float(), L.float())
    assert F32.dtype == torch.float32
    torch.testing.assert_close(F32.double(), G.mvn_fisher(mu, L), rtol=1e-5, atol=1e-5 * F32.abs().max().item())
    x = torch.randn(5, 6, generator=gen(1))
    torch.testing.assert_close(G.mvn_score(x, mu.float(), L.float()).double(), G.mvn_score(x.double(), mu, L),
                               rtol=1e-4, atol=1e-4)


def test_errors_name_the_argument():
    mu, L = mvn(3)
    bad_upper = L.clone()
    bad_upper[0, 2] = 0.1
    bad_diag = L.clone()
    bad_diag[1, 1] = -0.2
    cases = [
        (lambda: G.univariate_fisher(0.0, 0.0), "sigma"),
        (lambda: G.univariate_fisher(0.0, -1.0), "sigma"),
        (lambda: G.univariate_kl(0.0, 1.0, 0.0, -1.0), "sigma1"),
        (lambda: G.univariate_score(torch.zeros(3, dtype=f64), 0.0, 1.0, param="var"), "param"),
        (lambda: G.mvn_fisher(mu, bad_upper), "L"),
        (lambda: G.mvn_fisher(mu, bad_diag), "L"),
        (lambda: G.mvn_fisher(mu[:2], L), "mu"),
        (lambda: G.mvn_fisher(mu, L[:2]), "L"),
        (lambda: G.mvn_fisher(mu, L, diag="exp"), "diag"),
        (lambda: G.mvn_kl(mu, L, mu, bad_diag), "L1"),
        (lambda: G.mvn_kl(mu, L, *mvn(4)), "L1"),
        (lambda: G.mvn_score(torch.zeros(5, 4, dtype=f64), mu, L), "x"),
        (lambda: G.mvn_fisher_quad(mu, L, torch.zeros(8, dtype=f64)), "delta"),
        (lambda: G.mvn_fisher_mv(mu, L, torch.zeros(10, dtype=f64)), "v"),
        (lambda: G.mvn_fisher(mu, torch.full_like(L, float("nan")).tril()), "L"),
        (lambda: S.kl_vs_fisher_study(3, which="cov"), "which"),
        (lambda: S.kl_vs_fisher_study(3, kind="mc"), "kind"),
        (lambda: S.kl_vs_fisher_study(3, radii=(0.0,)), "radii"),
        (lambda: S.kl_vs_fisher_study(3, kind="empirical", n=1), "n"),
        (lambda: G.empirical_fisher(torch.zeros(0, 3)), "scores"),
        (lambda: G.mvn_unpack(torch.zeros(5, dtype=f64), 3), "theta"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=rf"^fisherext\.\w+: argument '{name}' "):
            fn()
