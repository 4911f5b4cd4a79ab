"""fisherext.hvp (Hessian and GGN products of the mean loss, by autograd and by finite differences) against
explicit matrices built by double backpropagation and per-sample Jacobians (tests/support/curvature.py),
float64; vectors as columns [P, K]; the old spellings of its arguments."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherext
from support import assert_close
from support.curvature import MODELS, directions, explicit_ggn, explicit_hessian, setup
from fisherext import FisherOperator, GGNOperator, HessianOperator
from support.models import num_params


# ---- exact Hessian and GGN against explicit matrices ------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_hvp_equals_double_backprop(name, device):
    model, data, loss_fn = setup(name, device=device)
    H = explicit_hessian(model, loss_fn, *data)
    V = directions(num_params(model), device=device).T
    assert_close(fisherext.hvp(model, loss_fn, data, V), H @ V)
    assert_close(fisherext.hvp(model, loss_fn, data, V[:, 0]), H @ V[:, 0])


@pytest.mark.parametrize("name", list(MODELS))
def test_ggn_equals_explicit_jacobian_form(name, device):
    model, data, loss_fn = setup(name, device=device)
    G = explicit_ggn(model, MODELS[name], *data)
    V = directions(num_params(model), device=device).T
    assert_close(fisherext.hvp(model, loss_fn, data, V, curvature="ggn"), G @ V)


def test_ggn_with_ignored_labels_takes_the_generic_path(device):
    """Labels of -100 are left out of F.cross_entropy's mean: the fused kernel (which assumes every
    sample counts) must not be used; the product equals the GGN of the counted samples."""
    model, (x, y), _ = setup("mlp", device=device)
    y = y.clone()
    y[::3] = -100
    keep = y >= 0
    G = explicit_ggn(model, "cross_entropy", x[keep], y[keep])
    V = directions(num_params(model), device=device).T
    assert_close(fisherext.hvp(model, F.cross_entropy, (x, y), V, curvature="ggn"), G @ V)


@pytest.mark.parametrize("loss_fn", ["cross_entropy", F.cross_entropy, nn.CrossEntropyLoss(),
                                     lambda z, y: F.cross_entropy(z, y)], ids=["name", "F", "module", "lambda"])
def test_fused_and_generic_cross_entropy_agree(loss_fn, device):
    """The fused softmax Hessian (recognized losses) and autodiff of an opaque callable give one GGN."""
    model, data, _ = setup("mlp", device=device)
    V = directions(num_params(model), device=device).T
    expected = explicit_ggn(model, "cross_entropy", *data) @ V
    assert_close(fisherext.hvp(model, loss_fn, data, V, curvature="ggn"), expected)


# ---- streaming, subsets, batching -------------------------------------------------------------------


CHOICES = {"hessian": dict(curvature="hessian"), "ggn": dict(curvature="ggn"), "fd": dict(method="fd")}


@pytest.mark.parametrize("choice", list(CHOICES))
def test_batches_weighted_to_the_mean_over_all_samples(choice, device):
    """17 samples in batches of 5 (the last of 2): each batch mean enters with weight n_b / N."""
    model, data, loss_fn = setup("mlp_reg", device=device)
    V = directions(num_params(model), K=2, device=device).T
    kw = CHOICES[choice]
    whole = fisherext.hvp(model, loss_fn, data, V, **kw)
    batched = fisherext.hvp(model, loss_fn, data, V, batch_size=5, **kw)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=4)
    from_loader = fisherext.hvp(model, loss_fn, loader, V, progress=True, **kw)
    assert_close(batched, whole)
    assert_close(from_loader, whole)


@pytest.mark.parametrize("choice", list(CHOICES))
def test_columns_equal_single_products(choice, device):
    """V [P, K]: K products in one pass over the data (one graph shared), column k the product with
    column k alone; the result has V's shape."""
    model, data, loss_fn = setup("cnn", device=device)
    V = directions(num_params(model), K=3, device=device).T
    kw = CHOICES[choice]
    together = fisherext.hvp(model, loss_fn, data, V, **kw)
    assert together.shape == V.shape
    for k in range(3):
        assert_close(together[:, k], fisherext.hvp(model, loss_fn, data, V[:, k], **kw))


# ---- finite differences -----------------------------------------------------------------------------


def test_fd_hvp_converges_at_second_order(device):
    """Central differences of the gradient (a smooth tanh model): halving r quarters the error."""
    model, data, loss_fn = setup("mlp_reg", device=device)
    v = directions(num_params(model), K=1, device=device)[0]
    v = v / v.norm()
    exact = fisherext.hvp(model, loss_fn, data, v)
    err = [(fisherext.hvp(model, loss_fn, data, v, method="fd", eps=eps) - exact).norm() for eps in (2e-2, 1e-2)]
    assert err[1] < 1e-3 * exact.norm()
    assert 3.5 < (err[0] / err[1]).item() < 4.5


def test_fd_hvp_restores_parameters_bitwise_also_on_error(device):
    model, data, loss_fn = setup("mlp", device=device)
    before = [p.detach().clone() for p in model.parameters()]
    fisherext.hvp(model, loss_fn, data, directions(num_params(model), K=2, device=device).T, method="fd", eps=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    calls = []

    def flaky(out, y):
        calls.append(1)
        if len(calls) == 2:  # raise while the parameters sit at θ − r v
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        fisherext.hvp(model, flaky, data, directions(num_params(model), K=1, device=device)[0], method="fd", eps=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(v=torch.zeros(3, dtype=torch.float64)), ValueError, r"argument 'v' expected shape \[\d+\] or \[\d+, K\]"),
    (dict(v=torch.zeros(2, 3, dtype=torch.float64)), ValueError, r"argument 'v' expected shape \[\d+\] or \[\d+, K\]"),
    (dict(v=torch.full((1,), float("nan"))), ValueError, "argument 'v' expected shape"),
    (dict(v="v"), TypeError, "argument 'v' expected a tensor"),
    (dict(v=torch.zeros(4, dtype=torch.int64)), TypeError, "argument 'v' expected a floating-point tensor"),
    (dict(method="newton"), ValueError, "argument 'method' must be one of 'autograd', 'fd'"),
    (dict(curvature="fisher"), ValueError, "argument 'curvature' must be one of 'hessian', 'ggn'"),
    (dict(method="fd", curvature="ggn"), ValueError, "argument 'method' 'fd' differences the gradient"),
    (dict(loss="nll"), ValueError, "argument 'loss' must be one of 'cross_entropy', 'mse', 'bce'"),
    (dict(loss=3), TypeError, "argument 'loss' expected a likelihood's name or a torch loss"),
    (dict(method="fd", eps=0.0), ValueError, "argument 'eps' must be positive"),
    (dict(method="fd", eps=float("inf")), ValueError, "argument 'eps' must be a finite number"),
    (dict(progress=True, batch_size=0), ValueError, "argument 'batch_size' must be a positive integer"),
])
def test_bad_input(kwargs, exc, msg):  # CPU only: the table's directions are module-level CPU tensors
    model, data, loss_fn = setup("mlp")
    before = [p.detach().clone() for p in model.parameters()]
    args = dict(loss=loss_fn, v=torch.ones(num_params(model), dtype=torch.float64))
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        fisherext.hvp(model, args.pop("loss"), data, args.pop("v"), **args)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_non_finite_direction_and_unknown_likelihood(device):
    model, data, loss_fn = setup("mlp", device=device)
    v = torch.ones(num_params(model), dtype=torch.float64, device=device)
    v[3] = float("inf")
    with pytest.raises(ValueError, match="argument 'v' has non-finite entries"):
        fisherext.hvp(model, loss_fn, data, v)
    with pytest.raises(ValueError, match="argument 'loss' a Fisher needs a likelihood"):
        FisherOperator(model, lambda z, y: z.sum(), data)
    with pytest.raises(ValueError, match="argument 'batch_size' must be a positive integer"):
        HessianOperator(model, loss_fn, data, batch_size=0)


# ---- GGN products with torch's own losses -------------------------------------------------------------


class _PerPosition(nn.Module):
    """Linear(3, 5) - tanh - Linear(5, 3) applied at every position: x [N, T, 3] -> outputs [N, T, 3]."""

    def __init__(self, log_softmax=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 5), nn.Linear(5, 3)
        self.log_softmax = log_softmax

    def forward(self, x):
        out = self.fc2(torch.tanh(self.fc1(x)))
        return out.log_softmax(-1) if self.log_softmax else out


def _flat_ce(loss):
    """Cross-entropy per position: [N, T, C] outputs and [N, T] labels flattened to rows."""
    return lambda z, y: loss(z.reshape(-1, z.shape[-1]), y.reshape(-1))


TORCH_LOSSES = {  # name: (loss_fn on [N, C] outputs, loss_fn on [N, T, C] outputs, targets)
    "F.mse_loss": (F.mse_loss, F.mse_loss, "float"),
    "MSELoss": (nn.MSELoss(), nn.MSELoss(), "float"),
    "MSELoss-sum": (nn.MSELoss(reduction="sum"), nn.MSELoss(reduction="sum"), "float"),
    "F.cross_entropy": (F.cross_entropy, _flat_ce(F.cross_entropy), "labels"),
    "CrossEntropyLoss": (nn.CrossEntropyLoss(), _flat_ce(nn.CrossEntropyLoss()), "labels"),
    "CrossEntropyLoss-label_smoothing": (nn.CrossEntropyLoss(label_smoothing=0.1),
                                         _flat_ce(nn.CrossEntropyLoss(label_smoothing=0.1)), "labels"),
    "CrossEntropyLoss-ignore_index": (nn.CrossEntropyLoss(ignore_index=1),
                                      _flat_ce(nn.CrossEntropyLoss(ignore_index=1)), "labels"),
    "nll_of_log_softmax": (lambda z, y: F.nll_loss(F.log_softmax(z, -1), y),
                           _flat_ce(lambda z, y: F.nll_loss(F.log_softmax(z, -1), y)), "labels"),
    "bce_with_logits": (F.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, "probabilities"),
}


def _torch_loss_problem(outputs, targets, log_softmax=False, device="cpu"):
    """A seeded per-position model and its data, drawn on the CPU, then on `device`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = _PerPosition(log_softmax).double().eval()
    g = torch.Generator().manual_seed(4)
    shape = (6,) if outputs == "[N, C]" else (4, 3)
    x = torch.randn(*shape, 3, generator=g, dtype=torch.float64)
    if targets == "labels":
        y = torch.randint(0, 3, shape, generator=g)
        y.view(-1)[:2] = 1  # the ignored class of the ignore_index case occurs
    else:
        y = torch.rand(*shape, 3, generator=g, dtype=torch.float64)
        y = y if targets == "probabilities" else 3 * y - 1
    return model.to(device), (x.to(device), y.to(device))


@pytest.mark.parametrize("outputs", ["[N, C]", "[N, T, C]"])
@pytest.mark.parametrize("name", list(TORCH_LOSSES))
def test_ggn_with_torch_losses_equals_explicit_jt_h_j(name, outputs, device):
    """hvp(method="ggn") with one vector (a dual forward) and three (the double-VJP trick) and
    GGNOperator against Jᵀ H J: J the Jacobian of all outputs, H = ∇²_z loss_fn by
    torch.autograd.functional.hessian. A loss with an ignored label must not take the fused kernel."""
    from support.explicit import explicit_ggn

    flat_loss, seq_loss, targets = TORCH_LOSSES[name]
    loss_fn = flat_loss if outputs == "[N, C]" else seq_loss
    model, (x, y) = _torch_loss_problem(outputs, targets, device=device)
    G = explicit_ggn(model, loss_fn, x, y)
    V = directions(G.shape[0], device=device).T
    assert_close(fisherext.hvp(model, loss_fn, (x, y), V, curvature="ggn"), G @ V)
    assert_close(fisherext.hvp(model, loss_fn, (x, y), V[:, 0], curvature="ggn"), G @ V[:, 0])
    assert_close(GGNOperator(model, loss_fn, (x, y)) @ V, G @ V)


def test_ggn_of_nll_loss_on_a_log_softmax_model_is_zero(device):
    """nn.NLLLoss is linear in its input, so with the LogSoftmax inside the model the GGN (split at the
    model's output) is Jᵀ·0·J = 0 while the Hessian is not: put log_softmax in loss_fn instead
    (``nll_of_log_softmax`` above), which gives the cross-entropy GGN."""
    model, (x, y) = _torch_loss_problem("[N, C]", "labels", log_softmax=True, device=device)
    P = num_params(model)
    V = directions(P, device=device).T
    zero = torch.zeros(P, 3, dtype=torch.float64)
    assert_close(fisherext.hvp(model, nn.NLLLoss(), (x, y), V, curvature="ggn"), zero, scale=1.0)
    assert_close(fisherext.hvp(model, nn.NLLLoss(), (x, y), V[:, 0], curvature="ggn"), zero[:, 0], scale=1.0)
    assert_close(GGNOperator(model, nn.NLLLoss(), (x, y)) @ V, zero, scale=1.0)
    assert fisherext.hvp(model, nn.NLLLoss(), (x, y), V).abs().max() > 1e-3


# ---- argument checks before any work ----------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "4"])
@pytest.mark.parametrize("choice", list(CHOICES))
def test_batch_size_is_validated_before_any_work(choice, batch_size, device):
    """0 used to mean one batch, -1 'no samples', 2.5 a raw Python error."""
    model, data, loss_fn = setup("mlp", device=device)
    calls = model.forward_calls
    v = torch.ones(num_params(model), dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="argument 'batch_size' must be a positive integer"):
        fisherext.hvp(model, loss_fn, data, v, batch_size=batch_size, **CHOICES[choice])
    assert model.forward_calls == calls
    for operator in (HessianOperator, GGNOperator):
        with pytest.raises(ValueError, match="argument 'batch_size' must be a positive integer"):
            operator(model, loss_fn, data, batch_size=batch_size)
    with pytest.raises(ValueError, match="argument 'batch_size' must be a positive integer"):
        FisherOperator(model, "cross_entropy", data, batch_size=batch_size)
    assert model.forward_calls == calls


# ---- the old spellings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,msg", [
    (dict(method="exact"), r"fisherext.hvp: argument 'method' 'exact' is now curvature='hessian'"),
    (dict(method="ggn"), r"fisherext.hvp: argument 'method' 'ggn' is now curvature='ggn'"),
    (dict(r=1e-3), r"fisherext.hvp: argument 'r' is now called 'eps'"),
    (dict(loss_fn=F.cross_entropy), r"fisherext.hvp: argument 'loss_fn' is now called 'loss'"),
])
def test_old_spellings_name_the_new_ones(kwargs, msg, device):
    model, data, loss_fn = setup("mlp", device=device)
    calls = model.forward_calls
    args = dict(model=model, data=data, v=torch.ones(num_params(model), dtype=torch.float64, device=device))
    if "loss_fn" not in kwargs:
        args["loss"] = loss_fn
    with pytest.raises((TypeError, ValueError), match=msg):
        fisherext.hvp(**args, **kwargs)
    assert model.forward_calls == calls


def test_name_of_a_loss_is_its_torch_loss_with_mean_reduction(device):
    """hvp(loss="mse") is the curvature of F.mse_loss (the mean over every entry), hvp(loss="cross_entropy")
    that of F.cross_entropy: explicit matrices of the torch losses by double backprop."""
    for name, loss in [("mlp_reg", F.mse_loss), ("mlp", F.cross_entropy)]:
        model, data, _ = setup(name, device=device)
        V = directions(num_params(model), device=device).T
        assert_close(fisherext.hvp(model, MODELS[name], data, V), explicit_hessian(model, loss, *data) @ V)
        from support.explicit import explicit_ggn as ggn_of_loss
        assert_close(fisherext.hvp(model, MODELS[name], data, V, curvature="ggn"), ggn_of_loss(model, loss, *data) @ V)
