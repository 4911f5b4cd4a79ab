r"""Batch layouts: where the samples of a batch lie in a tensor that a model computes.

A layer of a model does not always see its batch on dim 0: a sequence-first model feeds a Linear
:math:`[T, N, D]`, attention flattens :math:`[L, N, E]` to :math:`[L\cdot N, E]` before its output
projection, an image model may fold frames into the batch, and a buffer or a position table may have no
batch axis at all. Per-sample quantities need the sample of every row, so the layout of each captured
tensor is established, not assumed, by running the model on a few probe samples:

- sizes: the model runs on batches of two sizes :math:`n_1 < n_2`. The one axis whose size changes, from
  :math:`m n_1` to :math:`m n_2`, holds the samples, m rows per sample; a tensor whose shape does not
  change has no batch axis (it does not depend on the batch), and any other change leaves the layout
  unknown;
- order: with m > 1 the rows of sample n are either the block :math:`[n m, (n+1) m)` ("sample-major")
  or the stride :math:`j N + n` ("sample-minor"). The model runs on two distinct samples and on the same
  two swapped; the layout is the ordering under which the swap permutes the rows, and it is unknown when
  both or neither ordering explains the values.

A use whose layout is unknown, or that has no batch axis in a batch of several samples, cannot be split
per sample from the captured tensors; the engine sends its parameters to the exact fallback.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """``axis``: the axis holding the samples (None: the tensor has no batch axis); ``m``: rows per
    sample along it; ``sample_major``: rows n·m + j (True) or j·N + n (False)."""

    axis: int | None
    m: int = 1
    sample_major: bool = True


NO_BATCH = Layout(None)


def from_sizes(shape1, n1: int, shape2, n2: int) -> Layout | None:
    """The layout explaining shapes ``shape1`` / ``shape2`` at batch sizes n1 < n2, or None (unknown)."""
    if len(shape1) != len(shape2):
        return None
    changed = [i for i, (a, b) in enumerate(zip(shape1, shape2)) if a != b]
    if not changed:
        return NO_BATCH
    if len(changed) != 1:
        return None
    i = changed[0]
    if shape1[i] % n1 or shape2[i] % n2 or shape1[i] // n1 != shape2[i] // n2:
        return None
    return Layout(i, shape1[i] // n1)


def ordering(layout: Layout, pair: torch.Tensor, swapped: torch.Tensor) -> Layout | None:
    """Settles the row order of a layout with m > 1 from the tensor computed on two samples (``pair``)
    and on the same two swapped (``swapped``); None when the values do not tell."""
    if layout.axis is None or layout.m == 1:
        return layout
    if pair.shape != swapped.shape or pair.shape[layout.axis] != 2 * layout.m:
        return None
    a, b = pair.detach().double(), swapped.detach().double()
    tol = 1e-6 * (a.abs().max().item() + 1e-30) + 1e-12

    def explains(sample_major: bool) -> bool:
        split = (2, layout.m) if sample_major else (layout.m, 2)
        axis = layout.axis if sample_major else layout.axis + 1
        return bool(((a.unflatten(layout.axis, split).flip(axis) - b.unflatten(layout.axis, split)).abs()
                     <= tol).all())

    major, minor = explains(True), explains(False)
    if major == minor:
        return None
    return Layout(layout.axis, layout.m, major)


def to_samples(t: torch.Tensor, layout: Layout, n: int, features: int = 1, lead: int = 0) -> torch.Tensor:
    """``t`` (with ``lead`` leading axes, e.g. the cotangent axis of an output gradient) rearranged to
    ``[*lead, n, T, *features]``: the samples on one axis, every other non-feature axis (positions, the m
    rows of a sample, ...) flattened into T in order. ``features`` trailing axes are kept. A tensor with no
    batch axis is one sample's (valid only for n = 1)."""
    if layout.axis is None:
        if n != 1:
            raise AssertionError("a tensor without a batch axis belongs to a single sample only")
        t = t.unsqueeze(lead)
    else:
        axis = lead + layout.axis
        if layout.m == 1:
            t = t.movedim(axis, lead)
        elif layout.sample_major:
            t = t.unflatten(axis, (n, layout.m)).movedim(axis, lead)
        else:
            t = t.unflatten(axis, (layout.m, n)).movedim(axis + 1, lead)
    keep = t.shape[t.dim() - features:] if features else ()
    return t.reshape(*t.shape[:lead], n, -1, *keep)
