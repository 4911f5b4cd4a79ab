"""Convolutions and transposed convolutions (1-d, 2-d, 3-d): linear maps over unfolded windows."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..layout import Layout, to_samples
from ..._core.precision import accumulation_dtype, autocast_off
from ..terms import BiasTerm, LinearTerm, Term, feature_gram, input_factor
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


def _by_sample(t: torch.Tensor, layout: Layout, n: int, lead: int = 0) -> torch.Tensor:
    """``t`` [*lead, B, ...] as [*lead, m, n, ...]: the m rows of each of the n samples on their own axis."""
    if layout.axis is None:  # one sample (n = 1), all its rows on dim 0
        return t.unsqueeze(lead + 1)
    if layout.m == 1:
        return t.unsqueeze(lead)
    if layout.sample_major:
        return t.unflatten(lead, (n, layout.m)).transpose(lead, lead + 1)
    return t.unflatten(lead, (layout.m, n))


class ConvTerm(LinearTerm):
    r"""The weight of a convolution: :math:`g_{nk} = \sum_t \delta_{nkt}\, u_{nt}^\top` with
    :math:`u_{nt}` the input patch at output position t (channel-major, like ``weight.flatten(1)``).

    Two exact ways to form it; the cheaper is chosen per layer:

    - *grouped*: the per-sample gradients of a chunk of samples are the weight gradient of one grouped
      convolution with the samples as groups (input ``[m, n·C, ...]``, output gradient ``[m, n·O, ...]``,
      ``n·G`` groups). The backend reads the input through its own implicit im2col, so no patch matrix
      is formed; the chunk's gradients, n × numel, are bounded by ``chunk_bytes``. Used for the
      diagonal, squared norms, Grams and per-sample gradients when a sample's gradient
      (:math:`O \cdot C/G \cdot \prod k`) is no larger than its patches (:math:`T \cdot C \prod k`),
      i.e. :math:`O \le G\,T` — the early, wide-image layers, where unfolding costs the most.
    - *unfolded*: the :class:`LinearTerm` over explicitly unfolded patches (``pairs``, formed on first
      use): for the late layers with many channels and few positions.

    K-FAC's factors sum over all rows and positions, whatever sample they belong to, so they are taken
    from the patches in im2col's own layout [B, C·Πk, L] and from the output gradient as it is
    [K, B, O, L] (:func:`~fisherext.capture.terms.feature_gram`), never in the per-sample layout.

    Half-precision inputs and output gradients (a float16/bfloat16 model, or float32 inputs with
    bfloat16 output gradients under autocast) are converted to the accumulation dtype chunk by chunk
    before the grouped backward, which then also runs on operands of one dtype.
    """

    def __init__(self, saved: dict, dz: torch.Tensor, layout: Layout, n: int, d: torch.Tensor):
        self.saved, self.dz, self.layout, self.d = saved, dz, layout, d
        x, G = saved["input"], saved["groups"]
        self.K, self.batch = dz.shape[0], n
        self.rows = dz.shape[2]
        self.cols = x.shape[1] // G * math.prod(saved["kernel"])
        self.numel = self.rows * self.cols
        self.dtype, self.device = accumulation_dtype(dz.dtype, x.dtype), dz.device
        self.reduced = None
        self.grouped = self.use_grouped(self.rows, G, d.shape[2])

    @staticmethod
    def use_grouped(out_channels: int, groups: int, positions: int) -> bool:
        """O ≤ G·T: a sample's gradient is no larger than its patches (measured on CPU: the grouped form is
        1.5-10× faster below this line, the unfolded one 1.3-5× faster above it)."""
        return out_channels <= groups * positions

    @functools.cached_property
    def pairs(self):
        s = self.saved
        patches = unfold(s["input"], s["kernel"], s["stride"], s["padding"], s["dilation"])  # [B, L, C·Πk]
        a = to_samples(patches, self.layout, self.batch)
        G = s["groups"]
        return list(zip(self.d.chunk(G, -1), (p[None] for p in a.chunk(G, -1))))

    def _grads(self, s: int, e: int) -> torch.Tensor:
        """Per-sample gradients [e - s, K, numel] of samples [s, e), every cotangent at once: one grouped
        convolution backward with the K cotangents side by side as K·O output channels per sample."""
        sv = self.saved
        x = sv["input"]
        padding = [p for p, _ in sv["padding"]]
        if any(p != q for p, q in sv["padding"]):  # padding="same" with an odd total: pad, then convolve unpadded
            x = F.pad(x, [p for pair in reversed(sv["padding"]) for p in pair])
            padding = [0] * len(padding)
        n, G, K, O = e - s, sv["groups"], self.K, self.rows
        # one chunk of samples at a time in the accumulation dtype (the backward needs one dtype)
        x = _by_sample(x, self.layout, self.batch)[:, s:e].to(self.dtype)                    # [m, n, C, *spatial]
        dz = _by_sample(self.dz, self.layout, self.batch, lead=1)[:, :, s:e].to(self.dtype)  # [K, m, n, O, *out]
        spatial = dz.shape[4:]
        # output channels of sample n, group g, cotangent k: block (n, g, k) of O/G each
        dz = dz.unflatten(3, (G, O // G)).permute(1, 2, 3, 0, 4, *range(5, 5 + len(spatial)))
        weight_shape = (n * K * O, x.shape[2] // G, *sv["kernel"])
        grad = torch.ops.aten.convolution_backward(
            dz.reshape(dz.shape[0], n * K * O, *spatial), x.flatten(1, 2), x.new_zeros(()).expand(weight_shape), None,
            list(sv["stride"]), padding, list(sv["dilation"]), False, [0] * len(padding), n * G, [False, True, False])[1]
        grad = grad.view(n, G, K, O // G, self.cols)
        return (grad[:, 0] if G == 1 else grad.transpose(1, 2)).reshape(n, K, self.numel)

    @autocast_off
    def per_sample_grads(self, s, e):
        return self._grads(s, e).transpose(0, 1) if self.grouped else super().per_sample_grads(s, e)

    @property
    def standard(self) -> bool:
        return True  # the patches do not depend on the cotangent

    @property
    def group_rows(self) -> list[int]:
        G = self.saved["groups"]
        return [self.rows // G] * G

    @autocast_off
    def kfac_factors(self, wk, with_bias: bool, inputs: bool = True):
        sv, G = self.saved, self.saved["groups"]
        dz = self.dz.flatten(3)                                                       # [K, B, O, L]
        rows = dz.shape[1] * dz.shape[3]
        patches = None
        if inputs:  # [B, C·Πk, L]: F.unfold's own layout in 1-d and 2-d (unfold returns its transpose)
            patches = unfold(sv["input"], sv["kernel"], sv["stride"], sv["padding"], sv["dilation"]).mT
        out = []
        for g in range(G):
            A = None
            if inputs:
                M = patches.chunk(G, 1)[g]
                A = input_factor(feature_gram(M), M.sum((0, 2), dtype=self.dtype) if with_bias else None, rows)
            Gs = sum(wk[k].to(self.dtype) * feature_gram(dz[k].chunk(G, 1)[g]) for k in range(dz.shape[0]))
            out.append((A, Gs, rows))
        return out

    # grouped: Term's chunked reductions of per_sample_grads; unfolded: LinearTerm's factored forms
    def diag(self, wk):
        return Term.diag(self, wk) if self.grouped else super().diag(wk)

    def sq_norms(self, wk):
        return Term.sq_norms(self, wk) if self.grouped else super().sq_norms(wk)

    def gram(self):
        return Term.gram(self) if self.grouped else super().gram()


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
        d = to_samples(dz.flatten(3).transpose(2, 3), layout, n, lead=1)   # [K, B, O, L] -> [K, N, T, O]
        weight = ConvTerm(use.saved, dz, layout, n, d)
        return {"weight": weight, "bias": BiasTerm(d, None if weight.grouped or use.saved["groups"] > 1 else weight)}


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
