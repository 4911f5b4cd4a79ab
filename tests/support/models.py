"""Test models and independent references for the Fisher API (tests/test_capture_api.py, test_capture_engine.py,
test_capture_measures.py).

Every reference here is an explicit per-sample autograd loop in float64: for each sample n (batch of one)
and, for the true Fisher, each class c weighted by p_c, the gradient of -log p(c | x_n) comes from
torch.autograd.grad and its outer product is accumulated. Nothing here calls fisherext: these functions
are the oracle the package is checked against.

Conventions (from DESIGN.md and the Fisher API brief):
- a flat vector concatenates the parameters with requires_grad, in model.named_parameters() order;
- F = (1/N) sum_n F_n; cross_entropy: l_n = -log softmax(f(x_n))[y_n]; mse: l_n = 1/2 ||f(x_n) - y_n||^2,
  whose true Fisher is J^T J;
- block = one block per module that directly owns parameters;
- KFAC, per nn.Linear with weight [O, I] (+ bias as a constant 1 appended to the input), vec row-major
  (o*I + i, W then b in flat order): F_layer ~= G (x) A with A = 1/(N T) sum_nt a_nt a_nt^T and
  G = 1/N sum_n sum_t sum_k d_ntk d_ntk^T, k over the backpropagated vectors (the C columns of a square
  root of Lambda for the true Fisher, so sum_k d d^T = J_z^T Lambda J_z = sum_c p_c d_c d_c^T).
"""
from __future__ import annotations

import contextlib
import itertools
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import pytest
import torch
from torch import nn

from support import assert_close

KINDS = ["true", "empirical", "mc"]
STRUCTURES = ["diag", "full", "block", "kfac"]
LOSSES = ["cross_entropy", "mse"]


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """Linear - act - Linear. Counts its forward calls (to check that refusals happen before any work)."""

    def __init__(self, i=5, h=7, o=4, act=None, bias1=True):
        super().__init__()
        self.fc1 = nn.Linear(i, h, bias=bias1)
        self.act = act if act is not None else nn.ReLU()
        self.fc2 = nn.Linear(h, o)
        self.forward_calls = 0

    def forward(self, x):
        self.forward_calls += 1
        return self.fc2(self.act(self.fc1(x)))


class CNN(nn.Module):
    """Conv2d(stride 2, padding 1, groups 2) + LayerNorm + ReLU + Flatten + Linear; x: [N, 2, 6, 6]."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)   # -> [N, 4, 3, 3]
        self.norm = nn.LayerNorm([4, 3, 3])
        self.act = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(36, classes)

    def forward(self, x):
        return self.fc(self.flatten(self.act(self.norm(self.conv(x)))))


class SeqModel(nn.Module):
    """Embedding -> Linear over T positions -> tanh -> mean over T -> Linear to C classes; x: [N, T] long."""

    T = 7
    VOCAB = 11

    def __init__(self, d=5, h=6, classes=4):
        super().__init__()
        self.emb = nn.Embedding(self.VOCAB, d)
        self.proj = nn.Linear(d, h)
        self.head = nn.Linear(h, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(self.emb(x))).mean(1))


class ScaleShift(nn.Module):
    """A parametrized module no hook knows: x * scale + shift (the torch.func fallback must handle it)."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))
        self.shift = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * self.scale + self.shift


class ScaleShiftNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.rescale = ScaleShift(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.rescale(self.fc1(x))))


class BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.bil = nn.Bilinear(5, 5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.bil(h, h)


class NormNet(nn.Module):
    """Conv1d + GroupNorm + ReLU + BatchNorm2d (eval) + Linear; x: [N, 3, 10]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(40, 3)

    def forward(self, x):
        h = torch.relu(self.gn(self.conv(x)))
        h = self.bn(h.reshape(h.shape[0], 4, 2, 5))
        return self.fc(h.flatten(1))


class SameConvNet(nn.Module):
    """Conv1d with 'same' padding (asymmetric for an even kernel), reflect mode and dilation + Tanh +
    Linear; x: [N, 3, 10]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 4, padding="same", padding_mode="reflect", dilation=2)
        self.fc = nn.Linear(40, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class TiedNet(nn.Module):
    """One Linear applied twice (weight tying): its per-sample gradient sums both uses."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


@dataclass(frozen=True)
class Spec:
    build: Callable[[], nn.Module]
    x_shape: tuple          # per-sample input shape
    n: int                  # default number of samples (odd)
    loss: str
    outputs: int            # classes (cross_entropy) or output dimension (mse)
    integer_x: bool = False
    fallback: str | None = None   # regex naming the module the torch.func fallback must warn about


SPECS = {
    "mlp": Spec(lambda: MLP(), (5,), 21, "cross_entropy", 4),
    "mlp_reg": Spec(lambda: MLP(4, 6, 3, act=nn.Tanh(), bias1=False), (4,), 17, "mse", 3),
    "linear1": Spec(lambda: nn.Linear(5, 4), (5,), 9, "cross_entropy", 4),
    "linear1_reg": Spec(lambda: nn.Linear(5, 3), (5,), 9, "mse", 3),
    "cnn": Spec(lambda: CNN(), (2, 6, 6), 15, "cross_entropy", 3),
    "seq": Spec(lambda: SeqModel(), (SeqModel.T,), 19, "cross_entropy", 4, integer_x=True),
    "scaleshift": Spec(lambda: ScaleShiftNet(), (4,), 13, "cross_entropy", 3, fallback=r"ScaleShift|rescale"),
    "bilinear": Spec(lambda: BilinearNet(), (4,), 13, "cross_entropy", 3, fallback=r"Bilinear|\bbil\b"),
    "norm": Spec(lambda: NormNet(), (3, 10), 15, "cross_entropy", 3),
    "tied": Spec(lambda: TiedNet(), (5,), 11, "cross_entropy", 3),
    "same_conv": Spec(lambda: SameConvNet(), (3, 10), 9, "cross_entropy", 3),
}

# modules whose parameters KFAC approximates by Kronecker factors; every other parameter is diagonal
KFAC_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d)
NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, ScaleShift)


def make_model(name, dtype=torch.float64, device="cpu", seed=0):
    """A fresh, seeded model in eval mode. Norm/affine parameters and BatchNorm statistics are randomized
    so that no parameter sits at a special value (weight 1, bias 0) that could hide a bug."""
    spec = SPECS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234 + seed)
        model = spec.build()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, NORM_MODULES):
                    params = dict(m.named_parameters(recurse=False))
                    w = params.get("weight", params.get("scale"))
                    b = params.get("bias", params.get("shift"))
                    w.copy_(1.0 + 0.3 * torch.randn_like(w))
                    b.copy_(0.2 * torch.randn_like(b))
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.copy_(0.3 * torch.randn_like(m.running_mean))
                    m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
    return model.to(device=device, dtype=dtype).eval()


def make_data(name, n=None, dtype=torch.float64, device="cpu", seed=0):
    """Seeded (x, y) for model `name`: y is a class index (cross_entropy) or a float target (mse)."""
    spec = SPECS[name]
    n = spec.n if n is None else n
    g = torch.Generator().manual_seed(99 + seed)
    if spec.integer_x:
        x = torch.randint(0, SeqModel.VOCAB, (n, *spec.x_shape), generator=g)
    else:
        x = torch.randn(n, *spec.x_shape, generator=g, dtype=torch.float64).to(dtype)
    if spec.loss == "cross_entropy":
        y = torch.randint(0, spec.outputs, (n,), generator=g)
    else:
        y = torch.randn(n, spec.outputs, generator=g, dtype=torch.float64).to(dtype)
    return x.to(device), y.to(device)


# --------------------------------------------------------------------------------------------------
# Parameter bookkeeping
# --------------------------------------------------------------------------------------------------

def named_trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_slices(model):
    """name -> slice of the flat vector (all parameters with requires_grad, named_parameters order)."""
    out, start = {}, 0
    for name, p in named_trainable(model):
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


def num_params(model):
    return sum(p.numel() for _, p in named_trainable(model))


def flat_indices(model, names):
    """Indices into the full flat vector of the parameters `names` (kept in the order given)."""
    sl = param_slices(model)
    return torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in names])


def owner(name):
    return name.rsplit(".", 1)[0] if "." in name else ""


def block_mask(model, names=None):
    """[P, P] bool: True where both parameters belong to the same module (blocks = modules owning params)."""
    names = [n for n, _ in named_trainable(model)] if names is None else list(names)
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    owners = []
    for n in names:
        owners += [owner(n)] * sizes[n]
    return torch.tensor([[a == b for b in owners] for a in owners], dtype=torch.bool)


def submatrix(M, idx):
    return M[idx][:, idx]


# --------------------------------------------------------------------------------------------------
# The per-sample autograd reference
# --------------------------------------------------------------------------------------------------

def _flat_grad(scalar, params):
    grads = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def _weighted_grads(model, params, xn, yn, kind, loss):
    """[(w, g)] with F_n = sum w g g^T for one sample (batch of one)."""
    out = model(xn)
    assert out.dim() == 2 and out.shape[0] == 1
    if loss == "cross_entropy":
        logp = torch.log_softmax(out, dim=-1)[0]
        if kind == "true":
            p = logp.detach().exp()
            return [(p[c], _flat_grad(-logp[c], params)) for c in range(logp.numel())]
        assert kind == "empirical"
        return [(1.0, _flat_grad(-logp[int(yn)], params))]
    assert loss == "mse"
    f = out[0]
    if kind == "true":  # E_{y ~ N(f, I)} [g g^T] = J^T J: one term per output
        return [(1.0, _flat_grad(f[o], params)) for o in range(f.numel())]
    assert kind == "empirical"
    return [(1.0, _flat_grad(0.5 * ((f - yn.reshape(-1)) ** 2).sum(), params))]


def per_sample_fishers(model, x, y, kind, loss, params=None):
    """[N, P, P] float64: F_n for each sample, by explicit per-sample (and per-class) autograd."""
    params = [p for _, p in named_trainable(model)] if params is None else list(params)
    out = []
    for n in range(x.shape[0]):
        F = 0
        for w, g in _weighted_grads(model, params, x[n:n + 1], y[n], kind, loss):
            F = F + w * torch.outer(g, g)
        out.append(F)
    return torch.stack(out)


def per_class_grads(model, x, loss="cross_entropy"):
    """cross_entropy: (p [N, C], g [N, C, P]) with g[n, c] = grad of -log p(c | x_n).
    mse: (None, J [N, O, P]) the per-sample Jacobians of the outputs."""
    params = [p for _, p in named_trainable(model)]
    probs, grads = [], []
    for n in range(x.shape[0]):
        terms = _weighted_grads(model, params, x[n:n + 1], None, "true", loss)
        probs.append(torch.stack([torch.as_tensor(w, dtype=torch.float64) for w, _ in terms]))
        grads.append(torch.stack([g for _, g in terms]))
    return (torch.stack(probs) if loss == "cross_entropy" else None), torch.stack(grads)


def batch_mean_gradient(model, x, y, loss):
    """Gradient of the batch-MEAN loss (what the buggy EWC copies square): flat [P]."""
    params = [p for _, p in named_trainable(model)]
    out = model(x)
    if loss == "cross_entropy":
        L = nn.functional.cross_entropy(out, y)
    else:
        L = 0.5 * ((out - y) ** 2).sum(-1).mean()
    return _flat_grad(L, params)


@lru_cache(maxsize=None)
def _cached_reference(name, kind, n):
    spec = SPECS[name]
    model = make_model(name)
    x, y = make_data(name, n)
    return per_sample_fishers(model, x, y, kind, spec.loss)


def reference(name, kind, n=None):
    """Per-sample Fishers [N, P, P] of make_model(name) on make_data(name, n) (cached; returns a copy)."""
    return _cached_reference(name, kind, SPECS[name].n if n is None else n).clone()


def reference_fisher(name, kind, n=None):
    return reference(name, kind, n).mean(0)


# --------------------------------------------------------------------------------------------------
# KFAC reference (Linear and convolution layers; other parameters diagonal)
# --------------------------------------------------------------------------------------------------

def kfac_layers(model):
    """[(module_name, module)] of the layers the KFAC reference covers: nn.Linear, and nn.Conv1d/2d with
    integer padding and one group (a convolution is a linear map of its unfolded input windows)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1
                                            and not isinstance(m.padding, str))]


def _layer_rows(m, inp, out_grad):
    """(input rows [T, I], output-gradient rows [T, O]) of one sample's layer call: for a convolution the
    input windows by torch's own unfold (a 1-d convolution as a 2-d one of height 1)."""
    if isinstance(m, nn.Linear):
        return inp.reshape(-1, m.in_features), out_grad.reshape(-1, m.out_features)
    one_d = isinstance(m, nn.Conv1d)
    x = inp.unsqueeze(-2) if one_d else inp
    pair = (lambda v: (1,) + tuple(v)) if one_d else tuple
    cols = nn.functional.unfold(x, pair(m.kernel_size), dilation=pair(m.dilation), padding=(
        (0,) + tuple(m.padding) if one_d else tuple(m.padding)), stride=pair(m.stride))
    return cols[0].T, out_grad.reshape(m.out_channels, -1).T


def reference_kfac_factors(model, x, y, kind, loss):
    """Per Linear layer: A (mean over N*T of a a^T, with a 1 appended when there is a bias) and the
    per-sample G_n = sum_t sum_k d_ntk d_ntk^T, stacked [N, O, O]. Uses plain forward hooks on the
    reference model, removed before returning."""
    layers = kfac_layers(model)
    captured = {}

    def hook(name):
        def fn(mod, inp, out):
            captured[name] = (inp[0].detach(), out)
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in layers]
    try:
        A = {name: 0 for name, _ in layers}
        G = {name: [] for name, _ in layers}
        rows = {name: 0 for name, _ in layers}
        for n in range(x.shape[0]):
            captured.clear()
            out = model(x[n:n + 1])
            outs = [captured[name][1] for name, _ in layers]
            if loss == "cross_entropy":
                logp = torch.log_softmax(out, -1)[0]
                if kind == "true":
                    p = logp.detach().exp()
                    terms = [(p[c], -logp[c]) for c in range(logp.numel())]
                else:
                    terms = [(1.0, -logp[int(y[n])])]
            else:
                f = out[0]
                if kind == "true":
                    terms = [(1.0, f[o]) for o in range(f.numel())]
                else:
                    terms = [(1.0, 0.5 * ((f - y[n].reshape(-1)) ** 2).sum())]
            Gn = {name: 0 for name, _ in layers}
            for w, scalar in terms:
                deltas = torch.autograd.grad(scalar, outs, retain_graph=True, allow_unused=True)
                for (name, m), d, o in zip(layers, deltas, outs):
                    d = torch.zeros_like(o) if d is None else d
                    d = _layer_rows(m, captured[name][0], d)[1]
                    Gn[name] = Gn[name] + w * d.T @ d
            for name, m in layers:
                a = _layer_rows(m, captured[name][0], captured[name][1].detach())[0]
                if m.bias is not None:
                    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
                A[name] = A[name] + a.T @ a
                rows[name] += a.shape[0]
                G[name].append(Gn[name])
        return ({name: A[name] / rows[name] for name, _ in layers},
                {name: torch.stack(G[name]) for name, _ in layers})
    finally:
        for h in handles:
            h.remove()


def kfac_dense(model, A, G, other_diag=None):
    """Assemble the P x P KFAC matrix: per Linear layer G (x) A permuted to flat order (W row-major,
    then b); `other_diag` (flat [P]) supplies the diagonal of every parameter outside those layers."""
    sl = param_slices(model)
    P = num_params(model)
    D = torch.zeros(P, P, dtype=torch.float64)
    covered = torch.zeros(P, dtype=torch.bool)
    for name, m in kfac_layers(model):
        if name not in A:
            continue
        prefix = f"{name}." if name else ""
        O, I = m.weight.shape[0], m.weight[0].numel()
        has_b = m.bias is not None
        w0 = sl[prefix + "weight"].start
        idx = []
        for o in range(O):
            idx += [w0 + o * I + i for i in range(I)]
            if has_b:
                idx.append(sl[prefix + "bias"].start + o)
        idx = torch.tensor(idx)
        D[idx[:, None], idx[None, :]] = torch.kron(G[name], A[name])
        covered[idx] = True
    if other_diag is not None:
        rest = (~covered).nonzero().flatten()
        D[rest, rest] = other_diag[rest]
    else:
        assert covered.all(), "model has parameters outside the KFAC layers: pass other_diag"
    return D


def reference_kfac(model, x, y, kind, loss, other_diag=None):
    A, G = reference_kfac_factors(model, x, y, kind, loss)
    return kfac_dense(model, A, {k: v.mean(0) for k, v in G.items()}, other_diag)


def kfac_param_names(model, types=KFAC_MODULES):
    """Names of the parameters owned by KFAC-able modules of `types`."""
    out = []
    for mname, m in model.named_modules():
        if isinstance(m, types):
            out += [f"{mname}.{p}" if mname else p for p, q in m.named_parameters(recurse=False) if q.requires_grad]
    return out


# --------------------------------------------------------------------------------------------------
# Monte-Carlo helpers
# --------------------------------------------------------------------------------------------------

def mc_candidates(terms, mc_samples):
    """All values F can take with `mc_samples` sampled labels per input: terms[n][c] is sample n's
    contribution when label c is drawn (already structured: diag vector, dense, block- or KFAC-assembled
    — each is linear in the per-sample term). Yields (1/N) sum_n (1/M) sum_m terms[n][c_nm]."""
    N, C = len(terms), len(terms[0])
    per_sample = []
    for n in range(N):
        options = []
        for combo in itertools.combinations_with_replacement(range(C), mc_samples):
            options.append(sum(terms[n][c] for c in combo) / mc_samples)
        per_sample.append(options)
    for choice in itertools.product(*per_sample):
        yield sum(choice) / N


def assert_is_one_of(actual, candidates, rtol=1e-8):
    best = None
    for cand in candidates:
        err = (actual.to(cand.dtype) - cand).abs().max().item()
        scale = cand.abs().max().item() or 1.0
        best = err / scale if best is None else min(best, err / scale)
        if err <= rtol * scale:
            return
    raise AssertionError(f"MC Fisher matches no possible draw of labels (best relative error {best:.3g})")


# --------------------------------------------------------------------------------------------------
# Assertions on results and on the model's state
# --------------------------------------------------------------------------------------------------

def assert_matches(actual, expected, rtol=1e-8):
    """``support.assert_close`` at the references' default precision, 1e-8 of the largest entry."""
    assert_close(actual, expected, rtol=rtol)


def assert_symmetric_psd(D, rtol=1e-10):
    D = D.detach().to("cpu", torch.float64)
    scale = D.abs().max().item() or 1.0
    torch.testing.assert_close(D, D.T, rtol=0, atol=rtol * scale)
    ev = torch.linalg.eigvalsh(0.5 * (D + D.T))
    assert ev.min().item() >= -1e-9 * scale, f"not PSD: smallest eigenvalue {ev.min().item():.3g}"


def bitwise_equal(a, b):
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class ModelState:
    """Snapshot of everything fisherext must leave alone: parameter values (bitwise), identities and
    storage, requires_grad flags, .grad, buffers, train/eval flags of every module."""

    def __init__(self, model):
        self.params = {n: (p, p.detach().clone(), p.data_ptr(), p.requires_grad,
                           None if p.grad is None else p.grad.detach().clone())
                       for n, p in model.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.modes = {n: m.training for n, m in model.named_modules()}

    def assert_unchanged(self, model):
        now = dict(model.named_parameters())
        assert list(now) == list(self.params), "the set of parameters changed"
        for n, (obj, value, ptr, req, grad) in self.params.items():
            p = now[n]
            assert p is obj, f"parameter {n} was replaced"
            assert p.data_ptr() == ptr, f"parameter {n} storage was replaced"
            assert bitwise_equal(p, value), f"parameter {n} changed"
            assert p.requires_grad == req, f"requires_grad of {n} changed"
            if grad is None:
                assert p.grad is None, f"{n}.grad was set"
            else:
                assert p.grad is not None and bitwise_equal(p.grad, grad), f"{n}.grad changed"
        buffers = dict(model.named_buffers())
        for n, b in self.buffers.items():
            assert bitwise_equal(buffers[n], b), f"buffer {n} changed"
        for n, m in model.named_modules():
            assert m.training == self.modes[n], f"train/eval mode of module {n!r} changed"


_GLOBAL_HOOK_DICTS = [
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks", "_global_forward_hooks_with_kwargs",
]


def global_hook_counts():
    mod = torch.nn.modules.module
    return {k: len(getattr(mod, k)) for k in _GLOBAL_HOOK_DICTS if hasattr(mod, k)}


def assert_no_hooks(model, global_before=None):
    """No module hooks, no tensor hooks on parameters, and no new global module hooks."""
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks = getattr(m, attr, None)
            assert not hooks, f"{attr} left registered on module {name!r}: {dict(hooks)}"
    for name, p in model.named_parameters():
        assert not p._backward_hooks, f"tensor hook left on parameter {name}"
        assert not getattr(p, "_post_accumulate_grad_hooks", None), f"post-accumulate hook left on {name}"
    if global_before is not None:
        assert global_hook_counts() == global_before, "a global module hook was left registered"


@contextlib.contextmanager
def untouched(model):
    """Check on exit (normal or by exception) that the model is as it was and no hook remains."""
    state, hooks = ModelState(model), global_hook_counts()
    try:
        yield
    finally:
        state.assert_unchanged(model)
        assert_no_hooks(model, hooks)


def names_argument(name):
    """Regex for a message that names the argument `name` as a word (e.g. 'v', "'data'", `kind=`)."""
    return rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])"


@contextlib.contextmanager
def expect_fallback_warning(name):
    """For a model with an unsupported parametrized module: exactly one UserWarning naming the module.
    For a supported model: no UserWarning at all (hooks cover it; nothing to warn about)."""
    pattern = SPECS[name].fallback
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield
    user = [w for w in record if issubclass(w.category, UserWarning)]
    if pattern is None:
        assert not user, f"unexpected UserWarning(s) for a supported model: {[str(w.message) for w in user]}"
    else:
        naming = [w for w in user if re.search(pattern, str(w.message))]
        assert len(naming) == 1, (
            f"expected exactly one UserWarning naming the fallback module ({pattern}), got "
            f"{[str(w.message) for w in user]}")


slow = pytest.mark.slow


def expected_dense(name, kind, structure, n=None):
    """The reference P x P matrix `fx.fisher(..., kind, structure)` must return for make_model(name) on
    make_data(name, n): diag -> diag_embed of the exact diagonal; full -> exact; block -> exact masked to
    per-module blocks; kfac -> the KFAC reference (only for models whose KFAC layers are all nn.Linear)."""
    F = reference_fisher(name, kind, n)
    if structure == "diag":
        return torch.diag_embed(F.diagonal())
    if structure == "full":
        return F
    model = make_model(name)
    if structure == "block":
        return F * block_mask(model)
    assert structure == "kfac"
    assert not any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in model.modules()), "no conv KFAC reference"
    x, y = make_data(name, n)
    return reference_kfac(model, x, y, kind, SPECS[name].loss, other_diag=F.diagonal())


# --------------------------------------------------------------------------------------------------
# Calling the package under test (not a reference)
# --------------------------------------------------------------------------------------------------

def compute(model, data, **kwargs):
    """fx.fisher with the standing checks: the model is left as it was and no hook remains.
    Fallback warnings are silenced here; tests of the warning itself use expect_fallback_warning."""
    import fisherext as fx

    with untouched(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fx.fisher(model, data, **kwargs)


def compute_per_sample(model, x, y=None, **kwargs):
    import fisherext as fx

    with untouched(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fx.per_sample_fisher(model, x, y, **kwargs)


def trained_digits_classifier():
    """(model, x_test, y_test): a 64-32-10 ReLU network trained (100 full-batch SGD steps, seeded) on 1400 of
    scikit-learn's digits (inputs scaled to [0, 1]), in eval mode; the other 397 digits for testing."""
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32) / 16
    Y = torch.tensor(data.target)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[train]), Y[train]).backward()
        opt.step()
    return model.eval(), X[test], Y[test]
