r"""Perturbation workloads (K2): finite-difference Fisher quadratics and the perturb/restore step itself.

Model: seed 001's network shape scaled up, Linear(64, 256)-Tanh-Linear(256, 256)-Tanh-Linear(256, 10)-
LogSoftmax (seeded, eval mode, P = 85,002), on scikit-learn's digits (pixels / 16, float32, the first N,
tiled where N > 1797); ε = 1e-3, the seed's default. Every impl returns one value per input (or per
direction and input), so ``bench.run`` checks it against the baseline.

- ``fd_quadratic``: seed 001's ``fisher_quadratic_form`` called once per input (batch of one, each
  parameter tensor perturbed in place through ``.data`` by ±εv_t, saved and put back with ``deepcopy``)
  against ``fisherext.fd_quadratic`` on all N inputs with the same direction v (the seed's recipe:
  ∇θ max log p(·|x₀)). The seed sums only the diagonal blocks vₜᵀFₙ[t,t]vₜ, fisherext the full vᵀFₙv,
  so their rel_err is the size of the cross-tensor terms the seed drops, not an error of fisherext;
  ``torch.func`` (the exact vᵀFₙv by one forward-mode JVP, no finite differences) lands on fisherext's
  value, not the seed's.
- ``fd_quadratic_block``: the same seed loop against ``fisherext.fd_quadratic(block=True)``, which
  computes the seed's block-diagonal quantity: the like-for-like speed comparison (rel_err: float32
  finite-difference round-off only).
- ``perturb_restore``: 128 parameter tensors of random sizes 1..max_size (max_size 4096: 268,260 floats;
  256 and 65536 bracket it: per-tensor overhead against memory traffic):
  ``ParameterPerturbation.set`` from the flat direction (one ``unflatten_axpy_`` call) + ``restore``
  (one more, copying the flat saved vector back) against a Python loop of
  ``p.data.copy_(s); p.data.add_(v, alpha=ε)`` and ``p.data.copy_(s)`` per tensor. The saved copy (and,
  for the loop, the direction split per tensor) is made once per model, as in a finite-difference loop.
  Where the tensors are large the work is memory-bound and the ratio tends to the bytes moved, 7 passes
  over the parameters for the loop against 5 for the kernels (1.4x); each call returns the perturbed value of the largest tensor (one small clone in
  both impls), and the tests check every tensor and the bitwise restore.
- ``fd_directions``: K unit directions over N inputs: ``fd_quadratic_directions`` (the 2K perturbed
  models in one batched forward) against K separate ``fd_quadratic`` calls (``reference``) and a
  hand-written loop that sets θ ± εv_k through ``.data`` per tensor and runs the batch (``autograd-loop``).
  fisherext runs its default strategy: on CPU "linear" (one forward in which each nn.Linear adds
  ±ε V_k h to the rows of direction k) for N ≤ 16 inputs, "in_place" (2K forwards, parameters moved by
  the multi-tensor kernel) above. No strategy saves arithmetic against separate evaluations: they save
  per-evaluation overhead and memory traffic. So batching pays where evaluations are small (a few
  inputs, as in seed 001's per-input analysis, or a GPU, where a small forward is launch-bound) and not
  where one forward of N inputs already keeps the CPU busy; the workload runs at both ends, N = 8 and
  N = 256.
"""
from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

import fisherext
from fisherext.experiments.demo import load_digits_tensors
from fisherext._core.perturbation import ParameterPerturbation

from .workloads import WORKLOADS, Workload

EPS = 1e-3


# ---- inputs ----------------------------------------------------------------------------------------

def seed_network(seed: int = 0) -> nn.Sequential:
    """Seed 001's Linear-Tanh-Linear-LogSoftmax, widened to the digits MLP's 64-256-256-10."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                             nn.Linear(256, 10), nn.LogSoftmax(dim=1)).eval()


def _digits(N):
    x, _ = load_digits_tensors()
    return x.repeat(-(-N // x.shape[0]), 1)[:N]


def seed_direction(model, x0):
    """Seed 001's vector: the gradient of the largest log-probability of one input, flattened."""
    grads = torch.autograd.grad(model(x0).max(), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def quadratic_inputs(generator, N):
    model = seed_network()
    x = _digits(N)
    return {"model": model, "x": x, "v": seed_direction(model, x[:1]), "eps": EPS}


def directions_inputs(generator, K, N):
    model = seed_network()
    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(K, P, generator=generator)
    return {"model": model, "x": _digits(N), "V": V / V.norm(dim=1, keepdim=True), "eps": EPS}


class TensorList(nn.Module):
    def __init__(self, tensors):
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(t) for t in tensors)


def restore_inputs(generator, tensors, max_size):
    sizes = torch.randint(1, max_size + 1, (tensors,), generator=generator).tolist()
    model = TensorList(torch.randn(s, generator=generator) for s in sizes)
    return {"model": model, "v": torch.randn(sum(sizes), generator=generator), "eps": EPS}


# ---- fd_quadratic: seed 001 against fisherext --------------------------------------------------------

def seed_quadratic_form(network, input_data, vector, epsilon):
    """FISHER_OPERATION.fisher_quadratic_form of seed 001, as written there (one input, batch of one)."""
    fisher_sum = 0
    for i, parameter in enumerate(network.parameters()):
        store_data = copy.deepcopy(parameter.data)
        parameter.data += epsilon * vector[i]
        log_softmax_output1 = network(input_data)
        softmax_output1 = F.softmax(log_softmax_output1, dim=1)
        parameter.data -= 2 * epsilon * vector[i]
        log_softmax_output2 = network(input_data)
        softmax_output2 = F.softmax(log_softmax_output2, dim=1)
        parameter.data = store_data
        fisher_sum += (((log_softmax_output1 - log_softmax_output2) / (2 * epsilon))
                       * ((softmax_output1 - softmax_output2) / (2 * epsilon))).sum()
    return fisher_sum


def seed_loop(model, x, v, eps):
    vector = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in model.parameters()]), model.parameters())]
    return torch.stack([seed_quadratic_form(model, x[n:n + 1], vector, eps) for n in range(x.shape[0])]).detach()


def fisherext_quadratic(model, x, v, eps):
    return fisherext.fd_quadratic(model, x, v, eps=eps)


def fisherext_block_quadratic(model, x, v, eps):
    return fisherext.fd_quadratic(model, x, v, eps=eps, block=True)


def torch_func_quadratic(model, x, v, eps):
    """The exact vᵀF_nv (true Fisher) for all inputs: Jv by one JVP, then (Jv)ᵀ(diag p - ppᵀ)(Jv)."""
    names = [n for n, _ in model.named_parameters()]
    primals = tuple(p.detach() for p in model.parameters())
    tangents = tuple(t.view_as(p) for t, p in zip(v.split([p.numel() for p in primals]), primals))
    with torch.no_grad():
        out, Jv = jvp(lambda *ps: functional_call(model, dict(zip(names, ps)), (x,)), primals, tangents)
        p = out.softmax(1)
        return (p * Jv.square()).sum(1) - (p * Jv).sum(1).square()


# ---- perturb_restore: one multi-tensor call against a loop over tensors ------------------------------

_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepared(model, v, kind):
    """Made once per model and reused by every call: the saved parameters, v split per tensor, and the
    largest parameter (whose perturbed value each call returns)."""
    key = (kind, id(v))
    cache = _STATE.setdefault(model, {})
    if key not in cache:
        params = list(model.parameters())
        largest = max(params, key=lambda p: p.numel())
        if kind == "fisherext":
            cache[key] = (ParameterPerturbation(list(model.named_parameters())), largest)
        else:
            vs = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]
            cache[key] = (params, [p.detach().clone() for p in params], vs, largest)
    return cache[key]


def fisherext_set_restore(model, v, eps):
    state, largest = _prepared(model, v, "fisherext")
    state.set(v, eps)
    probe = largest.detach().clone()
    state.restore()
    return probe


def loop_set_restore(model, v, eps):
    params, saved, vs, largest = _prepared(model, v, "loop")
    for p, s, t in zip(params, saved, vs):
        p.data.copy_(s)
        p.data.add_(t, alpha=eps)
    probe = largest.detach().clone()
    for p, s in zip(params, saved):
        p.data.copy_(s)
    return probe


# ---- fd_directions: K directions in one batched pass ------------------------------------------------

def fisherext_directions(model, x, V, eps):
    return fisherext.fd_quadratic_directions(model, x, V.T, eps=eps).T  # the rows [K, P] as columns [P, K]


def separate_calls(model, x, V, eps):
    return torch.stack([fisherext.fd_quadratic(model, x, V[k], eps=eps) for k in range(V.shape[0])])


def hand_loop_directions(model, x, V, eps):
    """Per direction: θ ± εv set through .data tensor by tensor (all tensors at once: the full vᵀF_nv),
    one batched forward each, the central-difference formula, θ copied back."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    rows = []
    with torch.no_grad():
        for v in V:
            vs = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]
            outs = []
            for sign in (1.0, -1.0):
                for p, s, t in zip(params, saved, vs):
                    p.data.copy_(s)
                    p.data.add_(t, alpha=sign * eps)
                outs.append(torch.log_softmax(model(x), 1))
            for p, s in zip(params, saved):
                p.data.copy_(s)
            plus, minus = outs
            rows.append(((plus - minus) * (plus.exp() - minus.exp())).sum(1) / (2 * eps) ** 2)
    return torch.stack(rows)


# ---- the workloads ----------------------------------------------------------------------------------

PERTURB_WORKLOADS = [
    Workload("fd_quadratic", quadratic_inputs, dict(N=256),
             {"autograd-loop": seed_loop, "fisherext": fisherext_quadratic, "torch.func": torch_func_quadratic},
             baseline="autograd-loop", quick_dims=dict(N=32)),
    Workload("fd_quadratic_block", quadratic_inputs, dict(N=256),
             {"autograd-loop": seed_loop, "fisherext": fisherext_block_quadratic},
             baseline="autograd-loop", quick_dims=dict(N=32)),
    *(Workload("perturb_restore", restore_inputs, dict(tensors=128, max_size=m),
               {"autograd-loop": loop_set_restore, "fisherext": fisherext_set_restore}, baseline="autograd-loop")
      for m in (256, 4096, 65536)),
    *(Workload("fd_directions", directions_inputs, dict(K=16, N=N),
               {"reference": separate_calls, "fisherext": fisherext_directions, "autograd-loop": hand_loop_directions},
               baseline="reference", quick_dims=dict(K=4, N=N)) for N in (8, 256)),
]

# One registry: bench.workloads imports this module at its end, so --only, bench.run and pytest-benchmark see these.
WORKLOADS.extend(PERTURB_WORKLOADS)
