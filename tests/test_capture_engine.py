"""Capture (per-layer hooks and the torch.func fallback), checked through fx.fisher: every supported
layer kind gives the exact Fisher, an unsupported parametrized module goes through the fallback with
exactly one warning, BatchNorm in train mode is refused, and hooks never outlive a call — also when the
model's forward raises.
"""
import warnings

import pytest
import torch

import fisherext as fx
from support.models import (
    MLP, SPECS, assert_matches, assert_no_hooks, assert_symmetric_psd, block_mask, compute,
    expect_fallback_warning, expected_dense, flat_indices, global_hook_counts, kfac_param_names,
    make_data, make_model, reference_fisher, submatrix, untouched,
)

EXACT_KINDS = ["true", "empirical"]
LAYER_MODELS = ["cnn", "seq", "norm", "same_conv", "scaleshift", "bilinear", "tied"]
FALLBACK_MODELS = [n for n, s in SPECS.items() if s.fallback]


@pytest.mark.parametrize("structure", ["diag", "full", "block"])
@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("name", LAYER_MODELS)
def test_layer_kinds_exact(name, kind, structure, device):
    """Conv2d (stride, padding, groups) + LayerNorm; Embedding + Linear over T positions; Conv1d +
    GroupNorm + BatchNorm2d (eval); a custom parametrized module and nn.Bilinear (fallback); a Linear
    used twice (weight tying)."""
    model = make_model(name, device=device)
    x, y = make_data(name, device=device)
    F = compute(model, (x, y), kind=kind, structure=structure, loss=SPECS[name].loss, batch_size=4)
    expected = expected_dense(name, kind, structure)
    assert_matches(F.dense(), expected, rtol=1e-8)
    assert_matches(F.diag(), expected.diagonal(), rtol=1e-8)
    assert F.num_samples == len(x)


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("name", ["seq", "scaleshift", "bilinear"])
def test_kfac_exact_where_every_kronecker_layer_is_linear(name, kind, device):
    """seq: Linear over T = 7 positions (A averages over N*T rows, G sums over t); Embedding diagonal.
    scaleshift / bilinear: Linear layers Kronecker-factored, the other module's parameters diagonal."""
    model = make_model(name, device=device)
    x, y = make_data(name, device=device)
    F = compute(model, (x, y), kind=kind, structure="kfac", loss=SPECS[name].loss)
    assert_matches(F.dense(), expected_dense(name, kind, "kfac"), rtol=1e-8)


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("name", ["cnn", "norm", "seq", "scaleshift", "bilinear"])
def test_kfac_properties(name, kind, device):
    """Symmetric PSD; nothing between modules; every parameter outside Linear/Conv layers carries exactly
    its exact diagonal Fisher and nothing off the diagonal."""
    model = make_model(name, device=device)
    x, y = make_data(name, device=device)
    D = compute(model, (x, y), kind=kind, structure="kfac", loss=SPECS[name].loss).dense().cpu()
    assert_symmetric_psd(D)
    ref = make_model(name)
    assert torch.count_nonzero(D[~block_mask(ref)]) == 0, "KFAC has entries between modules"
    kron = set(kfac_param_names(ref))
    other = [n for n, _ in ref.named_parameters() if n not in kron]
    assert other, "model has no non-Kronecker parameters"
    idx = flat_indices(ref, other)
    exact_diag = reference_fisher(name, kind).diagonal()[idx]
    assert_matches(submatrix(D, idx), torch.diag_embed(exact_diag), rtol=1e-8)
    rest = torch.ones(D.shape[0], dtype=torch.bool)
    rest[idx] = False
    assert torch.count_nonzero(D[idx][:, rest]) == 0
    # the Kronecker-factored layers are not diagonal: KFAC keeps the within-layer correlations
    kron_idx = flat_indices(ref, sorted(kron, key=[n for n, _ in ref.named_parameters()].index))
    K = submatrix(D, kron_idx)
    assert torch.count_nonzero(K - torch.diag_embed(K.diagonal())) > 0


# --------------------------------------------------------------------------------------------------
# The torch.func fallback warns, once per call, naming the module; supported models do not warn
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("structure", ["diag", "full", "block", "kfac"])
@pytest.mark.parametrize("name", FALLBACK_MODELS)
def test_fallback_warns_once_naming_the_module(name, structure, device):
    model = make_model(name, device=device)
    x, y = make_data(name, device=device)
    for _ in range(2):                                   # every call says so, once (not once per batch)
        with untouched(model), expect_fallback_warning(name):
            fx.fisher(model, (x, y), kind="true", structure=structure, loss=SPECS[name].loss, batch_size=4)
    with pytest.warns(UserWarning, match=SPECS[name].fallback):
        fx.fisher(model, (x, y), kind="empirical", structure="diag", loss=SPECS[name].loss)


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq", "norm"])
def test_supported_models_do_not_warn(name, device):
    model = make_model(name, device=device)
    x, y = make_data(name, device=device)
    with expect_fallback_warning(name):
        fx.fisher(model, (x, y), kind="true", structure="diag", loss=SPECS[name].loss, batch_size=4)


# --------------------------------------------------------------------------------------------------
# BatchNorm in train mode
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("structure", ["diag", "full", "kfac"])
def test_batchnorm_in_train_mode_is_refused(structure, device):
    model = make_model("norm", device=device).train()
    x, y = make_data("norm", device=device)
    with untouched(model), pytest.raises(ValueError, match=r"(?i)batch\s*norm|\beval\b"):
        fx.fisher(model, (x, y), kind="true", structure=structure, loss="cross_entropy")
    assert model.training and model.bn.training
    assert model.bn.num_batches_tracked.item() == 0


def test_batchnorm_submodule_in_train_mode_is_refused_even_if_root_is_eval(device):
    model = make_model("norm", device=device)
    model.bn.train()
    x, y = make_data("norm", device=device)
    with untouched(model), pytest.raises(ValueError, match=r"(?i)batch\s*norm|\beval\b"):
        fx.fisher(model, (x, y), kind="empirical", structure="diag", loss="cross_entropy")


def test_train_mode_without_batchnorm_is_accepted(device):
    model = make_model("cnn", device=device).train()
    x, y = make_data("cnn", device=device)
    F = compute(model, (x, y), kind="true", structure="diag", loss="cross_entropy")
    assert model.training
    assert_matches(F.diag(), reference_fisher("cnn", "true").diagonal(), rtol=1e-8)


# --------------------------------------------------------------------------------------------------
# Hooks never outlive a call
# --------------------------------------------------------------------------------------------------

class ExplodingMLP(MLP):
    """Raises from inside its forward on the k-th call (hooks are registered by then)."""

    def __init__(self, explode_at):
        super().__init__()
        self.explode_at = explode_at

    def forward(self, x):
        if self.forward_calls + 1 == self.explode_at:
            self.forward_calls += 1
            self.fc1(x)                                   # let the hooks fire first
            raise RuntimeError("boom from the model")
        return super().forward(x)


@pytest.mark.parametrize("structure", ["diag", "full", "block", "kfac"])
@pytest.mark.parametrize("explode_at", [1, 2])
def test_hooks_removed_when_forward_raises(explode_at, structure, device):
    model = ExplodingMLP(explode_at).double().eval()
    model.load_state_dict(make_model("mlp").state_dict())
    model.to(device)
    x, y = make_data("mlp", device=device)
    with untouched(model), pytest.raises(RuntimeError, match="boom"):
        fx.fisher(model, (x, y), kind="true", structure=structure, loss="cross_entropy", batch_size=5)
    assert model.forward_calls >= 1
    # and the model still works afterwards, with the right answer
    model.explode_at = -1
    F = compute(model, (x, y), kind="true", structure="full", loss="cross_entropy")
    assert_matches(F.dense(), reference_fisher("mlp", "true"), rtol=1e-8)


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq", "norm", "scaleshift", "bilinear", "tied"])
def test_no_hooks_after_every_structure(name, device):
    model = make_model(name, device=device)
    x, y = make_data(name, device=device)
    before = global_hook_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for structure in ("diag", "full", "block", "kfac"):
            for kind in ("true", "empirical", "mc"):
                fx.fisher(model, (x, y), kind=kind, structure=structure, loss=SPECS[name].loss,
                          generator=torch.Generator(device=device).manual_seed(0))
                assert_no_hooks(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_user_hooks_are_kept_and_still_fire(device):
    """fisherext removes only its own hooks: a user's (observing) forward hook stays registered."""
    model = make_model("mlp", device=device)
    seen = []
    handle = model.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    x, y = make_data("mlp", device=device)
    F = fx.fisher(model, (x, y), kind="true", structure="diag", loss="cross_entropy")
    assert list(model.fc1._forward_hooks) == [handle.id]
    seen.clear()
    model(x)
    assert seen == [len(x)], "the user's hook no longer fires"
    assert_matches(F.diag(), reference_fisher("mlp", "true").diagonal(), rtol=1e-8)
    handle.remove()
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------------------
# Engine v2: uses, views, fallback reasons, refusals, chunked cotangents
# --------------------------------------------------------------------------------------------------

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from support.models import per_sample_fishers  # noqa: E402


def _fisher_warnings(model, data, **kw):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with untouched(model):
            F_ = fx.fisher(model, data, **kw)
    return F_, [str(w.message) for w in record if "fisherext" in str(w.message)]


class BufferNet(nn.Module):
    """A Linear applied to a buffer broadcast over the batch, and a parameter used by torch.mul."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(3, 4))
        self.fc = nn.Linear(4, 4)
        self.gain = nn.Parameter(torch.rand(4) + 0.5)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(((x + self.fc(self.table)) * self.gain).flatten(1))


def test_fallback_names_each_parameter_and_why(device):
    torch.manual_seed(0)
    model = BufferNet().double().eval()
    x, y = torch.randn(7, 3, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    expected = per_sample_fishers(model, x, y, "true", "cross_entropy").mean(0)   # on the CPU
    model.to(device)
    F_, messages = _fisher_warnings(model, (x.to(device), y.to(device)), kind="true", structure="full")
    assert len(messages) == 1
    msg = messages[0]
    assert "'fc.weight'" in msg and "'fc.bias'" in msg and "without a batch axis" in msg
    assert "'gain'" in msg and "mul" in msg
    assert "'head.weight'" not in msg, "head is captured natively"
    assert_matches(F_.dense(), expected, rtol=1e-10)


class PackedProjection(nn.Module):
    """Two projections stored as row slices of one packed weight (like attention's in_proj_weight)."""

    def __init__(self):
        super().__init__()
        self.packed = nn.Parameter(torch.randn(7, 4) * 0.5)
        self.bias = nn.Parameter(torch.randn(7) * 0.1)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        w_a, w_b = self.packed.split([3, 4])
        b_a, b_b = self.bias.split([3, 4])
        h = torch.cat([torch.tanh(F.linear(x, w_a, b_a)), torch.tanh(F.linear(x, w_b, b_b))], -1)
        return self.head(h)


class Separate(nn.Module):
    def __init__(self, packed: PackedProjection):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 3), nn.Linear(4, 4), packed.head
        with torch.no_grad():
            self.a.weight.copy_(packed.packed[:3]), self.b.weight.copy_(packed.packed[3:])
            self.a.bias.copy_(packed.bias[:3]), self.b.bias.copy_(packed.bias[3:])

    def forward(self, x):
        return self.head(torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(x))], -1))


@pytest.mark.parametrize("structure", ["diag", "full", "kfac"])
def test_slices_of_a_packed_weight_are_captured_as_their_own_linear_maps(structure, device):
    """Per-sample gradients of views (split rows) scattered into the packed parameter: the packed model's
    Fisher is the separate model's, permuted. K-FAC factors each slice as a layer of its own."""
    torch.manual_seed(1)
    packed = PackedProjection().double().eval()
    separate = Separate(packed).double().eval().to(device)
    packed.to(device)
    x, y = torch.randn(9, 4, dtype=torch.float64).to(device), torch.randint(0, 3, (9,)).to(device)
    Fp, messages = _fisher_warnings(packed, (x, y), kind="true", structure=structure)
    assert not messages, "slices of a parameter need no fallback"
    Fs = compute(separate, (x, y), kind="true", structure=structure)
    # separate order: a.w (12) a.b (3) b.w (16) b.b (4) head; packed order: packed (28) bias (7) head
    perm = torch.cat([torch.arange(0, 12), torch.arange(15, 31), torch.arange(12, 15), torch.arange(31, 35),
                      torch.arange(35, Fs.shape[0])]).to(device)
    if structure == "kfac":  # the biases join the slices' Kronecker factors there, not here: compare weights
        keep = torch.cat([torch.arange(0, 28), torch.arange(35, Fs.shape[0])]).to(device)
        assert_matches(Fp.dense()[keep][:, keep], Fs.dense()[perm][:, perm][keep][:, keep], rtol=1e-10)
    else:
        assert_matches(Fp.dense(), Fs.dense()[perm][:, perm], rtol=1e-10)


def test_a_parameter_the_forward_modifies_is_refused(device):
    class Renorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            with torch.no_grad():
                self.fc.weight.mul_(1.0)
            return self.fc(x)

    model = Renorm().double().eval().to(device)
    with pytest.raises(ValueError, match=r"fc\.weight.*in place"):
        fx.fisher(model, (torch.randn(4, 3, dtype=torch.float64, device=device),
                          torch.randint(0, 2, (4,), device=device)))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Linear(3, 2)).train(),
    lambda: nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)).train(),   # functional dropout below
])
def test_random_forward_passes_are_refused(make, device):
    model = make().double().to(device)
    if len(model) == 2:
        model.forward = lambda x: model[1](F.dropout(model[0](x), 0.2, training=True))
    data = (torch.randn(4, 3, dtype=torch.float64, device=device), torch.randint(0, 2, (4,), device=device))
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        fx.fisher(model, data)
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        fx.per_sample_fisher(model, *data)


@pytest.mark.parametrize("option,value", [("max_norm", 1.0), ("scale_grad_by_freq", True)])
def test_embeddings_that_couple_or_rewrite_are_refused(option, value, device):
    model = nn.Sequential(nn.Embedding(5, 3, **{option: value}), nn.Flatten(), nn.Linear(6, 2))
    model = model.double().eval().to(device)
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=option):
        fx.fisher(model, (torch.randint(0, 5, (4, 2), device=device),
                          torch.randint(0, 2, (4,), device=device)))
    assert torch.equal(model[0].weight, before)


class TinyLM(nn.Module):
    """Token embedding tied to the output projection, outputs [N, T, V]."""

    def __init__(self, V=6, D=4):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)

    def forward(self, x):
        return F.linear(torch.tanh(self.mix(self.emb(x))), self.emb.weight)


@pytest.mark.parametrize("structure", ["diag", "block", "kfac"])
@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_cotangents_chunked_under_a_small_budget_give_the_same_fisher(kind, structure, device):
    """A true Fisher over T = 5 positions and V = 6 classes backpropagates 30 cotangents per sample:
    under a small budget they go a few at a time, in batches of a few samples, to the same result."""
    torch.manual_seed(2)
    model = TinyLM().double().eval().to(device)
    x = torch.randint(0, 6, (11, 5)).to(device)
    y = torch.randint(0, 6, (11, 5)).to(device)
    y[0, 2] = -100
    big = compute(model, (x, y), kind=kind, structure=structure, memory_budget=1 << 30)
    small = compute(model, (x, y), kind=kind, structure=structure, memory_budget=1 << 14)
    assert_matches(small.dense(), big.dense(), rtol=1e-12)


def test_layouts_follow_a_sequence_length_that_changes_between_batches(device):
    torch.manual_seed(3)

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.fc(x.transpose(0, 1))).mean(0))

    model = SeqFirst().double().eval()
    batches = [(torch.randn(4, T, 3, dtype=torch.float64), torch.randint(0, 2, (4,))) for T in (5, 4, 7)]
    expected = torch.cat([per_sample_fishers(model, x, y, "empirical", "cross_entropy") for x, y in batches]).mean(0)
    model.to(device)                                                  # the reference above is on the CPU
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    F_ = compute(model, _ListLoader(batches), kind="empirical", structure="full")
    assert_matches(F_.dense(), expected, rtol=1e-10)


class _ListLoader(torch.utils.data.DataLoader):
    """A DataLoader over pre-made batches of different shapes."""

    def __init__(self, batches):
        super().__init__(batches, batch_size=1, collate_fn=lambda b: b[0])


class SharedBias(nn.Module):
    """A Linear whose bias is also added elsewhere by torch.add (so it goes to the fallback) and whose
    weight is passed through ``.contiguous()`` (the same tensor: still the weight)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.fc.weight.contiguous(), self.fc.bias))
        return self.head(h + self.fc.bias)


def test_a_use_whose_bias_falls_back_still_counts_for_its_weight(device):
    torch.manual_seed(4)
    model = SharedBias().double().eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    expected = per_sample_fishers(model, x, y, "true", "cross_entropy").mean(0)   # on the CPU
    model.to(device)
    F_, messages = _fisher_warnings(model, (x.to(device), y.to(device)), kind="true", structure="full")
    assert len(messages) == 1 and "'fc.bias'" in messages[0] and "'fc.weight'" not in messages[0]
    assert_matches(F_.dense(), expected, rtol=1e-10)
