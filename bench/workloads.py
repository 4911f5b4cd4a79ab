"""What the benchmark measures: workloads, each a set of impls computing one quantity on one input.

A ``Workload`` builds its inputs (seeded, float32, on the CPU; fresh at each call, so that every impl,
each in its own process, sees the same numbers), maps impl names to callables taking those inputs, and
names the float64 ``reference`` every impl's result is compared with. The
registry gathers the four groups: ``bench.matrix`` (models × quantities), ``bench.kernels`` (each
compiled op against its pure-PyTorch twin), ``bench.influence`` and ``bench.applications``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .compare import relative_error

# Every impl name a row may carry: the project's, the seed-style baseline, torch.func, the twins of the
# compiled ops, and the peers of bench.peers.
IMPLS = ("fisherext", "autograd-loop", "torch.func", "twin", "backpack", "nngeometry", "curvlinops", "opacus",
         "asdl")


@dataclass(frozen=True)
class Subset:
    """An impl run on part of the inputs, its time scaled to the whole (the tables say so).

    ``take`` gives the inputs it runs on, ``expected`` the matching part of the reference, ``scale``
    the factor from its time to that of the full workload.
    """
    take: Callable[[dict], dict]
    expected: Callable[[object], object]
    scale: float
    note: str


@dataclass(frozen=True)
class Workload:
    name: str                                  # e.g. "diag_true(mlp,N=1024)": unique, what --only and rows use
    group: str                                 # "models", "kernels" or "influence"
    quantity: str
    build: Callable[[], dict]                  # the inputs, float32 on the CPU
    impls: dict[str, Callable]
    reference: Callable | None                 # takes the inputs in float64; None: no rel_err
    baseline: str = "autograd-loop"            # the impl the speed-ups are taken against
    model: str | None = None
    N: int | None = None
    compare: Callable = relative_error
    subsets: dict[str, Subset] = field(default_factory=dict)
    reference_note: str = ""
    keywords: bool = False                     # impls take the inputs by name (the ops), else in build order

    def call(self, fn: Callable, inputs: dict):
        """fn on the inputs: by name, or positionally in build order (the peers' interface: model, x, y, v)."""
        return fn(**inputs) if self.keywords else fn(*inputs.values())

    @property
    def tags(self) -> set[str]:
        """The --only tokens that select this workload."""
        tags = {self.name, self.quantity, self.group}
        if self.model:
            tags |= {self.model, f"{self.quantity}:{self.model}"}
        return tags


def to_device(inputs: dict, device) -> dict:
    # A model moves like a tensor; a float (a step size, a decay) stays as it is.
    return {k: v.to(device) if isinstance(v, (torch.Tensor, nn.Module)) else v for k, v in inputs.items()}


def as_float64(inputs: dict) -> dict:
    """Floating-point tensors and models in float64; integer tensors (labels, tokens) as they are."""
    def convert(v):
        if isinstance(v, nn.Module):
            return v.double()
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.double()
        return v
    return {k: convert(v) for k, v in inputs.items()}


@functools.lru_cache(maxsize=2)
def all_workloads(quick: bool) -> tuple[Workload, ...]:
    from . import applications, influence, kernels, matrix
    workloads = (*matrix.workloads(quick), *influence.workloads(quick), *applications.workloads(quick),
                 *kernels.workloads(quick))
    names = [w.name for w in workloads]
    assert len(set(names)) == len(names), "workload names must be unique"
    return workloads


def select(tokens: list[str] | None, quick: bool) -> list[Workload]:
    """The workloads any token selects (a full name, a quantity, a model, ``quantity:model``, a group, an
    op); all of them for no tokens. ValueError for a token that selects nothing."""
    workloads = all_workloads(quick)
    if not tokens:
        return list(workloads)
    unknown = [t for t in tokens if not any(t in w.tags for w in workloads)]
    if unknown:
        known = sorted(set().union(*(w.tags - {w.name} for w in workloads)))
        raise ValueError(f"unknown workload(s) {unknown}; choose a workload name or one of {known}")
    return [w for w in workloads if w.tags & set(tokens)]


def by_name(name: str, quick: bool) -> Workload:
    for workload in all_workloads(quick):
        if workload.name == name:
            return workload
    raise KeyError(f"no workload named {name!r} (quick={quick})")
