r"""``fisherext.fisher``: the Fisher information matrix of a model over a data set, in one call.

Normalization: :math:`F = \frac1N \sum_n F_n` with the per-sample loss
:math:`\ell_n = -\log p(y_n \mid x_n, \theta)` (never the batch mean):

- ``kind="true"``: :math:`F_n = \mathbb E_{y\sim p(y|x_n)}[g g^\top] = J_n^\top \Lambda_n J_n`, exact over
  the outputs. Softmax cross entropy: :math:`\Lambda = \mathrm{diag}(p) - pp^\top = SS^\top` with
  :math:`S_{:,c} = \sqrt{p_c}(e_c - p)` (``fisherext.ops.softmax_hessian_sqrt``); the C columns of S are
  backpropagated in one batched pass.
  Gaussian regression (``loss="mse"``, unit variance, :math:`\ell = \tfrac12\|f(x)-y\|^2`): :math:`\Lambda = I`.
- ``kind="empirical"``: :math:`F_n = g_n g_n^\top` with the data label.
- ``kind="mc"``: :math:`F_n = \frac1M \sum_m g_{nm} g_{nm}^\top`, labels :math:`y_m \sim p(y|x_n)`.

Structures: ``diag``, ``full`` (P×P), ``block`` (one dense block per module owning parameters),
``kfac`` (per Linear/Conv weight, :math:`F \approx G \otimes A` with
:math:`A = \frac{1}{NT}\sum_{n,t} \tilde a \tilde a^\top` (input, with a 1 appended for the bias) and
:math:`G = \frac1N \sum_{n,t,k} \delta\delta^\top`; other parameters diagonal). All are block-diagonal
over their parts, which is what ``solve`` exploits.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from . import ops
from .capture import Capture, LinearLayer, iter_batches
from .fisher_matrix import DensePart, DiagPart, FisherMatrix, KronPart
from .utils import check_choice, check_positive_int

KINDS = ("true", "empirical", "mc")
STRUCTURES = ("diag", "full", "block", "kfac")
LOSSES = ("cross_entropy", "mse")


def default_memory_budget(device: torch.device) -> int:
    """Half of the memory currently available on ``device`` (bytes)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) // 2


def output_cotangents(out: torch.Tensor, y, kind: str, loss: str, mc_samples: int, generator, offset: int):
    """Cotangents [K, N, C] of the model output and their weights [K] for one batch (see module doc)."""
    if out.dim() != 2:
        raise ValueError(f"model: expected outputs of shape [N, C], got {tuple(out.shape)}")
    bad = (~torch.isfinite(out)).any(dim=1).nonzero()
    if bad.numel():
        raise ValueError(f"model: the output for sample {offset + int(bad[0])} is not finite")
    out = out.detach()
    N, C = out.shape
    ones = out.new_ones
    if loss == "cross_entropy":
        if kind == "true":
            return ops.softmax_hessian_sqrt(out), ones(C)
        p = torch.softmax(out, dim=1)
        if kind == "empirical":
            labels = _labels(y, N, C)
            return (p - nn.functional.one_hot(labels, C).to(p.dtype))[None], ones(1)
        labels = torch.multinomial(p, mc_samples, replacement=True, generator=generator).T  # [M, N]
        return p[None] - nn.functional.one_hot(labels, C).to(p.dtype), ones(mc_samples) / mc_samples
    if kind == "true":
        eye = torch.eye(C, dtype=out.dtype, device=out.device)
        return eye[:, None, :].expand(C, N, C), ones(C)
    if kind == "empirical":
        if y is None or not isinstance(y, torch.Tensor) or y.shape != out.shape:
            raise ValueError(f"data: loss='mse' needs targets y of shape {tuple(out.shape)}")
        return (out - y.to(out.dtype))[None], ones(1)
    noise = torch.randn(mc_samples, N, C, dtype=out.dtype, device=out.device, generator=generator)
    return -noise, ones(mc_samples) / mc_samples


def _labels(y, N, C):
    if y is None:
        raise ValueError("data: kind='empirical' needs labels y")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != N or y.is_floating_point():
        raise ValueError(f"data: labels y must be an integer tensor of shape [{N}]")
    if N and (y.min() < 0 or y.max() >= C):
        raise ValueError(f"data: labels must lie in [0, {C}), got [{int(y.min())}, {int(y.max())}]")
    return y


def _check_inputs(model, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"data: inputs x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point() and not any(isinstance(m, nn.Embedding) for m in model.modules()):
        raise TypeError(f"data: inputs x have dtype {x.dtype}; the model needs floating-point inputs")


def _auto_batch_size(cap: Capture, data, kind, loss, mc_samples, chunk_bytes) -> int:
    """Samples per batch so that one batch's captured activations and output gradients fit chunk_bytes.

    Measured on a one-sample probe: per layer, its input in linear form plus K output gradients
    (K = number of backpropagated output directions of the kind).
    """
    first = next(iter_batches(data, 1), None)
    if first is None:
        raise ValueError("data: no samples")
    x = first[0]
    _check_inputs(cap.model, x)
    with cap, torch.no_grad():
        out = cap.forward(x[:1])
        K = {"true": out.shape[-1], "empirical": 1, "mc": mc_samples}[kind]
        per_sample = out.numel() * (K + 1)
        for layer in cap.layers:
            for inputs, z in zip(layer.inputs, layer.outputs):
                a = layer.linear_input(inputs[0]) if isinstance(layer, LinearLayer) else inputs[0]
                per_sample += a.numel() + K * z.numel()
    return max(1, chunk_bytes // (per_sample * out.element_size()))


class _Accumulator:
    """Per-structure running sums over batches; ``finish`` normalizes and builds the FisherMatrix."""

    def __init__(self, structure, cap: Capture, chunk_bytes: int):
        self.structure = structure
        self.cap = cap
        self.chunk_bytes = chunk_bytes
        self.offsets = {}  # parameter name -> (start, length) in the flat vector
        o = 0
        for name, p in cap.params:
            self.offsets[name] = (o, p.numel())
            o += p.numel()
        self.P = o
        ref = cap.params[0][1]
        self.opts = dict(dtype=ref.dtype, device=ref.device)
        self.diag_sums = {name: torch.zeros_like(p) for name, p in cap.params} if structure in ("diag", "kfac") else {}
        self.full = torch.zeros(self.P, self.P, **self.opts) if structure == "full" else None
        self.blocks = {}
        self.kron = {}
        self.kron_rows = {}

    def _index(self, names) -> torch.Tensor:
        """Flat-vector positions of the named parameters, in the given order."""
        device = self.opts["device"]
        return torch.cat([torch.arange(o, o + n, device=device) for o, n in (self.offsets[q] for q in names)])

    def _kfac_layer(self, layer):
        return self.structure == "kfac" and isinstance(layer, LinearLayer) and layer.has_weight

    def _step(self, K, width, itemsize):
        """Samples per chunk of materialized gradients [K, step, width] within chunk_bytes."""
        return max(1, self.chunk_bytes // max(1, K * width * itemsize))

    def add(self, wk: torch.Tensor):
        if self.structure == "full":
            self._add_full(wk)
            return
        for layer in self.cap.layers:
            if self.structure == "block":
                self._add_block(layer, wk)
            elif self._kfac_layer(layer):
                for g, (A, G, rows) in enumerate(layer.kfac_factors(wk)):
                    key = (layer.name, g)
                    if key in self.kron:
                        self.kron[key][0].add_(A)
                        self.kron[key][1].add_(G)
                    else:
                        self.kron[key] = [A, G]
                    self.kron_rows[key] = self.kron_rows.get(key, 0) + rows
            else:
                for (name, _, _), d in zip(layer.params, layer.diag(wk)):
                    self.diag_sums[name] += d

    def _add_block(self, layer, wk):
        K, N = wk.shape[0], layer.batch
        block = self.blocks.setdefault(layer.name, torch.zeros(layer.numel, layer.numel, **self.opts))
        step = self._step(K, layer.numel, block.element_size())
        for s in range(0, N, step):
            e = min(N, s + step)
            g = layer.per_sample_grads(s, e)
            ops.sym_outer_accum_(block, g.reshape(-1, layer.numel), wk.repeat_interleave(e - s))

    def _add_full(self, wk):
        K, N = wk.shape[0], self.cap.layers[0].batch
        cols = {layer.name: self._index([q for q, _, _ in layer.params]) for layer in self.cap.layers}
        step = self._step(K, self.P, self.full.element_size())
        for s in range(0, N, step):
            e = min(N, s + step)
            G = torch.zeros(K, e - s, self.P, **self.opts)
            for layer in self.cap.layers:
                G[:, :, cols[layer.name]] = layer.per_sample_grads(s, e)
            ops.sym_outer_accum_(self.full, G.reshape(-1, self.P), wk.repeat_interleave(e - s))

    def finish(self, N: int) -> FisherMatrix:
        parts = []
        if self.structure in ("diag", "kfac"):
            names = [n for n, _ in self.cap.params if not any(
                self._kfac_layer(l) and n in {q for q, _, _ in l.params} for l in self.cap.layers)]
            if names:
                vals = torch.cat([self.diag_sums[n].reshape(-1) for n in names]) / N
                parts.append(DiagPart(self._index(names), vals))
        if self.structure == "kfac":
            for layer in self.cap.layers:
                if not self._kfac_layer(layer):
                    continue
                local = {ln: q for q, ln, _ in layer.params}
                O, I_tot = layer.module.weight.shape[0], layer.module.weight[0].numel()
                G_count = layer.groups
                Og, Ig = O // G_count, I_tot
                w0 = self.offsets[local["weight"]][0]
                widx = torch.arange(w0, w0 + O * Ig, device=self.opts["device"]).view(O, Ig)
                bidx = None
                if "bias" in local:
                    b0 = self.offsets[local["bias"]][0]
                    bidx = torch.arange(b0, b0 + O, device=self.opts["device"])
                for g in range(G_count):
                    A, G = self.kron[(layer.name, g)]
                    rows = slice(g * Og, (g + 1) * Og)
                    idx = widx[rows]
                    if bidx is not None:
                        idx = torch.cat([idx, bidx[rows, None]], dim=1)
                    parts.append(KronPart(idx, A / self.kron_rows[(layer.name, g)], G / N))
        if self.structure == "block":
            for layer in self.cap.layers:
                parts.append(DensePart(self._index([q for q, _, _ in layer.params]), self.blocks[layer.name] / N))
        if self.structure == "full":
            parts.append(DensePart(torch.arange(self.P, device=self.opts["device"]), self.full / N))
        return FisherMatrix(self.P, parts, N, self.structure)


def fisher(model: nn.Module, data, *, kind: str = "true", structure: str = "diag", loss: str = "cross_entropy",
           params=None, mc_samples: int = 1, batch_size: int | None = None, memory_budget: int | None = None,
           progress: bool = False, generator: torch.Generator | None = None) -> FisherMatrix:
    """The Fisher information of ``model`` over ``data`` (see the module docstring for the math).

    Args:
        model: a module mapping inputs x [N, ...] to outputs [N, C] (logits, or regression outputs).
        data: a DataLoader, a Dataset, or an (x, y) tuple of tensors; streamed in batches.
        kind: "true" (exact expectation over the model's predictive distribution), "empirical"
            (data labels) or "mc" (``mc_samples`` labels sampled from the model with ``generator``).
        structure: "diag", "full", "block" or "kfac".
        loss: "cross_entropy" (softmax over logits) or "mse" (Gaussian, unit variance).
        params: None (all parameters that require grad), or names, modules or tensors.
        batch_size: samples per batch for tensor or Dataset data (DataLoaders keep their own).
        memory_budget: bytes the result and its scratch may use (default: half the available memory);
            a "full" request that does not fit fails before any work.
        progress: show a tqdm progress bar.
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
    budget = memory_budget if memory_budget is not None else default_memory_budget(ref.device)
    P = sum(p.numel() for _, p in cap.params)
    item = ref.element_size()
    if structure == "full" and P * P * item > budget:
        raise ValueError(
            f"structure='full': a {P} x {P} Fisher needs {P * P * item:,} bytes but the memory budget is "
            f"{budget:,} bytes; use structure='block', 'kfac' or 'diag', or pass a subset via params=")
    acc = _Accumulator(structure, cap, chunk_bytes=max(1 << 20, min(budget // 4, 1 << 28)))
    total = 0
    if batch_size is None and not isinstance(data, torch.utils.data.DataLoader):
        batch_size = _auto_batch_size(cap, data, kind, loss, mc_samples, acc.chunk_bytes)
    batches = iter_batches(data, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"fisher({kind}, {structure})", unit="batch")
    with cap, torch.no_grad():
        for x, y in batches:
            _check_inputs(model, x)
            if x.shape[0] == 0:
                continue
            out = cap.forward(x)
            cot, wk = output_cotangents(out, y, kind, loss, mc_samples, generator, total)
            with torch.enable_grad():
                cap.backward(out, cot)
            acc.add(wk)
            total += x.shape[0]
    if total == 0:
        raise ValueError("data: no samples")
    return acc.finish(total)
