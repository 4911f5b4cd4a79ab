r"""``fisherext.fisher``: the Fisher information matrix of a model over a data set, in one call.

Normalization: :math:`F = \frac1N \sum_n F_n` with the per-sample loss
:math:`\ell_n = -\log p(y_n \mid x_n, \theta)` (never the batch mean); the likelihoods and kinds are
those of :mod:`fisherext.likelihood`:

- ``kind="true"``: :math:`F_n = \mathbb E_{y\sim p(y|x_n)}[g g^\top] = J_n^\top \Lambda_n J_n`, exact over
  the outputs. Softmax cross entropy: :math:`\Lambda = \mathrm{diag}(p) - pp^\top = SS^\top` with
  :math:`S_{:,c} = \sqrt{p_c}(e_c - p)` (``fisherext.ops.softmax_hessian_sqrt``); its columns are
  backpropagated in batched passes (per position, for outputs with positions).
  Gaussian regression (``loss="mse"``, unit variance, :math:`\ell = \tfrac12\|f(x)-y\|^2`): :math:`\Lambda = I`.
- ``kind="empirical"``: :math:`F_n = g_n g_n^\top` with the data label.
- ``kind="mc"``: :math:`F_n = \frac1M \sum_m g_{nm} g_{nm}^\top`, labels :math:`y_m \sim p(y|x_n)`.

Structures: ``diag``, ``full`` (P×P), ``block`` (one dense block per module owning parameters: the
module prefix of each parameter's name), ``kfac`` (per Linear/Conv weight,
:math:`F \approx G \otimes A` with :math:`A = \frac{1}{NT}\sum_{n,t} \tilde a \tilde a^\top` (input, with
a 1 appended for the bias) and :math:`G = \frac1N \sum_{n,t,k} \delta\delta^\top`; other parameters
diagonal). All are block-diagonal over their parts, which is what ``solve`` exploits.

The per-sample gradients come from the capture engine (:mod:`fisherext.capture`); every large
allocation is planned against ``memory_budget``: the result is refused up front when it does not fit,
scratch is chunked over samples and over cotangents.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .capture import Capture, iter_batches
from .conventions import checked_output
from .fisher_matrix import DensePart, DiagPart, FisherMatrix, KronPart
from .likelihood import KINDS, LOSSES, Cotangents
from .memory import require, resolve_budget
from .terms import LinearTerm, Placed, Sum
from . import ops
from .utils import check_choice, check_positive_int

STRUCTURES = ("diag", "full", "block", "kfac")
# Scratch chunks: at least 1 MiB, at most 256 MiB, a quarter of the budget in between.
_MIN_CHUNK, _MAX_CHUNK = 1 << 20, 1 << 28


def _check_inputs(model, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"data: inputs x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point() and not any(isinstance(m, nn.Embedding) for m in model.modules()):
        raise TypeError(f"data: inputs x have dtype {x.dtype}; the model needs floating-point inputs")


def blocks(params) -> dict[str, list[int]]:
    """The blocks of structure="block": per module owning parameters (the prefix of a parameter's name),
    the indices of its parameters among ``params`` [(name, parameter)]."""
    out: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(params):
        out.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(i)
    return out


def footprint(uses, out: torch.Tensor) -> tuple[int, int]:
    """Bytes per sample of a batch's capture: (saved activations, output gradients per cotangent)."""
    n, item = out.shape[0], out.element_size()
    act = sum(u.rule.scratch(u) for u in uses) * item
    grad = (sum(math.prod(u.out_shape) for u in uses) + out.numel()) * item
    return max(1, act // n), max(1, grad // n)


def batch_plan(act: int, grad: int, K: int, chunk_bytes: int) -> int:
    """Samples per batch such that its activations and the output gradients of its cotangents fit
    ``chunk_bytes``; with many cotangents (a true Fisher over positions) at least 32 samples, the
    cotangents then being chunked (``cotangent_step``)."""
    n = chunk_bytes // (act + K * grad)
    return max(1, n) if n >= 32 or K == 1 else max(1, min(32, chunk_bytes // (act + grad)))


def cotangent_step(act: int, grad: int, n: int, K: int, chunk_bytes: int) -> int:
    """Cotangents per backward pass for a batch of n samples within ``chunk_bytes``."""
    return max(1, min(K, (chunk_bytes // n - act) // grad))


class _Accumulator:
    """Per-structure running sums over batches and cotangent chunks; ``finish`` builds the FisherMatrix."""

    def __init__(self, structure, cap: Capture, chunk_bytes: int):
        self.structure, self.cap, self.chunk_bytes = structure, cap, chunk_bytes
        self.offsets, o = [], 0
        for _, p in cap.params:
            self.offsets.append(o)
            o += p.numel()
        self.P = o
        ref = cap.params[0][1]
        self.opts = dict(dtype=ref.dtype, device=ref.device)
        self.diag_sums = [torch.zeros(p.numel(), **self.opts) for _, p in cap.params]
        self.blocks = blocks(cap.params) if structure == "block" else {}
        self.block_sums = {}
        self.kron = {}                # (param, part, group) -> [A_sum, G_sum, rows, idx]
        self.kron_params = set()
        self.full = torch.zeros(self.P, self.P, **self.opts) if structure == "full" else None

    def add(self, terms, wk: torch.Tensor, first: bool):
        """One cotangent chunk of one batch (``first``: the batch's first chunk)."""
        if self.structure == "full":
            self._add_dense(terms, wk, list(range(len(terms))), None)
            return
        if self.structure == "block":
            for key, idx in self.blocks.items():
                self._add_dense(terms, wk, idx, key)
            return
        kron = {}
        if self.structure == "kfac":
            kron = {i: parts for i, t in enumerate(terms) if t is not None and (parts := _kron_parts(t)) is not None}
        paired = {w: b for w, b in self._bias_pairs().items() if w in kron and len(kron[w]) == 1 and kron[w][0][1] is None}
        for i, term in enumerate(terms):
            if term is not None and i not in kron and i not in paired.values():
                self.diag_sums[i] += term.diag(wk)
        for i, parts in kron.items():
            self.kron_params.add(i)
            bias = paired.get(i)
            for j, (lin, index) in enumerate(parts):
                for g, (A, G, rows) in enumerate(lin.kfac_factors(wk, with_bias=bias is not None, inputs=first)):
                    entry = self.kron.get((i, j, g))
                    if entry is None:
                        entry = self.kron[(i, j, g)] = [0, torch.zeros_like(G), 0,
                                                        self._kron_index(i, lin, index, g, bias)]
                    if first:
                        entry[0] += A
                        entry[2] += rows
                    entry[1] += G
        self.kron_params.update(paired.values())

    def _bias_pairs(self) -> dict[int, int]:
        """weight -> bias, for weights whose every use (a Linear or a convolution, on the whole weight)
        comes with the same whole bias, used nowhere else: K-FAC factors the two together (a 1 appended to
        the input)."""
        uses, fallback = self.cap.uses, self.cap.fallback
        with_weight: dict[int, set] = {}
        with_bias: dict[int, set] = {}
        for u in uses:
            w, b = u.slots.get("weight"), u.slots.get("bias")
            if w is not None:
                whole = b is not None and b.key is None and w.key is None and u.rule.kronecker
                with_weight.setdefault(w.param, set()).add(b.param if whole else None)
            if b is not None:
                with_bias.setdefault(b.param, set()).add(None if w is None else w.param)
        return {w: b for w, bs in with_weight.items() if len(bs) == 1 and (b := next(iter(bs))) is not None
                and with_bias.get(b) == {w} and w not in fallback and b not in fallback}

    def _kron_index(self, i, lin: LinearTerm, index, g, bias):
        """Flat positions [r_g, c (+1 bias column)] of group g of a Kronecker-factored weight."""
        device = self.opts["device"]
        local = torch.arange(lin.numel, device=device) if index is None else index.reshape(-1)
        grid = (self.offsets[i] + local).view(lin.rows, lin.cols)
        start = sum(L.shape[-1] for L, _ in lin.pairs[:g])
        rows = grid[start:start + lin.pairs[g][0].shape[-1]]
        if bias is not None:
            b = self.offsets[bias] + torch.arange(start, start + rows.shape[0], device=device)
            rows = torch.cat([rows, b[:, None]], dim=1)
        return rows

    def _add_dense(self, terms, wk, idx, key):
        """Σ_k w_k Σ_n g_nk g_nkᵀ over the parameters ``idx`` (into the full matrix, or block ``key``)."""
        width = sum(self.cap.params[i][1].numel() for i in idx)
        if key is None:
            target = self.full
        else:
            target = self.block_sums.get(key)
            if target is None:
                target = self.block_sums[key] = torch.zeros(width, width, **self.opts)
        live = [(i, t) for i, t in ((i, terms[i]) for i in idx) if t is not None]
        if not live:
            return
        K, N = wk.shape[0], live[0][1].batch
        step = max(1, self.chunk_bytes // max(1, K * width * target.element_size()))
        local = {}
        o = 0
        for i in idx:
            local[i] = o
            o += self.cap.params[i][1].numel()
        for s in range(0, N, step):
            e = min(N, s + step)
            G = torch.zeros(K, e - s, width, **self.opts)
            for i, t in live:
                G[:, :, local[i]:local[i] + t.numel] = t.per_sample_grads(s, e)
            ops.sym_outer_accum_(target, G.reshape(-1, width), wk.repeat_interleave(e - s))

    def _positions(self, indices) -> torch.Tensor:
        """Flat-vector positions of the parameters ``indices``, in that order."""
        indices = list(indices)
        device = self.opts["device"]
        if indices == list(range(len(self.cap.params))):
            return torch.arange(self.P, device=device)
        return torch.cat([torch.arange(self.offsets[i], self.offsets[i] + self.cap.params[i][1].numel(),
                                       device=device) for i in indices])

    def finish(self, N: int) -> FisherMatrix:
        parts = []
        if self.structure in ("diag", "kfac"):
            rest = [i for i in range(len(self.cap.params)) if i not in self.kron_params]
            if rest:
                parts.append(DiagPart(self._positions(rest), torch.cat([self.diag_sums[i] for i in rest]) / N))
            for A, G, rows, idx in self.kron.values():
                parts.append(KronPart(idx, A / rows, G / N))
        for key, idx in self.blocks.items():
            flat = self._positions(idx)
            block = self.block_sums.get(key)
            parts.append(DensePart(flat, torch.zeros(flat.numel(), flat.numel(), **self.opts) if block is None
                                   else block / N))
        if self.structure == "full":
            parts.append(DensePart(self._positions(range(len(self.cap.params))), self.full / N))
        return FisherMatrix(self.P, parts, N, self.structure)


def _kron_parts(term) -> list | None:
    """[(LinearTerm, index or None)] when the term is Kronecker-factorable: linear forms whose input side
    does not depend on the cotangent, on disjoint views of the parameter."""
    if isinstance(term, LinearTerm):
        return [(term, None)] if term.standard else None
    if isinstance(term, Placed) and isinstance(term.term, LinearTerm) and term.term.standard:
        return [(term.term, term.index)]
    if isinstance(term, Sum) and term.disjoint:
        parts = [_kron_parts(t) for t in term.terms]
        return None if any(p is None for p in parts) else [q for p in parts for q in p]
    return None


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


def fisher(model: nn.Module, data, *, kind: str = "true", structure: str = "diag", loss: str = "cross_entropy",
           params=None, mc_samples: int = 1, batch_size: int | None = None, memory_budget: int | None = None,
           progress: bool = False, generator: torch.Generator | None = None, class_dim: int | None = None,
           ignore_index: int = -100) -> FisherMatrix:
    """The Fisher information of ``model`` over ``data`` (see the module docstring for the math).

    Args:
        model: a module mapping inputs x [N, ...] to outputs: logits [N, C] (or [N, T, C], [N, C, H, W]
            with positions), or regression outputs [N, ...].
        data: a DataLoader, a Dataset, or an (x, y) tuple of tensors; streamed in batches.
        kind: "true" (exact expectation over the model's predictive distribution), "empirical"
            (data labels) or "mc" (``mc_samples`` labels sampled from the model with ``generator``).
        structure: "diag", "full", "block" or "kfac".
        loss: "cross_entropy" (softmax over the class axis) or "mse" (Gaussian, unit variance).
        params: None (all parameters that require grad), or names, modules or tensors.
        batch_size: samples per batch for tensor or Dataset data (DataLoaders keep their own).
        memory_budget: bytes the result and its scratch may use (default: half the available memory);
            a result that does not fit is refused before any work.
        progress: show a tqdm progress bar.
        class_dim: the class axis of cross-entropy outputs with positions (None: read off the labels).
        ignore_index: label of positions that do not count (padding tokens), as in F.cross_entropy.
    Returns:
        a FisherMatrix (``diag``, ``dense``, ``mv``, ``quad``, ``trace``, ``solve``, ``num_samples``).
    """
    check_choice("kind", kind, KINDS)
    check_choice("structure", structure, STRUCTURES)
    check_choice("loss", loss, LOSSES)
    check_positive_int("mc_samples", mc_samples)
    check_positive_int("batch_size", batch_size, optional=True)
    cap = Capture(model, params)
    ref = cap.params[0][1]
    budget = resolve_budget(memory_budget, ref.device)
    hint = {"full": "use structure='block', 'kfac' or 'diag', or pass a subset via params=",
            "block": "use structure='kfac' or 'diag', or pass a subset via params="}.get(
        structure, "pass a subset via params=")
    P = sum(p.numel() for _, p in cap.params)
    require(_planned_bytes(structure, cap, ref.element_size()), budget,
            f"structure={structure!r} over {P} parameters", hint)
    chunk_bytes = max(_MIN_CHUNK, min(budget // 4, _MAX_CHUNK))
    cap.chunk_bytes = chunk_bytes
    acc = _Accumulator(structure, cap, chunk_bytes)
    if batch_size is None and not isinstance(data, torch.utils.data.DataLoader):
        first = next(iter_batches(data, 2), None)
        if first is None:
            raise ValueError("data: no samples")
        _check_inputs(model, first[0])
        with cap, torch.no_grad():
            out2 = checked_output(cap.probe(first[0]), 0, finite=False)
        K = 1 if kind == "empirical" else mc_samples if kind == "mc" else out2[0].numel()
        batch_size = batch_plan(*footprint(cap.probed_uses, out2), K, chunk_bytes)
    batches = iter_batches(data, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"fisher({kind}, {structure})", unit="batch")
    total = 0
    with cap, torch.no_grad():
        for x, y in batches:
            _check_inputs(model, x)
            if x.shape[0] == 0:
                continue
            out = checked_output(cap.forward(x), total)
            cot = Cotangents(out, y, kind, loss, mc_samples=mc_samples, generator=generator, class_dim=class_dim,
                             ignore_index=ignore_index)
            step = cotangent_step(*footprint(cap.uses, out), x.shape[0], cot.K, chunk_bytes)
            for k0 in range(0, cot.K, step):
                k1 = min(cot.K, k0 + step)
                acc.add(cap.backward(out, cot.chunk(k0, k1), last=k1 == cot.K), cot.weights[k0:k1], first=k0 == 0)
            total += x.shape[0]
    if total == 0:
        raise ValueError("data: no samples")
    return acc.finish(total)
