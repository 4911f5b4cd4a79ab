r"""Curvature of a model's mean loss over a data set as linear operators: Hessian, GGN and Fisher.

Each operator is a ``fisherext.LinearOperator`` over the flat vector of the selected parameters
(``params=``, default all that require grad), so ``A @ v``, ``A @ X`` ([P, K]: K vectors in one pass
over the data), ``A.shape``, ``A.dense()`` and ``A.to_scipy()`` work, and every solver in
``fisherext.linalg.solvers`` and spectral method in ``fisherext.linalg.spectral`` accepts it. Products stream over the
data in batches and are normalized by the number of samples (the curvature of the mean loss), whatever
the batching; the math is in ``fisherext.curvature.products``. The model's parameters are read at each product, so an
operator follows the model as it trains; its mode is checked at each product too (``fisherext._core.conventions``:
a model switched to train mode with dropout is refused, not silently sampled).
"""
from __future__ import annotations

import torch
from torch import nn

from .._core.checks import check_choice, check_loss_fn, check_positive_int
from .._core.conventions import check_deterministic, curvature_forward
from .._core.data import stream
from .._core.functional import FunctionalModel
from .._core.likelihood import KINDS, ignore_index_of, likelihood
from ..linalg.linop import LinearOperator
from .products import fisher_batch, ggn_batch, hessian_batch
from .._core.entry import entry_points


class _CurvatureOperator(LinearOperator):
    def __init__(self, model: nn.Module, data, *, params=None, batch_size: int | None = None, progress: bool = False):
        check_positive_int("batch_size", batch_size, optional=True)
        self.fm = FunctionalModel(model, params)
        super().__init__(self.fm.P, self.fm.dtype, self.fm.device)
        self.data, self.batch_size, self.progress = data, batch_size, progress

    def _batch(self, x, y, V, offset):
        """The product for one batch's mean loss with the rows of V [K, P] (each subclass its own)."""
        raise NotImplementedError

    def _matmat(self, X):
        check_deterministic(self.fm.model)  # the operator follows the model, whose mode may have changed
        V = X.T.contiguous()  # the products take vectors as rows
        with curvature_forward(self.fm.model):
            return stream(self.fm.model, self.data, self.batch_size, lambda x, y, offset: self._batch(x, y, V, offset),
                          progress=self.progress, desc=type(self).__name__).T


@entry_points
class HessianOperator(_CurvatureOperator):
    r""":math:`H = \nabla^2_\theta \frac1N\sum_n \ell(f(x_n), y_n)`, by double backprop (see hvp).

    ``loss_fn(outputs, targets)`` returns a batch's mean loss. H may be indefinite.
    """

    def __init__(self, model: nn.Module, loss_fn, data, **kw):
        check_loss_fn(loss_fn)
        super().__init__(model, data, **kw)
        self.loss_fn = loss_fn

    def _batch(self, x, y, V, offset):
        return hessian_batch(self.fm, self.loss_fn, x, y, V, offset)


@entry_points
class GGNOperator(HessianOperator):
    r"""Generalized Gauss-Newton :math:`G = \frac1N\sum_n J_n^\top \nabla^2_z\ell\, J_n` (PSD for a loss
    convex in the outputs); softmax cross-entropy uses the fused output-space kernel."""

    def _batch(self, x, y, V, offset):
        return ggn_batch(self.fm, self.loss_fn, x, y, V, offset)


@entry_points
class FisherOperator(_CurvatureOperator):
    r"""Fisher :math:`F = \frac1N\sum_n J_n^\top \hat\Lambda_n J_n`, kinds and normalization as in
    ``fisherext.fisher`` (``A @ v`` equals ``fisher(..., structure="full").mv(v)`` without the P×P matrix).

    ``loss_fn`` names the likelihood: "cross_entropy" or "mse" (or ``F.cross_entropy``,
    ``nn.CrossEntropyLoss()``, ``F.mse_loss``, ``nn.MSELoss()``; "mse" is the unit-variance Gaussian,
    :math:`\Lambda = I`, as in ``fisher``). ``kind="mc"`` draws its labels from ``seed`` afresh at every
    product, so the operator is one fixed matrix (as a solver needs). Outputs with positions
    ([N, T, C], [N, C, H, W]) sum over the positions as in ``fisher``: ``class_dim`` names the class axis
    (None: read off the labels) and positions labelled ``ignore_index`` do not count (None: that of an
    ``nn.CrossEntropyLoss`` passed as ``loss_fn``, else -100).
    """

    def __init__(self, model: nn.Module, loss_fn, data, *, kind: str = "true", mc_samples: int = 1, seed: int = 0,
                 class_dim: int | None = None, ignore_index: int | None = None, **kw):
        check_choice("kind", kind, KINDS)
        self.loss = likelihood(loss_fn)
        check_positive_int("mc_samples", mc_samples)
        super().__init__(model, data, **kw)
        self.kind, self.mc_samples, self.seed = kind, mc_samples, seed
        self.class_dim = class_dim
        self.ignore_index = ignore_index_of(loss_fn) if ignore_index is None else ignore_index
        self._generator = None

    def _matmat(self, X):
        if self.kind == "mc":
            self._generator = torch.Generator(self.device).manual_seed(self.seed)
        return super()._matmat(X)

    def _batch(self, x, y, V, offset):
        return fisher_batch(self.fm, self.loss, self.kind, x, y, V, mc_samples=self.mc_samples,
                            generator=self._generator, offset=offset, class_dim=self.class_dim,
                            ignore_index=self.ignore_index)


__all__ = ["FisherOperator", "GGNOperator", "HessianOperator"]
