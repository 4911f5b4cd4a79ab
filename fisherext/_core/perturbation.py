"""Moving a model's parameters in place along a flat direction, and restoring them bit for bit."""
from __future__ import annotations

import torch

from .. import ops


class ParameterPerturbation:
    """Saves the selected parameters once, as one flat buffer per dtype; ``set(v, eps)`` makes
    θ = θ₀ + eps·v for a flat direction v, ``restore()`` copies θ₀ back bit for bit. Each is one
    multi-tensor kernel call per dtype present (a model usually has one)."""

    def __init__(self, selected):
        params = [p for _, p in selected]
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        self.groups = [_Group([params[i] for i in idx], [(offsets[i], offsets[i + 1]) for i in idx],
                              offsets[-1]) for idx in by_dtype.values()]

    def set(self, v: torch.Tensor, eps: float):
        """θ = θ₀ + eps·v, with v a flat contiguous vector over the selected parameters."""
        with torch.no_grad():
            for g in self.groups:
                g.write(g.take(v), eps)

    def restore(self):
        with torch.no_grad():
            for g in self.groups:
                g.write(None, 0.0)


class _Group:
    """Parameters of one dtype: what the kernel writes, their flat saved values, and where their entries
    lie in a flat direction over all selected parameters."""

    def __init__(self, params, spans, total):
        self.saved = torch.cat([p.detach().reshape(-1) for p in params])
        # The kernel pairs elements in memory order, which is the flat order only for a contiguous
        # tensor: a parameter stored otherwise (channels_last, a transposed Parameter) is computed into
        # a contiguous scratch, then copied. The .data views are made once, not on every call.
        data = [p.data for p in params]
        self.targets = [d if d.is_contiguous() else torch.empty_like(d, memory_format=torch.contiguous_format)
                        for d in data]
        self.copies = [(d, t) for d, t in zip(data, self.targets) if d is not t]
        whole = spans[0][0] == 0 and spans[-1][1] == total and all(
            e == b for (_, e), (b, _) in zip(spans, spans[1:]))
        self.index = None if whole else torch.cat(
            [torch.arange(b, e, device=self.saved.device) for b, e in spans])

    def take(self, v):
        v = v if self.index is None else v.index_select(0, self.index)
        return v.to(self.saved.dtype)

    def write(self, v, eps):
        ops.unflatten_axpy_(self.targets, self.saved, v, eps)
        for d, t in self.copies:
            d.copy_(t)
