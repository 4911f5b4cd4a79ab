r"""The layer registry: per torch function that a layer calls, how its per-sample gradients are formed.

The registry is keyed by the torch *function* a layer calls (``F.linear``, ``torch.conv2d``,
``F.embedding``, ...), not by module type: every module, built-in or the user's own, that calls one of
these functions with a selected parameter gets the native rule, and so do functional calls outside any
owning module (``F.linear(h, self.emb.weight)`` in a tied language model) and calls on slices of a
parameter (the packed in-projection of attention). Adding a layer is one :class:`Rule` and one test.

A rule records, while the forward runs, what the backward needs (the input, hyper-parameters, the
tensor that fixes the batch layout); after the backward it turns the output gradient
:math:`dz` [K, \*z.shape] into :mod:`fisherext.terms` forms per parameter slot:

======================  ==================================================  =========================
function                per-sample weight gradient                          layout requirement
======================  ==================================================  =========================
``F.linear``            :math:`\sum_t \delta_t a_t^\top`                    batch axis not the last
``torch.conv{1,2,3}d``  :math:`\sum_t \delta_t \mathrm{unfold}(a)_t^\top`   batch axis 0
``conv_transpose{1,2}`` :math:`\sum_t a_t\, \mathrm{unfold}(\delta)_t^\top`  batch axis 0
``F.embedding``         row v: :math:`\sum_{t: i_t = v} \delta_t`            any (padding rows: none)
``F.layer_norm``,       :math:`\sum_t \delta_t \odot \hat x_t`               batch axis outside the
``F.rms_norm``                                                               normalized axes
``F.group_norm``,       per channel :math:`\sum_t \delta_t \hat x_t`         batch axis 0
``F.batch_norm`` (eval)
======================  ==================================================  =========================

(biases: :math:`\sum_t \delta_t`.) ``F.multi_head_attention_forward`` is not a rule: the engine runs its
body with the registry active, so its in-projections (slices of ``in_proj_weight``) and output
projection are captured as the linear maps they are.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import Layout, to_samples
from .recurrent import STEPWISE
from .terms import BiasTerm, DenseTerm, EmbeddingTerm, LinearTerm, Term


@dataclass
class Use:
    """One call of a registered function with at least one selected parameter (or a view of one)."""

    rule: Rule
    slots: dict            # role -> Slot
    saved: dict            # what the rule needs after the backward (detached, cloned when needed)
    probe: torch.Tensor    # the tensor whose batch layout is the use's
    out_shape: torch.Size
    edge: object = None    # gradient edge of the output, taken before any later in-place op on it

    @property
    def signature(self):
        return (self.rule.name, tuple((r, s.param, s.key) for r, s in sorted(self.slots.items())), self.probe.dim())


@dataclass(frozen=True)
class Slot:
    """A selected parameter in a call: its index among the selected parameters and, when the call saw a
    view of it, the view's flat positions in the parameter (``index``, shaped like the view) and a
    hashable name of the view (``key``); both None for the parameter itself."""

    param: int
    index: torch.Tensor | None = None
    key: tuple | None = None


class Rule:
    """How one registered function forms per-sample gradients. ``arguments`` names its positional
    parameters in order, with defaults; ``slots`` the ones that can be parameters."""

    name: str
    arguments: tuple
    defaults: dict = {}
    slots: tuple = ("weight", "bias")
    kronecker = False  # K-FAC factors its weight with its bias (a linear map of the whole weight)

    def bind(self, args, kwargs) -> dict:
        named = dict(self.defaults)
        named.update(zip(self.arguments, args))
        named.update(kwargs)
        return named

    def check(self, named) -> None:
        """Refuses, before the call runs, a configuration whose per-sample gradients are undefined."""

    def record(self, named, out) -> tuple[dict, torch.Tensor]:
        """(saved tensors and values, probe tensor) of a call."""
        return {"input": named["input"]}, named["input"]

    def valid(self, layout: Layout, use: Use) -> bool:
        return True

    def scratch(self, use: Use) -> int:
        """Entries the rule's forms hold for the saved tensors of a call (the probe, by default)."""
        return use.probe.numel()

    def terms(self, use: Use, dz: torch.Tensor, layout: Layout, n: int) -> dict[str, Term]:
        raise NotImplementedError




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


class EmbeddingRule(Rule):
    name = "embedding"
    arguments = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    defaults = {"padding_idx": None, "max_norm": None, "scale_grad_by_freq": False}
    slots = ("weight",)

    def check(self, named):
        if named["max_norm"] is not None:
            raise ValueError("model: an embedding with max_norm renormalizes its weight in place during the "
                             "forward, so per-sample quantities would change the model; set max_norm=None")
        if named["scale_grad_by_freq"]:
            raise ValueError("model: an embedding with scale_grad_by_freq=True scales gradients by index "
                             "frequencies within the batch, which couples the samples; set it to False")

    def record(self, named, out):
        pad = named["padding_idx"]
        if pad is not None and pad < 0:
            pad += named["weight"].shape[0]
        return {"input": named["input"], "padding_idx": pad, "rows": named["weight"].shape[0]}, named["input"]

    def terms(self, use, dz, layout, n):
        s = use.saved
        idx = to_samples(s["input"], layout, n, features=0)
        d = to_samples(dz, layout, n, lead=1)
        valid = torch.ones_like(idx, dtype=torch.bool) if s["padding_idx"] is None else idx != s["padding_idx"]
        return {"weight": EmbeddingTerm(idx, d, valid, s["rows"])}


class _NormRule(Rule):
    """z = γ ⊙ x̂ + β: per-sample γ gradient Σ δ ⊙ x̂ and β gradient Σ δ over the axes γ broadcasts along."""

    def xhat(self, s) -> torch.Tensor:
        raise NotImplementedError

    def per_sample(self, t, layout, n, s) -> torch.Tensor:
        """[K, *x.shape] summed, per sample, over every axis the parameter broadcasts along: [K, N, numel]."""
        raise NotImplementedError

    def terms(self, use, dz, layout, n):
        s = use.saved
        out = {}
        if "weight" in use.slots:
            out["weight"] = DenseTerm(self.per_sample(dz * self.xhat(s), layout, n, s))
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

    def xhat(self, s):
        return F.layer_norm(s["input"], s["shape"], None, None, s["eps"])

    def per_sample(self, t, layout, n, s):
        nd = len(s["shape"])
        return to_samples(t, layout, n, features=nd, lead=1).sum(2).flatten(2)


class RMSNormRule(LayerNormRule):
    name = "rms_norm"
    arguments = ("input", "normalized_shape", "weight", "eps")
    defaults = {"weight": None, "eps": None}
    slots = ("weight",)

    def xhat(self, s):
        return F.rms_norm(s["input"], s["shape"], None, s["eps"])


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

    def xhat(self, s):
        return F.group_norm(s["input"], s["groups"], None, None, s["eps"])


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

    def xhat(self, s):
        x = s["input"]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - s["mean"].view(shape)) * torch.rsqrt(s["var"].view(shape) + s["eps"])


RULES: dict = {
    F.linear: LinearRule(),
    torch.conv1d: ConvRule(1), torch.conv2d: ConvRule(2), torch.conv3d: ConvRule(3),
    torch.conv_transpose1d: ConvTransposeRule(1), torch.conv_transpose2d: ConvTransposeRule(2),
    torch.conv_transpose3d: ConvTransposeRule(3),
    F.embedding: EmbeddingRule(),
    F.layer_norm: LayerNormRule(), F.rms_norm: RMSNormRule(),
    F.group_norm: GroupNormRule(), F.batch_norm: BatchNormRule(),
}


def _without_dispatch(fn):
    """``fn`` (a torch.nn.functional function) whose own __torch_function__ check is switched off, so that
    a function mode can run its body with the mode active and see the calls inside it."""
    env = dict(fn.__globals__)
    for name in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
        env[name] = lambda *args, **kwargs: False
    body = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
    body.__kwdefaults__ = fn.__kwdefaults__
    return body


# Functions the engine runs with the registry active inside: attention's own body, and the recurrent
# layers step by step (fisherext.recurrent).
DESCEND = {F.multi_head_attention_forward: _without_dispatch(F.multi_head_attention_forward), **STEPWISE}
