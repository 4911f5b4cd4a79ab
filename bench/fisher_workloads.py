r"""Model-level workloads: the Fisher of the digits MLP by ``fisherext`` against what users would write instead.

Data: scikit-learn's digits (pixels / 16, float32), the first N samples, the set tiled where N > 1797.
Model: the MLP 64-256-256-10 of ``fisherext.experiments.demo`` (ReLU, seeded, eval mode, P = 85,002), as in PEERS.md.
Every impl returns the Fisher normalized as the mean over samples, flattened in ``model.parameters()``
order (the per-input trace: one value per input), so ``bench.run`` checks all of them against the baseline.

Optional, bench-only peers (not dependencies of fisherext; without them their rows record the ImportError)::

    pip install backpack-for-pytorch nngeometry    # measured with BackPACK 1.7.1, nngeometry 0.4

Adapter pitfalls (PEERS.md): BackPACK's SumGradSquared and BatchDiagGGNExact are 1/N too small under
reduction='mean', so every BackPACK impl here backpropagates reduction='sum' and divides by N itself;
nngeometry's ``FIM`` is the true Fisher only, so its empirical Fisher goes through the generic Jacobian
backend with the log-likelihood of the data label.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import fisherext
from fisherext.experiments.demo import build_mlp, load_digits_tensors
from fisherext import flatten

from .workloads import WORKLOADS, Workload

# Samples per torch.func Jacobian: [chunk, C, P] floats is 870 MB at 256; unchunked, N = 1024 would take 3.5 GB.
TORCH_FUNC_CHUNK = 256


# ---- inputs ----------------------------------------------------------------------------------------

def digits_inputs(generator, N, batch=None):
    """The model and the first N digits; ``batch`` (the mem workloads) becomes fisherext's batch_size.

    ``generator`` goes unused: the data set is fixed and ``build_mlp`` seeds the model itself, so every
    impl, in its own process, sees the same model and data.
    """
    x, y = load_digits_tensors()
    copies = -(-N // x.shape[0])  # tiling repeats samples, which changes nothing for timing or memory
    inputs = {"model": build_mlp(), "x": x.repeat(copies, 1)[:N], "y": y.repeat(copies)[:N]}
    return inputs if batch is None else {**inputs, "batch_size": batch}


def build_cnn(seed: int = 0) -> nn.Sequential:
    """Two 3×3 convolutions (16, 32 channels, padding 1) and a Linear head on the 8×8 digits: P = 25,354."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2048, 10)).eval()


def digits_cnn_inputs(generator, N):
    """``digits_inputs`` with the CNN of ``build_cnn`` instead of the MLP."""
    return {**digits_inputs(generator, N), "model": build_cnn()}


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


# ---- fisherext --------------------------------------------------------------------------------------

def fisherext_diag(kind):
    def run(model, x, y, batch_size=None):
        return fisherext.fisher(model, (x, y), kind=kind, structure="diag", batch_size=batch_size).diag()
    return run


def fisherext_trace(model, x, y):
    # fisherext.per_sample_fisher may be missing from an older checkout: then this raises and the row says so.
    from fisherext import per_sample_fisher
    return per_sample_fisher(model, x, kind="true", quantity="trace")


# ---- autograd loops (the seeds' way: batch size 1) --------------------------------------------------

def _label_grads(model, params, x1, y1):
    """Seed 003's term for one input [1, ...]: its gradient, weight 1 (with the data label, not the argmax)."""
    yield 1.0, torch.autograd.grad(nn.functional.cross_entropy(model(x1), y1), params)


def _class_grads(model, params, x1):
    """(p_c, ∇θ(−log p_c)) for each class c of one input [1, ...]: one backward pass per class (seed 001)."""
    log_p = torch.log_softmax(model(x1), dim=1)[0]
    p = log_p.detach().exp()
    C = log_p.shape[0]
    for c in range(C):
        yield p[c], torch.autograd.grad(-log_p[c], params, retain_graph=c < C - 1)


def _mean_weighted_squares(params, per_sample):
    """1/N Σ_n Σ_(w, g) w·g², flattened: the diagonal Fisher from each sample's (weight, gradient) terms."""
    sums = [torch.zeros_like(p) for p in params]
    count = 0
    for terms in per_sample:
        for weight, grads in terms:
            for s, g in zip(sums, grads):
                s.addcmul_(g, g, value=weight)
        count += 1
    return flatten(sums) / count


def empirical_diag_loop(model, x, y):
    params = _params(model)
    return _mean_weighted_squares(params, (_label_grads(model, params, x[n:n + 1], y[n:n + 1])
                                           for n in range(x.shape[0])))


def true_diag_loop(model, x, y):
    """diag F = 1/N Σ_n Σ_c p_nc g_nc²: the exact expectation over the labels (y unused)."""
    params = _params(model)
    return _mean_weighted_squares(params, (_class_grads(model, params, x[n:n + 1]) for n in range(x.shape[0])))


def trace_loop(model, x, y):
    """Seed 001's fisher_trace for every input: tr(F_n) = Σ_c p_c ‖g_c‖² (y unused)."""
    params = _params(model)
    return torch.stack([
        sum(p_c * sum(g.square().sum() for g in grads) for p_c, grads in _class_grads(model, params, x[n:n + 1]))
        for n in range(x.shape[0])])


# ---- torch.func -------------------------------------------------------------------------------------

def _functional_log_probs(model):
    """Detached parameters and log p(· | x1, θ) of one unbatched input, for torch.func's transforms."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def log_probs(params, x1):
        return torch.log_softmax(functional_call(model, params, (x1[None],))[0], dim=0)

    return params, log_probs


def empirical_diag_torch_func(model, x, y):
    """vmap(grad): materializes all N per-sample gradients (N × P), then squares and averages them."""
    params, log_probs = _functional_log_probs(model)

    def loss(prm, x1, y1):  # gather, not [y1]: indexing by a vmapped label is data-dependent control flow
        return -log_probs(prm, x1).gather(0, y1[None])[0]

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return flatten([g.square().mean(0) for g in per_sample.values()])


def _class_jacobians(model, x):
    """Per chunk of inputs: p [n, C] and, per parameter, the Jacobian of log p flattened to [n, C, k]."""
    params, log_probs = _functional_log_probs(model)
    jacobian = vmap(jacrev(log_probs), in_dims=(None, 0))
    for start in range(0, x.shape[0], TORCH_FUNC_CHUNK):
        chunk = x[start:start + TORCH_FUNC_CHUNK]
        p = torch.softmax(functional_call(model, params, (chunk,)), dim=1)
        yield p, [J.flatten(2) for J in jacobian(params, chunk).values()]


def true_diag_torch_func(model, x, y):
    sums = [p.new_zeros(p.numel()) for p in _params(model)]
    for p, jacobians in _class_jacobians(model, x):
        for s, J in zip(sums, jacobians):
            s += torch.einsum("nc,nck->k", p, J.square())
    return flatten(sums) / x.shape[0]


def trace_torch_func(model, x, y):
    return torch.cat([sum(torch.einsum("nc,nck->n", p, J.square()) for J in jacobians)
                      for p, jacobians in _class_jacobians(model, x)])


# ---- BackPACK ---------------------------------------------------------------------------------------

def _backpack_sum(model, x, y, extension, attribute):
    """Per parameter, ``attribute`` of one BackPACK backward pass of the summed cross entropy."""
    from backpack import backpack, extend

    model = extend(model)  # idempotent: hooks are added on the first call only
    loss = extend(nn.CrossEntropyLoss(reduction="sum"))(model(x), y)
    model.zero_grad(set_to_none=True)
    with backpack(extension()), warnings.catch_warnings():
        # BackPACK's module hooks warn when the input needs no gradient (ours never does); harmless here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    return [getattr(p, attribute) for p in _params(model)]


def backpack_empirical_diag(model, x, y):
    from backpack.extensions import SumGradSquared
    return flatten(_backpack_sum(model, x, y, SumGradSquared, "sum_grad_squared")) / x.shape[0]


def backpack_true_diag(model, x, y):
    # The GGN of softmax cross entropy is the true Fisher; y only gives BackPACK a loss to backpropagate.
    from backpack.extensions import DiagGGNExact
    return flatten(_backpack_sum(model, x, y, DiagGGNExact, "diag_ggn_exact")) / x.shape[0]


def backpack_trace(model, x, y):
    from backpack.extensions import BatchDiagGGNExact
    # Under reduction='sum' each sample's diagonal is its own (no 1/N), so its sum is tr(F_n).
    per_sample = _backpack_sum(model, x, y, BatchDiagGGNExact, "diag_ggn_exact_batch")
    return sum(d.flatten(1).sum(1) for d in per_sample)


# ---- nngeometry -------------------------------------------------------------------------------------

def nngeometry_empirical_diag(model, x, y):
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.object import PMatDiag

    def log_likelihood(xb, yb):
        return torch.log_softmax(model(xb), dim=1).gather(1, yb[:, None])

    backend = TorchHooksJacobianBackend(model=model, function=log_likelihood)
    return PMatDiag(generator=backend, examples=(x, y)).get_diag()


def nngeometry_true_diag(model, x, y):
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDiag
    return FIM(model, (x,), PMatDiag, variant="classif_logits", device=x.device).get_diag()


# ---- the workloads ----------------------------------------------------------------------------------

def _mem_impl(impl):
    # torch.func has no batch size: it materializes all N per-sample gradients, which is the contrast shown.
    return lambda model, x, y, batch_size: impl(model, x, y)


_EMPIRICAL = {"autograd-loop": empirical_diag_loop, "fisherext": fisherext_diag("empirical"),
              "torch.func": empirical_diag_torch_func, "backpack": backpack_empirical_diag,
              "nngeometry": nngeometry_empirical_diag}
_TRUE = {"autograd-loop": true_diag_loop, "fisherext": fisherext_diag("true"), "torch.func": true_diag_torch_func,
         "backpack": backpack_true_diag, "nngeometry": nngeometry_true_diag}
_TRACE = {"autograd-loop": trace_loop, "fisherext": fisherext_trace, "torch.func": trace_torch_func,
          "backpack": backpack_trace}

FISHER_WORKLOADS = [
    Workload("fisher_diag_empirical", digits_inputs, dict(N=1024), _EMPIRICAL, baseline="autograd-loop",
             quick_dims=dict(N=128)),
    # The slowest rows of the suite: the loop runs N x C = 10,240 backward passes (~1.6 s a call, PEERS.md),
    # torch.func's Jacobians take longer still; bench.run cuts their repeats to 3.
    Workload("fisher_diag_true", digits_inputs, dict(N=1024), _TRUE, baseline="autograd-loop",
             quick_dims=dict(N=32)),
    Workload("per_input_trace", digits_inputs, dict(N=256), _TRACE, baseline="autograd-loop",
             quick_dims=dict(N=32)),
    # The same Fishers of a CNN: per-sample gradients of convolutions over 64 positions each.
    Workload("fisher_diag_empirical_cnn", digits_cnn_inputs, dict(N=256), _EMPIRICAL, baseline="autograd-loop",
             quick_dims=dict(N=32)),
    Workload("fisher_diag_true_cnn", digits_cnn_inputs, dict(N=64), _TRUE, baseline="autograd-loop",
             quick_dims=dict(N=16)),
    Workload("per_input_trace_cnn", digits_cnn_inputs, dict(N=64), _TRACE, baseline="autograd-loop",
             quick_dims=dict(N=16)),
    # Peak memory with a fixed batch must not grow with N (fisherext streams batches); torch.func's does.
    # Only fisherext runs at the larger N (torch.func would need ~5 GB), so it is its own baseline there.
    Workload("fisher_diag_empirical_mem", digits_inputs, dict(N=1024, batch=1024),
             {"fisherext": _EMPIRICAL["fisherext"], "torch.func": _mem_impl(empirical_diag_torch_func)},
             baseline="fisherext", quick_dims=dict(N=256, batch=64)),
    Workload("fisher_diag_empirical_mem", digits_inputs, dict(N=16384, batch=1024),
             {"fisherext": _EMPIRICAL["fisherext"]}, baseline="fisherext", quick_dims=dict(N=1024, batch=64)),
]

# One registry: bench.workloads imports this module at its end, so --only, bench.run and pytest-benchmark see these.
WORKLOADS.extend(FISHER_WORKLOADS)
