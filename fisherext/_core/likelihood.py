r"""Likelihoods: the output-space loss Hessian of each and the output cotangents of each Fisher kind.

The per-sample loss is the negative log-likelihood :math:`\ell_n = -\log p(y_n \mid z_n)` of the model
output :math:`z_n = f(x_n;\theta)`. Its Hessian in output space is :math:`\Lambda_n = \nabla^2_z \ell_n`,
and :math:`F_n = \sum_k w_k\, J_n^\top c_{nk} c_{nk}^\top J_n` with output cotangents :math:`c_k` chosen
by the kind: the columns of a square root of :math:`\Lambda_n` ("true"), the residual
:math:`\nabla_z \ell(z_n, y)` at the data label ("empirical"), or at M labels drawn from the model,
:math:`w_m = 1/M` ("mc"). One class per likelihood (``likelihood`` builds it from a name or a torch loss);
``Likelihood.at(out, y)`` binds one batch's outputs, and its ``sqrt_columns``, ``hessian_product``,
``sample`` and ``residual`` are the four pieces every engine uses.

- ``"cross_entropy"`` (:class:`CrossEntropy`): softmax over a class axis. Outputs [N, C], or with extra
  axes (positions, pixels) [N, T, C] (class axis last: a language model) or [N, C, H, W] (class axis 1:
  segmentation); ``class_dim`` names it, and when it is None it is read off the labels (the output
  shape without the class axis is the labels' shape). With extra axes the positions are independent
  given x and the per-sample log-likelihood is the **sum** over positions,
  :math:`\log p(y_n|x_n) = \sum_t \log p(y_{nt}|x_n)`; positions whose label is ``ignore_index`` are
  left out (they contribute nothing, and a sample counts in N whatever its valid positions).
  :math:`\Lambda = \mathrm{diag}(p) - pp^\top = SS^\top` at every position (no cross terms between
  positions), :math:`S_{:,c} = \sqrt{p_c}(e_c - p)`: one column per (position, class), K = T·C, each
  nonzero at its own position only; :math:`\Lambda u = p\odot u - p(p^\top u)` by the fused kernel;
  residual :math:`p - e_y`.
- ``"mse"`` (:class:`Gaussian`): unit variance over every output entry, :math:`\ell = \tfrac12\|z - y\|^2`:
  :math:`\Lambda = I` (K = the entries per sample, one-hot columns), residual :math:`z - y`, labels
  :math:`y = z + \epsilon`, :math:`\epsilon \sim N(0, I)`.
- ``"bce"`` (:class:`Bernoulli`): an independent Bernoulli of logit :math:`z_e` per output entry,
  :math:`\ell = \sum_e \mathrm{BCE}(\sigma(z_e), y_e)` (``F.binary_cross_entropy_with_logits`` summed
  over the entries): :math:`\Lambda = \mathrm{diag}(\sigma(z)(1 - \sigma(z)))`, residual
  :math:`\sigma(z) - y`, labels :math:`y_e \sim \mathrm{Bernoulli}(\sigma(z_e))`.

Called as a loss (the curvature of a name: ``hvp``, the Hessian and GGN operators, influence), a
likelihood is its torch loss with ``reduction="mean"``: ``F.cross_entropy`` over the class axis (the mean
over the positions that count; for [N, C] logits with every label counted, the mean NLL
:math:`\frac1N\sum_n \ell_n`), ``F.mse_loss`` (the mean over the N·E entries of :math:`(z - y)^2`,
i.e. :math:`\frac{2}{NE}\sum_n \ell_n`) or ``F.binary_cross_entropy_with_logits`` (:math:`\frac{1}{NE}
\sum_n \ell_n`), so a name and its torch loss give the same curvature.
Cotangents are generated a chunk of k at a time (``Cotangents.chunk``), so K = T·C never has to be
held at once.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import ops
from .checks import check_choice
from .functional import grads

KINDS = ("true", "empirical", "mc")
LOSSES = ("cross_entropy", "mse", "bce")


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


class Likelihood:
    """A per-sample likelihood p(y | z) of the model output z (module docstring). Unbound it is a loss,
    ``lik(out, y)`` = its torch loss with reduction="mean"; ``at(out, y)`` binds a batch."""

    name: str

    def at(self, out: torch.Tensor, y) -> Likelihood:
        """This likelihood bound to one batch's outputs ``out`` [N, ...] (detached) and targets ``y``."""
        bound = copy.copy(self)
        bound.out, bound.y = out.detach(), y
        bound.bind()
        return bound

    def bind(self) -> None:
        """Per-batch state computed once from ``self.out`` and ``self.y``."""

    def __call__(self, out: torch.Tensor, y) -> torch.Tensor:
        """The batch's loss as its torch loss with reduction="mean" computes it, differentiable in ``out``."""
        raise NotImplementedError

    # ---- on a bound batch ---------------------------------------------------------------------------

    @property
    def num_columns(self) -> int:
        """K, the columns of the square root of Λ_n per sample."""
        return self.out[0].numel()

    def sqrt_columns(self, k0: int, k1: int) -> torch.Tensor:
        """Columns k0..k1 of the square root of Λ_n, every sample at once: [k1 - k0, *out.shape]."""
        raise NotImplementedError

    def hessian_product(self, U: torch.Tensor) -> torch.Tensor:
        """Λ_n u_n for every sample n and every one of the K directions U [K, *out.shape]: [K, *out.shape]."""
        raise NotImplementedError

    def mean_denominator(self) -> float:
        """d, with the batch's mean loss (``__call__``) = Σ_n ℓ_n / d."""
        return self.out.numel()

    def sample(self, M: int, generator) -> torch.Tensor:
        """M label sets drawn from the model's predictive distribution, in ``residual``'s layout."""
        raise NotImplementedError

    def data_labels(self) -> torch.Tensor:
        """The data labels of the batch in ``residual``'s layout, [1, ...]; ValueError when y has none."""
        raise NotImplementedError

    def residual(self, labels: torch.Tensor) -> torch.Tensor:
        """∇_z ℓ(z_n, y) at each of the M label sets ``labels``: [M, *out.shape]."""
        raise NotImplementedError


class CrossEntropy(Likelihood):
    """Softmax over a class axis (module docstring): ``class_dim`` (None: read off the labels) and
    ``ignore_index`` (the label of positions that do not count)."""

    name = "cross_entropy"

    def __init__(self, class_dim: int | None = None, ignore_index: int = -100):
        self.class_dim, self.ignore_index = class_dim, ignore_index

    def __call__(self, out, y):
        axis = class_axis(out, y, self.class_dim)
        return nn.functional.cross_entropy(out.movedim(axis, 1), y, ignore_index=self.ignore_index)

    def bind(self):
        out = self.out
        self.axis = class_axis(out, self.y, self.class_dim)
        rows = out.movedim(self.axis, -1)
        self.moved_shape = rows.shape
        self.C = rows.shape[-1]
        self.rows = rows.reshape(out.shape[0], -1, self.C)                  # [N, T, C]
        self.labels = self._labels(strict=False)
        valid = None if self.labels is None else (self.labels != self.ignore_index)
        self.valid = None if valid is None or bool(valid.all()) else valid   # None: every position counts

    def _labels(self, strict: bool):
        """Class labels [N, T] (moved like the outputs) when y holds them; None when it does not (an
        error when ``strict``: the data labels were asked for)."""
        y, out, axis = self.y, self.out, self.axis
        want = tuple(out.shape[:axis] + out.shape[axis + 1:])
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or tuple(y.shape) != want:
            if not strict:
                return None
            if y is None:
                raise ValueError("data: kind='empirical' needs labels y")
            raise ValueError(f"data: labels y must be an integer tensor of shape {list(want)}, got "
                             f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
        counted = y[y != self.ignore_index]
        if counted.numel() and (counted.min() < 0 or counted.max() >= self.C):
            raise ValueError(f"data: labels must lie in [0, {self.C}) (or equal ignore_index={self.ignore_index}), "
                             f"got [{int(counted.min())}, {int(counted.max())}]")
        return y.reshape(self.rows.shape[:2])  # the other axes keep their order when the class axis moves last

    def _masked(self, c):
        """c [..., N, T, C] with the ignored positions zeroed."""
        return c if self.valid is None else c * self.valid[..., None].to(c.dtype)

    def _restore(self, c):
        """[k, N, T, C] in the moved layout -> [k, *out.shape]."""
        return c.reshape(c.shape[0], *self.moved_shape).movedim(-1, self.axis + 1)

    def sqrt_columns(self, k0, k1):
        N, T, C = self.rows.shape
        if T == 1:  # one position: the square-root columns themselves
            return self._restore(self._position_columns(0, k0, k1)[:, :, None])
        c = self.rows.new_zeros(k1 - k0, N, T, C)
        for t in range(k0 // C, (k1 - 1) // C + 1):
            lo, hi = max(k0, t * C), min(k1, (t + 1) * C)
            c[lo - k0:hi - k0, :, t] = self._position_columns(t, lo - t * C, hi - t * C)
        return self._restore(c)

    def _position_columns(self, t, c0, c1):
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

    def mean_denominator(self):
        """The positions that count."""
        return self.rows.shape[0] * self.rows.shape[1] if self.valid is None else int(self.valid.sum())

    def hessian_product(self, U):
        """p⊙u − p(pᵀu) at every position by the fused kernel, 0 where ignored."""
        N, T, C = self.rows.shape
        rows = U.movedim(self.axis + 1, -1).reshape(-1, N * T, C)
        HU = self._masked(ops.softmax_hvp(self.rows.reshape(N * T, C), rows).view(-1, N, T, C))
        return self._restore(HU)

    def sample(self, M, generator):
        N, T, C = self.rows.shape
        p = torch.softmax(self.rows, -1)
        drawn = torch.multinomial(p.reshape(-1, C), M, replacement=True, generator=generator)
        return drawn.T.reshape(M, N, T)

    def data_labels(self):
        return (self._labels(strict=True) if self.labels is None else self.labels)[None]

    def residual(self, labels):
        target = labels if self.valid is None else torch.where(self.valid, labels, 0)
        p = torch.softmax(self.rows, -1)
        return self._restore(self._masked(p[None] - nn.functional.one_hot(target, self.C).to(p.dtype)))


class _Elementwise(Likelihood):
    """A likelihood independent over the output entries, with targets y of the outputs' shape."""

    def _targets(self, y, out):
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(out.shape):
            raise ValueError(f"data: loss={self.name!r} needs targets y of shape {tuple(out.shape)}, got "
                             f"{type(y).__name__ if y is None else tuple(getattr(y, 'shape', ()))}")
        return y.to(out.dtype)

    def data_labels(self):
        return self._targets(self.y, self.out)[None]

    def sqrt_columns(self, k0, k1):
        """Column e of diag(√λ): √λ_e at entry e, zero elsewhere."""
        N, E = self.out.shape[0], self.num_columns
        eye = torch.eye(E, dtype=self.out.dtype, device=self.out.device)[k0:k1]
        columns = eye[:, None, :] * self.root().reshape(1, N, E)
        return columns.reshape(k1 - k0, *self.out.shape)

    def root(self) -> torch.Tensor:
        """√diag(Λ) [*out.shape] (broadcastable)."""
        raise NotImplementedError


class Gaussian(_Elementwise):
    """Unit-variance Gaussian over every output entry, ℓ = ½‖z − y‖² (module docstring)."""

    name = "mse"

    def __call__(self, out, y):
        return nn.functional.mse_loss(out, self._targets(y, out))

    def mean_denominator(self):
        """F.mse_loss is the mean of (z − y)² = 2ℓ over the entries."""
        return self.out.numel() / 2

    def root(self):
        return self.out.new_ones(1).expand(self.out.shape)

    def hessian_product(self, U):
        return U

    def sample(self, M, generator):
        out = self.out
        return out + torch.randn(M, *out.shape, dtype=out.dtype, device=out.device, generator=generator)

    def residual(self, labels):
        return self.out[None] - labels


class Bernoulli(_Elementwise):
    """An independent Bernoulli of logit z_e per output entry (module docstring)."""

    name = "bce"

    def __call__(self, out, y):
        return nn.functional.binary_cross_entropy_with_logits(out, self._targets(y, out))

    def bind(self):
        self.p = torch.sigmoid(self.out)

    def root(self):
        return (self.p * (1 - self.p)).sqrt()

    def hessian_product(self, U):
        return self.p * (1 - self.p) * U

    def sample(self, M, generator):
        return torch.bernoulli(self.p.expand(M, *self.p.shape), generator=generator)

    def residual(self, labels):
        return self.p[None] - labels


class Cotangents:
    """The cotangents c_k [K, *out.shape] and weights w_k [K] of a Fisher kind for one batch's outputs
    (module docstring), generated ``chunk(k0, k1)`` at a time."""

    def __init__(self, lik: Likelihood, out: torch.Tensor, y, kind: str, *, mc_samples: int = 1, generator=None):
        self.bound = lik.at(out, y)
        # weights at least in float32: 1/M rounded to bfloat16 (1/3 -> 0.334) would bias every sum they weight
        dtype = torch.promote_types(out.dtype, torch.float32)

        def ones(k):
            return torch.ones(k, dtype=dtype, device=out.device)

        if kind == "true":
            self.K = self.bound.num_columns
            self.weights, self._all = ones(self.K), None
        elif kind == "empirical":
            self._all = self.bound.residual(self.bound.data_labels())
            self.K, self.weights = 1, ones(1)
        else:
            self._all = self.bound.residual(self.bound.sample(mc_samples, generator))
            self.K, self.weights = mc_samples, ones(mc_samples) / mc_samples

    def chunk(self, k0: int, k1: int) -> torch.Tensor:
        """c_k for k in [k0, k1): [k1 - k0, *out.shape]."""
        return self.bound.sqrt_columns(k0, k1) if self._all is None else self._all[k0:k1]

    def all(self) -> torch.Tensor:
        return self.chunk(0, self.K)


# ---- from names and torch losses ------------------------------------------------------------------

_FUNCTIONS = {nn.functional.cross_entropy: "cross_entropy", nn.functional.mse_loss: "mse",
              nn.functional.binary_cross_entropy_with_logits: "bce"}
_MODULES = {nn.CrossEntropyLoss: "cross_entropy", nn.MSELoss: "mse", nn.BCEWithLogitsLoss: "bce"}
_NEEDS = ("a Fisher needs a likelihood: a name ('cross_entropy', 'mse', 'bce') or F.cross_entropy, "
          "nn.CrossEntropyLoss(), F.mse_loss, nn.MSELoss(), F.binary_cross_entropy_with_logits, "
          "nn.BCEWithLogitsLoss()")


def as_likelihood(loss, *, class_dim: int | None = None, ignore_index: int | None = None) -> Likelihood:
    """The likelihood of a name or a torch loss (function or module; its reduction does not change the
    likelihood). Torch losses that are no likelihood of the outputs (class weights, label smoothing,
    ``pos_weight``, any other callable) are refused, naming ``loss``. ``class_dim`` and ``ignore_index``
    (None: that of an ``nn.CrossEntropyLoss``, else -100) apply to cross-entropy only."""
    if isinstance(loss, str):
        check_choice("loss", loss, LOSSES)
        name = loss
    elif not callable(loss):
        raise TypeError(f"loss: expected a likelihood's name or a torch loss, got {type(loss).__name__}")
    else:
        name = _FUNCTIONS.get(loss) if not isinstance(loss, nn.Module) else _MODULES.get(type(loss))
        if name is None:
            raise ValueError(f"loss: {_NEEDS}, got {loss!r}")
        for attr in ("weight", "pos_weight", "label_smoothing"):
            value = getattr(loss, attr, None)
            if value is not None and not (isinstance(value, float) and value == 0.0):
                raise ValueError(f"loss: {type(loss).__name__}({attr}=...) is not the likelihood of the outputs; "
                                 f"{_NEEDS}")
    if name != "cross_entropy":
        for arg, value in (("class_dim", class_dim), ("ignore_index", ignore_index)):
            if value is not None:
                raise ValueError(f"{arg}: applies to loss='cross_entropy' only, got {value!r} with loss={name!r}")
        return Gaussian() if name == "mse" else Bernoulli()
    own = loss.ignore_index if isinstance(loss, nn.CrossEntropyLoss) else None
    if own is not None and ignore_index is not None and ignore_index != own:
        raise ValueError(f"ignore_index: {ignore_index} differs from the loss's ignore_index={own}")
    index = next(i for i in (ignore_index, own, -100) if i is not None)
    return CrossEntropy(class_dim, index)


def curvature_loss(loss):
    """The loss whose Hessian or Gauss-Newton matrix is taken: a name gives its likelihood (which computes
    its torch loss with reduction="mean"), a torch loss is used as it is, with its reduction."""
    if isinstance(loss, str):
        return as_likelihood(loss)
    if not callable(loss):
        raise TypeError("loss: expected a likelihood's name or a torch loss loss(outputs, targets) -> batch-mean "
                        f"loss (a function or module), got {loss!r}")
    return loss


def is_cross_entropy(loss) -> bool:
    """Mean softmax cross-entropy over class logits, whose output-space Hessian has the fused kernel."""
    if loss is nn.functional.cross_entropy:
        return True
    return (isinstance(loss, nn.CrossEntropyLoss) and loss.reduction == "mean" and loss.weight is None
            and loss.label_smoothing == 0.0)


def _fused_labels(loss, out, y) -> bool:
    """Whether the fused softmax Hessian is exact for a torch loss: cross-entropy on [N, C] logits with
    class labels that all count (an ignored label, -100 or the module's ignore_index, would change the
    mean's denominator)."""
    ignored = loss.ignore_index if isinstance(loss, nn.CrossEntropyLoss) else -100
    return (is_cross_entropy(loss) and out.dim() == 2 and isinstance(y, torch.Tensor)
            and not y.is_floating_point() and y.dim() == 1 and bool(((y >= 0) & (y != ignored)).all()))


def output_hessian_product(loss, out: torch.Tensor, y, U: torch.Tensor) -> torch.Tensor:
    """∇²_z loss(z, y) at z = out applied to U [K, *out.shape] (the batch-mean loss's Hessian).

    A likelihood: its own Λ·u over the denominator of its mean (softmax: the fused kernel). A torch
    cross-entropy with every label counted: the fused kernel. Any other loss: double backprop of ``loss`` in z, one backward per vector through the
    small output-space graph. (torch.func's jvp-of-grad fails inside torch's own losses: ``mse_loss``'s
    backward writes into the ZeroTensor tangent of the target.)"""
    if isinstance(loss, Likelihood):
        bound = loss.at(out, y)
        return bound.hessian_product(U) / bound.mean_denominator()
    if _fused_labels(loss, out, y):
        return ops.softmax_hvp(out, U) / out.shape[0]
    z = out.detach().requires_grad_()
    with torch.enable_grad():
        g = grads([loss(z, y)], [z], [None], retain_graph=True, create_graph=True)
        return torch.stack([grads(g, [z], [u], retain_graph=k < U.shape[0] - 1)[0] for k, u in enumerate(U)])
