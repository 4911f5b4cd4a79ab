"""The curvature operators (fisherext.HessianOperator, GGNOperator, FisherOperator) as linear operators:
dense forms, parameter subsets, columns, scipy, the Fisher against fisherext.fisher, the MC Fisher's
generator, the old spellings of the arguments, and the solvers and spectral methods run on them, against
explicit matrices (tests/support/curvature.py), float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherext
from support import assert_close
from support.curvature import MODELS, directions, explicit_ggn, explicit_hessian, setup
from fisherext import FisherOperator, GGNOperator, HessianOperator
from support.models import flat_indices, num_params


def test_ggn_differs_from_hessian_and_is_psd(device):
    """The test models are not at a minimum: H is indefinite, G is not; the two differ."""
    model, data, loss_fn = setup("mlp", device=device)
    H = explicit_hessian(model, loss_fn, *data)
    G = GGNOperator(model, loss_fn, data).dense()
    assert torch.linalg.eigvalsh(H).min() < -1e-6
    assert torch.linalg.eigvalsh(G).min() > -1e-10
    assert (G - H).abs().max() > 1e-3 * H.abs().max()


def test_params_subset_is_the_submatrix(device):
    model, data, loss_fn = setup("mlp", device=device)
    H = explicit_hessian(model, loss_fn, *data)
    names = ["fc2.weight", "fc2.bias"]
    idx = flat_indices(model, names).to(device)
    A = HessianOperator(model, loss_fn, data, params=names)
    assert A.shape == (idx.numel(), idx.numel())
    assert_close(A.dense(), H[idx][:, idx])


def test_operator_columns_and_vectors(device):
    """A @ X with X [P, K] (one pass over the data) equals K separate A @ v, and hvp's columns."""
    model, data, loss_fn = setup("cnn", device=device)
    A = HessianOperator(model, loss_fn, data, batch_size=4)
    X = directions(A.shape[0], K=4, device=device).T
    cols = A @ X
    for k in range(4):
        assert_close(cols[:, k], A @ X[:, k].contiguous())
    assert_close(cols, fisherext.hvp(model, loss_fn, data, X))


def test_operator_follows_the_model(device):
    """Parameters are read at each product, not captured at construction."""
    model, data, loss_fn = setup("mlp", device=device)
    A = HessianOperator(model, loss_fn, data)
    v = directions(A.shape[0], K=1, device=device)[0]
    before = A @ v
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    after = A @ v
    assert (after - before).abs().max() > 1e-3 * before.abs().max()
    assert_close(after, explicit_hessian(model, loss_fn, *data) @ v)


def test_to_scipy_extreme_eigenvalues_match():  # CPU only: scipy works on host (numpy) arrays
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    model, data, loss_fn = setup("mlp")
    H = explicit_hessian(model, loss_fn, *data)
    top = scipy_linalg.eigsh(HessianOperator(model, loss_fn, data).to_scipy(), k=1, which="LA",
                             return_eigenvectors=False)
    assert top[0] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-8)


@pytest.mark.parametrize("kind", ["true", "empirical", "mc"])
@pytest.mark.parametrize("name", ["mlp", "mlp_reg", "cnn"])
def test_fisher_operator_equals_full_fisher(name, kind, device):
    """A @ v equals fisher(structure="full") (tested against per-sample loops in test_capture_api.py): same
    kinds, normalization and MC labels (the same seeded generator, on the model's device)."""
    model, data, _ = setup(name, device=device)
    loss = MODELS[name]
    gen = torch.Generator(device=device).manual_seed(5)
    dense = fisherext.fisher(model, data, kind=kind, structure="full", loss=loss, mc_samples=3, generator=gen).dense()
    A = FisherOperator(model, loss, data, kind=kind, mc_samples=3,
                       generator=torch.Generator(device=device).manual_seed(5))
    V = directions(A.shape[0], device=device).T
    assert_close(A @ V, dense @ V)


def test_true_fisher_is_the_ggn_for_cross_entropy(device):
    model, data, _ = setup("mlp", device=device)
    V = directions(num_params(model), device=device).T
    assert_close(FisherOperator(model, nn.CrossEntropyLoss(), data) @ V, GGNOperator(model, F.cross_entropy, data) @ V)


@pytest.mark.parametrize("given", [True, False], ids=["generator", "None"])
def test_mc_fisher_operator_is_one_fixed_matrix(given, device):
    """The generator's state at construction is replayed at every product: A v is reproducible, A is
    symmetric and linear (one product with [P, K] equals K products), whatever the generator (or torch's
    global one, for None) does in between; another state gives another matrix."""
    model, data, _ = setup("mlp", device=device)
    generator = torch.Generator(device=device).manual_seed(3) if given else None
    A = FisherOperator(model, "cross_entropy", data, kind="mc", generator=generator)
    if given:
        generator.manual_seed(11)  # moving the caller's generator afterwards changes nothing
    torch.manual_seed(12)
    D = A.dense()
    v = D[:, 0].contiguous()
    assert torch.equal(A @ v, A @ v)
    assert_close(D, D.T)
    X = directions(A.shape[0], K=2, device=device).T
    assert_close(A @ X, D @ X)
    other = FisherOperator(model, "cross_entropy", data, kind="mc",
                           generator=torch.Generator(device=device).manual_seed(4))
    assert (other @ v - A @ v).abs().max() > 1e-6 * (A @ v).abs().max()


def test_mc_fisher_operator_refuses_a_non_generator(device):
    model, data, _ = setup("mlp", device=device)
    with pytest.raises(TypeError, match=r"argument 'generator' expected a torch.Generator or None, got int"):
        FisherOperator(model, "cross_entropy", data, kind="mc", generator=3)


@pytest.mark.parametrize("operator", ["HessianOperator", "GGNOperator", "FisherOperator"])
def test_old_spellings_name_the_new_ones(operator, device):
    model, data, loss_fn = setup("mlp", device=device)
    cls = getattr(fisherext, operator)
    with pytest.raises(TypeError, match=rf"fisherext.{operator}: argument 'loss_fn' is now called 'loss'"):
        cls(model, data=data, loss_fn=loss_fn)
    if operator == "FisherOperator":
        with pytest.raises(TypeError, match=r"fisherext.FisherOperator: argument 'seed' is now called 'generator'"):
            cls(model, "cross_entropy", data, kind="mc", seed=3)


@pytest.mark.parametrize("loss", ["cross_entropy", F.cross_entropy, nn.CrossEntropyLoss()], ids=["name", "F", "module"])
def test_hessian_operator_takes_every_form_of_the_loss(loss, device):
    model, data, loss_fn = setup("mlp", device=device)
    X = directions(num_params(model), K=2, device=device).T
    assert_close(HessianOperator(model, loss, data) @ X, explicit_hessian(model, loss_fn, *data) @ X)
    assert_close(GGNOperator(model, loss, data) @ X, explicit_ggn(model, "cross_entropy", *data) @ X)


# ---- solvers and spectral methods on the operators ----------------------------------------------------


def test_lanczos_finds_the_hessians_negative_and_top_eigenvalues(device):
    """The test MLP is not at a minimum: its Hessian has negative eigenvalues, found from products alone."""
    model, data, loss_fn = setup("mlp", device=device)
    exact = torch.linalg.eigvalsh(explicit_hessian(model, loss_fn, *data))
    assert exact[0] < -1e-6
    A = HessianOperator(model, loss_fn, data)
    low, _ = fisherext.spectral.lanczos(A, 2, which="smallest", m=A.shape[0])
    high, _ = fisherext.spectral.power_iteration(A, k=1, maxiter=500, tol=1e-10)
    assert_close(low.sort().values, exact[:2])
    assert high[0].item() == pytest.approx(exact.abs().max().item() * exact[exact.abs().argmax()].sign().item(),
                                           rel=1e-6)


def test_cg_on_the_damped_ggn_with_a_fisher_diagonal_preconditioner(device):
    """(G + λI) x = b by CG, preconditioned by fisher(structure="diag"): the dense solve's answer."""
    model, data, loss_fn = setup("cnn", device=device)
    A = GGNOperator(model, loss_fn, data)
    b = directions(A.shape[0], K=2, device=device).T.contiguous()
    damping = 1e-2
    eye = torch.eye(A.shape[0], dtype=b.dtype, device=device)
    expected = torch.linalg.solve(explicit_ggn(model, "cross_entropy", *data) + damping * eye, b)
    diag = fisherext.fisher(model, data, structure="diag").diag()
    x, info = fisherext.solvers.cg(A, b, damping=damping, tol=1e-10, preconditioner=diag, return_info=True)
    assert bool(info["converged"].all())
    assert_close(x, expected)


def test_hutchinson_trace_of_the_fisher_operator(device):
    """Within four standard errors of the exact trace (the diagonal from fisher()); the probes come from a
    CPU generator, the same on every device."""
    model, data, _ = setup("mlp", device=device)
    A = FisherOperator(model, "cross_entropy", data)
    exact = fisherext.fisher(model, data, structure="diag").diag().sum().item()
    est, err = fisherext.spectral.hutchinson_trace(A, 400, generator=torch.Generator().manual_seed(0),
                                                   return_std=True)
    assert abs(float(est) - exact) < 4 * float(err)
    assert float(err) < 0.2 * exact


# ---- the Fisher of outputs with positions -------------------------------------------------------------


class _Positions(nn.Module):
    """x [N, T, 3] -> logits [N, T, 4] (class axis last) or [N, 4, T] (class axis 1)."""

    def __init__(self, class_axis):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 5), nn.Linear(5, 4)
        self.class_axis = class_axis

    def forward(self, x):
        out = self.fc2(torch.tanh(self.fc1(x)))
        return out if self.class_axis == -1 else out.transpose(1, 2)


@pytest.mark.parametrize("class_axis", [-1, 1])
@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_fisher_operator_sums_over_the_positions_that_count(kind, class_axis, device):
    """F = (1/N) Σ_n Σ_t J_ntᵀ Λ_nt J_nt (true) or (1/N) Σ_n g_n g_nᵀ with g_n the gradient of the summed
    per-position cross-entropy (empirical), positions labelled ignore_index left out, as in fisher();
    references by a backward per sample, position and class, on the CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        model = _Positions(class_axis).double().eval()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (4, 3), generator=g)
    y[0, 1] = y[2, 0] = 7  # ignored positions
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    F_ref = torch.zeros(P, P, dtype=torch.float64)
    for n in range(4):
        logits = model(x[n:n + 1]).movedim(1, -1)[0] if class_axis == 1 else model(x[n:n + 1])[0]  # [T, C]
        logp = torch.log_softmax(logits, -1)
        valid = [t for t in range(3) if y[n, t] != 7]
        if kind == "true":
            for t in valid:
                p = logp[t].detach().exp()
                for c in range(4):
                    gc = torch.cat([a.reshape(-1) for a in torch.autograd.grad(-logp[t, c], params, retain_graph=True)])
                    F_ref += p[c] * torch.outer(gc, gc)
        else:
            loss = -sum(logp[t, y[n, t]] for t in valid)
            gn = torch.cat([a.reshape(-1) for a in torch.autograd.grad(loss, params)])
            F_ref += torch.outer(gn, gn)
    F_ref /= 4
    V = directions(P, device=device).T
    A = FisherOperator(model.to(device), nn.CrossEntropyLoss(ignore_index=7), (x.to(device), y.to(device)),
                       kind=kind, batch_size=3)
    assert_close(A @ V, F_ref @ V.cpu())
    assert_close(A @ V[:, 0].contiguous(), F_ref @ V[:, 0].cpu())  # one vector: a dual forward
