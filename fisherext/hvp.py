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

Forward passes follow ``fisherext.conventions``: deterministic per sample (train-mode dropout and
batch-statistics BatchNorm refused), padding_idx lookups constant (so the dual forward of one vector,
the reverse-mode paths of several and the finite differences agree), attention by the math kernel
(which has second derivatives), outputs checked to be finite tensors.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from . import ops
from .capture import iter_batches, resolve_params
from .conventions import check_deterministic, checked_output, curvature_forward
from .fisher import _check_inputs
from .likelihood import LOSSES, Cotangents
from .perturb import ParameterPerturbation, _directions, _eps
from .utils import check_choice, check_positive_int

METHODS = ("exact", "ggn", "fd")


class FunctionalModel:
    """A model as a function of its selected parameters: flat vectors [K, P] ↔ per-parameter tensors."""

    def __init__(self, model: nn.Module, params=None):
        check_deterministic(model)
        self.model = model
        self.selected = resolve_params(model, params)
        self.names = [n for n, _ in self.selected]
        self.params = [p for _, p in self.selected]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.P = sum(self.sizes)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    def leaves(self) -> list[torch.Tensor]:
        """The current parameter values as fresh leaves that require grad: products differentiate with
        respect to these, so frozen parameters work and the model's ``.grad`` stays untouched."""
        return [p.detach().requires_grad_() for p in self.params]

    def unflat(self, v: torch.Tensor) -> list[torch.Tensor]:
        """[P] → one view per parameter."""
        return [t.view(s) for t, s in zip(v.split(self.sizes), self.shapes)]

    def outputs(self, x, params: dict, offset: int = 0) -> torch.Tensor:
        """The model's outputs for the batch x at ``params`` ({name: tensor}), checked by
        ``conventions.checked_output`` (``offset``: the batch's first sample in the data)."""
        return checked_output(functional_call(self.model, params, (x,)), offset)

    def vectors(self, v) -> tuple[torch.Tensor, bool]:
        """v [P] or [K, P] → ([K, P] in the parameters' dtype, whether v was one vector)."""
        v = _directions(v, self.selected, "K")
        single = v.dim() == 1
        return (v.unsqueeze(0) if single else v).to(self.dtype), single


# ---- losses --------------------------------------------------------------------------------------

def is_cross_entropy(loss_fn) -> bool:
    """Mean softmax cross-entropy over class logits, whose output-space Hessian has the fused kernel."""
    if loss_fn is nn.functional.cross_entropy:
        return True
    return (isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.reduction == "mean" and loss_fn.weight is None
            and loss_fn.label_smoothing == 0.0)


def _ignore_index(loss_fn) -> int:
    return loss_fn.ignore_index if isinstance(loss_fn, nn.CrossEntropyLoss) else -100


def likelihood(loss_fn) -> str:
    """The likelihood a Fisher needs, named as in ``fisherext.fisher``: from a name or a torch loss."""
    if isinstance(loss_fn, str):
        check_choice("loss_fn", loss_fn, LOSSES)
        return loss_fn
    if is_cross_entropy(loss_fn):
        return "cross_entropy"
    if loss_fn is nn.functional.mse_loss or isinstance(loss_fn, nn.MSELoss):
        return "mse"
    raise ValueError("loss_fn: a Fisher needs a likelihood: 'cross_entropy' or 'mse' (or F.cross_entropy, "
                     f"nn.CrossEntropyLoss(), F.mse_loss, nn.MSELoss()), got {loss_fn!r}")


def _check_loss_fn(loss_fn):
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(outputs, targets) -> mean loss, got {loss_fn!r}")


def _fused_labels(loss_fn, out, y) -> bool:
    """Whether the fused softmax Hessian is exact here: cross-entropy on [N, C] logits with class labels
    that all count (an ignored label, -100 or the module's ignore_index, would change the mean's
    denominator)."""
    return (is_cross_entropy(loss_fn) and out.dim() == 2 and isinstance(y, torch.Tensor)
            and not y.is_floating_point() and y.dim() == 1
            and bool(((y >= 0) & (y != _ignore_index(loss_fn))).all()))


def output_hessian_product(loss_fn, out: torch.Tensor, y, U: torch.Tensor) -> torch.Tensor:
    """∇²_z loss_fn(z, y) at z = out applied to U [K, *out.shape] (the batch-mean loss's Hessian).

    Any loss other than the fused cross-entropy: double backprop of ``loss_fn`` in z, one backward per
    vector through the small output-space graph. (torch.func's jvp-of-grad fails inside torch's own
    losses: ``mse_loss``'s backward writes into the ZeroTensor tangent of the target.)"""
    if _fused_labels(loss_fn, out, y):
        return ops.softmax_hvp(out, U) / out.shape[0]
    z = out.detach().requires_grad_()
    with torch.enable_grad():
        g = _grads([loss_fn(z, y)], [z], [None], retain_graph=True, create_graph=True)
        return torch.stack([_grads(g, [z], [u], retain_graph=k < U.shape[0] - 1)[0] for k, u in enumerate(U)])


# ---- products on one batch (each for the batch-mean loss) ------------------------------------------
#
# Measured on the digits MLP (CPU, N = 1024), per vector against one gradient: double backprop 2.8-3.0x,
# forward-over-reverse (torch.func jvp of grad, or forward-mode duals through a backward) 3.9-4.1x; for
# the Gauss-Newton product, a dual forward plus one backward 1.7-2.0x, the double-VJP form 2.3-2.6x for
# one vector but 1.45x per vector when K share its graph, vmap over the K vectors slower still (the work
# is GEMM-bound on CPU; vmapping batches launches, not flops). The paths below are the fastest of these.


def _grads(outputs, leaves, grad_outputs, retain_graph=False, create_graph=False) -> list[torch.Tensor]:
    """autograd.grad that gives zeros for the parameters an output does not depend on."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not pairs:
        return [torch.zeros_like(p) for p in leaves]
    got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], retain_graph=retain_graph,
                              create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(got, leaves)]


def hessian_batch(fm: FunctionalModel, loss_fn, x, y, V: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """H_b V for the batch-mean loss: the gradient with its graph (double backprop, Pearlmutter's
    R-operator in reverse mode), then one backward through it per vector, sharing the graph. [K, P]"""
    leaves = fm.leaves()
    with torch.enable_grad():
        loss = loss_fn(fm.outputs(x, dict(zip(fm.names, leaves)), offset), y)
        g = _grads([loss], leaves, [torch.ones_like(loss)], retain_graph=True, create_graph=True)
        K = V.shape[0]
        return torch.stack([torch.cat([h.reshape(-1) for h in _grads(g, leaves, fm.unflat(V[k]),
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
            JV = torch.stack([_grads(Ju, [u], fm.unflat(V[k]), retain_graph=True)[0] for k in range(K)])
        U = apply(out.detach(), JV)
        return torch.stack([torch.cat([g.reshape(-1) for g in _grads([out], leaves, [U[k]], retain_graph=k < K - 1)])
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

    def batch_grad(x, y, V, offset):
        leaves = fm.leaves()
        with torch.enable_grad():
            loss = loss_fn(fm.outputs(x, dict(zip(fm.names, leaves)), offset), y)
            return torch.cat([t.reshape(-1) for t in _grads([loss], leaves, [torch.ones_like(loss)])])[None]

    return stream(fm, data, batch_size, batch_grad, None)[0]


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


def stream(fm: FunctionalModel, data, batch_size, product, V: torch.Tensor | None, progress=False,
           desc="") -> torch.Tensor:
    """Σ_b n_b · product(x_b, y_b, V, offset) / N over the batches of the data. [K, P]"""
    batches = iter_batches(data, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    total, acc = 0, None
    for x, y in batches:
        _check_inputs(fm.model, x)
        if x.shape[0] == 0:
            continue
        part = x.shape[0] * product(x, y, V, total)
        acc = part if acc is None else acc + part
        total += x.shape[0]
    if total == 0:
        raise ValueError("data: no samples")
    return acc / total


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

    The forward passes follow ``fisherext.conventions``: a model in train mode with dropout (or BatchNorm
    on batch statistics) is refused, padding_idx lookups are constants, attention runs the math kernel.
    """
    check_choice("method", method, METHODS)
    _check_loss_fn(loss_fn)
    check_positive_int("batch_size", batch_size, optional=True)
    if method == "fd":
        r = _eps(r, name="r")
    fm = FunctionalModel(model, params)
    V, single = fm.vectors(v)
    with curvature_forward(model):  # entered before fd_product moves any parameter
        if method == "fd":
            out = fd_product(fm, loss_fn, data, V, r, batch_size)
        else:
            batch = hessian_batch if method == "exact" else ggn_batch
            out = stream(fm, data, batch_size, lambda x, y, V, offset: batch(fm, loss_fn, x, y, V, offset), V)
    return out[0] if single else out


__all__ = ["FunctionalModel", "METHODS", "fisher_batch", "ggn_batch", "hessian_batch", "hvp"]
