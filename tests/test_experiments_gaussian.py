"""fisherext.experiments.gaussian: the suite's Gaussian experiment (seed 000) in its quick configuration, and
its reproduction of seed 000's sum-then-outer Fisher against the seed's own recipe written out by hand
(torch.distributions, autograd of the summed log-likelihood, an explicit P×P outer product)."""

import matplotlib
import pytest
import torch
from torch.distributions import MultivariateNormal

import fisherext.gaussian as G
from fisherext.experiments import gaussian as E
from fisherext.experiments.registry import Config, Result
from support.experiments import check_result

matplotlib.use("Agg")
f64 = torch.float64
CASE_KEYS = {"d", "which", "P", "ratio_true", "ratio_empirical", "ratio_true_smallest", "ratio_empirical_smallest",
             "empirical_rel_se", "seed_missing_half_prediction_over_kl", "slope", "seed",
             "per_sample_over_exact_quantiles", "seed_over_exact_quantiles", "seed_prediction_over_kl_quantiles"}


@pytest.fixture(scope="module")
def result():
    return E.EXPERIMENT.run(Config(quick=True))


def test_result_has_the_documented_data(result):
    assert isinstance(result, Result) and result.id == E.EXPERIMENT.id == "gaussian"
    d = result.data
    assert {"dimensions", "which", "radii", "n_empirical", "seed_samples", "directions", "cases", "rows",
            "orthogonal"} <= d.keys()
    assert len(d["cases"]) == 9 and {(c["d"], c["which"]) for c in d["cases"]} == {
        (dim, w) for dim in (1, 10, 100) for w in ("mean", "L", "both")}
    for c in d["cases"]:
        assert CASE_KEYS <= c.keys()
        assert c["P"] == G.mvn_num_params(c["d"])
        assert len(c["ratio_true"]) == len(d["radii"]) == len(c["ratio_empirical"])
        assert len(c["seed"]["seed_over_exact"]) == d["directions"]
        # what the experiment shows, read off its own data: exact ratio → 1, the seed's ΔᵀFΔ / KL → 2
        assert abs(c["ratio_true_smallest"] - 1) < 1e-3
        assert abs(c["seed_missing_half_prediction_over_kl"] - 2) < 2e-3
    assert len(d["rows"]) == 9 * 2 * len(d["radii"])
    assert {o["d"] for o in d["orthogonal"]} == {1, 10, 100}


def test_outcomes_tables_and_figures(result):
    check_result(result, outcomes=8, figures=['gaussian_ratio', 'gaussian_seed_fisher'])


def test_a_case_is_the_same_when_run_again(result):
    """Deterministic for a seed: one case recomputed from the same config equals the run's numbers."""
    config = Config(quick=True)
    index = 1 * 3 + 2   # d = 10, "both"
    mu, L, rows = E._study_case(config, 10, 2, "both", result.data["radii"], result.data["n_empirical"])
    assert [r["ratio"] for r in rows["empirical"]] == result.data["cases"][index]["ratio_empirical"]
    seed, _ = E._seed_case(config, 10, 2, "both", mu, L, result.data["directions"], result.data["radii"][0])
    assert seed == result.data["cases"][index]["seed"]


def hand_seed_quad(x, mu, L, delta):
    """Seed 000's recipe: log_prob(samples).sum().backward() on (μ, L), the gradient in θ order (μ, tril L
    row-major), its outer product / n, then ΔᵀF̃Δ with the explicit matrix."""
    mu = mu.clone().requires_grad_(True)
    L = L.clone().requires_grad_(True)
    MultivariateNormal(loc=mu, scale_tril=L).log_prob(x).sum().backward()
    rows, cols = torch.tril_indices(L.shape[0], L.shape[0])
    g = torch.cat([mu.grad, L.grad[rows, cols]])
    F_seed = torch.outer(g, g) / x.shape[0]
    return delta @ F_seed @ delta


@pytest.mark.parametrize("d", [1, 4])
def test_seed_sum_then_outer_quad_is_the_seeds_recipe(d):
    mu, L = G.random_mvn(d, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    x = mu + torch.randn(50, d, generator=gen, dtype=f64) @ L.T
    deltas = torch.randn(3, G.mvn_num_params(d), generator=gen, dtype=f64)
    got = E.seed_sum_then_outer_quad(x, mu, L, deltas)
    want = torch.stack([hand_seed_quad(x, mu, L, delta) for delta in deltas])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    # one step as a vector gives a 0-d result
    torch.testing.assert_close(E.seed_sum_then_outer_quad(x, mu, L, deltas[0]), want[0], rtol=1e-10, atol=0)


def test_seed_sum_then_outer_differs_from_the_per_sample_fisher_except_for_one_sample():
    mu, L = G.random_mvn(3, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    x = mu + torch.randn(200, 3, generator=gen, dtype=f64) @ L.T
    delta = torch.randn(G.mvn_num_params(3), generator=gen, dtype=f64)
    # for one sample the sum is that sample's score: the two agree
    torch.testing.assert_close(E.seed_sum_then_outer_quad(x[:1], mu, L, delta),
                               G.mvn_empirical_fisher_quad(x[:1], mu, L, delta), rtol=1e-10, atol=0)
    seed = E.seed_sum_then_outer_quad(x, mu, L, delta).item()
    per_sample = G.mvn_empirical_fisher_quad(x, mu, L, delta).item()
    assert abs(seed / per_sample - 1) > 0.05
    # rank one: zero along a direction orthogonal to the summed score (explicit gradient by hand)
    theta = G.mvn_pack(mu, L).requires_grad_(True)
    summed = torch.autograd.grad(G.mvn_log_prob(x, *G.mvn_unpack(theta, 3)).sum(), theta)[0]
    u = delta - (delta @ summed) / (summed @ summed) * summed
    assert E.seed_sum_then_outer_quad(x, mu, L, u).item() < 1e-24 * G.mvn_fisher_quad(mu, L, u).item()


def test_seed_kl_prediction_is_twice_the_kl_for_small_steps():
    mu, L = G.random_mvn(5, generator=torch.Generator().manual_seed(7))
    delta = 1e-5 * torch.randn(G.mvn_num_params(5), generator=torch.Generator().manual_seed(8), dtype=f64)
    kl = G.mvn_kl(mu, L, *G.mvn_unpack(G.mvn_pack(mu, L) + delta, 5)).item()
    quad = G.mvn_fisher_quad(mu, L, delta).item()
    assert E.seed_kl_prediction(quad) == quad
    assert E.seed_kl_prediction(quad) / kl == pytest.approx(2, rel=1e-4)


def test_bad_steps_name_the_argument():
    mu, L = G.random_mvn(2, generator=torch.Generator().manual_seed(9))
    x = torch.zeros(4, 2, dtype=f64)
    with pytest.raises(ValueError, match="argument 'deltas'"):
        E.seed_sum_then_outer_quad(x, mu, L, torch.zeros(4, dtype=f64))
    with pytest.raises(ValueError, match="argument 'deltas'"):
        E.seed_sum_then_outer_quad(x, mu, L, torch.zeros(1, 2, G.mvn_num_params(2), dtype=f64))
    with pytest.raises(TypeError, match="argument 'deltas'"):
        E.seed_sum_then_outer_quad(x, mu, L, [0.0] * G.mvn_num_params(2))
