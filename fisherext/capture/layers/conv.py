"""Convolutions and transposed convolutions (1-d, 2-d, 3-d): linear maps over unfolded windows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..layout import to_samples
from ..terms import BiasTerm, LinearTerm
from .base import Rule


def _tuple(value, nd):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * nd


def _same_padding(kernel, dilation):
    """PyTorch's padding="same": total d(k − 1) per axis, the odd one on the right."""
    return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]


def unfold(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """Patches of a convolution input x [B, C, *spatial] (N-d): [B, L, C·Πk], each patch channel-major
    like ``weight.flatten(1)``; ``padding`` is one (left, right) pair per spatial axis (zeros)."""
    nd = x.dim() - 2
    if any(p for pair in padding for p in pair):
        x = F.pad(x, [p for pair in reversed(padding) for p in pair])
    if nd <= 2:  # im2col
        lift = (lambda t: (1, *t)) if nd == 1 else (lambda t: tuple(t))
        x4 = x.unsqueeze(2) if nd == 1 else x
        return F.unfold(x4, lift(kernel), dilation=lift(dilation), stride=lift(stride)).transpose(1, 2)
    for i in range(nd):  # sliding windows along each spatial axis, then the dilated taps of each window
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    B, C = x.shape[:2]
    return x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)).reshape(B, -1, C * math.prod(kernel))


class ConvRule(Rule):
    arguments = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

    kronecker = True

    def __init__(self, nd):
        self.nd, self.name = nd, f"conv{nd}d"

    def scratch(self, use):
        return use.probe.numel() * math.prod(use.saved["kernel"])  # unfolded patches

    def record(self, named, out):
        w = named["weight"]
        nd = self.nd
        kernel, stride, dilation = w.shape[2:], _tuple(named["stride"], nd), _tuple(named["dilation"], nd)
        padding = named["padding"]
        if padding == "same":
            padding = _same_padding(kernel, dilation)
        elif padding == "valid":
            padding = [(0, 0)] * nd
        else:
            padding = [(p, p) for p in _tuple(padding, nd)]
        saved = {"input": named["input"], "kernel": tuple(kernel), "stride": stride, "padding": padding,
                 "dilation": dilation, "groups": named["groups"]}
        return saved, named["input"]

    def valid(self, layout, use):
        return use.probe.dim() == self.nd + 2 and layout.axis in (0, None)

    def terms(self, use, dz, layout, n):
        s = use.saved
        patches = unfold(s["input"], s["kernel"], s["stride"], s["padding"], s["dilation"])  # [B, L, C·Πk]
        a = to_samples(patches, layout, n)
        d = to_samples(dz.flatten(3).transpose(2, 3), layout, n, lead=1)   # [K, B, O, L] -> [K, N, T, O]
        G = s["groups"]
        pairs = list(zip(d.chunk(G, -1), (p[None] for p in a.chunk(G, -1))))
        weight = LinearTerm(pairs)
        return {"weight": weight, "bias": BiasTerm(d, weight if G == 1 else None)}


class ConvTransposeRule(ConvRule):
    """A transposed convolution is the adjoint of a convolution in its input: its weight gradient is the
    convolution weight gradient with the roles swapped, ∂W = Σ_t a_t unfold(δ)_tᵀ, the output gradient
    unfolded with the same stride, padding and dilation."""

    arguments = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
    defaults = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}

    kronecker = False

    def __init__(self, nd):
        self.nd, self.name = nd, f"conv_transpose{nd}d"

    def scratch(self, use):  # the unfolded output gradient, per cotangent: counted with the gradients
        return use.probe.numel()

    def terms(self, use, dz, layout, n):
        s = use.saved
        x = s["input"]
        K, B = dz.shape[:2]
        patches = unfold(dz.flatten(0, 1), s["kernel"], s["stride"], s["padding"], s["dilation"])
        if patches.shape[1] != math.prod(x.shape[2:]):
            raise AssertionError("transposed convolution: unfolded output gradient does not match the input")
        R = to_samples(patches.view(K, B, *patches.shape[1:]), layout, n, lead=1)  # [K, N, T, C_out/g·Πk·g]
        L = to_samples(x.flatten(2).transpose(1, 2), layout, n)                       # [N, T, C_in]
        d = to_samples(dz.flatten(3).transpose(2, 3), layout, n, lead=1)
        G = s["groups"]
        pairs = list(zip((p[None] for p in L.chunk(G, -1)), R.chunk(G, -1)))
        return {"weight": LinearTerm(pairs), "bias": BiasTerm(d)}
