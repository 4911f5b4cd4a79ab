"""fisherext.experiments.gaussian_kl: seed 000's study KL(p_θ‖p_{θ+Δ}) / (½ΔᵀFΔ) → 1 on the closed forms of
fisherext.gaussian (checked against autograd and torch.distributions in tests/test_gaussian.py), with the
exact Fisher and the per-sample empirical one; seed 000's missing ½ is reproduced to show it fails; the grid's
randomness comes from a generator.
"""
import math

import pytest
import torch

import fisherext.gaussian as G
from fisherext.experiments import gaussian_kl as S
from support.gaussian import close, f64, gen, mvn


# ---------------------------------------------------------------------- seed 000 study: the ratio

SMALL = 1e-4
RADII = (1e-4, 1e-3, 1e-2, 1e-1)
CASES = [(d, which) for d in (1, 10, 100) for which in S.WHICH]


def case_generator(d, which):
    return gen(1000 * d + S.WHICH.index(which))


@pytest.mark.parametrize("diag", G.DIAGS)
@pytest.mark.parametrize("d,which", CASES)
def test_ratio_true_fisher(d, which, diag, device):
    rows = S.kl_vs_fisher_study(d, which, "true", radii=RADII, generator=case_generator(d, which), diag=diag,
                                device=device)
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
def test_ratio_empirical_fisher(d, which, device):
    n = EMPIRICAL_N[d]
    rows = S.kl_vs_fisher_study(d, which, "empirical", n=n, radii=(SMALL, 1e-2), generator=case_generator(d, which),
                                device=device)
    first = rows[0]
    rel_se = first["quad_half_se"] / first["quad_half"]
    assert rel_se < 0.0035, rel_se
    assert abs(first["ratio"] - 1) < 0.01, (first["ratio"], rel_se)
    # same direction and samples at every radius: ½ΔᵀF̂Δ scales as radius²
    assert rows[1]["quad_half"] == pytest.approx(first["quad_half"] * (1e-2 / SMALL) ** 2, rel=1e-12)


def test_study_uses_whitened_samples_consistently(device):
    """The study's empirical quadratic equals mvn_empirical_fisher_quad on the same draws."""
    d, n = 4, 5000
    mu, L = mvn(d, seed=3, device=device)
    rows = S.kl_vs_fisher_study(d, "both", "empirical", n=n, radii=(1.0,), generator=gen(4), mu=mu, L=L)
    g = gen(4)
    u = torch.randn(G.mvn_num_params(d), generator=g, dtype=f64).to(device)   # drawn on the CPU, as the study does
    u /= u.norm()
    x = mu + torch.randn(n, d, generator=g, dtype=f64).to(device) @ L.T
    close(torch.tensor(2 * rows[0]["quad_half"], dtype=f64, device=device), G.mvn_empirical_fisher_quad(x, mu, L, u),
          tol=1e-9)


@pytest.mark.parametrize("d,which", CASES)
def test_seed_missing_half_gives_factor_two(d, which, device):
    """Comparing KL with ΔᵀFΔ instead of ½ΔᵀFΔ: ΔᵀFΔ / KL → 2, not 1."""
    row = S.kl_vs_fisher_study(d, which, "true", radii=(SMALL,), generator=case_generator(d, which),
                               device=device)[0]
    assert 2 * row["quad_half"] / row["kl"] == pytest.approx(2.0, rel=0.01)
    assert abs(2 * row["quad_half"] / row["kl"] - 1) > 0.9


# --------------------------------------------------------------------------------- rows / errors


def test_study_rows_and_table(device):
    rows = S.kl_vs_fisher_grid(ds=(1, 3), kinds=("true",), radii=(1e-3, 1e-2), device=device)
    assert len(rows) == 2 * 3 * 2
    assert set(rows[0]) == {"d", "which", "kind", "n", "radius", "kl", "quad_half", "ratio", "quad_half_se"}
    table = S.format_ratio_table(rows)
    assert table.count("\n") == 3 and "d=3 both true" in table


def test_study_invalid_cholesky_gives_nan(device):
    """A radius that pushes σ (the diagonal of L, raw) below 0 leaves the family: NaN, not an error."""
    mu, L = torch.zeros(1, dtype=f64, device=device), torch.full((1, 1), 0.5, dtype=f64, device=device)
    seen = set()
    for seed in range(10):
        row = S.kl_vs_fisher_study(1, "L", radii=(2.0,), generator=gen(seed), mu=mu, L=L, device=device)[0]
        sign = torch.randn(2, generator=gen(seed), dtype=f64)[1].sign().item()   # the study's direction
        assert math.isnan(row["kl"]) == (0.5 + 2.0 * sign < 0)
        seen.add(sign)
    assert seen == {-1.0, 1.0}
    # the log-diagonal parameterization is valid for every radius
    row = S.kl_vs_fisher_study(1, "L", radii=(2.0,), generator=gen(0), mu=mu, L=L, diag="log",
                               device=device)[0]
    assert math.isfinite(row["kl"]) and row["kl"] > 0


def test_study_errors_name_the_argument(device):
    def zeros(n):
        return torch.zeros(n, dtype=f64, device=device)

    def eye(n):
        return torch.eye(n, dtype=f64, device=device)

    cases = [
        (lambda: S.kl_vs_fisher_study(3, which="cov", device=device), "which"),
        (lambda: S.kl_vs_fisher_study(3, kind="mc", device=device), "kind"),
        (lambda: S.kl_vs_fisher_study(3, radii=(0.0,), device=device), "radii"),
        (lambda: S.kl_vs_fisher_study(3, kind="empirical", n=1, device=device), "n"),
        (lambda: S.kl_vs_fisher_study(3, mu=zeros(2), L=eye(2)), "L"),
        (lambda: S.kl_vs_fisher_study(2, mu=zeros(2), L=-eye(2)), "L"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=rf"^fisherext\.kl_vs_fisher_study: argument '{name}' "):
            fn()


# ------------------------------------------------------------------------------ the grid's randomness


def test_grid_is_reproducible_from_a_generator(device):
    kw = dict(ds=(1, 3), n=2000, radii=(1e-3, 1e-1), device=device)
    first = S.kl_vs_fisher_grid(generator=gen(7), **kw)
    assert len(first) == 2 * 3 * 2 * 2
    assert S.kl_vs_fisher_grid(generator=gen(7), **kw) == first
    other = S.kl_vs_fisher_grid(generator=gen(8), **kw)
    assert all(a["kl"] != b["kl"] for a, b in zip(first, other)), "another seed gave the same case"
    g = gen(7)
    assert S.kl_vs_fisher_grid(generator=g, **kw) == first
    assert S.kl_vs_fisher_grid(generator=g, **kw) != first, "a generator is consumed as any source of randomness"


def test_grid_cases_share_the_normal_and_direction_across_kinds_and_runs(device):
    """Both kinds of a (d, which) case see the same (μ, L) and u: the KL at each radius is the same, and
    the same draws from the base seed give each case the same numbers whichever other cases run."""
    rows = S.kl_vs_fisher_grid(ds=(1, 3), n=2000, radii=(1e-3, 1e-1), generator=gen(9), device=device)
    by_case = {}
    for r in rows:
        by_case.setdefault((r["d"], r["which"], r["radius"]), {})[r["kind"]] = r
    for case, kinds in by_case.items():
        assert kinds["true"]["kl"] == kinds["empirical"]["kl"], case
        assert kinds["true"]["quad_half"] != kinds["empirical"]["quad_half"], case
    alone = S.kl_vs_fisher_grid(ds=(3,), n=2000, radii=(1e-3, 1e-1), generator=gen(9), device=device)
    assert alone == [r for r in rows if r["d"] == 3]


def test_grid_seed_is_now_generator():   # CPU only: the renamed keyword is refused before any tensor exists
    with pytest.raises(TypeError, match=r"fisherext\.kl_vs_fisher_grid: argument 'seed' is now called 'generator'"):
        S.kl_vs_fisher_grid(ds=(1,), kinds=("true",), seed=0)
