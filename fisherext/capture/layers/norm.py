"""Normalization layers: layer, RMS, group and (eval-mode) batch norm, elementwise affine maps of x̂."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import to_samples
from ..._core.precision import accumulation_dtype
from ..terms import DenseTerm
from .base import Rule


class _NormRule(Rule):
    """z = γ ⊙ x̂ + β: per-sample γ gradient Σ δ ⊙ x̂ and β gradient Σ δ over the axes γ broadcasts along.
    Both are formed in the accumulation dtype (x̂ recomputed from the input converted to it), so the sums
    over positions do not round to a half-precision model's dtype."""

    def xhat(self, s, dtype) -> torch.Tensor:
        """x̂ of the saved call, computed in ``dtype``."""
        raise NotImplementedError

    def per_sample(self, t, layout, n, s) -> torch.Tensor:
        """[K, *x.shape] summed, per sample, over every axis the parameter broadcasts along: [K, N, numel]."""
        raise NotImplementedError

    def terms(self, use, dz, layout, n):
        s = use.saved
        acc = accumulation_dtype(dz.dtype, s["input"].dtype)
        dz = dz.to(acc)
        out = {}
        if "weight" in use.slots:
            out["weight"] = DenseTerm(self.per_sample(dz * self.xhat(s, acc), layout, n, s))
        if "bias" in use.slots:
            out["bias"] = DenseTerm(self.per_sample(dz, layout, n, s))
        return out


class LayerNormRule(_NormRule):
    name = "layer_norm"
    arguments = ("input", "normalized_shape", "weight", "bias", "eps")
    defaults = {"weight": None, "bias": None, "eps": 1e-5}

    def record(self, named, out):
        shape = tuple(named["normalized_shape"]) if isinstance(named["normalized_shape"], (tuple, list, torch.Size)) \
            else (named["normalized_shape"],)
        return {"input": named["input"], "shape": shape, "eps": named["eps"]}, named["input"]

    def valid(self, layout, use):
        return layout.axis is None or layout.axis < use.probe.dim() - len(use.saved["shape"])

    def xhat(self, s, dtype):
        return F.layer_norm(s["input"].to(dtype), s["shape"], None, None, s["eps"])

    def per_sample(self, t, layout, n, s):
        nd = len(s["shape"])
        return to_samples(t, layout, n, features=nd, lead=1).sum(2).flatten(2)


class RMSNormRule(LayerNormRule):
    name = "rms_norm"
    arguments = ("input", "normalized_shape", "weight", "eps")
    defaults = {"weight": None, "eps": None}
    slots = ("weight",)

    def xhat(self, s, dtype):
        return F.rms_norm(s["input"].to(dtype), s["shape"], None, s["eps"])


class _ChannelNormRule(_NormRule):
    """Normalizations with one parameter per channel (axis 1 of [B, C, *spatial])."""

    def valid(self, layout, use):
        return layout.axis in (0, None) and use.probe.dim() >= 2

    def per_sample(self, t, layout, n, s):
        per_row = t.flatten(3).sum(3) if t.dim() > 3 else t   # [K, B, C]
        return to_samples(per_row, layout, n, lead=1).sum(2)


class GroupNormRule(_ChannelNormRule):
    name = "group_norm"
    arguments = ("input", "num_groups", "weight", "bias", "eps")
    defaults = {"weight": None, "bias": None, "eps": 1e-5}

    def record(self, named, out):
        return {"input": named["input"], "groups": named["num_groups"], "eps": named["eps"]}, named["input"]

    def xhat(self, s, dtype):
        return F.group_norm(s["input"].to(dtype), s["groups"], None, None, s["eps"])


class BatchNormRule(_ChannelNormRule):
    name = "batch_norm"
    arguments = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}

    def check(self, named):
        if named["training"] or named["running_mean"] is None:
            raise ValueError("model: a batch norm normalizes with batch statistics (train mode or no running "
                             "statistics), which couples the samples of a batch; call model.eval()")

    def record(self, named, out):
        saved = {"input": named["input"], "mean": named["running_mean"].detach().clone(),
                 "var": named["running_var"].detach().clone(), "eps": named["eps"]}
        return saved, named["input"]

    def xhat(self, s, dtype):
        x = s["input"].to(dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - s["mean"].to(dtype).view(shape)) * torch.rsqrt(s["var"].to(dtype).view(shape) + s["eps"])
