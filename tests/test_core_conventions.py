"""fisherext.conventions: the rules of a curvature forward pass, and every entry point that follows them.

- check_deterministic: batch statistics and train-mode randomness refused by the module's name; every
  per-sample / curvature entry point of hvp, operators, influence and perturb refuses a model with
  Dropout in train mode (perturbed() does not: it is a context for the user's own forward).
- padding_as_constant: F.embedding with padding_idx gives a constant at padding positions under
  functional_call, jvp, vmap, forward-mode duals and double backprop; the products (exact, GGN with one
  and several vectors, finite differences), operators and influence agree with explicit references.
- second_order_attention: the fused attention kernel's missing double backward / forward AD,
  reproduced, and the products on a TransformerEncoderLayer and on a cross-attention
  MultiheadAttention model against dense Hessians and GGNs from plain autograd (math kernel).
- checked_output: non-tensor outputs and non-finite outputs at every entry point.

Every reference is built from plain autograd loops (no fisherext, no torch.func), float64.
"""
import math
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import fisherext as fx
from support.explicit import explicit_ggn, explicit_hessian, explicit_influence, explicit_jacobian, explicit_output_hessian, explicit_sample_grads, flat
from support import assert_close, to_device
from fisherext._core.conventions import (
    check_deterministic, checked_output, curvature_forward, padding_as_constant, second_order_attention,
)
from fisherext import InfluenceFunctions

DT = torch.float64


@pytest.fixture(autouse=True)
def _quiet():
    # torch.func's JVP decompositions emit a FutureWarning about torch.jit.script; not ours to test here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def seeded(build, seed=0, device="cpu"):
    """The module built under torch's global generator seeded with `seed` (on the CPU), then on `device`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().to(DT).eval().to(device)


def randn(*shape, seed=0, device="cpu"):
    """Drawn from a seeded CPU generator, then moved to `device` (the same values on every device)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT).to(device)


def directions(P, K=3, seed=1, device="cpu"):
    return randn(K, P, seed=seed, device=device)


# ---- rule 1: deterministic, per sample ------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inner = inner

    def forward(self, x):
        return self.inner(self.fc(x))


STOCHASTIC = {
    "dropout": lambda: nn.Dropout(0.3),
    "dropout1d": lambda: nn.Dropout1d(0.3),
    "dropout2d": lambda: nn.Dropout2d(0.3),
    "dropout3d": lambda: nn.Dropout3d(0.3),
    "alpha_dropout": lambda: nn.AlphaDropout(0.3),
    "feature_alpha_dropout": lambda: nn.FeatureAlphaDropout(0.3),
    "rrelu": lambda: nn.RReLU(),
    "mha": lambda: nn.MultiheadAttention(4, 2, dropout=0.1),
    "lstm": lambda: nn.LSTM(4, 4, num_layers=2, dropout=0.2),
    "batchnorm": lambda: nn.BatchNorm1d(4),
    "sync_batchnorm": lambda: nn.SyncBatchNorm(4),
    "transformer": lambda: nn.TransformerEncoderLayer(4, 2, 8),  # its dropout submodules and attention
}


@pytest.mark.parametrize("kind", list(STOCHASTIC))
def test_stochastic_modules_in_train_mode_are_refused_by_name(kind, device):
    model = Block(STOCHASTIC[kind]()).to(device).train()
    with pytest.raises(ValueError, match=r"model: module 'inner[.\w]*' \(\w+\) .*call model\.eval\(\)"):
        check_deterministic(model)
    check_deterministic(model.eval())


@pytest.mark.parametrize("module", [lambda: nn.Dropout(0.0), lambda: nn.RReLU(0.2, 0.2),
                                    lambda: nn.MultiheadAttention(4, 2), lambda: nn.LSTM(4, 4, num_layers=2),
                                    lambda: nn.LSTM(4, 4, dropout=0.0)],
                         ids=["p=0", "rrelu-fixed-slope", "mha-no-dropout", "lstm-no-dropout", "lstm-p0"])
def test_deterministic_modules_in_train_mode_pass(module, device):
    check_deterministic(Block(module()).to(device).train())


def test_batch_statistics_without_running_stats_are_refused_in_eval_mode_too(device):
    model = Block(nn.BatchNorm1d(4, track_running_stats=False)).to(device).eval()
    with pytest.raises(ValueError, match=r"module 'inner' \(BatchNorm1d\) has no running statistics.*"
                                         r"track_running_stats=True and call model\.eval\(\)"):
        check_deterministic(model)


def test_fractional_max_pool_is_refused_in_any_mode_unless_its_samples_are_fixed(device):
    pool = nn.FractionalMaxPool2d(2, output_size=2)
    with pytest.raises(ValueError, match=r"module 'inner' \(FractionalMaxPool2d\) draws random pooling regions"):
        check_deterministic(Block(pool).to(device).eval())
    fixed = nn.FractionalMaxPool2d(2, output_size=2, _random_samples=torch.rand(1, 1, 2).to(device))
    check_deterministic(Block(fixed).to(device).train())


def test_the_root_module_is_named_as_the_model_itself(device):
    with pytest.raises(ValueError, match=r"model: the model itself \(Dropout\)"):
        check_deterministic(nn.Dropout(0.5).to(device).train())


class DropNet(nn.Module):
    """Linear - Dropout (module 'block.drop') - Linear; counts its forward calls."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.block = nn.Sequential()
        self.block.add_module("drop", nn.Dropout(0.5))
        self.head = nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.head(self.block(torch.tanh(self.fc(x))))


def _entry_points():
    loss = F.cross_entropy
    return {
        "hvp-exact": lambda m, d, V: fx.hvp(m, loss, d, V[0]),
        "hvp-ggn": lambda m, d, V: fx.hvp(m, loss, d, V.T, curvature="ggn"),
        "hvp-fd": lambda m, d, V: fx.hvp(m, loss, d, V.T, method="fd"),
        "HessianOperator": lambda m, d, V: fx.HessianOperator(m, loss, d) @ V[0],
        "GGNOperator": lambda m, d, V: fx.GGNOperator(m, loss, d) @ V[0],
        "FisherOperator": lambda m, d, V: fx.FisherOperator(m, "cross_entropy", d) @ V[0],
        "InfluenceFunctions": lambda m, d, V: InfluenceFunctions(m, loss, d, damping=1.0).influence(d),
        "fd_quadratic": lambda m, d, V: fx.fd_quadratic(m, d[0], V[0]),
        "fd_quadratic_directions": lambda m, d, V: fx.fd_quadratic_directions(m, d[0], V.T),
        "input_sensitivity": lambda m, d, V: fx.input_sensitivity(m, d[0], V[0]),
        "kl_vs_fisher": lambda m, d, V: fx.kl_vs_fisher(m, d[0], V[0], [1e-2]),
        **{f"fisher-{s}": (lambda s: lambda m, d, V: fx.fisher(m, d, structure=s))(s) for s in ("diag", "full")},
        "fisher-batched": lambda m, d, V: fx.fisher(m, d, kind="empirical", batch_size=2),
        "per_sample_fisher-trace": lambda m, d, V: fx.per_sample_fisher(m, d[0], d[1]),
        "per_sample_fisher-quad": lambda m, d, V: fx.per_sample_fisher(m, d[0], d[1], quantity="quad", v=V[0]),
    }


ENTRY_POINTS = _entry_points()


def drop_problem(device="cpu"):
    model = seeded(DropNet, device=device)
    data = (randn(6, 5, seed=2, device=device),
            torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(3)).to(device))
    return model, data, directions(sum(p.numel() for p in model.parameters()), K=2, device=device)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_refuses_dropout_in_train_mode_before_any_work(entry, device):
    model, data, V = drop_problem(device)
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"argument 'model' module 'block\.drop' \(Dropout\) .*call model\.eval\(\)"):
        ENTRY_POINTS[entry](model, data, V)
    assert model.calls == 0, "refused only after running the model"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    ENTRY_POINTS[entry](model.eval(), data, V)  # the same call in eval mode runs
    assert model.calls > 0


@pytest.mark.parametrize("operator", ["HessianOperator", "GGNOperator", "FisherOperator"])
def test_an_operator_refuses_a_model_switched_to_train_mode_after_construction(operator, device):
    model, data, V = drop_problem(device)
    A = (fx.FisherOperator(model, "cross_entropy", data) if operator == "FisherOperator"
         else getattr(fx, operator)(model, F.cross_entropy, data))
    A @ V[0]
    model.train()
    with pytest.raises(ValueError, match=r"module 'block\.drop'.*call model\.eval\(\)"):
        A @ V[0]


def test_influence_refuses_a_model_switched_to_train_mode_after_construction(device):
    model, data, _ = drop_problem(device)
    inf = InfluenceFunctions(model, F.cross_entropy, data, damping=1.0, solver="cg")
    model.train()
    with pytest.raises(ValueError, match=r"module 'block\.drop'.*call model\.eval\(\)"):
        inf.test_gradients(data)


def test_perturbed_allows_train_mode(device):
    """perturbed() is a context for the user's own forward passes (a SAM-style step trains at θ + εv):
    it imposes no mode, and restores bit for bit whatever the mode."""
    model, data, V = drop_problem(device)
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    with fx.perturbed(model, V[0], 0.1):
        model(data[0])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- rule 2: padding_idx is a constant ----------------------------------------------------------------------


class Padded(nn.Module):
    """Embedding(6, 4, padding_idx=0) - Linear - tanh - mean over positions - head; x [N, 5] long.
    ``tied``: the head is F.linear(h, emb.weight) (6 classes), so the padding row is reachable there.
    ``lookup`` replaces the embedding lookup (the references use it)."""

    def __init__(self, tied=False):
        super().__init__()
        self.emb = nn.Embedding(6, 4, padding_idx=0)
        self.fc = nn.Linear(4, 4)
        self.head = None if tied else nn.Linear(4, 3)
        self.lookup = None
        with torch.no_grad():  # nn.Embedding zeroes the padding row; a zero row would hide the convention
            self.emb.weight[0].normal_()

    def forward(self, x):
        e = self.emb(x) if self.lookup is None else self.lookup(x)
        h = torch.tanh(self.fc(e)).mean(1)
        return F.linear(h, self.emb.weight) if self.head is None else self.head(h)


def padded_problem(tied=False, n=7, seed=0, device="cpu"):
    model = seeded(lambda: Padded(tied), seed, device)
    g = torch.Generator().manual_seed(10 + seed)
    x = torch.randint(0, 6, (n, 5), generator=g)
    x[:, 0] = 0  # every sample has padding
    y = torch.randint(0, 6 if tied else 3, (n,), generator=g)
    return model, (x.to(device), y.to(device))


class Lookup:
    """The reference forward of Padded: ``differentiated`` looks the padding row up like any other
    (F.embedding without padding_idx); ``constant`` puts the padding row in as a constant."""

    def __init__(self, model, how):
        self.model, self.how = model, how

    def __enter__(self):
        w = self.model.emb.weight
        if self.how == "differentiated":
            self.model.lookup = lambda x: F.embedding(x, w)
        else:
            self.model.lookup = lambda x: torch.where((x == 0)[..., None], w[0].detach(), F.embedding(x, w))
        return self.model

    def __exit__(self, *exc):
        self.model.lookup = None


def pad_columns(model):
    """Flat positions of the padding row emb.weight[0] (emb.weight comes first)."""
    return torch.arange(model.emb.weight.shape[1], device=model.emb.weight.device)


def padding_references(tied, device="cpu", loss_fn=F.cross_entropy):
    """(model, data, H, G, grads): Hessian, GGN and per-sample gradients of the padding convention,
    computed on the CPU, everything then on `device`.
    Untied: the padding row gets no derivative at all, so they are the differentiated lookup's with the
    padding row's rows and columns zeroed. Tied: the padding lookup replaced by a constant."""
    model, (x, y) = padded_problem(tied)
    if tied:
        with Lookup(model, "constant"):
            refs = (explicit_hessian(model, loss_fn, x, y), explicit_ggn(model, loss_fn, x, y),
                    explicit_sample_grads(model, loss_fn, x, y))
        return model.to(device), to_device((x, y), device), *to_device(refs, device)
    with Lookup(model, "differentiated"):
        J = explicit_jacobian(model, x)
        H = explicit_hessian(model, loss_fn, x, y)
        grads = explicit_sample_grads(model, loss_fn, x, y)
        Hz = explicit_output_hessian(loss_fn, model(x), y)
    cols = pad_columns(model)
    J[:, cols] = 0
    H[cols, :] = 0
    H[:, cols] = 0
    grads[:, cols] = 0
    return model.to(device), to_device((x, y), device), *to_device((H, J.T @ Hz @ J, grads), device)


def test_padding_references_differ_from_the_differentiated_lookup(device):
    """The set-up has teeth: differentiating the padding row changes the GGN by more than 1 %."""
    for tied in (False, True):
        model, (x, y), _, G, _ = padding_references(tied, device)
        with Lookup(model, "differentiated"):
            naive = explicit_ggn(model, F.cross_entropy, x, y)
        assert (naive - G).norm() > 1e-2 * G.norm()


def _functional(model, x):
    """(the parameters, detached; the model as a function of them on the inputs x)."""
    names = [n for n, _ in model.named_parameters()]
    return [p.detach() for p in model.parameters()], lambda *ps: functional_call(model, dict(zip(names, ps)), (x,))


def test_padding_mode_under_jvp_dual_levels_and_double_backprop(device):
    """J v by torch.func.jvp and by a forward-mode dual level, and H v by double backprop, inside the
    mode, equal the constant-lookup reference (and J v differs from the differentiated lookup's)."""
    model, (x, y), H, _, _ = padding_references(False, device)
    params, f = _functional(model, x)
    v = directions(sum(p.numel() for p in params), K=1, device=device)[0]
    tangents = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]
    with Lookup(model, "differentiated"):
        J = explicit_jacobian(model, x)
    expected = J.clone()
    expected[:, pad_columns(model)] = 0
    with padding_as_constant(model):
        _, by_jvp = jvp(f, tuple(params), tuple(tangents))
        with fwAD.dual_level():
            _, by_dual = fwAD.unpack_dual(f(*[fwAD.make_dual(p, t) for p, t in zip(params, tangents)]))
        leaves = [p.clone().requires_grad_() for p in params]
        loss = F.cross_entropy(f(*leaves), y)
        g = torch.autograd.grad(loss, leaves, create_graph=True)
        hv = flat(torch.autograd.grad(g, leaves, tangents), leaves)
    assert_close(by_jvp.reshape(-1), expected @ v)
    assert_close(by_dual.reshape(-1), expected @ v)
    assert_close(hv, H @ v)
    assert (J @ v - expected @ v).abs().max() > 1e-3 * (expected @ v).abs().max()


def test_padding_mode_under_vmap_uses_the_snapshot_and_keeps_other_rows(device):
    """Under vmap over stacked weights (the FD paths' functional models) the padding positions take the
    row snapshotted at entry, every other position its own model's row; per-sample gradients by
    vmap(grad) give the padding row nothing."""
    model, (x, _) = padded_problem(device=device)
    emb = model.emb
    W = emb.weight.detach()
    stacked = W + randn(3, *W.shape, seed=4, device=device)
    with padding_as_constant(model):
        out = vmap(lambda w: functional_call(emb, {"weight": w}, (x,)))(stacked)
        grads = vmap(grad(lambda w, xn: functional_call(emb, {"weight": w}, (xn[None],)).pow(3).sum()),
                     in_dims=(None, 0))(W, x)
    pad = x == 0
    assert torch.equal(out[:, pad], W[0].expand(3, int(pad.sum()), -1))
    assert torch.equal(out[:, ~pad], stacked[:, x[~pad]])
    assert torch.equal(grads[:, 0], torch.zeros_like(grads[:, 0]))
    assert grads[:, 1:].abs().sum() > 0


def test_padding_mode_snapshots_before_an_in_place_perturbation(device):
    model, (x, _) = padded_problem(device=device)
    row = model.emb.weight.detach()[0].clone()
    with padding_as_constant(model):
        with fx.perturbed(model, torch.ones(sum(p.numel() for p in model.parameters()), dtype=DT, device=device), 0.5):
            out = model.emb(x)
    assert torch.equal(out[x == 0], row.expand(int((x == 0).sum()), -1))
    assert torch.equal(out[x != 0], model.emb.weight.detach()[x[x != 0]] + 0.5)


def test_padding_mode_covers_a_bare_embedding_call_with_negative_padding_idx(device):
    w = randn(5, 3, device=device).requires_grad_()
    idx = torch.tensor([[4, 1, 4], [0, 2, 3]], device=device)
    with padding_as_constant(nn.Module()), fwAD.dual_level():
        dual = fwAD.make_dual(w.detach(), torch.ones_like(w))
        tangent = fwAD.unpack_dual(F.embedding(idx, dual, padding_idx=-1)).tangent
    assert torch.equal(tangent[idx == 4], torch.zeros(2, 3, dtype=DT, device=device))
    assert torch.equal(tangent[idx != 4], torch.ones(4, 3, dtype=DT, device=device))


def test_curvature_forward_enters_the_padding_mode_only_for_models_that_need_it(device):
    """A TorchFunctionMode costs time on every torch call; models without a padded nn.Embedding skip it."""
    active = torch.overrides._get_current_function_mode_stack
    with curvature_forward(nn.Linear(2, 2).to(device)):
        assert not active()
    with curvature_forward(padded_problem(device=device)[0]):
        assert len(active()) == 1


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("curvature,method", [("hessian", "autograd"), ("ggn", "autograd"), ("hessian", "fd")])
def test_hvp_follows_the_padding_convention(curvature, method, tied, device):
    model, data, H, G, _ = padding_references(tied, device)
    V = directions(H.shape[0], device=device).T
    expected = (G if curvature == "ggn" else H) @ V
    if method == "fd":
        got = fx.hvp(model, F.cross_entropy, data, V, method="fd", eps=1e-5)
        assert ((got - expected).norm() / expected.norm()).item() < 1e-7
        return
    assert_close(fx.hvp(model, F.cross_entropy, data, V, curvature=curvature), expected)
    assert_close(fx.hvp(model, F.cross_entropy, data, V[:, 0], curvature=curvature), expected[:, 0])  # K = 1: a dual forward


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_operators_follow_the_padding_convention(tied, device):
    model, (x, y), H, G, grads = padding_references(tied, device)
    V = directions(H.shape[0], device=device).T
    assert_close(fx.HessianOperator(model, F.cross_entropy, (x, y), batch_size=3) @ V, H @ V)
    assert_close(fx.GGNOperator(model, F.cross_entropy, (x, y)) @ V, G @ V)
    true = fx.FisherOperator(model, "cross_entropy", (x, y))
    assert_close(true @ V, G @ V)                                # the true Fisher of cross-entropy is its GGN
    assert_close(true @ V[:, 0].contiguous(), G @ V[:, 0])       # K = 1: a dual forward
    empirical = fx.FisherOperator(model, "cross_entropy", (x, y), kind="empirical")
    assert_close(empirical @ V, grads.T @ (grads @ V) / x.shape[0])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_influence_follows_the_padding_convention(curvature, tied, device):
    model, (x, y), H, G, grads = padding_references(tied, device)
    damping = 1.0
    expected = explicit_influence(H if curvature == "hessian" else G, grads, grads[:4], damping)
    inf = InfluenceFunctions(model, F.cross_entropy, (x, y), damping=damping, curvature=curvature)
    assert_close(inf.influence((x[:4], y[:4])), expected)


def test_fd_quadratic_keeps_the_unperturbed_padding_row(device):
    """vᵀF_nv by central differences with the padding positions at their unperturbed value: the true
    Fisher of the constant-lookup model (J_n with the padding row's columns zeroed)."""
    model, (x, _) = padded_problem(device=device)
    P = sum(p.numel() for p in model.parameters())
    V = directions(P, K=2, device=device)
    with Lookup(model, "differentiated"):
        J = explicit_jacobian(model, x).view(x.shape[0], 3, P)
        p = torch.softmax(model(x), -1).detach()
    J[:, :, pad_columns(model)] = 0
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    expected = torch.einsum("kp,ncp,ncd,ndq,kq->kn", V, J, Lam, J, V)
    for strategy in ("vmap", "in_place"):
        got = fx.fd_quadratic_directions(model, x, V.T, eps=1e-4, strategy=strategy).T
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-6
    assert ((fx.fd_quadratic(model, x, V[0], eps=1e-4) - expected[0]).abs().max() / expected[0].abs().max()) < 1e-6
    per_input = fx.fd_quadratic(model, x, V[0].expand(x.shape[0], P).contiguous(), eps=1e-4, per_input=True)
    assert ((per_input - expected[0]).abs().max() / expected[0].abs().max()).item() < 1e-6


# ---- rule 3: attention with second derivatives --------------------------------------------------------------


class Encoder(nn.Module):
    """Linear(3, 4) - TransformerEncoderLayer(4, 2 heads, batch_first) - mean over T - Linear(4, 3)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.enc = nn.TransformerEncoderLayer(4, 2, 8, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(1))


class CrossAttention(nn.Module):
    """Queries from the first 2 positions, keys/values from all 5 (query ≠ key), sequence-first
    nn.MultiheadAttention(batch_first=False) without attention weights (the scaled-dot-product path)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(3, 4)
        self.kv = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x [N, 5, 3]
        q, kv = self.q(x[:, :2]).transpose(0, 1), self.kv(x).transpose(0, 1)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        return self.head(torch.tanh(out).mean(0))


ATTENTION = {"encoder": Encoder, "cross_attention": CrossAttention}


def attention_problem(name, device="cpu"):
    model = seeded(ATTENTION[name], device=device)
    x = randn(6, 5, 3, seed=5, device=device)
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(6)).to(device)
    return model, (x, y)


_attention_cache = {}


def attention_references(name, device="cpu"):
    """Dense Hessian, GGN and per-sample gradients by plain autograd under the math kernel, computed on the
    CPU once; the problem and the references on `device`."""
    if name not in _attention_cache:
        model, (x, y) = attention_problem(name)
        with sdpa_kernel(SDPBackend.MATH):
            _attention_cache[name] = (explicit_hessian(model, F.cross_entropy, x, y),
                                      explicit_ggn(model, F.cross_entropy, x, y),
                                      explicit_sample_grads(model, F.cross_entropy, x, y))
    return (*attention_problem(name, device), *to_device(_attention_cache[name], device))


@pytest.mark.parametrize("name", list(ATTENTION))
def test_the_fused_attention_kernel_has_no_second_derivatives(name):  # CPU only: it is about the CPU kernel
    """Why rule 3 exists: torch's default CPU attention kernel has neither a double backward nor forward
    AD, so a plain double backprop fails outside second_order_attention and works inside it."""
    model, (x, y) = attention_problem(name)
    params = list(model.parameters())

    def hv():
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        return torch.autograd.grad(g, params, [torch.ones_like(p) for p in params])

    try:
        hv()
    except (RuntimeError, NotImplementedError) as e:
        assert "derivative" in str(e) or "forward AD" in str(e)
    else:
        pytest.skip("this torch differentiates its fused attention kernel twice; rule 3 is then only a choice")
    with second_order_attention():
        hv()


def test_the_native_attention_fast_path_has_no_forward_mode_ad(device):
    """In eval mode with no gradient recorded (a forward-mode JVP under no_grad, as per-sample quadratic
    forms run it) TransformerEncoderLayer takes a native fast path without forward AD: rule 3 turns it
    off, and restores the setting on exit."""
    model, (x, _) = attention_problem("encoder", device)
    params, f = _functional(model, x)
    tangents = tuple(torch.ones_like(p) for p in params)
    with torch.no_grad():
        try:
            jvp(f, tuple(params), tangents)
        except NotImplementedError as e:
            assert "forward AD" in str(e)
        else:
            pytest.skip("this torch's attention fast path has forward AD")
        with second_order_attention():
            assert not torch.backends.mha.get_fastpath_enabled()
            _, Jv = jvp(f, tuple(params), tangents)
    assert torch.backends.mha.get_fastpath_enabled()
    with sdpa_kernel(SDPBackend.MATH):
        expected = explicit_jacobian(model, x) @ torch.ones(sum(p.numel() for p in params), dtype=DT, device=device)
    assert_close(Jv.reshape(-1), expected)


@pytest.mark.parametrize("name", list(ATTENTION))
def test_hvp_on_attention_models(name, device):
    model, data, H, G, _ = attention_references(name, device)
    V = directions(H.shape[0], device=device).T
    assert_close(fx.hvp(model, F.cross_entropy, data, V), H @ V)
    assert_close(fx.hvp(model, F.cross_entropy, data, V[:, 0]), H @ V[:, 0])
    assert_close(fx.hvp(model, F.cross_entropy, data, V, curvature="ggn"), G @ V)
    assert_close(fx.hvp(model, F.cross_entropy, data, V[:, 0], curvature="ggn"), G @ V[:, 0])


@pytest.mark.parametrize("name", list(ATTENTION))
def test_operators_on_attention_models(name, device):
    model, data, H, G, _ = attention_references(name, device)
    assert_close(fx.HessianOperator(model, F.cross_entropy, data, batch_size=4).dense(), H)
    assert_close(fx.GGNOperator(model, F.cross_entropy, data).dense(), G)
    assert_close(fx.FisherOperator(model, "cross_entropy", data).dense(), G)


@pytest.mark.parametrize("name", list(ATTENTION))
def test_influence_on_attention_models(name, device):
    model, (x, y), H, _, grads = attention_references(name, device)
    damping = 0.5 - min(0.0, torch.linalg.eigvalsh(H)[0].item())  # H is indefinite here
    expected = explicit_influence(H, grads, grads[:3], damping)
    for solver in ("exact", "cg"):
        inf = InfluenceFunctions(model, F.cross_entropy, (x, y), damping=damping, solver=solver,
                                 solver_kwargs=dict(tol=1e-13, maxiter=500) if solver == "cg" else None)
        assert_close(inf.influence((x[:3], y[:3])), expected)


# ---- rule 4: outputs -----------------------------------------------------------------------------------


class Returns(nn.Module):
    """Linear(5, 3) whose output is wrapped (tuple, dict) or made non-finite for samples with x[:, 0] > 100."""

    def __init__(self, how):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.how = how

    def forward(self, x):
        out = self.fc(x)
        if self.how == "tuple":
            return out, x
        if self.how == "dict":
            return {"logits": out}
        return torch.where(x[:, :1] > 100, torch.full_like(out, math.inf), out)


def test_checked_output(device):
    out = randn(4, 2, device=device)
    assert checked_output(out) is out
    with pytest.raises(TypeError, match=r"model: returned a tuple of 2 \(Tensor, Tensor\), not a tensor.*wrap"):
        checked_output((out, out))
    with pytest.raises(TypeError, match=r"model: returned a dict with keys 'logits', 'aux', not a tensor"):
        checked_output({"logits": out, "aux": 1})
    with pytest.raises(TypeError, match=r"model: returned a NoneType"):
        checked_output(None)
    out[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"model: the output for sample 12 is not finite"):
        checked_output(out, offset=10)
    with pytest.raises(ValueError, match=r"model: the output for sample 1 is not finite"):
        checked_output(torch.tensor([[[0.0], [1.0]], [[-math.inf], [1.0]]], device=device))


OUTPUT_ENTRY_POINTS = {k: ENTRY_POINTS[k] for k in ENTRY_POINTS if k != "InfluenceFunctions"} | {
    "InfluenceFunctions-test_gradients": lambda m, d, V: InfluenceFunctions(
        m, F.cross_entropy, d, damping=1.0, batch_size=2).test_gradients(d),
    "hvp-exact-batched": lambda m, d, V: fx.hvp(m, F.cross_entropy, d, V.T, batch_size=2),
    "hvp-ggn-1": lambda m, d, V: fx.hvp(m, F.cross_entropy, d, V[0], curvature="ggn", batch_size=2),
    "fd_quadratic-per-input": lambda m, d, V: fx.fd_quadratic(m, d[0], V[0].expand(d[0].shape[0], -1).contiguous(),
                                                              per_input=True),
    "fd_quadratic-forward": lambda m, d, V: fx.fd_quadratic(m, d[0], V[0], scheme="forward"),
    **{f"fd_quadratic_directions-{s}": (lambda s: lambda m, d, V: fx.fd_quadratic_directions(m, d[0], V.T, strategy=s))(s)
       for s in ("vmap", "in_place", "linear")},
    "input_sensitivity-fd": lambda m, d, V: fx.input_sensitivity(m, d[0], V[0], method="fd"),
}


def output_problem(how, device="cpu"):
    model = seeded(lambda: Returns(how), device=device)
    x = randn(5, 5, seed=7, device=device)
    x[3, 0] = 1000.0
    return model, (x, torch.arange(5, device=device) % 3), directions(18, K=2, device=device)


@pytest.mark.parametrize("entry", list(OUTPUT_ENTRY_POINTS))
def test_every_entry_point_refuses_non_tensor_and_non_finite_outputs(entry, device):
    for how, exc, msg in [("tuple", TypeError, r"argument 'model' returned a tuple of 2"),
                          ("dict", TypeError, r"argument 'model' returned a dict with keys 'logits'"),
                          ("inf", ValueError, r"argument 'model' the output for sample 3 is not finite")]:
        model, data, V = output_problem(how, device)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(exc, match=msg):
            OUTPUT_ENTRY_POINTS[entry](model, data, V)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("operator", ["HessianOperator", "GGNOperator", "FisherOperator"])
def test_operators_refuse_non_finite_outputs_naming_the_sample_across_batches(operator, device):
    model, data, V = output_problem("inf", device)
    A = (fx.FisherOperator(model, "cross_entropy", data, batch_size=2) if operator == "FisherOperator"
         else getattr(fx, operator)(model, F.cross_entropy, data, batch_size=2))
    with pytest.raises(ValueError, match=r"argument 'model' the output for sample 3 is not finite"):
        A @ V.T
