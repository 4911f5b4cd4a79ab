"""fisherext.experiments.sharpness: the quick run's documented keys, outcomes, tables and figures; its
determinism for a seed (at tiny sizes); the noisy labels (count, never the true class, uniform over the
others); the training loop's SGD against the suite's plain training loop."""
import json
import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from fisherext.experiments import data  # noqa: E402
from fisherext.experiments import sharpness as S  # noqa: E402
from fisherext.experiments.registry import Config, Result, Table  # noqa: E402
from support.experiments import check_result  # noqa: E402


@pytest.fixture(scope="module")
def result():
    return S.EXPERIMENT.run(Config(quick=True))


def test_the_experiment_is_registered_by_its_module():
    assert S.EXPERIMENT.id == "sharpness" and S.EXPERIMENT.seeds == "000 + 004"


def test_quick_run_has_the_documented_data(result):
    assert isinstance(result, Result) and result.id == "sharpness"
    d = result.data
    assert set(d) == {"model", "noise", "settings", "runs", "epoch_losses", "init", "comparison"}
    n = d["model"]["train_samples"]
    assert d["noise"]["flipped"] == round(S.NOISE * n)
    for which in ("clean", "noisy"):
        assert set(d["runs"][which]) == set(S.OPTIMIZERS)
        for name, r in d["runs"][which].items():
            assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["train_accuracy"] <= 1
            assert r["lambda_max"] > 0 and r["curvature_lr"] == pytest.approx(1 / r["lambda_max"])
            assert math.isfinite(r["final_train_loss"])
            assert len(d["epoch_losses"][f"{which}/{name}"]) == d["model"]["epochs"]
    i = d["init"]
    assert i["lambda_max_lanczos"] > 0 and i["curvature_lr"] == pytest.approx(1 / i["lambda_max_lanczos"])
    c = d["comparison"]
    assert tuple(c["losses"]) == S.SEED_OPTIMIZERS and c["lr"] == i["curvature_lr"]
    assert all(len(curve) == c["steps"] + 1 for curve in c["losses"].values())
    # every optimizer starts from the same initialization
    assert len({curve[0] for curve in c["losses"].values()}) == 1
    assert all(0 <= k <= c["steps"] for k in c["loss_increases"].values())
    json.dumps(result.to_json())


def test_outcomes_tables_and_figures(result):
    check_result(result, outcomes=12, figures=['sharpness_optimizers', 'sharpness_accuracy'])


def test_tables_and_summary(result):
    assert result.summary and len(result.tables) == 2
    assert len(result.tables[0].rows) == 2 * len(S.OPTIMIZERS)
    assert len(result.tables[1].rows) == len(S.SEED_OPTIMIZERS)
    for t in result.tables:
        assert isinstance(t, Table) and all(len(row) == len(t.header) for row in t.rows)


def test_the_run_is_deterministic_for_a_seed(monkeypatch):
    monkeypatch.setattr(S, "_sizes", lambda quick: dict(hidden=8, n_train=150, epochs=1, steps=4, lanczos_m=8,
                                                        power_iters=50))
    a, b = S.run(Config(quick=True, seed=5)), S.run(Config(quick=True, seed=5))
    assert a.data == b.data


# ---------------------------------------------------------------------- noisy labels


def test_noisy_labels_replace_exactly_the_fraction_by_other_classes():
    y = torch.arange(1000) % 7
    out = S.noisy_labels(y, 0.4, 7, generator=torch.Generator().manual_seed(0))
    changed = out != y
    assert int(changed.sum()) == 400 and out.dtype == y.dtype and y.equal(torch.arange(1000) % 7)
    assert out.min() >= 0 and out.max() < 7
    again = S.noisy_labels(y, 0.4, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert S.noisy_labels(y, 0.0, 7).equal(y)


def test_noisy_labels_are_uniform_over_the_other_classes():
    y = torch.zeros(30000, dtype=torch.long)
    out = S.noisy_labels(y, 1.0, 4, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(out, minlength=4).double() / y.numel()
    assert counts[0] == 0  # never the true class
    # each of the 3 others with probability 1/3: standard error √(2/9 / 30000) ≈ 0.0027
    assert torch.allclose(counts[1:], torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.012)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(fraction=1.5), "fraction"), (dict(fraction=-0.1), "fraction"), (dict(classes=1), "classes"),
    (dict(y=torch.tensor([0.0, 1.0])), "y"), (dict(y=torch.tensor([0, 3])), "y"),
])
def test_noisy_labels_bad_arguments_name_them(kwargs, arg):
    args = dict(y=torch.tensor([0, 1, 2]), fraction=0.5, classes=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        S.noisy_labels(args.pop("y"), args.pop("fraction"), args.pop("classes"))


# ---------------------------------------------------------------------- the training loop


def test_the_sgd_run_is_the_suites_plain_training_loop_with_a_cosine_decay():
    # two epochs: the first at lr 0.1, the second at 0.1 · (1 + cos(π/2)) / 2 = 0.05, one optimizer throughout
    split = data.load("digits", seed=0).subset(n_train=200)
    a, b = data.mlp([64, 8, 10], seed=0), data.mlp([64, 8, 10], seed=0)
    mine = S._fit("sgd", a, split.x_train, split.y_train, 2, torch.Generator().manual_seed(4))
    s = S.OPTIMIZERS["sgd"]
    opt = torch.optim.SGD(b.parameters(), lr=s["lr"], momentum=s["momentum"])
    g = torch.Generator().manual_seed(4)
    plain = data.train(b, split.x_train, split.y_train, epochs=1, batch_size=64, generator=g, optimizer=opt)
    opt.param_groups[0]["lr"] = s["lr"] / 2
    plain += data.train(b, split.x_train, split.y_train, epochs=1, batch_size=64, generator=g, optimizer=opt)
    assert mine[0] == plain[0] and mine[1] == pytest.approx(plain[1], rel=1e-6)
    assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(a.parameters(), b.parameters()))
