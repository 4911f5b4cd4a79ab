r"""Influence functions (Koh & Liang, 2017): how training points move a test point's loss.

With per-sample loss :math:`\ell(z;\theta)`, training data :math:`z_1..z_N`, the mean training loss
:math:`L(\theta) = \frac1N\sum_i \ell(z_i;\theta)` and its curvature :math:`H` (the Hessian
:math:`\nabla^2 L`, or the Gauss-Newton matrix G with ``curvature="ggn"``) at the current parameters
:math:`\hat\theta`, the influence of training point i on test point t is

.. math:: I[t, i] = -\nabla\ell(z^{test}_t)^\top (H + \lambda I)^{-1} \nabla\ell(z_i)
                  = -\,s_t^\top \nabla\ell(z_i), \qquad s_t = (H + \lambda I)^{-1} \nabla\ell(z^{test}_t)

("I_up,loss"). Sign and normalization: upweighting :math:`z_i` by ε in the objective,
:math:`\theta_\varepsilon = \arg\min L(\theta) + \varepsilon\,\ell(z_i;\theta)`, gives
:math:`d\,\ell(z^{test}_t;\theta_\varepsilon)/d\varepsilon|_0 = I[t, i]` when :math:`\hat\theta`
minimizes :math:`L + \frac\lambda2\|\theta\|^2` (so H + λI is that objective's Hessian). Removing
:math:`z_i` is ε = −1/N, so it changes the test loss by :math:`\approx -I[t, i]/N` to first order:
a positive I means the point helps (removing it raises the test loss).

Gradients are of the per-sample loss, ``loss_fn`` evaluated on a batch of one; H is of the *mean*
loss (``fisherext.curvature.operators``), so neither depends on how the data are batched.

Computation: the K = N_test right-hand sides are solved at once, :math:`S = (H+\lambda I)^{-1} G_{test}^\top`
[P, K] (``solver="exact"``: Cholesky of the dense matrix; ``"cg"``: batched conjugate gradients;
``"lissa"``: the stochastic recurrence), then the training data stream in chunks: per-sample gradients
of a chunk [B, P] by ``torch.func.vmap(grad)``, times S. Memory is O(B·P + P·K), independent of N.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ._core.checks import check_choice, check_loss_fn, check_positive_int
from ._core.conventions import check_deterministic, checked_output, curvature_forward
from ._core.data import iter_batches, num_samples
from ._core.functional import FunctionalModel
from .curvature.operators import GGNOperator, HessianOperator
from .linalg import solvers
from .linalg.linop import DEFAULT_MAX_ELEMENTS
from .linalg.spectral import power_iteration
from ._core.entry import entry_points

SOLVERS = ("exact", "cg", "lissa")
CURVATURES = ("hessian", "ggn")
# Per-sample gradients held at once: rows of a chunk times P stays under this many entries
# (32 MiB in float64), whatever the batch size of the data.
CHUNK_ELEMENTS = 1 << 22
_NOT_PD = ("pass a larger damping (more than -lambda_min of the Hessian) or curvature='ggn' "
           "(positive semi-definite)")


@entry_points
class InfluenceFunctions:
    r"""Influence of training points on test losses, :math:`I = -G_{test}(H+\lambda I)^{-1}G_{train}^\top`
    (see the module docstring for the math, sign and normalization).

    Args:
        model: maps inputs to outputs; its parameters are read at each call (the factorization of
            ``solver="exact"`` is recomputed when they change).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch's mean loss (e.g. ``F.cross_entropy``).
        train_data: a DataLoader (in order, no shuffling or other sampler: columns follow its order,
            and a shuffling one is refused), a Dataset, or an (x, y) tuple.
        params: None (all parameters that require grad), or names, modules or tensors: H, gradients and
            influence are then those of that subset, the rest held fixed (e.g. the last layer only).
        damping: λ ≥ 0 added to the curvature. For a model trained with an L2 penalty
            :math:`\frac\lambda2\|\theta\|^2` on all selected parameters, pass its λ here.
        solver: "exact" (dense P×P matrix and Cholesky; refused when P² exceeds
            ``linop.DEFAULT_MAX_ELEMENTS``), "cg" (``fisherext.solvers.cg``, all right-hand sides
            batched) or "lissa" (``fisherext.solvers.lissa``).
        curvature: "hessian" (may be indefinite) or "ggn" (Gauss-Newton, PSD for a convex loss).
        batch_size: samples per batch for the curvature products and the gradient stream (tensor or
            Dataset data; a DataLoader keeps its own batches). A positive int.
        solver_kwargs: passed to the solver. "cg": ``tol``, ``maxiter``, ``preconditioner``. "lissa":
            ``scale`` (default 1.1× the largest-magnitude eigenvalue of H, by power iteration),
            ``depth`` (default 1000), ``repeats`` and, for the stochastic variant, ``sample_size``
            (samples per minibatch operator, drawn from the training tensors with ``seed``). Here the
            damping stays absolute: λ is passed to lissa as ``damping = λ / scale``.
        progress: tqdm bars over the training chunks.

    Forward passes follow ``fisherext._core.conventions``: a model in train mode with dropout (or BatchNorm on
    batch statistics) is refused, padding_idx lookups are constants, attention runs the math kernel.
    """

    def __init__(self, model: nn.Module, loss_fn, train_data, *, params=None, damping: float = 0.0,
                 solver: str = "exact", curvature: str = "hessian", batch_size: int | None = None,
                 solver_kwargs: dict | None = None, progress: bool = False):
        check_choice("solver", solver, SOLVERS)
        check_choice("curvature", curvature, CURVATURES)
        check_loss_fn(loss_fn)
        check_positive_int("batch_size", batch_size, optional=True)
        check_deterministic(model)
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) \
                or damping < 0:
            raise ValueError(f"damping: must be a finite number >= 0, got {damping!r}")
        if solver_kwargs is not None and not isinstance(solver_kwargs, dict):
            raise TypeError(f"solver_kwargs: expected a dict, got {type(solver_kwargs).__name__}")
        self.num_train = num_samples(train_data, "train_data")
        operator = HessianOperator if curvature == "hessian" else GGNOperator
        self.operator = operator(model, loss_fn, train_data, params=params, batch_size=batch_size)
        self.fm: FunctionalModel = self.operator.fm
        P = self.fm.P
        if solver == "exact" and P * P > DEFAULT_MAX_ELEMENTS:
            raise ValueError(f"solver: 'exact' needs the dense {P} x {P} curvature ({P * P:,} entries > "
                             f"{DEFAULT_MAX_ELEMENTS:,}); use solver='cg' or 'lissa', or a smaller params subset")
        self.model, self.loss_fn, self.train_data = model, loss_fn, train_data
        self.damping, self.solver, self.curvature = float(damping), solver, curvature
        self.batch_size, self.progress = batch_size, progress
        self.solver_kwargs = dict(solver_kwargs or {})
        self._factor = None  # (parameter versions, Cholesky factor) for solver="exact"

    # ---- gradients ------------------------------------------------------------------------------

    def _per_sample_grads(self, x, y, offset: int) -> torch.Tensor:
        """∇θ ℓ(z_n) for each sample of the batch, flat over the selected parameters: [B, P]. The outputs
        are checked by ``conventions.checked_output`` (``offset``: the first sample's index in the data)."""
        model, loss_fn = self.model, self.loss_fn

        def loss_one(params, xn, yn):
            out = checked_output(functional_call(model, params, (xn[None],)), finite=False)
            return loss_fn(out, yn[None]), out.detach()

        fm = self.fm
        primals = {n: p.detach() for n, p in zip(fm.names, fm.params)}
        grads, outputs = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0, 0))(primals, x, y)
        checked_output(outputs, offset)
        return torch.cat([grads[n].flatten(1) for n in fm.names], dim=1).detach()

    def _gradient_chunks(self, data, name: str, desc: str):
        """Per-sample gradients [B, P] of ``data`` in chunks of at most CHUNK_ELEMENTS entries, in order."""
        total = num_samples(data, name)
        check_deterministic(self.model)  # read at each call, like the parameters
        rows = max(1, CHUNK_ELEMENTS // self.fm.P)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=desc, unit="sample")
        try:
            seen = 0
            for x, y in iter_batches(data, self.batch_size):
                if y is None:
                    raise ValueError(f"{name}: influence needs targets; the data yields inputs only")
                if x.device != self.fm.device:
                    raise ValueError(f"{name}: is on {x.device} but the parameters are on {self.fm.device}")
                for s in range(0, x.shape[0], rows):
                    with curvature_forward(self.model):  # not across the yield: the caller's code runs there
                        G = self._per_sample_grads(x[s:s + rows], y[s:s + rows], seen)
                    seen += G.shape[0]
                    if bar is not None:
                        bar.update(G.shape[0])
                    yield G
        finally:
            if bar is not None:
                bar.close()

    def test_gradients(self, test_data) -> torch.Tensor:
        """∇θ ℓ(z_test) of every test point: [N_test, P] (per-sample loss, selected parameters)."""
        return torch.cat(list(self._gradient_chunks(test_data, "test_data", "test gradients")))

    # ---- (H + λI)^{-1} B -------------------------------------------------------------------------

    def _versions(self):
        return tuple(p._version for p in self.fm.params) + tuple(p.data_ptr() for p in self.fm.params)

    def _cholesky(self) -> torch.Tensor:
        """Lower Cholesky factor of H + λI (dense), cached until a selected parameter changes."""
        versions = self._versions()
        if self._factor is None or self._factor[0] != versions:
            M = self.operator.dense()
            M = 0.5 * (M + M.T)  # autograd's H is symmetric only up to rounding
            M.diagonal().add_(self.damping)
            L, info = torch.linalg.cholesky_ex(M)
            if info.item() != 0:
                lam_min = torch.linalg.eigvalsh(M)[0].item()
                raise ValueError(f"damping: {self.curvature} + damping*I is not positive definite (smallest "
                                 f"eigenvalue {lam_min:.3g} with damping={self.damping:g}); " + _NOT_PD)
            self._factor = (versions, L)
        return self._factor[1]

    def _lissa_sampler(self, kwargs):
        """A callable drawing a minibatch Hessian/GGN operator of ``sample_size`` training samples."""
        size = kwargs.pop("sample_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"solver_kwargs: 'sample_size' must be a positive integer, got {size!r}")
        data = self.train_data
        if not (isinstance(data, (tuple, list)) and isinstance(data[0], torch.Tensor)):
            raise ValueError("solver_kwargs: 'sample_size' (stochastic LiSSA) needs train_data as an (x, y) tuple")
        x, y = data
        generator = torch.Generator().manual_seed(kwargs.pop("seed", 0))
        size = min(size, x.shape[0])
        operator = type(self.operator)

        def sample():
            idx = torch.randperm(x.shape[0], generator=generator)[:size].to(x.device)
            return operator(self.model, self.loss_fn, (x[idx], y[idx]), params=self.fm.params)

        return sample

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """(H + λI)⁻¹ B for B [P, K], by the chosen solver."""
        if self.solver == "exact":
            return torch.cholesky_solve(B, self._cholesky())
        kwargs = dict(self.solver_kwargs)
        if self.solver == "cg":
            return solvers.cg(self.operator, B, damping=self.damping, **kwargs)
        sample = self._lissa_sampler(kwargs) if "sample_size" in kwargs else None
        scale = kwargs.pop("scale", None)
        if scale is None:
            scale = 1.1 * power_iteration(self.operator, 1)[0].abs().item()
        if self.damping >= scale:
            raise ValueError(f"solver_kwargs: lissa's 'scale' ({scale:g}) must exceed damping ({self.damping:g})")
        kwargs.setdefault("depth", 1000)
        return solvers.lissa(self.operator, B, scale=scale, damping=self.damping / scale, sample=sample, **kwargs)

    def s_test(self, test_data) -> torch.Tensor:
        r""":math:`S = (H + \lambda I)^{-1} \nabla\ell(z^{test})^\top`, all test points at once: [P, N_test]."""
        return self.solve(self.test_gradients(test_data).T.contiguous())

    # ---- influence -------------------------------------------------------------------------------

    def influence(self, test_data) -> torch.Tensor:
        r""":math:`I[t, i] = -\nabla\ell(z^{test}_t)^\top (H+\lambda I)^{-1}\nabla\ell(z_i)`: [N_test, N_train].

        Removing training point i changes test loss t by about ``-I[t, i] / N_train``.
        """
        S = self.s_test(test_data)
        return -torch.cat([S.T @ G.T for G in self._gradient_chunks(self.train_data, "train_data", "influence")], 1)

    def self_influence(self) -> torch.Tensor:
        r""":math:`-\nabla\ell(z_i)^\top (H+\lambda I)^{-1}\nabla\ell(z_i)` of every training point: [N_train]
        (the diagonal of ``influence(train_data)``; ≤ 0 when H + λI is positive definite).

        "exact" reuses the factorization; "cg"/"lissa" solve one batch of right-hand sides per chunk.
        """
        return -torch.cat([(G * self.solve(G.T.contiguous()).T).sum(1)
                           for G in self._gradient_chunks(self.train_data, "train_data", "self-influence")])


__all__ = ["CURVATURES", "InfluenceFunctions", "SOLVERS"]
