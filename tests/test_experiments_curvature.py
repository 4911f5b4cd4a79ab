"""fisherext.experiments.curvature: the suite's spectrum experiment (Hessian, GGN and Fisher of a digits MLP,
matrix-free against dense) in its quick configuration, and its autograd Hessian against one written out by
hand (the MLP's forward as explicit matrix products of the flat parameter vector)."""

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherext.experiments import curvature as E
from fisherext.experiments.registry import Config, Result
from support.experiments import check_result

matplotlib.use("Agg")
SPECTRUM_KEYS = {"name", "eigenvalues_top", "lambda_max", "lambda_min", "trace", "negative_eigenvalues", "lanczos",
                 "lanczos_rel_err", "power", "power_rel_err", "power_converged", "hutchinson", "hutchinson_se",
                 "hutchinson_z", "slq_sigma", "grid", "slq_density", "dense_density", "slq_l1", "slq_mass"}


@pytest.fixture(scope="module")
def result():
    return E.EXPERIMENT.run(Config(quick=True))


def test_result_has_the_documented_data(result):
    assert isinstance(result, Result) and result.id == E.EXPERIMENT.id == "curvature"
    d = result.data
    assert {"P", "samples", "hidden", "test_accuracy", "product_rel_err", "ggn_fisher_top_rel_diff", "spectra",
            "settings"} <= d.keys()
    assert d["P"] == 64 * d["hidden"] + d["hidden"] + d["hidden"] * 10 + 10
    assert set(d["spectra"]) == set(E.MATRICES) == set(d["product_rel_err"])
    for name, s in d["spectra"].items():
        assert SPECTRUM_KEYS <= s.keys() and s["name"] == name
        assert len(s["lanczos"]) == d["settings"]["lanczos_k"] and len(s["power"]) == d["settings"]["power_k"]
        assert len(s["grid"]) == len(s["slq_density"]) == len(s["dense_density"])
        assert s["slq_mass"] == pytest.approx(1, abs=1e-3)   # SLQ's density integrates to one
        assert s["lanczos"][0] == pytest.approx(s["lambda_max"], rel=1e-6)
    # for softmax cross entropy G and F are one matrix; H is indefinite
    assert d["spectra"]["ggn"]["lambda_min"] >= -1e-8 * d["spectra"]["ggn"]["lambda_max"]
    assert d["spectra"]["hessian"]["lambda_min"] < 0
    assert max(d["product_rel_err"].values()) < 1e-10


def test_outcomes_tables_and_figures(result):
    check_result(result, outcomes=9, figures=['curvature_density'])


def test_spectral_estimates_are_deterministic_for_a_seed():
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64)).Q
    M = Q @ torch.diag(torch.linspace(-0.5, 4.0, 40, dtype=torch.float64)) @ Q.T
    M = 0.5 * (M + M.T)
    sizes = E._SIZES[True]
    a = E._spectra("m", M, M, Config(quick=True), sizes, 30)
    b = E._spectra("m", M, M, Config(quick=True), sizes, 30)
    c = E._spectra("m", M, M, Config(quick=True, seed=1), sizes, 30)
    assert a == b
    assert a["hutchinson"] != c["hutchinson"]
    assert a["lambda_max"] == pytest.approx(4.0, rel=1e-12) and a["lambda_min"] == pytest.approx(-0.5, rel=1e-12)


def test_dense_hessian_against_a_hand_written_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(7, 1, 3, dtype=torch.float64)
    y = torch.arange(7) % 3

    def loss(theta):
        W1, b1 = theta[:12].view(4, 3), theta[12:16]
        W2, b2 = theta[16:28].view(3, 4), theta[28:31]
        return F.cross_entropy(torch.tanh(x.flatten(1) @ W1.T + b1) @ W2.T + b2, y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    want = torch.autograd.functional.hessian(loss, theta)
    got = E.dense_hessian(model, x, y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, got.T, rtol=1e-12, atol=1e-14)
