"""Benchmark workloads: seeded inputs of a given size, and the implementations that compute the same thing.

A workload is one op at one size. Its ``impls`` map an implementation name (DESIGN.md's list:
``fisherext``, ``reference``, ``autograd-loop``, ``torch.func``, ``backpack``, ...) to a callable
taking the inputs as keyword arguments and returning the result; ``baseline`` names the impl that
the others are checked and timed against. Inputs are drawn on the CPU from a seeded generator and
then moved, so every impl and every device sees the same numbers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import fisherext


@dataclass(frozen=True)
class Workload:
    op: str
    build: Callable[..., dict]
    dims: dict
    impls: dict[str, Callable]
    baseline: str = "reference"
    quick_dims: dict | None = None  # smaller sizes for --quick and pytest-benchmark; None: the same
    seed: int = 0

    def sizes(self, quick: bool = False) -> dict:
        return self.quick_dims if quick and self.quick_dims is not None else self.dims

    def name(self, quick: bool = False) -> str:
        """E.g. ``linear_sq_grad(N=4096,T=16,I=64,O=64)``: the op and the sizes that run."""
        return f"{self.op}({','.join(f'{k}={v}' for k, v in self.sizes(quick).items())})"

    def inputs(self, device: torch.device | str = "cpu", quick: bool = False) -> dict:
        generator = torch.Generator().manual_seed(self.seed)
        built = self.build(generator, **self.sizes(quick))
        # Model-level workloads carry their nn.Module among the inputs; it moves like a tensor.
        return {k: v.to(device) if isinstance(v, (torch.Tensor, torch.nn.Module)) else v for k, v in built.items()}


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator)


def _positions(T):
    """T=None: a plain Linear ([N, I]); otherwise T sequence/spatial positions ([N, T, I])."""
    return () if T is None else (T,)


def _per_sample_mean(N):
    # The Fisher is the mean over samples (DESIGN.md), so the kernels are benchmarked with weight 1/N.
    return torch.full((N,), 1.0 / N)


def linear_sq_grad_inputs(generator, N, I, O, T=None):
    return {"a": _randn(generator, N, *_positions(T), I), "delta": _randn(generator, N, *_positions(T), O),
            "weight": _per_sample_mean(N)}


def linear_outer_accum_inputs(generator, N, I, O, T=None):
    return {"out": torch.zeros(O * I, O * I), **linear_sq_grad_inputs(generator, N, I, O, T)}


def class_gram_inputs(generator, N, C, I, O, T=None):
    return {"a": _randn(generator, N, *_positions(T), I), "delta": _randn(generator, N, C, *_positions(T), O)}


def sym_outer_accum_inputs(generator, N, D, T=None):
    return {"out": torch.zeros(D, D), "x": _randn(generator, N, *_positions(T), D)}


def kfac_factor_update_inputs(generator, N, D, decay, T=None):
    # A running-average factor starts from the identity (a damped prior), not from zeros.
    return {"factor": torch.eye(D), "x": _randn(generator, N, *_positions(T), D), "decay": decay}


def op_vs_twin(op: str, build: Callable[..., dict], dims: dict, quick_dims: dict | None = None) -> Workload:
    """A compiled op against its pure-PyTorch twin (the in-place op ``foo_``'s twin is ``foo``)."""
    impls = {"fisherext": getattr(fisherext.ops, op), "reference": getattr(fisherext.reference, op.rstrip("_"))}
    return Workload(op, build, dims, impls, quick_dims=quick_dims)


WORKLOADS: list[Workload] = [
    # A hidden layer of the digits MLP (PEERS.md): one GEMM for the kernel, N x O x I for the twin.
    op_vs_twin("linear_sq_grad", linear_sq_grad_inputs, dict(N=1024, I=256, O=256)),
    # A sequence layer at two batch sizes: the kernel's scratch must not grow with N, the twin's does.
    op_vs_twin("linear_sq_grad", linear_sq_grad_inputs, dict(N=256, T=16, I=64, O=64)),
    op_vs_twin("linear_sq_grad", linear_sq_grad_inputs, dict(N=4096, T=16, I=64, O=64)),
    # A 3x3 convolution, 32 -> 64 channels, on 8x8 images (unfolded: T = 64 positions, I = 32*3*3).
    op_vs_twin("linear_sq_grad", linear_sq_grad_inputs, dict(N=1024, T=64, I=288, O=64),
               quick_dims=dict(N=256, T=64, I=288, O=64)),
    # Per-input Gram over C = 10 classes, for a sequence layer and for the MLP's hidden layer.
    op_vs_twin("class_gram", class_gram_inputs, dict(N=256, C=10, T=16, I=64, O=64)),
    op_vs_twin("class_gram", class_gram_inputs, dict(N=256, C=10, I=256, O=256)),
    # Full Fisher of a 64 -> 48 layer: P = 3072, out is P x P.
    op_vs_twin("linear_outer_accum_", linear_outer_accum_inputs, dict(N=1024, I=64, O=48),
               quick_dims=dict(N=256, I=64, O=48)),
    # K-FAC input factor of a 256-wide layer with its bias column (D = 257), 4096 rows either way.
    op_vs_twin("sym_outer_accum_", sym_outer_accum_inputs, dict(N=4096, D=257)),
    op_vs_twin("kfac_factor_update_", kfac_factor_update_inputs, dict(N=256, T=16, D=257, decay=0.95)),
]


# The model-level workloads (the Fisher of an MLP against peers) live in their own module and add
# themselves to WORKLOADS; imported here, below WORKLOADS, so that every user of this registry sees them.
from . import fisher_workloads  # noqa: E402,F401
from . import perturb_workloads  # noqa: E402,F401
from . import hvp_workloads  # noqa: E402,F401
from . import influence_workloads  # noqa: E402,F401


def select(names: list[str] | None, quick: bool = False) -> list[Workload]:
    """The workloads named (by full name, or by op for all sizes of it); all of them for ``None``."""
    if not names:
        return list(WORKLOADS)
    known = {w.name(quick) for w in WORKLOADS} | {w.op for w in WORKLOADS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {sorted(known)}")
    return [w for w in WORKLOADS if w.op in names or w.name(quick) in names]


def by_name(name: str, quick: bool = False) -> Workload:
    for workload in WORKLOADS:
        if workload.name(quick) == name:
            return workload
    raise KeyError(f"no workload named {name!r} (quick={quick})")
