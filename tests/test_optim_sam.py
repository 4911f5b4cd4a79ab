"""fisherext.optim.SAM / FisherSAM against perturbations and steps written out by hand: explicit gradients of
a quadratic, the closed forms of each rule computed in plain torch, plain-autograd SAM loops with a hand-
written momentum; float64 where exactness is checked. Then the API: closure vs two steps, restore bit for
bit, groups, instances, state dicts, bad inputs."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherext as fx
from fisherext.optim import sam as sam_module
from support import assert_close

SAM, FisherSAM = fx.optim.SAM, fx.optim.FisherSAM
RHO, ETA = 0.07, 2.5


# ---- independent references ------------------------------------------------------------------------


def quadratic(device, dtype=torch.float64, seed=0):
    """Parameters (a 3x4 matrix, a 5-vector) and L(θ) = ½ θᵀAθ + bᵀθ over their flat concatenation, with
    the explicit gradient Aθ + b."""
    gen = torch.Generator().manual_seed(seed)
    P = 17
    M = torch.randn(P, P, generator=gen, dtype=torch.float64)
    A = (M @ M.T / P + torch.eye(P, dtype=torch.float64)).to(device, dtype)
    b = torch.randn(P, generator=gen, dtype=torch.float64).to(device, dtype)
    params = [torch.randn(3, 4, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_(),
              torch.randn(5, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()]

    def loss(ps):
        th = torch.cat([p.reshape(-1) for p in ps])
        return 0.5 * th @ A @ th + b @ th

    def grad(th):
        return A @ th + b

    return params, loss, grad


def flat(ps):
    return torch.cat([p.detach().reshape(-1) for p in ps])


def eps_sam(g, rho):
    return rho * g / g.norm()


def eps_asam(g, theta, rho, eta):
    T = theta.abs() + eta
    return rho * T * T * g / (T * g).norm()


def eps_fishersam(g, gamma, eta):
    """Kim et al. (2022): ε = γ f⁻¹g / √(gᵀ f⁻¹ g), f = 1 + η g²."""
    f = 1 + eta * g * g
    return gamma * (g / f) / torch.sqrt(torch.sum(g * g / f))


# rule: (class, its settings, the perturbation ε(g, θ) by the closed form)
RULES = {
    "sam": (SAM, dict(rho=RHO), lambda g, th: eps_sam(g, RHO)),
    "asam": (SAM, dict(rho=RHO, adaptive=True, eta=0.03), lambda g, th: eps_asam(g, th, RHO, 0.03)),
    "fishersam": (FisherSAM, dict(rho=RHO, eta=ETA), lambda g, th: eps_fishersam(g, RHO, ETA)),
}


def make(rule, params, base=torch.optim.SGD, **kw):
    cls, settings, _ = RULES[rule]
    return cls(params, base, **settings, **({"lr": 0.1} if base is torch.optim.SGD else {}), **kw)


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batch(seed=1, n=24, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen, dtype=torch.float64).to(dtype), torch.randint(0, 3, (n,), generator=gen)


def backward(model, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def assert_same_parameters(m1, m2):
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def two_step(opt, model, x, y):
    opt.zero_grad()
    backward(model, x, y)
    opt.first_step(zero_grad=True)
    backward(model, x, y)
    opt.second_step()


def closure_step(opt, model, x, y):
    opt.zero_grad()
    backward(model, x, y)
    return opt.step(lambda: backward(model, x, y))


# ---- the perturbation of each rule ---------------------------------------------------------------------


@pytest.mark.parametrize("rule", list(RULES))
def test_perturbation_equals_the_closed_form_on_a_quadratic(rule, device):
    params, loss, grad = quadratic(device)
    frozen = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)  # no gradient: skipped
    expected_eps = RULES[rule][2]
    opt = make(rule, [params[0], frozen, params[1]])
    theta = flat(params)
    loss(params).backward()
    g = grad(theta)
    assert_close(flat([p.grad for p in params]), g)  # the set-up: autograd's gradient is the explicit one
    frozen_before = frozen.detach().clone()
    opt.first_step()
    assert_close(flat(params) - theta, expected_eps(g, theta), rtol=1e-12)
    assert torch.equal(frozen.detach(), frozen_before)
    assert frozen.grad is None


def test_fishersam_perturbation_lies_on_the_fisher_ellipsoid_not_the_ball():
    params, loss, grad = quadratic("cpu", seed=3)
    opt = FisherSAM(params, torch.optim.SGD, rho=RHO, eta=ETA, lr=0.1)
    theta = flat(params)
    loss(params).backward()
    g = grad(theta)
    opt.first_step()
    eps = flat(params) - theta
    f = 1 + ETA * g * g
    assert abs((eps * f * eps).sum().item() - RHO ** 2) <= 1e-14 * RHO ** 2  # εᵀ diag(f) ε = γ²
    assert abs(eps.norm().item() - RHO) > 1e-3 * RHO  # not normalized by the Euclidean norm of f⁻¹g
    # the maximizer of gᵀε on the ellipsoid: no other point of it does better
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(200, g.numel(), generator=gen, dtype=torch.float64)
    V = RHO * V / torch.sqrt((V * f * V).sum(1, keepdim=True))
    assert (V @ g).max() < g @ eps


def test_fishersam_equals_sam_with_eta_zero_step_for_step():
    x, y = batch()
    m1, m2 = mlp(), mlp()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=RHO, lr=0.3, momentum=0.9)
    o2 = FisherSAM(m2.parameters(), torch.optim.SGD, rho=RHO, eta=0.0, lr=0.3, momentum=0.9)
    for _ in range(5):
        two_step(o1, m1, x, y)
        two_step(o2, m2, x, y)
        assert_same_parameters(m1, m2)


def test_fishersam_tends_to_sam_as_eta_goes_to_zero():
    """The general formula (not the η = 0 shortcut) with a tiny η stays within rounding of SAM."""
    x, y = batch()
    m1, m2 = mlp(), mlp()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=RHO, lr=0.3, momentum=0.9)
    o2 = FisherSAM(m2.parameters(), torch.optim.SGD, rho=RHO, eta=1e-13, lr=0.3, momentum=0.9)
    for _ in range(5):
        two_step(o1, m1, x, y)
        two_step(o2, m2, x, y)
    assert_close(flat(m2.parameters()), flat(m1.parameters()), rtol=1e-11)


@pytest.mark.parametrize("rule", list(RULES))
def test_zero_gradient_gives_no_perturbation(rule, device):
    params, _, _ = quadratic(device)
    opt = make(rule, params)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.first_step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    opt.second_step()


@pytest.mark.parametrize("rule", list(RULES))
def test_device_path_equals_the_host_scale_path(rule, monkeypatch):
    """The scale kept as a tensor (the path of CUDA devices, forced here on the CPU) perturbs as the
    host-number path does, up to the rounding of one multiplication."""
    x, y = batch()
    m1, m2 = mlp(), mlp()
    o1, o2 = make(rule, m1.parameters()), make(rule, m2.parameters())
    backward(m1, x, y)
    backward(m2, x, y)
    o1.first_step()
    monkeypatch.setattr(sam_module, "SYNC_FREE_DEVICES", frozenset())
    o2.first_step()
    assert_close(flat(m2.parameters()), flat(m1.parameters()), rtol=1e-14)
    p0 = next(m2.parameters())
    assert p0.grad is not None and torch.equal(p0.grad, next(m1.parameters()).grad)  # gradients left as they were


def test_one_norm_over_buckets_of_different_dtypes():
    """Parameters of two dtypes are perturbed by separate multi-tensor calls but with one global norm."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, generator=gen).requires_grad_()
    b = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    ga, gb = torch.randn(6, generator=gen), torch.randn(4, generator=gen, dtype=torch.float64)
    a.grad, b.grad = ga.clone(), gb.clone()
    a0, b0 = a.detach().clone(), b.detach().clone()
    g = torch.cat([ga.double(), gb])
    opt = FisherSAM([a, b], torch.optim.SGD, rho=RHO, eta=ETA, lr=0.1)
    opt.first_step()
    expected = eps_fishersam(g, RHO, ETA)
    assert_close(a.detach() - a0, expected[:6], dtype=torch.float32)
    assert_close(b.detach() - b0, expected[6:], dtype=torch.float32)  # the norm has float32 terms


# ---- the steps -----------------------------------------------------------------------------------------


class Recorder(torch.optim.Optimizer):
    """A base optimizer that only records the parameters and gradients it is stepped with."""

    def __init__(self, params):
        super().__init__(params, {})
        self.seen = []

    def step(self, closure=None):
        self.seen.append([(p.detach().clone(), p.grad.detach().clone()) for g in self.param_groups
                          for p in g["params"]])


@pytest.mark.parametrize("rule", list(RULES))
def test_second_step_restores_theta_bitwise_and_steps_with_the_gradient_at_the_perturbed_point(rule, device):
    params, loss, grad = quadratic(device)
    opt = make(rule, params, base=Recorder)
    before = [p.detach().clone() for p in params]
    loss(params).backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(params[0].detach(), before[0])
    perturbed = flat(params)
    loss(params).backward()
    opt.second_step()
    (seen,) = opt.base_optimizer.seen
    for (p_seen, g_seen), p, b in zip(seen, params, before):
        assert torch.equal(p_seen, b)  # θ copied back bit for bit before the base step
        assert torch.equal(p.detach(), b)
    assert_close(flat([g for _, g in seen]), grad(perturbed))  # ∇L(θ + ε)


def test_closure_api_equals_two_step_api_and_calls_the_closure_once():
    x, y = batch()
    m1, m2 = mlp(), mlp()
    o1 = FisherSAM(m1.parameters(), torch.optim.SGD, rho=RHO, eta=ETA, lr=0.2, momentum=0.9)
    o2 = FisherSAM(m2.parameters(), torch.optim.SGD, rho=RHO, eta=ETA, lr=0.2, momentum=0.9)
    for _ in range(4):
        two_step(o1, m1, x, y)
        o2.zero_grad()
        backward(m2, x, y)
        calls, at = [], []

        def closure():
            calls.append(torch.is_grad_enabled())
            at.append(flat(m2.parameters()))
            return backward(m2, x, y)

        with torch.no_grad():  # the closure runs with gradients enabled all the same
            loss = o2.step(closure)
        assert calls == [True]
        names, sizes = [n for n, _ in m2.named_parameters()], [p.numel() for p in m2.parameters()]
        perturbed = {n: t.view_as(p) for n, t, p in zip(names, torch.split(at[0], sizes), m2.parameters())}
        with torch.no_grad():  # what step returns: the loss at θ + ε
            assert loss.item() == F.cross_entropy(torch.func.functional_call(m2, perturbed, (x,)), y).item()
        assert_same_parameters(m1, m2)


def test_closure_that_raises_leaves_theta_restored():
    x, y = batch()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    before = flat(model.parameters())
    backward(model, x, y)

    def closure():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        opt.step(closure)
    assert torch.equal(flat(model.parameters()), before)
    closure_step(opt, model, x, y)  # not left in the perturbed state


def explicit_sam_momentum(model, x, y, steps, lr, momentum, rule):
    """Plain autograd: ε from the gradient at θ by the closed form, the gradient at θ + ε on a copy of
    the parameters, then v ← μv + g', θ ← θ − lr·v (torch.optim.SGD's momentum)."""
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone() for p in model.parameters()]
    sizes = [p.numel() for p in theta]
    buf = None

    def grad_at(ps):
        ps = [p.clone().requires_grad_() for p in ps]
        out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(out, y), ps)])

    for _ in range(steps):
        th = torch.cat([t.reshape(-1) for t in theta])
        g = grad_at(theta)
        eps = rule(g, th)
        g2 = grad_at([t.view_as(p) for t, p in zip(torch.split(th + eps, sizes), theta)])
        buf = g2.clone() if buf is None else momentum * buf + g2
        th = th - lr * buf
        theta = [t.view_as(p) for t, p in zip(torch.split(th, sizes), theta)]
    return torch.cat([t.reshape(-1) for t in theta]), buf


@pytest.mark.parametrize("rule", list(RULES))
def test_base_optimizer_state_evolves_with_the_sam_gradient(rule):
    x, y = batch()
    model = mlp()
    expected_theta, expected_buf = explicit_sam_momentum(mlp(), x, y, 3, 0.2, 0.9, RULES[rule][2])
    opt = make(rule, model.parameters())
    for group in opt.param_groups:
        group.update(lr=0.2, momentum=0.9)
    for _ in range(3):
        closure_step(opt, model, x, y)
    assert_close(flat(model.parameters()), expected_theta)
    assert_close(flat([opt.state[p]["momentum_buffer"] for p in model.parameters()]), expected_buf)
    assert opt.state is opt.base_optimizer.state


def test_groups_share_one_norm_and_keep_their_own_options():
    params, loss, grad = quadratic("cpu")
    opt = SAM([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.01}], torch.optim.SGD, rho=RHO)
    assert opt.param_groups is opt.base_optimizer.param_groups
    theta = flat(params)
    loss(params).backward()
    g = grad(theta)
    opt.first_step(zero_grad=True)
    assert_close(flat(params) - theta, eps_sam(g, RHO), rtol=1e-12)
    perturbed = flat(params)
    loss(params).backward()
    opt.second_step()
    g2 = grad(perturbed)
    lr = torch.cat([torch.full((12,), 0.1, dtype=torch.float64), torch.full((5,), 0.01, dtype=torch.float64)])
    assert_close(flat(params), theta - lr * g2)
    extra = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert len(opt.base_optimizer.param_groups) == 3 and opt.param_groups[2]["momentum"] == 0


def test_an_instance_as_base_optimizer_steps_like_the_class():
    x, y = batch()
    m1, m2 = mlp(), mlp()
    o1 = SAM(m1.parameters(), torch.optim.Adam, rho=RHO, lr=0.01)
    o2 = SAM(list(m2.parameters()), torch.optim.Adam(m2.parameters(), lr=0.01), rho=RHO)
    for _ in range(3):
        closure_step(o1, m1, x, y)
        closure_step(o2, m2, x, y)
    assert_same_parameters(m1, m2)


def test_training_reduces_the_loss():
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data[:512], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:512])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.5, momentum=0.9)
    with torch.no_grad():
        start = F.cross_entropy(model(x), y).item()
    for _ in range(40):
        closure_step(opt, model, x, y)
    with torch.no_grad():
        end = F.cross_entropy(model(x), y).item()
    assert end < 0.2 * start


def test_state_dict_round_trip():
    x, y = batch()
    m1 = mlp()
    o1 = FisherSAM(m1.parameters(), torch.optim.SGD, rho=RHO, eta=ETA, lr=0.2, momentum=0.9)
    for _ in range(2):
        closure_step(o1, m1, x, y)
    buffer = io.BytesIO()
    torch.save(o1.state_dict(), buffer)  # state_dict() holds references to the live tensors, as torch.optim's
    buffer.seek(0)
    sd = torch.load(buffer)
    assert sd["sam"] == {"rho": RHO, "eta": ETA}
    assert all(set(s) == {"momentum_buffer"} for s in sd["state"].values())  # no copy of θ in it
    m2 = copy.deepcopy(m1)
    o2 = FisherSAM(m2.parameters(), torch.optim.SGD, rho=1.0, eta=0.5, lr=0.9)
    o2.load_state_dict(sd)
    assert (o2.rho, o2.eta, o2.param_groups[0]["lr"]) == (RHO, ETA, 0.2)
    assert o2.param_groups is o2.base_optimizer.param_groups and o2.state is o2.base_optimizer.state
    o3 = copy.deepcopy(o1)
    assert o3.base_optimizer is not o1.base_optimizer and o3.param_groups is o3.base_optimizer.param_groups
    for _ in range(2):
        closure_step(o1, m1, x, y)
        closure_step(o2, m2, x, y)
    assert_same_parameters(m1, m2)


# ---- bad inputs ----------------------------------------------------------------------------------------


def _params():
    return list(mlp().parameters())


@pytest.mark.parametrize("rho", [0, -0.1, float("nan"), float("inf"), True, "0.05"])
def test_bad_rho(rho):
    with pytest.raises(ValueError, match=r"^fisherext\.SAM: argument 'rho'"):
        SAM(_params(), torch.optim.SGD, rho=rho, lr=0.1)
    with pytest.raises(ValueError, match=r"^fisherext\.FisherSAM: argument 'rho'"):
        FisherSAM(_params(), torch.optim.SGD, rho=rho, eta=1.0, lr=0.1)


@pytest.mark.parametrize("eta", [-1e-3, float("nan"), float("inf"), None])
def test_bad_eta(eta):
    with pytest.raises(ValueError, match=r"^fisherext\.FisherSAM: argument 'eta'"):
        FisherSAM(_params(), torch.optim.SGD, rho=0.1, eta=eta, lr=0.1)
    if eta is not None:
        with pytest.raises(ValueError, match=r"^fisherext\.SAM: argument 'eta'"):
            SAM(_params(), torch.optim.SGD, adaptive=True, eta=eta, lr=0.1)


def test_eta_without_adaptive_and_a_bad_adaptive():
    with pytest.raises(ValueError, match=r"argument 'eta' is adaptive SAM's"):
        SAM(_params(), torch.optim.SGD, eta=0.01, lr=0.1)
    with pytest.raises(TypeError, match=r"argument 'adaptive'"):
        SAM(_params(), torch.optim.SGD, adaptive="yes", lr=0.1)


@pytest.mark.parametrize("base", [3, "SGD", nn.Linear, SAM, lambda ps: torch.optim.SGD(ps, lr=0.1)])
def test_bad_base_optimizer(base):
    with pytest.raises(TypeError, match=r"^fisherext\.SAM: argument 'base_optimizer'"):
        SAM(_params(), base)


def test_bad_instances():
    ps = _params()
    with pytest.raises(TypeError, match=r"argument 'base_optimizer' a SAM"):
        SAM(ps, SAM(ps, torch.optim.SGD, lr=0.1))
    with pytest.raises(TypeError, match=r"argument 'lr' base_optimizer is an instance"):
        SAM(ps, torch.optim.SGD(ps, lr=0.1), lr=0.2)
    with pytest.raises(ValueError, match=r"argument 'params' must be the 4 parameter tensors"):
        SAM(ps[:2], torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(ValueError, match=r"argument 'params' group options \['lr'\]"):
        SAM([{"params": ps, "lr": 0.3}], torch.optim.SGD(ps, lr=0.1))


def test_bad_calls():
    x, y = batch()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    with pytest.raises(ValueError, match=r"^fisherext\.SAM\.step: argument 'closure' is required"):
        opt.step()
    with pytest.raises(TypeError, match=r"^fisherext\.SAM\.step: argument 'closure' expected a callable"):
        opt.step(5)
    with pytest.raises(RuntimeError, match=r"SAM\.step: no parameter has a gradient"):
        opt.step(lambda: backward(model, x, y))
    with pytest.raises(RuntimeError, match=r"second_step: no first_step"):
        opt.second_step()
    backward(model, x, y)
    opt.first_step()
    with pytest.raises(RuntimeError, match=r"first_step: the parameters are already perturbed"):
        opt.first_step()
    with pytest.raises(RuntimeError, match=r"load_state_dict: the parameters are perturbed"):
        opt.load_state_dict(opt.state_dict())
    opt.second_step()
    fisher = FisherSAM(model.parameters(), torch.optim.SGD, rho=RHO, eta=ETA, lr=0.1)
    with pytest.raises(ValueError, match=r"^fisherext\.SAM\.load_state_dict: argument 'state_dict'"):
        opt.load_state_dict(fisher.state_dict())
    bad = fisher.state_dict()
    bad["sam"]["rho"] = -1.0
    with pytest.raises(ValueError, match=r"argument 'rho'"):
        fisher.load_state_dict(bad)
    assert fisher.rho == RHO


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = SAM(emb.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"argument 'params' sparse gradients"):
        opt.first_step()
