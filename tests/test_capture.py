"""Capture (per-layer hooks and the torch.func fallback), checked through fx.fisher: every supported
layer kind gives the exact Fisher, an unsupported parametrized module goes through the fallback with
exactly one warning, BatchNorm in train mode is refused, and hooks never outlive a call — also when the
model's forward raises.
"""
import warnings

import pytest
import torch

import fisherext as fx
from models import (
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
def test_layer_kinds_exact(name, kind, structure):
    """Conv2d (stride, padding, groups) + LayerNorm; Embedding + Linear over T positions; Conv1d +
    GroupNorm + BatchNorm2d (eval); a custom parametrized module and nn.Bilinear (fallback); a Linear
    used twice (weight tying)."""
    model = make_model(name)
    x, y = make_data(name)
    F = compute(model, (x, y), kind=kind, structure=structure, loss=SPECS[name].loss, batch_size=4)
    expected = expected_dense(name, kind, structure)
    assert_matches(F.dense(), expected, rtol=1e-8)
    assert_matches(F.diag(), expected.diagonal(), rtol=1e-8)
    assert F.num_samples == len(x)


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("name", ["seq", "scaleshift", "bilinear"])
def test_kfac_exact_where_every_kronecker_layer_is_linear(name, kind):
    """seq: Linear over T = 7 positions (A averages over N*T rows, G sums over t); Embedding diagonal.
    scaleshift / bilinear: Linear layers Kronecker-factored, the other module's parameters diagonal."""
    model = make_model(name)
    x, y = make_data(name)
    F = compute(model, (x, y), kind=kind, structure="kfac", loss=SPECS[name].loss)
    assert_matches(F.dense(), expected_dense(name, kind, "kfac"), rtol=1e-8)


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("name", ["cnn", "norm", "seq", "scaleshift", "bilinear"])
def test_kfac_properties(name, kind):
    """Symmetric PSD; nothing between modules; every parameter outside Linear/Conv layers carries exactly
    its exact diagonal Fisher and nothing off the diagonal."""
    model = make_model(name)
    x, y = make_data(name)
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
def test_fallback_warns_once_naming_the_module(name, structure):
    model = make_model(name)
    x, y = make_data(name)
    for _ in range(2):                                   # every call says so, once (not once per batch)
        with untouched(model), expect_fallback_warning(name):
            fx.fisher(model, (x, y), kind="true", structure=structure, loss=SPECS[name].loss, batch_size=4)
    with pytest.warns(UserWarning, match=SPECS[name].fallback):
        fx.fisher(model, (x, y), kind="empirical", structure="diag", loss=SPECS[name].loss)


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq", "norm"])
def test_supported_models_do_not_warn(name):
    model = make_model(name)
    x, y = make_data(name)
    with expect_fallback_warning(name):
        fx.fisher(model, (x, y), kind="true", structure="diag", loss=SPECS[name].loss, batch_size=4)


# --------------------------------------------------------------------------------------------------
# BatchNorm in train mode
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("structure", ["diag", "full", "kfac"])
def test_batchnorm_in_train_mode_is_refused(structure):
    model = make_model("norm").train()
    x, y = make_data("norm")
    with untouched(model), pytest.raises(ValueError, match=r"(?i)batch\s*norm|\beval\b"):
        fx.fisher(model, (x, y), kind="true", structure=structure, loss="cross_entropy")
    assert model.training and model.bn.training
    assert model.bn.num_batches_tracked.item() == 0


def test_batchnorm_submodule_in_train_mode_is_refused_even_if_root_is_eval():
    model = make_model("norm")
    model.bn.train()
    x, y = make_data("norm")
    with untouched(model), pytest.raises(ValueError, match=r"(?i)batch\s*norm|\beval\b"):
        fx.fisher(model, (x, y), kind="empirical", structure="diag", loss="cross_entropy")


def test_train_mode_without_batchnorm_is_accepted():
    model = make_model("cnn").train()
    x, y = make_data("cnn")
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
def test_hooks_removed_when_forward_raises(explode_at, structure):
    model = ExplodingMLP(explode_at).double().eval()
    model.load_state_dict(make_model("mlp").state_dict())
    x, y = make_data("mlp")
    with untouched(model), pytest.raises(RuntimeError, match="boom"):
        fx.fisher(model, (x, y), kind="true", structure=structure, loss="cross_entropy", batch_size=5)
    assert model.forward_calls >= 1
    # and the model still works afterwards, with the right answer
    model.explode_at = -1
    F = compute(model, (x, y), kind="true", structure="full", loss="cross_entropy")
    assert_matches(F.dense(), reference_fisher("mlp", "true"), rtol=1e-8)


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq", "norm", "scaleshift", "bilinear", "tied"])
def test_no_hooks_after_every_structure(name):
    model = make_model(name)
    x, y = make_data(name)
    before = global_hook_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for structure in ("diag", "full", "block", "kfac"):
            for kind in ("true", "empirical", "mc"):
                fx.fisher(model, (x, y), kind=kind, structure=structure, loss=SPECS[name].loss,
                          generator=torch.Generator().manual_seed(0))
                assert_no_hooks(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_user_hooks_are_kept_and_still_fire():
    """fisherext removes only its own hooks: a user's (observing) forward hook stays registered."""
    model = make_model("mlp")
    seen = []
    handle = model.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    x, y = make_data("mlp")
    F = fx.fisher(model, (x, y), kind="true", structure="diag", loss="cross_entropy")
    assert list(model.fc1._forward_hooks) == [handle.id]
    seen.clear()
    model(x)
    assert seen == [len(x)], "the user's hook no longer fires"
    assert_matches(F.diag(), reference_fisher("mlp", "true").diagonal(), rtol=1e-8)
    handle.remove()
    assert_no_hooks(model)
