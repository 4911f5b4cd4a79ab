r"""Curvature of a model's mean loss over a data set as linear operators: Hessian, GGN and Fisher.

Each operator is a ``fisherext.LinearOperator`` over the flat vector of the selected parameters
(``params=``, default all that require grad), so ``A @ v``, ``A @ X`` ([P, K]: K vectors in one pass
over the data), ``A.shape``, ``A.dense()`` and ``A.to_scipy()`` work, and every solver in
``fisherext.linalg.solvers`` and spectral method in ``fisherext.linalg.spectral`` accepts it. Vectors are
columns: ``A @ v`` with v [P] gives [P], ``A @ X`` with X [P, K] gives [P, K]. Products stream over the
data in batches and are normalized by the number of samples (the curvature of the mean loss), whatever
the batching; the math is in ``fisherext.curvature.products``. The model's parameters are read at each product, so an
operator follows the model as it trains; its mode is checked at each product too (``fisherext._core.conventions``:
a model switched to train mode with dropout is refused, not silently sampled). With ``compile=True`` (or a dict of
torch.compile arguments) the per-batch products are those of ``fisherext.curvature.compiled``, compiled at the
first product and reused by the later ones.
"""
from __future__ import annotations

import torch
from torch import nn

from .._core.checks import check_choice, check_positive_int
from .._core.conventions import check_deterministic, curvature_forward
from .._core.data import stream
from .._core.entry import entry_points
from .._core.functional import FunctionalModel
from .._core.likelihood import KINDS, as_likelihood, curvature_loss
from .._core.types import Data, Loss, Params
from ..linalg.linop import LinearOperator
from .compiled import batch_products


class _CurvatureOperator(LinearOperator):
    def __init__(self, model: nn.Module, data, *, params=None, batch_size: int | None = None, progress: bool = False,
                 compile: bool | dict = False, group=None):
        check_positive_int("batch_size", batch_size, optional=True)
        self.products = batch_products(compile)  # compiled: built once, so every product reuses the graphs
        self.fm = FunctionalModel(model, params)
        # products in the accumulation dtype: float32 for a float16/bfloat16 model (each batch's product runs
        # in the model's dtype, their sum over the data in float32; products.py)
        super().__init__(self.fm.P, torch.promote_types(self.fm.dtype, torch.float32), self.fm.device)
        self.data, self.batch_size, self.progress, self.group = data, batch_size, progress, group

    def _batch(self, x, y, V, offset):
        """The product for one batch's mean loss with the rows of V [K, P] (each subclass its own)."""
        raise NotImplementedError

    def _matmat(self, X):
        check_deterministic(self.fm.model)  # the operator follows the model, whose mode may have changed
        V = X.T.contiguous()  # the per-batch products take the vectors as rows
        with curvature_forward(self.fm.model):
            return stream(self.fm.model, self.data, self.batch_size,
                          lambda x, y, offset: self._batch(x, y, V, offset).to(self.dtype),
                          progress=self.progress, desc=type(self).__name__, group=self.group, inputs=V).T


@entry_points(renamed={"loss_fn": "loss"})
class HessianOperator(_CurvatureOperator):
    r"""The Hessian of the mean loss over the data, :math:`H = \nabla^2_\theta \frac1N\sum_n \ell(f(x_n), y_n)`,
    as a linear operator (products by double backprop, as ``fisherext.hvp``). H may be indefinite.

    Args:
        model: maps inputs x [N, ...] to outputs.
        loss: a likelihood's name, "cross_entropy", "mse" or "bce", standing for its torch loss with
            reduction="mean" (``F.cross_entropy`` over the class axis, ``F.mse_loss``,
            ``F.binary_cross_entropy_with_logits``), or a torch loss, a function or module
            ``loss(outputs, targets)`` returning the batch's loss (e.g. ``F.cross_entropy``,
            ``nn.MSELoss()``), used with its own reduction.
        data: a DataLoader, a Dataset, or an (x, y) tuple of tensors; streamed at every product.
        params: None (all parameters that require grad), or names, modules or tensors.
        batch_size: samples per batch for tensor or Dataset data (a positive int).
        progress: show a tqdm progress bar over the batches of each product.
        compile: False (eager), True, or a dict of ``torch.compile`` keyword arguments (updating
            ``fullgraph=True, dynamic=False``): the per-batch product compiled by torch.compile
            (``fisherext.curvature.compiled``), traced at the first product (seconds) and reused by the
            later ones; a new batch shape or number of columns compiles once more.
        group: the torch.distributed process group whose ranks each stream their own shard of the data
            at every product, the sums added across the ranks (None: the default group when one is
            initialized with more than one rank; False: this process alone). Every rank must multiply by
            the same vectors, which is checked.

    Raises:
        TypeError: ``loss`` neither a name nor callable, ``compile`` neither a bool nor a dict.
        ValueError: an unknown loss name, a bad ``batch_size``, a model in train mode with dropout (or
            BatchNorm on batch statistics), unknown torch.compile arguments or torch.compile unavailable;
            at the first product, a model and loss torch.compile cannot compile.
    """

    def __init__(self, model: nn.Module, loss: Loss, data: Data, *, params: Params = None,
                 batch_size: int | None = None, progress: bool = False, compile: bool | dict = False, group=None):
        self.loss = curvature_loss(loss)
        super().__init__(model, data, params=params, batch_size=batch_size, progress=progress, compile=compile,
                         group=group)

    def _batch(self, x, y, V, offset):
        return self.products.hessian_batch(self.fm, self.loss, x, y, V, offset)


@entry_points(renamed={"loss_fn": "loss"})
class GGNOperator(HessianOperator):
    r"""The generalized Gauss-Newton matrix :math:`G = \frac1N\sum_n J_n^\top \nabla^2_z\ell_n\, J_n` of
    the mean loss (PSD for a loss convex in the outputs), as a linear operator; arguments and errors as
    :class:`HessianOperator`. A likelihood's name or a torch cross-entropy with every label counted
    applies the output-space Hessian by the fused kernel; any other torch loss by double backprop.
    """

    def __init__(self, model: nn.Module, loss: Loss, data: Data, *, params: Params = None,
                 batch_size: int | None = None, progress: bool = False, compile: bool | dict = False, group=None):
        # its own entry point, so that errors name GGNOperator
        super().__init__(model, loss, data, params=params, batch_size=batch_size, progress=progress, compile=compile,
                         group=group)

    def _batch(self, x, y, V, offset):
        return self.products.ggn_batch(self.fm, self.loss, x, y, V, offset)


@entry_points(renamed={"loss_fn": "loss", "seed": "generator"})
class FisherOperator(_CurvatureOperator):
    r"""The Fisher :math:`F = \frac1N\sum_n F_n`, :math:`F_n = J_n^\top \hat\Lambda_n J_n`, as a linear
    operator: kinds and normalization of ``fisherext.fisher`` (``A @ v`` equals
    ``fisher(..., structure="full").mv(v)`` without the P×P matrix).

    Args:
        model: maps inputs x [N, ...] to outputs.
        loss: the likelihood: a name ("cross_entropy", "mse": unit-variance Gaussian with
            :math:`\Lambda = I`, "bce": Bernoulli of the logits) or the torch loss of one
            (``F.cross_entropy``, ``nn.CrossEntropyLoss(ignore_index=...)``, ``F.mse_loss``,
            ``nn.MSELoss()``, ``F.binary_cross_entropy_with_logits``, ``nn.BCEWithLogitsLoss()``; its
            reduction does not change the likelihood).
        data: a DataLoader, a Dataset, or an (x, y) tuple of tensors; streamed at every product.
        kind: "true" (:math:`\hat\Lambda_n = \Lambda_n`), "empirical" (the residual's outer product at
            the data label) or "mc" (at ``mc_samples`` labels drawn from the model).
        mc_samples: labels drawn per input for ``kind="mc"``, a positive int.
        generator: the ``torch.Generator`` of the MC labels. Its state at construction is replayed at
            every product, so the operator is one fixed matrix (as a solver needs); None draws that
            state's seed from torch's global generator.
        class_dim: the class axis of cross-entropy outputs with positions ([N, T, C], [N, C, H, W]),
            whose per-sample log-likelihood sums over the positions (None: read off the labels).
        ignore_index: the label of positions that do not count (None: that of an
            ``nn.CrossEntropyLoss`` passed as ``loss``, else -100).
        params: None (all parameters that require grad), or names, modules or tensors.
        batch_size: samples per batch for tensor or Dataset data (a positive int).
        progress: show a tqdm progress bar over the batches of each product.
        compile: as :class:`HessianOperator`; the cotangents of the kind are computed eagerly at the
            outputs of one more (no-grad) forward pass per batch, the rest of the product compiled.
        group: as :class:`HessianOperator`.

    Raises:
        ValueError: a ``loss`` that is no likelihood (class weights, label smoothing, another callable),
            an unknown ``kind``, a bad ``mc_samples`` or ``batch_size``, a ``generator`` on another
            device than the parameters, a bad ``compile`` (as :class:`HessianOperator`).
        TypeError: ``generator`` not a ``torch.Generator``, ``compile`` neither a bool nor a dict.
    """

    def __init__(self, model: nn.Module, loss: Loss, data: Data, *, kind: str = "true", mc_samples: int = 1,
                 generator: torch.Generator | None = None, class_dim: int | None = None,
                 ignore_index: int | None = None, params: Params = None, batch_size: int | None = None,
                 progress: bool = False, compile: bool | dict = False, group=None):
        check_choice("kind", kind, KINDS)
        self.likelihood = as_likelihood(loss, class_dim=class_dim, ignore_index=ignore_index)
        check_positive_int("mc_samples", mc_samples)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        super().__init__(model, data, params=params, batch_size=batch_size, progress=progress, compile=compile,
                         group=group)
        self.kind, self.mc_samples = kind, mc_samples
        self._labels_state = None
        if kind == "mc":
            if generator is None:
                generator = torch.Generator(self.device).manual_seed(int(torch.randint(2 ** 62, ())))
            elif generator.device.type != self.device.type:
                raise ValueError(f"generator: is on {generator.device} but the parameters are on {self.device}")
            self._labels_state = generator.get_state()
        self._generator = None

    def _matmat(self, X):
        if self._labels_state is not None:  # the same labels at every product
            self._generator = torch.Generator(self.device)
            self._generator.set_state(self._labels_state)
        return super()._matmat(X)

    def _batch(self, x, y, V, offset):
        return self.products.fisher_batch(self.fm, self.likelihood, self.kind, x, y, V, mc_samples=self.mc_samples,
                                          generator=self._generator, offset=offset)


__all__ = ["FisherOperator", "GGNOperator", "HessianOperator"]
