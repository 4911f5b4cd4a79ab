r"""The ``torch.func`` impls: per-sample transforms (vmap over grad / jacrev), forward mode, functional_call.

Same quantities, normalizations and signatures as ``bench.loops`` (whose docstring states the math).
vmap materializes per-sample gradients [n, P] (and per-sample class Jacobians [n, C, P] for the true
Fisher), so the samples go in chunks of ``CHUNK`` / ``JACOBIAN_CHUNK``: unchunked, the digits MLP at
N = 1024 would hold 3.5 GB of Jacobians. There is no K-FAC in torch.func, and no finite differences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from .loops import softmax_hessian_product
from .models import math_attention

CHUNK = 256           # samples per vmap(grad): [256, P] per-sample gradients
JACOBIAN_CHUNK = 64   # samples per vmap(jacrev): [64, C, P] per-sample class Jacobians


def _functional(model):
    """Detached parameters (a dict in ``model.parameters()`` order) and the logits of one unbatched input."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def logits(params, x1):
        return functional_call(model, params, (x1[None],))[0]

    return params, logits


def _chunks(n: int, size: int):
    return ((start, min(n, start + size)) for start in range(0, n, size))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


def _per_sample_grads(model, x, y):
    """[n, P] per-sample gradients of −log p(y|x), one chunk of samples at a time."""
    params, logits = _functional(model)

    def loss(prm, x1, y1):  # gather, not [y1]: indexing by a vmapped label is data-dependent control flow
        return -torch.log_softmax(logits(prm, x1), 0).gather(0, y1[None])[0]

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    for a, b in _chunks(x.shape[0], CHUNK):
        yield _flat(per_sample(params, x[a:b], y[a:b]).values())


def _class_jacobians(model, x):
    """Per chunk: p [n, C] and the Jacobians of log p, [n, C, P]."""
    params, logits = _functional(model)
    jacobian = vmap(jacrev(lambda prm, x1: torch.log_softmax(logits(prm, x1), 0)), in_dims=(None, 0))
    for a, b in _chunks(x.shape[0], JACOBIAN_CHUNK):
        chunk = x[a:b]
        with torch.no_grad():
            p = torch.softmax(model(chunk), dim=1)
        J = jacobian(params, chunk).values()
        yield p, torch.cat([j.flatten(2) for j in J], dim=2)


def diag_empirical(model, x, y):
    return sum(G.square().sum(0) for G in _per_sample_grads(model, x, y)) / x.shape[0]


def full_empirical(model, x, y):
    return sum(G.T @ G for G in _per_sample_grads(model, x, y)) / x.shape[0]


def diag_true(model, x, y):
    return sum(torch.einsum("nc,ncp->p", p, J.square()) for p, J in _class_jacobians(model, x)) / x.shape[0]


def trace_true(model, x, y):
    return torch.cat([torch.einsum("nc,ncp->n", p, J.square()) for p, J in _class_jacobians(model, x)])


def _jvp_logits(model, x, v):
    """Logits [N, C] and J v [N, C] for the whole batch, by one forward-mode pass."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    primals = tuple(p.detach() for p in model.parameters() if p.requires_grad)
    tangents = tuple(t.view_as(p) for t, p in zip(v.split([p.numel() for p in primals]), primals))
    return jvp(lambda *ps: functional_call(model, dict(zip(names, ps)), (x,)), primals, tangents)


def quad_true(model, x, y, v):
    """vᵀF_nv = (Jv)ᵀ(diag p − ppᵀ)(Jv) per input."""
    with math_attention():  # forward mode, like second order, needs the math kernel
        out, Jv = _jvp_logits(model, x, v)
    p = out.softmax(1)
    return ((p * Jv.square()).sum(1) - (p * Jv).sum(1).square()).detach()


def _columns(model, V):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    primals = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    sizes = [p.numel() for p in primals.values()]
    for v in V.T:
        yield primals, {n: t.view_as(primals[n]) for n, t in zip(names, v.contiguous().split(sizes))}


def _flat_dict(d) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in d.values()])


def hvp(model, x, y, V):
    """Forward over reverse: the JVP of the gradient, per column."""
    gradient_of = grad(lambda ps: F.cross_entropy(functional_call(model, ps, (x,)), y))
    with math_attention():
        return torch.stack([_flat_dict(jvp(gradient_of, (primals,), (tangent,))[1])
                            for primals, tangent in _columns(model, V)], dim=1)


def ggn(model, x, y, V):
    """J v by a JVP, the softmax Hessian in logit space, Jᵀ by a VJP, per column."""
    columns = []
    with math_attention():
        for primals, tangent in _columns(model, V):
            def f(ps):
                return functional_call(model, ps, (x,))
            out, Jv = jvp(f, (primals,), (tangent,))
            _, pullback = vjp(f, primals)
            columns.append(_flat_dict(pullback(softmax_hessian_product(out, Jv))[0]))
    return torch.stack(columns, dim=1)


TORCH_FUNC = {
    "diag_empirical": diag_empirical, "diag_true": diag_true, "full_empirical": full_empirical,
    "trace_true": trace_true, "quad_true": quad_true, "hvp": hvp, "ggn": ggn, "ewc": diag_true,
}
