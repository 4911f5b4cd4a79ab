"""fisherext.experiments.adversarial: the quick run's documented keys, outcomes, tables and figures; its
determinism for a seed (at tiny sizes); the ROC points against a hand computation, scikit-learn and
detect.auroc; seed 001's block-diagonal loop against an explicit per-class autograd computation."""
import json

import matplotlib
import pytest
import torch
from torch import nn

matplotlib.use("Agg")

import fisherext as fx  # noqa: E402
from fisherext.experiments import adversarial as A  # noqa: E402
from fisherext.experiments.registry import Config, Result, Table  # noqa: E402
from support.experiments import check_result  # noqa: E402


@pytest.fixture(scope="module")
def result():
    return A.EXPERIMENT.run(Config(quick=True))


def test_the_experiment_is_registered_by_its_module():
    assert A.EXPERIMENT.id == "adversarial" and A.EXPERIMENT.seeds == "001 + 004"


def test_quick_run_has_the_documented_data(result):
    assert isinstance(result, Result) and result.id == "adversarial"
    d = result.data
    assert set(d) == {"model", "inputs_attacked", "attacks", "mean_max_probability", "block_vs_full", "seed_loop",
                      "float32_fd_block_zeros"}
    assert set(d["float32_fd_block_zeros"]) == {"clean", *A.ATTACKS}
    assert 0.5 < d["model"]["test_accuracy"] <= 1 and d["inputs_attacked"] > 10
    assert set(d["attacks"]) == set(A.ATTACKS)
    for key, a in d["attacks"].items():
        assert 0 <= a["success_rate"] <= 1 and a["successful"] == round(a["success_rate"] * d["inputs_attacked"])
        assert set(a["detection"]) == set(fx.detect.SCORES)
        for row in a["detection"].values():
            assert 0 <= row["auroc"] <= 1 and 0 <= row["tpr_at_5fpr"] <= 1
    for where in ("clean", "l2_early"):
        c = d["block_vs_full"][where]
        r = c["ratio_exact_over_block"]
        assert r["min"] <= r["q10"] <= r["median"] <= r["q90"] <= r["max"]
        assert c["fd_full_rel_err"]["median"] < 1e-2
    assert d["seed_loop"]["inputs"] > 0 and d["seed_loop"]["max_rel_diff_vs_fd_quadratic_block"] < 1e-6
    json.dumps(result.to_json())  # JSON-able as it is


def test_outcomes_tables_and_figures(result):
    check_result(result, outcomes=12, figures=['adversarial_trace_hist', 'adversarial_roc', 'adversarial_sensitivity', 'adversarial_block_vs_full'])


def test_tables_and_summary(result):
    assert result.summary and len(result.tables) == 2
    for t in result.tables:
        assert isinstance(t, Table) and t.rows and all(len(row) == len(t.header) for row in t.rows)


def test_the_run_is_deterministic_for_a_seed(monkeypatch):
    monkeypatch.setattr(A, "_sizes", lambda quick: dict(hidden=8, epochs=2, n_test=24, seed_inputs=2, maps=2))
    a, b = A.run(Config(quick=True, seed=3)), A.run(Config(quick=True, seed=3))
    assert a.data == b.data
    assert [o.to_json() for o in a.outcomes] == [o.to_json() for o in b.outcomes]


# ---------------------------------------------------------------------- roc_curve


def test_roc_points_by_hand():
    fpr, tpr = A.roc_curve(torch.tensor([0.1, 0.4, 0.4]), [0.4, 0.9])
    # thresholds 0.9, 0.4 (a tie across the classes: one diagonal step), 0.1
    assert fpr == pytest.approx([0, 0, 2 / 3, 1], abs=1e-15)
    assert tpr == pytest.approx([0, 0.5, 1, 1], abs=1e-15)


def _trapezoid(fpr, tpr):
    return sum((f1 - f0) * (t1 + t0) / 2 for f0, f1, t0, t1 in zip(fpr, fpr[1:], tpr, tpr[1:]))


def test_roc_area_is_the_mann_whitney_auroc_and_matches_sklearn():
    from sklearn.metrics import roc_auc_score, roc_curve

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 20, (300,), generator=g).double()   # many ties
    attacked = torch.randint(5, 30, (200,), generator=g).double()
    fpr, tpr = A.roc_curve(clean, attacked)
    assert all(b >= a for a, b in zip(fpr, fpr[1:])) and all(b >= a for a, b in zip(tpr, tpr[1:]))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    area = _trapezoid(fpr, tpr)
    assert area == pytest.approx(fx.detect.auroc(clean, attacked).item(), abs=1e-12)
    labels = [0] * 300 + [1] * 200
    scores = torch.cat([clean, attacked]).tolist()
    assert area == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    sk_fpr, sk_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert fpr == pytest.approx(sk_fpr.tolist(), abs=1e-15) and tpr == pytest.approx(sk_tpr.tolist(), abs=1e-15)


@pytest.mark.parametrize("bad,arg", [([], "scores_clean"), ([0.1, float("nan")], "scores_clean"),
                                     ([[0.1, 0.2]], "scores_clean")])
def test_roc_bad_scores_name_the_argument(bad, arg):
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        A.roc_curve(bad, [0.5])
    with pytest.raises(ValueError, match="argument 'scores_attacked'"):
        A.roc_curve([0.5], bad)


# ---------------------------------------------------------------------- seed 001's block-diagonal loop


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _per_class_grads(model, x_n):
    """[C, P]: ∇θ log p_c(x_n) for every class, by autograd, one backward pass per class."""
    params = list(model.parameters())
    logp = torch.log_softmax(model(x_n.unsqueeze(0)), 1)[0]
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(logp[c], params, retain_graph=True)])
            for c in range(logp.numel())]
    return torch.stack(rows), logp.detach().exp()


def test_seed_loop_is_the_block_diagonal_form_not_the_full_one():
    model = _tiny()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    V = torch.randn(6, sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    got = A.seed_block_quadratic(model, x, V, eps=1e-4)
    sizes = [p.numel() for p in model.parameters()]
    block, full = [], []
    for n in range(x.shape[0]):
        G, p = _per_class_grads(model, x[n])
        full.append((p * (G @ V[n]) ** 2).sum())
        parts = zip(G.split(sizes, dim=1), V[n].split(sizes))
        block.append(sum((p * (Gt @ vt) ** 2).sum() for Gt, vt in parts))
    block, full = torch.stack(block), torch.stack(full)
    assert torch.allclose(got, block, rtol=1e-6, atol=0)            # central differences: O(eps²)
    assert ((got - full).abs() / full).max() > 1e-2                 # the off-diagonal blocks are missing
    library = fx.fd_quadratic(model, x, V, eps=1e-4, block=True, per_input=True)
    assert torch.allclose(got, library, rtol=1e-9, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # never written
    assert all(p.grad is None for p in model.parameters())


def test_seed_loop_bad_directions_name_the_argument():
    model = _tiny()
    with pytest.raises(ValueError, match="argument 'V'"):
        A.seed_block_quadratic(model, torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64))
