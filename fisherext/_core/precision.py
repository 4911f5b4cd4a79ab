r"""Precision: the dtype sums are accumulated in, autocast switched off around the package's own
arithmetic, and the finite-difference step rules.

Sums of products (Fisher sums, Grams, per-batch products summed over the data) are formed and returned in
the accumulation dtype, at least float32 (:func:`accumulation_dtype`): a float16/bfloat16 model, or a
float32 one under ``torch.autocast``, gets float32 results, its half-precision factors converted before
they are squared or multiplied (a product of two half-precision numbers is exact in float32), so nothing
is rounded to half precision after the model's own computation.

Finite differences (:func:`check_step`, the rules in :mod:`fisherext.perturb.finite_differences`) warn
with a :class:`PrecisionWarning` when their step is below what the dtypes resolve.
"""
from __future__ import annotations

import functools
import warnings

import torch

def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype sums of products of tensors of ``dtypes`` are accumulated and returned in: their promoted
    dtype, at least float32 (float16 and bfloat16, alone or mixed with float32 under autocast, give float32;
    float64 stays float64)."""
    return functools.reduce(torch.promote_types, dtypes, torch.float32)


def autocast_off(method):
    """``method`` of an object with a ``device`` (a Term, a FisherMatrix), run with autocast off on that
    device type: its matrix products are the Fisher's own arithmetic in the accumulation dtype, which an
    autocast region around the caller would otherwise run in autocast's half dtype."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        kind = self.device.type
        if not torch.is_autocast_enabled(kind):
            return method(self, *args, **kwargs)
        with torch.autocast(kind, enabled=False):
            return method(self, *args, **kwargs)

    return wrapper


# The precision rules of check_step (module docstring): eps below u^(1/3) / _CANCELLATION_FACTOR, or a
# realized step off by more than _STEP_ERROR of the step, warn.
_CANCELLATION_FACTOR = 10.0
_STEP_ERROR = 0.1
# Directions whose realized step is checked, at most (spread over the rows of per-input directions): the
# rule needs the typical rounding of a step, not every row of an [N, P] matrix.
_CHECKED_DIRECTIONS = 32


class PrecisionWarning(UserWarning):
    """A finite-difference step below what the dtype of the parameters or of the forward resolves: the
    result is dominated by rounding (see :func:`check_step`)."""


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of a floating-point dtype, half its machine epsilon: 2^-8 bfloat16, 2^-11 float16, 2^-24 float32,
    2^-53 float64."""
    return torch.finfo(dtype).eps / 2


def forward_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The lowest precision a forward with parameters of ``dtype`` runs in: autocast's dtype when autocast
    is on for ``device_type`` and less precise than ``dtype``, else ``dtype``."""
    if torch.is_autocast_enabled(device_type):
        low = torch.get_autocast_dtype(device_type)
        if torch.finfo(low).eps > torch.finfo(dtype).eps:
            return low
    return dtype


def step_error(selected, V: torch.Tensor, eps: float) -> float:
    r"""The largest relative error of the realized step over the directions ``V`` ([P], or rows [K, P]),
    :math:`\|\mathrm{fl}(\theta + \varepsilon v) - \theta - \varepsilon v\| / \|\varepsilon v\|`, the
    rounding in each parameter's dtype as ``fisherext.ops.unflatten_axpy_`` does it (v rounded to the
    dtype, the sum rounded once), measured in float64 one direction and one parameter at a time; 0 for a
    zero direction. At most ``_CHECKED_DIRECTIONS`` rows, spread evenly, are measured."""
    rows = V.reshape(-1, V.shape[-1])
    if rows.shape[0] > _CHECKED_DIRECTIONS:
        rows = rows[torch.linspace(0, rows.shape[0] - 1, _CHECKED_DIRECTIONS, device=rows.device).long()]
    wide = torch.float64
    sums = torch.zeros(rows.shape[0], 2, dtype=wide, device=rows.device)   # per row: error², step²
    with torch.no_grad():
        for r, v in enumerate(rows):
            for t, (_, p) in zip(v.split([p.numel() for _, p in selected]), selected):
                theta = p.detach().reshape(-1).to(wide)
                intended = eps * t.to(wide)
                moved = (theta + eps * t.to(p.dtype).to(wide)).to(p.dtype).to(wide)
                sums[r, 0] += (moved - theta - intended).square().sum()
                sums[r, 1] += intended.square().sum()
    err, ref = sums.cpu().unbind(1)   # one host sync
    return float(torch.where(ref > 0, err / ref.clamp_min(torch.finfo(wide).tiny), 0.0).max().sqrt())


def check_step(where: str, selected, V: torch.Tensor, eps: float, *, order: int | None = 2,
               stacklevel: int = 3) -> None:
    r"""Warns (:class:`PrecisionWarning`) when the step ``eps`` along the directions ``V`` ([P] or rows
    [K, P]) is below what the dtypes resolve, by the two rules of :mod:`fisherext.perturb.finite_differences`:
    the cancellation rule :math:`\varepsilon < u^{1/(q+1)}/10` for the forward's dtype and a difference of
    order q (``order``: 2 central, 1 forward, whose best error :math:`\sqrt u` is reached at
    :math:`\varepsilon = \sqrt u`; None: the step is no difference, this rule is skipped), and the
    resolution rule, a realized step off by more than 10% (:func:`step_error`). ``where`` names the entry
    point in the message; ``stacklevel`` points the warning at its caller. Never raises."""
    if eps == 0:
        return
    step = abs(eps)
    params = [p for _, p in selected]
    low = max((p.dtype for p in params), key=lambda d: torch.finfo(d).eps)   # the least precise
    compute = forward_dtype(low, params[0].device.type)
    u = unit_roundoff(compute)
    problems = []
    if order is not None and step < (least := u ** (1 / (order + 1)) / _CANCELLATION_FACTOR):
        scheme = "central" if order == 2 else "forward"
        problems.append(f"the cancellation error u/eps = {u / step:.2g} of two {_name(compute)} values is over ten "
                        f"times the best a {scheme} difference reaches in {_name(compute)} (eps >= "
                        f"u^(1/{order + 1})/10 = {least:.2g})")
    rho = step_error(selected, V, eps)
    if rho > _STEP_ERROR:
        problems.append(f"the step moves the {_name(low)} parameters by fl(θ + eps·v) − θ, off from eps·v by "
                        f"{100 * min(rho, 9.99):.0f}% (eps·|v| is not large against the spacing of the values of θ)")
    if problems:
        warnings.warn(f"fisherext.{where}: eps={eps:g} is below what the dtype resolves: " + "; and ".join(problems)
                      + ". The result is dominated by rounding; use a larger eps (a central difference is most "
                      f"accurate near u^(1/3) = {u ** (1 / 3):.2g} in {_name(compute)}) or parameters in "
                      "float32/float64.", PrecisionWarning, stacklevel=stacklevel + 1)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")




__all__ = ["PrecisionWarning", "accumulation_dtype", "autocast_off", "check_step", "forward_dtype", "step_error",
           "unit_roundoff"]
