r"""Influence-function workloads: the influence of 1000 training digits on test digits, fisherext against
seed 002's recipe.

Model: an MLP 64-32-10 (tanh, seeded, P = 2410, float64), trained with 150 full-batch Adam steps
(lr 1e-2) on the first 1000 of a seeded permutation of scikit-learn's digits (pixels / 16); the test
points are the next N_test. All parameters, the Hessian of the mean cross-entropy, damping λ = 1e-2
(checked: the Hessian's eigenvalues lie in [−1.3e-3, 0.75], so H + λI is positive definite, κ ≈ 86). Every impl returns the same quantity, Koh & Liang's

.. math:: I[t, i] = -\nabla\ell(z^{test}_t)^\top (H + \lambda I)^{-1} \nabla\ell(z_i)

[N_test, N_train], float64, and ``bench.run`` checks each against the baseline:

- ``reference`` (the baseline): ``InfluenceFunctions(solver="exact")``, the dense H and a Cholesky
  solve: the exact answer the other two are measured against (rel_err).
- ``fisherext``: ``InfluenceFunctions(solver="cg")``, all N_test right-hand sides in one batched CG
  (its default tol 1e-6: rel_err ~5e-7 against the dense solve), then per-sample training gradients by vmap.
- ``autograd-loop``: seed 002 re-implemented in PyTorch. Per test point: scipy's ``fmin_cg`` minimizes
  :math:`\frac12 x^\top(H+\lambda I)x - v^\top x` (v the test gradient, x₀ = v), where both the objective
  and its gradient call the finite-difference HVP :math:`(g(\theta+rv) - g(\theta-rv))/2r` averaged
  over minibatches of 50 training points; then a loop over the training points, one backward pass each,
  gives :math:`-x^\top\nabla\ell(z_i)`. Departures from the seed, each to make it correct and as accurate
  as the others: θ ± rv is set from a saved copy of θ and restored from it (the seed adds +r, −2r, +r in
  place and drifts the weights); r = 1e-4 relative to ‖v‖ instead of the seed's absolute 1e-2 (whose
  O(r²) truncation error would cap the accuracy near 1e-4); ``gtol`` tightened to 1e-6·‖v‖∞ and
  ``maxiter`` raised from the seed's 50 so that it converges as far as it can: its line search on the
  finite-difference objective stops with "precision loss" near rel_err 2e-6 (about 200 objective and
  200 gradient calls, 400 FD-HVPs over all minibatches, per test point), and no tighter gtol helps. So
  fisherext runs at the matching accuracy, CG tol 1e-6.

The seed's loop costs the same for every test point (one independent solve each), and at N_test = 100
it would take several minutes a call. So it runs on N_test = 4 (``influence(N_train=1000,N_test=4)``,
all three impls, rel_err of each), fisherext and the reference also on N_test = 100; the speed-up
reported is per test point: (autograd-loop median at N_test = 4) / 4 divided by (fisherext median at
N_test = 100) / 100. It favours the seed, whose per-test-point cost includes no shared work to amortize,
while fisherext's includes its share of the training gradients.

Measured (``python -m bench.run --only influence``, CPU, 2 threads, shared machine, median of 3):

| workload | impl | median s | rel_err vs dense solve |
|---|---|---:|---:|
| N_test = 4 | reference (exact) | 3.77 | 0 |
| N_test = 4 | fisherext (CG) | 0.236 | 8.9e-7 |
| N_test = 4 | autograd-loop (seed) | 21.9 | 3.1e-6 |
| N_test = 100 | reference (exact) | 4.45 | 0 |
| N_test = 100 | fisherext (CG) | 2.91 | 4.9e-7 |

Per test point: seed 21.9 s / 4 = 5.46 s, fisherext 2.91 s / 100 = 0.029 s: 188× (92× at N_test = 4,
like for like), with fisherext the more accurate of the two.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fisherext.experiments.demo import load_digits_tensors
from fisherext import InfluenceFunctions

from .workloads import WORKLOADS, Workload

DAMPING = 1e-2
SEED_BATCH = 50        # seed 002's minibatch size for the HVP average
FD_STEP = 1e-4         # r, relative to ‖v‖ (see the module docstring)
REL_TOL = 1e-6         # both iterative solvers stop at this relative residual / gradient


# ---- inputs ----------------------------------------------------------------------------------------

def trained_mlp(x, y, steps=150, seed=0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def influence_inputs(generator, N_train, N_test):
    x, y = load_digits_tensors()
    perm = torch.randperm(x.shape[0], generator=generator)
    train, test = perm[:N_train], perm[N_train:N_train + N_test]
    x = x.double()
    return {"model": trained_mlp(x[train], y[train]), "x_train": x[train], "y_train": y[train],
            "x_test": x[test], "y_test": y[test]}


# ---- fisherext ----------------------------------------------------------------------------------------

def fisherext_cg(model, x_train, y_train, x_test, y_test):
    inf = InfluenceFunctions(model, F.cross_entropy, (x_train, y_train), damping=DAMPING, solver="cg",
                             solver_kwargs=dict(tol=REL_TOL))
    return inf.influence((x_test, y_test))


def fisherext_exact(model, x_train, y_train, x_test, y_test):
    inf = InfluenceFunctions(model, F.cross_entropy, (x_train, y_train), damping=DAMPING, solver="exact")
    return inf.influence((x_test, y_test))


# ---- seed 002 in PyTorch ---------------------------------------------------------------------------------

def _flat_grad(model, params, x, y):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)])


def _fd_hvp(model, params, saved, batches, v, damping):
    """Seed 002's HVP_minibatch_val: mean over minibatches of (g(θ + rv) − g(θ − rv)) / 2r, plus λv.
    θ ± rv is written from the saved θ and θ is copied back from it (bitwise), never +r −2r +r."""
    r = FD_STEP / max(np.linalg.norm(v), 1e-300)
    v = torch.from_numpy(v)
    steps = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]
    total = torch.zeros_like(v)
    try:
        for x, y in batches:
            grads = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, s, t in zip(params, saved, steps):
                        p.copy_(s + sign * r * t)
                grads.append(_flat_grad(model, params, x, y))
            total += (grads[0] - grads[1]) / (2 * r)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return (total / len(batches) + damping * v).numpy()


def seed_loop(model, x_train, y_train, x_test, y_test):
    from scipy.optimize import fmin_cg

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    batches = list(zip(x_train.split(SEED_BATCH), y_train.split(SEED_BATCH)))
    rows = []
    for t in range(x_test.shape[0]):
        v = _flat_grad(model, params, x_test[t:t + 1], y_test[t:t + 1]).numpy()
        hvp = lambda z: _fd_hvp(model, params, saved, batches, z, DAMPING)  # noqa: E731
        # the seed's get_fmin_loss and get_fmin_grad: each makes its own HVP
        ihvp = fmin_cg(f=lambda z: 0.5 * hvp(z) @ z - v @ z, x0=v, fprime=lambda z: hvp(z) - v,
                       gtol=REL_TOL * np.abs(v).max(), maxiter=10 * v.size, disp=False)
        s_test = torch.from_numpy(ihvp)
        # the seed's IF_val: one backward pass per training point (its extra 1/N is left out here, so all
        # impls compute the same I)
        rows.append(torch.stack([-(s_test @ _flat_grad(model, params, x_train[i:i + 1], y_train[i:i + 1]))
                                 for i in range(x_train.shape[0])]))
    return torch.stack(rows)


def influence_workload(N_test: int, impls: dict) -> Workload:
    return Workload("influence", influence_inputs, dict(N_train=1000, N_test=N_test), impls,
                    quick_dims=dict(N_train=200, N_test=min(N_test, 4)))


WORKLOADS.extend([
    influence_workload(4, {"reference": fisherext_exact, "fisherext": fisherext_cg, "autograd-loop": seed_loop}),
    influence_workload(100, {"reference": fisherext_exact, "fisherext": fisherext_cg}),
])
