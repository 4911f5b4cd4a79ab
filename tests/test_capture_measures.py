"""fx.per_sample_fisher: per-input tr(F_n) and v^T F_n v against the per-sample autograd reference.

Seed 001 computed the "quadratic form" by perturbing one parameter tensor at a time, i.e. the sum over
parameter tensors of v_t^T F_n[t, t] v_t (the block-diagonal part only); the exact v^T F_n v is required.
"""
import warnings

import pytest
import torch

import fisherext as fx
from support import assert_close
from support.models import (
    SPECS, assert_matches, compute, compute_per_sample, make_data, make_model, names_argument, num_params,
    param_slices, per_class_grads, reference, untouched,
)

EXACT_KINDS = ["true", "empirical"]
MODELS = ["mlp", "mlp_reg", "cnn", "seq", "norm", "scaleshift", "bilinear", "tied"]


def random_v(P, seed=0, device="cpu"):
    return torch.randn(P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)


def block_diagonal_quadratic(F_n, v, model):
    """Seed 001's quantity: sum over parameter tensors of v_t^T F_n[t, t] v_t."""
    out = 0
    for sl in param_slices(model).values():
        out = out + torch.einsum("i,nij,j->n", v[sl], F_n[:, sl, sl], v[sl])
    return out


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_trace(name, kind, device):
    model = make_model(name, device=device)
    x, y = make_data(name, device=device)
    out = compute_per_sample(model, x, y if kind == "empirical" else None, kind=kind, quantity="trace",
                             loss=SPECS[name].loss)
    assert out.shape == (len(x),) and out.dtype == torch.float64
    assert_matches(out, reference(name, kind).diagonal(dim1=1, dim2=2).sum(-1), rtol=1e-8)


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_quad(name, kind, device):
    model = make_model(name, device=device)
    x, y = make_data(name, device=device)
    v = random_v(num_params(model), device=device)
    v0 = v.clone()
    out = compute_per_sample(model, x, y if kind == "empirical" else None, kind=kind, quantity="quad", v=v,
                             loss=SPECS[name].loss)
    assert torch.equal(v, v0), "per_sample_fisher modified v"
    assert out.shape == (len(x),) and out.dtype == torch.float64
    assert_matches(out, torch.einsum("i,nij,j->n", v.cpu(), reference(name, kind), v.cpu()), rtol=1e-8)


@pytest.mark.parametrize("kind", ["true", "empirical", "mc"])
@pytest.mark.parametrize("name", ["mlp", "mlp_reg", "seq"])
def test_quad_with_directions_as_columns(name, kind, device):
    """V [P, K] gives [N, K]: column k the reference v_kᵀ F_n v_k (exact kinds) or, for every kind, the
    quad of column k alone (MC: the same generator seed, hence the same labels)."""
    model = make_model(name, device=device)
    x, y = make_data(name, device=device)
    V = torch.stack([random_v(num_params(model), seed=k, device=device) for k in range(3)], 1)
    run = lambda v: compute_per_sample(model, x, y, kind=kind, quantity="quad", v=v,  # noqa: E731
                                       loss=SPECS[name].loss, mc_samples=2,
                                       generator=torch.Generator(device=device).manual_seed(4))
    out = run(V)
    assert out.shape == (len(x), 3)
    for k in range(3):
        assert_close(out[:, k], run(V[:, k]))
    if kind != "mc":
        assert_matches(out, torch.einsum("ik,nij,jk->nk", V.cpu(), reference(name, kind), V.cpu()), rtol=1e-8)


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_quad_is_not_the_block_diagonal_sum(name, kind, device):
    """The cross-tensor terms matter here (checked), and the exact v^T F_n v is what is returned."""
    model = make_model(name, device=device)
    x, y = make_data(name, device=device)
    v = random_v(num_params(model), seed=3)
    F_n = reference(name, kind)
    exact = torch.einsum("i,nij,j->n", v, F_n, v)
    seed001 = block_diagonal_quadratic(F_n, v, model)
    assert ((exact - seed001).abs() > 0.05 * exact.abs().max()).any(), "precondition: the two must differ"
    out = compute_per_sample(model, x, y, kind=kind, quantity="quad", v=v.to(device), loss=SPECS[name].loss)
    assert_matches(out, exact, rtol=1e-8)
    assert not torch.allclose(out.cpu().double(), seed001, rtol=1e-3)


def test_quad_with_direction_in_one_tensor_only(device):
    """v supported on a single parameter tensor: exact and block-diagonal agree (sanity of the above)."""
    model = make_model("mlp", device=device)
    x, _ = make_data("mlp", device=device)
    v = torch.zeros(num_params(model), dtype=torch.float64)
    sl = param_slices(model)["fc2.weight"]
    v[sl] = random_v(sl.stop - sl.start, seed=5)
    F_n = reference("mlp", "true")
    out = compute_per_sample(model, x, kind="true", quantity="quad", v=v.to(device), loss="cross_entropy")
    assert_matches(out, torch.einsum("i,nij,j->n", v, F_n, v), rtol=1e-8)


def test_true_kind_ignores_labels(device):
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    a = compute_per_sample(model, x, kind="true", quantity="trace", loss="cross_entropy")
    b = compute_per_sample(model, x, y, kind="true", quantity="trace", loss="cross_entropy")
    assert_matches(a, b, rtol=1e-12)


@pytest.mark.parametrize("quantity", ["trace", "quad"])
def test_each_value_depends_only_on_its_input(quantity, device):
    """Per-sample means per sample: permuting or sub-setting the batch permutes/sub-sets the result."""
    model = make_model("cnn", device=device)
    x, y = make_data("cnn", device=device)
    kw = dict(kind="empirical", quantity=quantity, loss="cross_entropy")
    if quantity == "quad":
        kw["v"] = random_v(num_params(model), seed=8, device=device)
    full = compute_per_sample(model, x, y, **kw)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1)).to(device)
    assert_matches(compute_per_sample(model, x[perm], y[perm], **kw), full[perm], rtol=1e-10)
    assert_matches(compute_per_sample(model, x[3:4], y[3:4], **kw), full[3:4], rtol=1e-10)


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_mean_of_per_sample_traces_is_the_fisher_trace(kind, device):
    model = make_model("seq", device=device)
    x, y = make_data("seq", device=device)
    traces = compute_per_sample(model, x, y, kind=kind, quantity="trace", loss="cross_entropy")
    F = compute(model, (x, y), kind=kind, structure="diag", loss="cross_entropy")
    assert traces.mean().item() == pytest.approx(F.trace().item(), rel=1e-10)


@pytest.mark.parametrize("quantity", ["trace", "quad"])
def test_per_sample_dtype(quantity, dtype, device):
    model = make_model("mlp", dtype=dtype, device=device)
    x, y = make_data("mlp", dtype=dtype, device=device)
    v = random_v(num_params(model), seed=2)
    kw = {"v": v.to(dtype=dtype, device=device)} if quantity == "quad" else {}
    out = compute_per_sample(model, x, kind="true", quantity=quantity, loss="cross_entropy", **kw)
    assert out.dtype == dtype and out.device.type == device.type and out.shape == (len(x),)
    F_n = reference("mlp", "true")
    expected = F_n.diagonal(dim1=1, dim2=2).sum(-1) if quantity == "trace" else torch.einsum("i,nij,j->n", v, F_n, v)
    assert_close(out.cpu(), expected, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

def refuses(model, x, y, exc, argument_regex, **kwargs):
    kwargs = {"kind": "true", "quantity": "trace", "loss": "cross_entropy", **kwargs}
    with untouched(model), pytest.raises(exc, match=argument_regex) as info:
        fx.per_sample_fisher(model, x, y, **kwargs)
    return str(info.value)


@pytest.fixture
def mlp(device):
    model = make_model("mlp", device=device)
    return model, *make_data("mlp", device=device)


def test_unknown_options(mlp, device):
    model, x, y = mlp
    refuses(model, x, y, ValueError, names_argument("quantity"), quantity="diag")
    refuses(model, x, y, ValueError, names_argument("kind"), kind="fisher")
    refuses(model, x, y, ValueError, names_argument("loss"), loss="nll")


def test_bad_direction(mlp, device):
    model, x, y = mlp
    P, f64 = num_params(model), dict(dtype=torch.float64, device=device)
    refuses(model, x, y, (TypeError, ValueError), names_argument("v"), quantity="quad")    # v missing
    refuses(model, x, y, ValueError, names_argument("v"), quantity="quad", v=torch.ones(P + 1, **f64))
    refuses(model, x, y, ValueError, names_argument("v"), quantity="quad", v=torch.ones(P - 1, **f64))
    refuses(model, x, y, (TypeError, ValueError), names_argument("v"), quantity="quad",
            v=torch.ones(P, dtype=torch.long, device=device))
    with untouched(model), pytest.raises(ValueError, match=r"argument 'v' .*vectors are columns: pass v.T"):
        fx.per_sample_fisher(model, x, y, quantity="quad", v=torch.ones(2, P, **f64))


def test_old_spelling_of_the_loss(mlp, device):
    model, x, y = mlp
    with pytest.raises(TypeError, match=r"fisherext.per_sample_fisher: argument 'loss_fn' is now called 'loss'"):
        fx.per_sample_fisher(model, x, y, loss_fn="cross_entropy")


def test_bad_direction_values_and_sample_counts(mlp, device):
    """A NaN in v, a v on another device, and mc_samples that are not positive integers are refused."""
    model, x, y = mlp
    P = num_params(model)
    v = torch.ones(P, dtype=torch.float64, device=device)
    v[3] = float("nan")
    refuses(model, x, y, ValueError, names_argument("v"), quantity="quad", v=v)
    refuses(model, x, y, ValueError, names_argument("v"), quantity="quad", v=torch.ones(P, dtype=torch.float64,
                                                                                         device="meta"))
    for bad in (0, -1, 2.5, True):
        refuses(model, x, y, ValueError, names_argument("mc_samples"), kind="mc", mc_samples=bad)


def test_empirical_needs_labels(mlp, device):
    model, x, _ = mlp
    refuses(model, x, None, ValueError, names_argument("y"), kind="empirical")


def test_integer_inputs(mlp, device):
    model, x, y = mlp
    refuses(model, (x * 3).round().long(), y, (TypeError, ValueError), names_argument("x"))


def test_non_finite_logits_name_the_sample(mlp, device):
    model, x, y = mlp
    x[11] = 1.7e308 * torch.sign(model.fc1.weight[0].detach())
    assert not torch.isfinite(model(x)[11]).all()
    refuses(model, x, y, ValueError, r"(?<!\d)11(?!\d)")


def test_non_finite_parameter_is_named(mlp, device):
    model, x, y = mlp
    with torch.no_grad():
        model.fc1.bias[0] = float("nan")
    refuses(model, x, y, ValueError, r"fc1\.bias")


def test_batchnorm_in_train_mode_is_refused(device):
    model = make_model("norm", device=device).train()
    x, y = make_data("norm", device=device)
    refuses(model, x, y, ValueError, r"(?i)batch\s*norm|\beval\b")
    assert model.training


def test_fallback_model_warns(device):
    model = make_model("scaleshift", device=device)
    x, _ = make_data("scaleshift", device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with pytest.warns(UserWarning, match=SPECS["scaleshift"].fallback):
            fx.per_sample_fisher(model, x, kind="true", quantity="trace", loss="cross_entropy")


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("name", ["mlp", "cnn", "norm", "tied"])
def test_quad_along_each_inputs_predicted_class_direction(name, kind, device):
    """v="predicted": v_n = ∇log p(ŷ_n|x_n) / ‖·‖ per input (seed 001's direction), against explicit per-class
    gradients: v_nᵀF_nv_n = Σ_c p_nc (g_ncᵀv_n)² (true) or (g_nyᵀv_n)² (empirical)."""
    model = make_model(name)
    x, y = make_data(name)
    p, g = per_class_grads(model, x)                           # g[n, c] = ∇(−log p_c(x_n)), [N, C, P]
    top = p.argmax(1)
    v = -g[torch.arange(x.shape[0]), top]
    v = v / v.norm(dim=1, keepdim=True)
    dots = torch.einsum("ncp,np->nc", g, v)
    expected = (p * dots ** 2).sum(1) if kind == "true" else dots[torch.arange(x.shape[0]), y] ** 2
    got = fx.per_sample_fisher(model.to(device), x.to(device), y.to(device), kind=kind, quantity="quad",
                               v="predicted")
    assert_close(got, expected.to(device))
    assert not torch.allclose(expected, (p * (g ** 2).sum(2)).sum(1))  # not the trace: v matters


def test_quad_predicted_refuses_what_it_cannot_do():
    model = make_model("mlp")
    x, y = make_data("mlp")
    with pytest.raises(ValueError, match="argument 'v' must be one of"):
        fx.per_sample_fisher(model, x, quantity="quad", v="largest")
    reg = make_model("mlp_reg")
    xr, yr = make_data("mlp_reg")
    with pytest.raises(ValueError, match="argument 'v' 'predicted' needs a classifier's logits"):
        fx.per_sample_fisher(reg, xr, yr, loss="mse", quantity="quad", v="predicted")


# ---------------------------------------------------------------------------------------------------
# over a data set: batch by batch, in order


@pytest.mark.parametrize("quantity", ["trace", "quad", "predicted"])
def test_a_data_set_gives_each_samples_value_in_order(quantity, device):
    """Tensors with batch_size, a DataLoader and a Dataset stream in batches (7 samples in 3s: a short last
    batch) and give the per-sample autograd values of the whole set, sample by sample."""
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", n=7, device=device)
    kw = {"trace": dict(quantity="trace"), "quad": dict(quantity="quad", v=random_v(num_params(model), 3, device)),
          "predicted": dict(quantity="quad", v="predicted")}[quantity]
    expected = fx.per_sample_fisher(model, x, y, kind="empirical", **kw)  # one batch: checked against autograd above
    per_sample = torch.stack([fx.per_sample_fisher(model, x[n:n + 1], y[n:n + 1], kind="empirical", **kw)[0]
                              for n in range(7)])
    assert_close(expected, per_sample)
    dataset = torch.utils.data.TensorDataset(x, y)
    for data, extra in (((x, y), dict(batch_size=3)), ((dataset,), dict(batch_size=3)),
                        ((torch.utils.data.DataLoader(dataset, batch_size=3),), {})):
        assert_close(fx.per_sample_fisher(model, *data, kind="empirical", **kw, **extra), expected)


def test_a_data_set_of_inputs_only_gives_the_true_kind(device):
    model = make_model("mlp", device=device)
    x, _ = make_data("mlp", n=5, device=device)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=2)
    assert_close(fx.per_sample_fisher(model, loader), fx.per_sample_fisher(model, x))


def test_a_data_set_refuses_what_it_cannot_use(mlp, device):
    x, y = make_data("mlp", n=4, device=device)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    with pytest.raises(ValueError, match="argument 'y' the targets of a DataLoader"):
        fx.per_sample_fisher(mlp, loader, y)
    with pytest.raises(TypeError, match="argument 'x' expected a tensor, a DataLoader or a Dataset"):
        fx.per_sample_fisher(mlp, [x, y])
    with pytest.raises(ValueError, match="argument 'batch_size'"):
        fx.per_sample_fisher(mlp, x, y, batch_size=0)
    with pytest.raises(ValueError, match="argument 'data' no samples"):
        fx.per_sample_fisher(mlp, x[:0], y[:0], batch_size=2)


class _InfAtLargeInputs(torch.nn.Module):
    """Logits that are infinite for every input whose first feature exceeds 100."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(5, 3).double()

    def forward(self, x):
        return self.fc(x).masked_fill(x[:, :1] > 100, float("inf"))


@pytest.mark.parametrize("kw", [dict(), dict(quantity="quad", v="predicted"), dict(quantity="quad", v=torch.ones(18))])
def test_over_a_data_set_a_non_finite_output_names_its_sample_in_the_data(kw, device):
    """Sample 5 sits in the second batch of 3: the error names it as sample 5 of the data, not 2 of its batch."""
    model = _InfAtLargeInputs().to(device)
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    x[5, 0] = 1000.0
    kw = {k: (t.double().to(device) if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
    with pytest.raises(ValueError, match="argument 'model' the output for sample 5 is not finite"):
        fx.per_sample_fisher(model, x, batch_size=3, **kw)
