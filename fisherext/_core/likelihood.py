r"""Likelihoods and the output cotangents of each Fisher kind.

The per-sample loss is the negative log-likelihood :math:`\ell_n = -\log p(y_n \mid x_n, \theta)` of
the model output :math:`z_n = f(x_n;\theta)`, and :math:`F_n = \sum_k w_k\, J_n^\top c_{nk} c_{nk}^\top J_n`
with output cotangents :math:`c_k` chosen by the kind:

- ``loss="cross_entropy"``: softmax over a class axis. Outputs [N, C], or with extra axes (positions,
  pixels) [N, T, C] (class axis last: a language model) or [N, C, H, W] (class axis 1: segmentation);
  ``class_dim`` names it, and when it is None it is read off the labels (the output shape without the
  class axis is the labels' shape). With extra axes the positions are independent given x and the
  per-sample log-likelihood is the **sum** over positions, :math:`\log p(y_n|x_n) = \sum_t \log p(y_{nt}|x_n)`;
  positions whose label is ``ignore_index`` are left out (they contribute nothing, and a sample counts
  in N whatever its valid positions).

  - "true": :math:`F_n = \sum_t J_{nt}^\top \Lambda_{nt} J_{nt}` (no cross terms between positions: the
    expected score of each position is zero), :math:`\Lambda = \mathrm{diag}(p) - pp^\top = SS^\top`,
    :math:`S_{:,c} = \sqrt{p_c}(e_c - p)`: one cotangent per (position, class), K = T·C, each nonzero at
    its own position only;
  - "empirical": :math:`c = p - e_y` at every position (K = 1);
  - "mc": :math:`c_m = p - e_{y_m}`, a label drawn per position from the model, :math:`w_m = 1/M`.
- ``loss="mse"``: Gaussian with unit variance over every output entry, :math:`\ell = \tfrac12\|z - y\|^2`:
  "true" :math:`\Lambda = I` (K = the entries per sample, one-hot cotangents), "empirical" :math:`c = z - y`,
  "mc" :math:`c_m = -\epsilon_m`, :math:`\epsilon_m \sim N(0, I)`.

Cotangents are generated a chunk of k at a time (``Cotangents.chunk``), so K = T·C never has to be
held at once.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .checks import check_choice
from .functional import grads

KINDS = ("true", "empirical", "mc")
LOSSES = ("cross_entropy", "mse")


def class_axis(out: torch.Tensor, y, class_dim) -> int:
    """The class axis of cross-entropy outputs ``out`` [N, ...] (see the module docstring)."""
    d = out.dim()
    if d < 2:
        raise ValueError(f"model: cross_entropy needs outputs [N, C] (or [N, T, C], [N, C, H, W]), got "
                         f"{tuple(out.shape)}")
    if class_dim is not None:
        if isinstance(class_dim, bool) or not isinstance(class_dim, int) or not (-d < class_dim < d) \
                or class_dim % d == 0:
            raise ValueError(f"class_dim: must name a non-batch axis of the outputs {tuple(out.shape)}, got "
                             f"{class_dim!r}")
        return class_dim % d
    if d == 2:
        return 1
    labels = y if isinstance(y, torch.Tensor) and not y.is_floating_point() else None
    fits = [a for a in sorted({1, d - 1}) if labels is not None
            and tuple(labels.shape) == tuple(out.shape[:a] + out.shape[a + 1:])]
    if len(fits) == 1:
        return fits[0]
    shape = tuple(out.shape)
    if len(fits) == 2:
        raise ValueError(f"class_dim: outputs {shape} with labels {tuple(labels.shape)} fit both class_dim=1 "
                         "and class_dim=-1; pass it")
    if labels is None:
        raise ValueError(f"class_dim: outputs {shape} have several axes after the batch axis; pass class_dim=-1 "
                         "([N, T, C], a language model) or class_dim=1 ([N, C, H, W], segmentation), or labels")
    raise ValueError(f"data: labels of shape {tuple(labels.shape)} fit outputs {shape} with neither class_dim=1 "
                     "nor class_dim=-1")


class Cotangents:
    """The cotangents c_k [K, *out.shape] and weights w_k [K] of a Fisher kind for one batch's outputs
    (module docstring), generated ``chunk(k0, k1)`` at a time."""

    def __init__(self, out: torch.Tensor, y, kind: str, loss: str, *, mc_samples: int = 1, generator=None,
                 class_dim=None, ignore_index: int = -100):
        out = out.detach()
        self.shape, self.kind, self.loss = out.shape, kind, loss
        N = out.shape[0]
        ones = out.new_ones
        if loss == "cross_entropy":
            axis = class_axis(out, y, class_dim)
            self.axis = axis
            rows = out.movedim(axis, -1)
            self.moved_shape = rows.shape
            C = rows.shape[-1]
            rows = rows.reshape(N, -1, C)                                    # [N, T, C]
            labels = _labels(y, rows.shape[:2], out, axis, kind, ignore_index)
            valid = None if labels is None else (labels != ignore_index)
            if valid is not None and bool(valid.all()):
                valid = None                                                 # every position counts
            if kind == "empirical" and labels is None:
                raise ValueError("data: kind='empirical' needs labels y")
            self.rows, self.valid, self.C = rows, valid, C
            if kind == "true":
                self.K, self.weights = rows.shape[1] * C, ones(rows.shape[1] * C)
            elif kind == "empirical":
                p = torch.softmax(rows, -1)
                target = nn.functional.one_hot(labels if valid is None else torch.where(valid, labels, 0), C).to(p.dtype)
                self._all = self._masked(p - target)[None]
                self.K, self.weights = 1, ones(1)
            else:
                p = torch.softmax(rows, -1)
                drawn = torch.multinomial(p.reshape(-1, C), mc_samples, replacement=True, generator=generator)
                target = nn.functional.one_hot(drawn.T.reshape(mc_samples, *rows.shape[:2]), C).to(p.dtype)
                self._all = self._masked(p[None] - target)
                self.K, self.weights = mc_samples, ones(mc_samples) / mc_samples
            return
        flat = out.reshape(N, -1)
        self.E = flat.shape[1]
        if kind == "true":
            self.K, self.weights = self.E, ones(self.E)
        elif kind == "empirical":
            if not isinstance(y, torch.Tensor) or y.shape != out.shape:
                raise ValueError(f"data: loss='mse' needs targets y of shape {tuple(out.shape)}")
            self._all = (out - y.to(out.dtype))[None]
            self.K, self.weights = 1, ones(1)
        else:
            noise = torch.randn(mc_samples, *out.shape, dtype=out.dtype, device=out.device, generator=generator)
            self._all = -noise
            self.K, self.weights = mc_samples, ones(mc_samples) / mc_samples

    def _masked(self, c):
        return c if self.valid is None else c * self.valid[..., None].to(c.dtype)

    def _restore(self, c):
        """[k, N, T, C] in moved layout -> [k, *out.shape]."""
        return c.reshape(c.shape[0], *self.moved_shape).movedim(-1, self.axis + 1)

    def chunk(self, k0: int, k1: int) -> torch.Tensor:
        """c_k for k in [k0, k1): [k1 - k0, *out.shape]."""
        if self.kind != "true":
            c = self._all[k0:k1]
            return self._restore(c) if self.loss == "cross_entropy" else c
        if self.loss == "mse":
            eye = torch.eye(self.E, dtype=self.weights.dtype, device=self.weights.device)[k0:k1]
            return eye[:, None, :].expand(k1 - k0, self.shape[0], self.E).reshape(k1 - k0, *self.shape)
        N, T, C = self.rows.shape
        if T == 1:  # one position: the square-root columns themselves
            return self._restore(self._columns(0, k0, k1)[:, :, None])
        c = self.rows.new_zeros(k1 - k0, N, T, C)
        for t in range(k0 // C, (k1 - 1) // C + 1):
            lo, hi = max(k0, t * C), min(k1, (t + 1) * C)
            c[lo - k0:hi - k0, :, t] = self._columns(t, lo - t * C, hi - t * C)
        return self._restore(c)

    def _columns(self, t, c0, c1):
        """Columns c0..c1 of the square root of Λ at position t: [c1 - c0, N, C], zero where ignored. All C
        by the fused kernel; a part by S_c = √p_c (e_c − p), so a chunk costs its own size, not N·C²."""
        logits = self.rows[:, t].contiguous()
        if (c0, c1) == (0, self.C):
            S = ops.softmax_hessian_sqrt(logits)
        else:
            p = torch.softmax(logits, -1)
            root = p[:, c0:c1].sqrt().T                                   # [k, N]
            S = -root[:, :, None] * p[None]
            S[torch.arange(c1 - c0), :, torch.arange(c0, c1)] += root
        return S if self.valid is None else S * self.valid[:, t, None].to(S.dtype)

    def all(self) -> torch.Tensor:
        return self.chunk(0, self.K)


def _labels(y, NT, out, axis, kind, ignore_index):
    """Class labels [N, T] (moved like the outputs) when y holds them; None when y is absent (or, for the
    true Fisher, which needs no labels, when y is not a label tensor of the outputs' shape)."""
    want = tuple(out.shape[:axis] + out.shape[axis + 1:])
    C = out.shape[axis]
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or tuple(y.shape) != want:
        if kind == "empirical" and y is not None:
            raise ValueError(f"data: labels y must be an integer tensor of shape {list(want)}, got "
                             f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
        return None
    counted = y[y != ignore_index]
    if counted.numel() and (counted.min() < 0 or counted.max() >= C):
        raise ValueError(f"data: labels must lie in [0, {C}) (or equal ignore_index={ignore_index}), got "
                         f"[{int(counted.min())}, {int(counted.max())}]")
    return y.reshape(NT)  # the outputs' other axes keep their order when the class axis moves last


# ---- torch losses -------------------------------------------------------------------------------

def is_cross_entropy(loss_fn) -> bool:
    """Mean softmax cross-entropy over class logits, whose output-space Hessian has the fused kernel."""
    if loss_fn is nn.functional.cross_entropy:
        return True
    return (isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.reduction == "mean" and loss_fn.weight is None
            and loss_fn.label_smoothing == 0.0)


def ignore_index_of(loss_fn) -> int:
    return loss_fn.ignore_index if isinstance(loss_fn, nn.CrossEntropyLoss) else -100


def likelihood(loss_fn) -> str:
    """The likelihood a Fisher needs, named as in ``fisherext.fisher``: from a name or a torch loss."""
    if isinstance(loss_fn, str):
        check_choice("loss_fn", loss_fn, LOSSES)
        return loss_fn
    if is_cross_entropy(loss_fn):
        return "cross_entropy"
    if loss_fn is nn.functional.mse_loss or isinstance(loss_fn, nn.MSELoss):
        return "mse"
    raise ValueError("loss_fn: a Fisher needs a likelihood: 'cross_entropy' or 'mse' (or F.cross_entropy, "
                     f"nn.CrossEntropyLoss(), F.mse_loss, nn.MSELoss()), got {loss_fn!r}")


def _fused_labels(loss_fn, out, y) -> bool:
    """Whether the fused softmax Hessian is exact here: cross-entropy on [N, C] logits with class labels
    that all count (an ignored label, -100 or the module's ignore_index, would change the mean's
    denominator)."""
    return (is_cross_entropy(loss_fn) and out.dim() == 2 and isinstance(y, torch.Tensor)
            and not y.is_floating_point() and y.dim() == 1
            and bool(((y >= 0) & (y != ignore_index_of(loss_fn))).all()))


def output_hessian_product(loss_fn, out: torch.Tensor, y, U: torch.Tensor) -> torch.Tensor:
    """∇²_z loss_fn(z, y) at z = out applied to U [K, *out.shape] (the batch-mean loss's Hessian).

    Any loss other than the fused cross-entropy: double backprop of ``loss_fn`` in z, one backward per
    vector through the small output-space graph. (torch.func's jvp-of-grad fails inside torch's own
    losses: ``mse_loss``'s backward writes into the ZeroTensor tangent of the target.)"""
    if _fused_labels(loss_fn, out, y):
        return ops.softmax_hvp(out, U) / out.shape[0]
    z = out.detach().requires_grad_()
    with torch.enable_grad():
        g = grads([loss_fn(z, y)], [z], [None], retain_graph=True, create_graph=True)
        return torch.stack([grads(g, [z], [u], retain_graph=k < U.shape[0] - 1)[0] for k, u in enumerate(U)])
