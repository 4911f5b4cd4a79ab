r"""Adversarial attacks on the inputs of a model: the fast gradient sign method and projected gradient descent.

Given inputs :math:`x_n`, labels :math:`y_n` and the per-sample loss :math:`\ell_n(x) = \ell(f(x;\theta), y_n)`
(by default the negative log-likelihood :math:`-\log p(y_n|x)` of softmax cross-entropy), projected
gradient descent (Madry et al., 2018) maximizes each sample's loss over the ball
:math:`\mathcal B_n = \{x : \|x - x_n\|_p \le \epsilon\}`, intersected with the data range
:math:`[lo, hi]` when ``clamp`` is given:

.. math:: x^{(t+1)} = \Pi_{\mathcal B_n \cap [lo, hi]}\big(x^{(t)} + \alpha\, s(g^{(t)})\big),
          \qquad g^{(t)} = \nabla_x \ell_n(x^{(t)}),

with the steepest-ascent direction of the norm, :math:`s(g) = \mathrm{sign}(g)` for :math:`L_\infty` and
:math:`s(g) = g / \|g\|_2` for :math:`L_2`. The projection is per sample: for :math:`L_\infty` the
perturbation :math:`\delta = x - x_n` is clamped to :math:`[-\epsilon, \epsilon]` entrywise, for
:math:`L_2` it is scaled by :math:`\min(1, \epsilon / \|\delta\|_2)`, the norm taken over all
non-batch axes of the sample; the result is then clamped to :math:`[lo, hi]` (which keeps it in the
ball, since :math:`x_n` lies in the range). A targeted attack takes :math:`y_n` as the target labels and
*descends* the loss, :math:`x^{(t+1)} = \Pi(x^{(t)} - \alpha\, s(g^{(t)}))`. The fast gradient sign
method (Goodfellow et al., 2015) is one such step of size :math:`\alpha = \epsilon` from
:math:`x_n` (for :math:`L_2`, the fast gradient method :math:`x_n + \epsilon\, g/\|g\|_2`). With
``early_stop=True`` each sample stops at the first iterate where the attack succeeds (the prediction
leaves :math:`y_n`, or reaches the target), which leaves it just past the decision boundary instead of
deep inside the wrong class.

Normalization: the gradient is that of the *sum* of the per-sample losses over the batch,
:math:`\nabla_{x_n} \sum_m \ell_m = \nabla_{x_n} \ell_n`, so each sample's step is its own and does not
shrink with the batch size (a batch-mean loss would divide every gradient by N). Both step rules use
only the direction of each sample's gradient, so the scale of the loss does not change the attack.
All samples of the batch are attacked at once; the result equals attacking each sample alone.

The model is never changed: gradients are taken with ``torch.autograd.grad`` with respect to the
inputs only, so no parameter's ``.grad`` is written and no ``requires_grad`` flag is touched; the
parameters, buffers and train/eval mode stay as they were. The attack runs in the mode the model is in
(call ``model.eval()`` first for the usual attack on a trained model). A BatchNorm that normalizes with
batch statistics (train mode, or ``track_running_stats=False``) is refused: it would couple the samples
of the batch and, in train mode, update its running statistics at every step. A model with dropout in
train mode draws new masks at every step (not controlled by ``generator``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._core.checks import check_choice, check_eps, check_float_batch, check_positive_int
from ._core.conventions import checked_output
from ._core.data import progress_bar
from ._core.entry import entry_point
from ._core.likelihood import Likelihood, curvature_loss
from ._core.types import Loss

NORMS = ("linf", "l2")


def _check_model(model) -> None:
    """Refuses BatchNorm on batch statistics (see the module docstring), naming the module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or not module.track_running_stats):
            where = f"module {name!r}" if name else "the model itself"
            why = ("is in train mode: it would normalize with the statistics of the batch, coupling its "
                   "samples, and update its running statistics at every step" if module.track_running_stats
                   else "has no running statistics (track_running_stats=False), so it normalizes with the "
                   "statistics of the batch, coupling its samples")
            raise ValueError(f"model: {where} ({type(module).__name__}) {why}; call model.eval()")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: must be a finite number >= 0 (the radius of the ball), got {eps!r}")
    return float(eps)


def _check_inputs(x, y) -> None:
    check_float_batch("x", x, finite=True)  # floating point: the attack moves the inputs along gradients
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y: expected a tensor of labels (targets, for targeted=True), got {type(y).__name__}")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected {x.shape[0]} labels (one per input), got shape {tuple(y.shape)}")


def _check_clamp(clamp, x):
    """(lo, hi) as floats, or None; the range must be proper and hold every input."""
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and not math.isnan(b) for b in clamp):
        raise ValueError(f"clamp: expected the data range (lo, hi) as two numbers, or None, got {clamp!r}")
    lo, hi = float(clamp[0]), float(clamp[1])
    if not lo < hi:
        raise ValueError(f"clamp: the range (lo, hi) needs lo < hi, got ({lo:g}, {hi:g})")
    x_lo, x_hi = torch.aminmax(x.detach())
    if x_lo.item() < lo or x_hi.item() > hi:
        raise ValueError(f"clamp: the inputs span [{x_lo.item():g}, {x_hi.item():g}], outside the data range "
                         f"[{lo:g}, {hi:g}]; pass the range the inputs live in")
    return lo, hi


def _check_generator(generator, x) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != x.device.type:
        raise ValueError(f"generator: is on {generator.device} but the inputs are on {x.device}")


def _checked(model, x, y, eps, norm, targeted, clamp, generator, loss):
    """The checks fgsm and pgd share: (eps as a float, clamp as (lo, hi) or None, the loss)."""
    eps = _check_eps(eps)
    check_choice("norm", norm, NORMS)
    if not isinstance(targeted, bool):
        raise TypeError(f"targeted: expected a bool, got {type(targeted).__name__}")
    _check_model(model)
    _check_inputs(x, y)
    clamp = _check_clamp(clamp, x)
    _check_generator(generator, x)
    return eps, clamp, curvature_loss(loss)


def _check_labels(loss, out, y) -> None:
    """Class labels for cross-entropy on logits [N, C]: integers in [0, C) (torch's own error would not name y)."""
    if loss.name == "cross_entropy" and out.dim() == 2:
        if y.is_floating_point() or y.dim() != 1:
            raise ValueError(f"y: cross_entropy on logits [N, C] needs integer class labels [N], got {y.dtype} "
                             f"{tuple(y.shape)}")
        counted = y[y != loss.ignore_index]
        if counted.numel() and (counted.min() < 0 or counted.max() >= out.shape[1]):
            raise ValueError(f"y: labels must lie in [0, {out.shape[1]}), got [{int(counted.min())}, "
                             f"{int(counted.max())}]")


def _summed_loss(loss, out, y):
    """Σ_n ℓ_n over the batch as a function of the outputs: a likelihood's name gives the per-sample negative
    log-likelihood exactly (its batch mean times the mean's denominator, which depends on the labels and
    shapes only, so it is computed once from the first outputs), a torch loss its batch mean times N."""
    if isinstance(loss, Likelihood):
        _check_labels(loss, out, y)
        denominator = loss.at(out, y).mean_denominator()
        return lambda o: loss(o, y) * denominator
    n = out.shape[0]

    def total(o):
        value = loss(o, y)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"loss: must return the batch's loss as one number, got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        return value.reshape(()) * n

    return total


def _per_sample_norms(t: torch.Tensor) -> torch.Tensor:
    """‖t_n‖₂ over all non-batch axes, shaped to broadcast against t: [N, 1, ..., 1]."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(x_adv, x, eps, norm, clamp):
    """x_adv moved back into the ball of radius eps around x (per sample), then into the data range."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        # min(1, eps/‖δ‖); a zero δ (or eps = 0) gives a factor that leaves δ = 0
        scale = (eps / _per_sample_norms(delta).clamp_min(torch.finfo(delta.dtype).tiny)).clamp(max=1.0)
        delta = delta * scale
    out = x + delta
    return out if clamp is None else out.clamp(*clamp)


def _random_start(x, eps, norm, generator):
    """A point drawn uniformly from the ball of radius eps around each input."""
    shape, opts = x.shape, dict(dtype=x.dtype, device=x.device, generator=generator)
    if norm == "linf":
        return x + (2 * torch.rand(shape, **opts) - 1) * eps
    # Uniform in the d-ball: an isotropic direction (a normalized Gaussian) times a radius eps·U^(1/d),
    # since the volume within radius r grows as r^d.
    d = x[0].numel()
    direction = torch.randn(shape, **opts)
    direction = direction / _per_sample_norms(direction).clamp_min(torch.finfo(x.dtype).tiny)
    radius = eps * torch.rand((shape[0],) + (1,) * (x.dim() - 1), **opts) ** (1.0 / d)
    return x + radius * direction


def _succeeded(out, y, targeted) -> torch.Tensor:
    """Per sample, whether the attack has reached its goal: the predicted class differs from y
    (untargeted) or equals it (targeted). [N] bool."""
    if out.dim() != 2:
        raise ValueError(f"early_stop: needs class logits [N, C] to tell success, got outputs {tuple(out.shape)}")
    hit = out.argmax(dim=1) == y
    return hit if targeted else ~hit


def _attack(model, x, y, *, eps, norm, steps, step_size, random_start, clamp, targeted, generator, loss, progress,
            desc, early_stop=False):
    """The projected-gradient iteration shared by fgsm and pgd, once the arguments are checked."""
    x0 = x.detach()
    if random_start and eps > 0:
        x_adv = _project(_random_start(x0, eps, norm, generator), x0, eps, norm, clamp)
    else:
        x_adv = x0.clone()
    sign = -1.0 if targeted else 1.0
    tiny = torch.finfo(x0.dtype).tiny
    with torch.enable_grad():
        for step in progress_bar(range(steps), progress, desc):
            x_adv.requires_grad_(True)
            out = checked_output(model(x_adv))
            if step == 0:
                objective = _summed_loss(loss, out, y)
            (g,) = torch.autograd.grad(objective(out), [x_adv])
            x_adv = x_adv.detach()
            if norm == "linf":
                direction = g.sign()
            else:
                direction = g / _per_sample_norms(g).clamp_min(tiny)  # a zero gradient: no step
            moved = _project(x_adv + (sign * step_size) * direction, x0, eps, norm, clamp)
            if early_stop:
                # a sample stays at the first iterate where the attack succeeds (torch.where: bit for bit)
                done = _succeeded(out.detach(), y, targeted)
                if bool(done.all()):
                    break
                moved = torch.where(done.view(-1, *([1] * (x0.dim() - 1))), x_adv, moved)
            x_adv = moved
    return x_adv.detach()


@entry_point(name="attacks.fgsm")
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
         targeted: bool = False, clamp: tuple[float, float] | None = None,
         loss: Loss = "cross_entropy") -> torch.Tensor:
    r"""The fast gradient sign method: one gradient step of size :math:`\epsilon` on every input.

    .. math:: x^{adv}_n = \mathrm{clamp}_{[lo, hi]}\big(x_n \pm \epsilon\, s(\nabla_x \ell_n(x_n))\big),
              \qquad s(g) = \mathrm{sign}(g)\ (L_\infty), \quad s(g) = g/\|g\|_2\ (L_2),

    with + (the loss ascended) for an untargeted attack and − for a targeted one (the math, the
    normalization and what stays untouched: :mod:`fisherext.attacks`).

    Args:
        model: maps inputs x [N, ...] to outputs (logits [N, C] for cross-entropy). Attacked in the mode
            it is in; BatchNorm on batch statistics is refused.
        x: the inputs [N, ...], floating point.
        y: the labels [N] (for ``targeted=True``: the target labels).
        eps: the radius :math:`\epsilon \ge 0` of the perturbation (0 returns x).
        norm: "linf" (the sign step) or "l2" (the normalized gradient, per sample over all non-batch axes).
        targeted: whether y are target labels, whose loss is descended.
        clamp: the data range (lo, hi) the inputs live in, or None (no range). The inputs must lie in it.
        loss: a likelihood's name ("cross_entropy", "mse", "bce": its per-sample negative log-likelihood)
            or a torch loss ``loss(outputs, targets)`` returning the batch's mean loss (multiplied by N).

    Returns:
        Tensor like x (detached): the adversarial inputs.

    Raises:
        ValueError: ``eps`` negative or not finite, an unknown ``norm`` or ``loss`` name, a ``clamp`` with
            lo ≥ hi or that excludes some input, ``y`` of the wrong length, an empty or non-finite ``x``,
            BatchNorm on batch statistics.
        TypeError: ``x`` not a floating-point tensor, ``y`` not a tensor, ``loss`` not a name or callable.
    """
    eps, clamp, loss = _checked(model, x, y, eps, norm, targeted, clamp, None, loss)
    if eps == 0:
        return x.detach().clone()
    return _attack(model, x, y, eps=eps, norm=norm, steps=1, step_size=eps, random_start=False, clamp=clamp,
                   targeted=targeted, generator=None, loss=loss, progress=False, desc="attacks.fgsm")


@entry_point(name="attacks.pgd")
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "l2", steps: int = 10,
        step_size: float | None = None, random_start: bool = False, clamp: tuple[float, float] | None = None,
        targeted: bool = False, early_stop: bool = False, generator: torch.Generator | None = None,
        loss: Loss = "cross_entropy", progress: bool = False) -> torch.Tensor:
    r"""Projected gradient descent on the inputs (Madry et al.): ``steps`` projected steps in the ball.

    .. math:: x^{(t+1)} = \Pi_{\mathcal B_n \cap [lo, hi]}\big(x^{(t)} \pm \alpha\, s(\nabla_x \ell_n(x^{(t)}))\big),
              \qquad \mathcal B_n = \{x : \|x - x_n\|_p \le \epsilon\},

    :math:`s` the sign (:math:`L_\infty`) or the per-sample normalized gradient (:math:`L_2`), + for an
    untargeted attack, − for a targeted one; every sample of the batch is attacked at once, each
    projected onto its own ball (the math, the normalization and what stays untouched:
    :mod:`fisherext.attacks`).

    Args:
        model: maps inputs x [N, ...] to outputs (logits [N, C] for cross-entropy). Attacked in the mode
            it is in; BatchNorm on batch statistics is refused.
        x: the inputs [N, ...], floating point.
        y: the labels [N] (for ``targeted=True``: the target labels).
        eps: the radius :math:`\epsilon \ge 0` of the ball (0 returns x).
        norm: "l2" or "linf"; L2 norms are per sample over all non-batch axes.
        steps: the number of projected gradient steps, a positive int.
        step_size: the step :math:`\alpha > 0`; None: :math:`2.5\,\epsilon/\text{steps}` (Madry et al.'s
            choice, so that the iterates can cross the ball and back).
        random_start: start from a point drawn uniformly from each ball (:math:`L_\infty`: uniform
            entries in :math:`[-\epsilon, \epsilon]`; :math:`L_2`: an isotropic direction times the radius
            :math:`\epsilon U^{1/d}`, U uniform on [0, 1] and d the entries per sample, which is the
            uniform law on the d-ball), clamped to the data range; else from x itself.
        clamp: the data range (lo, hi) the inputs live in, or None (no range). The inputs must lie in it;
            every iterate is clamped to it.
        targeted: whether y are target labels, whose loss is descended.
        early_stop: stop moving each sample at the first iterate where the attack succeeds (the predicted
            class differs from y; for ``targeted=True``, equals it), so that it stays just past the
            decision boundary; the iteration ends when all have succeeded. Needs logits [N, C].
        generator: the ``torch.Generator`` of the random start, on the inputs' device (None: torch's
            global one).
        loss: a likelihood's name ("cross_entropy", "mse", "bce": its per-sample negative log-likelihood)
            or a torch loss ``loss(outputs, targets)`` returning the batch's mean loss (multiplied by N;
            the steps use only the direction of each sample's gradient).
        progress: a progress bar over the steps.

    Returns:
        Tensor like x (detached): the adversarial inputs, within the ball (up to rounding) and the range.
        Which attacks succeeded is ``model(x_adv).argmax(1) != y`` (``== y`` for a targeted attack).

    Raises:
        ValueError: ``eps`` negative or not finite, an unknown ``norm`` or ``loss`` name, ``steps`` < 1,
            ``step_size`` ≤ 0, a ``clamp`` with lo ≥ hi or that excludes some input, ``y`` of the wrong
            length, an empty or non-finite ``x``, a generator on another device, BatchNorm on batch
            statistics.
        TypeError: ``x`` not a floating-point tensor, ``y`` not a tensor, ``generator`` not a
            torch.Generator, ``loss`` not a name or callable.
    """
    check_positive_int("steps", steps)
    if step_size is not None:
        step_size = check_eps(step_size, name="step_size")
    for name, flag in (("random_start", random_start), ("early_stop", early_stop)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    eps, clamp, loss = _checked(model, x, y, eps, norm, targeted, clamp, generator, loss)
    if step_size is None:
        step_size = 2.5 * eps / steps
    if eps == 0:
        return x.detach().clone()
    return _attack(model, x, y, eps=eps, norm=norm, steps=steps, step_size=float(step_size),
                   random_start=random_start, clamp=clamp, targeted=targeted, generator=generator, loss=loss,
                   progress=progress, desc="attacks.pgd", early_stop=early_stop)


__all__ = ["fgsm", "pgd"]
