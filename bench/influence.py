r"""The CG influence workload: the influence of 1000 training digits on 100 test digits.

Model: an MLP 64-32-10 (tanh, seeded, P = 2410, float64), trained with 150 full-batch Adam steps
(lr 1e-2) on the first 1000 of a seeded permutation of scikit-learn's digits (pixels / 16); the test
points are the next 100 (quick: 200 training and 8 test points). All parameters, the Hessian H of the
mean cross-entropy, damping λ = 1e-2 (H + λI is positive definite there: H's eigenvalues lie in
[−1.3e-3, 0.75]). Every impl returns Koh & Liang's

.. math:: I[t, i] = -\nabla\ell(z^{test}_t)^\top (H + \lambda I)^{-1} \nabla\ell(z_i) \qquad [N_{test}, N_{train}].

- reference: H densely (``torch.func.jacrev`` twice: reverse over reverse mode, of the mean loss in the
  flat parameters), a Cholesky solve, per-sample gradients by ``vmap(grad)``: float64 throughout,
  independent of fisherext.
- ``fisherext``: ``InfluenceFunctions(solver="cg")``, all test points as the right-hand sides of one
  batched CG (tol 1e-6), then the training gradients streamed.
- ``autograd-loop``: seed 002 in PyTorch. Per test point, scipy's ``fmin_cg`` minimizes
  :math:`\frac12 x^\top(H+\lambda I)x - v^\top x` (v its test gradient), the objective and its gradient
  each calling the finite-difference HVP :math:`(g(\theta+rv) - g(\theta-rv))/2r` averaged over
  minibatches of 50 training points; then one backward pass per training point gives
  :math:`-x^\top\nabla\ell(z_i)`. Departures from the seed, to make it correct and as accurate as CG at
  tol 1e-6: θ ± rv is written from a saved copy of θ (the seed adds +r, −2r, +r in place and drifts),
  r = 1e-4 relative to ‖v‖ (the seed's absolute 1e-2 caps the accuracy near 1e-4), gtol 1e-6·‖v‖∞ and a
  higher maxiter. Its test points are independent solves of equal cost, and 100 of them take minutes:
  it runs on the first 4 (quick: 1) and its time is scaled to all of them (the tables say so).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from fisherext import InfluenceFunctions

from .models import digits_tensors
from .workloads import Subset, Workload

DAMPING = 1e-2
SEED_BATCH = 50        # seed 002's minibatch size for the HVP average
FD_STEP = 1e-4         # r, relative to ‖v‖
REL_TOL = 1e-6         # both iterative solvers stop at this relative residual / gradient
HESSIAN_CHUNK = 256    # Hessian rows per vmapped backward pass of the reference (memory: ~0.5 GB)
SIZES = {False: dict(N_train=1000, N_test=100, loop_tests=4), True: dict(N_train=200, N_test=8, loop_tests=1)}


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


def influence_inputs(N_train, N_test):
    x, y = digits_tensors()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    train, test = perm[:N_train], perm[N_train:N_train + N_test]
    x = x.double()
    return {"model": trained_mlp(x[train], y[train]), "x_train": x[train], "y_train": y[train],
            "x_test": x[test], "y_test": y[test]}


# ---- the impls -------------------------------------------------------------------------------------

def fisherext_cg(model, x_train, y_train, x_test, y_test):
    inf = InfluenceFunctions(model, F.cross_entropy, (x_train, y_train), damping=DAMPING, solver="cg",
                             solver_kwargs=dict(tol=REL_TOL))
    return inf.influence((x_test, y_test))


def dense_reference(model, x_train, y_train, x_test, y_test):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(th, x, y):
        params = dict(zip(names, (t.view(s) for t, s in zip(th.split([s.numel() for s in shapes]), shapes))))
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    H = jacrev(jacrev(loss), chunk_size=HESSIAN_CHUNK)(theta, x_train, y_train)
    H += DAMPING * torch.eye(theta.numel(), dtype=theta.dtype)
    per_sample = vmap(grad(lambda th, x1, y1: loss(th, x1[None], y1[None])), in_dims=(None, 0, 0))
    g_train, g_test = per_sample(theta, x_train, y_train), per_sample(theta, x_test, y_test)
    return -(g_test @ torch.cholesky_solve(g_train.T, torch.linalg.cholesky(H)))


def _flat_grad(model, params, x, y):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)])


def _fd_hvp(model, params, saved, batches, v, damping):
    """Seed 002's HVP_minibatch_val: mean over minibatches of (g(θ + rv) − g(θ − rv)) / 2r, plus λv;
    θ ± rv written from the saved θ, θ copied back from it."""
    r = FD_STEP / max(np.linalg.norm(v), 1e-300)
    v = torch.from_numpy(v).to(saved[0].device)
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
    return (total / len(batches) + damping * v).cpu().numpy()


def seed_loop(model, x_train, y_train, x_test, y_test):
    from scipy.optimize import fmin_cg

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    batches = list(zip(x_train.split(SEED_BATCH), y_train.split(SEED_BATCH)))
    rows = []
    for t in range(x_test.shape[0]):
        v = _flat_grad(model, params, x_test[t:t + 1], y_test[t:t + 1]).cpu().numpy()  # scipy's side
        hvp = lambda z: _fd_hvp(model, params, saved, batches, z, DAMPING)  # noqa: E731
        # the seed's get_fmin_loss and get_fmin_grad: each makes its own HVP
        ihvp = fmin_cg(f=lambda z: 0.5 * hvp(z) @ z - v @ z, x0=v, fprime=lambda z: hvp(z) - v,
                       gtol=REL_TOL * np.abs(v).max(), maxiter=10 * v.size, disp=False)
        s_test = torch.from_numpy(ihvp).to(x_test.device)
        # the seed's IF_val: one backward pass per training point (without its extra 1/N, so that all
        # impls compute the same I)
        rows.append(torch.stack([-(s_test @ _flat_grad(model, params, x_train[i:i + 1], y_train[i:i + 1]))
                                 for i in range(x_train.shape[0])]))
    return torch.stack(rows)


def workloads(quick: bool) -> list[Workload]:
    sizes = SIZES[quick]
    N_train, N_test, k = sizes["N_train"], sizes["N_test"], sizes["loop_tests"]
    first_tests = Subset(take=lambda inputs: {**inputs, "x_test": inputs["x_test"][:k], "y_test": inputs["y_test"][:k]},
                         expected=lambda reference: reference[:k], scale=N_test / k,
                         note=f"on the first {k} of {N_test} test points, time ×{N_test / k:g}")
    return [Workload(name=f"influence(N_train={N_train},N_test={N_test})", group="influence", quantity="influence",
                     build=lambda: influence_inputs(N_train, N_test),
                     impls={"fisherext": fisherext_cg, "autograd-loop": seed_loop}, reference=dense_reference,
                     subsets={"autograd-loop": first_tests},
                     reference_note="float64 dense Hessian, Cholesky solve (torch.func)")]
