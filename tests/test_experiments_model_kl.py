"""fisherext.experiments.model_kl: E_x KL(p(θ) ‖ p(θ + εv)) against ½ε²vᵀFv over ε, with the KL from a
deep copy of the model moved by hand and F = (1/N) Σ_n F_n from the per-sample autograd loop."""
import copy
import math

import pytest
import torch
from torch import nn

import fisherext as fx
from fisherext import unflatten
from support.models import names_argument, num_params, per_sample_fishers, untouched
from support.perturb import randn, tanh_mlp, with_grads


def explicit_mean_kl(model, x, v, eps):
    """E_x KL(p(θ) ‖ p(θ + εv)) with the moved parameters written into a deep copy of the model."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, piece in zip(moved.parameters(), unflatten(v, list(moved.parameters()))):
            p.add_(eps * piece)
        log_p, log_q = torch.log_softmax(model(x), -1), torch.log_softmax(moved(x), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


@pytest.mark.parametrize("direction", ["random", "gradient"])
def test_kl_vs_fisher(direction, device):
    model = with_grads(tanh_mlp(device=device))
    x = randn((16, 5), 32, device=device)
    if direction == "random":
        v = randn(num_params(model), 33, device=device)
    else:
        y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(34)).to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        v = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
        v = v / v.norm()
    eps_values = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3]
    with untouched(model):
        rows = fx.kl_vs_fisher(model, x, v, eps_values)
    assert [r["eps"] for r in rows] == eps_values
    assert all(isinstance(r[k], float) for r in rows for k in ("kl", "half_quad", "ratio")), "report rows"
    # the references on the CPU. The true Fisher needs no labels; the mean over the inputs of the per-input Fisher
    model, x, v = copy.deepcopy(model).cpu(), x.cpu(), v.cpu()
    F = per_sample_fishers(model, x, torch.zeros(16, dtype=torch.long), "true", "cross_entropy").mean(0)
    quad = (v @ F @ v).item()
    for r in rows:
        assert r["half_quad"] == pytest.approx(0.5 * r["eps"] ** 2 * quad, rel=1e-10)
        assert r["kl"] == pytest.approx(explicit_mean_kl(model, x, v, r["eps"]), rel=1e-8)
        assert r["ratio"] == pytest.approx(r["kl"] / r["half_quad"], rel=1e-12)
    deviation = [abs(r["ratio"] - 1) for r in rows]
    assert deviation[-1] < 0.01
    assert all(a > b for a, b in zip(deviation, deviation[1:])), f"|ratio - 1| does not shrink with eps: {deviation}"


def test_kl_vs_fisher_bad_eps_leaves_the_model_alone(device):
    model = tanh_mlp(device=device)
    x = randn((4, 5), 35, device=device)
    with untouched(model), pytest.raises(ValueError, match=names_argument("eps")):
        fx.kl_vs_fisher(model, x, randn(num_params(model), 36, device=device), [1e-2, math.nan])


def test_kl_vs_fisher_takes_one_direction(device):
    """v is one direction [P]: a 2-D v (several directions, or one per input) is refused, naming [P]."""
    model = tanh_mlp(device=device)
    x = randn((4, 5), 37, device=device)
    P = num_params(model)
    for v in (randn((4, P), 38, device=device), randn((P, 2), 38, device=device)):
        with untouched(model), pytest.raises(ValueError, match=rf"argument 'v' expected shape \[{P}\]"):
            fx.kl_vs_fisher(model, x, v, [1e-2])
