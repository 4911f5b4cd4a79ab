r"""Diagonal empirical Fisher of an MLP on scikit-learn's digits, two ways: ``python -m fisherext.demo``.

The model is an MLP 64-256-256-10 (ReLU, seeded, eval mode) on all N = 1797 digits (pixels / 16).
With the per-sample loss :math:`\ell_n = -\log p(y_n \mid x_n, \theta)` (cross entropy with the data
label) and :math:`g_n = \nabla_\theta \ell_n`, the diagonal empirical Fisher is

.. math:: \operatorname{diag} F = \frac{1}{N} \sum_n g_n \odot g_n

-- the mean of squared per-sample gradients, not the square of the batch-mean gradient.

(a) Hooks. One forward and one backward pass of the summed loss :math:`\sum_n \ell_n`: summing (not
averaging) keeps the output gradient :math:`\delta_n = \partial \ell_n / \partial z_n` of each
nn.Linear (:math:`z_n = W a_n + b`) exactly sample n's own. Sample n's weight gradient is
:math:`\delta_n a_n^\top` and its bias gradient :math:`\delta_n`, so the weight diagonal is
``fisherext.ops.linear_sq_grad(a, delta, weight=1/N)`` and the bias diagonal ``(delta**2).mean(0)``.

(b) Loop. One autograd pass per sample (batch size 1), squaring and averaging its gradient.

Exits non-zero when (a) and (b) differ by more than float32 tolerance.
"""
from __future__ import annotations

import sys
import time

import torch
from torch import nn

import fisherext

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


def fisher_diag_by_hooks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """diag F per parameter name, from each nn.Linear's captured input ``a`` and output gradient ``delta``."""
    captured = {}  # nn.Linear -> {"a": input, "delta": output gradient}

    def capture(layer, inputs, output):
        captured[layer] = {"a": inputs[0].detach()}
        # A tensor hook on the output, not a module backward hook: the first layer's input needs no
        # gradient, and module backward hooks then fire with a warning instead of plainly.
        output.register_hook(lambda grad: captured[layer].__setitem__("delta", grad.detach()))

    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    handles = [layer.register_forward_hook(capture) for layer in layers.values()]
    try:
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    finally:
        for handle in handles:
            handle.remove()

    per_sample_mean = torch.full((x.shape[0],), 1.0 / x.shape[0])
    fisher = {}
    for name, layer in layers.items():
        a, delta = captured[layer]["a"], captured[layer]["delta"]
        fisher[f"{name}.weight"] = fisherext.ops.linear_sq_grad(a, delta, weight=per_sample_mean)
        if layer.bias is not None:
            fisher[f"{name}.bias"] = (delta * delta).mean(0)
    return fisher


def fisher_diag_by_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """diag F per parameter name, one autograd pass per sample."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for n in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1])
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            fisher[name] += g * g
    return {name: f / x.shape[0] for name, f in fisher.items()}


def max_relative_difference(result: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """Largest over parameters of max |result - expected| / max |expected| (each tensor on its own scale)."""
    if result.keys() != expected.keys():
        raise ValueError(f"parameters differ: {sorted(result)} vs {sorted(expected)}")
    return max(((result[k] - expected[k]).abs().max() / expected[k].abs().max()).item() for k in expected)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> int:
    x, y = load_digits_tensors()
    model = build_mlp()
    fisher_diag_by_hooks(model, x, y)  # warm-up: first-touch page faults and lazy init are not the method's
    by_hooks, hooks_s = timed(fisher_diag_by_hooks, model, x, y)
    by_loop, loop_s = timed(fisher_diag_by_loop, model, x, y)
    difference = max_relative_difference(by_hooks, by_loop)
    num_params = sum(f.numel() for f in by_loop.values())
    agree = difference <= REL_TOLERANCE

    print(f"diagonal empirical Fisher, MLP 64-256-256-10 on digits: P = {num_params}, N = {x.shape[0]}")
    print(f"  hooks + fisherext.ops.linear_sq_grad: {hooks_s * 1e3:8.1f} ms")
    print(f"  per-sample autograd loop:             {loop_s * 1e3:8.1f} ms")
    print(f"  speedup: {loop_s / hooks_s:.1f}x")
    print(f"  max relative difference: {difference:.2e} (tolerance {REL_TOLERANCE:.0e}): "
          + ("agree" if agree else "DISAGREE"))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
