"""Data streaming: batches from a DataLoader, a Dataset or an (x, y) tuple, progress bars, and the
sample-weighted mean over batches that makes every streamed quantity independent of the batching."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from .checks import check_inputs, check_positive_int
from .distributed import all_or_none, all_reduce_sum_, fingerprint, process_group


def progress_bar(iterable, enabled: bool, desc: str, total: int | None = None, unit: str = "it"):
    """The one progress bar of every entry point's ``progress=True``: a tqdm bar named ``desc``.

    Over an ``iterable``: the iterable wrapped by the bar when ``enabled``, else the iterable itself.
    With ``iterable=None``: a bar of ``total`` units updated by hand (``bar.update(n)``, ``bar.close()``,
    or used as a context manager), which does nothing when not ``enabled``.
    """
    if not enabled:
        return _NoBar() if iterable is None else iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit)


class _NoBar:
    """A progress bar updated by hand that shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def is_tensor_pair(data) -> bool:
    """Whether ``data`` is an (x, y) tuple (or list) whose x is a tensor: the in-memory form of a data set."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)


def iter_batches(data, batch_size=None) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    """(x, y) chunks from a DataLoader, a Dataset, or an (x, y) tuple of tensors."""
    check_positive_int("batch_size", batch_size, optional=True)
    if is_tensor_pair(data):
        x, y = data
        if y is not None and (not isinstance(y, torch.Tensor) or y.shape[0] != x.shape[0]):
            raise ValueError("data: x and y must be tensors with the same number of samples")
        n = x.shape[0]
        if n == 0:
            raise ValueError("data: no samples")
        step = batch_size or n
        for s in range(0, n, step):
            yield x[s : s + step], (None if y is None else y[s : s + step])
        return
    if isinstance(data, torch.utils.data.DataLoader):
        if data.batch_size is None and data.batch_sampler is None:
            raise ValueError("data: a DataLoader with batch_size=None yields single samples without a batch "
                             "axis; give it a batch_size (e.g. DataLoader(dataset, batch_size=64))")
        for batch in data:
            yield _unpack(batch)
        return
    if isinstance(data, torch.utils.data.Dataset):
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size or 256, shuffle=False)
        for batch in loader:
            yield _unpack(batch)
        return
    raise TypeError(f"data: expected a DataLoader, a Dataset or an (x, y) tuple of tensors, got {type(data).__name__}")


def _unpack(batch):
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def stream(model, data, batch_size, product, *, progress: bool = False, desc: str = "", group=None,
           inputs: torch.Tensor | None = None) -> torch.Tensor:
    """The sample-weighted mean Σ_b n_b · product(x_b, y_b, offset) / N over the batches of the data, with
    ``offset`` the batch's first sample: a batch-mean quantity (a mean loss's gradient or curvature
    product) then becomes the mean over the whole data set, whatever the batching. Under a
    torch.distributed process group (``group``: see ``fisherext._core.distributed.process_group``) each
    rank streams its own shard and the sums and N are added across the ranks: the mean over all shards.
    ``product`` must return one tensor of the same shape on every rank (each rank needs a batch);
    ``inputs`` (the vectors the products are taken with) are checked to be the same on every rank before
    the sums are added, since a sum of products with different vectors would be no product at all."""
    ranks = process_group(group)
    with all_or_none(ranks, width=5) as shared:
        batches = progress_bar(iter_batches(data, batch_size), progress, desc, unit="batch")
        total, acc = 0, None
        for x, y in batches:
            check_inputs(model, x)
            if x.shape[0] == 0:
                continue
            part = product(x, y, total)
            # summed in the accumulation dtype, at least float32: a float16/bfloat16 running sum stops growing
            # once a batch's part falls below half its spacing (bfloat16: after about 2^8 equal parts)
            part = x.shape[0] * part.to(torch.promote_types(part.dtype, torch.float32))
            acc = part if acc is None else acc + part
            total += x.shape[0]
        if total == 0:
            raise ValueError("data: no samples" + ("" if ranks is None else " in this rank's shard (every rank "
                                                   "of the process group needs at least one)"))
        same = fingerprint(inputs) if inputs is not None and ranks is not None else [0, 0, 0]  # (host syncs)
        shared.values = [*same, acc.numel(), total]
    shared.check_same("v", "the vectors (their size, sum or sum of squares)", slice(0, 3))
    shared.check_same("data", "the sizes of the per-rank sums", slice(3, 4))
    all_reduce_sum_([acc], ranks)
    return acc / shared.total(4)


def num_samples(data, name: str) -> int:
    """Number of samples of a DataLoader, a Dataset or an (x, y) tuple; ValueError naming ``name`` if 0."""
    if is_tensor_pair(data):
        x, y = data
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"{name}: influence needs targets: an (x, y) tuple with y a tensor, got y={y!r}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{name}: x and y have {x.shape[0]} and {y.shape[0]} samples")
        n = x.shape[0]
    elif isinstance(data, torch.utils.data.DataLoader):
        _check_in_order(data, name)
        n = len(data.dataset)
    elif isinstance(data, torch.utils.data.Dataset):
        n = len(data)
    else:
        raise TypeError(f"{name}: expected a DataLoader, a Dataset or an (x, y) tuple of tensors, "
                        f"got {type(data).__name__}")
    if n == 0:
        raise ValueError(f"{name}: no samples")
    return n


def _check_in_order(loader: torch.utils.data.DataLoader, name: str) -> None:
    """Refuses a DataLoader that does not yield its dataset in order: the rows (test data) and columns
    (training data) of the influence matrix follow the data's order, and the gradients are streamed
    again at every call, so a shuffled order would make them random and differ from call to call."""
    data = torch.utils.data
    if isinstance(loader.dataset, data.IterableDataset):
        return  # no sampler: the dataset's own iteration order
    batches = loader.batch_sampler
    ordered = isinstance(loader.sampler, data.SequentialSampler) and (
        batches is None or (type(batches) is data.BatchSampler and batches.sampler is loader.sampler))
    if not ordered:
        used = type(loader.sampler if batches is None or type(batches) is data.BatchSampler else batches).__name__
        raise ValueError(f"{name}: the DataLoader draws its samples through a {used}, not in order, so the "
                         "influence matrix's rows/columns would be in a random order that changes from call to "
                         "call; pass a DataLoader with shuffle=False (and no sampler), a Dataset or an (x, y) tuple")
