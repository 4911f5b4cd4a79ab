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
from .._core.entry import entry_point
from .._core.functional import FunctionalModel
from .._core.likelihood import KINDS, Cotangents, as_likelihood
from .._core.types import Loss, Params
from .accumulate import cotangent_step, footprint
from .engine import Capture

QUANTITIES = ("trace", "quad")
_CHUNK_BYTES = 1 << 26


@entry_point(renamed={"loss_fn": "loss"})
def per_sample_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, kind: str = "true",
                      quantity: str = "trace", v: torch.Tensor | None = None, loss: Loss = "cross_entropy",
                      params: Params = None, mc_samples: int = 1, generator: torch.Generator | None = None,
                      class_dim: int | None = None, ignore_index: int | None = None) -> torch.Tensor:
    r""":math:`\mathrm{tr}(F_n)` or :math:`v^\top F_n v` for every input n of the batch ``x``.

    :math:`F_n` is input n's own Fisher (not divided by N; ``fisherext.fisher`` is their mean
    :math:`\frac1N\sum_n F_n`), of the kind and likelihood given (the math: :mod:`fisherext.capture.measures`).

    Args:
        model: a module mapping inputs x [N, ...] to outputs (logits [N, C], [N, T, C], [N, C, H, W], or
            regression outputs).
        x: the inputs [N, ...], one batch.
        y: the targets; needed for kind="empirical" (and they name the class axis and the ignored
            positions of outputs with positions, as in ``fisherext.fisher``).
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

    Returns:
        Tensor [N] (trace, quad with one direction or ``v="predicted"``) or [N, K] (quad with K
        directions).

    Raises:
        ValueError: an unknown ``kind`` or ``quantity``, a ``loss`` that is no likelihood, an empty
            batch, a ``v`` of the wrong shape or with non-finite entries, labels that do not fit.
        TypeError: quantity="quad" without ``v``, ``v`` not a floating-point tensor, integer inputs.
    """
    check_choice("kind", kind, KINDS)
    check_choice("quantity", quantity, QUANTITIES)
    lik = as_likelihood(loss, class_dim=class_dim, ignore_index=ignore_index)
    check_positive_int("mc_samples", mc_samples)
    check_inputs(model, x)
    if x.shape[0] == 0:
        raise ValueError("x: the batch is empty")
    opts = dict(mc_samples=mc_samples, generator=generator)
    if quantity == "quad":
        if v is None:
            raise TypeError("v: quantity='quad' needs a direction v over the selected parameters")
        if isinstance(v, str):
            check_choice("v", v, ("predicted",))
            return _quad_predicted(model, x, y, kind, lik, params, opts)
        fm = FunctionalModel(model, params)
        V, single = fm.vectors(v)
        total = _quad(fm, x, y, kind, lik, V, opts)
        return total[:, 0] if single else total
    with Capture(model, params) as cap, torch.no_grad():
        out = checked_output(cap.forward(x))
        cot = Cotangents(lik, out, y, kind, **opts)
        step = cotangent_step(*footprint(cap.uses, out), x.shape[0], cot.K, _CHUNK_BYTES)
        total = out.new_zeros(x.shape[0])
        for k0 in range(0, cot.K, step):
            k1 = min(cot.K, k0 + step)
            wk = cot.weights[k0:k1]
            for term in cap.backward(out, cot.chunk(k0, k1), last=k1 == cot.K):
                if term is not None:
                    total += term.sq_norms(wk)
        return total


def _quad_predicted(model, x, y, kind, lik, params, opts) -> torch.Tensor:
    """[N]: v_nᵀ F_n v_n along each input's predicted-class direction, from one backward pass of the kind's
    K cotangents and u_n = e_ŷ − p_n together (their per-sample Gram; module docstring)."""
    with Capture(model, params) as cap, torch.no_grad():
        out = checked_output(cap.forward(x))
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
            return out.new_zeros(x.shape[0])
        uk, uu = gram[:, -1, :-1], gram[:, -1, -1]
        return (uk ** 2 @ cot.weights) / uu.clamp_min(torch.finfo(uu.dtype).tiny)


def _quad(fm: FunctionalModel, x, y, kind, lik, V, opts) -> torch.Tensor:
    """[N, K]: Σ_k w_k (c_nkᵀ J_n v)² for every row v of V [K, P], J_n v by one forward-mode JVP each; the
    cotangents (MC labels included) are drawn once for all K."""
    primals = tuple(p.detach() for p in fm.params)

    def outputs(*ps):
        return functional_call(fm.model, dict(zip(fm.names, ps)), (x,))

    with torch.no_grad(), curvature_forward(fm.model):
        pairs = [jvp(outputs, primals, tuple(fm.unflat(row))) for row in V]
        cot = Cotangents(lik, checked_output(pairs[0][0]), y, kind, **opts)
        Jv = torch.stack([tangent for _, tangent in pairs])                   # [K, N, ...]
        total = Jv.new_zeros(x.shape[0], V.shape[0])
        for k0 in range(0, cot.K, 64):
            k1 = min(cot.K, k0 + 64)
            c = cot.chunk(k0, k1)
            dots = torch.einsum("cne,kne->ckn", c.flatten(2), Jv.flatten(2))   # c_nkᵀ J_n v per (chunk, vector)
            total += torch.einsum("c,ckn->nk", cot.weights[k0:k1], dots ** 2)
        return total
