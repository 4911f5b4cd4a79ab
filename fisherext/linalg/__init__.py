"""Linear algebra on symmetric operators over flat parameter vectors: the ``LinearOperator`` protocol,
solvers (``cg``, ``lissa``, ``neumann``) and spectral methods (power iteration, Lanczos, Hutchinson, SLQ)."""
from . import linop, solvers, spectral
from .linop import DenseOperator, LinearOperator, as_operator

__all__ = ["DenseOperator", "LinearOperator", "as_operator", "linop", "solvers", "spectral"]
