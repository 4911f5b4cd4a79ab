"""bench.peers: every peer adapter against a plain-autograd per-sample reference, on small float64 models.

The reference loops over the inputs and classes with torch.autograd only (one backward pass per input
and class), so it shares nothing with fisherext or the peers. Each adapter either equals it to 1e-8
relative, or raises where the support matrix below says it does, or — where the peer returns a wrong
number without a word — returns that same wrong number every time (a documented pitfall). Each run also
checks that the adapter leaves the caller's model as it was: no hooks, same mode, same parameters, no
gradients or per-sample attributes on them. A peer that is not installed is skipped.
"""
from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.peers import PEER_IMPLS

# The peers' own notices about modules they skip or cannot traverse (the adapters raise there instead).
pytestmark = pytest.mark.filterwarnings("ignore:.*does not have an extension:UserWarning",
                                        "ignore:.*operation is not supported:UserWarning",
                                        "ignore:Encountered node that may break:UserWarning")

N, C = 5, 3
RTOL = 1e-8


# ---- models ---------------------------------------------------------------------------------------

class _Transformer(nn.Module):
    """Embedding, one TransformerEncoderLayer (batch_first), mean over the tokens, a Linear head."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=dropout, batch_first=True)
        self.head = nn.Linear(8, C)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class _LSTMClassifier(nn.Module):
    """An LSTM (batch_first) read at its last step, a Linear head."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, C)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


class _SequenceMLP(nn.Module):
    """A Linear over 4 positions (a transformer's feed-forward without the attention), mean, a Linear head."""

    def __init__(self):
        super().__init__()
        self.token = nn.Linear(3, 6)
        self.head = nn.Linear(6, C)

    def forward(self, x):
        return self.head(torch.relu(self.token(x)).mean(1))


class _FunctionalMLP(nn.Module):
    """An MLP whose forward flattens and scales with functional ops: BackPACK's second-order passes need its
    converter to turn them into modules."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(8, 6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, C)

    def forward(self, x):
        return self.head(self.act(self.hidden(x.flatten(1))) * 2.0)


def _mlp():  # the middle layer without a bias: the K-FAC input factor then has no bias row
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, C))


MODELS = {  # name: (model builder, input shape or a token-id sampler)
    "mlp": (_mlp, (4,)),
    "mlp_functional_ops": (_FunctionalMLP, (2, 4)),
    "mlp_layernorm": (lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, C)), (4,)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(27, C)), (2, 5, 5)),
    "cnn_groupnorm": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.GroupNorm(2, 4), nn.ReLU(),
                                            nn.Flatten(), nn.Linear(64, C)), (2, 4, 4)),
    "sequence_mlp": (_SequenceMLP, (4, 3)),
    "transformer": (_Transformer, "tokens"),
    "lstm": (_LSTMClassifier, (4, 3)),
}


def _problem(name, model=None):
    """The seeded float64 model (eval mode), inputs x, labels y and directions for quad_true / hvp / ggn."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = (model or build()).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (N, 4), generator=g) if shape == "tokens" else torch.randn(N, *shape, generator=g,
                                                                                         dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    P = sum(p.numel() for p in model.parameters())
    return model, x, y, torch.randn(P, 2, generator=g, dtype=torch.float64)


# ---- the reference: plain autograd, one input and one class at a time ------------------------------------

def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _class_gradients(model, x):
    """p [N, C] and the gradients of −log p(c | xₙ) for every input and class, [N, C, P]."""
    params = list(model.parameters())
    probs, grads = [], []
    for n in range(x.shape[0]):
        log_p = model(x[n:n + 1]).log_softmax(-1)[0]
        probs.append(log_p.exp().detach())
        grads.append(torch.stack([_flat(torch.autograd.grad(-log_p[c], params, retain_graph=True))
                                  for c in range(C)]))
    return torch.stack(probs), torch.stack(grads)


def _hessian_columns(model, x, y, V):
    """(1/N) Σₙ ∇²ℓₙ V by double backprop per input and column; the math attention kernel (torch's
    default CPU kernel has no double backward)."""
    params = list(model.parameters())
    columns = []
    with sdpa_kernel(SDPBackend.MATH):
        for v in V.T:
            total = 0
            for n in range(x.shape[0]):
                loss = F.cross_entropy(model(x[n:n + 1]), y[n:n + 1])
                g = _flat(torch.autograd.grad(loss, params, create_graph=True))
                total = total + _flat(torch.autograd.grad(g @ v, params))
            columns.append(total / x.shape[0])
    return torch.stack(columns, 1)


def _kfac_reference(model, x):
    """(A, G) per Linear/Conv2d in modules() order, as bench.peers defines them, from per-input hooks and
    per-class output gradients; None when a layer is not called as a module."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    A, G = [0.0] * len(layers), [0.0] * len(layers)
    called = set()
    for n in range(x.shape[0]):
        inputs, outputs = {}, {}

        def record(layer, args, out):
            inputs[layer], outputs[layer] = args[0].detach(), out

        handles = [layer.register_forward_hook(record) for layer in layers]
        try:
            log_p = model(x[n:n + 1]).log_softmax(-1)[0]
        finally:
            for h in handles:
                h.remove()
        called |= set(outputs)
        seen = [layer for layer in layers if layer in outputs]
        for layer in seen:
            a = inputs[layer]
            if isinstance(layer, nn.Conv2d):
                a = F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)[0].T
            a = a.reshape(-1, a.shape[-1])  # [positions, in]
            if layer.bias is not None:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
            A[layers.index(layer)] += a.T @ a / a.shape[0] / x.shape[0]
        for c in range(C):
            deltas = torch.autograd.grad(-log_p[c], [outputs[layer] for layer in seen], retain_graph=True)
            for layer, d in zip(seen, deltas):
                d = d[0].flatten(1).T if isinstance(layer, nn.Conv2d) else d.reshape(-1, d.shape[-1])
                G[layers.index(layer)] += log_p[c].exp().detach() * d.T @ d / x.shape[0]
    return list(zip(A, G)) if len(called) == len(layers) else None


@functools.lru_cache(maxsize=None)
def _reference(quantity, name):
    model, x, y, V = _problem(name)
    if quantity == "kfac":
        return _kfac_reference(model, x)
    if quantity == "hvp":
        return _hessian_columns(model, x, y, V)
    p, g = _class_gradients(model, x)
    g_data = g[torch.arange(N), y]
    return {
        "diag_empirical": lambda: g_data.square().mean(0),
        "full_empirical": lambda: g_data.T @ g_data / N,
        "diag_true": lambda: torch.einsum("nc,ncp->p", p, g.square()) / N,
        "trace_true": lambda: torch.einsum("nc,ncp->n", p, g.square()),
        "quad_true": lambda: torch.einsum("nc,nc->n", p, (g @ V[:, 0]).square()),
        "ggn": lambda: torch.einsum("nc,ncp,nck->pk", p, g, g @ V) / N,
    }[quantity]()


def _relative_error(result, reference):
    if isinstance(reference, list):
        assert len(result) == len(reference)
        return max(max((a - ra).norm() / ra.norm(), (g - rg).norm() / rg.norm())
                   for (a, g), (ra, rg) in zip(result, reference)).item()
    assert result.shape == reference.shape
    return ((result - reference).norm() / reference.norm()).item()


# ---- the support matrix -------------------------------------------------------------------------------

WRONG = "returns a wrong number silently"
NOT_A_MODULE = "called 0 times as a module"  # MultiheadAttention applies out_proj functionally
FLASH = "flash_attention"  # torch's default CPU attention kernel: no double backward, no forward AD

# (quantity, peer) -> {model: a regex the error matches, or WRONG}; every other model: equal to the reference.
EXPECTED = {
    ("diag_empirical", "backpack"): {"mlp_layernorm": "no sum_grad_squared", "cnn_groupnorm": "no sum_grad_squared",
                                     "transformer": "Float but found Double"},  # its Embedding one-hot is float32
    ("diag_empirical", "nngeometry"): {"sequence_mlp": "dimensions", "transformer": "Embedding", "lstm": "LSTM"},
    ("diag_empirical", "opacus"): {"transformer": "key", "lstm": "shape"},  # its functorch fallback fails
    ("diag_empirical", "asdl"): {"cnn_groupnorm": "no diagonal", "sequence_mlp": WRONG,  # positions as samples
                                 "transformer": "no diagonal", "lstm": "no diagonal"},
    ("diag_true", "backpack"): {"mlp_layernorm": "LayerNorm", "cnn_groupnorm": "GroupNorm",
                                "sequence_mlp": "backpropagation quantity", "transformer": "LayerNorm",
                                "lstm": "backpropagation quantity"},
    ("diag_true", "nngeometry"): {"sequence_mlp": "dimensions", "transformer": "Embedding", "lstm": "LSTM"},
    ("diag_true", "asdl"): {"cnn_groupnorm": "no diagonal", "sequence_mlp": WRONG, "transformer": "no diagonal",
                            "lstm": "no diagonal"},
    ("full_empirical", "backpack"): {"mlp_layernorm": "no grad_batch", "cnn_groupnorm": "no grad_batch",
                                     "transformer": "Float but found Double"},
    ("full_empirical", "nngeometry"): {"sequence_mlp": "3D", "transformer": "Embedding", "lstm": "LSTM"},
    ("full_empirical", "opacus"): {"transformer": "key", "lstm": "shape"},
    ("full_empirical", "asdl"): {"cnn_groupnorm": "covers", "sequence_mlp": "Sizes of tensors",
                                 "transformer": "dtypes", "lstm": "covers"},
    ("kfac", "backpack"): {"mlp_layernorm": "LayerNorm", "cnn": "another approximation",
                           "cnn_groupnorm": "another approximation", "sequence_mlp": "backpropagation quantity",
                           "transformer": "LayerNorm", "lstm": "LSTM"},
    ("kfac", "nngeometry"): {"sequence_mlp": "dimensions", "transformer": "NonDynamicallyQuantizableLinear"},
    ("kfac", "curvlinops"): {"transformer": NOT_A_MODULE},
    ("kfac", "asdl"): {"transformer": NOT_A_MODULE},
    **{(quantity, "backpack"): {"mlp_layernorm": "LayerNorm", "cnn_groupnorm": "GroupNorm",
                                "sequence_mlp": "backpropagation quantity", "transformer": "LayerNorm",
                                "lstm": "backpropagation quantity|LSTM"}
       for quantity in ("trace_true", "quad_true")},
    ("hvp", "backpack"): {"transformer": FLASH},
    # torch.func's jvp over jacrev through layer_norm (torch 2.14.1; jvp over grad is right).
    ("hvp", "curvlinops"): {"mlp_layernorm": WRONG, "cnn_groupnorm": "native_group_norm_backward",
                            "transformer": FLASH},
    ("ggn", "backpack"): {"transformer": FLASH},
    ("ggn", "nngeometry"): {"sequence_mlp": "matrix", "transformer": "Embedding", "lstm": "LSTM"},
    # torch's fused encoder-layer path has no forward AD; with the fast path turned off, the attention kernel.
    ("ggn", "curvlinops"): {"transformer": "_transformer_encoder_layer_fwd|" + FLASH},
}

CASES = [(quantity, peer, name) for quantity, impls in PEER_IMPLS.items() for peer in impls for name in MODELS]


def test_the_matrix_names_every_adapter():
    assert set(EXPECTED) == {(quantity, peer) for quantity, impls in PEER_IMPLS.items() for peer in impls}


def _call(quantity, peer, model, x, y, V):
    fn = PEER_IMPLS[quantity][peer]
    if quantity == "quad_true":
        return fn(model, x, y, V[:, 0])
    if quantity in ("hvp", "ggn"):
        return fn(model, x, y, V)
    return fn(model, x, y)


def _state(model):
    """What an adapter must leave alone: hooks, modes, parameter values, gradients and attributes, and the
    default dtype (the nngeometry adapters set it for their call only)."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                + len(m._backward_pre_hooks) for m in model.modules())
    params = list(model.parameters())
    return (hooks, [m.training for m in model.modules()], [p.detach().clone() for p in params],
            [(p.grad is None, sorted(vars(p))) for p in params], [sorted(vars(m)) for m in model.modules()],
            torch.get_default_dtype())


def _assert_untouched(model, before):
    after = _state(model)
    assert after[0] == before[0] and after[1] == before[1]
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2]))
    assert after[3:] == before[3:]


@pytest.mark.parametrize("quantity,peer,name", CASES, ids=["-".join(case) for case in CASES])
def test_adapter_matches_the_reference_or_raises(quantity, peer, name):
    if importlib.util.find_spec(peer) is None:  # the peers' names are their import names
        pytest.skip(f"{peer} is not installed")
    model, x, y, V = _problem(name)
    before = _state(model)
    expected = EXPECTED[(quantity, peer)].get(name)
    if expected is None or expected == WRONG:
        result = _call(quantity, peer, model, x, y, V)
        reference = _reference(quantity, name)
        assert reference is not None, "a K-FAC layer is not called as a module: no reference factors"
        error = _relative_error(result, reference)
        if expected is None:
            assert error < RTOL
        else:  # the pitfall is deterministic: the same wrong number on a second call
            assert error > 1e-2
            assert _relative_error(_call(quantity, peer, model, x, y, V), result) == 0
    else:
        with pytest.raises(Exception, match=expected):
            _call(quantity, peer, model, x, y, V)
    _assert_untouched(model, before)


def test_opacus_refuses_a_model_that_train_mode_changes():
    """Opacus needs train mode; dropout inside MultiheadAttention would make the forward random there."""
    pytest.importorskip("opacus")
    model, x, y, _ = _problem("transformer", _Transformer(dropout=0.1))
    with pytest.raises(ValueError, match="dropout"):
        PEER_IMPLS["diag_empirical"]["opacus"](model, x, y)
    assert not model.training
