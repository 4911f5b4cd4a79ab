"""Reductions across the ranks of a torch.distributed process group: each rank streams its own shard of
the data, and the sums a streamed quantity is made of (Fisher sums, sample counts, the sample-weighted sums
of products) are added across ranks before the result is formed, so that it equals the single-process one.

The group is the default one when torch.distributed is initialized with more than one rank, or the one
given; a single process (or ``group=False``) reduces nothing. Sums of the same dtype and device travel in
one flat buffer, one collective per dtype. Per-sample values (one per sample of a shard) are gathered in
rank order instead.

The local work of a call (its checks, streaming its shard) runs inside :func:`all_or_none`, which ends
with one small all-gather: whether each rank raised, and a few numbers each rank shares (its sample count,
the sizes and a fingerprint of what it is about to reduce). So a call makes two collectives, that one and
the reduction, and

- a rank that raised makes every rank raise (the failing ones their own error, the others a RuntimeError
  quoting it) instead of the healthy ranks waiting forever in the reduction;
- ranks about to reduce different things (other parameters, vectors, sizes) all raise the same ValueError
  (:meth:`Shared.check_same`) before a buffer is reduced.

A rank that dies or hangs outside Python's exceptions is detected by the backend's own timeout
(``torch.distributed.init_process_group(timeout=...)``).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from contextlib import contextmanager

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


def check_unsharded(model, params) -> None:
    """Refuses a model whose parameters FSDP shards (FSDP2's DTensor parameters, FSDP1's flat shards):
    every quantity here is computed with whole parameters on each rank. Only looks when torch's FSDP or
    DTensor module is loaded, which building such a model does."""
    tensor, fsdp = sys.modules.get("torch.distributed.tensor"), sys.modules.get("torch.distributed.fsdp")
    sharded = (tensor is not None and any(isinstance(p, tensor.DTensor) for _, p in params)) or (
        fsdp is not None and any(isinstance(m, fsdp.FullyShardedDataParallel) for m in model.modules()))
    if sharded:
        raise ValueError("model: its parameters are sharded by FSDP (each rank holds a slice of each tensor), but "
                         "fisherext computes with whole parameters on every rank and adds the per-rank sums; "
                         "wrap the model in DistributedDataParallel instead, or compute on an unsharded copy "
                         "(the full state dict, torch.distributed.checkpoint.state_dict.get_model_state_dict with "
                         "full_state_dict=True, loaded into the model built without FSDP)")


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


def backend_device(group) -> torch.device:
    """The device the collectives of ``group`` take their tensors on: the current CUDA device for NCCL,
    else the CPU."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Shared:
    """The numbers every rank shared on leaving :func:`all_or_none`: set ``values`` (``width`` numbers) in
    the body; afterwards ``rows`` [ranks, width] (float64) holds every rank's, in rank order (this
    process's alone without a group)."""

    def __init__(self, width: int):
        self.width, self.values, self.rows = width, [], None

    def _mine(self) -> torch.Tensor:
        values = [float(v) for v in self.values]
        if len(values) != self.width:
            raise RuntimeError(f"fisherext: {len(values)} numbers shared where {self.width} were announced")
        return torch.tensor(values, dtype=torch.float64)

    def check_same(self, name: str, what: str, columns: slice) -> None:
        """Raises ValueError naming ``name`` (on every rank alike, as every rank holds every row) when the
        numbers in ``columns`` (describing ``what``) differ between ranks."""
        part = self.rows[:, columns]
        if not torch.equal(part.amin(0), part.amax(0)):
            raise ValueError(f"{name}: {what} differ across the ranks of the process group (every rank must call "
                             "with the same model, parameters and arguments)")

    def total(self, column: int) -> int:
        """The sum over the ranks of a column of counts."""
        return int(self.rows[:, column].sum().item())


@contextmanager
def all_or_none(group, width: int = 0):
    """Runs the body (one rank's local part of a call), which may share ``width`` numbers (``Shared.values``);
    on leaving it every rank learns whether any rank raised, and every rank's numbers. A rank that raised
    re-raises its own error; the others raise a RuntimeError naming the first failing rank and quoting its
    error, so no rank is left waiting in a later collective. Without a group the body runs as it is."""
    shared = Shared(width)
    if group is None:
        yield shared
        shared.rows = shared._mine()[None]
        return
    try:
        yield shared
    except Exception as err:
        _exchange(group, shared, err)
        raise
    _exchange(group, shared, None)


def _exchange(group, shared: Shared, err: Exception | None) -> None:
    dist = torch.distributed
    device = backend_device(group)
    mine = torch.zeros(1 + shared.width, dtype=torch.float64)
    if err is None:
        mine[1:] = shared._mine()
    else:
        mine[0] = 1
    rows = [torch.empty_like(mine, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine.to(device), group=group)
    table = torch.stack(rows).cpu()
    failed = table[:, 0].nonzero()
    if failed.numel():
        first = int(failed[0, 0])
        message = [f"{type(err).__name__}: {err}" if dist.get_rank(group) == first else None]
        dist.broadcast_object_list(message, src=dist.get_global_rank(group, first), group=group, device=device)
        if err is None:
            raise RuntimeError(f"fisherext: rank {first} of the process group's {len(rows)} raised {message[0]} "
                               "(the call was given up on every rank)")
        return
    shared.rows = table[:, 1:]


def gathered_rows(t: torch.Tensor, counts: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``t`` [n_r, ...] stacked along the first axis in rank order, with ``counts`` the n_r of
    every rank (shared through :func:`all_or_none`; the other axes and the dtype must agree, which
    ``Shared.check_same`` can check first); ``t`` itself without a group."""
    if group is None:
        return t
    counts = [int(n) for n in counts.tolist()]
    device = backend_device(group)
    padded = t.new_zeros((max(counts), *t.shape[1:]), device=device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    torch.distributed.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(t.device)


def row_layout(t: torch.Tensor) -> list[float]:
    """The numbers of ``t`` [n, ...] that ``gathered_rows`` needs every rank to share: n, the values per row
    and the bytes per value."""
    return [t.shape[0], math.prod(t.shape[1:]), t.element_size()]


def fingerprint(t: torch.Tensor) -> list[float]:
    """Numbers that differ, but for a coincidence, when two ranks hold different tensors: the size, the sum
    and the sum of squares."""
    return [t.numel(), t.sum().item(), t.square().sum().item()]
