r"""The linear-operator protocol every curvature operator of the package follows.

A curvature operator is a symmetric linear map :math:`A: \mathbb{R}^P \to \mathbb{R}^P` over flat
parameter vectors (the order of ``fisherext.flatten``). A subclass implements one method,
``_matmat(X)`` for ``X`` of shape [P, K], and calls ``LinearOperator.__init__(self, P, dtype, device)``;
the base class validates inputs and derives everything else from ``_matmat``:

- ``A @ v`` with ``v`` [P] gives [P], ``A @ X`` with ``X`` [P, K] gives [P, K] (matrix semantics, like
  torch); ``A.mv(v)`` and ``A.matmat(X)`` are the same products by name;
- ``A.shape == (P, P)``, ``A.dtype``, ``A.device``;
- ``A.to_scipy()``: a ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out);
- ``A.dense()``: the P×P matrix, assembled from products with blocks of identity columns.

Solvers and spectral methods (``fisherext.linalg.solvers``, ``fisherext.linalg.spectral``) use only ``A @ X`` and
``A.shape``, so any subclass works with all of them. Products with several columns at once should be
implemented as such when the operator can batch them (one pass over the data for K vectors).
"""
from __future__ import annotations

import torch
from .._core.entry import entry_point, entry_points

DEFAULT_MAX_ELEMENTS = 1 << 26   # dense(): 64 Mi entries, 512 MiB in float64


@entry_points
class LinearOperator:
    """Abstract symmetric operator over flat parameter vectors of length P (see the module docstring).

    Subclasses implement ``_matmat(X)``: X [P, K] (already validated: a tensor of the operator's dtype on
    its device) -> A X [P, K]. Inputs of another floating dtype are converted to the operator's dtype;
    inputs on another device are refused.
    """

    def __init__(self, P: int, dtype: torch.dtype, device: torch.device | str):
        if isinstance(P, bool) or not isinstance(P, int) or P < 1:
            raise ValueError(f"P: must be a positive integer, got {P!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype: must be a floating-point dtype, got {dtype}")
        self._P, self._dtype, self._device = P, dtype, torch.device(device)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _matmat(X) for X of shape [P, K]")

    @property
    def shape(self) -> tuple[int, int]:
        return (self._P, self._P)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def _check(self, X, name: str, ndim: int) -> torch.Tensor:
        P = self.shape[0]
        want = f"[{P}]" if ndim == 1 else f"[{P}, K]"
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor of shape {want}, got {type(X).__name__}")
        if not X.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {X.dtype}")
        if X.dim() != ndim or X.shape[0] != P:
            raise ValueError(f"{name}: expected shape {want} (P = {P}), got {tuple(X.shape)}")
        # an operator declared on "cuda" (no index) accepts its inputs on the current CUDA device
        if X.device.type != self.device.type or (
                self.device.index is not None and X.device.index is not None and X.device != self.device):
            raise ValueError(f"{name}: is on {X.device} but the operator is on {self.device}")
        return X.to(self.dtype)

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """A X for X [P, K]."""
        X = self._check(X, "X", 2)
        Y = self._matmat(X)
        if tuple(Y.shape) != tuple(X.shape):
            # a broken subclass would otherwise surface as a confusing error far from its cause
            raise RuntimeError(f"{type(self).__name__}._matmat returned shape {tuple(Y.shape)} "
                               f"for an input of shape {tuple(X.shape)}")
        return Y

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """A v for v [P]."""
        v = self._check(v, "v", 1)
        return self.matmat(v[:, None])[:, 0]

    def __matmul__(self, X: torch.Tensor) -> torch.Tensor:
        if isinstance(X, torch.Tensor) and X.dim() == 2:
            return self.matmat(X)
        return self.mv(X)

    def dense(self, *, max_elements: int = DEFAULT_MAX_ELEMENTS, block_size: int | None = None) -> torch.Tensor:
        """The P×P matrix, as A [e_i … e_j] over blocks of ``block_size`` identity columns (P products in all).

        Refuses (ValueError) when P² > ``max_elements``; ``block_size`` (columns per product) defaults to
        about 2²⁰ entries per block, at least one column.
        """
        P = self.shape[0]
        if P * P > max_elements:
            nbytes = P * P * torch.empty((), dtype=self.dtype).element_size()
            raise ValueError(f"dense: a {P} x {P} matrix needs {nbytes:,} bytes ({P * P:,} elements > "
                             f"max_elements={max_elements:,}); use matrix-free products (A @ X) instead")
        if block_size is None:
            block_size = max(1, min(P, (1 << 20) // P))
        out = torch.empty(P, P, dtype=self.dtype, device=self.device)
        for start in range(0, P, block_size):
            stop = min(P, start + block_size)
            E = torch.zeros(P, stop - start, dtype=self.dtype, device=self.device)
            E[start:stop].fill_diagonal_(1)
            out[:, start:stop] = self.matmat(E)
        return out

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` view: float64 numpy arrays in and out, converted to this
        operator's dtype and device for each product. ``rmatvec`` is ``matvec`` (the operator is symmetric)."""
        try:
            import numpy as np
            from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
        except ImportError as err:   # scipy is optional: only this conversion needs it
            raise ImportError("to_scipy: needs scipy, which is not installed (pip install scipy)") from err

        def matmat(X):
            X = torch.from_numpy(np.asarray(X, dtype=np.float64)).to(self.device, self.dtype)
            return self.matmat(X).to("cpu", torch.float64).numpy()

        def matvec(x):   # scipy may pass [P] or [P, 1]
            return matmat(np.reshape(x, (-1, 1)))[:, 0]

        return ScipyLinearOperator(self.shape, matvec=matvec, rmatvec=matvec, matmat=matmat,
                                   rmatmat=matmat, dtype=np.float64)

    def __repr__(self):
        return f"{type(self).__name__}(P={self.shape[0]}, dtype={self.dtype}, device={self.device})"


@entry_points
class DenseOperator(LinearOperator):
    """An explicit symmetric P×P matrix ``M`` as an operator (small problems, tests, references)."""

    def __init__(self, M: torch.Tensor):
        if not isinstance(M, torch.Tensor):
            raise TypeError(f"M: expected a square tensor, got {type(M).__name__}")
        if not M.is_floating_point():
            raise TypeError(f"M: expected a floating-point tensor, got {M.dtype}")
        if M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
            raise ValueError(f"M: expected a non-empty square matrix, got shape {tuple(M.shape)}")
        if not torch.isfinite(M).all():
            raise ValueError("M: has non-finite entries")
        # the spectral methods assume symmetry; a loose check (√eps relative) still lets autograd Hessians,
        # symmetric up to rounding, through
        scale = M.abs().max()
        if (M - M.T).abs().max() > torch.finfo(M.dtype).eps ** 0.5 * scale:
            raise ValueError("M: must be symmetric (a curvature operator); got max |M - M^T| = "
                             f"{(M - M.T).abs().max().item():.3g} with max |M| = {scale.item():.3g}")
        super().__init__(M.shape[0], M.dtype, M.device)
        self.M = M

    def _matmat(self, X):
        return self.M @ X


@entry_point
def as_operator(A) -> LinearOperator:
    """``A`` as a LinearOperator: an operator (a ``FisherMatrix`` among them) is returned as is, a square
    symmetric tensor becomes a ``DenseOperator``."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, torch.Tensor):
        return DenseOperator(A)
    raise TypeError(f"A: expected a LinearOperator, a square tensor or a FisherMatrix, got {type(A).__name__}")
