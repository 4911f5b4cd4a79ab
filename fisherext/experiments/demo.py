r"""Diagonal empirical Fisher of an MLP on scikit-learn's digits, two ways, then the true Fisher
(diag and K-FAC) and per-input traces: ``python -m fisherext.experiments.demo``.

The model is an MLP 64-256-256-10 (ReLU, seeded, eval mode) on all N = 1797 digits (pixels / 16).
With the per-sample loss :math:`\ell_n = -\log p(y_n \mid x_n, \theta)` (cross entropy with the data
label) and :math:`g_n = \nabla_\theta \ell_n`, the diagonal empirical Fisher is

.. math:: \operatorname{diag} F = \frac{1}{N} \sum_n g_n \odot g_n

-- the mean of squared per-sample gradients, not the square of the batch-mean gradient.

(a) ``fisherext.fisher(model, (x, y), kind="empirical", structure="diag")``: the capture engine records each
layer's input and output gradient, and the fused kernel ``fisherext.ops.linear_sq_grad`` sums the
squared per-sample gradients without forming them.

(b) Loop. One autograd pass per sample (batch size 1), squaring and averaging its gradient.

Exits non-zero when (a) and (b) differ by more than float32 tolerance.
"""
from __future__ import annotations

import sys
import time

import torch
from torch import nn

from .._core.params import flatten
from ..capture import fisher, per_sample_fisher

SEED = 0
REL_TOLERANCE = 1e-4  # float32 sums of 1797 positive terms, in two different orders


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.as_tensor(digits.target, dtype=torch.long)
    return x, y


def build_mlp(seed: int = SEED) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10),
    ).eval()


def fisher_diag_by_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """diag F as a flat vector, one autograd pass per sample (the per-sample loop users write by hand)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fisher = torch.zeros(sum(p.numel() for p in params))
    for n in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1])
        fisher += flatten(torch.autograd.grad(loss, params)) ** 2
    return fisher / x.shape[0]


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> int:
    x, y = load_digits_tensors()
    model = build_mlp()
    data = (x, y)
    fisher(model, data, kind="empirical")  # warm-up: first-touch page faults and lazy init
    fast, fast_s = timed(lambda: fisher(model, data, kind="empirical").diag())
    slow, loop_s = timed(fisher_diag_by_loop, model, x, y)
    difference = ((fast - slow).abs().max() / slow.abs().max()).item()
    agree = difference <= REL_TOLERANCE

    print(f"diagonal empirical Fisher, MLP 64-256-256-10 on digits: P = {slow.numel()}, N = {x.shape[0]}")
    print(f"  fisherext.fisher(kind='empirical'): {fast_s * 1e3:8.1f} ms")
    print(f"  per-sample autograd loop:           {loop_s * 1e3:8.1f} ms")
    print(f"  speedup: {loop_s / fast_s:.1f}x")
    print(f"  max relative difference: {difference:.2e} (tolerance {REL_TOLERANCE:.0e}): "
          + ("agree" if agree else "DISAGREE"))
    for kind, structure in (("true", "diag"), ("true", "kfac")):
        F, seconds = timed(lambda: fisher(model, data, kind=kind, structure=structure))
        print(f"  fisherext.fisher(kind={kind!r}, structure={structure!r}): {seconds * 1e3:8.1f} ms, "
              f"trace {F.trace():.4g}")
    traces, seconds = timed(lambda: per_sample_fisher(model, x, kind="true", quantity="trace"))
    print(f"  per-input tr(F_n) for all {x.shape[0]} inputs: {seconds * 1e3:8.1f} ms "
          f"(mean {traces.mean():.4g}, max {traces.max():.4g})")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
