r"""Per-input Fisher measures: for every input n of a batch, :math:`\mathrm{tr}(F_n)` or :math:`v^\top F_n v`.

:math:`F_n = \sum_k w_k\, g_{nk} g_{nk}^\top` with :math:`g_{nk} = J_n^\top c_{nk}` the per-sample gradients
of the Fisher kind's output cotangents (of the likelihood chosen by ``loss``: the columns of
:math:`\Lambda_n^{1/2}` for "true", per position for outputs with positions; the data-label residual for
"empirical"; sampled-label residuals for "mc"). Hence

- trace: :math:`\mathrm{tr}(F_n) = \sum_k w_k \|g_{nk}\|^2`, per parameter from the capture engine's
  factored forms (a linear layer's from the per-sample Gram of its inputs and output gradients, the
  class-Gram kernel), the cotangents backpropagated a chunk at a time;
- quad: :math:`v^\top F_n v = \sum_k w_k (c_{nk}^\top J_n v)^2`, with :math:`J_n v` for all n from one
  forward-mode Jacobian-vector product per direction (padding rows constant, attention by the math
  kernel); K directions (the columns of V [P, K]) give [N, K].
- quad along each input's own direction (``v="predicted"``, seed 001's): :math:`v_n = \nabla_\theta \log
  p(\hat y_n | x_n) / \|\cdot\| = J_n^\top u_n / \|J_n^\top u_n\|` with :math:`u_n = e_{\hat y_n} - p_n`, a
  cotangent like the others. Backpropagating :math:`u_n` beside the kind's cotangents gives the per-sample
  Gram :math:`\Gamma_n = [g_{n1} \dots g_{nK}\; J_n^\top u_n]^\top [\dots]` (the class-Gram kernel for
  linear layers), and :math:`v_n^\top F_n v_n = \sum_k w_k \Gamma_{n,uk}^2 / \Gamma_{n,uu}`: all N
  directions for the cost of one trace, no [N, P] matrix of directions.

Both are the exact quantities over all parameters jointly (not a sum of per-tensor blocks).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jvp

from .._core.checks import check_choice, check_inputs, check_positive_int
from .._core.conventions import checked_output, curvature_forward
from .._core.data import iter_batches, progress_bar
from .._core.distributed import all_or_none, gathered_rows, process_group, row_layout
from .._core.entry import entry_point
from .._core.functional import FunctionalModel, grads
from .._core.likelihood import KINDS, Cotangents, as_likelihood
from .._core.precision import accumulation_dtype
from .._core.types import Loss, Params
from .accumulate import cotangent_step, footprint
from .engine import Capture

QUANTITIES = ("trace", "quad")
_CHUNK_BYTES = 1 << 26


@entry_point(renamed={"loss_fn": "loss"})
def per_sample_fisher(model: nn.Module, x, y: torch.Tensor | None = None, *, kind: str = "true",
                      quantity: str = "trace", v: torch.Tensor | None = None, loss: Loss = "cross_entropy",
                      params: Params = None, mc_samples: int = 1, generator: torch.Generator | None = None,
                      class_dim: int | None = None, ignore_index: int | None = None, batch_size: int | None = None,
                      progress: bool = False, group=None) -> torch.Tensor:
    r""":math:`\mathrm{tr}(F_n)` or :math:`v^\top F_n v` for every input n of the batch ``x``, or of a data set.

    :math:`F_n` is input n's own Fisher (not divided by N; ``fisherext.fisher`` is their mean
    :math:`\frac1N\sum_n F_n`), of the kind and likelihood given (the math: :mod:`fisherext.capture.measures`).

    Args:
        model: a module mapping inputs x [N, ...] to outputs (logits [N, C], [N, T, C], [N, C, H, W], or
            regression outputs).
        x: the inputs [N, ...], one batch; or a data set streamed in batches, in constant memory: the
            inputs [N, ...] with ``batch_size`` given, or a DataLoader or Dataset (of (x, y) or x; then
            ``y`` stays None).
        y: the targets of tensor inputs; needed for kind="empirical" (and they name the class axis and
            the ignored positions of outputs with positions, as in ``fisherext.fisher``).
        kind: "true", "empirical" or "mc" (``mc_samples`` labels drawn with ``generator``).
        quantity: "trace" (:math:`\mathrm{tr}(F_n)`) or "quad" (:math:`v^\top F_n v`).
        v: for quantity="quad": one direction [P], or K directions as the columns of [P, K], over the
            selected parameters (flat, in ``model.named_parameters()`` order); or ``"predicted"``: each
            input n along its own direction, the normalized gradient of its predicted class's
            log-probability (``fisherext.perturb.predicted_class_directions``, seed 001's direction), for
            a classifier's logits [N, C] (cross entropy), at the cost of the trace.
        loss: the likelihood: "cross_entropy", "mse", "bce", or the torch loss of one (as in
            ``fisherext.fisher``).
        params: None (all parameters that require grad), or names, modules or tensors.
        mc_samples: labels drawn per input for kind="mc", a positive int.
        generator: the ``torch.Generator`` of the MC labels (None: torch's global one); the same labels
            serve all K directions.
        class_dim: the class axis of cross-entropy outputs with positions (None: read off the labels).
        ignore_index: label of positions that do not count (None: that of an ``nn.CrossEntropyLoss``
            passed as ``loss``, else -100).
        batch_size: samples per batch over a data set (tensor inputs or a Dataset; a DataLoader keeps its
            own); None with tensor inputs: ``x`` is one batch.
        progress: a tqdm progress bar over the batches of a data set.
        group: over a data set, the torch.distributed process group whose ranks each stream their own
            shard (None: the default group when one is initialized with more than one rank; False: this
            process alone): every rank gets the values of all shards, rank 0's first. One batch ``x``
            (no ``batch_size``) is never gathered.

    Returns:
        Tensor [N] (trace, quad with one direction or ``v="predicted"``) or [N, K] (quad with K
        directions), in the order of the samples (over ranks: rank by rank); in the parameters' dtype, at
        least float32 (float32 for a float16/bfloat16 model or under ``torch.autocast``).

    Raises:
        ValueError: an unknown ``kind`` or ``quantity``, a ``loss`` that is no likelihood, an empty
            batch or data set, a ``v`` of the wrong shape or with non-finite entries, labels that do not
            fit, ``y`` beside a DataLoader or Dataset.
        TypeError: quantity="quad" without ``v``, ``v`` not a floating-point tensor, integer inputs, ``x``
            neither a tensor, a DataLoader nor a Dataset.
    """
    measure = _batch_measure(model, kind, quantity, v, loss, params, mc_samples, generator, class_dim, ignore_index)
    if isinstance(x, torch.Tensor) and batch_size is None:
        return measure(x, y, 0)
    if not isinstance(x, (torch.Tensor, torch.utils.data.Dataset, torch.utils.data.DataLoader)):
        raise TypeError(f"x: expected a tensor, a DataLoader or a Dataset, got {type(x).__name__}")
    if y is not None and not isinstance(x, torch.Tensor):
        raise ValueError("y: the targets of a DataLoader or Dataset come from it; pass y=None")
    check_positive_int("batch_size", batch_size, optional=True)
    ranks = process_group(group)
    with all_or_none(ranks, width=3) as shared:  # no rank waits in the gather for a rank that raised
        data = (x, y) if isinstance(x, torch.Tensor) else x
        parts, seen = [], 0
        for xb, yb in progress_bar(iter_batches(data, batch_size), progress, f"per_sample_fisher({kind}, {quantity})",
                                   unit="batch"):
            if xb.shape[0] > 0:
                parts.append(measure(xb, yb, seen))
                seen += xb.shape[0]
        if not parts:
            raise ValueError("x: no samples" + ("" if ranks is None else " in this rank's shard (every rank of "
                                                "the process group needs at least one)"))
        values = torch.cat(parts)
        shared.values = row_layout(values)
    shared.check_same("v", "the per-sample values' sizes or dtypes", slice(1, 3))
    return gathered_rows(values, shared.rows[:, 0], ranks)


def _batch_measure(model, kind, quantity, v, loss, params, mc_samples, generator, class_dim, ignore_index):
    """Checks the arguments of ``per_sample_fisher`` once; returns ``measure(x, y, offset)``, the values of
    one batch x (``offset``: its first sample's index in the data, which errors name)."""
    check_choice("kind", kind, KINDS)
    check_choice("quantity", quantity, QUANTITIES)
    lik = as_likelihood(loss, class_dim=class_dim, ignore_index=ignore_index)
    check_positive_int("mc_samples", mc_samples)
    opts = dict(mc_samples=mc_samples, generator=generator)
    if quantity == "trace":
        def compute(x, y, offset):
            return _trace(model, x, y, kind, lik, params, opts, offset)
    elif v is None:
        raise TypeError("v: quantity='quad' needs a direction v over the selected parameters")
    elif isinstance(v, str):
        check_choice("v", v, ("predicted",))

        def compute(x, y, offset):
            return _quad_predicted(model, x, y, kind, lik, params, opts, offset)
    else:
        fm = FunctionalModel(model, params)
        V, single = fm.vectors(v)

        def compute(x, y, offset):
            total = _quad(fm, x, y, kind, lik, V, opts, offset)
            return total[:, 0] if single else total

    def measure(x, y, offset):
        check_inputs(model, x)
        if x.shape[0] == 0:
            raise ValueError("x: the batch is empty")
        return compute(x, y, offset)

    return measure


def _trace(model, x, y, kind, lik, params, opts, offset) -> torch.Tensor:
    """[N]: tr(F_n) from the capture engine's per-parameter terms, the cotangents a chunk at a time."""
    with Capture(model, params) as cap, torch.no_grad():
        out = checked_output(cap.forward(x), offset)
        cot = Cotangents(lik, out, y, kind, **opts)
        step = cotangent_step(*footprint(cap.uses, out), x.shape[0], cot.K, _CHUNK_BYTES)
        # the sum over parameters and cotangent chunks in the accumulation dtype (float32 for a half model
        # or under autocast), like every term's sq_norms
        total = out.new_zeros(x.shape[0], dtype=accumulation_dtype(cap.params[0][1].dtype, out.dtype))
        for k0 in range(0, cot.K, step):
            k1 = min(cot.K, k0 + step)
            wk = cot.weights[k0:k1]
            for term in cap.backward(out, cot.chunk(k0, k1), last=k1 == cot.K):
                if term is not None:
                    total += term.sq_norms(wk)
        return total


def _quad_predicted(model, x, y, kind, lik, params, opts, offset) -> torch.Tensor:
    """[N]: v_nᵀ F_n v_n along each input's predicted-class direction, from one backward pass of the kind's
    K cotangents and u_n = e_ŷ − p_n together (their per-sample Gram; module docstring)."""
    with Capture(model, params) as cap, torch.no_grad():
        out = checked_output(cap.forward(x), offset)
        if lik.name != "cross_entropy" or out.dim() != 2:
            raise ValueError(f"v: 'predicted' needs a classifier's logits [N, C] under cross entropy, got outputs "
                             f"{tuple(out.shape)} under {lik.name!r}")
        cot = Cotangents(lik, out, y, kind, **opts)
        p = out.softmax(1)
        u = torch.zeros_like(p).scatter_(1, p.argmax(1, keepdim=True), 1.0) - p     # ∇_logits log p_ŷ
        gram = 0
        for term in cap.backward(out, torch.cat([cot.all(), u[None]])):
            if term is not None:
                gram = gram + term.gram()                                         # [N, K + 1, K + 1]
        if not isinstance(gram, torch.Tensor):  # no selected parameter reaches the outputs
            return out.new_zeros(x.shape[0], dtype=accumulation_dtype(out.dtype))
        uk, uu = gram[:, -1, :-1], gram[:, -1, -1]
        # in the Gram's accumulation dtype, elementwise (no autocast GEMM): float16 would overflow here
        return (uk ** 2 * cot.weights.to(gram.dtype)).sum(1) / uu.clamp_min(torch.finfo(uu.dtype).tiny)


def _quad(fm: FunctionalModel, x, y, kind, lik, V, opts, offset) -> torch.Tensor:
    """[N, K]: Σ_k w_k (c_nkᵀ J_n v)² for every row v of V [K, P], J_n v by one forward-mode JVP each; the
    cotangents (MC labels included) are drawn once for all K."""
    primals = tuple(p.detach() for p in fm.params)

    def outputs(*ps):
        return functional_call(fm.model, dict(zip(fm.names, ps)), (x,))

    with torch.no_grad(), curvature_forward(fm.model):
        if torch.is_autocast_enabled(x.device.type):
            out, Jv = _jvp_by_double_vjp(fm, x, V, offset)
        else:
            pairs = [jvp(outputs, primals, tuple(fm.unflat(row))) for row in V]
            out = checked_output(pairs[0][0], offset)  # before the tangents are stacked: they are outputs too
            Jv = torch.stack([tangent for _, tangent in pairs])                        # [K, N, ...]
        cot = Cotangents(lik, out, y, kind, **opts)
        acc = accumulation_dtype(Jv.dtype)   # the dots and their squares: float32 for a half model
        total = Jv.new_zeros(x.shape[0], V.shape[0], dtype=acc)
        with torch.autocast(x.device.type, enabled=False):   # the Fisher's arithmetic, not the model's
            for k0 in range(0, cot.K, 64):
                k1 = min(cot.K, k0 + 64)
                c = cot.chunk(k0, k1)
                dots = torch.einsum("cne,kne->ckn", c.flatten(2).to(acc), Jv.flatten(2).to(acc))  # c_nkᵀ J_n v
                total += torch.einsum("c,ckn->nk", cot.weights[k0:k1].to(acc), dots ** 2)
        return total


def _jvp_by_double_vjp(fm: FunctionalModel, x, V, offset) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, J v [K, N, ...] for every row v of V) by J v = ∂(Jᵀu)/∂u · v, every row sharing one graph:
    under autocast, torch's forward-mode AD mixes tangent and autocast dtypes in some models (an in-place
    addition after a convolution) and fails, where reverse mode runs."""
    leaves = fm.leaves()
    with torch.enable_grad():
        out = fm.outputs(x, dict(zip(fm.names, leaves)), offset)
        u = torch.zeros_like(out, requires_grad=True)
        Ju = torch.autograd.grad(out, leaves, u, create_graph=True, allow_unused=True)
        Jv = torch.stack([grads(Ju, [u], fm.unflat(row), retain_graph=True)[0] for row in V])
    return out.detach(), Jv
