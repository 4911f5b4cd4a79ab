"""Independent references for the model zoo (tests/support/zoo.py): explicit per-sample autograd loops, float64.

Nothing here calls fisherext or torch.func. For each sample n (a batch of one) the model's output is
turned into scalars s with weights w such that F_n = sum w grad(s) grad(s)^T, each gradient from its own
torch.autograd.grad call:

- cross_entropy, outputs [N, C], [N, T, C] (class axis 2) or [N, C, H, W] (class axis 1): the class
  axis is moved last and the other axes flattened to positions q. Positions whose label is IGNORE are
  left out (when labels are given). empirical: one scalar, sum_q -log p(y_q | x_n); true: one scalar
  -log p(c | x_n, q) per position q and class c, weighted by p_qc (positions are independent given x,
  so the cross terms of the expectation vanish);
- mse, l = 1/2 ||f(x) - y||^2 over all output entries: empirical one scalar; true one per output entry
  (F_n = J^T J).

Curvature references are plain double backprop (tests/curvature.py's explicit_hessian, one row per
parameter entry) and Gauss-Newton matrices J^T H_out J with J from per-sample loops over the output
entries and H_out the Hessian of loss_fn in output space. References run in reference_mode (math
SDPA backend: the fused CPU kernels have no double backward; one thread). Everything is cached per
model (lru_cache), so a model is referenced once per session; callers must not modify the results.

Not torch.func, for second derivatives: in torch 2.14.1, jacrev(jacrev(.)) and torch.func.hessian of
a cross entropy through nn.LayerNorm return an asymmetric matrix off by ~0.1 (a Linear-LayerNorm-Tanh-
Linear MLP), while double backprop agrees with central differences of the gradient to 2e-9. And
forward-over-reverse (torch.func.hessian) differentiates the lookup of an Embedding's padding row,
which the padding_idx convention treats as a constant: its Hessian is asymmetric in that row's
columns, where double backprop stays symmetric and follows the convention.
"""
from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from support.curvature import explicit_hessian
from support.models import flat_indices, named_trainable, num_params, reference_kfac
from support.zoo import IGNORE, ZOO, InplaceMLP, zoo_data, zoo_model

DENSE_LIMIT = 2000   # beyond this many parameters the dense references cover only ZooModel.subset


@contextlib.contextmanager
def reference_mode():
    """How every reference runs (also as a decorator): SDPA on its math backend, differentiable twice,
    so double backprop works through attention; and one intra-op thread, because the references are
    thousands of tiny autograd calls, which two threads on a loaded 2-core machine slow down tenfold
    (measured: 12 s against 147 s for all the zoo's references). The thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.set_num_threads(threads)


def flat_grad(scalar, params):
    grads = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def fisher_terms(spec, out, yn, kind):
    """[(w, s)] with F_n = sum w grad(s) grad(s)^T for one sample: `out` is the model output for a batch
    of one, `yn` its labels (None: every position counts, kind "true" only)."""
    if spec.loss == "mse":
        f = out[0].reshape(-1)
        if kind == "true":
            return [(1.0, f[o]) for o in range(f.numel())]
        return [(1.0, 0.5 * ((f - yn.reshape(-1)) ** 2).sum())]
    logp = torch.log_softmax(out[0].movedim(spec.class_dim - 1, -1).reshape(-1, spec.outputs), -1)
    if yn is None:
        assert kind == "true", "the empirical Fisher needs labels"
        positions, labels = list(range(logp.shape[0])), None
    else:
        labels = yn.reshape(-1).tolist()
        positions = [q for q in range(logp.shape[0]) if labels[q] != IGNORE]
    if not positions:
        return []
    if kind == "true":
        return [(logp[q, c].detach().exp(), -logp[q, c]) for q in positions for c in range(spec.outputs)]
    assert kind == "empirical"
    return [(1.0, -sum(logp[q, labels[q]] for q in positions))]


@dataclass(frozen=True)
class FisherReference:
    """The reference quantities of one model, kind and label mode.

    diag [P]: (1/N) sum_n diag(F_n); trace [N]: tr(F_n); quad [N]: probe^T F_n probe (probe(name));
    index [S]: the flat indices the dense part covers (all of them, or ZooModel.subset);
    weights[n] [K_n] and grads[n] [K_n, S]: F_n restricted to index = grads^T diag(weights) grads."""

    diag: torch.Tensor
    trace: torch.Tensor
    quad: torch.Tensor
    index: torch.Tensor
    weights: list
    grads: list

    def dense(self):
        """(1/N) sum_n F_n on `index` x `index`."""
        return sum(G.T @ (w[:, None] * G) for w, G in zip(self.weights, self.grads)) / len(self.grads)


def in_model_order(model, names):
    """`names` in model.named_parameters() order, the order of a subset's flat vector (a module's own
    parameters come before its children's: TiedEmbeddingLM's out_bias precedes emb.weight)."""
    chosen = set(names)
    assert chosen <= {n for n, _ in named_trainable(model)}, chosen
    return tuple(n for n, _ in named_trainable(model) if n in chosen)


def dense_names(name):
    """Parameter names of the dense references of `name`: all, or its subset when P is too large."""
    spec, model = ZOO[name], zoo_model(name)
    if num_params(model) <= DENSE_LIMIT:
        return tuple(n for n, _ in named_trainable(model))
    assert spec.subset is not None, f"{name}: P > {DENSE_LIMIT} needs a subset"
    return in_model_order(model, spec.subset)


@lru_cache(maxsize=None)
def probe(name):
    """A seeded direction over all the parameters of `name` (the v of per-sample quadratic forms)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
    return torch.randn(num_params(zoo_model(name)), generator=g, dtype=torch.float64)


@lru_cache(maxsize=None)
@reference_mode()
def fisher_reference(name, kind, labels=True):
    """FisherReference of zoo_model(name) on zoo_data(name); labels=False: y=None (all positions)."""
    spec, model = ZOO[name], zoo_model(name)
    x, y = zoo_data(name)
    params = [p for _, p in named_trainable(model)]
    index = flat_indices(model, dense_names(name))
    v = probe(name)
    diag = torch.zeros(v.numel(), dtype=torch.float64)
    trace, quad, weights, grads = [], [], [], []
    for n in range(x.shape[0]):
        terms = fisher_terms(spec, model(x[n:n + 1]), y[n] if labels else None, kind)
        tr = qd = torch.zeros((), dtype=torch.float64)
        ws, gs = [], []
        for w, s in terms:
            g = flat_grad(s, params)
            diag += w * g * g
            tr = tr + w * g.dot(g)
            qd = qd + w * g.dot(v) ** 2
            ws.append(float(w))
            gs.append(g[index])
        trace.append(tr)
        quad.append(qd)
        weights.append(torch.tensor(ws, dtype=torch.float64))
        grads.append(torch.stack(gs) if gs else torch.zeros(0, index.numel(), dtype=torch.float64))
    return FisherReference(diag / x.shape[0], torch.stack(trace), torch.stack(quad), index, weights, grads)


# --------------------------------------------------------------------------------------------------
# KFAC (nn.Linear-only models; tests/support/models.py's reference_kfac, on an out-of-place twin where the
# model's in-place activations would make its output-hook reference read the overwritten tensor)
# --------------------------------------------------------------------------------------------------

KFAC_TWINS = {"inplace_mlp": lambda: InplaceMLP(inplace=False)}
KFAC_MODELS = ("inplace_mlp", "sequence_first", "sequence_first_t_eq_n", "flatten_tokens")


@lru_cache(maxsize=None)
@reference_mode()
def kfac_reference(name, kind):
    model = zoo_model(name)
    if name in KFAC_TWINS:
        twin = KFAC_TWINS[name]().to(torch.float64).eval()
        twin.load_state_dict(model.state_dict())
        model = twin
    x, y = zoo_data(name)
    return reference_kfac(model, x, y, kind, ZOO[name].loss)


# --------------------------------------------------------------------------------------------------
# Losses and curvature of the mean loss
# --------------------------------------------------------------------------------------------------

def token_cross_entropy(out, y):
    """Mean cross entropy over the positions of [N, T, V] logits, ignored labels left out."""
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=IGNORE)


def loss_fn_for(name):
    """The batch-mean loss_fn of a cross_entropy zoo model: F.cross_entropy for [N, C] and [N, C, H, W]
    (its class axis is 1; ignored pixels left out), token_cross_entropy for [N, T, V]."""
    spec = ZOO[name]
    assert spec.loss == "cross_entropy"
    return token_cross_entropy if spec.class_dim == 2 else F.cross_entropy


def _selected(model, names):
    by_name = dict(model.named_parameters())
    return [by_name[n] for n in names] if names is not None else [p for _, p in named_trainable(model)]


@lru_cache(maxsize=None)
@reference_mode()
def hessian_reference(name, names=None):
    """Dense Hessian of loss_fn_for(name) on the whole data (one batch), over `names` (None: all)."""
    model = zoo_model(name)
    x, y = zoo_data(name)
    return explicit_hessian(model, loss_fn_for(name), x, y, params=_selected(model, names))


@lru_cache(maxsize=None)
@reference_mode()
def ggn_reference(name):
    """Gauss-Newton matrix J^T H_out J of the mean loss: J [N * outputs, P] from per-sample loops over
    the output entries (a sample's outputs depend on its own input only), H_out the Hessian of loss_fn
    with respect to the whole batch's outputs."""
    model = zoo_model(name)
    x, y = zoo_data(name)
    params = [p for _, p in named_trainable(model)]
    rows = []
    for n in range(x.shape[0]):
        out = model(x[n:n + 1]).reshape(-1)
        rows += [flat_grad(out[i], params) for i in range(out.numel())]
    J = torch.stack(rows)
    loss_fn = loss_fn_for(name)
    H_out = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), model(x).detach())
    H_out = H_out.reshape(J.shape[0], J.shape[0])
    return J.T @ H_out @ J


@reference_mode()
def per_sample_loss_grads(model, loss_fn, x, y, params):
    """[N, P]: the gradient of loss_fn on each sample as a batch of one."""
    return torch.stack([flat_grad(loss_fn(model(x[n:n + 1]), y[n:n + 1]), params) for n in range(x.shape[0])])


INFLUENCE_DAMPING = 1.0


@lru_cache(maxsize=None)
def influence_reference(name, names):
    """I[t, i] = -grad l_t^T (H + lambda I)^{-1} grad l_i over the parameters `names`, with H the Hessian
    of the mean training loss (zoo_data(name)), the test points zoo_data(name, 3, seed=1)."""
    model = zoo_model(name)
    params = _selected(model, names)
    loss_fn = loss_fn_for(name)
    H = hessian_reference(name, names)
    M = H + INFLUENCE_DAMPING * torch.eye(H.shape[0], dtype=H.dtype)
    assert torch.linalg.eigvalsh(M)[0] > 1e-3, "test set-up: H + damping * I must be positive definite"
    G_train = per_sample_loss_grads(model, loss_fn, *zoo_data(name), params)
    G_test = per_sample_loss_grads(model, loss_fn, *zoo_data(name, 3, seed=1), params)
    return -G_test @ torch.linalg.solve(M, G_train.T)
