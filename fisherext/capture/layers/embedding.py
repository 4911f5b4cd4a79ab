"""``F.embedding``: per-sample row gradients of a lookup table (padding rows get none)."""
from __future__ import annotations

import torch

from ..layout import to_samples
from ..terms import EmbeddingTerm
from .base import Rule


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
