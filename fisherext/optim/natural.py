r"""Natural-gradient descent preconditioned by K-FAC: ``NaturalGradient``, a ``torch.optim.Optimizer``.

The step on the selected parameters :math:`\theta` (flat, in ``model.named_parameters()`` order) is

.. math:: d = (\hat F + \lambda I)^{-1}\,(g + w\,\theta), \qquad b \leftarrow \mu\, b + d, \qquad
          \theta \leftarrow \theta - \eta\, b

with :math:`g` the gradient found in ``.grad`` (that of the batch's mean loss), :math:`w` the weight decay
(the gradient of :math:`\frac w2\|\theta\|^2`), :math:`\mu` the momentum (:math:`b = d` at the first step, as
``torch.optim.SGD`` without dampening), :math:`\eta` the learning rate and :math:`\lambda` the absolute damping.
:math:`\hat F` is the K-FAC approximation of the Fisher :math:`F = \frac1N\sum_n F_n` of the per-sample negative
log-likelihood :math:`-\log p(y_n\mid x_n,\theta)`, from ``fisherext.fisher(model, batch, structure="kfac")``:
block diagonal, :math:`G \otimes A` for each Linear/Conv weight (with its bias as the last column of the
weight, a 1 appended to the layer input; :math:`A = \frac1{NT}\sum \tilde a\tilde a^\top`, :math:`G = \frac1N
\sum \delta\delta^\top`), the diagonal :math:`F_{ii}` for every other parameter (norm layers, embeddings,
biases without their weight).

Damping is exact per block: a Kronecker block is inverted as :math:`(G \otimes A + \lambda I)^{-1}` from the
eigendecompositions :math:`A = Q_A \Lambda_A Q_A^\top`, :math:`G = Q_G \Lambda_G Q_G^\top`: for the
gradient of a weight laid out as :math:`V \in \mathbb R^{O\times I}` (row-major vec, so :math:`(G\otimes A)
\mathrm{vec}\,V = \mathrm{vec}(G V A)`),

.. math:: (G \otimes A + \lambda I)^{-1}\,\mathrm{vec}\,V
          = \mathrm{vec}\Big(Q_G \big[(Q_G^\top V Q_A) \oslash (\lambda_G \lambda_A^\top + \lambda)\big] Q_A^\top\Big),

and a diagonal entry as :math:`(F_{ii} + \lambda)^{-1}`. This is the exact damped inverse of the K-FAC
matrix, unlike factored Tikhonov damping :math:`(A + \pi\sqrt\lambda I) \otimes (G + \frac{\sqrt\lambda}\pi I)`,
which adds the cross terms :math:`\pi\sqrt\lambda\, I\otimes A`-like products to the matrix it inverts; both
cost the same per step (two products with each factor's eigenbasis), the eigendecompositions being computed
once per factor update and cached. :math:`\lambda > 0` is required: a minibatch's factors have rank at most
its size, so :math:`G\otimes A` is singular as a rule. Eigenvalues of the factors below zero (rounding) are
taken as zero.

Factor updates and running averages: every ``update_interval`` steps the factors are recomputed on the batch
passed to ``step`` (or whenever ``update_curvature`` is called) and averaged into the running ones,
:math:`A \leftarrow \beta A + (1-\beta) A_{new}`, :math:`G \leftarrow \beta G + (1-\beta) G_{new}`, diagonal
entries alike (:math:`\beta` = ``decay``; the first update takes the new factors as they are; :math:`\beta = 0`
keeps only the latest batch). As in K-FAC (Martens & Grosse, 2015) the factors are averaged, not their
Kronecker products.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .._core.checks import check_choice, check_positive_int
from .._core.entry import entry_points
from .._core.likelihood import KINDS, as_likelihood
from .._core.params import resolve_params
from .._core.types import Data, Loss, Params
from ..capture.api import fisher
from ..capture.matrix import DiagPart, FisherMatrix, KronPart


def _check_real(name: str, value, *, low: float, high: float = math.inf, low_open: bool = False,
                high_open: bool = True) -> float:
    """``value`` as a float when it is a finite real number in the interval from ``low`` to ``high``
    (each end open or closed); ValueError naming ``name`` otherwise."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = "inf)" if high == math.inf else f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}: must be a finite number in {lo}, {hi}, got {value!r}")
    return float(value)


class _KronFactors:
    """A Kronecker block's running factors A [I, I], G [O, O] at the flat positions ``idx`` [O, I], and the
    eigendecompositions of both (refreshed by ``decompose`` after each update)."""

    kind = "kron"

    def __init__(self, idx: torch.Tensor, A: torch.Tensor, G: torch.Tensor):
        self.idx, self.A, self.G = idx, A.clone(), G.clone()
        self.decompose()

    def average(self, new: KronPart, decay: float) -> None:
        self.A.mul_(decay).add_(new.A, alpha=1.0 - decay)
        self.G.mul_(decay).add_(new.G, alpha=1.0 - decay)
        self.decompose()

    def decompose(self) -> None:
        # the factors are PSD; rounding can leave eigenvalues of about -eps·‖A‖, which would put the
        # damped denominators below λ
        la, self.Qa = torch.linalg.eigh(self.A)
        lg, self.Qg = torch.linalg.eigh(self.G)
        self.la, self.lg = la.clamp_(min=0), lg.clamp_(min=0)

    def solve(self, V: torch.Tensor, damping: float) -> torch.Tensor:
        """(G ⊗ A + λI)⁻¹ vec(V) for one weight-shaped V [O, I], as [O, I]."""
        inner = (self.Qg.T @ V @ self.Qa) / (self.lg[:, None] * self.la[None, :] + damping)
        return self.Qg @ inner @ self.Qa.T

    def part(self) -> KronPart:
        return KronPart(self.idx, self.A.clone(), self.G.clone())

    def tensors(self) -> dict:
        return {"idx": self.idx, "A": self.A, "G": self.G}


class _DiagFactors:
    """Diagonal entries d at the flat positions ``idx``."""

    kind = "diag"

    def __init__(self, idx: torch.Tensor, d: torch.Tensor):
        self.idx, self.d = idx, d.clone()

    def average(self, new: DiagPart, decay: float) -> None:
        self.d.mul_(decay).add_(new.d, alpha=1.0 - decay)

    def solve(self, V: torch.Tensor, damping: float) -> torch.Tensor:
        return V / (self.d + damping)

    def part(self) -> DiagPart:
        return DiagPart(self.idx, self.d.clone())

    def tensors(self) -> dict:
        return {"idx": self.idx, "d": self.d}


def _factors(part):
    if isinstance(part, KronPart):
        return _KronFactors(part.idx, part.A, part.G)
    if isinstance(part, DiagPart):
        return _DiagFactors(part.idx, part.d)
    raise ValueError(f"data: fisher(structure='kfac') returned a {type(part).__name__}, which NaturalGradient "
                     "cannot invert")


_STATE_KEY = "natural_gradient"
_FIELDS = {"kron": ("idx", "A", "G"), "diag": ("idx", "d")}


@entry_points
class NaturalGradient(torch.optim.Optimizer):
    r"""K-FAC natural-gradient descent, :math:`\theta \leftarrow \theta - \eta\,(\hat F + \lambda I)^{-1}\nabla L`
    with momentum and weight decay (the math, the damping rule and the running averages:
    :mod:`fisherext.optim.natural`).

    Bound to a model: the Kronecker factors come from ``fisherext.fisher(model, batch, structure="kfac",
    kind=kind, loss=loss, params=params)`` on the batches it is given. Usage, as a PyTorch training loop::

        opt = fx.optim.NaturalGradient(model, lr=0.5, damping=1e-2, update_interval=10)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(batch=(x, y))     # refreshes the factors on (x, y) every 10th step, then steps

    ``step(closure)`` works too (the closure recomputes and returns the loss, as for ``torch.optim.SGD``);
    ``update_curvature(data)`` refreshes the factors from any data at any time (a larger sample, a
    DataLoader), and ``step()`` without a batch then uses the factors as they are. The gradient in
    ``.grad`` should be that of the batch's *mean* negative log-likelihood, whose natural gradient
    :math:`F^{-1}g` this is (a sum over the batch makes the step N times larger).

    Args:
        model: the module being trained.
        lr: the learning rate :math:`\eta > 0` (in ``param_groups[0]["lr"]``, so learning-rate schedulers work).
        damping: the absolute :math:`\lambda > 0` added to each block (in ``param_groups[0]["damping"]``,
            so it may be scheduled too: changing it needs no new eigendecomposition). Default 1e-2.
        update_interval: the factors are refreshed at every ``update_interval``-th call of ``step`` that
            is given a batch, counting from the first (steps 0, k, 2k, ...). Default 1 (every step).
        decay: :math:`\beta \in [0, 1)` of the running average of the factors. Default 0.95.
        kind: the Fisher: "true" (exact expectation over the model's predictive distribution), "empirical"
            (the data labels) or "mc" (``mc_samples`` labels sampled with ``generator``). Default "true".
        loss: the likelihood, a name ("cross_entropy", "mse", "bce") or the torch loss of one.
        momentum: :math:`\mu \in [0, 1)` (heavy ball on the preconditioned direction). Default 0.
        weight_decay: :math:`w \ge 0`, the gradient :math:`w\theta` added before preconditioning. Default 0.
        mc_samples: labels drawn per input for ``kind="mc"``, a positive int.
        params: None (all parameters that require grad), or names, modules or tensors: the parameters
            optimized and preconditioned (the others are neither changed nor part of the factors).
        memory_budget: bytes each factor update may use (``fisherext.fisher``'s; default half the memory).
        generator: the ``torch.Generator`` of the labels of ``kind="mc"`` (None: torch's global one).

    Raises:
        ValueError: lr <= 0, damping <= 0, update_interval < 1, decay outside [0, 1), momentum outside
            [0, 1), weight_decay < 0, an unknown ``kind`` or loss name, a torch loss that is no
            likelihood, a bad ``mc_samples``, no parameters selected.
        TypeError: ``model`` no nn.Module, ``loss`` neither a name nor callable, ``generator`` no
            torch.Generator.
    """

    def __init__(self, model: nn.Module, lr: float, *, damping: float = 1e-2, update_interval: int = 1,
                 decay: float = 0.95, kind: str = "true", loss: Loss = "cross_entropy", momentum: float = 0.0,
                 weight_decay: float = 0.0, mc_samples: int = 1, params: Params = None,
                 memory_budget: int | None = None, generator: torch.Generator | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        lr = _check_real("lr", lr, low=0.0, low_open=True)
        damping = _check_real("damping", damping, low=0.0, low_open=True)
        check_positive_int("update_interval", update_interval)
        self.decay = _check_real("decay", decay, low=0.0, high=1.0)
        momentum = _check_real("momentum", momentum, low=0.0, high=1.0)
        weight_decay = _check_real("weight_decay", weight_decay, low=0.0)
        check_choice("kind", kind, KINDS)
        as_likelihood(loss)  # a bad loss is refused now, not at the first factor update
        check_positive_int("mc_samples", mc_samples)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        self.model = model
        self.selected = resolve_params(model, params)
        self.update_interval, self.kind, self.loss = update_interval, kind, loss
        self.mc_samples, self.memory_budget, self.generator = mc_samples, memory_budget, generator
        self._factors = None      # [_KronFactors | _DiagFactors] once a factor update has run
        self._num_samples = 0     # samples of the latest factor update
        self._steps = 0           # steps taken (the schedule of factor updates counts these)
        self._updates = 0         # factor updates done
        self._ready = False
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__([p for _, p in self.selected], defaults)
        self._ready = True

    def add_param_group(self, param_group: dict) -> None:
        """Refused after construction: the preconditioner is one block-diagonal matrix over the parameters
        chosen at construction (``params=``), in their flat order.

        Raises:
            ValueError: always, once the optimizer is built.
        """
        if self._ready:
            raise ValueError("param_group: NaturalGradient preconditions the parameters chosen at construction "
                             "(params=) as one group; build a new optimizer to change them")
        super().add_param_group(param_group)

    # ---- curvature --------------------------------------------------------------------------------

    @property
    def curvature(self) -> FisherMatrix | None:
        """The running K-FAC Fisher :math:`\\hat F` (a copy of the averaged factors, structure "kfac",
        ``num_samples`` that of the latest update), or None before the first factor update."""
        if self._factors is None:
            return None
        P = sum(p.numel() for _, p in self.selected)
        return FisherMatrix(P, [f.part() for f in self._factors], self._num_samples, "kfac")

    @property
    def steps(self) -> int:
        """The number of steps taken."""
        return self._steps

    def update_curvature(self, data: Data, *, batch_size: int | None = None, progress: bool = False) -> None:
        r"""Recomputes the K-FAC factors on ``data`` and averages them into the running ones
        (:math:`A \leftarrow \beta A + (1-\beta)A_{new}`, the first update taking the new factors), then
        refreshes the cached eigendecompositions. Independent of the step schedule; ``.grad`` is untouched.

        Args:
            data: a DataLoader, a Dataset or an (x, y) tuple (y may be None for kind="true").
            batch_size: samples per batch for tensor or Dataset data (None: planned by ``fisherext.fisher``
                against the memory budget).
            progress: a progress bar over the batches.

        Raises:
            ValueError: as ``fisherext.fisher`` (no samples, labels that do not fit, a model in train mode
                with dropout or BatchNorm on batch statistics, ...), or a factor layout that differs from the
                previous updates' (a layer whose use changed between batches).
        """
        with torch.enable_grad():
            F = fisher(self.model, data, kind=self.kind, structure="kfac", loss=self.loss,
                       params=[p for _, p in self.selected], mc_samples=self.mc_samples, batch_size=batch_size,
                       memory_budget=self.memory_budget, progress=progress, generator=self.generator)
        if self._factors is None:
            self._factors = [_factors(part) for part in F.parts]
        else:
            if not self._same_layout(F.parts):
                raise ValueError("data: its K-FAC layout (which parameters form Kronecker blocks) differs from that "
                                 "of the previous factor updates; every batch must use the layers alike")
            for factors, part in zip(self._factors, F.parts):
                factors.average(part, self.decay)
        self._num_samples = F.num_samples
        self._updates += 1

    def _same_layout(self, parts) -> bool:
        return len(parts) == len(self._factors) and all(
            p.kind == f.kind and p.idx.shape == f.idx.shape and torch.equal(p.idx, f.idx)
            for p, f in zip(parts, self._factors))

    def precondition(self, g: torch.Tensor, damping: float | None = None) -> torch.Tensor:
        r""":math:`(\hat F + \lambda I)^{-1} g` for a flat vector over the selected parameters.

        Args:
            g: [P], in the flat order of the selected parameters (``fisherext.flatten``).
            damping: :math:`\lambda > 0` (None: ``param_groups[0]["damping"]``).

        Returns:
            [P], in g's dtype.

        Raises:
            ValueError: no factor update yet, g of the wrong shape, damping <= 0.
            TypeError: g no floating-point tensor.
        """
        if self._factors is None:
            raise ValueError("g: there is no curvature yet; call update_curvature(data) or step(batch=...) first")
        P = sum(p.numel() for _, p in self.selected)
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            raise TypeError(f"g: expected a floating-point tensor of shape [{P}], got {type(g).__name__}")
        if tuple(g.shape) != (P,):
            raise ValueError(f"g: expected shape [{P}], got {tuple(g.shape)}")
        lam = self.param_groups[0]["damping"] if damping is None else damping
        lam = _check_real("damping", lam, low=0.0, low_open=True)
        work = g.to(torch.promote_types(g.dtype, torch.float32))  # the factors' dtype for a half model
        out = torch.empty_like(work)
        for f in self._factors:
            out[f.idx] = f.solve(work[f.idx], lam)
        return out.to(g.dtype)

    # ---- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None, *, batch: Data | None = None):
        r"""One natural-gradient step (the math: :mod:`fisherext.optim.natural`).

        Order: ``closure()`` (if given, with grad enabled: it recomputes the gradients and returns the
        loss); then, when ``batch`` is given and the step is due (``steps % update_interval == 0``), a
        factor update on ``batch`` (:meth:`update_curvature`); then the parameter update from ``.grad``.
        A batch given when no update is due is not used. Parameters whose ``.grad`` is None count as a zero
        gradient (a Kronecker block still moves them through its coupling with the rest of the layer);
        when no selected parameter has a gradient the step does nothing and is not counted.

        Args:
            closure: None, or a callable that recomputes the gradients and returns the loss.
            batch: None, or the data of a factor update, usually the step's minibatch (x, y) (anything
                ``fisherext.fisher`` takes).

        Returns:
            the closure's loss, or None.

        Raises:
            ValueError: no batch at the first step (and no earlier ``update_curvature``); as
                :meth:`update_curvature` for the batch.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self.param_groups[0]["params"]
        if all(p.grad is None for p in params):
            return loss
        if batch is not None and self._steps % self.update_interval == 0:
            self.update_curvature(batch)
        if self._factors is None:
            raise ValueError("batch: the first step needs batch=(x, y) (the data of the first factor update), "
                             "or call update_curvature(data) before stepping")
        group = self.param_groups[0]
        theta = torch.cat([p.reshape(-1) for p in params])
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        if group["weight_decay"]:
            g = g.add(theta, alpha=group["weight_decay"])
        d = self.precondition(g.to(theta.dtype), group["damping"])
        for p, dp in zip(params, d.split([p.numel() for p in params])):
            dp = dp.view_as(p)
            if group["momentum"]:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = dp.clone()
                else:
                    buf.mul_(group["momentum"]).add_(dp)
                dp = buf
            p.add_(dp, alpha=-group["lr"])
        self._steps += 1
        return loss

    # ---- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The optimizer's state: ``torch.optim.Optimizer.state_dict()`` (param groups, momentum buffers)
        plus the key "natural_gradient": steps taken, factor updates done, samples of the latest update and
        the running factors (the eigendecompositions are recomputed on loading)."""
        state = super().state_dict()
        factors = None if self._factors is None else [
            {"kind": f.kind, **{k: t.clone() for k, t in f.tensors().items()}} for f in self._factors]
        state[_STATE_KEY] = {"steps": self._steps, "updates": self._updates, "num_samples": self._num_samples,
                             "factors": factors}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a state of :meth:`state_dict`, checked in full before anything is replaced.

        Args:
            state_dict: from :meth:`state_dict` of a NaturalGradient over the same parameters.

        Raises:
            ValueError: the "natural_gradient" entry missing or malformed (factors whose positions or shapes do
                not fit the parameters), or as ``torch.optim.Optimizer.load_state_dict``.
            TypeError: ``state_dict`` no dict.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict: expected the dict of NaturalGradient.state_dict(), got "
                            f"{type(state_dict).__name__}")
        if _STATE_KEY not in state_dict:
            raise ValueError(f"state_dict: has no {_STATE_KEY!r} entry (not the state of a NaturalGradient)")
        own = state_dict[_STATE_KEY]
        if not isinstance(own, dict) or not {"steps", "updates", "num_samples", "factors"} <= own.keys():
            raise ValueError(f"state_dict: its {_STATE_KEY!r} entry lacks 'steps', 'updates', 'num_samples' or "
                             "'factors'")
        factors = None if own["factors"] is None else [self._restored(i, e) for i, e in enumerate(own["factors"])]
        rest = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        super().load_state_dict(rest)
        self._factors = factors
        self._steps, self._updates, self._num_samples = int(own["steps"]), int(own["updates"]), int(own["num_samples"])

    def _restored(self, i: int, entry):
        """Factor block i of a saved state, on the parameters' device and dtype, checked against them."""
        ref = self.selected[0][1]
        P = sum(p.numel() for _, p in self.selected)
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind not in _FIELDS or not all(isinstance(entry.get(k), torch.Tensor) for k in _FIELDS[kind]):
            raise ValueError(f"state_dict: factor block {i} is malformed (expected kind 'kron' with tensors idx, A, "
                             "G, or kind 'diag' with idx, d)")
        idx = entry["idx"].to(ref.device)
        if idx.is_floating_point() or (idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < P):
            raise ValueError(f"state_dict: factor block {i} has positions outside [0, {P})")
        if kind == "diag":
            d = entry["d"].to(ref.device, ref.dtype)
            if d.shape != (idx.numel(),):
                raise ValueError(f"state_dict: factor block {i} has {d.numel()} entries for {idx.numel()} positions")
            return _DiagFactors(idx, d)
        A, G = entry["A"].to(ref.device, ref.dtype), entry["G"].to(ref.device, ref.dtype)
        if idx.dim() != 2 or A.shape != (idx.shape[1],) * 2 or G.shape != (idx.shape[0],) * 2:
            raise ValueError(f"state_dict: factor block {i} has inconsistent shapes: idx {tuple(idx.shape)}, "
                             f"A {tuple(A.shape)}, G {tuple(G.shape)}")
        return _KronFactors(idx, A, G)


__all__ = ["NaturalGradient"]
