"""fisherext.attacks (FGSM, PGD) against per-sample attacks written out with plain autograd (float64), on a
small model trained on scikit-learn's digits (float32: accuracy drops, targeted attacks), and for what
must stay untouched: the ball, the data range, the model (parameters, buffers, flags, gradients, mode)."""
import math

import pytest
import torch
from torch import nn

import fisherext as fx
from support.models import trained_digits_classifier

NORMS = ["linf", "l2"]


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()


def tiny_data(n=9):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.fixture(scope="module")
def digits():
    return trained_digits_classifier()


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def per_sample_norm(d, norm):
    d = d.flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


# ---- the ball and the data range ----------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("clamp", [(0.0, 1.0), None])
def test_pgd_stays_in_the_ball_and_the_data_range(digits, norm, random_start, clamp):
    model, x, y = digits
    eps = 0.1 if norm == "linf" else 1.0
    adv = fx.attacks.pgd(model, x, y, eps=eps, norm=norm, steps=5, random_start=random_start, clamp=clamp,
                         generator=torch.Generator().manual_seed(0))
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    size = per_sample_norm(adv - x, norm)
    assert size.max().item() <= eps * (1 + 1e-5)
    assert size.max().item() >= 0.9 * eps  # the attack does move the inputs out to the ball's surface
    if clamp is not None:
        assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
    else:
        assert adv.min().item() < 0.0 or adv.max().item() > 1.0  # without a range the ball alone binds


@pytest.mark.parametrize("norm", NORMS)
def test_fgsm_is_one_step_of_size_eps(digits, norm):
    model, x, y = digits
    eps = 0.1 if norm == "linf" else 1.0
    adv = fx.attacks.fgsm(model, x, y, eps=eps, norm=norm)  # no range: the step is exactly on the sphere
    size = per_sample_norm(adv - x, norm)
    torch.testing.assert_close(size, torch.full_like(size, eps), rtol=1e-5, atol=0)
    clamped = fx.attacks.fgsm(model, x, y, eps=eps, norm=norm, clamp=(0, 1))
    torch.testing.assert_close(clamped, adv.clamp(0, 1), rtol=0, atol=0)


def test_l2_random_start_is_uniform_in_the_ball():
    """With a step far below rounding, PGD returns its random start: uniform in the d-ball means a radius
    r with P(r <= t·eps) = t^d and an isotropic direction."""
    model = nn.Sequential(nn.Linear(3, 2)).double().eval()
    n, d, eps = 20000, 3, 0.5
    x = torch.zeros(n, d, dtype=torch.float64)
    start = fx.attacks.pgd(model, x, torch.zeros(n, dtype=torch.long), eps=eps, norm="l2", steps=1, step_size=1e-300,
                           random_start=True, generator=torch.Generator().manual_seed(0))
    r = start.norm(dim=1) / eps
    assert r.max().item() <= 1 + 1e-12
    for t in (0.3, 0.6, 0.9):
        assert abs((r <= t).double().mean().item() - t ** d) < 0.015  # binomial sd ≤ 0.0036
    assert (start / start.norm(dim=1, keepdim=True)).mean(0).abs().max().item() < 0.03


def test_linf_random_start_is_uniform_in_the_cube():
    model = nn.Sequential(nn.Linear(4, 2)).double().eval()
    n, eps = 5000, 0.2
    x = torch.full((n, 4), 0.5, dtype=torch.float64)
    start = fx.attacks.pgd(model, x, torch.zeros(n, dtype=torch.long), eps=eps, norm="linf", steps=1,
                           step_size=1e-300, random_start=True, generator=torch.Generator().manual_seed(0))
    u = ((start - x) / eps).flatten()
    assert u.abs().max().item() <= 1.0
    for t in (-0.5, 0.0, 0.5):  # the uniform law on [-1, 1]: P(u <= t) = (t + 1)/2
        assert abs((u <= t).double().mean().item() - (t + 1) / 2) < 0.02


# ---- what the attacks do ------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 2.0)])
def test_pgd_and_fgsm_lower_the_accuracy_of_a_trained_model(digits, norm, eps):
    model, x, y = digits
    clean = accuracy(model, x, y)
    assert clean > 0.9
    assert accuracy(model, fx.attacks.pgd(model, x, y, eps=eps, norm=norm, steps=20, clamp=(0, 1)), y) < 0.05
    assert accuracy(model, fx.attacks.fgsm(model, x, y, eps=eps, norm=norm, clamp=(0, 1)), y) < 0.3


def test_targeted_pgd_raises_the_target_rate(digits):
    model, x, y = digits
    target = (y + 1) % 10
    assert accuracy(model, x, target) < 0.05
    adv = fx.attacks.pgd(model, x, target, eps=2.0, norm="l2", steps=20, clamp=(0, 1), targeted=True)
    assert accuracy(model, adv, target) > 0.9
    fast = fx.attacks.fgsm(model, x, target, eps=0.2, norm="linf", clamp=(0, 1), targeted=True)
    assert accuracy(model, fast, target) > 0.2


def test_early_stop_leaves_samples_just_past_the_boundary(digits):
    model, x, y = digits
    kw = dict(eps=2.0, norm="l2", steps=60, step_size=0.05, clamp=(0, 1))
    full = fx.attacks.pgd(model, x, y, **kw)
    stopped = fx.attacks.pgd(model, x, y, early_stop=True, **kw)
    assert accuracy(model, stopped, y) == accuracy(model, full, y) == 0.0
    with torch.no_grad():
        p_full, p_stopped = model(full).softmax(1).amax(1), model(stopped).softmax(1).amax(1)
    assert p_stopped.median() < 0.7 < p_full.median()  # just past the boundary, not deep in the wrong class
    assert (per_sample_norm(stopped - x, "l2") <= per_sample_norm(full - x, "l2") + 1e-6).all()


# ---- equal to an attack written out per sample (float64) --------------------------------------------------


def pgd_one_sample_loop(model, x, y, eps, norm, steps, step_size, clamp, targeted=False, early_stop=False):
    """Seed 004's way, one input at a time, with its own autograd graph: the loss of that input alone."""
    out = []
    for n in range(x.shape[0]):
        x0, xn = x[n:n + 1], x[n:n + 1].clone()
        for _ in range(steps):
            xn = xn.detach().requires_grad_(True)
            logits = model(xn)
            if early_stop and (logits.argmax(1).item() == y[n].item()) == targeted:
                break
            loss = -torch.log_softmax(logits, 1)[0, y[n]]
            (g,) = torch.autograd.grad(-loss if targeted else loss, xn)
            step = g.sign() if norm == "linf" else g / g.norm()
            delta = xn.detach() + step_size * step - x0
            if norm == "linf":
                delta = torch.clamp(delta, -eps, eps)
            elif delta.norm() > eps:
                delta = delta * (eps / delta.norm())
            xn = torch.clamp(x0 + delta, *clamp)
        out.append(xn.detach())
    return torch.cat(out)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("targeted", [False, True])
def test_batched_pgd_equals_a_per_sample_loop(norm, targeted):
    model, (x, y) = tiny_model(), tiny_data()
    eps = 0.3 if norm == "linf" else 0.6
    kw = dict(eps=eps, norm=norm, steps=7, step_size=eps / 3, clamp=(0.0, 1.0))
    expected = pgd_one_sample_loop(model, x, y, targeted=targeted, **kw)
    got = fx.attacks.pgd(model, x, y, targeted=targeted, **kw)
    assert (expected - x).abs().max() > 0.1 * eps
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_batched_early_stopped_pgd_equals_a_per_sample_loop():
    model, (x, _) = tiny_model(), tiny_data(12)
    with torch.no_grad():
        y = model(x).argmax(1)  # every attack starts from a correct prediction
    kw = dict(eps=0.3, norm="l2", steps=12, step_size=0.05, clamp=(0.0, 1.0))
    expected = pgd_one_sample_loop(model, x, y, early_stop=True, **kw)
    got = fx.attacks.pgd(model, x, y, early_stop=True, **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    with torch.no_grad():
        flipped = model(got).argmax(1) != y
    assert 0 < flipped.sum() < x.shape[0]  # samples stopped (at various steps) and samples that never flipped


def test_the_step_does_not_depend_on_the_batch():
    """The loss is summed over the batch: one sample's attack is the same alone and in a batch of any size."""
    model, (x, y) = tiny_model(), tiny_data()
    kw = dict(eps=0.5, norm="l2", steps=3, step_size=0.2)
    whole = fx.attacks.pgd(model, x, y, **kw)
    torch.testing.assert_close(fx.attacks.pgd(model, x[:1], y[:1], **kw), whole[:1], rtol=0, atol=1e-14)
    twice = fx.attacks.pgd(model, torch.cat([x, x]), torch.cat([y, y]), **kw)
    torch.testing.assert_close(twice, torch.cat([whole, whole]), rtol=0, atol=1e-14)


def test_a_torch_loss_gives_the_same_attack_as_its_name():
    model, (x, y) = tiny_model(), tiny_data()
    kw = dict(eps=0.5, norm="l2", steps=4, step_size=0.2)
    torch.testing.assert_close(fx.attacks.pgd(model, x, y, loss=nn.CrossEntropyLoss(), **kw),
                               fx.attacks.pgd(model, x, y, **kw), rtol=0, atol=1e-14)


def test_eps_zero_returns_x():
    model, (x, y) = tiny_model(), tiny_data()
    assert torch.equal(fx.attacks.pgd(model, x, y, eps=0, norm="linf", steps=3, random_start=True), x)
    assert torch.equal(fx.attacks.pgd(model, x, y, eps=0.0, norm="l2", steps=3), x)
    assert torch.equal(fx.attacks.fgsm(model, x, y, eps=0.0), x)


def test_random_start_is_deterministic_for_a_generator():
    model, (x, y) = tiny_model(), tiny_data()

    def run(seed):
        return fx.attacks.pgd(model, x, y, eps=0.5, norm="linf", steps=2, step_size=0.1, random_start=True,
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


# ---- the model stays untouched ----------------------------------------------------------------------------


class WithNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)
        self.fc2.bias.requires_grad_(False)  # a frozen parameter keeps its flag

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_the_model_is_bitwise_unchanged(attack):
    torch.manual_seed(0)
    model = WithNorms().double()
    model.train()
    model(torch.randn(32, 5, dtype=torch.float64))  # non-trivial running statistics
    model.eval()
    model.fc1.weight.grad = torch.ones_like(model.fc1.weight)  # a gradient already there stays as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    x, y = tiny_data()
    with torch.no_grad():  # the attack takes its gradients even when the caller has them off
        if attack == "pgd":
            adv = fx.attacks.pgd(model, x, y, eps=0.5, norm="l2", steps=3, random_start=True)
        else:
            adv = fx.attacks.fgsm(model, x, y, eps=0.1)
    assert not torch.equal(adv, x)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(model.fc1.weight.grad, torch.ones_like(model.fc1.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc1.weight")


def test_a_model_in_train_mode_keeps_its_mode_and_is_attacked_in_it():
    model, (x, y) = tiny_model(), tiny_data()
    model.train()
    fx.attacks.pgd(model, x, y, eps=0.5, norm="l2", steps=2)
    assert model.training and all(m.training for m in model.modules())


# ---- bad input ----------------------------------------------------------------------------------------------


def _bn_train():
    return nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)).double().train()


BAD = [
    (dict(eps=-0.1), ValueError, "eps"),
    (dict(eps=math.nan), ValueError, "eps"),
    (dict(norm="l1"), ValueError, "norm"),
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.5), ValueError, "steps"),
    (dict(step_size=0.0), ValueError, "step_size"),
    (dict(step_size=-1.0), ValueError, "step_size"),
    (dict(clamp=(1.0, 0.0)), ValueError, "clamp"),
    (dict(clamp=(0.0, 0.0)), ValueError, "clamp"),
    (dict(clamp=(0.2, 1.0)), ValueError, "clamp"),  # the inputs reach below 0.2
    (dict(clamp=(0.0,)), ValueError, "clamp"),
    (dict(x=torch.ones(9, 5, dtype=torch.long)), TypeError, "x"),
    (dict(x=torch.full((9, 5), math.nan, dtype=torch.float64)), ValueError, "x"),
    (dict(x=torch.zeros(0, 5, dtype=torch.float64), y=torch.zeros(0, dtype=torch.long)), ValueError, "x"),
    (dict(y=torch.zeros(4, dtype=torch.long)), ValueError, "y"),
    (dict(y=torch.full((9,), 3)), ValueError, "y"),  # labels outside [0, 3)
    (dict(y=[0] * 9), TypeError, "y"),
    (dict(random_start=1), TypeError, "random_start"),
    (dict(targeted="yes"), TypeError, "targeted"),
    (dict(early_stop=None), TypeError, "early_stop"),
    (dict(generator=0), TypeError, "generator"),
    (dict(loss="hinge"), ValueError, "loss"),
    (dict(model=_bn_train()), ValueError, "model"),
]


@pytest.mark.parametrize("kwargs,error,arg", BAD, ids=[f"{a}-{i}" for i, (_, _, a) in enumerate(BAD)])
def test_pgd_bad_input_names_the_argument(kwargs, error, arg):
    x, y = tiny_data()
    args = dict(model=tiny_model(), x=x, y=y, eps=0.3, norm="linf", steps=2, clamp=(0.0, 1.0))
    args.update(kwargs)
    model = args.pop("model")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=rf"^fisherext\.attacks\.pgd: argument '{arg}'"):
        fx.attacks.pgd(model, **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs,error,arg", [(dict(eps=-1.0), ValueError, "eps"), (dict(norm="l0"), ValueError, "norm"),
                                             (dict(clamp=(0.5, 0.6)), ValueError, "clamp"),
                                             (dict(x=torch.ones(9, 5, dtype=torch.int32)), TypeError, "x")])
def test_fgsm_bad_input_names_the_argument(kwargs, error, arg):
    x, y = tiny_data()
    args = dict(x=x, y=y, eps=0.3)
    args.update(kwargs)
    with pytest.raises(error, match=rf"^fisherext\.attacks\.fgsm: argument '{arg}'"):
        fx.attacks.fgsm(tiny_model(), **args)


def test_early_stop_needs_class_logits():
    model = nn.Sequential(nn.Linear(5, 1), nn.Flatten(0)).double().eval()  # regression outputs [N]
    x, _ = tiny_data()
    with pytest.raises(ValueError, match="argument 'early_stop'"):
        fx.attacks.pgd(model, x, torch.zeros(9, dtype=torch.float64), eps=0.1, loss="mse", early_stop=True)
