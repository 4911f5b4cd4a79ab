"""fisherext.hvp (exact, GGN and finite-difference products of the mean loss) against explicit matrices
built by double backpropagation and per-sample Jacobians (tests/curvature.py), float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherext
from conftest import assert_close
from curvature import MODELS, directions, explicit_ggn, explicit_hessian, setup
from fisherext import FisherOperator, HessianOperator
from models import num_params


# ---- exact Hessian and GGN against explicit matrices ------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_hvp_equals_double_backprop(name):
    model, data, loss_fn = setup(name)
    H = explicit_hessian(model, loss_fn, *data)
    V = directions(num_params(model))
    assert_close(fisherext.hvp(model, loss_fn, data, V), V @ H)
    assert_close(fisherext.hvp(model, loss_fn, data, V[0]), H @ V[0])


@pytest.mark.parametrize("name", list(MODELS))
def test_ggn_equals_explicit_jacobian_form(name):
    model, data, loss_fn = setup(name)
    G = explicit_ggn(model, MODELS[name], *data)
    V = directions(num_params(model))
    assert_close(fisherext.hvp(model, loss_fn, data, V, method="ggn"), V @ G)


def test_ggn_with_ignored_labels_takes_the_generic_path():
    """Labels of -100 are left out of F.cross_entropy's mean: the fused kernel (which assumes every
    sample counts) must not be used; the product equals the GGN of the counted samples."""
    model, (x, y), _ = setup("mlp")
    y = y.clone()
    y[::3] = -100
    keep = y >= 0
    G = explicit_ggn(model, "cross_entropy", x[keep], y[keep])
    V = directions(num_params(model))
    assert_close(fisherext.hvp(model, F.cross_entropy, (x, y), V, method="ggn"), V @ G)


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, nn.CrossEntropyLoss(), lambda z, y: F.cross_entropy(z, y)],
                         ids=["F", "module", "lambda"])
def test_fused_and_generic_cross_entropy_agree(loss_fn):
    """The fused softmax Hessian (recognized losses) and autodiff of an opaque callable give one GGN."""
    model, data, _ = setup("mlp")
    V = directions(num_params(model))
    expected = V @ explicit_ggn(model, "cross_entropy", *data)
    assert_close(fisherext.hvp(model, loss_fn, data, V, method="ggn"), expected)


# ---- streaming, subsets, batching -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "ggn", "fd"])
def test_batches_weighted_to_the_mean_over_all_samples(method):
    """17 samples in batches of 5 (the last of 2): each batch mean enters with weight n_b / N."""
    model, data, loss_fn = setup("mlp_reg")
    V = directions(num_params(model), K=2)
    whole = fisherext.hvp(model, loss_fn, data, V, method=method)
    batched = fisherext.hvp(model, loss_fn, data, V, method=method, batch_size=5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=4)
    from_loader = fisherext.hvp(model, loss_fn, loader, V, method=method)
    assert_close(batched, whole)
    assert_close(from_loader, whole)


# ---- Fisher operator ---------------------------------------------------------------------------------


# ---- finite differences -----------------------------------------------------------------------------


def test_fd_hvp_converges_at_second_order():
    """Central differences of the gradient (a smooth tanh model): halving r quarters the error."""
    model, data, loss_fn = setup("mlp_reg")
    v = directions(num_params(model), K=1)[0]
    v = v / v.norm()
    exact = fisherext.hvp(model, loss_fn, data, v)
    err = [(fisherext.hvp(model, loss_fn, data, v, method="fd", r=r) - exact).norm() for r in (2e-2, 1e-2)]
    assert err[1] < 1e-3 * exact.norm()
    assert 3.5 < (err[0] / err[1]).item() < 4.5


def test_fd_hvp_restores_parameters_bitwise_also_on_error():
    model, data, loss_fn = setup("mlp")
    before = [p.detach().clone() for p in model.parameters()]
    fisherext.hvp(model, loss_fn, data, directions(num_params(model), K=2), method="fd", r=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    calls = []

    def flaky(out, y):
        calls.append(1)
        if len(calls) == 2:  # raise while the parameters sit at θ − r v
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        fisherext.hvp(model, flaky, data, directions(num_params(model), K=1)[0], method="fd", r=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(v=torch.zeros(3, dtype=torch.float64)), ValueError, r"v: expected shape \[\d+\] or \[K, \d+\]"),
    (dict(v=torch.full((1,), float("nan"))), ValueError, "v: expected shape"),
    (dict(v="v"), TypeError, "v: expected a tensor"),
    (dict(v=torch.zeros(4, dtype=torch.int64)), TypeError, "v: expected a floating-point tensor"),
    (dict(method="newton"), ValueError, "method: must be one of"),
    (dict(loss_fn="nll"), TypeError, "loss_fn: expected a callable"),
    (dict(method="fd", r=0.0), ValueError, "eps: must be positive"),
    (dict(method="fd", r=float("inf")), ValueError, "eps: must be a finite number"),
])
def test_bad_input(kwargs, exc, msg):
    model, data, loss_fn = setup("mlp")
    before = [p.detach().clone() for p in model.parameters()]
    args = dict(loss_fn=loss_fn, v=torch.ones(num_params(model), dtype=torch.float64))
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        fisherext.hvp(model, args.pop("loss_fn"), data, args.pop("v"), **args)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_non_finite_direction_and_unknown_likelihood():
    model, data, loss_fn = setup("mlp")
    v = torch.ones(num_params(model), dtype=torch.float64)
    v[3] = float("inf")
    with pytest.raises(ValueError, match="v: has non-finite entries"):
        fisherext.hvp(model, loss_fn, data, v)
    with pytest.raises(ValueError, match="loss_fn: a Fisher needs a likelihood"):
        FisherOperator(model, lambda z, y: z.sum(), data)
    with pytest.raises(ValueError, match="batch_size: must be a positive integer"):
        HessianOperator(model, loss_fn, data, batch_size=0)
