"""fisherext.experiments.ewc: the quick run's documented results (keys, outcomes, tables, figures drawn on an Agg
canvas, determinism for a seed), the permuted tasks, and the reproductions of the seeds' Fishers against per-sample
loops: the batch-mean squared gradient of many EWC copies, and seed 003's per-sample loop at the argmax label."""
import json
import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherext.ewc import EWC
from fisherext.experiments import data as datasets
from fisherext.experiments import ewc as E
from fisherext.experiments.registry import Config, Result
from support.experiments import check_result

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def result(one_thread):
    return E.EXPERIMENT.run(Config(quick=True))


DATA_KEYS = {"tasks", "epochs", "repeats", "lam", "lr", "batch_size", "n_train", "n_test", "methods",
             "factor_true_over_batch_mean", "factor_true_over_empirical", "batch_mean_by_hand_rel_diff"}
METHOD_KEYS = {"label", "accuracy", "accuracy_std", "task1_final", "task1_final_runs", "final_mean", "last_task_final",
               "fisher_trace_task1"}


def test_quick_run_has_the_documented_data(result):
    assert isinstance(result, Result) and result.id == "ewc" == E.EXPERIMENT.id
    d = result.data
    assert set(d) == DATA_KEYS
    T = d["tasks"]
    assert T == E.QUICK["tasks"] and d["repeats"] == E.QUICK["repeats"] and d["epochs"] == E.QUICK["epochs"]
    assert list(d["methods"]) == list(E.METHODS)
    for name, v in d["methods"].items():
        assert set(v) == METHOD_KEYS
        R = torch.tensor(v["accuracy"], dtype=torch.float64)
        assert R.shape == (T, T) and ((R >= 0) & (R <= 1)).all()
        assert v["task1_final"] == R[-1, 0].item() and v["last_task_final"] == R[-1, -1].item()
        assert v["final_mean"] == pytest.approx(R[-1].mean().item())
        assert len(v["task1_final_runs"]) == d["repeats"]
        assert (v["fisher_trace_task1"] is None) == (name == "sgd")
    # before the first consolidation no penalty acts: every method has the same first row
    first = [v["accuracy"][0] for v in d["methods"].values()]
    assert all(row == first[0] for row in first)
    assert d["factor_true_over_batch_mean"] > 1 and math.isfinite(d["factor_true_over_empirical"])
    assert d["batch_mean_by_hand_rel_diff"] <= 1e-5
    json.dumps(result.to_json())


def test_outcomes_tables_and_figures(result):
    check_result(result, outcomes=11, figures=['ewc_accuracy', 'ewc_task1'])


def test_the_run_is_deterministic_for_a_seed(result, one_thread):
    again = E.EXPERIMENT.run(Config(quick=True))
    assert again.data == result.data


def test_tasks_are_pixel_permutations_of_the_first():
    split = datasets.load("digits", seed=0)
    tasks = E._tasks(split, 3, 100, torch.Generator().manual_seed(0), "cpu")
    (x0, y0), (xt0, yt0) = tasks[0]
    assert torch.equal(x0, split.x_train[:100].flatten(1)) and torch.equal(xt0, split.x_test.flatten(1))
    for (x, y), (xt, yt) in tasks[1:]:
        assert torch.equal(y, y0) and torch.equal(yt, yt0)
        # each pixel column of task k (train and test rows) is a column of task 1, as often as it is there
        # (some pixels are 0 on every digit, so identical columns exist)
        a, b = torch.cat([x, xt]).T, torch.cat([x0, xt0]).T  # [64 pixels, all rows]
        same = (a[:, None, :] == b[None, :, :]).all(-1)        # [pixel of task k, pixel of task 1]
        own = (a[:, None, :] == a[None, :, :]).all(-1)
        assert torch.equal(same.sum(1), own.sum(1))
        assert not torch.equal(x, x0)


# ---- the seeds' Fishers, against per-sample loops -----------------------------------------------------


def tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    return model, x, y


def per_sample_grads(model, x, y):
    params = list(model.parameters())
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        F.cross_entropy(model(x[n:n + 1]), y[n:n + 1]), params)]) for n in range(x.shape[0])])


def test_batch_mean_grad_sq_by_hand():
    model, x, y = tiny()
    G = per_sample_grads(model, x, y)  # [7, P]
    # batch size 1: the empirical Fisher's diagonal
    torch.testing.assert_close(E.seed_batch_mean_grad_sq(model, x, y, batch_size=1), G.square().mean(0),
                               rtol=1e-12, atol=1e-14)
    # batches {0,1,2}, {3,4,5}, {6}: the squared mean gradient of each, averaged over the 3 batches
    expected = (G[0:3].mean(0).square() + G[3:6].mean(0).square() + G[6].square()) / 3
    torch.testing.assert_close(E.seed_batch_mean_grad_sq(model, x, y, batch_size=3), expected, rtol=1e-12, atol=1e-14)
    # the library's kind="batch_mean_grad_sq" is that quantity
    library = EWC(model, (x, y), lam=1.0, kind="batch_mean_grad_sq", batch_size=3).tasks[0]["diag"]
    torch.testing.assert_close(library, expected, rtol=1e-12, atol=1e-14)


def test_batch_mean_grad_sq_bad_arguments():
    model, x, y = tiny()
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="argument 'batch_size'"):
            E.seed_batch_mean_grad_sq(model, x, y, batch_size=bad)
    with pytest.raises(ValueError, match="argument 'x'"):
        E.seed_batch_mean_grad_sq(model, x[:0], y[:0], batch_size=2)


def test_seed_argmax_fisher_is_the_empirical_fisher_at_predicted_labels():
    """seed 003's _diag_fisher: one backward pass per input at label = argmax of the output, grad² / N."""
    model, x, y = tiny(1)
    expected = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for n in range(x.shape[0]):
        out = model(x[n:n + 1])
        label = out.argmax(1)
        grads = torch.autograd.grad(F.nll_loss(F.log_softmax(out, 1), label), list(model.parameters()))
        expected += torch.cat([g.reshape(-1) for g in grads]).square() / x.shape[0]
    with torch.no_grad():
        predicted = model(x).argmax(1)
    got = EWC(model, (x, predicted), lam=1.0, kind="empirical").tasks[0]["diag"]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
