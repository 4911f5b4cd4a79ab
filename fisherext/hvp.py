r"""Curvature-vector products of a model's mean loss over a data set: Hessian, Gauss-Newton, Fisher.

With outputs :math:`z_n = f(x_n;\theta)` [C], per-sample loss :math:`\ell(z_n, y_n)` and the mean loss
:math:`L(\theta) = \frac1N\sum_n \ell(z_n, y_n)` over all N samples of the data:

- Hessian: :math:`Hv = \nabla^2_\theta L\, v`, by forward-over-reverse differentiation (a JVP of the
  gradient): one pass, no loop over parameters or samples.
- Generalized Gauss-Newton: :math:`Gv = \frac1N\sum_n J_n^\top \Lambda_n J_n v` with
  :math:`J_n = \partial z_n/\partial\theta` and :math:`\Lambda_n = \nabla^2_z \ell`: a JVP gives
  :math:`J_n v`, the loss Hessian is applied in output space, a VJP maps back. For softmax cross-entropy
  :math:`\Lambda_n u = p\odot u - p(p^\top u)` is one fused kernel (``fisherext.ops.softmax_hvp``).
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
whatever the batching. Several vectors are multiplied at once: ``V`` [K, P] runs as one batched pass
(``torch.func.vmap``), not K passes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from . import ops
from .capture import check_batchnorm, iter_batches, resolve_params
from .fisher import KINDS, LOSSES, _check_inputs, output_cotangents
from .perturb import ParameterPerturbation, _eps
from .utils import check_choice

METHODS = ("exact", "ggn", "fd")


class FunctionalModel:
    """A model as a function of its selected parameters: flat vectors [K, P] ↔ per-parameter tensors."""

    def __init__(self, model: nn.Module, params=None):
        check_batchnorm(model)
        self.model = model
        selected = resolve_params(model, params)
        self.names = [n for n, _ in selected]
        self.params = [p for _, p in selected]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.P = sum(self.sizes)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    def primals(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in zip(self.names, self.params)}

    def split(self, V: torch.Tensor) -> dict[str, torch.Tensor]:
        """[K, P] → {name: [K, *shape]}."""
        return {n: t.reshape(V.shape[0], *s) for n, t, s in zip(self.names, V.split(self.sizes, dim=1), self.shapes)}

    def flat(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: [K, *shape]} → [K, P]."""
        return torch.cat([tensors[n].flatten(1) for n in self.names], dim=1)

    def forward(self, x):
        return lambda params: functional_call(self.model, params, (x,))

    def vectors(self, v, name="v") -> tuple[torch.Tensor, bool]:
        """v [P] or [K, P] → ([K, P] in the parameters' dtype, whether v was one vector)."""
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor of length {self.P}, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {v.dtype}")
        if v.dim() not in (1, 2) or v.shape[-1] != self.P:
            raise ValueError(f"{name}: expected shape [{self.P}] or [K, {self.P}] over the {len(self.names)} "
                             f"selected parameter tensors, got {tuple(v.shape)}")
        if v.device != self.device:
            raise ValueError(f"{name}: is on {v.device} but the parameters are on {self.device}")
        if not torch.isfinite(v).all():
            raise ValueError(f"{name}: has non-finite entries")
        single = v.dim() == 1
        return (v.unsqueeze(0) if single else v).to(self.dtype), single


# ---- losses --------------------------------------------------------------------------------------

def is_cross_entropy(loss_fn) -> bool:
    """Mean softmax cross-entropy over class logits, whose output-space Hessian has the fused kernel."""
    if loss_fn is nn.functional.cross_entropy:
        return True
    return (isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.reduction == "mean" and loss_fn.weight is None
            and loss_fn.label_smoothing == 0.0)


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
    that all count (an ignored label would change the mean's denominator)."""
    return (is_cross_entropy(loss_fn) and out.dim() == 2 and isinstance(y, torch.Tensor)
            and not y.is_floating_point() and y.dim() == 1 and bool((y >= 0).all()))


def output_hessian_product(loss_fn, out: torch.Tensor, y, U: torch.Tensor) -> torch.Tensor:
    """∇²_z loss_fn(z, y) at z = out applied to U [K, *out.shape] (the batch-mean loss's Hessian)."""
    if _fused_labels(loss_fn, out, y):
        return ops.softmax_hvp(out, U) / out.shape[0]

    def loss_grad(z):
        return grad(lambda z: loss_fn(z, y))(z)

    return vmap(lambda u: jvp(loss_grad, (out,), (u,))[1])(U)


# ---- products on one batch (each for the batch-mean loss) ------------------------------------------

def hessian_batch(fm: FunctionalModel, loss_fn, x, y, V: torch.Tensor) -> torch.Tensor:
    """H_b V for the batch-mean loss: forward-over-reverse, all K vectors in one vmapped pass. [K, P]"""
    f = fm.forward(x)
    gradient = grad(lambda params: loss_fn(f(params), y))
    primals = fm.primals()
    return fm.flat(vmap(lambda t: jvp(gradient, (primals,), (t,))[1])(fm.split(V)))


def _output_space_batch(fm: FunctionalModel, x, V, apply) -> torch.Tensor:
    """Jᵀ A(J V) for the batch: JVPs give J V [K, N, C], ``apply(out, JV)`` the output-space factor, one
    VJP per vector maps back (vmapped). [K, P]"""
    f = fm.forward(x)
    primals = fm.primals()
    out, pullback = vjp(f, primals)
    JV = vmap(lambda t: jvp(f, (primals,), (t,))[1])(fm.split(V))
    U = apply(out.detach(), JV)
    return fm.flat(vmap(pullback)(U)[0])


def ggn_batch(fm: FunctionalModel, loss_fn, x, y, V: torch.Tensor) -> torch.Tensor:
    """G_b V = Jᵀ ∇²_z L_b J V for the batch-mean loss L_b. [K, P]"""
    return _output_space_batch(fm, x, V, lambda out, JV: output_hessian_product(loss_fn, out, y, JV))


def fisher_batch(fm: FunctionalModel, loss: str, kind: str, x, y, V: torch.Tensor, *, mc_samples=1,
                 generator=None, offset=0) -> torch.Tensor:
    """F_b V = (1/n_b) Σ_n J_nᵀ Λ̂_n J_n V, Λ̂_n from the cotangents of ``fisherext.fisher``. [K, P]"""

    def apply(out, JV):
        n = out.shape[0]
        if kind == "true" and loss == "cross_entropy":
            return ops.softmax_hvp(out, JV) / n
        if kind == "true":  # Gaussian likelihood with unit variance: Λ = I
            return JV / n
        cot, w = output_cotangents(out, y, kind, loss, mc_samples, generator, offset)  # [M, N, C], [M]
        # Λ̂_n u = Σ_m w_m c_mn (c_mnᵀ u): the M labels' outer products, never a per-sample gradient
        coef = torch.einsum("mnc,knc->kmn", cot, JV) * w[None, :, None]
        return torch.einsum("kmn,mnc->knc", coef, cot) / n

    return _output_space_batch(fm, x, V, apply)


def _mean_loss_grad(fm: FunctionalModel, loss_fn, data, batch_size) -> torch.Tensor:
    """∇L(θ) of the mean loss over the data at the model's current parameters, flat [P]."""
    total, acc = 0, torch.zeros(fm.P, dtype=fm.dtype, device=fm.device)
    for x, y in iter_batches(data, batch_size):
        if x.shape[0] == 0:
            continue
        with torch.enable_grad():
            g = torch.autograd.grad(loss_fn(fm.model(x), y), fm.params, allow_unused=True)
        acc += x.shape[0] * torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                                       for gi, p in zip(g, fm.params)])
        total += x.shape[0]
    return acc / total


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


def stream(fm: FunctionalModel, data, batch_size, product, V: torch.Tensor, progress=False, desc="") -> torch.Tensor:
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
        method: "exact" (Hv, forward-over-reverse), "ggn" (Gv, the Gauss-Newton matrix) or "fd"
            (central finite differences of the gradient with step ``r``).
        params: None (all parameters that require grad), or names, modules or tensors.
        batch_size: samples per batch for tensor or Dataset data.
    Returns:
        Tensor of v's shape.
    """
    check_choice("method", method, METHODS)
    _check_loss_fn(loss_fn)
    fm = FunctionalModel(model, params)
    V, single = fm.vectors(v)
    if method == "fd":
        out = fd_product(fm, loss_fn, data, V, _eps(r), batch_size)
    else:
        batch = hessian_batch if method == "exact" else ggn_batch
        out = stream(fm, data, batch_size, lambda x, y, V, _: batch(fm, loss_fn, x, y, V), V)
    return out[0] if single else out


__all__ = ["FunctionalModel", "KINDS", "METHODS", "fisher_batch", "ggn_batch", "hessian_batch", "hvp"]
