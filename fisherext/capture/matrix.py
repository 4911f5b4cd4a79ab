r"""FisherMatrix: a P×P curvature matrix stored as a block-diagonal sum of parts.

Every structure is block-diagonal over its parts, each acting on its own set of flat-vector
positions ``idx``: a diagonal (``DiagPart``), a dense symmetric block (``DensePart``), or a Kronecker
product :math:`G \otimes A` over a weight matrix laid out as ``idx`` [O, I] (``KronPart``, row-major
vec, so :math:`(G\otimes A)\,\mathrm{vec}(V) = \mathrm{vec}(G V A)`). Products, traces and damped
solves therefore work part by part.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .._core.checks import check_positive_int
from .._core.memory import require, resolve_budget
from ..linalg.linop import LinearOperator
from .._core.entry import entry_points


def _singular(what):
    return ValueError(f"solve: the {what} is singular; pass damping > 0")


class DiagPart:
    kind = "diag"
    fields = ("idx", "d")

    def __init__(self, idx: torch.Tensor, d: torch.Tensor):
        self.idx, self.d = idx, d

    def diag(self):
        return self.d

    def mv(self, v):
        return self.d * v

    def dense(self):
        return torch.diag(self.d)

    def trace(self):
        return self.d.sum()

    def solve(self, b, damping):
        denom = self.d + damping
        if (denom <= 0).any():
            raise _singular("diagonal Fisher")
        return b / denom

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

    def mv(self, v):
        return self.M @ v

    def dense(self):
        return self.M

    def trace(self):
        return self.M.diagonal().sum()

    def solve(self, b, damping):
        A = self.M + damping * torch.eye(self.M.shape[0], dtype=self.M.dtype, device=self.M.device)
        L, info = torch.linalg.cholesky_ex(A)
        if info.item() != 0:
            raise _singular("Fisher block")
        return torch.cholesky_solve(b[:, None], L)[:, 0]

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

    def mv(self, v):
        V = v.view(self.G.shape[0], self.A.shape[0])
        return (self.G @ V @ self.A).reshape(-1)

    def dense(self):
        return torch.kron(self.G, self.A)

    def trace(self):
        return self.G.diagonal().sum() * self.A.diagonal().sum()

    def solve(self, b, damping):
        # (G ⊗ A + λI)⁻¹ exactly, through the eigendecompositions of the two factors.
        lg, Qg = torch.linalg.eigh(self.G)
        la, Qa = torch.linalg.eigh(self.A)
        denom = lg[:, None] * la[None, :] + damping
        if (denom <= 0).any():
            raise _singular("Kronecker-factored Fisher")
        B = b.view(self.G.shape[0], self.A.shape[0])
        return (Qg @ ((Qg.T @ B @ Qa) / denom) @ Qa.T).reshape(-1)

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


@entry_points
class FisherMatrix(LinearOperator):
    """The result of ``fisherext.fisher``: a P×P Fisher (mean over ``num_samples`` samples).

    Flat vectors follow the order of the selected parameters (``fisherext.flatten``).
    """

    def __init__(self, P: int, parts: list, num_samples: int, structure: str):
        self.P, self.parts, self.num_samples, self.structure = P, parts, num_samples, structure

    @property
    def dtype(self):
        return self._ref().dtype

    @property
    def device(self):
        return self._ref().device

    @property
    def shape(self):
        return (self.P, self.P)

    def _ref(self):
        first = self.parts[0].tensors()
        return next(t for k, t in first.items() if k != "idx")

    def _vector(self, v, name="v"):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor of length {self.P}, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {v.dtype}")
        if v.dim() != 1 or v.shape[0] != self.P:
            raise ValueError(f"{name}: expected a vector of length {self.P}, got shape {tuple(v.shape)}")
        if v.device != self.device:
            raise ValueError(f"{name}: is on {v.device} but the Fisher is on {self.device}")
        return v.to(self.dtype)

    def _scatter(self, per_part) -> torch.Tensor:
        out = torch.zeros(self.P, dtype=self.dtype, device=self.device)
        for part, values in zip(self.parts, per_part):
            out[part.idx.reshape(-1)] = values
        return out

    def diag(self) -> torch.Tensor:
        """The diagonal [P]."""
        return self._scatter(part.diag() for part in self.parts)

    def dense(self, memory_budget: int | None = None) -> torch.Tensor:
        """The full P×P matrix (zero outside the structure's blocks). Planned against ``memory_budget``
        (bytes; default half the available memory, ``fisherext._core.memory``): refused up front, with the
        bytes it needs, when it does not fit."""
        budget = resolve_budget(memory_budget, self.device)
        require(self.P * self.P * self.dtype.itemsize, budget, f"memory_budget: the dense {self.P} x {self.P} matrix",
                "diag(), mv(), quad(), trace() and solve() need no P x P matrix; or pass a larger memory_budget")
        out = torch.zeros(self.P, self.P, dtype=self.dtype, device=self.device)
        for part in self.parts:
            i = part.idx.reshape(-1)
            out[i[:, None], i[None, :]] = part.dense()
        return out

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """F v."""
        v = self._vector(v)
        return self._scatter(part.mv(v[part.idx.reshape(-1)]) for part in self.parts)

    def _matmat(self, X):
        return torch.stack([self.mv(x) for x in X.unbind(1)], 1) if X.shape[1] else X.clone()

    def quad(self, v: torch.Tensor) -> float:
        """vᵀ F v (no ½: the KL divergence is ½ ΔᵀFΔ)."""
        v = self._vector(v)
        return float(v @ self.mv(v))

    def trace(self) -> float:
        return float(sum(part.trace() for part in self.parts))

    def solve(self, b: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """x with (F + damping·I) x = b, exactly for every structure (part by part)."""
        b = self._vector(b, "b")
        if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping >= 0:
            raise ValueError(f"damping: must be a non-negative number, got {damping!r}")
        return self._scatter(part.solve(b[part.idx.reshape(-1)], float(damping)) for part in self.parts)

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
