"""The ``fisherext`` impls: one public call each, in the signatures of ``bench.loops`` (which states the math).

``kfac`` returns the Kronecker parts of ``fisher(structure="kfac")`` (one per Linear/Conv2d weight, the
bias as the last row and column of A), in parameter order; ``ewc`` streams the data set through a
DataLoader of ``EWC_BATCH`` samples into ``fisherext.ewc.EWC.consolidate``, as a continual-learning run
consolidates a task.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fisherext

from .loops import FD_EPS

EWC_BATCH = 256


def diag(kind):
    def run(model, x, y):
        return fisherext.fisher(model, (x, y), kind=kind, structure="diag").diag()
    return run


def full_empirical(model, x, y):
    return fisherext.fisher(model, (x, y), kind="empirical", structure="full").dense(copy=False)


def kfac(model, x, y):
    parts = [part for part in fisherext.fisher(model, (x, y), kind="true", structure="kfac").parts
             if part.kind == "kron"]
    return [(part.A, part.G) for part in sorted(parts, key=lambda part: int(part.idx.min()))]


def trace_true(model, x, y):
    return fisherext.per_sample_fisher(model, x, y, kind="true", quantity="trace")


def quad_true(model, x, y, v):
    return fisherext.per_sample_fisher(model, x, y, kind="true", quantity="quad", v=v)


def fd_quad(model, x, y, v):
    return fisherext.fd_quadratic(model, x, v, eps=FD_EPS)


def hvp(model, x, y, V):
    return fisherext.hvp(model, F.cross_entropy, (x, y), V)


def ggn(model, x, y, V):
    return fisherext.hvp(model, F.cross_entropy, (x, y), V, curvature="ggn")


def ewc(model, x, y):
    loader = DataLoader(TensorDataset(x, y), batch_size=EWC_BATCH)
    return fisherext.ewc.EWC(model, lam=1.0).consolidate(loader).diag()  # EWC's own consolidation


FISHEREXT = {
    "diag_empirical": diag("empirical"), "diag_true": diag("true"), "full_empirical": full_empirical,
    "kfac": kfac, "trace_true": trace_true, "quad_true": quad_true, "fd_quad": fd_quad, "hvp": hvp, "ggn": ggn,
    "ewc": ewc,
}
