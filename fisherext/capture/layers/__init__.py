r"""The layer registry: per torch function that a layer calls, how its per-sample gradients are formed.

The registry is keyed by the torch *function* a layer calls (``F.linear``, ``torch.conv2d``,
``F.embedding``, ...), not by module type: every module, built-in or the user's own, that calls one of
these functions with a selected parameter gets the native rule, and so do functional calls outside any
owning module (``F.linear(h, self.emb.weight)`` in a tied language model) and calls on slices of a
parameter (the packed in-projection of attention). Adding a layer is one :class:`Rule` and one test.

A rule records, while the forward runs, what the backward needs (the input, hyper-parameters, the
tensor that fixes the batch layout); after the backward it turns the output gradient
:math:`dz` [K, \*z.shape] into ``fisherext.capture.terms`` forms per parameter slot:

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

import torch
import torch.nn.functional as F

from .base import Rule, Slot, Use
from .composite import DESCEND
from .conv import ConvRule, ConvTransposeRule, unfold
from .embedding import EmbeddingRule
from .linear import LinearRule
from .norm import BatchNormRule, GroupNormRule, LayerNormRule, RMSNormRule

RULES: dict = {
    F.linear: LinearRule(),
    torch.conv1d: ConvRule(1), torch.conv2d: ConvRule(2), torch.conv3d: ConvRule(3),
    torch.conv_transpose1d: ConvTransposeRule(1), torch.conv_transpose2d: ConvTransposeRule(2),
    torch.conv_transpose3d: ConvTransposeRule(3),
    F.embedding: EmbeddingRule(),
    F.layer_norm: LayerNormRule(), F.rms_norm: RMSNormRule(),
    F.group_norm: GroupNormRule(), F.batch_norm: BatchNormRule(),
}



__all__ = ["DESCEND", "RULES", "Rule", "Slot", "Use", "unfold"]
