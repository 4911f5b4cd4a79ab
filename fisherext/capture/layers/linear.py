"""``F.linear``: the per-sample gradient of a linear map over positions."""
from __future__ import annotations

from ..layout import to_samples
from ..terms import BiasTerm, LinearTerm
from .base import Rule


class LinearRule(Rule):
    name = "linear"
    arguments = ("input", "weight", "bias")
    defaults = {"bias": None}
    kronecker = True

    def valid(self, layout, use):
        return layout.axis is None or layout.axis < use.probe.dim() - 1

    def terms(self, use, dz, layout, n):
        a = to_samples(use.saved["input"], layout, n)
        d = to_samples(dz, layout, n, lead=1)
        weight = LinearTerm([(d, a[None])])
        return {"weight": weight, "bias": BiasTerm(d, weight)}
