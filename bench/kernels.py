r"""Kernel workloads: each compiled op of ``fisherext.ops`` against its pure-PyTorch twin, and the
multi-tensor perturb/restore step against a loop over tensors.

Op against twin: ``fisherext`` is the op, ``twin`` its twin in ``fisherext.reference`` (the twin of the
in-place ``foo_`` is ``foo``); the reference is the twin in float64. The Fisher weights are 1/N (the
mean over samples). Sizes: a hidden layer of the digits MLP, a sequence layer at two batch sizes (the
kernel's scratch must not grow with N, the twin's does), an unfolded 3×3 convolution (T = 64 positions,
I = 32·3·3), the per-input class Gram, the full Fisher of a 64 → 48 layer (P = 3072), and K-FAC input
factors of a 256-wide layer with its bias column (D = 257).

``perturb_restore``: 128 parameter tensors of random sizes 1..max_size (256, 4096, 65536: per-tensor
overhead against memory traffic). ``fisherext``: ``ParameterPerturbation.set`` from the flat direction
(one ``unflatten_axpy_`` launch) and ``restore`` (one more); ``autograd-loop``: per tensor
``p.data.copy_(s); p.data.add_(v, alpha=ε)`` and ``p.data.copy_(s)``. The saved copy (and, for the loop,
the direction split per tensor) is made once per model, as in a finite-difference loop; each call returns
the perturbed value of the largest tensor. Where tensors are large the work is memory-bound and the
ratio tends to the bytes moved, 7 passes over the parameters for the loop against 5 for the kernels.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

import fisherext
from fisherext._core.perturbation import ParameterPerturbation

from .workloads import Workload

EPS = 1e-3


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator)


def _positions(T):
    """T=None: a plain Linear ([N, I]); otherwise T sequence/spatial positions ([N, T, I])."""
    return () if T is None else (T,)


def linear_sq_grad_inputs(generator, N, I, O, T=None):
    return {"a": _randn(generator, N, *_positions(T), I), "delta": _randn(generator, N, *_positions(T), O),
            "weight": torch.full((N,), 1.0 / N)}


def linear_outer_accum_inputs(generator, N, I, O, T=None):
    return {"out": torch.zeros(O * I, O * I), **linear_sq_grad_inputs(generator, N, I, O, T)}


def class_gram_inputs(generator, N, C, I, O, T=None):
    return {"a": _randn(generator, N, *_positions(T), I), "delta": _randn(generator, N, C, *_positions(T), O)}


def sym_outer_accum_inputs(generator, N, D, T=None):
    return {"out": torch.zeros(D, D), "x": _randn(generator, N, *_positions(T), D)}


def kfac_factor_update_inputs(generator, N, D, decay, T=None):
    # A running-average factor starts from the identity (a damped prior), not from zeros.
    return {"factor": torch.eye(D), "x": _randn(generator, N, *_positions(T), D), "decay": decay}


class TensorList(nn.Module):
    def __init__(self, tensors):
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(t) for t in tensors)


def restore_inputs(generator, tensors, max_size):
    sizes = torch.randint(1, max_size + 1, (tensors,), generator=generator).tolist()
    model = TensorList(torch.randn(s, generator=generator) for s in sizes)
    return {"model": model, "v": torch.randn(sum(sizes), generator=generator), "eps": EPS}


_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepared(model, v, kind):
    """Made once per model and reused by every call: the saved parameters, v split per tensor, and the
    largest parameter (whose perturbed value each call returns)."""
    key = (kind, id(v))
    cache = _STATE.setdefault(model, {})
    if key not in cache:
        params = list(model.parameters())
        largest = max(params, key=lambda p: p.numel())
        if kind == "fisherext":
            cache[key] = (ParameterPerturbation(list(model.named_parameters())), largest)
        else:
            vs = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]
            cache[key] = (params, [p.detach().clone() for p in params], vs, largest)
    return cache[key]


def fisherext_set_restore(model, v, eps):
    state, largest = _prepared(model, v, "fisherext")
    state.set(v, eps)
    probe = largest.detach().clone()
    state.restore()
    return probe


def loop_set_restore(model, v, eps):
    params, saved, vs, largest = _prepared(model, v, "loop")
    for p, s, t in zip(params, saved, vs):
        p.data.copy_(s)
        p.data.add_(t, alpha=eps)
    probe = largest.detach().clone()
    for p, s in zip(params, saved):
        p.data.copy_(s)
    return probe


def _workload(op: str, build: Callable[..., dict], dims: dict, impls: dict, reference: Callable, baseline: str):
    generator_inputs = lambda: build(torch.Generator().manual_seed(0), **dims)  # noqa: E731
    return Workload(name=f"{op}({','.join(f'{k}={v}' for k, v in dims.items())})", group="kernels", quantity=op,
                    build=generator_inputs, impls=impls, reference=reference, baseline=baseline, keywords=True)


def op_vs_twin(op: str, build: Callable[..., dict], dims: dict) -> Workload:
    twin = getattr(fisherext.reference, op.rstrip("_"))
    return _workload(op, build, dims, {"fisherext": getattr(fisherext.ops, op), "twin": twin}, twin, "twin")


def workloads(quick: bool) -> list[Workload]:
    small = dict(N=256) if quick else {}
    return [
        op_vs_twin("linear_sq_grad", linear_sq_grad_inputs, dict(N=1024, I=256, O=256)),
        op_vs_twin("linear_sq_grad", linear_sq_grad_inputs, dict(N=256, T=16, I=64, O=64)),
        op_vs_twin("linear_sq_grad", linear_sq_grad_inputs, dict(N=4096, T=16, I=64, O=64)),
        op_vs_twin("linear_sq_grad", linear_sq_grad_inputs, {**dict(N=1024, T=64, I=288, O=64), **small}),
        op_vs_twin("class_gram", class_gram_inputs, dict(N=256, C=10, T=16, I=64, O=64)),
        op_vs_twin("class_gram", class_gram_inputs, dict(N=256, C=10, I=256, O=256)),
        op_vs_twin("linear_outer_accum_", linear_outer_accum_inputs, {**dict(N=1024, I=64, O=48), **small}),
        op_vs_twin("sym_outer_accum_", sym_outer_accum_inputs, dict(N=4096, D=257)),
        op_vs_twin("kfac_factor_update_", kfac_factor_update_inputs, dict(N=256, T=16, D=257, decay=0.95)),
        *(_workload("perturb_restore", restore_inputs, dict(tensors=128, max_size=m),
                    {"fisherext": fisherext_set_restore, "autograd-loop": loop_set_restore}, loop_set_restore,
                    "autograd-loop")
          for m in (256, 4096, 65536)),
    ]
