"""Likelihoods (fisherext._core.likelihood): the class axis of outputs with positions; for every likelihood
the square root of Λ, Λ·u, the residual and the sampled labels against torch.autograd.functional.hessian
and autograd gradients of a per-sample negative log-likelihood written out here; the cotangents of each
Fisher kind, whatever the chunking; the constructor from names and torch losses; and every entry point
giving the same result for a name, its torch function and its torch module."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherext as fx
from fisherext._core.likelihood import Cotangents, as_likelihood, class_axis
from support import assert_close, to_device

D64 = torch.float64


def test_class_axis(device):
    def zeros(*shape, dtype=None):
        return torch.zeros(*shape, dtype=dtype, device=device)
    assert class_axis(zeros(4, 3), None, None) == 1
    assert class_axis(zeros(4, 5, 3), zeros(4, 5, dtype=torch.long), None) == 2     # [N, T, C]
    assert class_axis(zeros(4, 3, 6, 7), zeros(4, 6, 7, dtype=torch.long), None) == 1  # [N, C, H, W]
    assert class_axis(zeros(4, 5, 3), None, -1) == 2
    with pytest.raises(ValueError, match="class_dim"):
        class_axis(zeros(4, 5, 3), None, None)              # no labels: ambiguous
    with pytest.raises(ValueError, match="class_dim"):
        class_axis(zeros(4, 3, 3), zeros(4, 3, dtype=torch.long), None)   # both fit
    with pytest.raises(ValueError, match="labels"):
        class_axis(zeros(4, 5, 3), zeros(4, 2, dtype=torch.long), None)
    with pytest.raises(ValueError, match="class_dim"):
        class_axis(zeros(4, 5, 3), None, 0)                 # the batch axis is no class axis


# ---- every likelihood against autograd of its negative log-likelihood ------------------------------------

def sample_nll(name, z, y, axis=1, ignore=-100):
    """−log p(y | z) of one sample's outputs z (no batch axis), written out: the sum over positions
    (cross-entropy, ignored positions left out) or entries (Gaussian, Bernoulli)."""
    if name == "cross_entropy":
        logp = torch.log_softmax(z, axis - 1)
        picked = logp.gather(axis - 1, y.clamp_min(0).unsqueeze(axis - 1)).squeeze(axis - 1)
        return -(picked * (y != ignore)).sum()
    if name == "mse":
        return 0.5 * ((z - y) ** 2).sum()
    return -(y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)).sum()


CASES = {  # id: (likelihood name, output shape, class axis)
    "ce-[N,C]": ("cross_entropy", (3, 4), 1),
    "ce-[N,T,C]": ("cross_entropy", (3, 5, 4), 2),
    "ce-[N,C,H,W]": ("cross_entropy", (3, 4, 2, 3), 1),
    "mse": ("mse", (3, 2, 2), None),
    "bce": ("bce", (3, 5), None),
}


def case(id):
    name, shape, axis = CASES[id]
    g = torch.Generator().manual_seed(0)
    out = torch.randn(*shape, generator=g, dtype=D64)
    if name == "cross_entropy":
        y = torch.randint(0, shape[axis], shape[:axis] + shape[axis + 1:], generator=g)
        if len(shape) > 2:
            y.view(-1)[1] = -100
    else:
        y = torch.rand(*shape, generator=g, dtype=D64)
        y = (y > 0.5).to(D64) if name == "bce" else 3 * y - 1
    return name, out, y, axis


def reference_lambda(name, out, y, axis):
    """Λ_n = ∇²_z ℓ_n by torch.autograd.functional.hessian, [N, E, E] over the flattened outputs."""
    E = out[0].numel()
    return torch.stack([torch.autograd.functional.hessian(lambda z: sample_nll(name, z, y[n], axis), out[n])
                        .reshape(E, E) for n in range(out.shape[0])])


def reference_residual(name, out, y, axis):
    """∇_z ℓ_n at the labels y, [N, *out.shape[1:]]."""
    z = out.detach().requires_grad_()
    return torch.autograd.grad(sum(sample_nll(name, z[n], y[n], axis) for n in range(out.shape[0])), z)[0]


@pytest.mark.parametrize("id", list(CASES))
def test_square_root_times_its_transpose_is_lambda(id, device):
    name, out, y, axis = case(id)
    bound = as_likelihood(name).at(*to_device((out, y), device))
    S = torch.cat([bound.sqrt_columns(k0, min(bound.num_columns, k0 + 3))
                   for k0 in range(0, bound.num_columns, 3)])                   # chunks of 3
    S = S.flatten(2)                                                            # [K, N, E]
    assert_close(torch.einsum("kne,knf->nef", S, S), reference_lambda(name, out, y, axis))


@pytest.mark.parametrize("id", list(CASES))
def test_hessian_product_is_lambda_times_u(id, device):
    name, out, y, axis = case(id)
    U = torch.randn(2, *out.shape, generator=torch.Generator().manual_seed(1), dtype=D64)
    got = as_likelihood(name).at(*to_device((out, y), device)).hessian_product(U.to(device)).flatten(2)
    assert_close(got, torch.einsum("nef,knf->kne", reference_lambda(name, out, y, axis), U.flatten(2)))


@pytest.mark.parametrize("id", list(CASES))
def test_residual_at_the_data_label_is_the_nll_gradient(id, device):
    name, out, y, axis = case(id)
    cot = Cotangents(as_likelihood(name), *to_device((out, y), device), "empirical")
    assert cot.K == 1
    assert_close(cot.chunk(0, 1)[0], reference_residual(name, out, y, axis))


@pytest.mark.parametrize("id", ["ce-[N,C]", "mse", "bce"])
def test_sampled_labels_follow_the_model(id, device):
    """The MC cotangents are NLL gradients at labels drawn from p(y|z): their mean over M draws is 0
    (the expected score), within 5 standard errors; the same generator seed draws the same labels."""
    name, out, y, axis = case(id)
    out, y = to_device((out, y), device)
    gen = lambda: torch.Generator(device=device).manual_seed(2)  # noqa: E731
    lik = as_likelihood(name)
    M = 4000
    c = Cotangents(lik, out, y, "mc", mc_samples=M, generator=gen()).all()
    assert torch.allclose(Cotangents(lik, out, y, "mc", mc_samples=4, generator=gen()).weights,
                          torch.full((4,), 0.25, dtype=D64, device=device))
    se = c.std(0) / M ** 0.5
    assert (c.mean(0).abs() <= 5 * se + 1e-12).all()
    again = Cotangents(lik, out, y, "mc", mc_samples=M, generator=gen()).all()
    assert torch.equal(c, again)
    if name == "cross_entropy":  # each draw is p − e_c for a class c
        residual = torch.softmax(out, -1)[None] - c
        assert torch.all((residual.round(decimals=12) == 0) | (residual.round(decimals=12) == 1))
    if name == "bce":  # each draw is σ(z) − y with y ∈ {0, 1}
        labels = torch.sigmoid(out)[None] - c
        assert torch.all((labels.round(decimals=12) == 0) | (labels.round(decimals=12) == 1))


def test_mc_cross_entropy_leaves_ignored_positions_out(device):
    out = torch.randn(3, 5, 4, dtype=D64)
    y = torch.randint(0, 4, (3, 5))
    y[0, 0] = -100
    mc = Cotangents(as_likelihood("cross_entropy"), *to_device((out, y), device), "mc", mc_samples=3,
                    generator=torch.Generator(device=device).manual_seed(0))
    assert torch.equal(mc.all()[:, 0, 0], torch.zeros(3, 4, dtype=D64, device=device))
    assert mc.all()[:, 0, 1].abs().sum() > 0


def test_empirical_needs_labels_of_the_right_shape(device):
    out = torch.randn(3, 5, 4, dtype=D64).to(device)
    with pytest.raises(ValueError, match="labels"):
        Cotangents(as_likelihood("cross_entropy", class_dim=-1), out, None, "empirical")
    with pytest.raises(ValueError, match="labels"):
        Cotangents(as_likelihood("cross_entropy"), out, torch.full((3, 5), 7, device=device), "empirical")
    with pytest.raises(ValueError, match="targets y of shape"):
        Cotangents(as_likelihood("mse"), out, torch.zeros(3, 5, device=device), "empirical")


# ---- the constructor ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss,name", [
    ("cross_entropy", "cross_entropy"), (F.cross_entropy, "cross_entropy"), (nn.CrossEntropyLoss(), "cross_entropy"),
    (nn.CrossEntropyLoss(reduction="sum"), "cross_entropy"), ("mse", "mse"), (F.mse_loss, "mse"),
    (nn.MSELoss(), "mse"), ("bce", "bce"), (F.binary_cross_entropy_with_logits, "bce"), (nn.BCEWithLogitsLoss(), "bce"),
])
def test_likelihood_of_names_functions_and_modules(loss, name):  # CPU only: no tensors, a name lookup
    assert as_likelihood(loss).name == name


def test_ignore_index_of_a_module_and_conflicts():  # CPU only: no tensors, argument checks
    assert as_likelihood(nn.CrossEntropyLoss(ignore_index=3)).ignore_index == 3
    assert as_likelihood(F.cross_entropy).ignore_index == -100
    assert as_likelihood("cross_entropy", ignore_index=5).ignore_index == 5
    with pytest.raises(ValueError, match="ignore_index: 5 differs"):
        as_likelihood(nn.CrossEntropyLoss(ignore_index=3), ignore_index=5)
    with pytest.raises(ValueError, match="ignore_index: applies to loss='cross_entropy' only"):
        as_likelihood("mse", ignore_index=0)


@pytest.mark.parametrize("loss,what", [
    (nn.CrossEntropyLoss(label_smoothing=0.1), r"CrossEntropyLoss\(label_smoothing=\.\.\.\) is not the likelihood"),
    (nn.CrossEntropyLoss(weight=torch.ones(3)), r"CrossEntropyLoss\(weight=\.\.\.\) is not the likelihood"),
    (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), r"BCEWithLogitsLoss\(pos_weight=\.\.\.\)"),
    (F.nll_loss, "a Fisher needs a likelihood"),
    (nn.L1Loss(), "a Fisher needs a likelihood"),
    (lambda z, y: z.sum(), "a Fisher needs a likelihood"),
])
def test_torch_losses_that_are_no_likelihood_are_refused_for_a_fisher(loss, what):
    # CPU only: the parametrize table holds CPU tensors (weight, pos_weight)
    model = nn.Linear(2, 3).double().eval()
    x, y = torch.randn(4, 2, dtype=D64), torch.tensor([0, 1, 2, 0])
    for call in (lambda: fx.fisher(model, (x, y), loss=loss), lambda: fx.per_sample_fisher(model, x, y, loss=loss),
                 lambda: fx.FisherOperator(model, loss, (x, y))):
        with pytest.raises(ValueError, match=r"argument 'loss' " + what):
            call()
    with pytest.raises(ValueError, match=r"argument 'loss' must be one of 'cross_entropy', 'mse', 'bce'"):
        fx.fisher(model, (x, y), loss="nll")
    with pytest.raises(TypeError, match=r"argument 'loss' expected a likelihood's name or a torch loss"):
        fx.hvp(model, 3, (x, y), torch.ones(9, dtype=D64))


# ---- one result whatever form the loss is given in ------------------------------------------------------------

FORMS = {  # likelihood: (name, function, module)
    "cross_entropy": ("cross_entropy", F.cross_entropy, nn.CrossEntropyLoss()),
    "mse": ("mse", F.mse_loss, nn.MSELoss()),
    "bce": ("bce", F.binary_cross_entropy_with_logits, nn.BCEWithLogitsLoss()),
}


def forms_problem(name, device):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double().eval().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=g, dtype=D64)
    y = (torch.randint(0, 4, (7,), generator=g) if name == "cross_entropy"
         else (torch.rand(7, 4, generator=g, dtype=D64) > 0.5).to(D64) if name == "bce"
         else torch.randn(7, 4, generator=g, dtype=D64))
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, generator=g, dtype=D64)
    return model, to_device((x, y), device), V.to(device)


@pytest.mark.parametrize("name", list(FORMS))
def test_every_form_of_a_loss_gives_the_same_result(name, device):
    """fisher, per_sample_fisher, FisherOperator: the same likelihood from all three forms (bitwise);
    hvp, the Hessian and GGN operators and influence: a name is its torch loss with reduction='mean'
    (the fused output-space kernel or the likelihood's own Λ·u against double backprop of the torch
    loss: equal to rounding)."""
    model, (x, y), V = forms_problem(name, device)
    gen = lambda: torch.Generator(device=device).manual_seed(3)  # noqa: E731
    results = []
    for loss in FORMS[name]:
        results.append({
            "fisher": fx.fisher(model, (x, y), loss=loss, structure="full", kind="empirical").dense(),
            "fisher-mc": fx.fisher(model, (x, y), loss=loss, kind="mc", mc_samples=2, generator=gen()).diag(),
            "trace": fx.per_sample_fisher(model, x, y, loss=loss),
            "quad": fx.per_sample_fisher(model, x, y, loss=loss, quantity="quad", v=V),
            "FisherOperator": fx.FisherOperator(model, loss, (x, y), kind="mc", generator=gen()) @ V,
            "hvp": fx.hvp(model, loss, (x, y), V),
            "hvp-ggn": fx.hvp(model, loss, (x, y), V, curvature="ggn"),
            "HessianOperator": fx.HessianOperator(model, loss, (x, y)) @ V,
            "GGNOperator": fx.GGNOperator(model, loss, (x, y), batch_size=3) @ V,
            "influence": fx.InfluenceFunctions(model, loss, (x, y), damping=1.0).influence((x[:2], y[:2])),
        })
    for other in results[1:]:
        for key, value in results[0].items():
            if key in ("fisher", "fisher-mc", "trace", "quad", "FisherOperator"):
                assert torch.equal(other[key], value), key
            else:
                assert_close(other[key], value)
