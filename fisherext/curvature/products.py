r"""Curvature-vector products of a model's mean loss over a data set: Hessian, Gauss-Newton, Fisher.

With outputs :math:`z_n = f(x_n;\theta)` [C], per-sample loss :math:`\ell(z_n, y_n)` and the mean loss
:math:`L(\theta) = \frac1N\sum_n \ell(z_n, y_n)` over all N samples of the data:

- Hessian: :math:`Hv = \nabla^2_\theta L\, v = \nabla_\theta (\nabla_\theta L^\top v)`, the gradient's
  graph differentiated once more (no loop over parameters or samples).
- Generalized Gauss-Newton: :math:`Gv = \frac1N\sum_n J_n^\top \Lambda_n J_n v` with
  :math:`J_n = \partial z_n/\partial\theta` and :math:`\Lambda_n = \nabla^2_z \ell`: a JVP gives
  :math:`J_n v`, the loss Hessian is applied in output space, a VJP maps back. A likelihood's name
  (``"cross_entropy"``, ``"mse"``, ``"bce"``) applies its own :math:`\Lambda_n u`; for softmax
  cross-entropy (the name, or ``F.cross_entropy`` / ``nn.CrossEntropyLoss()`` with every label counted)
  :math:`\Lambda_n u = p\odot u - p(p^\top u)` is one fused kernel (``fisherext.ops.softmax_hvp``). Any
  other torch ``loss`` (torch's MSE, label-smoothed or ignore_index cross-entropy, BCE with logits, NLL of
  a log_softmax, outputs [N, T, C] flattened by the loss) by double backprop of ``loss`` in z. The
  split is at the model's output: a LogSoftmax inside the model with ``nn.NLLLoss`` gives Λ = 0.
  G is positive semi-definite when the loss is convex in z; it drops the second-order terms of f that
  make H indefinite.
- Fisher: :math:`Fv = \frac1N\sum_n J_n^\top \hat\Lambda_n J_n v` with the Fisher's own output-space
  factor (``kind="true"``: the loss Hessian of the likelihood, so F = G for mean cross-entropy on [N, C];
  ``"empirical"``: :math:`\hat\Lambda_n = \nabla_z\ell\,\nabla_z\ell^\top` at the data label, so
  :math:`Fv = \frac1N\sum_n g_n (g_n^\top v)` without forming any per-sample gradient;
  ``"mc"``: the same at labels sampled from the model). Normalization and kinds are those of
  ``fisherext.fisher``: :math:`F = \frac1N\sum_n F_n`.
- Finite differences: :math:`Hv \approx (\nabla L(\theta + \epsilon v) - \nabla L(\theta - \epsilon v))
  / 2\epsilon`, error :math:`O(\epsilon^2)`, parameters moved by the perturbation kernels and restored
  bit for bit.

Data stream in batches; a batch of :math:`n_b` samples whose ``loss`` returns its mean loss enters
with weight :math:`n_b / N`, so the result is the product for the mean loss over the whole data set
whatever the batching. Several vectors (the K columns of ``V`` [P, K]; the per-batch products here take
them as rows [K, P]) share a batch's forward pass and first backward pass (its graph); each vector then
costs one more backward.

Forward passes follow ``fisherext._core.conventions``: deterministic per sample (train-mode dropout and
batch-statistics BatchNorm refused), padding_idx lookups constant (so the dual forward of one vector,
the reverse-mode paths of several and the finite differences agree), attention by the math kernel
(which has second derivatives), outputs checked to be finite tensors.

Precision: a batch's product (forward, backward and the second backward) runs in the model's dtype, or
autocast's under ``torch.autocast`` (whose forward it then differentiates); ``hvp`` adds the batches'
products (and ``method="fd"`` its gradients) in the accumulation dtype, at least float32, so a float16 or
bfloat16 model gets a float32 result whose sum over many batches is not rounded to half precision.
``method="fd"`` warns (``fisherext.PrecisionWarning``) when ``eps`` is below
what the dtypes resolve (``check_step``; e.g. the default 1e-3 for float16/bfloat16 parameters).
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from .._core.checks import check_choice, check_eps, check_positive_int
from .._core.conventions import curvature_forward
from .._core.data import progress_bar, stream
from .._core.entry import entry_point
from .._core.functional import FunctionalModel, grads
from .._core.likelihood import Cotangents, Likelihood, curvature_loss, output_hessian_product
from .._core.perturbation import ParameterPerturbation
from .._core.types import Data, Loss, Params
from .._core.precision import check_step

CURVATURES = ("hessian", "ggn")
METHODS = ("autograd", "fd")
_OLD_METHODS = {"exact": "hessian", "ggn": "ggn"}  # hvp's method= of earlier versions: now curvature=


# ---- products on one batch (each for the batch-mean loss) ------------------------------------------
#
# Measured on the digits MLP (CPU, N = 1024), per vector against one gradient: double backprop 2.8-3.0x,
# forward-over-reverse (torch.func jvp of grad, or forward-mode duals through a backward) 3.9-4.1x; for
# the Gauss-Newton product, a dual forward plus one backward 1.7-2.0x, the double-VJP form 2.3-2.6x for
# one vector but 1.45x per vector when K share its graph, vmap over the K vectors slower still (the work
# is GEMM-bound on CPU; vmapping batches launches, not flops; measured again for K = 16, one batched
# backward by ``is_grads_batched`` took 1.45-1.5x the time of the K backward passes below, its batching
# rules adding GEMMs and copies). The paths below are the fastest of these; ``compile=`` runs the products
# of ``fisherext.curvature.compiled`` instead.


def hessian_batch(fm: FunctionalModel, loss, x, y, V: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """H_b V for the batch-mean loss: the gradient with its graph (double backprop, Pearlmutter's
    R-operator in reverse mode), then one backward through it per vector, sharing the graph. [K, P]"""
    leaves = fm.leaves()
    V = V.to(fm.dtype)  # the vectors in the model's dtype, whatever the caller accumulates in
    with torch.enable_grad():
        value = loss(fm.outputs(x, dict(zip(fm.names, leaves)), offset), y)
        g = grads([value], leaves, [torch.ones_like(value)], retain_graph=True, create_graph=True)
        K = V.shape[0]
        return torch.stack([torch.cat([h.reshape(-1) for h in grads(g, leaves, fm.unflat(V[k]),
                                                                           retain_graph=k < K - 1)])
                            for k in range(K)])


def _output_space_batch(fm: FunctionalModel, x, V, apply, offset: int) -> torch.Tensor:
    """Jᵀ A(J V) for the batch: J V [K, N, C], ``apply(out, JV)`` the output-space factor, then one VJP per
    vector. One vector: J v by forward-mode AD in the same forward pass that records the graph for the
    VJP. Several, or under autocast: J v_k = ∂(Jᵀu)/∂u · v_k, the double-VJP trick, every vector sharing one
    graph (torch's forward-mode AD mixes tangent and autocast dtypes in some models, e.g. an in-place
    addition after a convolution, and fails). [K, P]"""
    leaves = fm.leaves()
    K = V.shape[0]
    V = V.to(fm.dtype)  # the vectors in the model's dtype, whatever the caller accumulates in
    with torch.enable_grad():
        if K == 1 and not torch.is_autocast_enabled(fm.device.type):
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


def ggn_batch(fm: FunctionalModel, loss, x, y, V: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """G_b V = Jᵀ ∇²_z L_b J V for the batch-mean loss L_b. [K, P]"""
    return _output_space_batch(fm, x, V, lambda out, JV: output_hessian_product(loss, out, y, JV), offset)


def cotangent_product(out: torch.Tensor, JV: torch.Tensor, cot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(1/n) Λ̂_n u for every sample and direction u of JV [K, *out.shape], with Λ̂_n = Σ_m w_m c_mn c_mnᵀ the
    outer products of the cotangents ``cot`` [M, *out.shape] (weights [M]), never a per-sample gradient."""
    n = out.shape[0]
    cot = cot.reshape(cot.shape[0], n, -1)
    coef = torch.einsum("mne,kne->kmn", cot, JV.reshape(JV.shape[0], n, -1)) * weights[None, :, None]
    return torch.einsum("kmn,mne->kne", coef, cot).reshape(JV.shape) / n


def fisher_batch(fm: FunctionalModel, lik: Likelihood, kind: str, x, y, V: torch.Tensor, *, mc_samples=1,
                 generator=None, offset=0) -> torch.Tensor:
    """F_b V = (1/n_b) Σ_n J_nᵀ Λ̂_n J_n V, Λ̂_n from the cotangents of ``fisherext.fisher`` (outputs
    [N, C], or with positions [N, T, C] / [N, C, H, W]: a sum over the positions that count). [K, P]"""

    def apply(out, JV):
        if kind == "true":  # the likelihood's own Λ u (softmax: the fused kernel)
            return lik.at(out, y).hessian_product(JV) / out.shape[0]
        c = Cotangents(lik, out, y, kind, mc_samples=mc_samples, generator=generator)
        return cotangent_product(out, JV, c.all(), c.weights)

    return _output_space_batch(fm, x, V, apply, offset)


def _mean_loss_grad(fm: FunctionalModel, loss, data, batch_size, group=None) -> torch.Tensor:
    """∇L(θ) of the mean loss over the data at the model's current parameters, flat [P]."""

    acc = torch.promote_types(fm.dtype, torch.float32)  # the sum over batches: never in half precision

    def batch_grad(x, y, offset):
        leaves = fm.leaves()
        with torch.enable_grad():
            value = loss(fm.outputs(x, dict(zip(fm.names, leaves)), offset), y)
            return torch.cat([t.reshape(-1) for t in grads([value], leaves, [torch.ones_like(value)])])[None].to(acc)

    return stream(fm.model, data, batch_size, batch_grad, group=group)[0]


def fd_product(fm: FunctionalModel, loss, data, V: torch.Tensor, eps: float, batch_size=None,
               progress: bool = False, group=None) -> torch.Tensor:
    """(∇L(θ + ε v) − ∇L(θ − ε v)) / 2ε for every row v of V, restoring θ bit for bit. [K, P]"""
    state = ParameterPerturbation(list(zip(fm.names, fm.params)))
    rows = []
    try:
        for v in progress_bar(V, progress, "hvp(method='fd')", total=V.shape[0], unit="vector"):
            v = v.contiguous()
            state.set(v, eps)
            plus = _mean_loss_grad(fm, loss, data, batch_size, group)
            state.set(v, -eps)
            minus = _mean_loss_grad(fm, loss, data, batch_size, group)
            rows.append((plus - minus) / (2 * eps))
    finally:
        state.restore()
    return torch.stack(rows)


def check_curvature_choices(curvature: str, method: str) -> None:
    """``curvature`` and ``method`` of hvp; the values of earlier versions' ``method`` name ``curvature=``."""
    if method in _OLD_METHODS:
        raise ValueError(f"method: {method!r} is now curvature={_OLD_METHODS[method]!r} (method chooses how: "
                         f"{', '.join(map(repr, METHODS))})")
    check_choice("method", method, METHODS)
    check_choice("curvature", curvature, CURVATURES)
    if method == "fd" and curvature != "hessian":
        raise ValueError("method: 'fd' differences the gradient, which gives curvature='hessian' only, not "
                         f"{curvature!r}")


@entry_point(renamed={"loss_fn": "loss", "r": "eps"})
def hvp(model: nn.Module, loss: Loss, data: Data, v: torch.Tensor, *, curvature: str = "hessian",
        method: str = "autograd", eps: float = 1e-3, params: Params = None, batch_size: int | None = None,
        progress: bool = False, compile: bool | dict = False, group=None) -> torch.Tensor:
    r"""Curvature-vector products of the mean loss over ``data``: :math:`Hv` or :math:`Gv`.

    With :math:`L(\theta) = \frac1N\sum_n \ell(f(x_n;\theta), y_n)` the mean over all N samples
    (whatever the batching; the math: :mod:`fisherext.curvature.products`):

    .. math:: Hv = \nabla^2_\theta L\, v, \qquad
              Gv = \frac1N \sum_n J_n^\top \nabla^2_z \ell_n\, J_n v .

    Args:
        model: maps inputs x [N, ...] to outputs (e.g. logits [N, C]).
        loss: a likelihood's name, "cross_entropy", "mse" or "bce", standing for its torch loss with
            reduction="mean" (``F.cross_entropy`` over the class axis, ``F.mse_loss``,
            ``F.binary_cross_entropy_with_logits``), or a torch loss, a function or module
            ``loss(outputs, targets)`` returning the batch's loss (e.g. ``F.cross_entropy``,
            ``nn.MSELoss()``), used with its own reduction.
        data: a DataLoader, a Dataset, or an (x, y) tuple of tensors; streamed in batches.
        v: one vector [P], or K vectors as the columns of [P, K], over the selected parameters (flat, in
            ``model.named_parameters()`` order).
        curvature: "hessian" (H) or "ggn" (G, the generalized Gauss-Newton matrix, split at the model's
            output; PSD for a loss convex in the outputs).
        method: "autograd" (double backprop for H, forward and reverse mode for G) or "fd" (central
            finite differences of the gradient, :math:`(\nabla L(\theta + \epsilon v) - \nabla
            L(\theta - \epsilon v)) / 2\epsilon`, error :math:`O(\epsilon^2)`; Hessian only).
        eps: the finite-difference step of ``method="fd"``, a positive number.
        params: None (all parameters that require grad), or names, modules or tensors.
        batch_size: samples per batch for tensor or Dataset data (a positive int; a DataLoader keeps its
            own batches).
        progress: show a tqdm progress bar over the batches (over the vectors for ``method="fd"``).
        compile: False (eager), True, or a dict of ``torch.compile`` keyword arguments (updating
            ``fullgraph=True, dynamic=False``): the per-batch product traced and compiled by torch.compile
            (``fisherext.curvature.compiled``; ``method="autograd"`` only). The graphs stay cached, so
            later calls on the same model and batch shapes reuse them; the first call compiles (seconds).
        group: the torch.distributed process group whose ranks each stream their own shard of the data,
            the sums added across the ranks (None: the default group when one is initialized with more
            than one rank; False: this process alone). Every rank must pass the same v, which is checked.

    Returns:
        Tensor of v's shape: :math:`Hv` [P] or :math:`HV` [P, K] (likewise for G), in the parameters'
        dtype, at least float32: float32 for float16/bfloat16 parameters (the batches' sum is float32).

    Warns:
        PrecisionWarning: for ``method="fd"``, ``eps`` below what the dtypes resolve
            (``fisherext._core.precision.check_step``), e.g. the default 1e-3 for float16 or
            bfloat16 parameters.

    Raises:
        ValueError: an unknown ``curvature`` or ``method`` (the earlier ``method="exact"`` and
            ``method="ggn"`` name ``curvature=``), ``method="fd"`` with ``curvature="ggn"``, a bad ``eps``,
            ``batch_size`` or ``v``, a model in train mode with dropout (or BatchNorm on batch
            statistics), no samples; ``compile`` with ``method="fd"``, unknown torch.compile arguments,
            torch.compile unavailable, or a model and loss it cannot compile.
        TypeError: ``loss`` neither a name nor callable, ``v`` not a floating-point tensor, ``compile``
            neither a bool nor a dict.

    The forward passes follow the conventions of the curvature products: padding_idx lookups are
    constants, attention runs the math kernel, outputs must be finite.
    """
    from .compiled import batch_products, compile_options  # (that module imports this one)

    check_curvature_choices(curvature, method)
    loss = curvature_loss(loss)
    eps = check_eps(eps)
    check_positive_int("batch_size", batch_size, optional=True)
    if compile_options(compile) is not None and method == "fd":
        raise ValueError("compile: compiles the autograd products; method='fd' differences plain gradients")
    products = batch_products(compile)
    fm = FunctionalModel(model, params)
    V, single = fm.vectors(v)
    V = V.contiguous()  # rows of the columns [P, K]: contiguous, so that every backward reads them in place
    if method == "fd":
        check_step("hvp", fm.selected, V, eps)
    acc = torch.promote_types(fm.dtype, torch.float32)  # each batch's product enters the sum in it
    with curvature_forward(model):  # entered before fd_product moves any parameter
        if method == "fd":
            out = fd_product(fm, loss, data, V, eps, batch_size, progress, group)
        else:
            batch = products.hessian_batch if curvature == "hessian" else products.ggn_batch
            out = stream(model, data, batch_size, lambda x, y, offset: batch(fm, loss, x, y, V, offset).to(acc),
                         progress=progress, desc=f"hvp(curvature={curvature!r})", group=group, inputs=V)
    return out[0] if single else out.T


__all__ = ["CURVATURES", "METHODS", "cotangent_product", "fisher_batch", "ggn_batch", "hessian_batch", "hvp"]
