r"""Capture engine: per-layer inputs and output gradients, turned into per-sample Fisher factors.

Forward hooks record, for every module that owns selected parameters, its input and its output
``z``. One call of ``torch.autograd.grad`` then backpropagates K cotangent vectors of the model output
at once (``is_grads_batched``), giving every layer its output gradients ``dz`` [K, N, ...]. With the
cotangents chosen by the Fisher kind (the data-label residual for "empirical", the C columns of a
square root of the loss Hessian for "true", sampled-label residuals for "mc"), the per-sample Fisher is

.. math:: F_n = \sum_k w_k\, g_{nk} g_{nk}^\top,\qquad g_{nk} = \partial z_n/\partial\theta^\top\, dz_{nk}.

Layers with a linear form (nn.Linear, nn.Conv1d/2d unfolded to positions) never materialize
``g_{nk}``: their factors go straight to the ``fisherext.ops`` kernels. nn.Embedding and the affine
parameters of LayerNorm/GroupNorm/RMSNorm/BatchNorm (eval) have small closed forms. Any other module
with parameters falls back to ``torch.func`` (vmap over vjp), correct but slower, announced once.
"""
from __future__ import annotations

import abc
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap

from . import ops
from .utils import all_finite

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ---------------------------------------------------------------------------------------------------
# Parameter selection


def resolve_params(model: nn.Module, params=None) -> list[tuple[str, nn.Parameter]]:
    """Selected parameters as (qualified name, parameter), in ``model.named_parameters()`` order.

    ``params``: None (every parameter with requires_grad), or an iterable of parameter names, modules
    (all their parameters) or parameter tensors.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        if isinstance(params, (str, nn.Module, torch.Tensor)):
            params = [params]
        ids: set[int] = set()
        by_name = dict(named)
        for item in params:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"params: the model has no parameter named {item!r}")
                ids.add(id(by_name[item]))
            elif isinstance(item, nn.Module):
                ids.update(id(p) for p in item.parameters())
            elif isinstance(item, torch.Tensor):
                if not any(p is item for _, p in named):
                    raise ValueError("params: a tensor in 'params' is not a parameter of the model")
                ids.add(id(item))
            else:
                raise TypeError(f"params: expected parameter names, modules or tensors, got {type(item).__name__}")
        chosen = [(n, p) for n, p in named if id(p) in ids]
    if not chosen:
        raise ValueError("params: no parameters selected (none requires grad, or the subset is empty)")
    for name, p in chosen:
        if not p.is_floating_point():
            raise TypeError(f"params: parameter {name!r} is not floating point ({p.dtype})")
    if not all_finite([p for _, p in chosen]):
        name = next(name for name, p in chosen if not torch.isfinite(p).all())
        raise ValueError(f"params: parameter {name!r} has non-finite values")
    return chosen


def check_batchnorm(model: nn.Module) -> None:
    """Refuses BatchNorm that normalizes with batch statistics: it couples the samples of a batch."""
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORMS) and (module.training or not module.track_running_stats):
            raise ValueError(
                f"model: BatchNorm module {name!r} couples the samples of a batch (train mode or no "
                "running statistics), so per-sample Fisher quantities are undefined; call model.eval()"
            )


# ---------------------------------------------------------------------------------------------------
# Layers: one per module owning selected parameters.


class Layer(abc.ABC):
    """A module owning selected parameters and what was captured of it in the last forward/backward.

    ``uses`` holds one (inputs, dz) pair per call of the module in the forward pass (a module applied
    twice shares its parameters, and the per-sample gradient sums over the uses).
    """

    def __init__(self, name: str, module: nn.Module, params: list[tuple[str, str, nn.Parameter]]):
        self.name = name
        self.module = module
        self.params = params  # (qualified name, local name, parameter)
        self.outputs: list[torch.Tensor] = []
        self.inputs: list[tuple] = []
        self.dz: list[torch.Tensor] = []

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, _, p in self.params)

    def record(self, args, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"capture: module {self.name!r} returned {type(output).__name__}, not a tensor")
        self.inputs.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        self.outputs.append(output)

    def clear(self):
        self.outputs, self.inputs, self.dz = [], [], []

    # Per-sample quantities; every method sums over the module's uses. K = number of cotangents,
    # wk [K] their weights; sample slices [s, e) bound the memory of materialized gradients.

    @abc.abstractmethod
    def per_sample_grads(self, s: int, e: int) -> torch.Tensor:
        """g_nk flattened in parameter order: [K, e - s, numel]."""

    def diag(self, wk: torch.Tensor) -> list[torch.Tensor]:
        """Per parameter: sum_k w_k sum_n g_nk ⊙ g_nk (unnormalized), shaped like the parameter."""
        return self._split(torch.einsum("k,knp->p", wk, self.per_sample_grads(0, self.batch) ** 2))

    def gram(self) -> torch.Tensor:
        """Per-sample Gram of the cotangent directions: [N, K, K], entries <g_nk, g_nl>."""
        G = self.per_sample_grads(0, self.batch)
        return torch.einsum("knp,lnp->nkl", G, G)

    @property
    def batch(self) -> int:
        return self.dz[0].shape[1]

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        sizes = [p.numel() for _, _, p in self.params]
        return [c.view_as(p) for c, (_, _, p) in zip(flat.split(sizes, dim=-1), self.params)]


class LinearLayer(Layer):
    """nn.Linear, nn.Conv1d, nn.Conv2d: z = W a (+ b) over positions t, W [O, I] per group."""

    kfac_capable = True

    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        local = {ln for _, ln, _ in params}
        self.has_weight = "weight" in local
        self.has_bias = "bias" in local
        self.groups = getattr(module, "groups", 1)

    def linear_input(self, x: torch.Tensor) -> torch.Tensor:
        """Layer input in linear form [N, T, I_total] (for convolutions: unfolded patches)."""
        m = self.module
        if isinstance(m, nn.Linear):
            return x.reshape(x.shape[0], -1, x.shape[-1])
        if isinstance(m, nn.Conv1d):
            x = x.unsqueeze(2)
            kernel, stride, dilation = (1, *m.kernel_size), (1, *m.stride), (1, *m.dilation)
        else:
            kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad if isinstance(m, nn.Conv2d) else (*pad, 0, 0), mode=mode)
        return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)

    def _delta(self, dz: torch.Tensor) -> torch.Tensor:
        """Output gradient in linear form [K, N, T, O_total]."""
        if isinstance(self.module, nn.Linear):
            return dz.reshape(dz.shape[0], dz.shape[1], -1, dz.shape[-1])
        return dz.flatten(3).transpose(2, 3) if dz.dim() > 4 else dz.transpose(2, 3)

    def factors(self):
        """(a [N, T, I], delta [K, N, T, O]) in linear form, uses concatenated along T."""
        a = _cat([self.linear_input(inp[0]) for inp in self.inputs], dim=1)
        d = _cat([self._delta(dz) for dz in self.dz], dim=2)
        return a, d

    def group_factors(self):
        """Per group: (a_g [N, T, I_g], delta_g [K, N, T, O_g])."""
        a, d = self.factors()
        G = self.groups
        return list(zip(a.chunk(G, dim=-1), d.chunk(G, dim=-1))) if G > 1 else [(a, d)]

    def per_sample_grads(self, s, e):
        parts = []
        groups = self.group_factors()
        if self.has_weight:
            w = [torch.einsum("knto,nti->knoi", d[:, s:e], a[s:e]) for a, d in groups]
            w = torch.cat(w, dim=2) if len(w) > 1 else w[0]
            parts.append(w.flatten(2))
        if self.has_bias:
            parts.append(torch.cat([d[:, s:e].sum(2) for _, d in groups], dim=-1))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def diag(self, wk):
        weight_rows, bias = [], []
        for a, d in self.group_factors():
            if a.shape[1] == 1:
                # T = 1: g_nk = δ_nk a_nᵀ, so Σ_k w_k g_nk² = s_n (a_n²)ᵀ with s_n = Σ_k w_k δ_nk²:
                # one GEMM per layer whatever the number K of backpropagated directions.
                s = torch.einsum("k,kno->no", wk, d[:, :, 0] ** 2)
                if self.has_weight:
                    weight_rows.append(s.T @ a[:, 0] ** 2)
                bias.append(s.sum(0))
            else:
                if self.has_weight:
                    weight_rows.append(sum(wk[k] * ops.linear_sq_grad(a, d[k]) for k in range(d.shape[0])))
                bias.append(torch.einsum("k,kno->o", wk, d.sum(2) ** 2))
        out = [torch.cat(weight_rows).view_as(self.module.weight)] if self.has_weight else []
        return out + ([torch.cat(bias)] if self.has_bias else [])

    def gram(self):
        K = 0
        for a, d in self.group_factors():
            if self.has_weight:
                K = K + ops.class_gram(a, d.transpose(0, 1))
            if self.has_bias:
                b = d.sum(2)  # [K, N, O]
                K = K + torch.einsum("kno,lno->nkl", b, b)
        return K

    def kfac_factors(self, wk):
        """Per group: (A_sum, G_sum, rows) with A_sum = sum_n sum_t ã ãᵀ (ã = [a, 1] with a bias),
        G_sum = sum_k w_k sum_n sum_t δ δᵀ, rows = N T (A is normalized by rows, G by N)."""
        out = []
        for a, d in self.group_factors():
            if self.has_bias:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            A = a.new_zeros(a.shape[-1], a.shape[-1])
            ops.sym_outer_accum_(A, a)
            G = d.new_zeros(d.shape[-1], d.shape[-1])
            for k in range(d.shape[0]):
                ops.sym_outer_accum_(G, d[k], alpha=float(wk[k]))
            out.append((A, G, a.shape[0] * a.shape[1]))
        return out


class EmbeddingLayer(Layer):
    """nn.Embedding: sample n's gradient of row v is the sum of dz over the positions holding index v."""

    def _factors(self):
        idx = _cat([inp[0].reshape(inp[0].shape[0], -1) for inp in self.inputs], dim=1)  # [N, T]
        d = _cat([dz.reshape(dz.shape[0], dz.shape[1], -1, dz.shape[-1]) for dz in self.dz], dim=2)
        pad = self.module.padding_idx
        valid = torch.ones_like(idx, dtype=torch.bool) if pad is None else idx != pad
        return idx, d, valid

    def per_sample_grads(self, s, e):
        idx, d, valid = self._factors()
        V, D = self.module.weight.shape
        K, n = d.shape[0], e - s
        rows = (torch.arange(n, device=idx.device)[:, None] * V + idx[s:e]).masked_select(valid[s:e])
        vals = d[:, s:e][:, valid[s:e]]  # [K, M, D]
        out = d.new_zeros(K, n * V, D)
        out.index_add_(1, rows, vals)
        return out.view(K, n, V * D)

    def diag(self, wk):
        idx, d, valid = self._factors()
        V = self.module.weight.shape[0]
        N = idx.shape[0]
        keys = (torch.arange(N, device=idx.device)[:, None] * V + idx)[valid]
        uniq, inverse = torch.unique(keys, return_inverse=True)
        out = torch.zeros_like(self.module.weight)
        for k in range(d.shape[0]):
            summed = d.new_zeros(uniq.numel(), d.shape[-1]).index_add_(0, inverse, d[k][valid])
            out.index_add_(0, uniq % V, wk[k] * summed**2)
        return [out]

    def gram(self):
        idx, d, valid = self._factors()
        same = (idx[:, :, None] == idx[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        return torch.einsum("nts,kntd,lnsd->nkl", same.to(d.dtype), d, d)


class NormLayer(Layer):
    """Affine parameters of LayerNorm, RMSNorm, GroupNorm, BatchNorm (eval): z = γ ⊙ x̂ + β."""

    def _xhat(self, x):
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        if isinstance(m, _BATCHNORMS):
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return (x - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
        return F.rms_norm(x, m.normalized_shape, None, m.eps)

    def _reduce(self, t):
        """Sum [K, N, ...] over every axis that the parameter broadcasts along."""
        m = self.module
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            nd = len(m.normalized_shape)
            return t.sum(dim=tuple(range(2, t.dim() - nd))) if t.dim() - nd > 2 else t
        return t.sum(dim=tuple(range(3, t.dim()))) if t.dim() > 3 else t

    def per_sample_grads(self, s, e):
        total = None
        for inp, dz in zip(self.inputs, self.dz):
            dz = dz[:, s:e]
            parts = []
            for _, local, _ in self.params:
                if local == "weight":
                    parts.append(self._reduce(dz * self._xhat(inp[0][s:e])).flatten(2))
                else:
                    parts.append(self._reduce(dz).flatten(2))
            g = torch.cat(parts, dim=-1)
            total = g if total is None else total + g
        return total


class FallbackLayer(Layer):
    """Any other module with parameters: per-sample gradients by torch.func (vmap over vjp)."""

    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        warnings.warn(
            f"fisherext: module {name!r} ({type(module).__name__}) has no per-sample factor rule; its "
            "parameters use the torch.func fallback (vmap over vjp), correct but slower",
            UserWarning,
            stacklevel=4,
        )

    def per_sample_grads(self, s, e):
        weights = {local: p.detach() for _, local, p in self.params}
        module = self.module
        total = None
        for inp, dz in zip(self.inputs, self.dz):

            def one(args_n, dz_n):
                def out(w):
                    batched = tuple(a.unsqueeze(0) if isinstance(a, torch.Tensor) else a for a in args_n)
                    return functional_call(module, w, batched).squeeze(0)

                _, pullback = vjp(out, weights)
                grads = pullback(dz_n)[0]
                return torch.cat([grads[local].reshape(-1) for _, local, _ in self.params])

            tensors = tuple(a[s:e] for a in inp)
            per_n = vmap(one, in_dims=(0, 0))
            g = vmap(per_n, in_dims=(None, 0))(tensors, dz[:, s:e])
            total = g if total is None else total + g
        return total


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _layer_for(name: str, module: nn.Module, params) -> Layer:
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d):
        return LinearLayer(name, module, params)
    if type(module) is nn.Embedding and module.max_norm is None:
        return EmbeddingLayer(name, module, params)
    if type(module) in (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, *_BATCHNORMS):
        return NormLayer(name, module, params)
    return FallbackLayer(name, module, params)


# ---------------------------------------------------------------------------------------------------
# The capture context


class Capture:
    """Hooks every module owning selected parameters; removed on exit, also on exceptions.

    >>> with Capture(model, params) as cap:
    ...     out = cap.forward(x)               # records inputs and outputs
    ...     cap.backward(out, cotangents)      # cotangents [K, *out.shape] -> layer.dz [K, N, ...]
    ...     for layer in cap.layers: ...
    """

    def __init__(self, model: nn.Module, params=None):
        self.model = model
        self.params = resolve_params(model, params)
        check_batchnorm(model)
        owner = {}
        for mname, module in model.named_modules():
            for local, p in module.named_parameters(recurse=False):
                owner.setdefault(id(p), (mname, module, local))
        by_module: dict[int, list] = {}
        modules = {}
        for qname, p in self.params:
            mname, module, local = owner[id(p)]
            by_module.setdefault(id(module), []).append((qname, local, p))
            modules[id(module)] = (mname, module)
        self.layers = [_layer_for(*modules[key], plist) for key, plist in by_module.items()]
        self._handles = []
        self._recording = False

    def __enter__(self):
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._hook_for(layer)))
        self._saved_requires_grad = [p.requires_grad for _, p in self.params]
        for _, p in self.params:
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        for (_, p), flag in zip(self.params, self._saved_requires_grad):
            p.requires_grad_(flag)
        for layer in self.layers:
            layer.clear()
        return False

    def _hook_for(self, layer):
        def hook(module, args, output):
            if self._recording:
                layer.record(args, output)

        return hook

    def forward(self, x) -> torch.Tensor:
        for layer in self.layers:
            layer.clear()
        self._recording = True
        try:
            with torch.enable_grad():
                return self.model(x)
        finally:
            self._recording = False

    def backward(self, output: torch.Tensor, cotangents: torch.Tensor) -> None:
        """Backpropagates K cotangents [K, *output.shape] in one batched pass into every layer's dz."""
        zs = [z for layer in self.layers for z in layer.outputs]
        if cotangents.shape[0] == 1:  # a plain backward pass is cheaper than a vmapped one
            grads = torch.autograd.grad(output, zs, cotangents[0], allow_unused=True)
            grads = [None if g is None else g.unsqueeze(0) for g in grads]
        else:
            grads = torch.autograd.grad(output, zs, cotangents, is_grads_batched=True, allow_unused=True)
        it = iter(grads)
        for layer in self.layers:
            layer.dz = []
            for z in layer.outputs:
                g = next(it)
                layer.dz.append(torch.zeros(cotangents.shape[0], *z.shape, dtype=z.dtype, device=z.device)
                                if g is None else g.detach())
            layer.outputs = []


def iter_batches(data, batch_size=None) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    """(x, y) chunks from a DataLoader, a Dataset, or an (x, y) tuple of tensors."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if y is not None and (not isinstance(y, torch.Tensor) or y.shape[0] != x.shape[0]):
            raise ValueError("data: x and y must be tensors with the same number of samples")
        n = x.shape[0]
        step = batch_size or n
        for s in range(0, n, step):
            yield x[s : s + step], (None if y is None else y[s : s + step])
        return
    if isinstance(data, torch.utils.data.DataLoader):
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
