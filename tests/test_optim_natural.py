"""fisherext.optim.NaturalGradient against steps built by hand: K-FAC factors of a linear-softmax layer
written out (A = mean ããᵀ, G = mean δδᵀ), their Kronecker product by torch.kron and a dense solve; where
K-FAC is exact (one sample) the Fisher from per-sample autograd; running averages, the update schedule,
momentum and weight decay, state_dict, a training run against SGD, bad inputs."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherext.optim import NaturalGradient
from support import assert_close

I, C = 4, 3
LR, DAMPING = 0.3, 0.05


def linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(I, C).double()


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, I, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def mean_loss_grad(model, x, y):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))])


def hand_factors(model, x, y, kind):
    """A = (1/N) Σ ããᵀ with ã = [x, 1]; G = (1/N) Σ δδᵀ, δ = p − e_y (empirical) or E_y[δδᵀ] = diag(p) − ppᵀ (true)."""
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    A = a.T @ a / x.shape[0]
    if kind == "empirical":
        delta = p - F.one_hot(y, C).double()
        G = delta.T @ delta / x.shape[0]
    else:
        G = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    return A, G


def kron_in_flat_order(A, G):
    """G ⊗ A over the augmented weight [W | b] (row-major [C, I+1]), permuted to the flat order [vec W, b]."""
    aug = torch.arange(C * (I + 1)).view(C, I + 1)
    flat = torch.empty_like(aug)
    flat[:, :I] = torch.arange(C * I).view(C, I)
    flat[:, I] = C * I + torch.arange(C)
    pos = torch.empty(C * (I + 1), dtype=torch.long)
    pos[aug.reshape(-1)] = flat.reshape(-1)
    M = torch.empty(C * (I + 1), C * (I + 1), dtype=A.dtype)
    M[pos[:, None], pos[None, :]] = torch.kron(G, A)
    return M


def damped_solve(M, g, damping):
    return torch.linalg.solve(M + damping * torch.eye(M.shape[0], dtype=M.dtype), g)


def ng_step(opt, model, x, y, **kw):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step(batch=(x, y), **kw)


# ---- one step against the explicit K-FAC and Fisher ------------------------------------------------------


@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_step_equals_explicit_kfac_solve(kind):
    model = linear_model()
    x, y = batch()
    theta, g = flat_params(model), mean_loss_grad(model, x, y)
    M = kron_in_flat_order(*hand_factors(model, x, y, kind))
    expected = theta - LR * damped_solve(M, g, DAMPING)
    opt = NaturalGradient(model, LR, damping=DAMPING, kind=kind)
    ng_step(opt, model, x, y)
    assert_close(flat_params(model), expected)
    assert opt.steps == 1


def test_a_bfloat16_model_steps_along_the_float64_step():
    """A bfloat16 model's factors are float32 (fisherext.fisher's accumulation dtype) and its gradient
    bfloat16: the step solves in float32 and lands within bfloat16 rounding of the float64 step."""
    model = linear_model()
    x, y = batch()
    theta, g = flat_params(model), mean_loss_grad(model, x, y)
    expected = theta - LR * damped_solve(kron_in_flat_order(*hand_factors(model, x, y, "true")), g, DAMPING)
    half = copy.deepcopy(model).to(torch.bfloat16)
    start = flat_params(half).double()
    ng_step(NaturalGradient(half, LR, damping=DAMPING), half, x.bfloat16(), y)
    moved, wanted = flat_params(half).double() - start, expected - start
    # the float64 step from the rounded start, against the float64 step from the float64 start: the bfloat16
    # forward, gradient and update round at u = 2^-8 each, a few percent of the step's norm
    assert (moved - wanted).norm() <= 0.05 * wanted.norm()


def per_sample_fisher_loop(model, x, y, kind):
    """(1/N) Σ_n F_n from per-sample autograd: g gᵀ at the label, or Σ_c p_c g_c g_cᵀ over the classes."""
    params = list(model.parameters())
    total = 0
    for n in range(x.shape[0]):
        logp = torch.log_softmax(model(x[n:n + 1]), 1)[0]
        labels = [int(y[n])] if kind == "empirical" else range(C)
        for c in labels:
            gc = torch.cat([t.reshape(-1) for t in torch.autograd.grad(-logp[c], params, retain_graph=True)])
            w = 1.0 if kind == "empirical" else logp[c].exp().item()
            total = total + w * torch.outer(gc, gc)
    return total / x.shape[0]


@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_one_sample_step_equals_exact_natural_gradient(kind):
    # With one sample every cotangent shares the layer input, so F = G ⊗ A exactly.
    model = linear_model(1)
    x, y = batch(1, seed=3)
    Fexact = per_sample_fisher_loop(model, x, y, kind)
    theta, g = flat_params(model), mean_loss_grad(model, x, y)
    expected = theta - LR * damped_solve(Fexact, g, DAMPING)
    opt = NaturalGradient(model, LR, damping=DAMPING, kind=kind)
    ng_step(opt, model, x, y)
    assert_close(flat_params(model), expected)


class LinearNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(I, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, C)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.lin(x))))


def test_parameters_without_a_kronecker_block_get_the_damped_diagonal():
    torch.manual_seed(0)
    model = LinearNorm().double()
    x, y = batch(6, seed=1)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offsets = dict(zip(names, torch.tensor([0] + sizes).cumsum(0).tolist()))
    diag = torch.zeros(sum(sizes), dtype=torch.float64)  # (1/N) Σ g_n² by a per-sample loop
    for n in range(x.shape[0]):
        diag += mean_loss_grad(model, x[n:n + 1], y[n:n + 1]) ** 2
    diag /= x.shape[0]
    theta, g = flat_params(model), mean_loss_grad(model, x, y)
    opt = NaturalGradient(model, LR, damping=DAMPING, kind="empirical")
    ng_step(opt, model, x, y)
    for name in ("norm.weight", "norm.bias"):
        s = slice(offsets[name], offsets[name] + 5)
        assert_close(flat_params(model)[s], theta[s] - LR * g[s] / (diag[s] + DAMPING))
    assert {p.kind for p in opt.curvature.parts} == {"diag", "kron"}


def test_params_subset_moves_only_the_subset():
    torch.manual_seed(0)
    model = LinearNorm().double()
    x, y = batch(6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = NaturalGradient(model, LR, damping=DAMPING, params=[model.head])
    ng_step(opt, model, x, y)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != n.startswith("head"), n
    assert opt.curvature.P == model.head.weight.numel() + model.head.bias.numel()


def test_precondition_equals_the_damped_solve_of_its_curvature():
    torch.manual_seed(0)
    model = LinearNorm().double()
    x, y = batch(7)
    opt = NaturalGradient(model, LR, damping=DAMPING)
    opt.update_curvature((x, y))
    v = torch.randn(opt.curvature.P, dtype=torch.float64)
    dense = opt.curvature.dense()
    assert_close(opt.precondition(v), damped_solve(dense, v, DAMPING))
    assert_close(opt.precondition(v, damping=0.5), damped_solve(dense, v, 0.5))


# ---- running averages and the update schedule ------------------------------------------------------------


def kron_factors(opt):
    (part,) = [p for p in opt.curvature.parts if p.kind == "kron"]
    return part.A, part.G


@pytest.mark.parametrize("decay", [0.0, 0.7])
def test_running_average_of_the_factors(decay):
    model = linear_model()
    b1, b2 = batch(8, seed=1), batch(5, seed=2)
    A1, G1 = hand_factors(model, *b1, "true")
    A2, G2 = hand_factors(model, *b2, "true")
    opt = NaturalGradient(model, LR, damping=DAMPING, decay=decay)
    opt.update_curvature(b1)
    assert_close(kron_factors(opt)[0], A1)     # the first update takes the new factors as they are
    opt.update_curvature(b2)
    A, G = kron_factors(opt)
    assert_close(A, decay * A1 + (1 - decay) * A2)
    assert_close(G, decay * G1 + (1 - decay) * G2)
    assert opt.curvature.num_samples == 5


def test_update_interval_refreshes_every_kth_step():
    model = linear_model()
    opt = NaturalGradient(model, 1e-3, damping=DAMPING, update_interval=3, decay=0.0)
    batches = [batch(6, seed=10 + t) for t in range(7)]
    for t, (x, y) in enumerate(batches):
        ng_step(opt, model, x, y)
        source = batches[(t // 3) * 3]
        # the factors were computed at the parameters of the step that refreshed them
        A_expected = hand_factors(model, *source, "true")[0]   # A does not depend on the parameters
        assert_close(kron_factors(opt)[0], A_expected)
    assert opt.steps == 7


def test_update_interval_schedule_of_g():
    # G depends on the parameters: it must be the one at the refreshing step, kept for the next k-1 steps.
    model = linear_model()
    opt = NaturalGradient(model, 0.5, damping=DAMPING, update_interval=2, decay=0.0)
    expected_G = None
    for t in range(4):
        x, y = batch(6, seed=20 + t)
        if t % 2 == 0:
            expected_G = hand_factors(model, x, y, "true")[1]
        ng_step(opt, model, x, y)
        assert_close(kron_factors(opt)[1], expected_G)


def test_step_without_a_batch_uses_the_current_factors():
    model = linear_model()
    x, y = batch()
    opt = NaturalGradient(model, LR, damping=DAMPING)
    opt.update_curvature((x, y))
    M = kron_in_flat_order(*hand_factors(model, x, y, "true"))
    for _ in range(2):
        theta, g = flat_params(model), mean_loss_grad(model, x, y)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert_close(flat_params(model), theta - LR * damped_solve(M, g, DAMPING))


# ---- momentum, weight decay, closure ---------------------------------------------------------------------


def test_momentum_and_weight_decay_trajectory():
    mu, wd = 0.8, 0.1
    model = linear_model()
    reference = copy.deepcopy(model)
    opt = NaturalGradient(model, LR, damping=DAMPING, momentum=mu, weight_decay=wd, decay=0.0, kind="empirical")
    buf = None
    for t in range(3):
        x, y = batch(8, seed=30 + t)
        theta, g = flat_params(reference), mean_loss_grad(reference, x, y)
        M = kron_in_flat_order(*hand_factors(reference, x, y, "empirical"))
        d = damped_solve(M, g + wd * theta, DAMPING)
        buf = d if buf is None else mu * buf + d
        new = theta - LR * buf
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(new, reference.parameters())
        ng_step(opt, model, x, y)
        assert_close(flat_params(model), new)


def test_closure_step_equals_backward_then_step():
    x, y = batch()
    a, b = linear_model(), linear_model()
    opt_a = NaturalGradient(a, LR, damping=DAMPING, momentum=0.5)
    opt_b = NaturalGradient(b, LR, damping=DAMPING, momentum=0.5)
    for _ in range(2):
        ng_step(opt_a, a, x, y)

        def closure():
            opt_b.zero_grad()
            value = F.cross_entropy(b(x), y)
            value.backward()
            return value

        loss = opt_b.step(closure, batch=(x, y))
        assert isinstance(loss, torch.Tensor)
    assert torch.equal(flat_params(a), flat_params(b))


def test_update_curvature_leaves_gradients_and_parameters_alone():
    model = linear_model()
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    theta = flat_params(model)
    opt = NaturalGradient(model, LR)
    opt.update_curvature((x, y))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(flat_params(model), theta)


def test_no_gradient_no_step():
    model = linear_model()
    opt = NaturalGradient(model, LR)
    theta = flat_params(model)
    assert opt.step(batch=batch()) is None
    assert torch.equal(flat_params(model), theta) and opt.steps == 0


def test_mc_kind_is_reproducible_with_a_generator():
    x, y = batch()
    results = []
    for _ in range(2):
        model = linear_model()
        opt = NaturalGradient(model, LR, kind="mc", mc_samples=4, generator=torch.Generator().manual_seed(5))
        for _ in range(2):
            ng_step(opt, model, x, y)
        results.append(flat_params(model))
    assert torch.equal(*results)


def test_lr_scheduler_drives_the_step():
    model = linear_model()
    x, y = batch()
    opt = NaturalGradient(model, LR, damping=DAMPING)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5)   # sets lr = 0.5 · LR at construction
    theta, g = flat_params(model), mean_loss_grad(model, x, y)
    M = kron_in_flat_order(*hand_factors(model, x, y, "true"))
    ng_step(opt, model, x, y)
    assert_close(flat_params(model), theta - 0.5 * LR * damped_solve(M, g, DAMPING))


# ---- state_dict ------------------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_the_same_trajectory():
    batches = [batch(8, seed=40 + t) for t in range(6)]
    model = linear_model()
    opt = NaturalGradient(model, LR, damping=DAMPING, momentum=0.9, update_interval=2, decay=0.5)
    for x, y in batches[:3]:
        ng_step(opt, model, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    clone = linear_model(seed=7)
    clone.load_state_dict(saved["model"])
    opt2 = NaturalGradient(clone, 1.0, damping=1.0, momentum=0.9, update_interval=2, decay=0.5)
    opt2.load_state_dict(saved["opt"])
    assert opt2.steps == 3 and opt2.param_groups[0]["lr"] == LR
    for x, y in batches[3:]:
        ng_step(opt, model, x, y)
        ng_step(opt2, clone, x, y)
        assert torch.equal(flat_params(model), flat_params(clone))


def test_load_state_dict_is_checked_before_anything_changes():
    model = linear_model()
    opt = NaturalGradient(model, LR)
    ng_step(opt, model, *batch())
    state = opt.state_dict()
    with pytest.raises(ValueError, match="argument 'state_dict'"):
        opt.load_state_dict({k: v for k, v in state.items() if k != "natural_gradient"})
    bad = copy.deepcopy(state)
    bad["natural_gradient"]["factors"][0]["idx"] = bad["natural_gradient"]["factors"][0]["idx"] + 1000
    with pytest.raises(ValueError, match="argument 'state_dict'.*outside"):
        opt.load_state_dict(bad)
    with pytest.raises(TypeError, match="argument 'state_dict'"):
        opt.load_state_dict([1])
    assert opt.steps == 1


# ---- training ----------------------------------------------------------------------------------------------


def digits(n=400):
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.data[:n] / 16.0, dtype=torch.float32), torch.tensor(d.target[:n])


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10))


def train(opt_factory, x, y, steps, natural):
    model = mlp()
    opt = opt_factory(model)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(batch=(x, y)) if natural else opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def test_natural_gradient_reduces_the_loss_faster_than_sgd_per_step():
    x, y = digits()
    steps = 15
    sgd = min(train(lambda m: torch.optim.SGD(m.parameters(), lr=lr), x, y, steps, False) for lr in (0.3, 1.0, 3.0))
    natural = train(lambda m: NaturalGradient(m, 0.5, damping=1e-2, decay=0.0), x, y, steps, True)
    assert natural < 0.5 * sgd, (natural, sgd)


# ---- bad inputs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arg,value", [
    ("lr", 0.0), ("lr", -1.0), ("lr", float("nan")), ("damping", 0.0), ("damping", -1e-3),
    ("update_interval", 0), ("update_interval", 1.5), ("decay", -0.1), ("decay", 1.0), ("momentum", 1.0),
    ("momentum", -0.5), ("weight_decay", -1.0), ("kind", "fisher"), ("loss", "hinge"), ("mc_samples", 0),
])
def test_bad_arguments_are_named(arg, value):
    kwargs = {"lr": LR, arg: value}
    with pytest.raises(ValueError, match=rf"^fisherext\.NaturalGradient: argument '{arg}'"):
        NaturalGradient(linear_model(), **kwargs)


def test_bad_types_are_named():
    with pytest.raises(TypeError, match="argument 'model'"):
        NaturalGradient(torch.zeros(3), LR)
    with pytest.raises(TypeError, match="argument 'generator'"):
        NaturalGradient(linear_model(), LR, generator=0)
    with pytest.raises(ValueError, match="argument 'params'"):
        NaturalGradient(linear_model(), LR, params=["nope"])


def test_bad_calls_are_named():
    model = linear_model()
    opt = NaturalGradient(model, LR)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"^fisherext\.NaturalGradient\.step: argument 'batch'"):
        opt.step()
    with pytest.raises(ValueError, match="argument 'g'"):
        opt.precondition(torch.zeros(C * (I + 1), dtype=torch.float64))
    opt.update_curvature((x, y))
    with pytest.raises(ValueError, match="argument 'g'"):
        opt.precondition(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="argument 'damping'"):
        opt.precondition(torch.zeros(C * (I + 1), dtype=torch.float64), damping=0.0)
    with pytest.raises(ValueError, match="argument 'param_group'"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    with pytest.raises(ValueError, match="argument 'data'"):
        opt.update_curvature((x[:0], y[:0]))
