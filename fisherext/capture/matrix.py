r"""FisherMatrix: a P×P curvature matrix stored as a block-diagonal sum of parts.

Every structure is block-diagonal over its parts, each acting on its own set of flat-vector
positions ``idx``: a diagonal (``DiagPart``), a dense symmetric block (``DensePart``), or a Kronecker
product :math:`G \otimes A` over a weight matrix laid out as ``idx`` [O, I] (``KronPart``, row-major
vec, so :math:`(G\otimes A)\,\mathrm{vec}(V) = \mathrm{vec}(G V A)`). Products, traces and damped
solves therefore work part by part, each part acting on all K columns of a product at once.

Precision: the parts hold the accumulation dtype of ``fisher`` (float32 for a float16/bfloat16 model or
one run under ``torch.autocast``), and the methods below that multiply or assemble them run with autocast
off, so that a FisherMatrix used inside an autocast region still computes in its own dtype.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .._core.checks import check_positive_int
from .._core.memory import require, resolve_budget
from ..linalg.linop import LinearOperator, check_columns, check_damping
from .._core.entry import entry_points
from .._core.precision import autocast_off


def _singular(what):
    return ValueError(f"solve: the {what} is singular; pass damping > 0")


class DiagPart:
    kind = "diag"
    fields = ("idx", "d")

    def __init__(self, idx: torch.Tensor, d: torch.Tensor):
        self.idx, self.d = idx, d

    def diag(self):
        return self.d

    def matmat(self, X):
        return self.d[:, None] * X

    def dense(self):
        return torch.diag(self.d)

    def trace(self):
        return self.d.sum()

    def solve(self, B, damping):
        denom = self.d + damping
        if (denom <= 0).any():
            raise _singular("diagonal Fisher")
        return B / denom[:, None]

    def tensors(self):
        return {"idx": self.idx, "d": self.d}

    def consistent(self) -> bool:
        return self.d.shape == (self.idx.numel(),)


class DensePart:
    kind = "dense"
    fields = ("idx", "M")

    def __init__(self, idx: torch.Tensor, M: torch.Tensor):
        self.idx, self.M = idx, M

    def diag(self):
        return self.M.diagonal()

    def matmat(self, X):
        return self.M @ X

    def dense(self):
        return self.M

    def trace(self):
        return self.M.diagonal().sum()

    def solve(self, B, damping):
        A = self.M + damping * torch.eye(self.M.shape[0], dtype=self.M.dtype, device=self.M.device)
        L, info = torch.linalg.cholesky_ex(A)
        if info.item() != 0:
            raise _singular("Fisher block")
        return torch.cholesky_solve(B, L)

    def tensors(self):
        return {"idx": self.idx, "M": self.M}

    def consistent(self) -> bool:
        return self.M.shape == (self.idx.numel(),) * 2


class KronPart:
    kind = "kron"
    fields = ("idx", "A", "G")

    def __init__(self, idx: torch.Tensor, A: torch.Tensor, G: torch.Tensor):
        self.idx, self.A, self.G = idx, A, G  # idx [O, I]: flat positions of the weight (bias as last column)

    def diag(self):
        return (self.G.diagonal()[:, None] * self.A.diagonal()[None, :]).reshape(-1)

    def _columns(self, X):
        """X [O·I, K] as K weight-shaped matrices [K, O, I] (row-major vec of each column)."""
        return X.T.reshape(X.shape[1], self.G.shape[0], self.A.shape[0])

    def matmat(self, X):
        # (G ⊗ A) vec(V) = vec(G V A) for all K columns in one batched product
        return (self.G @ self._columns(X) @ self.A).reshape(X.shape[1], X.shape[0]).T

    def dense(self):
        return torch.kron(self.G, self.A)

    def trace(self):
        return self.G.diagonal().sum() * self.A.diagonal().sum()

    def solve(self, B, damping):
        # (G ⊗ A + λI)⁻¹ exactly, through the eigendecompositions of the two factors.
        lg, Qg = torch.linalg.eigh(self.G)
        la, Qa = torch.linalg.eigh(self.A)
        denom = lg[:, None] * la[None, :] + damping
        if (denom <= 0).any():
            raise _singular("Kronecker-factored Fisher")
        X = Qg @ ((Qg.T @ self._columns(B) @ Qa) / denom) @ Qa.T
        return X.reshape(B.shape[1], B.shape[0]).T

    def tensors(self):
        return {"idx": self.idx, "A": self.A, "G": self.G}

    def consistent(self) -> bool:
        return (self.idx.dim() == 2 and self.G.shape == (self.idx.shape[0],) * 2
                and self.A.shape == (self.idx.shape[1],) * 2)


_PARTS = {cls.kind: cls for cls in (DiagPart, DensePart, KronPart)}
_STATE_KEYS = ("P", "num_samples", "structure", "parts")


def _part_from_state(i: int, entry, P: int):
    """Part i of a state dict, checked: its kind, its fields (tensors), their shapes, idx within [0, P)."""
    if not isinstance(entry, Mapping):
        raise TypeError(f"state: part {i} must be a dict, got {type(entry).__name__}")
    kind = entry.get("kind")
    if kind not in _PARTS:
        raise ValueError(f"state: part {i} has kind {kind!r}; expected one of {', '.join(map(repr, _PARTS))}")
    cls = _PARTS[kind]
    missing = [f for f in cls.fields if f not in entry]
    if missing:
        raise ValueError(f"state: part {i} ({kind}) lacks {', '.join(map(repr, missing))}")
    for f in cls.fields:
        if not isinstance(entry[f], torch.Tensor):
            raise TypeError(f"state: part {i} ({kind}) field {f!r} must be a tensor, got {type(entry[f]).__name__}")
    part = cls(**{f: entry[f] for f in cls.fields})
    idx = part.idx
    if idx.is_floating_point() or idx.is_complex() or (idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < P):
        raise ValueError(f"state: part {i} ({kind}) has 'idx' outside the integer positions [0, {P})")
    if not part.consistent():
        shapes = ", ".join(f"{f} {tuple(entry[f].shape)}" for f in cls.fields)
        raise ValueError(f"state: part {i} ({kind}) has inconsistent shapes: {shapes}")
    return part


def _span(idx: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) when the positions ``idx`` are start, start + 1, ..., stop - 1 in order; else None."""
    i = idx.reshape(-1)
    if i.numel() == 0:
        return None
    start = int(i[0])
    return (start, start + i.numel()) if torch.equal(i, torch.arange(start, start + i.numel(), device=i.device)) else None


@entry_points
class FisherMatrix(LinearOperator):
    r"""The result of ``fisherext.fisher``: a P×P Fisher :math:`F = \frac1N \sum_n F_n` (mean over
    ``num_samples`` = N samples), block-diagonal over its parts (see :mod:`fisherext.capture.matrix`).

    A LinearOperator: ``F @ v`` ([P]) and ``F @ X`` ([P, K]) are exact products (one batched product per
    part for all K columns), and it works with the algebra (``F + G``, ``c * F``, ``F.damped(λ)``), the
    solvers and the spectral methods. Flat vectors follow the order of the selected parameters
    (``fisherext.flatten``). Vectors of another floating dtype (a bfloat16 model's) are converted to the
    Fisher's dtype (float32 for half-precision parameters).

    Args:
        P: the number of parameters.
        parts: the ``DiagPart`` / ``DensePart`` / ``KronPart`` blocks, on disjoint positions.
        num_samples: N, the number of samples averaged.
        structure: the structure it was computed with ("diag", "full", "block", "kfac").
    """

    def __init__(self, P: int, parts: list, num_samples: int, structure: str):
        self.P, self.parts, self.num_samples, self.structure = P, parts, num_samples, structure

    @property
    def dtype(self):
        """The dtype of the stored values."""
        return self._ref().dtype

    @property
    def device(self):
        """The device of the stored values."""
        return self._ref().device

    @property
    def shape(self):
        """(P, P)."""
        return (self.P, self.P)

    def _ref(self):
        first = self.parts[0].tensors()
        return next(t for k, t in first.items() if k != "idx")

    def _scatter(self, per_part, columns: tuple[int, ...] = ()) -> torch.Tensor:
        """[P] (or [P, K] for ``columns`` = (K,)), zero outside the parts, from each part's values."""
        out = torch.zeros((self.P, *columns), dtype=self.dtype, device=self.device)
        for part, values in zip(self.parts, per_part):
            out[part.idx.reshape(-1)] = values
        return out

    @autocast_off
    def _per_part(self, method: str, X: torch.Tensor, *args) -> torch.Tensor:
        """``part.<method>(rows of X, *args)`` of every part on X [P, K], scattered back to [P, K]."""
        return self._scatter((getattr(part, method)(X[part.idx.reshape(-1)], *args) for part in self.parts),
                             (X.shape[1],))

    @autocast_off
    def diag(self) -> torch.Tensor:
        r"""The diagonal :math:`(F_{ii})_i`.

        Returns:
            [P] in the Fisher's dtype and device.
        """
        return self._scatter(part.diag() for part in self.parts)

    @autocast_off
    def dense(self, memory_budget: int | None = None, *, copy: bool = True) -> torch.Tensor:
        """The full P×P matrix (zero outside the structure's blocks).

        Args:
            memory_budget: bytes; default half the available memory (``fisherext._core.memory``).
            copy: False returns a ``structure="full"`` Fisher's own matrix, not a copy of it (one P×P pass
                and P² of memory saved; writing to it changes this Fisher). Other structures assemble a new
                matrix either way.

        Returns:
            [P, P] in the Fisher's dtype and device.

        Raises:
            ValueError: up front, with the bytes it needs, when the matrix does not fit ``memory_budget``.
            TypeError: memory_budget is no number of bytes.
        """
        budget = resolve_budget(memory_budget, self.device)
        require(self.P * self.P * self.dtype.itemsize, budget, f"memory_budget: the dense {self.P} x {self.P} matrix",
                "diag(), mv(), quad(), trace() and solve() need no P x P matrix; or pass a larger memory_budget")
        spans = [_span(part.idx) for part in self.parts]
        if len(self.parts) == 1 and spans[0] == (0, self.P):  # one part over every position in order (full)
            M = self.parts[0].dense()
            return M.clone() if copy else M
        out = torch.zeros(self.P, self.P, dtype=self.dtype, device=self.device)
        for part, span in zip(self.parts, spans):
            if span is None:
                i = part.idx.reshape(-1)
                out[i[:, None], i[None, :]] = part.dense()
            else:  # a block on consecutive positions (block and diag parts, mostly): a copy, no scatter
                out[span[0]:span[1], span[0]:span[1]] = part.dense()
        return out

    def _matmat(self, X):
        return self._per_part("matmat", X)

    def quad(self, v: torch.Tensor) -> torch.Tensor:
        r"""The quadratic form :math:`v^\top F v` (no ½: the KL divergence is :math:`\frac12 \Delta^\top F \Delta`).

        Args:
            v: [P] one direction, or [P, K] K directions as columns.

        Returns:
            a 0-d tensor for v [P], [K] (:math:`v_k^\top F v_k` per column) for v [P, K]; in the Fisher's
            dtype and device (no host sync).

        Raises:
            TypeError: v is no floating-point tensor.
            ValueError: v has another shape, or is on another device.
        """
        V = check_columns("v", v, self)
        return (V * (self @ V)).sum(0)

    @autocast_off
    def trace(self) -> torch.Tensor:
        r"""The trace :math:`\mathrm{tr}\,F = \sum_i F_{ii}` (a Kronecker part contributes
        :math:`\mathrm{tr}\,G \cdot \mathrm{tr}\,A`).

        Returns:
            a 0-d tensor in the Fisher's dtype and device (no host sync).
        """
        return torch.stack([part.trace() for part in self.parts]).sum()

    def solve(self, b: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        r"""x with :math:`(F + \lambda I)\,x = b`, exactly for every structure (part by part: a diagonal
        divides, a dense block is Cholesky-factored, a Kronecker part :math:`G \otimes A` is solved through
        the eigendecompositions of G and A).

        Args:
            b: [P] or [P, K] (K right-hand sides as columns).
            damping: the absolute :math:`\lambda \ge 0`.

        Returns:
            x, the shape of b, in the Fisher's dtype and device.

        Raises:
            TypeError: b is no floating-point tensor.
            ValueError: b has another shape or device; damping negative or not finite; a part of
                :math:`F + \lambda I` is singular (pass damping > 0).
        """
        B = check_columns("b", b, self)
        damping = check_damping(damping)
        X = self._per_part("solve", B if B.dim() == 2 else B[:, None], damping)
        return X if B.dim() == 2 else X[:, 0]

    def state_dict(self) -> dict:
        return {"P": self.P, "num_samples": self.num_samples, "structure": self.structure,
                "parts": [{"kind": part.kind, **part.tensors()} for part in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        """Replaces this matrix by ``state`` (from ``state_dict()``), checked in full before anything is
        replaced: ValueError/TypeError naming ``state`` (missing keys, unknown part kinds, shapes)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected the dict of FisherMatrix.state_dict(), got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"state: missing keys {', '.join(map(repr, missing))} (a FisherMatrix state has "
                             f"{', '.join(map(repr, _STATE_KEYS))})")
        P = check_positive_int("state['P']", state["P"])
        num_samples = check_positive_int("state['num_samples']", state["num_samples"])
        entries = state["parts"]
        if not isinstance(entries, (list, tuple)) or not entries:
            raise ValueError(f"state: 'parts' must be a non-empty list, got {entries!r}")
        parts = [_part_from_state(i, entry, P) for i, entry in enumerate(entries)]
        self.P, self.num_samples, self.structure, self.parts = P, num_samples, state["structure"], parts

    def to(self, *args, **kwargs) -> FisherMatrix:
        """A copy with values converted like ``Tensor.to`` (index tensors only change device)."""
        parts = []
        for part in self.parts:
            fields = {}
            for k, t in part.tensors().items():
                moved = t.to(*args, **kwargs)
                fields[k] = moved.to(t.dtype) if k == "idx" else moved
            parts.append(type(part)(**fields))
        return FisherMatrix(self.P, parts, self.num_samples, self.structure)

    def __repr__(self):
        return (f"FisherMatrix(P={self.P}, structure={self.structure!r}, num_samples={self.num_samples}, "
                f"dtype={self.dtype}, device={self.device})")
