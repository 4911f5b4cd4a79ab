r"""The applications' workloads: a FisherSAM step, batched PGD, EWC consolidation, on the digits MLP.

- ``sam_step(mlp,N=128)``: one training step on a mini-batch of 128 digits, forward and backward
  included, from the same parameters; the result is the parameter update :math:`\theta_1 - \theta_0`.
  ``fisherext``: ``fx.optim.FisherSAM`` (γ = ``RHO``, η = ``ETA``) around SGD with momentum, its closure
  API. ``autograd-loop``: the same rule written per parameter tensor in plain torch (a Python loop over
  the tensors for the perturbation, the norm, the restore), as hand-written SAM code does. The rule is
  the paper's: :math:`\varepsilon = \gamma f^{-1} g / \sqrt{g^\top f^{-1} g}`, :math:`f = 1 + \eta g^2`.
  Beside them ``sgd_step``: a plain SGD-with-momentum step (forward, backward, step), the unit a
  FisherSAM step is compared with (two gradients and elementwise work: about 2×).
- ``pgd(mlp,N=1024)``: an untargeted L2 PGD attack on 1024 digits (ε = ``PGD_EPS``, ``PGD_STEPS`` steps
  of ``PGD_STEP``, pixels clamped to [0, 1]). ``fisherext``: ``fx.attacks.pgd``, the whole batch at
  once. ``autograd-loop``: seed 004's loop, one image at a time, an optimizer on the image, the loss
  backpropagated through the model (its parameter gradients included, as the seed does), with the same
  normalized step, projection and clamp as ``fx.attacks.pgd`` so that both compute the same images.
- The EWC Fisher of the digits data set is the ``ewc`` quantity of ``bench.matrix`` (fisherext's row
  consolidates through ``fx.ewc.EWC``).

The models are seeded, float32, in eval mode; the reference is the loop in float64.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

import fisherext as fx
from fisherext.experiments.demo import build_mlp

from .loops import gradient
from .models import digits_tensors
from .workloads import Workload

RHO, ETA, LR, MOMENTUM = 0.05, 1.0, 0.05, 0.9
PGD_EPS, PGD_STEPS, PGD_STEP = 1.0, 10, 0.25
SIZES = {False: dict(step=128, pgd=1024), True: dict(step=32, pgd=64)}


def _digits(N: int):
    x, y = digits_tensors()
    return x[:N], y[:N]


def _inputs(N: int):
    def build():
        x, y = _digits(N)
        return {"model": build_mlp(), "x": x, "y": y}
    return build


def _theta(model) -> torch.Tensor:
    return fx.flatten([p.detach() for p in model.parameters()])


def _mean_loss(model, x, y):
    return F.cross_entropy(model(x), y)


# ---- one training step -----------------------------------------------------------------------------

# Each model keeps its optimizer across the timed calls (the steady state of a training loop: buffers
# allocated once); the first call, whose update is compared with the reference, starts it fresh.
_OPTIMIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _optimizer(model, make):
    if model not in _OPTIMIZERS:
        _OPTIMIZERS[model] = make(model.parameters())
    return _OPTIMIZERS[model]


def fisher_sam_step(model, x, y):
    opt = _optimizer(model, lambda ps: fx.optim.FisherSAM(ps, torch.optim.SGD, rho=RHO, eta=ETA, lr=LR,
                                                          momentum=MOMENTUM))
    return _step(model, opt, lambda: opt.step(lambda: _backward(model, x, y)), x, y)


def sgd_step(model, x, y):
    opt = _optimizer(model, lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM))
    return _step(model, opt, opt.step, x, y)


def _backward(model, x, y):
    loss = _mean_loss(model, x, y)
    loss.backward()
    return loss


def _step(model, opt, step, x, y):
    before = _theta(model)
    opt.zero_grad()
    _backward(model, x, y)
    step()
    return _theta(model) - before


def fisher_sam_step_loop(model, x, y):
    """The rule per parameter tensor, with torch.optim.SGD as the base."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(model, lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM))
    before = _theta(model)
    opt.zero_grad()
    _backward(model, x, y)
    with torch.no_grad():
        f_inv_g = [p.grad / (1 + ETA * p.grad ** 2) for p in params]
        scale = RHO / torch.sqrt(sum((p.grad * q).sum() for p, q in zip(params, f_inv_g)))
        saved = [p.detach().clone() for p in params]
        for p, q in zip(params, f_inv_g):
            p.add_(q * scale)
    opt.zero_grad()
    _backward(model, x, y)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    opt.step()
    return _theta(model) - before


# ---- PGD -------------------------------------------------------------------------------------------

def pgd_batched(model, x, y):
    return fx.attacks.pgd(model, x, y, eps=PGD_EPS, norm="l2", steps=PGD_STEPS, step_size=PGD_STEP, clamp=(0.0, 1.0))


def pgd_seed_loop(model, x, y):
    out = []
    for n in range(x.shape[0]):
        x0 = x[n:n + 1]
        image = x0.clone().requires_grad_(True)
        opt = torch.optim.SGD([image], lr=PGD_STEP)
        for _ in range(PGD_STEPS):
            opt.zero_grad()
            model.zero_grad()
            (-F.cross_entropy(model(image), y[n:n + 1])).backward()
            with torch.no_grad():
                image.grad /= image.grad.norm().clamp_min(1e-30)  # the normalized L2 step
            opt.step()
            with torch.no_grad():
                delta = image - x0
                delta *= torch.clamp(PGD_EPS / delta.norm().clamp_min(1e-30), max=1.0)
                image.copy_((x0 + delta).clamp(0.0, 1.0))
        out.append(image.detach())
    model.zero_grad(set_to_none=True)
    return torch.cat(out)


def workloads(quick: bool) -> list[Workload]:
    sizes = SIZES[quick]
    N, M = sizes["step"], sizes["pgd"]
    common = dict(group="applications", model="mlp")
    return [
        Workload(name=f"gradient(mlp,N={N})", quantity="gradient", N=N, build=_inputs(N),
                 impls={"autograd-loop": gradient}, reference=gradient, **common),
        Workload(name=f"sgd_step(mlp,N={N})", quantity="sgd_step", N=N, build=_inputs(N),
                 impls={"autograd-loop": sgd_step}, reference=sgd_step, **common),
        Workload(name=f"sam_step(mlp,N={N})", quantity="sam_step", N=N, build=_inputs(N),
                 impls={"fisherext": fisher_sam_step, "autograd-loop": fisher_sam_step_loop},
                 reference=fisher_sam_step_loop, **common),
        Workload(name=f"pgd(mlp,N={M})", quantity="pgd", N=M, build=_inputs(M),
                 impls={"fisherext": pgd_batched, "autograd-loop": pgd_seed_loop}, reference=pgd_seed_loop,
                 **common),
    ]
