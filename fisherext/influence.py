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

Gradients are of the per-sample loss, ``loss`` evaluated on a batch of one; H is of the *mean* loss (``fisherext.HessianOperator`` or
``fisherext.GGNOperator``), so neither depends on how the data are batched.

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

from ._core.checks import check_choice, check_positive_int
from ._core.conventions import check_deterministic, checked_output, curvature_forward
from ._core.data import iter_batches, num_samples, progress_bar
from ._core.distributed import all_or_none, gathered_rows, process_group, row_layout
from ._core.entry import entry_points
from ._core.functional import FunctionalModel
from ._core.types import Data, Loss, Params
from .curvature.operators import GGNOperator, HessianOperator
from .curvature.products import CURVATURES
from .linalg import solvers
from .linalg.linop import DEFAULT_MAX_ELEMENTS, check_columns
from .linalg.spectral import power_iteration

SOLVERS = ("exact", "cg", "lissa")
# Per-sample gradients held at once: rows of a chunk times P stays under this many entries
# (32 MiB in float64), whatever the batch size of the data.
CHUNK_ELEMENTS = 1 << 22
_NOT_PD = ("pass a larger damping (more than -lambda_min of the Hessian) or curvature='ggn' "
           "(positive semi-definite)")


@entry_points(renamed={"loss_fn": "loss"})
class InfluenceFunctions:
    r"""Influence of training points on test losses, :math:`I = -G_{test}(H+\lambda I)^{-1}G_{train}^\top`
    (the math, sign and normalization: :mod:`fisherext.influence`).

    Args:
        model: maps inputs to outputs; its parameters are read at each call (the factorization of
            ``solver="exact"`` is recomputed when they change).
        loss: a likelihood's name, "cross_entropy", "mse" or "bce", standing for its torch loss with
            reduction="mean" (``F.cross_entropy`` over the class axis, ``F.mse_loss``,
            ``F.binary_cross_entropy_with_logits``), or a torch loss, a function or module
            ``loss(outputs, targets)`` returning the batch's mean loss (e.g. ``F.cross_entropy``,
            ``nn.CrossEntropyLoss()``).
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
            (samples per minibatch operator, drawn from the training tensors with ``generator``, a
            ``torch.Generator``; None: torch's global one). The damping λ is passed to lissa as is (its
            ``damping`` is absolute too).
        progress: tqdm bars over the gradients streamed and over the iterations of "cg" and "lissa".
        group: the torch.distributed process group whose ranks each hold their own shard of the training
            data (None: the default group when one is initialized with more than one rank; False: this
            process alone). H is over all shards (its products add across the ranks), every rank passes
            the same test data, and the columns of ``influence`` and the values of ``self_influence`` are
            gathered rank by rank (rank 0's training samples first), equal to one process over the
            shards' concatenation. Stochastic LiSSA (``sample_size``) draws its minibatches from each
            rank's own shard, so each minibatch operator spans all ranks.

    Raises:
        ValueError: an unknown ``solver``, ``curvature`` or loss name, a negative or non-finite
            ``damping``, a bad ``batch_size``, ``solver="exact"`` over too many parameters, a model in
            train mode with dropout (or BatchNorm on batch statistics), a shuffling DataLoader, no samples.
        TypeError: ``loss`` neither a name nor callable, ``solver_kwargs`` not a dict.

    Forward passes are deterministic per sample (a model in train mode with dropout, or BatchNorm on
    batch statistics, is refused), padding_idx lookups are constants, attention runs the math kernel.
    """

    def __init__(self, model: nn.Module, loss: Loss, train_data: Data, *, params: Params = None,
                 damping: float = 0.0, solver: str = "exact", curvature: str = "hessian",
                 batch_size: int | None = None, solver_kwargs: dict | None = None, progress: bool = False,
                 group=None):
        check_choice("solver", solver, SOLVERS)
        check_choice("curvature", curvature, CURVATURES)
        check_positive_int("batch_size", batch_size, optional=True)
        check_deterministic(model)
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) \
                or damping < 0:
            raise ValueError(f"damping: must be a finite number >= 0, got {damping!r}")
        if solver_kwargs is not None and not isinstance(solver_kwargs, dict):
            raise TypeError(f"solver_kwargs: expected a dict, got {type(solver_kwargs).__name__}")
        self.ranks = process_group(group)
        with all_or_none(self.ranks, width=1) as shared:
            shared.values = [num_samples(train_data, "train_data")]
        self.num_train = shared.total(0)
        operator = HessianOperator if curvature == "hessian" else GGNOperator
        self.operator = operator(model, loss, train_data, params=params, batch_size=batch_size, group=group)
        self.fm: FunctionalModel = self.operator.fm
        P = self.fm.P
        if solver == "exact" and P * P > DEFAULT_MAX_ELEMENTS:
            raise ValueError(f"solver: 'exact' needs the dense {P} x {P} curvature ({P * P:,} entries > "
                             f"{DEFAULT_MAX_ELEMENTS:,}); use solver='cg' or 'lissa', or a smaller params subset")
        self.model, self.loss, self.train_data = model, self.operator.loss, train_data
        self.damping, self.solver, self.curvature = float(damping), solver, curvature
        self.batch_size, self.progress = batch_size, progress
        self.solver_kwargs = dict(solver_kwargs or {})
        self._factor = None  # (parameter versions, Cholesky factor) for solver="exact"

    # ---- gradients ------------------------------------------------------------------------------

    def _per_sample_grads(self, x, y, offset: int) -> torch.Tensor:
        """∇θ ℓ(z_n) for each sample of the batch, flat over the selected parameters: [B, P]. The outputs
        are checked by ``conventions.checked_output`` (``offset``: the first sample's index in the data)."""
        model, loss = self.model, self.loss

        def loss_one(params, xn, yn):
            out = checked_output(functional_call(model, params, (xn[None],)), finite=False)
            return loss(out, yn[None]), out.detach()

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
        with progress_bar(None, self.progress, desc, total=total, unit="sample") as bar:
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
                    bar.update(G.shape[0])
                    yield G

    def test_gradients(self, test_data: Data) -> torch.Tensor:
        r"""The gradient :math:`\nabla_\theta \ell(z^{test}_t)` of every test point's own loss.

        Args:
            test_data: a DataLoader (in order), a Dataset, or an (x, y) tuple.

        Returns:
            Tensor [N_test, P] over the selected parameters (one row per test point).

        Raises:
            ValueError: no samples, no targets, data on another device, a shuffling DataLoader.
        """
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
        if "seed" in kwargs:
            raise ValueError("solver_kwargs: 'seed' is now 'generator' (a torch.Generator)")
        generator = kwargs.pop("generator", None)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"solver_kwargs: 'generator' must be a torch.Generator, got {type(generator).__name__}")
        size = min(size, x.shape[0])
        operator = type(self.operator)

        def sample():
            idx = torch.randperm(x.shape[0], generator=generator)[:size].to(x.device)
            return operator(self.model, self.loss, (x[idx], y[idx]), params=self.fm.params)

        return sample

    def _gathered(self, values) -> torch.Tensor:
        """The training samples' values of this rank (an iterable of [B, ...] chunks, rows the samples), of
        every rank under the process group, rank by rank."""
        with all_or_none(self.ranks, width=3) as shared:  # no rank waits in the gather for a rank that raised
            local = torch.cat(list(values))
            shared.values = row_layout(local)
        shared.check_same("test_data", "the values per training sample", slice(1, 3))
        return gathered_rows(local, shared.rows[:, 0], self.ranks)

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        r""":math:`(H + \lambda I)^{-1} B` by the chosen solver.

        Args:
            B: one right-hand side [P] or K as the columns of [P, K].

        Returns:
            Tensor of B's shape.

        Raises:
            ValueError: B of the wrong shape; H + λI not positive definite ("exact", "cg"); lissa's
                ``scale`` not above the damping, or the recurrence diverging.
        """
        B = check_columns("B", B, self.operator)
        if B.dim() == 1:
            return self.solve(B[:, None])[:, 0]
        if self.solver == "exact":
            return torch.cholesky_solve(B, self._cholesky())
        kwargs = dict(self.solver_kwargs)
        kwargs.setdefault("progress", self.progress)
        if self.solver == "cg":
            return solvers.cg(self.operator, B, damping=self.damping, **kwargs)
        sample = self._lissa_sampler(kwargs) if "sample_size" in kwargs else None
        scale = kwargs.pop("scale", None)
        if scale is None:
            # a fixed start: the same on every rank (the products add across ranks) and at every call
            start = torch.Generator(self.operator.device).manual_seed(0)
            scale = 1.1 * power_iteration(self.operator, 1, generator=start)[0].abs().item()
        if self.damping >= scale:
            raise ValueError(f"solver_kwargs: lissa's 'scale' ({scale:g}) must exceed damping ({self.damping:g})")
        kwargs.setdefault("depth", 1000)
        return solvers.lissa(self.operator, B, scale=scale, damping=self.damping, sample=sample, **kwargs)

    def s_test(self, test_data: Data) -> torch.Tensor:
        r""":math:`S = (H + \lambda I)^{-1} \nabla\ell(z^{test})^\top`, all test points at once.

        Args:
            test_data: a DataLoader (in order), a Dataset, or an (x, y) tuple.

        Returns:
            Tensor [P, N_test]: column t is :math:`s_t`.

        Raises:
            ValueError: as :meth:`test_gradients` and :meth:`solve`.
        """
        with all_or_none(self.ranks):  # before the solver's products, which add across the ranks
            G = self.test_gradients(test_data)
        return self.solve(G.T.contiguous())

    # ---- influence -------------------------------------------------------------------------------

    def influence(self, test_data: Data) -> torch.Tensor:
        r""":math:`I[t, i] = -\nabla\ell(z^{test}_t)^\top (H+\lambda I)^{-1}\nabla\ell(z_i)`.

        Removing training point i changes test loss t by about ``-I[t, i] / N_train``.

        Args:
            test_data: a DataLoader (in order), a Dataset, or an (x, y) tuple.

        Returns:
            Tensor [N_test, N_train].

        Raises:
            ValueError: as :meth:`test_gradients` and :meth:`solve`.
        """
        S = self.s_test(test_data)
        return -self._gathered(G @ S for G in self._gradient_chunks(self.train_data, "train_data", "influence")).T

    def self_influence(self) -> torch.Tensor:
        r""":math:`-\nabla\ell(z_i)^\top (H+\lambda I)^{-1}\nabla\ell(z_i)` of every training point: [N_train]
        (the diagonal of ``influence(train_data)``; ≤ 0 when H + λI is positive definite).

        "exact" reuses the factorization; "cg"/"lissa" solve one batch of right-hand sides per chunk.

        Returns:
            Tensor [N_train].

        Raises:
            ValueError: as :meth:`solve`; solver "cg" or "lissa" under a process group.
        """
        if self.ranks is not None:
            if self.solver != "exact":  # each rank would solve its own chunks by products that add across ranks
                raise ValueError("solver: self_influence under a process group needs solver='exact' (cg and "
                                 "lissa solve each training chunk by products summed over the ranks, which "
                                 "would need the same chunk on every rank)")
            self._cholesky()  # its products add across the ranks: before the local stream
        return -self._gathered((G * self.solve(G.T.contiguous()).T).sum(1)
                               for G in self._gradient_chunks(self.train_data, "train_data", "self-influence"))


__all__ = ["InfluenceFunctions"]
