"""fisherext.detect: the scores against per-sample autograd computations written out here (float64: sums over
classes of explicit parameter gradients, explicit mixed derivatives for the sensitivity), AUROC and
TPR@FPR against hand-computed cases and scikit-learn, and detection on a small model trained on
scikit-learn's digits (early-stopped and converged PGD)."""
import math

import pytest
import torch
from torch import nn

import fisherext as fx
from support import assert_close
from support.models import trained_digits_classifier


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


def tiny_inputs(n=6):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ---- independent per-sample computations ------------------------------------------------------------------


def class_grads(model, xn, create_graph=False):
    """[C, P]: ∇θ log p_c(x_n) for every class c, one backward each; and p(x_n) [C]."""
    params = list(model.parameters())
    log_p = torch.log_softmax(model(xn[None])[0], 0)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(log_p[c], params, retain_graph=True,
                                                                  create_graph=create_graph)])
            for c in range(log_p.numel())]
    return torch.stack(rows), log_p.exp()


def tensor_slices(model):
    out, offset = [], 0
    for p in model.parameters():
        out.append(slice(offset, offset + p.numel()))
        offset += p.numel()
    return out


def explicit_scores(model, x):
    """Every score of fisherext.detect, input by input, from explicit per-class gradients."""
    rows = {k: [] for k in fx.detect.SCORES}
    for xn in x:
        G, p = class_grads(model, xn)                           # [C, P], [C]
        rows["trace"].append((p * (G ** 2).sum(1)).sum())          # Σ_c p_c ‖∇ log p_c‖²
        v = G[p.argmax()] / G[p.argmax()].norm()                 # seed 001's direction
        rows["quad"].append((p * (G @ v) ** 2).sum())               # vᵀ F_n v = Σ_c p_c (vᵀ∇ log p_c)²
        rows["quad_fd_block"].append(sum((p * (G[:, s] @ v[s]) ** 2).sum() for s in tensor_slices(model)))
        rows["sensitivity"].append(explicit_sensitivity(model, xn, v).abs().sum())
        rows["msp"].append(1 - p.max())
        rows["entropy"].append(-(p * p.log()).sum())
    return {k: torch.stack(v) for k, v in rows.items()}


def explicit_sensitivity(model, xn, v):
    """FIS_i = Σ_c ∂x_i(vᵀ∇θ p_c) ∂x_i(vᵀ∇θ log p_c), by double backprop through x (v held fixed)."""
    x = xn.detach().clone().requires_grad_(True)
    G, p = class_grads(model, x, create_graph=True)
    total = torch.zeros_like(x)
    for c in range(p.numel()):
        s = G[c] @ v                                        # d log p_c / dε
        d_log = torch.autograd.grad(s, x, retain_graph=True)[0]
        d_p = torch.autograd.grad(p[c] * s, x, retain_graph=True)[0]  # d p_c / dε = p_c · d log p_c / dε
        total = total + d_p * d_log
    return total


def test_scores_equal_per_sample_autograd():
    model, x = tiny_model(), tiny_inputs()
    got = fx.detect.scores(model, x)
    expected = explicit_scores(model, x)
    assert list(got) == list(fx.detect.SCORES)
    for name in ("trace", "quad", "sensitivity", "msp", "entropy"):
        assert_close(got[name], expected[name])
    # central differences with eps = 1e-3: O(eps²) relative error
    assert_close(got["quad_fd_block"], expected["quad_fd_block"], rtol=1e-5)
    # the block-diagonal form is not the quadratic form
    assert (got["quad_fd_block"] - got["quad"]).abs().max() > 1e-3 * got["quad"].abs().max()


def test_scores_in_chunks_equal_all_at_once_and_which_selects(monkeypatch):
    model, x = tiny_model(), tiny_inputs(40)  # more inputs than one exact-quad chunk
    whole = fx.detect.scores(model, x)
    chunked = fx.detect.scores(model, x, batch_size=7)
    P = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(fx.detect, "_DIRECTION_ELEMENTS", 3 * P)  # directions held 3 inputs at a time
    held = fx.detect.scores(model, x)
    for name in fx.detect.SCORES:
        assert_close(chunked[name], whole[name])
        assert_close(held[name], whole[name])
    some = fx.detect.scores(model, x, which=["entropy", "trace"])
    assert list(some) == ["entropy", "trace"]
    assert torch.equal(some["entropy"], whole["entropy"])
    assert list(fx.detect.scores(model, x, which="msp")) == ["msp"]


def test_scores_over_a_parameter_subset():
    model, x = tiny_model(), tiny_inputs()
    head = fx.detect.scores(model, x, which=["trace"], params=[model[2]])["trace"]
    expected = []
    for xn in x:
        G, p = class_grads(model, xn)
        expected.append((p * (G[:, -model[2].weight.numel() - 3:] ** 2).sum(1)).sum())
    assert_close(head, torch.stack(expected))


# ---- AUROC and TPR at a false-positive rate ---------------------------------------------------------------------


def test_auroc_on_a_hand_computed_case_with_ties():
    # pairs (a > c) + ½(a = c): 2.5 beats 1, 2; 3 beats 1, 2 and ties 3; 5 beats all four: 2 + 2.5 + 4 = 8.5 of 12
    got = fx.detect.auroc(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.5, 3.0, 5.0]))
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == 8.5 / 12
    assert fx.detect.auroc([1, 1, 1], [1, 1]).item() == 0.5
    assert fx.detect.auroc([0.0, 1.0], [2.0, 3.0]).item() == 1.0
    assert fx.detect.auroc([2.0, 3.0], [0.0, 1.0]).item() == 0.0
    assert fx.detect.auroc([-math.inf, 0.0], [math.inf, 0.0]).item() == (2 + 1.5) / 4  # inf beats both; 0 one and a tie


@pytest.mark.parametrize("n,m,levels", [(50, 70, 5), (300, 200, 1000), (17, 1, 3)])
def test_auroc_equals_sklearn(n, m, levels):
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(n)
    clean = torch.randint(0, levels, (n,), generator=g).double()          # integer levels: many ties
    attacked = (torch.randint(0, levels, (m,), generator=g) + 0.3 * levels * torch.rand(m, generator=g)).round()
    expected = roc_auc_score([0] * n + [1] * m, torch.cat([clean, attacked]).numpy())
    assert abs(fx.detect.auroc(clean, attacked).item() - expected) < 1e-12


def test_tpr_at_fpr_on_known_cases():
    clean = torch.arange(100.0)  # 0..99: at fpr = 0.05 five clean scores may lie above τ, so τ = 94
    attacked = torch.tensor([90.0, 94.0, 94.5, 99.0, 100.0])
    assert fx.detect.tpr_at_fpr(clean, attacked).item() == 3 / 5
    assert fx.detect.tpr_at_fpr(clean, attacked, fpr=0.0).item() == 1 / 5     # τ = 99
    assert fx.detect.tpr_at_fpr(clean, attacked, fpr=1.0).item() == 1.0       # τ = −inf
    assert fx.detect.tpr_at_fpr(clean, attacked, fpr=0.29).item() == 5 / 5    # k = 29: τ = 70
    tied = torch.tensor([0.0] * 10 + [1.0] * 10)  # fpr 0.3: τ is the 14th smallest, 1: no clean input flagged
    assert fx.detect.tpr_at_fpr(tied, torch.tensor([1.0, 2.0]), fpr=0.3).item() == 0.5


def test_tpr_at_fpr_keeps_the_clean_false_positive_rate():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 20, (333,), generator=g).double()
    for fpr in (0.01, 0.05, 0.2, 0.5):
        assert fx.detect.tpr_at_fpr(clean, clean, fpr).item() <= fpr  # on itself the TPR is the clean FPR


# ---- detection on a trained model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return trained_digits_classifier()


def test_detection_of_early_stopped_and_converged_pgd(digits):
    """Early-stopped PGD leaves its inputs just past the decision boundary, where the Fisher information is
    large: every Fisher score detects them. Converged PGD drives them deep into a wrong class, more
    confidently than the clean inputs: there the Fisher scores are *lower* than on clean inputs."""
    model, x, y = digits
    which = ["trace", "quad", "quad_fd_block", "msp", "entropy"]
    early = fx.attacks.pgd(model, x, y, eps=2.0, norm="l2", steps=50, step_size=0.05, clamp=(0, 1), early_stop=True)
    report = fx.detect.detection_report(model, x, early, y=y, which=which)
    assert report.accuracy_clean > 0.9 and report.accuracy_attacked < 0.05
    assert list(report.table) == which and report.fpr == 0.05
    for name in which:
        assert report.table[name]["auroc"] > 0.9
        assert report.clean[name].shape == report.attacked[name].shape == (x.shape[0],)
        assert report.table[name]["auroc"] == fx.detect.auroc(report.clean[name], report.attacked[name]).item()
    assert "| trace |" in str(report)
    converged = fx.attacks.pgd(model, x, y, eps=2.0, norm="l2", steps=100, clamp=(0, 1))
    report = fx.detect.detection_report(model, x, converged, y=y, which=["trace", "quad"])
    assert report.accuracy_attacked < 0.01
    assert report.table["trace"]["auroc"] < 0.5 and report.table["quad"]["auroc"] < 0.5


# ---- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,arg", [
    (dict(which="margin"), ValueError, "which"),
    (dict(which=[]), ValueError, "which"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(x=torch.ones(3, 4, dtype=torch.long)), TypeError, "x"),
    (dict(x=torch.zeros(0, 4, dtype=torch.float64)), ValueError, "x"),
])
def test_scores_bad_input_names_the_argument(kwargs, error, arg):
    args = dict(x=tiny_inputs())
    args.update(kwargs)
    with pytest.raises(error, match=rf"^fisherext\.detect\.scores: argument '{arg}'"):
        fx.detect.scores(tiny_model(), args.pop("x"), **args)


def test_scores_refuse_a_model_in_train_mode_with_dropout():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).double().train()
    with pytest.raises(ValueError, match=r"^fisherext\.detect\.scores: argument 'model'.*model\.eval\(\)"):
        fx.detect.scores(model, tiny_inputs())


@pytest.mark.parametrize("clean,attacked,arg", [
    ([1.0, math.nan], [1.0], "scores_clean"),
    ([1.0], torch.ones(2, 2), "scores_attacked"),
    ([], [1.0], "scores_clean"),
    ([1.0], torch.tensor(1.0), "scores_attacked"),
])
def test_auroc_and_tpr_bad_input_names_the_argument(clean, attacked, arg):
    with pytest.raises(ValueError, match=rf"^fisherext\.detect\.auroc: argument '{arg}'"):
        fx.detect.auroc(clean, attacked)
    with pytest.raises(ValueError, match=rf"^fisherext\.detect\.tpr_at_fpr: argument '{arg}'"):
        fx.detect.tpr_at_fpr(clean, attacked)
    with pytest.raises(TypeError, match=r"argument 'scores_clean'"):
        fx.detect.auroc(object(), [1.0])


@pytest.mark.parametrize("fpr", [-0.1, 1.5, math.nan, True])
def test_tpr_at_fpr_bad_fpr(fpr):
    with pytest.raises(ValueError, match=r"^fisherext\.detect\.tpr_at_fpr: argument 'fpr'"):
        fx.detect.tpr_at_fpr([0.0, 1.0], [1.0], fpr)


@pytest.mark.parametrize("kwargs,error,arg", [
    (dict(y=torch.zeros(5, dtype=torch.long)), ValueError, "y"),
    (dict(y=[0] * 6), TypeError, "y"),
    (dict(x_adv=tiny_inputs(6)[:, :3]), ValueError, "x_adv"),
    (dict(x_adv=torch.ones(6, 4, dtype=torch.int64)), TypeError, "x_adv"),
    (dict(fpr=2.0), ValueError, "fpr"),
])
def test_detection_report_bad_input_names_the_argument(kwargs, error, arg):
    args = dict(x_adv=tiny_inputs(6) + 0.1, which=["msp"])
    args.update(kwargs)
    with pytest.raises(error, match=rf"^fisherext\.detect\.detection_report: argument '{arg}'"):
        fx.detect.detection_report(tiny_model(), tiny_inputs(6), **args)
