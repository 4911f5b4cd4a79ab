r"""Sharpness-aware minimization: SAM (Foret et al., 2021), adaptive SAM (Kwon et al., 2021) and
Fisher SAM (Kim et al., 2022), as ``torch.optim.Optimizer`` wrappers around a base optimizer.

Each step minimizes the loss at the worst point of a neighbourhood, to first order: with the gradient
:math:`g = \nabla L(\theta)` already in ``.grad``, the parameters move to :math:`\theta + \varepsilon`,
the gradient is computed there, the parameters go back to :math:`\theta` and the base optimizer steps
with :math:`\nabla L(\theta + \varepsilon)`. The perturbation maximizes :math:`g^\top\varepsilon` over
an ellipsoid :math:`\varepsilon^\top M \varepsilon \le \rho^2`, whose solution is

.. math:: \varepsilon = \rho\, \frac{M^{-1} g}{\sqrt{g^\top M^{-1} g}} :

- SAM, :math:`M = I`: :math:`\varepsilon = \rho\, g / \|g\|_2`;
- adaptive SAM (``SAM(adaptive=True)``), :math:`M = T^{-2}` with :math:`T = \mathrm{diag}(|\theta| + \eta)`:
  :math:`\varepsilon = \rho\, T^2 g / \|T g\|_2` (a ball in the scale-invariant coordinates
  :math:`T^{-1}\theta`);
- Fisher SAM, :math:`M = \mathrm{diag}(f)`, :math:`f = 1 + \eta\, g \odot g`:
  :math:`\varepsilon = \gamma\, f^{-1} \odot g / \sqrt{g^\top (f^{-1} \odot g)}`, so that
  :math:`\varepsilon^\top \mathrm{diag}(f)\, \varepsilon = \gamma^2` (here ``rho`` is the paper's γ).
  With :math:`\eta = 0` it is SAM.

Norms and inner products run over all parameters of all groups that have a gradient (one ellipsoid
over the whole parameter vector, hence one ``rho`` for the optimizer, not one per group). Parameters
without a gradient are neither perturbed nor counted; a zero gradient gives no perturbation.

Normalization: :math:`g` is whatever the backward pass left in ``.grad`` — for a loss averaged over the
mini-batch, the mini-batch mean gradient. Fisher SAM's :math:`f` is, as in the paper, built from the
square of that mini-batch gradient (its diagonal Fisher approximation), not from a per-sample Fisher
:math:`\frac1N\sum_n g_n \odot g_n`.

The perturbation and the restore are multi-tensor operations (``torch._foreach_*`` over the list of
parameters of one device and dtype; Fisher SAM's elementwise arithmetic on one flat buffer); the global
norm stays on the device (no host synchronization on CUDA). :math:`\theta` is saved by a copy and copied
back bit for bit, never restored by subtracting :math:`\varepsilon`. Memory: one copy of the selected
parameters (SAM), two (adaptive SAM, Fisher SAM), kept between steps.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch.optim import Optimizer

from .._core.entry import entry_points

__all__ = ["SAM", "FisherSAM"]

# Device types on which reading the perturbation's scale costs no host synchronization: there it is a
# Python number folded into the update (one pass fewer); elsewhere it stays a device tensor. (Tests empty
# this set to run the device path on the CPU.)
SYNC_FREE_DEVICES = frozenset({"cpu"})


def _check_rho(rho) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho: must be a finite number > 0, got {rho!r}")
    return float(rho)


def _check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta: must be a finite number >= 0, got {eta!r}")
    return float(eta)


def _tensors_of(params) -> list[torch.Tensor]:
    """The parameter tensors of an optimizer's ``params`` argument (tensors, (name, tensor) pairs or
    groups of them). Groups may carry no options: those belong to an already built base optimizer."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params: expected an iterable of tensors or of parameter groups, got a single Tensor")
    out = []
    for item in list(params):
        if isinstance(item, dict):
            options = sorted(set(item) - {"params", "param_names"})
            if options:
                raise ValueError(f"params: group options {options} belong to the base optimizer instance "
                                 "(base_optimizer is already built over its own groups)")
            group = item.get("params", [])
            items = [group] if isinstance(group, torch.Tensor) else list(group)
        else:
            items = [item]
        out.extend(p[1] if isinstance(p, tuple) else p for p in items)
    return out


class _SharpnessAware(Optimizer):
    """The machinery shared by SAM and FisherSAM: the base optimizer, the two steps, the closure step,
    the state dict. Subclasses give ``_settings`` and ``_direction``."""

    def _setup(self, params, base_optimizer, kw: dict) -> None:
        if isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if issubclass(base_optimizer, _SharpnessAware):
                raise TypeError(f"base_optimizer: {base_optimizer.__name__} is itself a sharpness-aware "
                                "wrapper; pass the optimizer it should step (e.g. torch.optim.SGD)")
            base = base_optimizer(params, **kw)
        elif isinstance(base_optimizer, Optimizer):
            if isinstance(base_optimizer, _SharpnessAware):
                raise TypeError(f"base_optimizer: a {type(base_optimizer).__name__} is itself a sharpness-"
                                "aware wrapper; pass the optimizer it should step")
            if kw:
                key = sorted(kw)[0]
                raise TypeError(f"{key}: base_optimizer is an instance, built with its own options; pass "
                                f"{key} to its constructor (or pass its class)")
            given, own = _tensors_of(params), [p for g in base_optimizer.param_groups for p in g["params"]]
            if len(given) != len(own) or {id(p) for p in given} != {id(p) for p in own}:
                raise ValueError(f"params: must be the {len(own)} parameter tensors base_optimizer was built "
                                 f"over, got {len(given)} tensors that differ from them")
            base = base_optimizer
        else:
            raise TypeError("base_optimizer: expected a torch.optim.Optimizer class (e.g. torch.optim.SGD) or "
                            f"instance, got {base_optimizer!r}")
        # The wrapper and the base optimizer share one list of group dicts, one state and one defaults
        # dict: zero_grad, schedulers (group["lr"]) and optimizer.state[p] see the base optimizer's.
        super().__init__(base.param_groups, {})
        self.base_optimizer = base
        self.param_groups, self.state, self.defaults = base.param_groups, base.state, base.defaults
        self._saved = None  # [(params, views of their copies of θ)] per bucket, between the two steps
        self._flat = {}  # (purpose, device, dtype) -> (layout, flat buffer, views like the parameters)

    # ---- the rule of each method -----------------------------------------------------------------

    def _settings(self) -> dict:
        raise NotImplementedError

    def _apply_settings(self, settings: dict) -> None:
        raise NotImplementedError

    def _direction(self, params, grads, scratch, acc):
        """The unscaled direction d (a list like ``params``: ``grads`` itself, which is then not written
        to, or views of a buffer of ``_buffer``) and norms n (1-D, dtype ``acc``) such that
        ε = rho · d / ‖n‖₂, ‖n‖₂ over all buckets. ``params`` and ``grads`` share one device and dtype;
        ``scratch`` = (flat, views), a buffer like them, may be overwritten."""
        raise NotImplementedError

    def _buffer(self, purpose: str, params):
        """(flat, views): one buffer of the bucket's total size and its views shaped like ``params``, kept
        between steps (on the CPU, allocating it anew each step costs as much as the arithmetic on it);
        made again when the parameters with a gradient, or their shapes, change."""
        p0 = params[0]
        key = (purpose, p0.device, p0.dtype)
        layout = [(id(p), p.shape) for p in params]
        entry = self._flat.get(key)
        if entry is None or entry[0] != layout:
            sizes = [p.numel() for p in params]
            flat = torch.empty(sum(sizes), dtype=p0.dtype, device=p0.device)
            views = [v.view(p.shape) for v, p in zip(torch.split(flat, sizes), params)]
            entry = self._flat[key] = (layout, flat, views)
        return entry[1], entry[2]

    # ---- the two steps ---------------------------------------------------------------------------

    def first_step(self, zero_grad: bool = False) -> None:
        r"""Moves the parameters to :math:`\theta + \varepsilon` (the rule of the class, from the gradients
        in ``.grad``), saving :math:`\theta`.

        Args:
            zero_grad: afterwards, set the gradients to None, ready for the backward pass at
                :math:`\theta + \varepsilon`.

        Raises:
            RuntimeError: called again before ``second_step`` (the saved θ would be lost).
            TypeError: a sparse gradient.
        """
        self._perturb(zero_grad)

    def _perturb(self, zero_grad: bool) -> bool:
        """first_step; returns whether any parameter had a gradient."""
        if self._saved is not None:
            raise RuntimeError(f"fisherext.{type(self).__name__}.first_step: the parameters are already "
                               "perturbed; call second_step() (or step(closure)) before the next first_step()")
        active = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        buckets = {}  # (device, dtype) -> (params, grads): each multi-tensor call takes one of them
        for p in active:
            if p.grad.is_sparse:
                raise TypeError("params: sparse gradients are not supported (nn.Embedding(sparse=True))")
            ps, gs = buckets.setdefault((p.device, p.dtype), ([], []))
            ps.append(p)
            gs.append(p.grad)
        saved, directions, norms = [], [], []
        with torch.no_grad():
            for (_, dtype), (ps, gs) in buckets.items():
                backup = self._buffer("theta", ps)
                acc = torch.float64 if dtype == torch.float64 else torch.float32
                d, n = self._direction(ps, gs, backup, acc)
                saved.append((ps, backup[1]))
                directions.append((d, d is gs))
                norms.append(n)
            if norms:
                total = torch.linalg.vector_norm(norms[0] if len(norms) == 1 else torch.cat(
                    [n.to(norms[0].device, torch.float64) for n in norms]))
                if all(device.type in SYNC_FREE_DEVICES for device, _ in buckets):
                    # reading the norm costs no synchronization here: fold the scale into the update
                    t = total.item()
                    scale = self.rho / t if t > 0 else 0.0  # a zero gradient: no perturbation, no 0/0
                    for (ps, backup), (d, _) in zip(saved, directions):
                        torch._foreach_copy_(backup, ps)
                        torch._foreach_add_(ps, d, alpha=scale)
                else:
                    # the scale stays on the device (no host sync); where the norm is 0, d is 0 and so is ε
                    scale = self.rho / total.clamp_min(self.rho / torch.finfo(total.dtype).max)
                    for (ps, backup), (d, shared) in zip(saved, directions):
                        s = scale.to(ps[0].device)
                        if shared:  # d is the gradient list: leave it as it is
                            d = torch._foreach_mul(d, s)
                        else:
                            torch._foreach_mul_(d, s)
                        torch._foreach_copy_(backup, ps)
                        torch._foreach_add_(ps, d)
        self._saved = saved
        if zero_grad:
            for p in active:
                p.grad = None
        return bool(active)

    def second_step(self, zero_grad: bool = False) -> None:
        r"""Copies the saved :math:`\theta` back (bit for bit) and steps the base optimizer with the
        gradients now in ``.grad`` (those at :math:`\theta + \varepsilon`).

        Args:
            zero_grad: afterwards, set the gradients to None (``zero_grad()``).

        Raises:
            RuntimeError: no ``first_step`` before it.
        """
        if self._saved is None:
            raise RuntimeError(f"fisherext.{type(self).__name__}.second_step: no first_step() before it (the "
                               "parameters are not perturbed)")
        self._restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _restore(self) -> None:
        with torch.no_grad():
            for ps, backups in self._saved:
                torch._foreach_copy_(ps, backups)
        self._saved = None

    def step(self, closure: Callable[[], object] | None = None):
        r"""One sharpness-aware step: ``first_step(zero_grad=True)``, then ``closure()`` once at
        :math:`\theta + \varepsilon` (with gradients enabled), then ``second_step()``.

        The gradient at :math:`\theta` must already be in ``.grad`` (the caller's forward and backward
        pass before ``step``): the closure is called exactly once per step, at the perturbed point.

        Args:
            closure: recomputes the loss and runs its backward pass (``loss = loss_fn(model(x), y);
                loss.backward(); return loss``); it need not zero the gradients (``first_step`` set
                them to None). Required.

        Returns:
            What the closure returned: the loss at :math:`\theta + \varepsilon`.

        Raises:
            ValueError: no closure.
            TypeError: a closure that is not callable.
            RuntimeError: no parameter has a gradient (no backward pass before ``step``).

        If the closure raises, the parameters are restored to :math:`\theta` before the error propagates.
        """
        if closure is None:
            raise ValueError("closure: is required (a function that recomputes the loss and runs its backward "
                             "pass, evaluated at the perturbed parameters); without one, call first_step() and "
                             "second_step()")
        if not callable(closure):
            raise TypeError(f"closure: expected a callable, got {type(closure).__name__}")
        if not self._perturb(zero_grad=True):
            self._saved = None
            raise RuntimeError(f"fisherext.{type(self).__name__}.step: no parameter has a gradient; run the "
                               "forward and backward pass at the current parameters before step(closure), which "
                               "evaluates the closure at the perturbed ones")
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self._restore()
            raise
        self._restore()
        self.base_optimizer.step()
        return loss

    # ---- groups and state ------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group to the base optimizer (its options, the base optimizer's defaults), and so to
        this one (they share the group list).

        Args:
            param_group: a dict with "params" and optional options of the base optimizer.
        """
        base = self.__dict__.get("base_optimizer")
        if base is None:  # Optimizer.__init__ registering the base optimizer's own groups
            return super().add_param_group(param_group)
        base.add_param_group(param_group)

    def state_dict(self) -> dict:
        """The base optimizer's state dict (its per-parameter state and groups) plus the settings of
        this optimizer under the key "sam" (e.g. ``{"rho": 0.05, ...}``).

        Returns:
            dict: "state", "param_groups" (as ``torch.optim``), "sam".
        """
        out = self.base_optimizer.state_dict()
        out["sam"] = self._settings()
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state dict written by ``state_dict()`` of the same class over the same parameters.

        Args:
            state_dict: the dict; its "sam" settings are checked like the constructor's arguments.

        Raises:
            ValueError: settings missing, of another class, or out of range.
            RuntimeError: called between first_step and second_step.
        """
        if self._saved is not None:
            raise RuntimeError(f"fisherext.{type(self).__name__}.load_state_dict: the parameters are perturbed; call "
                               "second_step() first")
        if not isinstance(state_dict, dict) or "sam" not in state_dict:
            raise ValueError("state_dict: has no 'sam' settings (not written by a SAM/FisherSAM state_dict())")
        rest = dict(state_dict)
        settings = rest.pop("sam")
        if not isinstance(settings, dict) or set(settings) != set(self._settings()):
            raise ValueError(f"state_dict: its 'sam' settings {settings!r} are not those of a {type(self).__name__} "
                             f"(keys {sorted(self._settings())})")
        previous = self._settings()
        self._apply_settings(settings)
        try:
            self.base_optimizer.load_state_dict(rest)
        except BaseException:
            self._apply_settings(previous)  # nothing half-loaded
            raise
        # the base optimizer rebuilt its groups and state: share them again
        self.param_groups, self.state = self.base_optimizer.param_groups, self.base_optimizer.state

    def __getstate__(self):
        if self._saved is not None:
            raise RuntimeError(f"fisherext.{type(self).__name__}: cannot copy or pickle the optimizer between "
                               "first_step and second_step")
        return {**super().__getstate__(), "base_optimizer": self.base_optimizer, "_saved": None,
                "_config": self._settings()}

    def __setstate__(self, state):
        state = dict(state)
        settings = state.pop("_config")
        super().__setstate__(state)
        self._apply_settings(settings)
        self._flat = {}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        return f"{type(self).__name__}({settings}, base_optimizer={self.base_optimizer!r})"


def _with_shared_methods(cls):
    """Copies the public methods of the shared machinery into the class, so that ``entry_points`` wraps
    them under the class's own name (errors read ``fisherext.FisherSAM.step: ...``)."""
    for attr, value in vars(_SharpnessAware).items():
        if inspect.isfunction(value) and not attr.startswith("_") and attr not in vars(cls):
            setattr(cls, attr, value)
    return cls


@entry_points
@_with_shared_methods
class SAM(_SharpnessAware):
    r"""Sharpness-aware minimization (Foret et al., 2021), optionally adaptive (ASAM, Kwon et al., 2021).

    .. math:: \varepsilon = \rho\, \frac{g}{\|g\|_2}, \qquad
              \text{adaptive: } \varepsilon = \rho\, \frac{T^2 g}{\|T g\|_2},\ T = |\theta| + \eta

    (elementwise; norms over every parameter with a gradient, in all groups), then the base optimizer
    steps with :math:`\nabla L(\theta + \varepsilon)` from :math:`\theta`.

    Args:
        params: the parameters (an iterable of tensors, of (name, tensor) pairs, or of groups: dicts with
            "params" and options of the base optimizer).
        base_optimizer: a ``torch.optim.Optimizer`` class, built as ``base_optimizer(params, **kw)`` over
            the same groups; or an instance, built over exactly the tensors of ``params`` (then ``kw``
            must be empty and ``params`` groups carry no options: the instance's groups are used). An
            instance lets the base optimizer take options named like this one's (Adadelta's ``rho``).
        rho: the radius ρ > 0 (one for all groups). Default 0.05 (Foret et al.); adaptive SAM uses larger
            radii (Kwon et al. report 0.5 to 2 with SGD).
        adaptive: ASAM's scale-invariant neighbourhood. T applies to every parameter, biases included.
        eta: ASAM's η ≥ 0, keeping T > 0 where θ = 0; only with ``adaptive=True`` (default there 0.01).
        **kw: options of the base optimizer (``lr``, ``momentum``, ...) when it is a class.

    Use either two passes per step,

    .. code-block:: python

        loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)

    or ``opt.step(closure)`` after the first backward pass (the closure runs once, at θ + ε).
    ``optimizer.state``, ``param_groups`` and ``defaults`` are the base optimizer's (shared); a
    learning-rate scheduler works on either. ``state_dict()`` holds no copy of θ: save checkpoints
    outside a first_step/second_step pair.

    Raises:
        ValueError: rho ≤ 0 or not finite, eta < 0 or not finite, eta without adaptive, an instance over
            other parameters.
        TypeError: base_optimizer neither an optimizer class nor an instance (or a SAM itself), adaptive
            not a bool, options for an instance.
    """

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, adaptive: bool = False,
                 eta: float | None = None, **kw):
        self._apply_settings({"rho": rho, "adaptive": adaptive, "eta": eta})
        self._setup(params, base_optimizer, kw)

    def _settings(self) -> dict:
        return {"rho": self.rho, "adaptive": self.adaptive, "eta": self.eta}

    def _apply_settings(self, settings: dict) -> None:
        adaptive, eta = settings["adaptive"], settings["eta"]
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive: expected a bool, got {adaptive!r}")
        if eta is not None and not adaptive:
            raise ValueError(f"eta: is adaptive SAM's η, used only with adaptive=True, got {eta!r} "
                             "(FisherSAM takes its own eta)")
        self.rho = _check_rho(settings["rho"])
        self.adaptive = adaptive
        self.eta = (0.01 if eta is None else _check_eta(eta)) if adaptive else None

    def _direction(self, params, grads, scratch, acc):
        if not self.adaptive:
            return grads, torch.stack(torch._foreach_norm(grads, 2, dtype=acc))
        _, d = self._buffer("work", params)
        w = scratch[1]
        torch._foreach_copy_(d, params)
        torch._foreach_abs_(d)
        torch._foreach_add_(d, self.eta)                     # T = |θ| + η
        torch._foreach_zero_(w)
        torch._foreach_addcmul_(w, d, grads)                 # T g
        torch._foreach_mul_(d, w)                            # T² g
        return d, torch.stack(torch._foreach_norm(w, 2, dtype=acc))


@entry_points
@_with_shared_methods
class FisherSAM(_SharpnessAware):
    r"""Fisher SAM (Kim et al., ICML 2022): the neighbourhood is an ellipsoid of the diagonal Fisher
    approximation :math:`f = 1 + \eta\, g \odot g` (g the mini-batch gradient in ``.grad``),

    .. math:: \varepsilon = \gamma\, \frac{f^{-1} \odot g}{\sqrt{g^\top (f^{-1} \odot g)}}, \qquad
              \varepsilon^\top \mathrm{diag}(f)\, \varepsilon = \gamma^2,

    the maximizer of :math:`g^\top \varepsilon` on that ellipsoid; the normalizer is
    :math:`\sqrt{g^\top f^{-1} g}`, not :math:`\|f^{-1} g\|_2`. ``FisherSAM(rho=r, eta=0)`` takes the
    same steps as ``SAM(rho=r)``.

    Args:
        params: as for :class:`SAM`.
        base_optimizer: as for :class:`SAM` (a class built with ``**kw``, or an instance).
        rho: the radius γ > 0 of the paper (one for all groups).
        eta: η ≥ 0, the weight of the squared gradient in f.
        **kw: options of the base optimizer when it is a class.

    Steps, closure, state and checkpoints as for :class:`SAM`.

    Raises:
        ValueError: rho ≤ 0 or not finite, eta < 0 or not finite, an instance over other parameters.
        TypeError: base_optimizer neither an optimizer class nor an instance (or a SAM itself), options
            for an instance.
    """

    def __init__(self, params, base_optimizer, *, rho: float, eta: float, **kw):
        self._apply_settings({"rho": rho, "eta": eta})
        self._setup(params, base_optimizer, kw)

    def _settings(self) -> dict:
        return {"rho": self.rho, "eta": self.eta}

    def _apply_settings(self, settings: dict) -> None:
        self.rho, self.eta = _check_rho(settings["rho"]), _check_eta(settings["eta"])

    def _direction(self, params, grads, scratch, acc):
        if self.eta == 0:  # f = 1: SAM's rule, computed as SAM computes it
            return grads, torch.stack(torch._foreach_norm(grads, 2, dtype=acc))
        # On flat buffers: four passes (cat, addcmul, div, dot), where lists of tensors need eight.
        g, _ = scratch
        f, d = self._buffer("work", params)
        torch.cat([t.reshape(-1) for t in grads], out=g)
        torch.addcmul(g.new_ones(()), g, g, value=self.eta, out=f)       # f = 1 + η g²
        torch.div(g, f, out=f)                                           # f⁻¹ g
        if acc == g.dtype:
            q = torch.dot(g, f)
        else:  # half precision: the sum in float32
            q = torch.dot(g.to(acc), f.to(acc))
        return d, q.sqrt().reshape(1)                                    # √(gᵀ f⁻¹ g)
