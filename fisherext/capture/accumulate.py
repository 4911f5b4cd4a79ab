"""Accumulation of the per-sample gradient terms into each structure of ``fisher``: diag, full, block and
kfac, with the batch plan that keeps a batch's activations and output gradients within a chunk.

Every sum lives in the accumulation dtype of the parameters (``fisherext._core.precision.accumulation_dtype``:
float32 for float16/bfloat16 parameters, else theirs), and the terms hand over their per-batch reductions in
it: a Fisher over N samples adds N (or N / batch size) contributions, and a half-precision running sum would
stop growing once a contribution falls below half its spacing (bfloat16: after about 2^8 equal terms), so
the result of a half-precision model is a float32 FisherMatrix."""
from __future__ import annotations

import math

import torch

from .. import ops
from .._core.distributed import all_reduce_sum_
from .engine import Capture
from .matrix import DensePart, DiagPart, FisherMatrix, KronPart
from .._core.precision import accumulation_dtype
from .terms import LinearTerm, Placed, Sum


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


class Accumulator:
    """Per-structure running sums over batches and cotangent chunks; ``finish`` builds the FisherMatrix."""

    def __init__(self, structure, cap: Capture, chunk_bytes: int, samples: int | None = None):
        self.structure, self.cap, self.chunk_bytes = structure, cap, chunk_bytes
        # With the number of samples known up front (an (x, y) tuple), the dense sums take their 1/N in
        # the weights of each update, which spares finish() a pass over the P×P matrix.
        self.samples = samples
        self.offsets, o = [], 0
        for _, p in cap.params:
            self.offsets.append(o)
            o += p.numel()
        self.P = o
        ref = cap.params[0][1]
        self.opts = dict(dtype=accumulation_dtype(ref.dtype), device=ref.device)
        self.diag_sums = [torch.zeros(p.numel(), **self.opts) for _, p in cap.params]
        self.blocks = blocks(cap.params) if structure == "block" else {}
        self.block_sums = {}
        self.kron = {}                # (param, part, group) -> [A_sum, G_sum, rows, idx]
        self.kron_params = set()
        # P×P sums start uninitialized: their first update overwrites them (beta = 0), saving a pass over P²
        self.full = torch.empty(self.P, self.P, **self.opts) if structure == "full" else None
        self.written = set()  # keys (None: full) of the dense sums that hold a first update

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
            kron = {i: parts for i, t in enumerate(terms) if t is not None and (parts := kron_parts(t)) is not None}
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
        sizes = lin.group_rows
        start = sum(sizes[:g])
        rows = grid[start:start + sizes[g]]
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
                target = self.block_sums[key] = torch.empty(width, width, **self.opts)
        live = [(i, t) for i, t in ((i, terms[i]) for i in idx) if t is not None]
        if not live:
            if key not in self.written:
                target.zero_()
                self.written.add(key)
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
            w = wk.to(G.dtype).repeat_interleave(e - s)
            ops.sym_outer_accum_(target, G.reshape(-1, width), w if self.samples is None else w / self.samples,
                                 beta=1.0 if key in self.written else 0.0)
            self.written.add(key)

    def _positions(self, indices) -> torch.Tensor:
        """Flat-vector positions of the parameters ``indices``, in that order."""
        indices = list(indices)
        device = self.opts["device"]
        if indices == list(range(len(self.cap.params))):
            return torch.arange(self.P, device=device)
        return torch.cat([torch.arange(self.offsets[i], self.offsets[i] + self.cap.params[i][1].numel(),
                                       device=device) for i in indices])

    def reduce(self, group) -> None:
        """Adds the sums of every rank of ``group`` (each rank streamed its own shard): the same sums in the
        same order on every rank, those a rank never wrote as zeros."""
        if group is None:
            return
        if self.full is not None and None not in self.written:
            self.full.zero_()
        for key, idx in self.blocks.items():
            if key not in self.block_sums:
                width = sum(self.cap.params[i][1].numel() for i in idx)
                self.block_sums[key] = torch.zeros(width, width, **self.opts)
        kron = [self.kron[k] for k in sorted(self.kron)]
        sums = [*self.diag_sums, *(t for e in kron for t in e[:2]), *self.block_sums.values()]
        # the K-FAC row counts travel with the sums (in float64: one collective more for float32 sums)
        rows = torch.tensor([e[2] for e in kron], dtype=torch.float64, device=self.opts["device"])
        all_reduce_sum_(sums + ([self.full] if self.full is not None else []) + ([rows] if kron else []), group)
        for e, n in zip(kron, rows.tolist()):
            e[2] = int(n)

    def kron_size(self) -> int:
        """The entries of the K-FAC sums ``reduce`` adds (their factors and row counts): ranks whose capture
        formed other factors (other layers, other layouts) must not reduce them."""
        return sum(e[0].numel() + e[1].numel() + 1 for e in self.kron.values())

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
                                   else self._mean(block, N)))
        if self.structure == "full":
            parts.append(DensePart(self._positions(range(len(self.cap.params))), self._mean(self.full, N)))
        return FisherMatrix(self.P, parts, N, self.structure)

    def _mean(self, dense_sum: torch.Tensor, N: int) -> torch.Tensor:
        """A dense sum divided by N, in place (P×P), unless its updates took the 1/N already."""
        if self.samples == N:
            return dense_sum
        return dense_sum.div_(N if self.samples is None else N / self.samples)


def kron_parts(term) -> list | None:
    """[(LinearTerm, index or None)] when the term is Kronecker-factorable: linear forms whose input side
    does not depend on the cotangent, on disjoint views of the parameter."""
    if isinstance(term, LinearTerm):
        return [(term, None)] if term.standard else None
    if isinstance(term, Placed) and isinstance(term.term, LinearTerm) and term.term.standard:
        return [(term.term, term.index)]
    if isinstance(term, Sum) and term.disjoint:
        parts = [kron_parts(t) for t in term.terms]
        return None if any(p is None for p in parts) else [q for p in parts for q in p]
    return None
