"""fisherext.hvp and the curvature operators (fisherext.operators) against explicit matrices built by
double backpropagation and per-sample Jacobians (plain autograd loops, no torch.func), float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherext
from conftest import assert_close
from fisherext import FisherOperator, GGNOperator, HessianOperator
from models import flat_indices, make_data, make_model, named_trainable, num_params


def half_mse(out, y):
    """Mean over samples of ½‖f(x) − y‖² (the Gaussian negative log-likelihood of fisherext.fisher)."""
    return 0.5 * ((out - y) ** 2).sum(-1).mean()


LOSS = {"cross_entropy": F.cross_entropy, "mse": half_mse}
MODELS = {"mlp": "cross_entropy", "mlp_reg": "mse", "cnn": "cross_entropy", "norm": "cross_entropy",
          "seq": "cross_entropy", "tied": "cross_entropy"}


def setup(name, n=None, device="cpu", dtype=torch.float64):
    model = make_model(name, dtype=dtype, device=device)
    x, y = make_data(name, n, dtype=dtype, device=device)
    return model, (x, y), LOSS[MODELS[name]]


def explicit_hessian(model, loss_fn, x, y, params=None):
    """∇² of the mean loss by double backprop, one row per parameter entry."""
    params = [p for _, p in named_trainable(model)] if params is None else params
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)])
    rows = []
    for i in range(g.numel()):
        row = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if r is None else r).reshape(-1) for r, p in zip(row, params)]))
    return torch.stack(rows)


def output_jacobians(model, x):
    """J [N, C, P]: gradients of every output of every sample, one backward each."""
    params = [p for _, p in named_trainable(model)]
    J = []
    for n in range(x.shape[0]):
        out = model(x[n:n + 1])[0]
        J.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[c], params, retain_graph=True)])
                              for c in range(out.numel())]))
    return torch.stack(J)


def explicit_ggn(model, loss, x, y):
    """(1/N) Σ J_nᵀ Λ_n J_n with Λ = diag(p) − ppᵀ (cross-entropy) or I (½‖·‖²)."""
    J = output_jacobians(model, x)
    if loss == "mse":
        return torch.einsum("ncp,ncq->pq", J, J) / x.shape[0]
    p = torch.softmax(model(x).detach(), -1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", J, Lam, J) / x.shape[0]


def directions(P, K=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, P, generator=g, dtype=torch.float64).to(dtype)


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


def test_ggn_differs_from_hessian_and_is_psd():
    """The test models are not at a minimum: H is indefinite, G is not; the two differ."""
    model, data, loss_fn = setup("mlp")
    H = explicit_hessian(model, loss_fn, *data)
    G = GGNOperator(model, loss_fn, data).dense()
    assert torch.linalg.eigvalsh(H).min() < -1e-6
    assert torch.linalg.eigvalsh(G).min() > -1e-10
    assert (G - H).abs().max() > 1e-3 * H.abs().max()


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


def test_params_subset_is_the_submatrix():
    model, data, loss_fn = setup("mlp")
    H = explicit_hessian(model, loss_fn, *data)
    names = ["fc2.weight", "fc2.bias"]
    idx = flat_indices(model, names)
    A = HessianOperator(model, loss_fn, data, params=names)
    assert A.shape == (idx.numel(), idx.numel())
    assert_close(A.dense(), H[idx][:, idx])


def test_operator_columns_and_vectors():
    """A @ X with X [P, K] (one pass over the data) equals K separate A @ v, and hvp's rows."""
    model, data, loss_fn = setup("cnn")
    A = HessianOperator(model, loss_fn, data, batch_size=4)
    X = directions(A.shape[0], K=4).T
    cols = A @ X
    for k in range(4):
        assert_close(cols[:, k], A @ X[:, k].contiguous())
    assert_close(cols.T, fisherext.hvp(model, loss_fn, data, X.T))


def test_operator_follows_the_model():
    """Parameters are read at each product, not captured at construction."""
    model, data, loss_fn = setup("mlp")
    A = HessianOperator(model, loss_fn, data)
    v = directions(A.shape[0], K=1)[0]
    before = A @ v
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    after = A @ v
    assert (after - before).abs().max() > 1e-3 * before.abs().max()
    assert_close(after, explicit_hessian(model, loss_fn, *data) @ v)


def test_to_scipy_extreme_eigenvalues_match():
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    model, data, loss_fn = setup("mlp")
    H = explicit_hessian(model, loss_fn, *data)
    top = scipy_linalg.eigsh(HessianOperator(model, loss_fn, data).to_scipy(), k=1, which="LA",
                             return_eigenvectors=False)
    assert top[0] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-8)


# ---- Fisher operator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["true", "empirical", "mc"])
@pytest.mark.parametrize("name", ["mlp", "mlp_reg", "cnn"])
def test_fisher_operator_equals_full_fisher(name, kind):
    """A @ v equals fisher(structure="full") (tested against per-sample loops in test_fisher.py): same
    kinds, normalization and MC labels (the same seeded generator)."""
    model, data, _ = setup(name)
    loss = MODELS[name]
    gen = torch.Generator().manual_seed(5)
    dense = fisherext.fisher(model, data, kind=kind, structure="full", loss=loss, mc_samples=3, generator=gen).dense()
    A = FisherOperator(model, loss, data, kind=kind, mc_samples=3, seed=5)
    V = directions(A.shape[0]).T
    assert_close(A @ V, dense @ V)


def test_true_fisher_is_the_ggn_for_cross_entropy():
    model, data, _ = setup("mlp")
    V = directions(num_params(model)).T
    assert_close(FisherOperator(model, nn.CrossEntropyLoss(), data) @ V, GGNOperator(model, F.cross_entropy, data) @ V)


def test_mc_fisher_operator_is_one_fixed_matrix():
    """Labels are redrawn from the same seed at every product: A v is reproducible and A symmetric."""
    model, data, _ = setup("mlp")
    A = FisherOperator(model, "cross_entropy", data, kind="mc", seed=3)
    D = A.dense()
    assert torch.equal(A @ D[:, 0].contiguous(), A @ D[:, 0].contiguous())
    assert_close(D, D.T)


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
