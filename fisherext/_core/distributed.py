"""Reductions across the ranks of a torch.distributed process group: each rank streams its own shard of
the data, and the sums a streamed quantity is made of (Fisher sums, sample counts, the sample-weighted sums
of products) are added across ranks before the result is formed, so that it equals the single-process one.

The group is the default one when torch.distributed is initialized with more than one rank, or the one
given; a single process (or ``group=False``) reduces nothing. Sums of the same dtype and device travel in
one flat buffer, one collective per dtype.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def process_group(group=None):
    """The group to reduce over, or None for none: ``group`` itself; with ``group=None`` the default group
    when torch.distributed is initialized with more than one rank; ``group=False``: no reduction."""
    if group is False:
        return None
    if group is not None:
        return group
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def all_reduce_sum_(tensors: Sequence[torch.Tensor], group) -> None:
    """Adds each tensor across the ranks of ``group``, in place (nothing when ``group`` is None). Every rank
    must pass tensors of the same shapes and dtypes in the same order."""
    if group is None or not tensors:
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for same in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        torch.distributed.all_reduce(flat, group=group)
        offset = 0
        for t in same:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_count(n: int, group, device="cpu") -> int:
    """A count summed across the ranks of ``group`` (``n`` itself without one), through a tensor on
    ``device`` (the backend's: CUDA for NCCL)."""
    if group is None:
        return n
    t = torch.tensor([n], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, group=group)
    return int(t.item())


def check_same_across_ranks(name: str, what: str, values: Sequence[float], group, device="cpu") -> None:
    """Raises ValueError naming ``name`` on every rank of ``group`` (none hangs) when ``values`` (numbers
    describing ``what``: sizes, codes) differ between ranks; nothing without a group."""
    if group is None:
        return
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    low, high = t.clone(), t.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=group)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise ValueError(f"{name}: {what} differ across the ranks of the process group (every rank must call "
                         "with the same model, parameters and arguments)")
