"""Linear algebra on symmetric operators over flat parameter vectors: the ``LinearOperator`` protocol and
its algebra (sums, multiples, the damping shift, the CG inverse), solvers (``cg``, ``lissa``, ``neumann``)
and spectral methods (power iteration, Lanczos, Hutchinson, SLQ)."""
from . import linop, solvers, spectral
from .linop import DampedOperator, DenseOperator, LinearOperator, ScaledOperator, SumOperator, as_operator
from .solvers import InverseOperator

__all__ = ["DampedOperator", "DenseOperator", "InverseOperator", "LinearOperator", "ScaledOperator",
           "SumOperator", "as_operator", "linop", "solvers", "spectral"]
