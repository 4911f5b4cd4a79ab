r"""``fisherext.fisher``: the Fisher information matrix of a model over a data set, in one call.

Normalization: :math:`F = \frac1N \sum_n F_n` with the per-sample loss
:math:`\ell_n = -\log p(y_n \mid x_n, \theta)` (never the batch mean), the likelihood chosen by ``loss``
("cross_entropy", "mse", "bce", or the torch loss of one); the kinds:

- ``kind="true"``: :math:`F_n = \mathbb E_{y\sim p(y|x_n)}[g g^\top] = J_n^\top \Lambda_n J_n`, exact over
  the outputs. Softmax cross entropy: :math:`\Lambda = \mathrm{diag}(p) - pp^\top = SS^\top` with
  :math:`S_{:,c} = \sqrt{p_c}(e_c - p)` (``fisherext.ops.softmax_hessian_sqrt``); its columns are
  backpropagated in batched passes (per position, for outputs with positions).
  Gaussian regression (``loss="mse"``, unit variance, :math:`\ell = \tfrac12\|f(x)-y\|^2`): :math:`\Lambda = I`.
  Bernoulli outputs (``loss="bce"``, logits): :math:`\Lambda = \mathrm{diag}(\sigma(z)(1 - \sigma(z)))`.
- ``kind="empirical"``: :math:`F_n = g_n g_n^\top` with the data label.
- ``kind="mc"``: :math:`F_n = \frac1M \sum_m g_{nm} g_{nm}^\top`, labels :math:`y_m \sim p(y|x_n)`.

Structures: ``diag``, ``full`` (P×P), ``block`` (one dense block per module owning parameters: the
module prefix of each parameter's name), ``kfac`` (per Linear/Conv weight,
:math:`F \approx G \otimes A` with :math:`A = \frac{1}{NT}\sum_{n,t} \tilde a \tilde a^\top` (input, with
a 1 appended for the bias) and :math:`G = \frac1N \sum_{n,t,k} \delta\delta^\top`; other parameters
diagonal). All are block-diagonal over their parts, which is what ``solve`` exploits.

The per-sample gradients come from the capture engine (``fisherext.capture.engine``); every large
allocation is planned against ``memory_budget``: the result is refused up front when it does not fit,
scratch is chunked over samples and over cotangents.
"""
from __future__ import annotations

import torch
from torch import nn

from .._core.checks import check_choice, check_inputs, check_positive_int
from .._core.conventions import checked_output
from .._core.data import is_tensor_pair, iter_batches, progress_bar
from .._core.distributed import all_or_none, process_group
from .._core.likelihood import KINDS, Cotangents, as_likelihood
from .._core.types import Data, Loss, Params
from .._core.memory import require, resolve_budget
from .._core.precision import accumulation_dtype
from .accumulate import Accumulator, batch_plan, blocks, cotangent_step, footprint
from .engine import Capture
from .matrix import FisherMatrix
from .._core.entry import entry_point

STRUCTURES = ("diag", "full", "block", "kfac")
# Scratch chunks: at least 1 MiB, at most 256 MiB, a quarter of the budget in between.
_MIN_CHUNK, _MAX_CHUNK = 1 << 20, 1 << 28


def _planned_bytes(structure, cap: Capture, item: int) -> int:
    """Bytes of the result of a structure, known before any forward pass (K-FAC: an upper bound)."""
    sizes = [p.numel() for _, p in cap.params]
    P = sum(sizes)
    if structure == "full":
        return P * P * item
    if structure == "block":
        return sum(sum(sizes[i] for i in idx) ** 2 for idx in blocks(cap.params).values()) * item
    if structure == "kfac":
        total = P
        for _, p in cap.params:
            if p.dim() >= 2:
                total += p.shape[0] ** 2 + (p[0].numel() + 1) ** 2
        return total * item
    return P * item


#: What ``_signature`` describes: the numbers that differ when two ranks would reduce different sums.
_SIGNATURE = ("tensors", "parameters", "shapes", "bytes per value", "floating point", "structure", "kind", "mc_samples")


def _signature(cap: Capture, structure: str, kind: str, mc_samples: int) -> list[float]:
    """The numbers of ``_SIGNATURE``: the parameters' count, sizes, shapes (a position-weighted sum) and
    dtype, the structure and the kind."""
    shapes = sum((i + 1) * (d + 1) * n for i, (_, p) in enumerate(cap.params) for d, n in enumerate(p.shape))
    ref = cap.params[0][1]
    return [len(cap.params), sum(p.numel() for _, p in cap.params), shapes, ref.element_size(),
            float(ref.is_floating_point()), STRUCTURES.index(structure), KINDS.index(kind), mc_samples]


def _stream_into(acc: Accumulator, cap: Capture, data, lik, kind, mc_samples, batch_size, chunk_bytes, generator,
                 progress) -> int:
    """Streams the batches of ``data`` through the capture into ``acc``; returns the number of samples."""
    model = cap.model
    if batch_size is None and not isinstance(data, torch.utils.data.DataLoader):
        first = next(iter_batches(data, 2), None)
        if first is None:
            return 0
        check_inputs(model, first[0])
        with cap, torch.no_grad():
            out2 = checked_output(cap.probe(first[0]), 0, finite=False)
        K = 1 if kind == "empirical" else mc_samples if kind == "mc" else out2[0].numel()
        batch_size = batch_plan(*footprint(cap.probed_uses, out2), K, chunk_bytes)
    batches = progress_bar(iter_batches(data, batch_size), progress, f"fisher({kind}, {acc.structure})", unit="batch")
    total = 0
    with cap, torch.no_grad():
        for x, y in batches:
            check_inputs(model, x)
            if x.shape[0] == 0:
                continue
            out = checked_output(cap.forward(x), total)
            cot = Cotangents(lik, out, y, kind, mc_samples=mc_samples, generator=generator)
            # K-FAC sums its factors over the cotangents one by one, and the backward runs one per cotangent
            # anyway: chunks of one spare stacking the K output gradients of every layer (a copy of all of them)
            step = 1 if acc.structure == "kfac" else cotangent_step(*footprint(cap.uses, out), x.shape[0], cot.K,
                                                                    chunk_bytes)
            for k0 in range(0, cot.K, step):
                k1 = min(cot.K, k0 + step)
                acc.add(cap.backward(out, cot.chunk(k0, k1), last=k1 == cot.K), cot.weights[k0:k1], first=k0 == 0)
            total += x.shape[0]
    return total


@entry_point(renamed={"loss_fn": "loss"})
def fisher(model: nn.Module, data: Data, *, kind: str = "true", structure: str = "diag", loss: Loss = "cross_entropy",
           params: Params = None, mc_samples: int = 1, batch_size: int | None = None,
           memory_budget: int | None = None, progress: bool = False, generator: torch.Generator | None = None,
           class_dim: int | None = None, ignore_index: int | None = None, group=None) -> FisherMatrix:
    r"""The Fisher information of ``model`` over ``data``, :math:`F = \frac1N \sum_n F_n`.

    :math:`F_n = J_n^\top \Lambda_n J_n` ("true"), :math:`g_n g_n^\top` ("empirical") or
    :math:`\frac1M\sum_m g_{nm} g_{nm}^\top` ("mc"), with :math:`g` the gradient of the per-sample negative
    log-likelihood :math:`-\log p(y_n \mid x_n, \theta)` (the math: :mod:`fisherext.capture.api`).

    Args:
        model: a module mapping inputs x [N, ...] to outputs: logits [N, C] (or [N, T, C], [N, C, H, W]
            with positions), or regression outputs [N, ...].
        data: a DataLoader, a Dataset, or an (x, y) tuple of tensors; streamed in batches.
        kind: "true" (exact expectation over the model's predictive distribution), "empirical"
            (data labels) or "mc" (``mc_samples`` labels sampled from the model with ``generator``).
        structure: "diag", "full", "block" or "kfac".
        loss: the likelihood: a name, "cross_entropy" (softmax over the class axis), "mse" (Gaussian,
            unit variance, :math:`\Lambda = I`) or "bce" (Bernoulli of the logits, sigmoid), or the torch
            loss of one (``F.cross_entropy``, ``nn.CrossEntropyLoss(ignore_index=...)``, ``F.mse_loss``,
            ``nn.MSELoss()``, ``F.binary_cross_entropy_with_logits``, ``nn.BCEWithLogitsLoss()``; the
            normalization stays the mean over samples whatever its reduction).
        params: None (all parameters that require grad), or names, modules or tensors.
        mc_samples: labels drawn per input for ``kind="mc"``, a positive int.
        batch_size: samples per batch for tensor or Dataset data (DataLoaders keep their own; None: planned
            against the memory budget).
        memory_budget: bytes the result and its scratch may use (default: half the available memory);
            a result that does not fit is refused before any work.
        progress: show a tqdm progress bar over the batches.
        generator: the ``torch.Generator`` of the labels of ``kind="mc"`` (None: torch's global one).
        class_dim: the class axis of cross-entropy outputs with positions (None: read off the labels).
        ignore_index: label of positions that do not count (padding tokens), as in F.cross_entropy (None:
            that of an ``nn.CrossEntropyLoss`` passed as ``loss``, else -100).
        group: the torch.distributed process group whose ranks each stream their own shard of the data
            (None: the default group when one is initialized with more than one rank; False: this process
            alone). The sums and the sample count are added across the ranks, so every rank gets the
            Fisher of the whole data, equal to one process's over all of it; every rank must call with the
            same model, parameters and structure, and hold at least one sample.

    Returns:
        a FisherMatrix (``diag``, ``dense``, ``mv``, ``quad``, ``trace``, ``solve``, ``num_samples``), in the
        parameters' dtype, at least float32: a float16/bfloat16 model (or one under ``torch.autocast``) gets
        a float32 Fisher, its sums over samples never rounded to half precision.

    Raises:
        ValueError: an unknown ``kind``, ``structure`` or loss name, a torch ``loss`` that is no
            likelihood (class weights, label smoothing, any other callable), a bad ``mc_samples`` or
            ``batch_size``, a result over ``memory_budget``, labels that do not fit the outputs, no samples.
        TypeError: ``loss`` neither a name nor callable, non-tensor or integer inputs.
    """
    ranks = process_group(group)
    with all_or_none(ranks, width=len(_SIGNATURE) + 2) as shared:  # no rank waits in a reduction for one that raised
        check_choice("kind", kind, KINDS)
        check_choice("structure", structure, STRUCTURES)
        lik = as_likelihood(loss, class_dim=class_dim, ignore_index=ignore_index)
        check_positive_int("mc_samples", mc_samples)
        check_positive_int("batch_size", batch_size, optional=True)
        cap = Capture(model, params)
        ref = cap.params[0][1]
        budget = resolve_budget(memory_budget, ref.device)
        hint = {"full": "use structure='block', 'kfac' or 'diag', or pass a subset via params=",
                "block": "use structure='kfac' or 'diag', or pass a subset via params="}.get(
            structure, "pass a subset via params=")
        P = sum(p.numel() for _, p in cap.params)
        # the result's bytes in its dtype: float32 for float16/bfloat16 parameters (accumulate.py)
        require(_planned_bytes(structure, cap, accumulation_dtype(ref.dtype).itemsize), budget,
                f"structure={structure!r} over {P} parameters", hint)
        chunk_bytes = max(_MIN_CHUNK, min(budget // 4, _MAX_CHUNK))
        cap.chunk_bytes = chunk_bytes
        known = data[0].shape[0] if is_tensor_pair(data) and ranks is None else None  # across ranks: known at the end
        acc = Accumulator(structure, cap, chunk_bytes, samples=known)
        total = _stream_into(acc, cap, data, lik, kind, mc_samples, batch_size, chunk_bytes, generator, progress)
        if total == 0:
            raise ValueError("data: no samples" + ("" if ranks is None else " in this rank's shard (every rank of "
                                                   "the process group needs at least one)"))
        shared.values = [*_signature(cap, structure, kind, mc_samples), acc.kron_size(), total]
    shared.check_same("params", "the selected parameters (their number, shapes, dtype) or the structure and kind",
                      slice(0, len(_SIGNATURE)))
    shared.check_same("data", "the sizes of the K-FAC factors formed from each rank's shard", slice(len(_SIGNATURE),
                                                                                                  len(_SIGNATURE) + 1))
    acc.reduce(ranks)
    total = shared.total(len(_SIGNATURE) + 1)
    return acc.finish(total)
