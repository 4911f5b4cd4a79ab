r"""Curvature-vector products (K3): Hessian- and GGN-vector products of the digits MLP, and the gradient
they are measured against.

Model and data as in ``bench.fisher_workloads`` and PEERS.md: the MLP 64-256-256-10 (ReLU, seeded, eval,
P = 85,002) on the first N = 1024 digits, mean cross-entropy, float32. Every impl returns the flat
product(s) of the mean loss's curvature with the same unit direction(s).

- ``gradient``: one plain gradient of the mean loss (``autograd-loop``). The targets are stated as
  multiples of this time: exact HVP ≤ 3×, GGN-vector product ≤ 2.5×; read the ratio off the same run.
- ``hvp``: ``fisherext.hvp(curvature="hessian")`` against double backprop written by hand (``autograd-loop``),
  ``torch.func`` (a JVP of the gradient) and curvlinops' ``HessianLinearOperator``. With K = 16
  directions fisherext shares one graph across them; the baseline runs 16 separate double backprops.
- ``ggn_vp``: ``fisherext.hvp(curvature="ggn")`` against ``torch.func`` (a JVP for J v, the softmax Hessian
  written out, a VJP), the double-VJP trick by hand (``autograd-loop``) and curvlinops'
  ``GGNLinearOperator``.

curvlinops is an optional, bench-only peer (``pip install curvlinops-for-pytorch``, measured with 3.0.1);
it is built with ``check_deterministic=False`` so that its constructor's extra passes are not timed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

import fisherext
from fisherext.experiments.demo import build_mlp, load_digits_tensors

from .workloads import WORKLOADS, Workload

N = 1024


def mlp_inputs(generator, K):
    x, y = load_digits_tensors()
    model = build_mlp().eval()
    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(K, P, generator=generator)
    return {"model": model, "x": x[:N], "y": y[:N], "V": V / V.norm(dim=1, keepdim=True)}


def _split(model, v):
    params = list(model.parameters())
    return [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def gradient(model, x, y, V):
    return _flat(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))


# ---- Hessian-vector products ------------------------------------------------------------------------

def fisherext_hvp(model, x, y, V):
    return fisherext.hvp(model, F.cross_entropy, (x, y), V.T).T  # columns in and out; the other impls take rows


def double_backprop(model, x, y, V):
    """One double backprop per direction: ∇(∇Lᵀv), the gradient's graph rebuilt each time."""
    params = list(model.parameters())
    rows = []
    for v in V:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        rows.append(_flat(torch.autograd.grad(g, params, _split(model, v))))
    return torch.stack(rows)


def torch_func_hvp(model, x, y, V):
    names = [n for n, _ in model.named_parameters()]
    primals = {n: p.detach() for n, p in model.named_parameters()}
    gradient_of = grad(lambda ps: F.cross_entropy(functional_call(model, ps, (x,)), y))
    return torch.stack([_flat(jvp(gradient_of, (primals,), (dict(zip(names, _split(model, v))),))[1].values())
                        for v in V])


def _curvlinops(cls, model, x, y, V):
    op = cls(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)], check_deterministic=False)
    return torch.stack([op @ v for v in V])


def curvlinops_hvp(model, x, y, V):
    from curvlinops import HessianLinearOperator

    return _curvlinops(HessianLinearOperator, model, x, y, V)


# ---- GGN-vector products ----------------------------------------------------------------------------

def fisherext_ggn(model, x, y, V):
    return fisherext.hvp(model, F.cross_entropy, (x, y), V.T, curvature="ggn").T


def _softmax_hessian(out, u):
    p = out.softmax(-1)
    return (p * u - p * (p * u).sum(-1, keepdim=True)) / out.shape[0]


def double_vjp_ggn(model, x, y, V):
    """J v by differentiating Jᵀu with respect to u (reverse mode only), then Jᵀ Λ J v; per direction."""
    params = list(model.parameters())
    rows = []
    for v in V:
        out = model(x)
        u = torch.zeros_like(out, requires_grad=True)
        Ju = torch.autograd.grad(out, params, u, create_graph=True)
        Jv = torch.autograd.grad(Ju, u, _split(model, v))[0]
        rows.append(_flat(torch.autograd.grad(out, params, _softmax_hessian(out.detach(), Jv))))
    return torch.stack(rows)


def torch_func_ggn(model, x, y, V):
    names = [n for n, _ in model.named_parameters()]
    primals = {n: p.detach() for n, p in model.named_parameters()}

    def f(ps):
        return functional_call(model, ps, (x,))

    rows = []
    for v in V:
        out, Jv = jvp(f, (primals,), (dict(zip(names, _split(model, v))),))
        _, pullback = vjp(f, primals)
        rows.append(_flat(pullback(_softmax_hessian(out, Jv))[0].values()))
    return torch.stack(rows)


def curvlinops_ggn(model, x, y, V):
    from curvlinops import GGNLinearOperator

    return _curvlinops(GGNLinearOperator, model, x, y, V)


# ---- the workloads ----------------------------------------------------------------------------------

HVP_WORKLOADS = [
    Workload("gradient", mlp_inputs, dict(K=1), {"autograd-loop": gradient}, baseline="autograd-loop"),
    *(Workload("hvp", mlp_inputs, dict(K=K),
               {"autograd-loop": double_backprop, "fisherext": fisherext_hvp, "torch.func": torch_func_hvp,
                "curvlinops": curvlinops_hvp}, baseline="autograd-loop", quick_dims=dict(K=min(K, 4)))
      for K in (1, 16)),
    *(Workload("ggn_vp", mlp_inputs, dict(K=K),
               {"autograd-loop": double_vjp_ggn, "fisherext": fisherext_ggn, "torch.func": torch_func_ggn,
                "curvlinops": curvlinops_ggn}, baseline="autograd-loop", quick_dims=dict(K=min(K, 4)))
      for K in (1, 16)),
]

WORKLOADS.extend(HVP_WORKLOADS)
