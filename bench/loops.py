r"""The ``autograd-loop`` impls: what the seeds do, in plain autograd, batch size 1 where the seeds loop.

They are the baseline the project is measured against, and, run in float64, the reference every impl's
relative error is taken against (``bench.matrix``). Each takes the signature of its quantity (the
peers' interface, ``bench.peers``): loss is the mean cross-entropy over class labels y, Fishers are the
mean over samples, :math:`F = \frac1N \sum_n F_n`, flat vectors follow ``model.parameters()``.

With :math:`g_{nc} = \nabla_\theta(-\log p_c(x_n))` and :math:`p_{nc}` the model's probabilities,
the true Fisher of input n is :math:`F_n = \sum_c p_{nc}\, g_{nc} g_{nc}^\top` (the exact expectation
over the C classes: one forward and C backward passes per input, as seed 001's ``fisher_trace``), the
empirical one :math:`g_n g_n^\top` with :math:`g_n` the gradient at the data label.

- ``diag_empirical`` / ``diag_true``: :math:`\frac1N\sum_n g_n\odot g_n` /
  :math:`\frac1N\sum_n\sum_c p_{nc}\,g_{nc}\odot g_{nc}`.
- ``full_empirical``: the N per-sample gradients stacked as G [N, P], then :math:`G^\top G / N` (one GEMM:
  the fastest form of the loop; P rank-one updates would take 30× longer).
- ``kfac``: per Linear/Conv2d layer (``model.modules()`` order), with :math:`\tilde a` the layer input
  (a Conv2d's unfolded patches, T positions per input) with a 1 appended for the bias and :math:`\delta_c`
  the gradient of :math:`-\log p_c` at the layer output,
  :math:`A = \frac1{NT}\sum_{n,t}\tilde a\tilde a^\top`,
  :math:`G = \frac1N\sum_n\sum_c p_{nc}\sum_t \delta_c\delta_c^\top`
  (fisherext's convention; compared up to the split of scale between the factors).
- ``trace_true`` / ``quad_true``: :math:`\mathrm{tr}F_n = \sum_c p_{nc}\lVert g_{nc}\rVert^2`,
  :math:`v^\top F_n v = \sum_c p_{nc}(g_{nc}^\top v)^2`, [N].
- ``fd_quad``: seed 001's ``fisher_quadratic_form`` per input (batch of one):
  :math:`\sum_c (\log p_c^+ - \log p_c^-)(p_c^+ - p_c^-)/(2\varepsilon)^2` at :math:`\theta \pm \varepsilon v`;
  two of the seed's bugs fixed: all parameter tensors move together (the seed perturbs one tensor at a
  time, which keeps only the diagonal blocks of :math:`v^\top F_n v`), and θ is copied back from a
  saved copy (not restored by ±ε arithmetic).
- ``hvp``: per column, one double backprop of the mean loss over the whole batch, :math:`\nabla(\nabla L^\top v)`.
- ``ggn``: per column, :math:`Jv` by differentiating :math:`J^\top u` in u (reverse mode only), the
  softmax Hessian :math:`\Lambda u = (p\odot u - p\,p^\top u)/N` applied, then :math:`J^\top\Lambda Jv`.
- ``gradient``: one plain gradient of the mean loss (the unit of the "× gradient" column).
- ``ewc``: seed 003's consolidation loop over the data set, one input at a time, accumulating
  ``p.grad ** 2 / N`` after ``backward()``; with the exact expectation over classes (weight :math:`p_c`)
  instead of the seed's argmax label, so that it is the true diagonal Fisher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fisherext import flatten

from .models import math_attention

FD_EPS = 1e-3  # seed 001's ε


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _split(params, v):
    return [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]


def _class_grads(model, params, x1):
    """(p_c, g_c) for each class c of one input x1 [1, ...]: one forward, C backward passes."""
    log_p = torch.log_softmax(model(x1), dim=1)[0]
    p = log_p.detach().exp()
    C = log_p.shape[0]
    for c in range(C):
        yield p[c], torch.autograd.grad(-log_p[c], params, retain_graph=c < C - 1)


def _label_grad(model, params, x1, y1):
    return torch.autograd.grad(F.cross_entropy(model(x1), y1), params)


def _inputs(x):
    return (x[n:n + 1] for n in range(x.shape[0]))


# ---- Fisher diagonals and the dense empirical Fisher ------------------------------------------------

def diag_empirical(model, x, y):
    params = _params(model)
    sums = [torch.zeros_like(p) for p in params]
    for n in range(x.shape[0]):
        for s, g in zip(sums, _label_grad(model, params, x[n:n + 1], y[n:n + 1])):
            s.addcmul_(g, g)
    return flatten(sums) / x.shape[0]


def diag_true(model, x, y):
    params = _params(model)
    sums = [torch.zeros_like(p) for p in params]
    for x1 in _inputs(x):
        for p_c, grads in _class_grads(model, params, x1):
            for s, g in zip(sums, grads):
                s.addcmul_(g, g, value=p_c)
    return flatten(sums) / x.shape[0]


def full_empirical(model, x, y):
    params = _params(model)
    G = torch.stack([flatten(_label_grad(model, params, x[n:n + 1], y[n:n + 1])) for n in range(x.shape[0])])
    return G.T @ G / x.shape[0]


# ---- K-FAC factors -------------------------------------------------------------------------------------

def _layer_rows(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The layer input of one sample as rows [T, I(+1)]: a Conv2d's patches unfolded, a 1 for the bias."""
    if isinstance(module, nn.Conv2d):
        rows = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)[0].T
    else:
        rows = a.reshape(-1, a.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def _output_rows(module: nn.Module, d: torch.Tensor) -> torch.Tensor:
    """The output gradient of one sample as rows [T, O] (a Conv2d's channels last)."""
    return d[0].flatten(1).T if isinstance(module, nn.Conv2d) else d.reshape(-1, d.shape[-1])


def kfac(model, x, y):
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    seen = {}
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.__setitem__(m, (inp[0], out))) for m in layers]
    try:
        A = [None] * len(layers)
        G = [None] * len(layers)
        for x1 in _inputs(x):
            log_p = torch.log_softmax(model(x1), dim=1)[0]
            p = log_p.detach().exp()
            outputs = [seen[m][1] for m in layers]
            for i, m in enumerate(layers):
                rows = _layer_rows(m, seen[m][0].detach())
                term = rows.T @ rows / rows.shape[0]
                A[i] = term if A[i] is None else A[i] + term
            C = log_p.shape[0]
            for c in range(C):
                deltas = torch.autograd.grad(-log_p[c], outputs, retain_graph=c < C - 1)
                for i, (m, d) in enumerate(zip(layers, deltas)):
                    rows = _output_rows(m, d)
                    term = p[c] * (rows.T @ rows)
                    G[i] = term if G[i] is None else G[i] + term
    finally:
        for h in hooks:
            h.remove()
    N = x.shape[0]
    return [(a / N, g / N) for a, g in zip(A, G)]


# ---- per-input measures ---------------------------------------------------------------------------------

def trace_true(model, x, y):
    params = _params(model)
    return torch.stack([sum(p_c * sum(g.square().sum() for g in grads)
                            for p_c, grads in _class_grads(model, params, x1)) for x1 in _inputs(x)])


def quad_true(model, x, y, v):
    params = _params(model)
    vs = _split(params, v)
    return torch.stack([sum(p_c * sum((g * t).sum() for g, t in zip(grads, vs)).square()
                            for p_c, grads in _class_grads(model, params, x1)) for x1 in _inputs(x)])


def fd_quad(model, x, y, v, eps=FD_EPS):
    params = _params(model)
    vs = _split(params, v)
    saved = [p.detach().clone() for p in params]
    rows = []
    with torch.no_grad():
        try:
            for x1 in _inputs(x):
                outs = []
                for sign in (1.0, -1.0):
                    for p, s, t in zip(params, saved, vs):
                        p.copy_(s).add_(t, alpha=sign * eps)
                    outs.append(torch.log_softmax(model(x1), dim=1))
                plus, minus = outs
                rows.append(((plus - minus) * (plus.exp() - minus.exp())).sum() / (2 * eps) ** 2)
        finally:
            for p, s in zip(params, saved):
                p.copy_(s)
    return torch.stack(rows)


# ---- curvature products and the gradient ---------------------------------------------------------------

def gradient(model, x, y):
    return flatten(torch.autograd.grad(F.cross_entropy(model(x), y), _params(model)))


def hvp(model, x, y, V):
    params = _params(model)
    columns = []
    with math_attention():
        for v in V.T:
            g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
            columns.append(flatten(torch.autograd.grad(g, params, _split(params, v.contiguous()))))
    return torch.stack(columns, dim=1)


def softmax_hessian_product(out: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Λu of the mean cross-entropy in the logits [N, C]: (p ⊙ u − p (pᵀu)) / N."""
    p = out.softmax(-1)
    return (p * u - p * (p * u).sum(-1, keepdim=True)) / out.shape[0]


def ggn(model, x, y, V):
    params = _params(model)
    columns = []
    with math_attention():
        for v in V.T:
            out = model(x)
            u = torch.zeros_like(out, requires_grad=True)
            Ju = torch.autograd.grad(out, params, u, create_graph=True)
            Jv = torch.autograd.grad(Ju, u, _split(params, v.contiguous()))[0]
            columns.append(flatten(torch.autograd.grad(out, params, softmax_hessian_product(out.detach(), Jv))))
    return torch.stack(columns, dim=1)


# ---- EWC: seed 003's consolidation loop ---------------------------------------------------------------

def ewc(model, x, y):
    params = _params(model)
    precision = [torch.zeros_like(p) for p in params]
    N = x.shape[0]
    for x1 in _inputs(x):
        log_p = torch.log_softmax(model(x1).view(1, -1), dim=1)[0]
        p = log_p.detach().exp()
        for c in range(log_p.shape[0]):
            model.zero_grad()
            (-log_p[c]).backward(retain_graph=c < log_p.shape[0] - 1)
            for s, q in zip(precision, params):
                s.add_(q.grad.square().mul_(p[c] / N))
    model.zero_grad(set_to_none=True)
    return flatten(precision)


LOOPS = {
    "gradient": gradient, "diag_empirical": diag_empirical, "diag_true": diag_true,
    "full_empirical": full_empirical, "kfac": kfac, "trace_true": trace_true, "quad_true": quad_true,
    "fd_quad": fd_quad, "hvp": hvp, "ggn": ggn, "ewc": ewc,
}
