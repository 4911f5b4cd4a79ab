r"""The linear-operator protocol every curvature operator of the package follows, and its algebra.

A curvature operator is a symmetric linear map :math:`A: \mathbb{R}^P \to \mathbb{R}^P` over flat
parameter vectors (the order of ``fisherext.flatten``). A subclass implements one method,
``_matmat(X)`` for ``X`` of shape [P, K], and calls ``LinearOperator.__init__(self, P, dtype, device)``;
the base class validates inputs and derives everything else from ``_matmat``:

- ``A @ v`` with ``v`` [P] gives [P], ``A @ X`` with ``X`` [P, K] gives [P, K] (matrix semantics, like
  torch); ``A.mv(v)`` and ``A.matmat(X)`` are the same products by name;
- ``A.shape == (P, P)``, ``A.dtype``, ``A.device``;
- ``A.to_scipy()``: a ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out);
- ``A.dense()``: the P×P matrix, assembled from products with blocks of identity columns;
- the algebra: ``A + B``, ``A - B``, ``c * A``, ``A * c``, ``A / c``, ``-A`` and the damping shift
  ``A.damped(λ)`` :math:`= A + \lambda I`, each an operator whose product with [P, K] is one product of
  every operand with the same [P, K] (``fisherext.linalg.InverseOperator`` gives
  :math:`(A + \lambda I)^{-1}` by conjugate gradients).

Solvers and spectral methods (``fisherext.linalg.solvers``, ``fisherext.linalg.spectral``) use only ``A @ X`` and
``A.shape``, so any subclass works with all of them. Products with several columns at once should be
implemented as such when the operator can batch them (one pass over the data for K vectors).
"""
from __future__ import annotations

import math
import numbers

import torch
from .._core.entry import entry_point, entry_points

#: The largest P² that ``LinearOperator.dense`` assembles by default: 64 Mi entries, 512 MiB in float64.
DEFAULT_MAX_ELEMENTS = 1 << 26


def check_columns(name: str, X, A, ndims: tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """``X`` as columns for the operator ``A``: a floating-point tensor of ``ndims`` dimensions ([P] and/or
    [P, K]) on A's device, returned in A's dtype; TypeError/ValueError naming ``name`` otherwise."""
    P = A.shape[0]
    want = " or ".join({1: f"[{P}]", 2: f"[{P}, K]"}[n] for n in ndims)
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of shape {want}, got {type(X).__name__}")
    if not X.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {X.dtype}")
    if X.dim() not in ndims or X.shape[0] != P:
        raise ValueError(f"{name}: expected shape {want} (P = {P}), got {tuple(X.shape)}")
    # an operator declared on "cuda" (no index) accepts its inputs on the current CUDA device
    device = A.device
    if X.device.type != device.type or (
            device.index is not None and X.device.index is not None and X.device != device):
        raise ValueError(f"{name}: is on {X.device} but the operator is on {device}")
    return X.to(A.dtype)


def check_damping(damping) -> float:
    """The absolute damping λ of :math:`A + \\lambda I`: a finite real number ≥ 0 (ValueError otherwise)."""
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not (
            math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping: must be finite and >= 0 (the absolute λ of A + λI), got {damping!r}")
    return float(damping)


@entry_points
class LinearOperator:
    r"""Abstract symmetric operator :math:`A \in \mathbb{R}^{P \times P}` over flat parameter vectors.

    Subclasses implement ``_matmat(X)``: X [P, K] (already validated: a tensor of the operator's dtype on
    its device) -> A X [P, K]. Inputs of another floating dtype are converted to the operator's dtype;
    inputs on another device are refused. The operators of the package (``HessianOperator``,
    ``GGNOperator``, ``FisherOperator``, ``FisherMatrix``, ``DenseOperator``) and the results of the
    algebra (``A + B``, ``c * A``, ``A.damped(λ)``) are all subclasses.

    Args:
        P: the number of rows and columns, a positive integer.
        dtype: the floating-point dtype of the products.
        device: the device of the products.

    Raises:
        ValueError: on P < 1 or not an integer.
        TypeError: on a dtype that is not floating-point.
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
        """(P, P)."""
        return (self._P, self._P)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the products."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The device of the products."""
        return self._device

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        r""":math:`A X` for K columns at once.

        Args:
            X: [P, K] floating-point, on the operator's device (converted to its dtype).

        Returns:
            :math:`A X`, [P, K] in the operator's dtype.

        Raises:
            TypeError: X is no floating-point tensor.
            ValueError: X has another shape, or is on another device.
        """
        return self._product(check_columns("X", X, self, (2,)))

    def _product(self, X: torch.Tensor) -> torch.Tensor:
        """``_matmat`` of a checked X [P, K], its result's shape checked: a broken subclass would otherwise
        surface as a confusing error far from its cause."""
        Y = self._matmat(X)
        if tuple(Y.shape) != tuple(X.shape):
            raise RuntimeError(f"{type(self).__name__}._matmat returned shape {tuple(Y.shape)} "
                               f"for an input of shape {tuple(X.shape)}")
        return Y

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        r""":math:`A v` for one vector (one product with a single column).

        Args:
            v: [P] floating-point, on the operator's device (converted to its dtype).

        Returns:
            :math:`A v`, [P] in the operator's dtype.

        Raises:
            TypeError: v is no floating-point tensor.
            ValueError: v has another shape, or is on another device.
        """
        return self._product(check_columns("v", v, self, (1,))[:, None])[:, 0]

    def __matmul__(self, X: torch.Tensor) -> torch.Tensor:
        if isinstance(X, torch.Tensor) and X.dim() == 2:
            return self.matmat(X)
        return self.mv(X)

    def _compatible(self, other) -> LinearOperator:
        """``other`` as an operator of this one's shape, dtype and device (the operands of a sum)."""
        if not isinstance(other, LinearOperator):
            raise TypeError(f"other: expected a LinearOperator to add, got {type(other).__name__} (wrap a "
                            "matrix in DenseOperator; add a multiple of the identity with A.damped(damping))")
        if other.shape != self.shape:
            raise ValueError(f"other: has shape {tuple(other.shape)} but the operator has {tuple(self.shape)}")
        if other.dtype != self.dtype:
            raise TypeError(f"other: has dtype {other.dtype} but the operator has {self.dtype} (convert one, "
                            "e.g. FisherMatrix.to(dtype))")
        if other.device != self.device:
            raise ValueError(f"other: is on {other.device} but the operator is on {self.device}")
        return other

    @entry_point(name="LinearOperator.__add__")
    def __add__(self, other: LinearOperator) -> SumOperator:
        """``A + B``: the :class:`SumOperator` of two operators of the same shape, dtype and device."""
        return SumOperator(self, other)

    @entry_point(name="LinearOperator.__sub__")
    def __sub__(self, other: LinearOperator) -> SumOperator:
        """``A - B`` = ``A + (-1) * B``."""
        return SumOperator(self, -self._compatible(other))

    @entry_point(name="LinearOperator.__mul__")
    def __mul__(self, c: float) -> ScaledOperator:
        """``A * c`` (and ``c * A``): the :class:`ScaledOperator` :math:`cA` for a real number c."""
        return ScaledOperator(self, c)

    __rmul__ = __mul__

    @entry_point(name="LinearOperator.__truediv__")
    def __truediv__(self, c: float) -> ScaledOperator:
        """``A / c`` = ``(1 / c) * A`` for a real number c ≠ 0."""
        if isinstance(c, numbers.Real) and not isinstance(c, bool):
            if c == 0:
                raise ValueError("c: cannot divide an operator by zero")
            c = 1 / c
        return ScaledOperator(self, c)

    def __neg__(self) -> ScaledOperator:
        return ScaledOperator(self, -1.0)

    def damped(self, damping: float) -> DampedOperator:
        r"""The damping shift :math:`A + \lambda I`.

        Args:
            damping: the absolute :math:`\lambda \ge 0`.

        Returns:
            a :class:`DampedOperator`; its product with X [P, K] is one product of A plus
            :math:`\lambda X`.

        Raises:
            ValueError: damping negative or not finite.
        """
        return DampedOperator(self, damping)

    def dense(self, *, max_elements: int = DEFAULT_MAX_ELEMENTS, block_size: int | None = None) -> torch.Tensor:
        r"""The P×P matrix, as :math:`A\,[e_i \dots e_j]` over blocks of identity columns (P columns in all).

        Args:
            max_elements: refuse when :math:`P^2` exceeds this.
            block_size: columns per product; default about :math:`2^{20}` entries per block, at least one
                column.

        Returns:
            the matrix [P, P] in the operator's dtype and device.

        Raises:
            ValueError: when :math:`P^2 >` ``max_elements`` (before any product), naming the bytes needed.
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
        """A ``scipy.sparse.linalg.LinearOperator`` view of the operator.

        Returns:
            a scipy operator taking and returning float64 numpy arrays, converted to this operator's dtype
            and device for each product; ``rmatvec`` is ``matvec`` (the operator is symmetric).

        Raises:
            ImportError: scipy is not installed.
        """
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


def _check_matrix(name: str, M) -> torch.Tensor:
    """M as the matrix of a DenseOperator: a finite, square, symmetric floating-point tensor."""
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"{name}: expected a square tensor, got {type(M).__name__}")
    if not M.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {M.dtype}")
    if M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty square matrix, got shape {tuple(M.shape)}")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name}: has non-finite entries")
    # the spectral methods assume symmetry; a loose check (√eps relative) still lets autograd Hessians,
    # symmetric up to rounding, through
    scale = M.abs().max()
    if (M - M.T).abs().max() > torch.finfo(M.dtype).eps ** 0.5 * scale:
        raise ValueError(f"{name}: must be symmetric (a curvature operator); got max |M - M^T| = "
                         f"{(M - M.T).abs().max().item():.3g} with max |M| = {scale.item():.3g}")
    return M


@entry_points
class DenseOperator(LinearOperator):
    r"""An explicit symmetric matrix :math:`M \in \mathbb{R}^{P \times P}` as an operator,
    :math:`X \mapsto M X` (small problems, tests, references).

    Args:
        M: [P, P] floating-point, finite and symmetric up to :math:`\sqrt{\epsilon}` relative (an autograd
            Hessian, symmetric up to rounding, passes).

    Raises:
        TypeError: M is no floating-point tensor.
        ValueError: M is not square, empty, not finite or not symmetric.
    """

    def __init__(self, M: torch.Tensor):
        M = _check_matrix("M", M)
        super().__init__(M.shape[0], M.dtype, M.device)
        self.M = M

    def _matmat(self, X):
        return self.M @ X


@entry_points
class SumOperator(LinearOperator):
    r"""The sum :math:`\sum_i A_i` of operators of one shape, dtype and device (what ``A + B`` returns).

    A product with X [P, K] is one product of every term with the same X. Sums of sums are flattened.

    Args:
        *operators: at least one LinearOperator, all of the same shape, dtype and device.

    Raises:
        TypeError: an operand is no LinearOperator, or the dtypes differ.
        ValueError: no operand, or the shapes or devices differ.
    """

    def __init__(self, *operators: LinearOperator):
        if not operators:
            raise ValueError("operators: a sum needs at least one operator")
        terms = []
        for A in operators:
            terms.extend(A.terms if isinstance(A, SumOperator) else [A])
        if not isinstance(terms[0], LinearOperator):
            raise TypeError(f"operators: expected LinearOperators, got {type(terms[0]).__name__}")
        first = terms[0]
        for other in terms[1:]:
            first._compatible(other)
        super().__init__(first.shape[0], first.dtype, first.device)
        self.terms = tuple(terms)

    def _matmat(self, X):
        Y = self.terms[0].matmat(X)
        for A in self.terms[1:]:
            Y = Y + A.matmat(X)
        return Y


@entry_points
class ScaledOperator(LinearOperator):
    r"""The multiple :math:`c\,A` of an operator by a real number (what ``c * A``, ``A / c`` and ``-A``
    return); multiples of multiples fold into one coefficient.

    Args:
        operator: the LinearOperator A.
        c: the real number (a Python or numpy number; not a tensor, not a bool).

    Raises:
        TypeError: operator is no LinearOperator, or c no finite real number.
    """

    def __init__(self, operator: LinearOperator, c: float):
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"operator: expected a LinearOperator, got {type(operator).__name__}")
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
            hint = " (use A @ X for a product with a tensor)" if isinstance(c, torch.Tensor) else ""
            raise TypeError(f"c: expected a finite real number, got {type(c).__name__}{hint}")
        if isinstance(operator, ScaledOperator):
            operator, c = operator.operator, operator.coefficient * c
        super().__init__(operator.shape[0], operator.dtype, operator.device)
        self.operator, self.coefficient = operator, float(c)

    def _matmat(self, X):
        return self.coefficient * self.operator.matmat(X)


@entry_points
class DampedOperator(LinearOperator):
    r"""The damping shift :math:`A + \lambda I` (what ``A.damped(λ)`` returns).

    A product with X [P, K] is one product of A plus :math:`\lambda X`.

    Args:
        operator: the LinearOperator A.
        damping: the absolute :math:`\lambda \ge 0`.

    Raises:
        TypeError: operator is no LinearOperator.
        ValueError: damping negative or not finite.
    """

    def __init__(self, operator: LinearOperator, damping: float):
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"operator: expected a LinearOperator, got {type(operator).__name__}")
        self.damping = check_damping(damping)
        super().__init__(operator.shape[0], operator.dtype, operator.device)
        self.operator = operator

    def _matmat(self, X):
        return torch.add(self.operator.matmat(X), X, alpha=self.damping)


@entry_point
def as_operator(A) -> LinearOperator:
    """``A`` as a LinearOperator (what every solver and spectral method calls on its operator).

    Args:
        A: a LinearOperator (``HessianOperator``, ``GGNOperator``, ``FisherOperator``, a ``FisherMatrix``,
            the result of operator algebra ...), returned as is; or a square symmetric floating-point
            tensor [P, P], wrapped in a :class:`DenseOperator`.

    Returns:
        the LinearOperator.

    Raises:
        TypeError: A is neither, or a tensor that is not floating-point.
        ValueError: a tensor that is not square, not finite or not symmetric.
    """
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, torch.Tensor):
        return DenseOperator(_check_matrix("A", A))
    raise TypeError(f"A: expected a LinearOperator, a square tensor or a FisherMatrix, got {type(A).__name__}")


__all__ = ["DEFAULT_MAX_ELEMENTS", "DampedOperator", "DenseOperator", "LinearOperator", "ScaledOperator", "SumOperator",
           "as_operator"]
