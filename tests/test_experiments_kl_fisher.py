"""fisherext.experiments.kl_fisher: the suite's classifier KL-against-Fisher experiment (seed 000's unfinished
FisherSAM check) in its quick configuration, its seed-000 ConvNet shape, and the seed's missing-½ ratio against
a hand computation."""
import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherext.experiments import kl_fisher as E
from fisherext.experiments.registry import Config, Result
from support.experiments import check_result

matplotlib.use("Agg")
MODEL_KEYS = {"name", "P", "inputs", "test_accuracy", "train_loss", "eps", "kl", "half_quad", "ratio",
              "ratio_empirical", "seed_prediction_over_kl", "quad", "quad_operator", "quad_full", "quad_empirical"}


@pytest.fixture(scope="module")
def result():
    return E.EXPERIMENT.run(Config(quick=True))


def test_result_has_the_documented_data(result):
    assert isinstance(result, Result) and result.id == E.EXPERIMENT.id == "kl_fisher"
    models = result.data["models"]
    assert [m["name"] for m in models] == ["mlp", "convnet"]
    assert [m["P"] for m in models] == [64 * 32 + 32 + 32 * 10 + 10, 38_390]
    for m in models:
        assert MODEL_KEYS <= m.keys()
        n = len(m["eps"])
        assert n == len(E.EPS[::2]) and all(len(m[k]) == n for k in ("kl", "half_quad", "ratio", "ratio_empirical"))
        # the rows are consistent with their definitions
        for kl, half, ratio, seed in zip(m["kl"], m["half_quad"], m["ratio"], m["seed_prediction_over_kl"]):
            assert ratio == pytest.approx(kl / half, rel=1e-12)
            assert seed == pytest.approx(2 * half / kl, rel=1e-12)
        assert abs(m["ratio"][0] - 1) < 1e-3
        assert m["quad_operator"] == pytest.approx(m["quad"], rel=1e-9)
    assert models[0]["quad_full"] == pytest.approx(models[0]["quad"], rel=1e-9)
    assert models[1]["quad_full"] is None


def test_outcomes_tables_and_figures(result):
    check_result(result, outcomes=12, figures=['kl_fisher_ratio'])


def test_the_run_is_deterministic_for_a_seed(result):
    again = E.EXPERIMENT.run(Config(quick=True))
    assert again.data == result.data


def test_seed_prediction_over_kl_by_hand():
    rows = [{"kl": 0.5, "half_quad": 0.5}, {"kl": 2.0, "half_quad": 1.0}, {"kl": 0.0, "half_quad": 1.0}]
    out = E.seed_kl_prediction_over_kl(rows)
    assert out[:2] == [2.0, 1.0] and math.isnan(out[2])


def test_convnet_is_seed_000s_shape_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    model = E.convnet(generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 10, (5, 5)), (10, 20, (5, 5))]
    assert [(m.in_features, m.out_features) for m in linears] == [(320, 100), (100, 10)]
    assert sum(p.numel() for p in model.parameters()) == 38_390
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    # the forward by hand: conv, pool, relu twice, then fc1, relu, fc2 (logits)
    h = F.relu(F.max_pool2d(convs[0](x), 2))
    h = F.relu(F.max_pool2d(convs[1](h), 2)).flatten(1)
    torch.testing.assert_close(model(x), linears[1](F.relu(linears[0](h))))
    # seeded: the same generator state gives the same weights, another one others
    again = E.convnet(generator=torch.Generator().manual_seed(3))
    other = E.convnet(generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert not torch.equal(model[0].weight, other[0].weight)


def test_upsample():
    x = torch.full((2, 1, 8, 8), 0.25)
    y = E.upsample(x)
    assert y.shape == (2, 1, 28, 28)
    torch.testing.assert_close(y, torch.full_like(y, 0.25))


def _write_idx(path, array):
    """An IDX file as MNIST ships it: magic (0, 0, type 0x08 = uint8, ndim), the big-endian dims, the bytes."""
    import struct

    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape))
        f.write(array.to(torch.uint8).numpy().tobytes())


def fake_mnist(root, n_train=96, n_test=48):
    """torchvision's MNIST layout (root/MNIST/raw/*-ubyte) with a learnable toy: class c is a bright 6×6
    square at position c of a 28×28 grid, plus noise."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = torch.arange(n) % 10
        x = torch.randint(0, 60, (n, 28, 28), generator=g)
        for i, c in enumerate(y.tolist()):
            r, q = divmod(c, 4)
            x[i, 2 + 8 * r:8 + 8 * r, 2 + 6 * q:8 + 6 * q] = 250
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)


def test_the_convnet_runs_on_mnist_when_the_data_root_holds_it(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    fake_mnist(tmp_path)
    monkeypatch.setitem(E._SIZES[True], "mnist", (96, 48))
    result = E.EXPERIMENT.run(Config(quick=True, data_root=str(tmp_path)))
    mlp, conv = result.data["models"]
    assert mlp["data"] == "digits" and conv["data"] == "mnist"
    assert abs(conv["ratio"][0] - 1) < 1e-3           # the KL against ½ε²vᵀFv holds on MNIST's ConvNet too


def test_a_data_root_without_mnist_is_a_data_error(tmp_path):
    from fisherext.experiments.data import DataUnavailable

    with pytest.raises(DataUnavailable, match="mnist is not under"):
        E.EXPERIMENT.run(Config(quick=True, data_root=str(tmp_path)))
