r"""Learning rates from curvature: the largest eigenvalue of the loss's Hessian, :math:`\eta = 1/\lambda_{max}`,
and a comparison of optimizers trained from one initialization.

With :math:`L(\theta) = \frac1N\sum_n \ell(f(x_n;\theta), y_n)` the mean loss over the data and
:math:`H = \nabla^2 L` (or the Gauss-Newton matrix G with ``curvature="ggn"``), :math:`\lambda_{max}` is the
largest (algebraic) eigenvalue of H, found matrix-free from products ``H @ v`` (``fisherext.HessianOperator``
/ ``fisherext.GGNOperator``) by ``fisherext.spectral.lanczos`` or ``fisherext.spectral.power_iteration``.

Why :math:`1/\lambda_{max}`: gradient descent :math:`\theta \leftarrow \theta - \eta\nabla L` on a quadratic
:math:`L = \frac12 (\theta-\theta^*)^\top H (\theta-\theta^*)` multiplies the error along the eigenvector of
eigenvalue :math:`\lambda_i` by :math:`1 - \eta\lambda_i` at each step, so it converges for every start iff
:math:`0 < \eta < 2/\lambda_{max}` (H positive definite) and diverges along the top eigenvector for
:math:`\eta > 2/\lambda_{max}`. :math:`\eta = 1/\lambda_{max}` removes the top direction's error in one step
and contracts every other one by :math:`1 - \lambda_i/\lambda_{max} \in [0, 1)`; it is the choice of the
optimization tutorial this module follows, which calls it optimal. It is a safe rate, not the fastest
constant one: that is :math:`2/(\lambda_{max} + \lambda_{min})`, contracting by
:math:`(\kappa-1)/(\kappa+1)` per step, :math:`\kappa = \lambda_{max}/\lambda_{min}`. For a network the
Hessian changes as it trains, so the rate holds near the point where it was measured.
"""
from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .._core.checks import check_choice, check_positive_int
from .._core.data import progress_bar
from .._core.entry import entry_point
from .._core.likelihood import curvature_loss
from .._core.types import Data, Loss, Params
from ..curvature.operators import GGNOperator, HessianOperator
from ..curvature.products import CURVATURES
from ..linalg.spectral import lanczos, power_iteration
from .natural import NaturalGradient

METHODS = ("lanczos", "power")
#: The optimizers ``compare_optimizers`` knows by name (the torch.optim class and its settings; "gd" is
#: full-batch gradient descent, the others take minibatches).
OPTIMIZERS = ("gd", "sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "natural")


def _check_method_options(method: str, maxiter, tol, m) -> None:
    check_positive_int("maxiter", maxiter)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol: must be a finite number >= 0, got {tol!r}")
    if m is not None:
        if method != "lanczos":
            raise ValueError(f"m: the Krylov dimension applies to method='lanczos' only, got m={m!r} with "
                             f"method={method!r}")
        check_positive_int("m", m)


def _largest(A, method: str, maxiter: int, tol: float, m, generator) -> torch.Tensor:
    """The largest algebraic eigenvalue of the symmetric operator A, a 0-d tensor."""
    if method == "lanczos":
        return lanczos(A, 1, which="largest", m=m, generator=generator)[0][0]
    top = power_iteration(A, 1, maxiter=maxiter, tol=tol, generator=generator)[0][0]
    if top >= 0:
        return top
    # The dominant eigenvalue is negative (λ_min = top): H − λ_min I = H + |λ_min| I is PSD with the
    # dominant eigenvalue λ_max − λ_min, which power iteration finds.
    shift = -top.item()
    return power_iteration(A.damped(shift), 1, maxiter=maxiter, tol=tol, generator=generator)[0][0] - shift


@entry_point(name="optim.max_eigenvalue")
def max_eigenvalue(model: nn.Module, loss: Loss, data: Data, *, method: str = "lanczos", curvature: str = "hessian",
                   params: Params = None, batch_size: int | None = None, maxiter: int = 100, tol: float = 1e-6,
                   m: int | None = None, generator: torch.Generator | None = None,
                   progress: bool = False) -> torch.Tensor:
    r""":math:`\lambda_{max}`, the largest eigenvalue of the Hessian of the mean loss over ``data`` (or of its
    Gauss-Newton matrix), matrix-free (the math: :mod:`fisherext.optim.learning_rate`).

    Args:
        model: maps inputs to outputs; the curvature is taken at its current parameters.
        loss: a likelihood's name ("cross_entropy", "mse", "bce": the torch loss with reduction="mean") or
            a torch loss ``loss(outputs, targets)`` returning the batch's mean loss.
        data: a DataLoader, a Dataset, or an (x, y) tuple; streamed at every product.
        method: "lanczos" (``fisherext.spectral.lanczos``, the largest algebraic Ritz value of an m-step
            Krylov space; exact for m >= P) or "power" (``fisherext.spectral.power_iteration``, which finds
            the eigenvalue of largest magnitude; when that is negative, a second run on
            :math:`H + |\lambda_{min}| I` gives :math:`\lambda_{max}`). Default "lanczos".
        curvature: "hessian" (may be indefinite) or "ggn" (PSD for a convex loss).
        params: None (all parameters that require grad), or names, modules or tensors.
        batch_size: samples per batch of the products for tensor or Dataset data.
        maxiter, tol: power iteration's limit on iterations and its relative residual to stop at.
        m: Lanczos's Krylov dimension (None: ``fisherext.spectral.lanczos``'s default, min(P, 40)).
        generator: the source of the random start vector (None: torch's global generator).
        progress: a progress bar over the batches of each product.

    Returns:
        a 0-d tensor in the parameters' dtype and device.

    Raises:
        ValueError: an unknown ``method`` or ``curvature``, bad ``maxiter``, ``tol`` or ``m`` (or ``m`` with
            method="power"), as the curvature operators (a bad ``batch_size``, a model in train mode with
            dropout or BatchNorm on batch statistics, no samples).
        TypeError: ``loss`` neither a name nor callable.
    """
    check_choice("method", method, METHODS)
    check_choice("curvature", curvature, CURVATURES)
    _check_method_options(method, maxiter, tol, m)
    operator = HessianOperator if curvature == "hessian" else GGNOperator
    A = operator(model, loss, data, params=params, batch_size=batch_size, progress=progress)
    return _largest(A, method, maxiter, tol, m, generator)


@entry_point(name="optim.curvature_learning_rate")
def curvature_learning_rate(model: nn.Module, loss: Loss, data: Data, *, scale: float = 1.0,
                            method: str = "lanczos", curvature: str = "hessian", params: Params = None,
                            batch_size: int | None = None, maxiter: int = 100, tol: float = 1e-6,
                            m: int | None = None, generator: torch.Generator | None = None,
                            progress: bool = False) -> float:
    r"""The learning rate :math:`\eta = s/\lambda_{max}` of gradient descent at the model's current
    parameters (:math:`s = 1`: the tutorial's :math:`1/\lambda_{max}`; GD on a quadratic is stable for
    :math:`s < 2`). The math: :mod:`fisherext.optim.learning_rate`.

    Args:
        model, loss, data, method, curvature, params, batch_size, maxiter, tol, m, generator, progress:
            as :func:`max_eigenvalue`.
        scale: s > 0, the multiple of :math:`1/\lambda_{max}`. Default 1.

    Returns:
        a Python float, ready for a ``torch.optim`` constructor (one host sync, which finding
        :math:`\lambda_{max}` needs anyway).

    Raises:
        ValueError: scale <= 0; :math:`\lambda_{max} \le 0` (no positive curvature: no learning rate follows);
            as :func:`max_eigenvalue`.
        TypeError: as :func:`max_eigenvalue`.
    """
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: must be a finite number > 0, got {scale!r}")
    top = max_eigenvalue(model, loss, data, method=method, curvature=curvature, params=params,
                         batch_size=batch_size, maxiter=maxiter, tol=tol, m=m, generator=generator,
                         progress=progress).item()
    if not top > 0:
        raise ValueError(f"curvature: the largest eigenvalue of the {curvature} is {top:.6g} <= 0, so "
                         "scale/lambda_max is no learning rate")
    return float(scale) / top


@dataclass
class OptimizerComparison:
    """The result of :func:`compare_optimizers`; curves are plain lists of floats, ready for JSON.

    ``steps``: parameter updates per optimizer; every curve has ``steps + 1`` entries (before the first
    update, then after each). ``losses``: {optimizer: the mean loss over the whole training data after each
    update}; ``test_losses``: the same over the test data (empty without test data). ``accuracy`` and
    ``test_accuracy``: {optimizer: final accuracy} on the training and test data (empty unless
    classification). ``lr``: {optimizer: the learning rate it ran with}. ``lambda_max``: the initial model's
    :math:`\\lambda_{max}` when some rate was "curvature", else None. ``batch_size``: the minibatch size
    (None: the whole data).
    """
    steps: int
    losses: dict[str, list[float]] = field(default_factory=dict)
    test_losses: dict[str, list[float]] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)
    test_accuracy: dict[str, float] = field(default_factory=dict)
    lr: dict[str, float] = field(default_factory=dict)
    lambda_max: float | None = None
    batch_size: int | None = None


def _tensor_pair(name: str, data):
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        raise TypeError(f"{name}: expected an (x, y) tuple of tensors (the data held in memory), got "
                        f"{type(data).__name__}")
    x, y = data
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: x and y have {x.shape[0]} and {y.shape[0]} samples")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no samples")
    return x, y


def _builder(entry, momentum: float, kwargs: dict, loss):
    """(label, factory(model, lr) -> optimizer, minibatches?) of one entry of ``optimizers``."""
    if isinstance(entry, str):
        check_choice("optimizers", entry, OPTIMIZERS)
        own = dict(kwargs.get(entry, {}))
        optim = torch.optim
        table = {
            "gd": (optim.SGD, {}), "sgd": (optim.SGD, {}), "momentum": (optim.SGD, {"momentum": momentum}),
            "nesterov": (optim.SGD, {"momentum": momentum, "nesterov": True}), "adagrad": (optim.Adagrad, {}),
            "rmsprop": (optim.RMSprop, {}), "adam": (optim.Adam, {}),
        }
        if entry == "natural":
            own.setdefault("loss", loss)   # the Fisher of the likelihood being trained
            return entry, (lambda model, lr: NaturalGradient(model, lr, **own)), True
        cls, settings = table[entry]
        settings = {**settings, **own}
        return entry, (lambda model, lr: cls(model.parameters(), lr=lr, **settings)), entry != "gd"
    if isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str) and callable(entry[1]):
        return entry[0], entry[1], True
    raise ValueError(f"optimizers: each entry must be one of {', '.join(map(repr, OPTIMIZERS))} or a (label, "
                     f"factory(model, lr) -> optimizer) pair, got {entry!r}")


def _is_classification(out: torch.Tensor, y: torch.Tensor) -> bool:
    return out.dim() == 2 and out.shape[1] > 1 and y.dim() == 1 and not y.is_floating_point()


@torch.no_grad()
def _evaluate(model, loss, x, y):
    """(mean loss, accuracy or None) of the model in eval mode (no dropout noise in the curves)."""
    training = model.training
    model.eval()
    try:
        out = model(x)
    finally:
        model.train(training)
    acc = (out.argmax(1) == y).double().mean().item() if _is_classification(out, y) else None
    return float(loss(out, y)), acc


@entry_point(name="optim.compare_optimizers")
def compare_optimizers(model: nn.Module | Callable[[], nn.Module], loss: Loss, data: Data, *,
                       optimizers: Sequence = ("gd", "sgd", "momentum", "adam"),
                       lr: float | str | dict = "curvature", steps: int = 100, batch_size: int | None = 64,
                       momentum: float = 0.9, optimizer_kwargs: dict | None = None, test_data: Data | None = None,
                       curvature: str = "hessian", generator: torch.Generator | None = None,
                       progress: bool = False) -> OptimizerComparison:
    r"""Trains one copy of a model per optimizer, all from the same initial parameters on the same sequence
    of minibatches, and returns their loss curves (the sharpness experiment's optimizer comparison).

    Each optimizer takes ``steps`` updates. "gd" uses the whole training data at every step (the gradient of
    the mean loss); the others take minibatches of ``batch_size`` samples, drawn without replacement within
    each pass over the data (a new permutation from ``generator`` per pass), the same batches for every
    optimizer. After each update the mean loss over the whole training data (and ``test_data``) is recorded.
    With ``lr="curvature"`` the learning rate is :math:`1/\lambda_{max}` of the Hessian (or GGN) of the
    initial model's mean loss over the training data (:func:`curvature_learning_rate`, by Lanczos), the
    same for every optimizer given it: the stability scale of gradient descent, only a common reference for
    the adaptive ones. Losses that overflow are recorded as they are (inf or nan), training goes on. Training
    runs in the model's own mode; the recorded losses and accuracies are evaluated in eval mode.

    Args:
        model: an nn.Module, copied (``copy.deepcopy``) for each optimizer and never changed itself, or a
            callable returning a fresh model, called once (its result is then copied for each optimizer).
        loss: a likelihood's name ("cross_entropy", "mse", "bce": the torch loss with reduction="mean") or
            a torch loss ``loss(outputs, targets)`` returning a batch's mean loss.
        data: the training data, an (x, y) tuple of tensors.
        optimizers: names from :data:`OPTIMIZERS` — "gd" (SGD, full batch), "sgd", "momentum" (SGD with
            ``momentum``), "nesterov", "adagrad", "rmsprop", "adam" (torch.optim defaults otherwise),
            "natural" (:class:`~fisherext.optim.NaturalGradient`, refreshing its factors on each minibatch) —
            or (label, factory) pairs, ``factory(model, lr)`` returning an optimizer of that model (it is
            stepped as ``opt.step(closure)``, the closure recomputing the minibatch's loss and gradients).
        lr: a float for all, "curvature", or a dict {label: float or "curvature"} covering every optimizer.
        steps: parameter updates per optimizer, a positive int.
        batch_size: minibatch size (None: the whole data, so "sgd" equals "gd").
        momentum: the momentum of "momentum" and "nesterov".
        optimizer_kwargs: {name: {keyword: value}} passed to a named optimizer's constructor (e.g.
            ``{"adam": {"betas": (0.9, 0.99)}, "natural": {"damping": 1e-2}}``).
        test_data: None, or an (x, y) tuple of tensors for test curves and accuracies.
        curvature: "hessian" or "ggn", for ``lr="curvature"``.
        generator: the source of the minibatch order and of Lanczos's start (None: torch's global one).
        progress: a progress bar over the optimizers' steps.

    Returns:
        an :class:`OptimizerComparison`: curves of ``steps + 1`` losses per optimizer; final accuracies when
        the outputs are class scores [N, C] and the targets integer labels [N].

    Raises:
        ValueError: an unknown optimizer or a repeated label, a bad ``lr`` (<= 0, an unknown string, a dict
            missing an optimizer), ``steps`` or ``batch_size`` < 1, x and y of different lengths, no
            samples, :math:`\lambda_{max} \le 0` for ``lr="curvature"``.
        TypeError: data or test_data not an (x, y) tuple of tensors, ``model`` neither a module nor a
            callable returning one, ``optimizer_kwargs`` no dict.
    """
    x, y = _tensor_pair("data", data)
    test = None if test_data is None else _tensor_pair("test_data", test_data)
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size, optional=True)
    check_choice("curvature", curvature, CURVATURES)
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum < 1:
        raise ValueError(f"momentum: must be a number in [0, 1), got {momentum!r}")
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
        raise TypeError(f"optimizer_kwargs: expected a dict {{name: {{keyword: value}}}}, got "
                        f"{type(optimizer_kwargs).__name__}")
    if isinstance(optimizers, str) or not isinstance(optimizers, Sequence) or not optimizers:
        raise ValueError(f"optimizers: expected a non-empty sequence of names or (label, factory) pairs, got "
                         f"{optimizers!r}")
    builders = [_builder(entry, momentum, optimizer_kwargs or {}, loss) for entry in optimizers]
    labels = [b[0] for b in builders]
    if len(set(labels)) != len(labels):
        raise ValueError(f"optimizers: the labels must differ, got {labels}")
    unknown = [k for k in (optimizer_kwargs or {}) if k not in labels]
    if unknown:
        raise ValueError(f"optimizer_kwargs: has settings for {', '.join(map(repr, unknown))}, which is not among "
                         f"the optimizers {labels}")
    rates = _rates(lr, labels)
    loss = curvature_loss(loss)
    initial = model if isinstance(model, nn.Module) else model() if callable(model) else None
    if not isinstance(initial, nn.Module):
        raise TypeError(f"model: expected an nn.Module or a callable returning one, got "
                        f"{type(model if initial is None else initial).__name__}")
    initial = copy.deepcopy(initial)   # the caller's model is never touched, not even its .grad
    batches = _minibatches(x.shape[0], batch_size, steps, generator, x.device)
    result = OptimizerComparison(steps=steps, batch_size=batch_size)
    if "curvature" in rates.values():
        result.lambda_max = max_eigenvalue(initial, loss, (x, y), curvature=curvature, generator=generator).item()
        if not result.lambda_max > 0:
            raise ValueError(f"lr: 'curvature' needs a positive lambda_max of the {curvature}, got "
                             f"{result.lambda_max:.6g}")
    result.lr = {k: 1.0 / result.lambda_max if v == "curvature" else v for k, v in rates.items()}
    bar = progress_bar(None, progress, "compare_optimizers", total=steps * len(builders), unit="step")
    with bar:
        for label, factory, minibatch in builders:
            net = copy.deepcopy(initial)
            opt = factory(net, result.lr[label])
            _train(net, opt, loss, (x, y), test, batches if minibatch else None, steps, result, label, bar)
    return result


def _rates(lr, labels) -> dict:
    def check(key, value):
        if value == "curvature":
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"lr: {key}must be a finite number > 0 or 'curvature', got {value!r}")
        return float(value)

    if isinstance(lr, dict):
        missing = [k for k in labels if k not in lr]
        if missing:
            raise ValueError(f"lr: the dict has no learning rate for {', '.join(map(repr, missing))}")
        return {k: check(f"the rate of {k!r} ", lr[k]) for k in labels}
    value = check("", lr)
    return {k: value for k in labels}


def _minibatches(n: int, batch_size, steps: int, generator, device) -> list:
    """The index tensors of ``steps`` minibatches: consecutive slices of a fresh permutation per pass."""
    if batch_size is None or batch_size >= n:
        return [None] * steps   # the whole data
    out, perm, at = [], None, n
    for _ in range(steps):
        if at + batch_size > n:   # a new pass; the tail of the old one, shorter than a batch, is dropped
            perm, at = torch.randperm(n, generator=generator).to(device), 0
        out.append(perm[at:at + batch_size])
        at += batch_size
    return out


def _train(model, opt, loss, data, test, batches, steps, result, label, bar) -> None:
    x, y = data

    def record():
        value, acc = _evaluate(model, loss, x, y)
        result.losses.setdefault(label, []).append(value)
        if acc is not None:
            result.accuracy[label] = acc
        if test is not None:
            value, acc = _evaluate(model, loss, *test)
            result.test_losses.setdefault(label, []).append(value)
            if acc is not None:
                result.test_accuracy[label] = acc

    record()
    builtin = type(opt).__module__.startswith("torch.optim")
    for t in range(steps):
        idx = None if batches is None else batches[t]
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])

        def closure():
            opt.zero_grad()
            value = loss(model(xb), yb)
            value.backward()
            return value

        if isinstance(opt, NaturalGradient):
            opt.step(closure, batch=(xb, yb))
        elif builtin:   # torch.optim's own classes call the closure exactly once, as a plain step would
            opt.step(closure)
        else:
            closure()   # the gradient at the current point first (SAM-like optimizers perturb from it)
            opt.step(closure)
        record()
        bar.update(1)


__all__ = ["OPTIMIZERS", "OptimizerComparison", "compare_optimizers", "curvature_learning_rate",
           "max_eigenvalue"]
