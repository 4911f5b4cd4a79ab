"""fisherext.optim.learning_rate against explicit Hessians (torch.func.hessian of the mean loss, eigvalsh),
gradient descent's stability limit 2/λ_max on a quadratic, and compare_optimizers against hand-written
training loops; bad inputs."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

import fisherext as fx
from fisherext.optim import compare_optimizers, curvature_learning_rate, max_eigenvalue
from support import assert_close


def regression(n=30, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    y = x @ torch.randn(d, 1, generator=g, dtype=torch.float64) + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    return nn.Linear(d, 1).double(), (x, y)


def explicit_hessian(model, loss, x, y):
    """The Hessian of the mean loss over (x, y) by torch.func.hessian over the flat parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def mean_loss(flat):
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return loss(functional_call(model, params, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return hessian(mean_loss)(theta)


class Quadratic(nn.Module):
    """Per-sample output ½ θᵀMθ (the same for every input): the mean loss `out.mean()` has Hessian M."""

    def __init__(self, M, theta):
        super().__init__()
        self.register_buffer("M", M)
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x):
        return 0.5 * self.theta @ self.M @ self.theta + 0.0 * x[:, 0]


def mean_output(out, y):
    return out.mean()


def quadratic(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = len(eigenvalues)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    M = Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T
    model = Quadratic(0.5 * (M + M.T), torch.randn(d, generator=g, dtype=torch.float64))
    x = torch.zeros(4, 1, dtype=torch.float64)
    return model, (x, torch.zeros(4, dtype=torch.float64))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def classification(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


EXACT_LANCZOS = dict(method="lanczos", m=200)          # m >= P: the Krylov space is the whole space
TIGHT_POWER = dict(method="power", tol=1e-12, maxiter=5000)


# ---- λ_max --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [EXACT_LANCZOS, TIGHT_POWER], ids=["lanczos", "power"])
def test_max_eigenvalue_of_linear_regression(options):
    model, (x, y) = regression()
    expected = torch.linalg.eigvalsh(explicit_hessian(model, F.mse_loss, x, y))[-1]
    got = max_eigenvalue(model, "mse", (x, y), generator=torch.Generator().manual_seed(0), **options)
    assert got.dim() == 0 and got.dtype == torch.float64
    assert_close(got, expected)
    # for a linear model the Gauss-Newton matrix is the Hessian
    assert_close(max_eigenvalue(model, F.mse_loss, (x, y), curvature="ggn", **options), expected)


@pytest.mark.parametrize("options", [EXACT_LANCZOS, TIGHT_POWER], ids=["lanczos", "power"])
def test_max_eigenvalue_is_the_largest_not_the_largest_in_magnitude(options):
    # the dominant eigenvalue is -5: power iteration must shift to find λ_max = 2
    model, data = quadratic([-5.0, -1.0, 0.5, 2.0])
    H = explicit_hessian(model, mean_output, *data)
    assert_close(torch.linalg.eigvalsh(H)[-1], torch.tensor(2.0, dtype=torch.float64))
    got = max_eigenvalue(model, mean_output, data, generator=torch.Generator().manual_seed(1), **options)
    assert_close(got, torch.linalg.eigvalsh(H)[-1])


@pytest.mark.parametrize("options", [EXACT_LANCZOS, TIGHT_POWER], ids=["lanczos", "power"])
def test_max_eigenvalue_of_an_mlp_hessian(options):
    model, (x, y) = mlp(), classification()
    H = explicit_hessian(model, F.cross_entropy, x, y)
    got = max_eigenvalue(model, "cross_entropy", (x, y), batch_size=7, generator=torch.Generator().manual_seed(0),
                         **options)
    assert_close(got, torch.linalg.eigvalsh(H)[-1], rtol=1e-8)


def test_max_eigenvalue_of_a_parameter_subset():
    model, (x, y) = mlp(), classification()
    H = explicit_hessian(model, F.cross_entropy, x, y)
    head = slice(4 * 6 + 6, None)                        # the last layer's weight and bias
    got = max_eigenvalue(model, "cross_entropy", (x, y), params=[model[2]], **EXACT_LANCZOS)
    assert_close(got, torch.linalg.eigvalsh(H[head, head])[-1])


def test_curvature_learning_rate_is_scale_over_lambda_max():
    model, (x, y) = regression()
    lam = torch.linalg.eigvalsh(explicit_hessian(model, F.mse_loss, x, y))[-1].item()
    lr = curvature_learning_rate(model, "mse", (x, y), m=200)
    assert isinstance(lr, float)
    assert abs(lr - 1.0 / lam) <= 1e-10 / lam
    assert abs(curvature_learning_rate(model, "mse", (x, y), m=200, scale=1.9) - 1.9 / lam) <= 1e-10 / lam


def test_learning_rate_needs_positive_curvature():
    model, data = quadratic([-3.0, -1.0])
    with pytest.raises(ValueError, match=r"^fisherext\.optim\.curvature_learning_rate: argument 'curvature'"):
        curvature_learning_rate(model, mean_output, data)


# ---- gradient descent's stability limit ---------------------------------------------------------------------


def gd_losses(model, data, lr, steps):
    return compare_optimizers(model, "mse", data, optimizers=("gd",), lr=lr, steps=steps, batch_size=None).losses["gd"]


def test_gd_converges_below_two_over_lambda_max_and_diverges_above():
    model, (x, y) = regression()
    eta = curvature_learning_rate(model, "mse", (x, y), m=200)
    X = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    w = torch.linalg.lstsq(X, y).solution
    best = F.mse_loss(X @ w, y).item()
    for s in (1.0, 1.9):
        losses = gd_losses(model, (x, y), s * eta, 300)
        assert losses[-1] - best < 1e-8 * losses[0], (s, losses[-1], best)
    losses = gd_losses(model, (x, y), 2.1 * eta, 300)
    assert losses[-1] > 1e6 * losses[0]
    assert all(b > a for a, b in zip(losses[-50:], losses[-49:]))   # growing, step after step


def test_gd_at_one_over_lambda_max_removes_the_top_direction_in_one_step():
    model, data = quadratic([0.5, 1.0, 4.0])
    eta = curvature_learning_rate(model, mean_output, data, m=10)
    assert abs(eta - 0.25) < 1e-12
    H = explicit_hessian(model, mean_output, *data)
    top = torch.linalg.eigh(H).eigenvectors[:, -1]
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    mean_output(model(data[0]), data[1]).backward()
    opt.step()
    assert abs(top @ model.theta.detach()) < 1e-12


# ---- compare_optimizers -------------------------------------------------------------------------------------


OPTS = ("gd", "sgd", "momentum", "adam", "natural")


def run(generator_seed=0, **kw):
    kw.setdefault("optimizers", OPTS)
    kw.setdefault("steps", 6)
    kw.setdefault("batch_size", 8)
    return compare_optimizers(mlp, "cross_entropy", classification(), generator=torch.Generator().manual_seed(generator_seed), **kw)


def test_curves_have_the_right_length_and_start_at_the_initial_loss():
    x, y = classification()
    initial = F.cross_entropy(mlp()(x), y).item()
    test = classification(10, seed=5)
    res = run(test_data=test)
    assert set(res.losses) == set(OPTS) == set(res.accuracy) == set(res.test_losses) == set(res.test_accuracy)
    for name in OPTS:
        assert len(res.losses[name]) == len(res.test_losses[name]) == 7
        assert abs(res.losses[name][0] - initial) < 1e-12
        assert 0.0 <= res.accuracy[name] <= 1.0
    lam = max_eigenvalue(mlp(), "cross_entropy", (x, y), m=200).item()
    assert abs(res.lambda_max - lam) < 1e-8 * lam
    assert all(abs(v - 1.0 / res.lambda_max) < 1e-15 for v in res.lr.values())


def test_is_deterministic_for_a_generator():
    a, b = run(3), run(3)
    assert a == b
    assert run(4).losses["sgd"] != a.losses["sgd"]


def test_never_changes_the_model_passed_in():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    res = compare_optimizers(model, "cross_entropy", classification(), optimizers=("gd", "adam"), lr=0.5, steps=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert res.lambda_max is None and res.lr == {"gd": 0.5, "adam": 0.5}


def test_gd_and_sgd_curves_equal_hand_written_loops():
    x, y = classification()
    lr, steps, bs = 0.7, 7, 10
    res = compare_optimizers(mlp, "cross_entropy", (x, y), optimizers=("gd", "momentum"), lr=lr, steps=steps,
                             batch_size=bs, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    # minibatches: consecutive slices of a fresh permutation per pass, a short tail dropped (24 = 2·10 + 4)
    order = []
    while len(order) < steps:
        perm = torch.randperm(x.shape[0], generator=g)
        order += [perm[s:s + bs] for s in range(0, x.shape[0] - bs + 1, bs)]
    for name, batches, opt_kw in (("gd", [None] * steps, {}), ("momentum", order[:steps], {"momentum": 0.9})):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=lr, **opt_kw)
        curve = [F.cross_entropy(model(x), y).item()]
        for idx in batches:
            xb, yb = (x, y) if idx is None else (x[idx], y[idx])
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            with torch.no_grad():
                curve.append(F.cross_entropy(model(x), y).item())
        assert res.losses[name] == pytest.approx(curve, rel=1e-12, abs=0), name


def test_per_optimizer_rates_kwargs_and_custom_factories():
    x, y = classification()
    factory = ("sgd-nesterov", lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5, nesterov=True))
    res = run(optimizers=("sgd", "adam", "natural", factory), lr={"sgd": "curvature", "adam": 1e-2, "natural": 0.2,
                                                                 "sgd-nesterov": 0.3},
              optimizer_kwargs={"natural": {"damping": 0.1}})
    assert res.lr["adam"] == 1e-2 and res.lr["sgd-nesterov"] == 0.3
    assert abs(res.lr["sgd"] - 1.0 / res.lambda_max) < 1e-15
    assert len(res.losses["sgd-nesterov"]) == 7
    # with the whole data as the batch, sgd is gd
    full = run(optimizers=("gd", "sgd"), lr=0.5, batch_size=None)
    assert full.losses["gd"] == full.losses["sgd"]


class GradientCheckingSGD(torch.optim.Optimizer):
    """Plain SGD defined outside torch.optim: records whether the gradient was there when step began (as a
    SAM-like optimizer needs), then calls the closure once more and steps with its gradient."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})
        self.had_grad = []

    @torch.no_grad()
    def step(self, closure):
        self.had_grad.append(all(p.grad is not None for g in self.param_groups for p in g["params"]))
        with torch.enable_grad():
            closure()
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])


def test_a_custom_optimizer_gets_the_gradient_first_and_a_closure():
    x, y = classification()
    made = []

    def factory(model, lr):
        made.append(GradientCheckingSGD(model.parameters(), lr))
        return made[-1]

    res = compare_optimizers(mlp, "cross_entropy", (x, y), optimizers=(("custom", factory), "sgd"), lr=0.4,
                             steps=5, batch_size=9, generator=torch.Generator().manual_seed(0))
    assert made[0].had_grad == [True] * 5
    assert res.losses["custom"] == pytest.approx(res.losses["sgd"], rel=1e-12, abs=0)


def test_curves_are_evaluated_in_eval_mode_and_training_keeps_the_mode():
    x, y = classification()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).double().train()
    copies = []

    def factory(net, lr):
        copies.append(net)
        return torch.optim.SGD(net.parameters(), lr=lr)

    res = compare_optimizers(model, "cross_entropy", (x, y), optimizers=(("sgd", factory),), lr=0.1, steps=2)
    with torch.no_grad():
        assert abs(res.losses["sgd"][0] - F.cross_entropy(model.eval()(x), y).item()) < 1e-12
    assert copies[0].training


def test_regression_has_no_accuracy():
    model, data = regression()
    res = compare_optimizers(model, "mse", data, optimizers=("gd",), lr=0.01, steps=2)
    assert res.accuracy == {} and res.test_accuracy == {} and len(res.losses["gd"]) == 3


# ---- bad inputs ---------------------------------------------------------------------------------------------


def test_max_eigenvalue_bad_inputs_are_named():
    model, data = regression()
    name = r"^fisherext\.optim\.max_eigenvalue: argument "
    for kw, arg in ((dict(method="qr"), "method"), (dict(curvature="fisher"), "curvature"),
                    (dict(method="power", m=5), "m"), (dict(m=0), "m"), (dict(maxiter=0), "maxiter"),
                    (dict(tol=-1.0), "tol"), (dict(batch_size=0), "batch_size")):
        with pytest.raises(ValueError, match=name + f"'{arg}'"):
            max_eigenvalue(model, "mse", data, **kw)
    with pytest.raises(ValueError, match=name + "'loss'"):
        max_eigenvalue(model, "hinge", data)
    with pytest.raises(ValueError, match=r"^fisherext\.optim\.curvature_learning_rate: argument 'scale'"):
        curvature_learning_rate(model, "mse", data, scale=0.0)


@pytest.mark.parametrize("kw,arg", [
    (dict(optimizers=("sgd", "lbfgs")), "optimizers"), (dict(optimizers=("sgd", "sgd")), "optimizers"),
    (dict(optimizers=()), "optimizers"), (dict(optimizers="sgd"), "optimizers"), (dict(lr=0.0), "lr"),
    (dict(lr="fast"), "lr"), (dict(lr={"sgd": 0.1}), "lr"), (dict(steps=0), "steps"), (dict(batch_size=0), "batch_size"),
    (dict(momentum=1.0), "momentum"), (dict(optimizer_kwargs={"rmsprop": {}}), "optimizer_kwargs"),
    (dict(curvature="hess"), "curvature"),
])
def test_compare_optimizers_bad_values_are_named(kw, arg):
    kw = {"optimizers": ("sgd", "adam"), "lr": 0.1, "steps": 2, **kw}
    with pytest.raises(ValueError, match=rf"^fisherext\.optim\.compare_optimizers: argument '{arg}'"):
        compare_optimizers(mlp, "cross_entropy", classification(), **kw)


def test_compare_optimizers_bad_types_are_named():
    x, y = classification()
    name = r"^fisherext\.optim\.compare_optimizers: argument "
    with pytest.raises(TypeError, match=name + "'data'"):
        compare_optimizers(mlp, "cross_entropy", torch.utils.data.TensorDataset(x, y), lr=0.1)
    with pytest.raises(ValueError, match=name + "'data'"):
        compare_optimizers(mlp, "cross_entropy", (x, y[:-1]), lr=0.1)
    with pytest.raises(TypeError, match=name + "'test_data'"):
        compare_optimizers(mlp, "cross_entropy", (x, y), lr=0.1, test_data=x)
    with pytest.raises(TypeError, match=name + "'model'"):
        compare_optimizers(lambda: 3, "cross_entropy", (x, y), lr=0.1)
    with pytest.raises(TypeError, match=name + "'optimizer_kwargs'"):
        compare_optimizers(mlp, "cross_entropy", (x, y), lr=0.1, optimizer_kwargs=[1])


def test_the_names_are_reexported():
    assert fx.optim.compare_optimizers is compare_optimizers and fx.optim.NaturalGradient is not None
