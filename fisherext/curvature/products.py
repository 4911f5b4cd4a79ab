r"""Curvature-vector products of a model's mean loss over a data set: Hessian, Gauss-Newton, Fisher.

With outputs :math:`z_n = f(x_n;\theta)` [C], per-sample loss :math:`\ell(z_n, y_n)` and the mean loss
:math:`L(\theta) = \frac1N\sum_n \ell(z_n, y_n)` over all N samples of the data:

- Hessian: :math:`Hv = \nabla^2_\theta L\, v = \nabla_\theta (\nabla_\theta L^\top v)`, the gradient's
  graph differentiated once more (no loop over parameters or samples).
- Generalized Gauss-Newton: :math:`Gv = \frac1N\sum_n J_n^\top \Lambda_n J_n v` with
  :math:`J_n = \partial z_n/\partial\theta` and :math:`\Lambda_n = \nabla^2_z \ell`: a JVP gives
  :math:`J_n v`, the loss Hessian is applied in output space, a VJP maps back. For softmax cross-entropy
  :math:`\Lambda_n u = p\odot u - p(p^\top u)` is one fused kernel (``fisherext.ops.softmax_hvp``); any
  other ``loss_fn`` (torch's MSE, label-smoothed or ignore_index cross-entropy, BCE with logits, NLL of
  a log_softmax, outputs [N, T, C] flattened by the loss) by double backprop of ``loss_fn`` in z. The
  split is at the model's output: a LogSoftmax inside the model with ``nn.NLLLoss`` gives Λ = 0.
  G is positive semi-definite when the loss is convex in z; it drops the second-order terms of f that
  make H indefinite.
- Fisher: :math:`Fv = \frac1N\sum_n J_n^\top \hat\Lambda_n J_n v` with the Fisher's own output-space
  factor (``kind="true"``: the loss Hessian of the likelihood, so F = G for cross-entropy;
  ``"empirical"``: :math:`\hat\Lambda_n = \nabla_z\ell\,\nabla_z\ell^\top` at the data label, so
  :math:`Fv = \frac1N\sum_n g_n (g_n^\top v)` without forming any per-sample gradient;
  ``"mc"``: the same at labels sampled from the model). Normalization and kinds are those of
  ``fisherext.fisher``: :math:`F = \frac1N\sum_n F_n`.
- Finite differences: :math:`Hv \approx (\nabla L(\theta + rv) - \nabla L(\theta - rv)) / 2r`, error
  :math:`O(r^2)`, parameters moved by the perturbation kernels and restored bit for bit.

Data stream in batches; a batch of :math:`n_b` samples whose ``loss_fn`` returns its mean loss enters
with weight :math:`n_b / N`, so the result is the product for the mean loss over the whole data set
whatever the batching. Several vectors ``V`` [K, P] share a batch's forward pass and first backward
pass (its graph); each vector then costs one more backward.

Forward passes follow ``fisherext._core.conventions``: deterministic per sample (train-mode dropout and
batch-statistics BatchNorm refused), padding_idx lookups constant (so the dual forward of one vector,
the reverse-mode paths of several and the finite differences agree), attention by the math kernel
(which has second derivatives), outputs checked to be finite tensors.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from .. import ops
from .._core.checks import check_choice, check_eps, check_loss_fn, check_positive_int
from .._core.conventions import curvature_forward
from .._core.data import stream
from .._core.functional import FunctionalModel, grads
from .._core.likelihood import Cotangents, output_hessian_product
from .._core.perturbation import ParameterPerturbation
from .._core.entry import entry_point

METHODS = ("exact", "ggn", "fd")


# ---- losses --------------------------------------------------------------------------------------


# ---- products on one batch (each for the batch-mean loss) ------------------------------------------
#
# Measured on the digits MLP (CPU, N = 1024), per vector against one gradient: double backprop 2.8-3.0x,
# forward-over-reverse (torch.func jvp of grad, or forward-mode duals through a backward) 3.9-4.1x; for
# the Gauss-Newton product, a dual forward plus one backward 1.7-2.0x, the double-VJP form 2.3-2.6x for
# one vector but 1.45x per vector when K share its graph, vmap over the K vectors slower still (the work
# is GEMM-bound on CPU; vmapping batches launches, not flops). The paths below are the fastest of these.


def hessian_batch(fm: FunctionalModel, loss_fn, x, y, V: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """H_b V for the batch-mean loss: the gradient with its graph (double backprop, Pearlmutter's
    R-operator in reverse mode), then one backward through it per vector, sharing the graph. [K, P]"""
    leaves = fm.leaves()
    with torch.enable_grad():
        loss = loss_fn(fm.outputs(x, dict(zip(fm.names, leaves)), offset), y)
        g = grads([loss], leaves, [torch.ones_like(loss)], retain_graph=True, create_graph=True)
        K = V.shape[0]
        return torch.stack([torch.cat([h.reshape(-1) for h in grads(g, leaves, fm.unflat(V[k]),
                                                                           retain_graph=k < K - 1)])
                            for k in range(K)])


def _output_space_batch(fm: FunctionalModel, x, V, apply, offset: int) -> torch.Tensor:
    """Jᵀ A(J V) for the batch: J V [K, N, C], ``apply(out, JV)`` the output-space factor, then one VJP per
    vector. One vector: J v by forward-mode AD in the same forward pass that records the graph for the
    VJP. Several: J v_k = ∂(Jᵀu)/∂u · v_k, the double-VJP trick, every vector sharing one graph. [K, P]"""
    leaves = fm.leaves()
    K = V.shape[0]
    with torch.enable_grad():
        if K == 1:
            with fwAD.dual_level():
                dual = {n: fwAD.make_dual(p, t) for n, p, t in zip(fm.names, leaves, fm.unflat(V[0]))}
                out, Jv = fwAD.unpack_dual(fm.outputs(x, dual, offset))
                JV = (torch.zeros_like(out) if Jv is None else Jv)[None]
        else:
            out = fm.outputs(x, dict(zip(fm.names, leaves)), offset)
            u = torch.zeros_like(out, requires_grad=True)
            Ju = torch.autograd.grad(out, leaves, u, create_graph=True, allow_unused=True)
            JV = torch.stack([grads(Ju, [u], fm.unflat(V[k]), retain_graph=True)[0] for k in range(K)])
        U = apply(out.detach(), JV)
        return torch.stack([torch.cat([g.reshape(-1) for g in grads([out], leaves, [U[k]], retain_graph=k < K - 1)])
                            for k in range(K)])


def ggn_batch(fm: FunctionalModel, loss_fn, x, y, V: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """G_b V = Jᵀ ∇²_z L_b J V for the batch-mean loss L_b. [K, P]"""
    return _output_space_batch(fm, x, V, lambda out, JV: output_hessian_product(loss_fn, out, y, JV), offset)


def fisher_batch(fm: FunctionalModel, loss: str, kind: str, x, y, V: torch.Tensor, *, mc_samples=1,
                 generator=None, offset=0, class_dim=None, ignore_index=-100) -> torch.Tensor:
    """F_b V = (1/n_b) Σ_n J_nᵀ Λ̂_n J_n V, Λ̂_n from the cotangents of ``fisherext.fisher`` (outputs
    [N, C], or with positions [N, T, C] / [N, C, H, W]: a sum over the positions that count). [K, P]"""

    def apply(out, JV):
        n = out.shape[0]
        if kind == "true" and loss == "mse":  # Gaussian likelihood with unit variance: Λ = I
            return JV / n
        c = Cotangents(out, y, kind, loss, mc_samples=mc_samples, generator=generator, class_dim=class_dim,
                       ignore_index=ignore_index)
        if kind == "true":  # Λ u = p⊙u − p(pᵀu) at every position, by the fused kernel, 0 where ignored
            N, T, C = c.rows.shape
            U = JV.movedim(c.axis + 1, -1).reshape(-1, N * T, C)
            U = ops.softmax_hvp(c.rows.reshape(N * T, C), U).view(-1, N, T, C)
            if c.valid is not None:
                U = U * c.valid[..., None].to(U.dtype)
            return U.reshape(-1, *c.moved_shape).movedim(-1, c.axis + 1) / n
        # Λ̂_n u = Σ_m w_m c_mn (c_mnᵀ u): the M labels' outer products, never a per-sample gradient
        cot = c.all().reshape(c.K, n, -1)
        coef = torch.einsum("mne,kne->kmn", cot, JV.reshape(JV.shape[0], n, -1)) * c.weights[None, :, None]
        return torch.einsum("kmn,mne->kne", coef, cot).reshape(JV.shape) / n

    return _output_space_batch(fm, x, V, apply, offset)


def _mean_loss_grad(fm: FunctionalModel, loss_fn, data, batch_size) -> torch.Tensor:
    """∇L(θ) of the mean loss over the data at the model's current parameters, flat [P]."""

    def batch_grad(x, y, offset):
        leaves = fm.leaves()
        with torch.enable_grad():
            loss = loss_fn(fm.outputs(x, dict(zip(fm.names, leaves)), offset), y)
            return torch.cat([t.reshape(-1) for t in grads([loss], leaves, [torch.ones_like(loss)])])[None]

    return stream(fm.model, data, batch_size, batch_grad)[0]


def fd_product(fm: FunctionalModel, loss_fn, data, V: torch.Tensor, r: float, batch_size=None) -> torch.Tensor:
    """(∇L(θ + r v) − ∇L(θ − r v)) / 2r for every row v of V, restoring θ bit for bit. [K, P]"""
    state = ParameterPerturbation(list(zip(fm.names, fm.params)))
    rows = []
    try:
        for v in V:
            v = v.contiguous()
            state.set(v, r)
            plus = _mean_loss_grad(fm, loss_fn, data, batch_size)
            state.set(v, -r)
            minus = _mean_loss_grad(fm, loss_fn, data, batch_size)
            rows.append((plus - minus) / (2 * r))
    finally:
        state.restore()
    return torch.stack(rows)


@entry_point
def hvp(model: nn.Module, loss_fn, data, v: torch.Tensor, *, method: str = "exact", r: float = 1e-3, params=None,
        batch_size: int | None = None) -> torch.Tensor:
    r"""Hessian-vector product of the mean loss over ``data`` (see the module docstring).

    Args:
        model: maps inputs x [N, ...] to outputs (e.g. logits [N, C]).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch's mean loss (e.g. ``F.cross_entropy``).
        data: a DataLoader, a Dataset, or an (x, y) tuple of tensors; streamed in batches.
        v: one vector [P] or K vectors [K, P] over the selected parameters (flat, in
            ``model.named_parameters()`` order).
        method: "exact" (Hv, double backprop), "ggn" (Gv, the Gauss-Newton matrix) or "fd"
            (central finite differences of the gradient with step ``r``).
        params: None (all parameters that require grad), or names, modules or tensors.
        batch_size: samples per batch for tensor or Dataset data (a positive int).
    Returns:
        Tensor of v's shape.

    The forward passes follow ``fisherext._core.conventions``: a model in train mode with dropout (or BatchNorm
    on batch statistics) is refused, padding_idx lookups are constants, attention runs the math kernel.
    """
    check_choice("method", method, METHODS)
    check_loss_fn(loss_fn)
    check_positive_int("batch_size", batch_size, optional=True)
    if method == "fd":
        r = check_eps(r, name="r")
    fm = FunctionalModel(model, params)
    V, single = fm.vectors(v)
    with curvature_forward(model):  # entered before fd_product moves any parameter
        if method == "fd":
            out = fd_product(fm, loss_fn, data, V, r, batch_size)
        else:
            batch = hessian_batch if method == "exact" else ggn_batch
            out = stream(model, data, batch_size, lambda x, y, offset: batch(fm, loss_fn, x, y, V, offset))
    return out[0] if single else out


__all__ = ["FunctionalModel", "METHODS", "fisher_batch", "ggn_batch", "hessian_batch", "hvp"]
