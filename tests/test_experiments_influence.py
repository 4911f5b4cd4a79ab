"""fisherext.experiments.influence: the quick run's documented results (keys, outcomes, tables, figures drawn on
an Agg canvas, determinism for a seed), and its helpers against independent computations: seed 002's in-place
finite-difference product against a copy moved by hand and against its own rounding sequence, the training-gradient
dot products against a per-sample loop, leave-one-out retraining against a fit from scratch."""
import copy
import json
import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherext
from fisherext.experiments import influence as I
from fisherext.experiments.registry import Config, Result
from support.experiments import check_result

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def result(one_thread):
    return I.EXPERIMENT.run(Config(quick=True))


DATA_KEYS = {"n_train", "n_test_points", "P", "damping", "lambda_max", "lissa_scale", "lissa_depth", "fd_eps", "seed_r",
             "test_accuracy", "methods", "loo", "drift"}
METHOD_KEYS = {"label", "dtype", "rel_error_vs_exact", "pearson", "spearman", "slope", "cg_iterations", "seconds"}
DRIFT_KEYS = {"checkpoints", "inplace_norm", "inplace_max_abs", "restored_norm", "restored_bitwise", "cg_inplace_norm",
              "cg_restored_norm", "repeat_inplace_rel_diff", "repeat_restored_bitwise", "influence_rel_change",
              "drift_over_loo_change", "theta_norm"}


def test_quick_run_has_the_documented_data(result):
    assert isinstance(result, Result) and result.id == "influence" == I.EXPERIMENT.id
    d = result.data
    assert set(d) == DATA_KEYS
    assert list(d["methods"]) == list(I.METHODS)
    for v in d["methods"].values():
        assert set(v) == METHOD_KEYS
        assert all(math.isfinite(v[k]) for k in ("rel_error_vs_exact", "pearson", "spearman", "slope"))
    assert d["methods"]["exact"]["rel_error_vs_exact"] == 0.0
    n = I.QUICK["n_top"] + I.QUICK["n_random"]
    loo = d["loo"]
    assert len(set(loo["indices"])) == n and len(loo["actual"]) == n
    assert all(0 <= i < d["n_train"] for i in loo["indices"])
    assert set(loo["predicted"]) == set(I.METHODS) and all(len(p) == n for p in loo["predicted"].values())
    assert set(d["drift"]) == DRIFT_KEYS
    dr = d["drift"]
    assert dr["checkpoints"][-1] == I.QUICK["drift_hvps"]
    assert len(dr["inplace_norm"]) == len(dr["inplace_max_abs"]) == len(dr["checkpoints"])
    json.dumps(result.to_json())  # plain JSON, no tensors


def test_quick_run_measures_what_it_claims(result):
    d = result.data
    # the library's products restore θ; the seed's recipe moves it (already after a few float32 products)
    assert d["drift"]["restored_bitwise"] and d["drift"]["restored_norm"] == 0.0 and d["drift"]["cg_restored_norm"] == 0.0
    assert d["drift"]["repeat_restored_bitwise"]
    assert d["drift"]["inplace_norm"][-1] > 0 and d["drift"]["cg_inplace_norm"] > 0
    assert d["methods"]["cg"]["rel_error_vs_exact"] < 1e-6
    assert d["methods"]["exact"]["pearson"] > 0.95


def test_outcomes_tables_and_figures(result):
    check_result(result, outcomes=10, figures=['influence_scatter', 'influence_drift'])


def test_the_run_is_deterministic_for_a_seed(result, one_thread):
    again = I.EXPERIMENT.run(Config(quick=True))
    a, b = result.data, again.data
    assert a["loo"] == b["loo"]
    assert a["drift"] == b["drift"]
    assert [o.value for o in result.outcomes] == [o.value for o in again.outcomes]


# ---- the helpers ------------------------------------------------------------------------------------


def tiny(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    x = torch.randn(12, 4, dtype=dtype)
    y = torch.arange(12) % 3
    return model, x, y


def flat_grad(model, x, y):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))])


def moved_copy(model, v, step):
    """A deep copy of the model with θ + step·v written in (from the original's θ, not in place)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip(other.parameters(), fisherext.unflatten(v, list(other.parameters()))):
            p.copy_(p + step * d)
    return other


def test_seed_inplace_fd_hvp_is_the_central_difference():
    model, x, y = tiny()
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    eps = 1e-4
    expected = (flat_grad(moved_copy(model, v, eps), x, y) - flat_grad(moved_copy(model, v, -eps), x, y)) / (2 * eps)
    got = I.seed_inplace_fd_hvp(model, F.cross_entropy, x, y, v, eps=eps)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
    # and it is a Hessian-vector product: against double backprop, error O(eps^2)
    params = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    Hv = torch.cat([h.reshape(-1) for h in torch.autograd.grad(
        torch.cat([t.reshape(-1) for t in g]) @ v, params)])
    assert ((got - Hv).abs().max() / Hv.abs().max()).item() < 1e-5  # (eps |v|)^2 ~ 4e-7


def test_seed_inplace_fd_hvp_drifts_as_its_three_roundings_say():
    """The weights after one product are ((θ + εv) − 2εv) + εv rounded step by step, not θ."""
    model, x, y = tiny(torch.float32)
    P = sum(p.numel() for p in model.parameters())
    v = 50 * torch.randn(P, generator=torch.Generator().manual_seed(2))
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    eps = 1e-2
    expected = torch.add(torch.add(torch.add(theta0, v, alpha=eps), v, alpha=-2 * eps), v, alpha=eps)
    I.seed_inplace_fd_hvp(model, F.cross_entropy, x, y, v, eps=eps)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(after, expected)
    assert not torch.equal(after, theta0)
    # fisherext's product from a saved copy leaves θ bit for bit
    model2, _, _ = tiny(torch.float32)
    fisherext.hvp(model2, "cross_entropy", (x, y), v, method="fd", eps=eps)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model2.parameters()]), theta0)


def test_seed_inplace_fd_hvp_bad_arguments():
    model, x, y = tiny()
    with pytest.raises(ValueError, match="argument 'v'"):
        I.seed_inplace_fd_hvp(model, F.cross_entropy, x, y, torch.zeros(3, dtype=torch.float64))
    P = sum(p.numel() for p in model.parameters())
    for eps in (0.0, -1e-2, math.inf):
        with pytest.raises(ValueError, match="argument 'eps'"):
            I.seed_inplace_fd_hvp(model, F.cross_entropy, x, y, torch.zeros(P, dtype=torch.float64), eps=eps)


def test_dots_are_per_sample_gradients_times_s():
    model, x, y = tiny()
    P = sum(p.numel() for p in model.parameters())
    s = torch.randn(P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = torch.stack([flat_grad(model, x[i:i + 1], y[i:i + 1]) @ s for i in range(x.shape[0])])
    torch.testing.assert_close(I._dots(model, x, y, s), expected, rtol=1e-10, atol=1e-12)


def test_leave_one_out_equals_a_fit_from_scratch():
    """Newton from θ̂ on the leave-one-out Hessian reaches the optimum a fit from zero reaches without point i."""
    torch.manual_seed(4)
    model = nn.Linear(3, 3).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.arange(10) % 3
    lam = 0.1
    theta, H, J, loss_one = I._fit(model, x, y, lam)
    x_test, y_test = x[:2] + 0.5, y[:2]

    def test_loss(t):
        return F.cross_entropy(x_test @ t[:9].view(3, 3).T + t[9:], y_test, reduction="sum")

    changes, moves, _ = I._leave_one_out(J, loss_one, theta, H, x, y, x_test, y_test, test_loss, [3, 7])
    for i, change, move in zip([3, 7], changes, moves):
        keep = torch.ones(10, dtype=torch.bool)
        keep[i] = False
        # minimize (1/10) Σ_{j≠i} ℓ_j + λ/2 ‖θ‖² from θ = 0 by scipy's BFGS (independent of the code under test)
        import scipy.optimize

        def objective(t):
            t = torch.as_tensor(t, dtype=torch.float64).requires_grad_()
            out = x[keep] @ t[:9].view(3, 3).T + t[9:]
            value = F.cross_entropy(out, y[keep], reduction="sum") / 10 + 0.5 * lam * t.square().sum()
            return value.item(), torch.autograd.grad(value, t)[0].numpy()

        best = scipy.optimize.minimize(objective, torch.zeros(12).numpy(), jac=True, method="BFGS",
                                       options={"gtol": 1e-12, "maxiter": 1000})
        theta_i = torch.as_tensor(best.x)
        assert change == pytest.approx((test_loss(theta_i) - test_loss(theta)).item(), rel=1e-6, abs=1e-10)
        assert move == pytest.approx((theta_i - theta).norm().item(), rel=1e-5)


def test_rank_correlation_and_checkpoints():
    import scipy.stats

    g = torch.Generator().manual_seed(5)
    a = torch.randn(30, generator=g, dtype=torch.float64)
    b = a + 0.7 * torch.randn(30, generator=g, dtype=torch.float64)
    assert I._spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a.numpy(), b.numpy())[0], rel=1e-12)
    assert I._pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a.numpy(), b.numpy())[0], rel=1e-12)
    assert I._checkpoints(3000) == [1, 3, 10, 30, 100, 300, 1000, 3000]
    assert I._checkpoints(250) == [1, 3, 10, 30, 100, 250]
