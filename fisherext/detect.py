r"""Adversarial detection by per-input Fisher information (Martin & Elster), with confidence baselines.

For a classifier with softmax outputs :math:`p(c|x;\theta)`, the true Fisher of one input is

.. math:: F(x) = \sum_c p(c|x)\, \nabla_\theta \log p(c|x)\, \nabla_\theta \log p(c|x)^\top

(input n's own Fisher :math:`F_n`, not divided by N; ``fisherext.fisher`` is their mean). Each score is one
number per input, oriented so that **higher means more suspicious**:

- ``"trace"``: :math:`\mathrm{tr} F(x) = \sum_c p_c \|\nabla_\theta \log p_c\|^2`
  (``fisherext.per_sample_fisher(..., quantity="trace")``);
- ``"quad"``: :math:`v^\top F(x)\, v` along the normalized gradient of the predicted class's
  log-probability, :math:`v = \nabla_\theta \log p(\hat y|x) / \|\nabla_\theta \log p(\hat y|x)\|`,
  :math:`\hat y = \arg\max_c p(c|x)`, one direction per input
  (``fisherext.perturb.predicted_class_directions``), exactly over all parameters jointly
  (``per_sample_fisher(..., quantity="quad", v="predicted")``: the per-sample Gram of the class gradients
  and the direction, at the cost of the trace);
- ``"quad_fd_block"``: the same quadratic form as seed 001 computes it, by central differences moving one
  parameter tensor at a time, :math:`\sum_t v_t^\top F_{tt}(x)\, v_t` (the diagonal blocks only;
  ``fd_quadratic(..., block=True)``, step ``eps``), kept for comparison with ``"quad"``;
- ``"sensitivity"``: :math:`\sum_i |\mathrm{FIS}_i(x)|`, the total magnitude of the Fisher information
  sensitivity map along the same v (``fisherext.input_sensitivity``; the map itself is what that
  function returns);
- ``"msp"``: :math:`1 - \max_c p(c|x)`, one minus the maximum softmax probability (a confident
  prediction scores low);
- ``"entropy"``: :math:`-\sum_c p_c \log p_c`, the predictive entropy.

The Fisher scores are used as they are (Martin & Elster report larger Fisher information on adversarial
inputs); an AUROC below 0.5 says that, for that attack, the reverse holds. Detection is measured by
:func:`auroc`, the Mann-Whitney probability that an attacked input outscores a clean one (ties count
half), and :func:`tpr_at_fpr`, the fraction of attacked inputs flagged by the threshold that flags at
most a fraction ``fpr`` of the clean inputs. :func:`detection_report` computes all of it.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ._core.checks import check_choice, check_eps, check_float_batch, check_positive_int
from ._core.conventions import check_deterministic, checked_output
from ._core.data import progress_bar
from ._core.entry import entry_point
from ._core.params import resolve_params
from ._core.types import Params
from .capture import per_sample_fisher
from .perturb import fd_quadratic, input_sensitivity, predicted_class_directions

#: The score names of :func:`scores`, in their order (module docstring: what each one is).
SCORES = ("trace", "quad", "quad_fd_block", "sensitivity", "msp", "entropy")
# The per-input directions [B, P] (and fd_quadratic's per-input parameter copies) are held for at most this
# many entries at once (16 MiB in float32), whatever the batch size.
_DIRECTION_ELEMENTS = 1 << 22


def _check_which(which) -> tuple[str, ...]:
    if which is None:
        return SCORES
    if isinstance(which, str):
        which = (which,)
    if not isinstance(which, (tuple, list)) or not which:
        raise ValueError(f"which: expected score names from {', '.join(map(repr, SCORES))}, got {which!r}")
    for name in which:
        check_choice("which", name, SCORES)
    return tuple(dict.fromkeys(which))


def _direction_scores(model, x, which, eps, params) -> dict[str, torch.Tensor]:
    """The finite-difference and sensitivity scores along the predicted-class directions of the inputs x
    (one chunk of them)."""
    V = predicted_class_directions(model, x, params=params)
    out = {}
    if "quad_fd_block" in which:
        out["quad_fd_block"] = fd_quadratic(model, x, V, eps=eps, block=True, per_input=True, params=params)
    if "sensitivity" in which:
        out["sensitivity"] = input_sensitivity(model, x, V, per_input=True, params=params).flatten(1).abs().sum(1)
    return out


def _chunk_scores(model, x, which, eps, params, rows) -> dict[str, torch.Tensor]:
    """The scores of one chunk of inputs; the direction scores ``rows`` inputs at a time."""
    out = {}
    if "trace" in which:
        out["trace"] = per_sample_fisher(model, x, quantity="trace", params=params)
    if "quad" in which:  # each input along its own direction, from the per-sample Gram: no [B, P] directions
        out["quad"] = per_sample_fisher(model, x, quantity="quad", v="predicted", params=params)
    if {"quad_fd_block", "sensitivity"} & set(which):
        parts = [_direction_scores(model, x[s:s + rows], which, eps, params) for s in range(0, x.shape[0], rows)]
        out.update({name: torch.cat([part[name] for part in parts]) for name in parts[0]})
    if {"msp", "entropy"} & set(which):
        with torch.no_grad():
            logits = checked_output(model(x))
        if logits.dim() != 2:
            raise ValueError(f"model: the confidence scores need logits [N, C], got outputs {tuple(logits.shape)}")
        log_p = torch.log_softmax(logits, dim=1)
        if "msp" in which:
            out["msp"] = 1 - log_p.max(dim=1).values.exp()
        if "entropy" in which:
            out["entropy"] = -(log_p.exp() * log_p).sum(1)
    return {name: out[name].detach() for name in which}


@entry_point(name="detect.scores")
def scores(model: nn.Module, x: torch.Tensor, *, which=None, eps: float = 1e-3, params: Params = None,
           batch_size: int | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    r"""Per-input detection scores, each oriented so that higher means more suspicious.

    The scores (the math: :mod:`fisherext.detect`): ``"trace"`` :math:`\mathrm{tr} F(x)`, ``"quad"``
    :math:`v^\top F(x) v` exactly and ``"quad_fd_block"`` by seed 001's per-tensor central differences,
    v the normalized gradient of the predicted class's log-probability; ``"sensitivity"``
    :math:`\sum_i |\mathrm{FIS}_i|`; ``"msp"`` :math:`1 - \max_c p_c`; ``"entropy"``
    :math:`-\sum_c p_c \log p_c`. F is the true Fisher of each input alone.

    Args:
        model: a classifier returning logits [N, C], deterministic per sample (eval mode: dropout in
            train mode and BatchNorm on batch statistics are refused).
        x: the inputs [N, ...], floating point.
        which: the score names to compute, a name or a sequence of them (None: all of ``SCORES``).
        eps: the finite-difference step :math:`\varepsilon > 0` of ``"quad_fd_block"`` (seed 001's 1e-3).
        params: the parameters the Fisher is taken over (default: all that require grad), as names,
            modules or tensors.
        batch_size: inputs per chunk (None: all at once), a positive int. Whatever it is, the scores
            along explicit per-input directions ("quad_fd_block", "sensitivity") hold those directions
            [B, P] for B·P ≤ 2²² entries at a time (never the N × P matrix of all of them).
        progress: a progress bar over the chunks.

    Returns:
        dict {name: Tensor [N]} in the order of ``which``.

    Raises:
        ValueError: an unknown score name, a bad ``eps`` or ``batch_size``, an empty batch, a model that is
            not deterministic per sample or does not return finite logits [N, C].
        TypeError: ``x`` not a floating-point tensor.
    """
    which = _check_which(which)
    check_positive_int("batch_size", batch_size, optional=True)
    eps = check_eps(eps)
    check_float_batch("x", x)
    check_deterministic(model)
    P = sum(p.numel() for _, p in resolve_params(model, params))
    rows = max(1, _DIRECTION_ELEMENTS // P)
    step = batch_size or x.shape[0]
    chunks = [_chunk_scores(model, x[s:s + step], which, eps, params, rows)
              for s in progress_bar(range(0, x.shape[0], step), progress, "detect.scores")]
    return {name: torch.cat([c[name] for c in chunks]) for name in which}


def _check_scores(name, s) -> torch.Tensor:
    """Scores as a 1-D float64 tensor (exact for float32 and float16 inputs), non-empty, without NaN."""
    if not isinstance(s, torch.Tensor):
        try:
            s = torch.as_tensor(s)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name}: expected a 1-D tensor of scores, got {type(s).__name__}") from None
    if s.dim() != 1 or s.numel() == 0 or s.is_complex() or s.dtype == torch.bool:
        raise ValueError(f"{name}: expected a non-empty 1-D tensor of real scores, got {s.dtype} {tuple(s.shape)}")
    s = s.detach().to(torch.float64)
    if torch.isnan(s).any():
        raise ValueError(f"{name}: has NaN entries")
    return s


@entry_point(name="detect.auroc")
def auroc(scores_clean, scores_attacked) -> torch.Tensor:
    r"""The area under the ROC curve of telling attacked inputs from clean ones by a score (higher = attacked).

    .. math:: \mathrm{AUROC} = \frac{1}{n m} \sum_{i=1}^{n} \sum_{j=1}^{m}
              \Big(\mathbb 1[a_j > c_i] + \tfrac12\, \mathbb 1[a_j = c_i]\Big),

    the Mann-Whitney statistic U/(nm) over the n clean scores :math:`c_i` and the m attacked scores
    :math:`a_j`: the probability that a random attacked input outscores a random clean one, ties counted
    half. Exact: the pair counts come from binary searches in the sorted clean scores, summed in
    integers, in O((n + m) log n).

    Args:
        scores_clean: the scores of the clean inputs, a 1-D tensor (or sequence) without NaN; ±inf allowed.
        scores_attacked: the scores of the attacked inputs, likewise (the two need not have the same length).

    Returns:
        0-d float64 tensor in [0, 1] (0.5: no better than chance; below 0.5: the reversed score detects).

    Raises:
        ValueError: a score tensor that is not 1-D, is empty or holds NaN.
        TypeError: scores that are not a tensor or a sequence of numbers.
    """
    c = _check_scores("scores_clean", scores_clean)
    a = _check_scores("scores_attacked", scores_attacked).to(c.device)
    c = c.sort().values
    below = torch.searchsorted(c, a, right=False)        # clean scores < a_j
    below_or_tied = torch.searchsorted(c, a, right=True)  # clean scores ≤ a_j
    twice_u = (below + below_or_tied).sum()               # 2U, an integer
    return twice_u.to(torch.float64) / (2.0 * c.numel() * a.numel())


def _flagged_threshold(c_sorted: torch.Tensor, fpr: float) -> torch.Tensor:
    """The threshold τ with 'score > τ' flagging at most floor(fpr·n) of the n clean scores: the
    (n − k)-th smallest clean score, k = floor(fpr·n) (−inf when k = n)."""
    n = c_sorted.numel()
    k = min(n, math.floor(fpr * n + 1e-9))  # the tolerance keeps e.g. 0.29 · 100 from flooring to 28
    if k == n:
        return c_sorted.new_tensor(-math.inf)
    return c_sorted[n - k - 1]


@entry_point(name="detect.tpr_at_fpr")
def tpr_at_fpr(scores_clean, scores_attacked, fpr: float = 0.05) -> torch.Tensor:
    r"""The fraction of attacked inputs detected at a false-positive rate of at most ``fpr`` on the clean ones.

    An input is flagged when its score exceeds a threshold :math:`\tau` chosen on the clean scores alone:
    with the n clean scores sorted, :math:`c_{(1)} \le \dots \le c_{(n)}`, and
    :math:`k = \lfloor \mathrm{fpr} \cdot n \rfloor`, :math:`\tau = c_{(n-k)}` (:math:`-\infty` for k = n),
    so at most k clean inputs score above it (fewer when scores tie at :math:`\tau`). The result is
    :math:`\frac1m \#\{j : a_j > \tau\}`.

    Args:
        scores_clean: the scores of the clean inputs, a 1-D tensor (or sequence) without NaN.
        scores_attacked: the scores of the attacked inputs, likewise.
        fpr: the largest false-positive rate allowed, in [0, 1] (default 0.05).

    Returns:
        0-d float64 tensor in [0, 1].

    Raises:
        ValueError: ``fpr`` outside [0, 1], a score tensor that is not 1-D, is empty or holds NaN.
        TypeError: scores that are not a tensor or a sequence of numbers.
    """
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 <= fpr <= 1:
        raise ValueError(f"fpr: must be a number in [0, 1], got {fpr!r}")
    c = _check_scores("scores_clean", scores_clean)
    a = _check_scores("scores_attacked", scores_attacked).to(c.device)
    tau = _flagged_threshold(c.sort().values, float(fpr))
    return (a > tau).to(torch.float64).mean()


@dataclasses.dataclass
class DetectionReport:
    """What :func:`detection_report` returns.

    Attributes:
        clean: {score name: Tensor [N]}, the scores of the clean inputs.
        attacked: {score name: Tensor [M]}, the scores of the attacked inputs.
        table: {score name: {"auroc": float, "tpr_at_fpr": float}}.
        fpr: the false-positive rate of the "tpr_at_fpr" column.
        accuracy_clean, accuracy_attacked: the model's accuracy on the clean and attacked inputs (when
            labels were given, else None).
    """

    clean: dict[str, torch.Tensor]
    attacked: dict[str, torch.Tensor]
    table: dict[str, dict[str, float]]
    fpr: float
    accuracy_clean: float | None = None
    accuracy_attacked: float | None = None

    def __str__(self) -> str:
        tpr = f"TPR@{100 * self.fpr:g}%FPR"
        lines = [f"| score | AUROC | {tpr} |", "|---|---:|---:|"]
        lines += [f"| {name} | {row['auroc']:.3f} | {row['tpr_at_fpr']:.3f} |" for name, row in self.table.items()]
        if self.accuracy_clean is not None:
            lines.append(f"\naccuracy: clean {self.accuracy_clean:.3f}, attacked {self.accuracy_attacked:.3f}")
        return "\n".join(lines)


def _accuracy(model, x, y, batch_size) -> float:
    step = batch_size or x.shape[0]
    with torch.no_grad():
        hits = sum(int((model(x[s:s + step]).argmax(1) == y[s:s + step]).sum()) for s in range(0, x.shape[0], step))
    return hits / x.shape[0]


@entry_point(name="detect.detection_report")
def detection_report(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, *, y: torch.Tensor | None = None,
                     which=None, fpr: float = 0.05, eps: float = 1e-3, params: Params = None,
                     batch_size: int | None = None, progress: bool = False) -> DetectionReport:
    r"""All detection scores of clean and attacked inputs, with the AUROC and TPR at ``fpr`` of each.

    The scores are those of :func:`scores` (higher = more suspicious), the measures :func:`auroc` and
    :func:`tpr_at_fpr` with the clean inputs as negatives and the attacked ones as positives.

    Args:
        model: a classifier returning logits [N, C], deterministic per sample (eval mode).
        x: the clean inputs [N, ...].
        x_adv: the attacked inputs [M, ...] (e.g. ``fisherext.attacks.pgd(model, x, y, ...)``; to measure
            successful attacks only, pass those rows).
        y: the labels of x (and of x_adv, row for row) for the accuracies, or None.
        which: the score names (None: all of ``fisherext.detect.SCORES``).
        fpr: the false-positive rate of the TPR column, in [0, 1].
        eps: the finite-difference step of "quad_fd_block".
        params: the parameters the Fisher is taken over (default: all that require grad).
        batch_size: inputs per chunk (None: all at once), a positive int.
        progress: progress bars over the chunks.

    Returns:
        :class:`DetectionReport` (``str(report)`` is a markdown table).

    Raises:
        ValueError: as :func:`scores` and :func:`tpr_at_fpr`; ``y`` not one label per row of x and x_adv.
        TypeError: ``x`` or ``x_adv`` not a floating-point tensor, ``y`` not a tensor.
    """
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 <= fpr <= 1:
        raise ValueError(f"fpr: must be a number in [0, 1], got {fpr!r}")
    check_float_batch("x", x)
    check_float_batch("x_adv", x_adv)
    if x_adv.shape[1:] != x.shape[1:]:
        raise ValueError(f"x_adv: inputs of shape {tuple(x_adv.shape[1:])}, the clean ones {tuple(x.shape[1:])}")
    if y is not None:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y: expected a tensor of labels or None, got {type(y).__name__}")
        if y.dim() != 1 or y.shape[0] != x.shape[0] or x_adv.shape[0] != x.shape[0]:
            raise ValueError(f"y: expected one label per row of x and x_adv ({x.shape[0]} and {x_adv.shape[0]} rows), "
                             f"got shape {tuple(y.shape)}")
    options = dict(which=which, eps=eps, params=params, batch_size=batch_size, progress=progress)
    clean = scores(model, x, **options)
    attacked = scores(model, x_adv, **options)
    table = {name: {"auroc": auroc(clean[name], attacked[name]).item(),
                    "tpr_at_fpr": tpr_at_fpr(clean[name], attacked[name], fpr).item()} for name in clean}
    report = DetectionReport(clean, attacked, table, float(fpr))
    if y is not None:
        report.accuracy_clean = _accuracy(model, x, y, batch_size)
        report.accuracy_attacked = _accuracy(model, x_adv, y, batch_size)
    return report


__all__ = ["DetectionReport", "SCORES", "auroc", "detection_report", "scores", "tpr_at_fpr"]
