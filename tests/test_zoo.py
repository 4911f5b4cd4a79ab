"""The model zoo (tests/support/zoo.py) against explicit per-sample autograd references (tests/support/oracles.py).

What users bring: in-place activations and residual adds, tied weights, sequence-first and broadcast
layouts, custom modules called with keyword arguments, modules whose forward never runs, attention and
transformer layers with padding masks, padding_idx embeddings, uncommon convolutions, ResNet-18, a
ViT-like and a GPT-like model, LSTM/GRU, segmentation outputs. For every model: the Fisher diagonal
(true and empirical), the full matrix and its blocks (on a params subset where P is large), tr(F_n)
and v^T F_n v per sample; for a representative subset also Hessian/GGN products and operators, the
Fisher operator and influence functions; KFAC where the nn.Linear reference applies. Every call runs
inside models.untouched (the model is left unchanged and no hook remains); the torch.func fallback's
UserWarning is allowed, its value is checked. Train-mode Dropout is refused by every entry point.

Each comparison's max error relative to the reference's largest entry (or the exception a call
raised) is recorded per (model, quantity); with FISHEREXT_ZOO_TABLE=<path> the table is written there
as JSON ({model: {quantity: error or "ExceptionType: message"}}) at the end of the session.
"""
from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import fisherext as fx
from support import to_device
from support.curvature import directions
from fisherext import InfluenceFunctions
from fisherext.capture.layers.conv import ConvTerm
from support.models import assert_matches, block_mask, flat_indices, named_trainable, num_params, slow, submatrix, untouched
from support.zoo import IGNORE, ZOO, DropoutNet, zoo_data, zoo_model
from support.oracles import (
    INFLUENCE_DAMPING, KFAC_MODELS, dense_names, fisher_reference, flat_grad, ggn_reference, hessian_reference,
    in_model_order, influence_reference, kfac_reference, loss_fn_for, probe,
)

RTOL = 1e-8
KINDS = ["true", "empirical"]

# name -> the parameter subset of the subset Fisher and influence tests, and why (the tests put it in
# named_parameters order, the order of the subset's flat vector)
SUBSETS = {
    "unused_head": ("aux_head.weight", "aux_head.bias"),                 # never runs: exactly zero
    "mha_self_batch_first": ("attn.out_proj.weight", "attn.out_proj.bias"),  # out_proj's forward never runs
    "mha_cross_kdim_seq_first": ("attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                                 "attn.out_proj.weight"),                 # separate projections, no in_proj
    "shared_parameter": ("a.weight", "b.bias"),                           # the shared weight, listed once
    "buffer_broadcast": ("pos_fc.weight", "pos_fc.bias"),                 # the Linear on the buffer
    "film_kwargs": ("film.gamma", "film.beta"),                           # the fallback module
    "vit": ("cls_token", "pos_embed"),                                    # top-level Parameters
    "gpt": ("tok.weight", "ln_f.weight", "ln_f.bias"),                    # tied embedding + final norm
    "tied_embedding_lm": ("emb.weight", "out_bias"),                      # out_bias comes first in model order
    "mixed": ("fc.weight", "fc.bias"),                                    # the Linear applied twice
    "residual_inplace": ("bn2.weight", "bn2.bias", "fc.bias"),            # the BatchNorm before `+=`
    "segmentation": ("bn.weight", "bn.bias", "conv2.bias"),
    "lstm_bf": ("rnn.weight_hh_l0", "rnn.bias_hh_l0"),
}

# models whose Hessian, GGN, Fisher operator and influence are checked (a representative subset)
CURVATURE_MODELS = ["gpt", "mixed", "residual_inplace", "tied_embedding_lm", "mha_cross_kdim_seq_first",
                    "lstm_bf", "film_kwargs", "segmentation", "shared_parameter", "buffer_broadcast"]


def names(selection):
    """Test parameters for zoo models, marked slow where the ZooModel says so."""
    return [pytest.param(n, marks=slow) if ZOO[n].slow else n for n in selection]


ALL = names(ZOO)
MULTI_POSITION = names([n for n, s in ZOO.items() if s.multi_position])


# --------------------------------------------------------------------------------------------------
# The error table
# --------------------------------------------------------------------------------------------------

TABLE: dict[str, dict[str, object]] = {}


@pytest.fixture(scope="session", autouse=True)
def zoo_table():
    """Writes TABLE as JSON to $FISHEREXT_ZOO_TABLE (if set) when the session ends."""
    yield
    path = os.environ.get("FISHEREXT_ZOO_TABLE")
    if path:
        with open(path, "w") as f:
            json.dump(TABLE, f, indent=1, sort_keys=True)


def relative_error(actual, expected):
    actual = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() or 1.0
    return (actual - expected).abs().max().item() / scale


def compare(name, quantity, model, compute, expected):
    """Runs compute() (a fisherext call) on `model` inside untouched() with UserWarnings silenced,
    records its relative error (or the exception it raised) as TABLE[name][quantity], and asserts it
    matches `expected` to RTOL."""
    row = TABLE.setdefault(name, {})
    try:
        with untouched(model), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            actual = compute()
    except Exception as e:
        row[quantity] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        raise
    row[quantity] = relative_error(actual, expected)
    assert_matches(actual, expected, rtol=RTOL)


def setup(name, device):
    """The zoo model and its data on `device` (the cached oracles stay on the CPU; compare() checks there)."""
    spec = ZOO[name]
    model = zoo_model(name).to(device)
    x, y = to_device(zoo_data(name), device)
    # the ambiguous layout passes its class axis; every other model leaves it to inference (None)
    kw = {"loss": spec.loss} | ({"class_dim": spec.class_dim} if spec.pass_class_dim else {})
    return model, x, y, kw


# --------------------------------------------------------------------------------------------------
# The references themselves (no fisherext): conventions that the comparisons below rely on
# --------------------------------------------------------------------------------------------------

# CPU only: these three check the oracles themselves (no fisherext), which are cached on the CPU

def test_reference_padding_row_is_constant_unless_tied():
    """padding_idx: the lookup gives row 0 no gradient, so its Fisher is exactly 0 for the untied
    classifier, but not where the same weight is also the output projection (the tie)."""
    for name, param, zero in (("padded_embedding", "emb.weight", True), ("tied_embedding_lm", "emb.weight", False)):
        model = zoo_model(name)
        row0 = flat_indices(model, [param])[:model.emb.embedding_dim]
        for kind in KINDS:
            d = fisher_reference(name, kind).diag[row0]
            assert torch.all(d == 0) if zero else torch.all(d > 0), (name, kind, d)


def test_reference_ignored_positions_do_not_count():
    """With labels the true Fisher leaves ignored positions out; without labels it counts them all,
    so its per-sample trace is strictly larger (and the empirical one has no label-free version)."""
    for name in ("gpt", "tied_embedding_lm", "segmentation"):
        assert torch.all(fisher_reference(name, "true", labels=False).trace > fisher_reference(name, "true").trace)


def test_reference_ggn_is_the_rescaled_true_fisher():
    """Two references from separate code (output Jacobians and H_out vs per-class log-likelihood
    gradients) agree: the GGN of a mean cross entropy over M counted positions is (N / M) times the
    true Fisher with labels (which sums over positions and averages over samples)."""
    for name in CURVATURE_MODELS:
        x, y = zoo_data(name)
        M = int((y != IGNORE).sum())
        assert_matches(ggn_reference(name), fisher_reference(name, "true").dense() * (x.shape[0] / M), 1e-10)


# --------------------------------------------------------------------------------------------------
# fisher(): diag, full, block, kfac
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ALL)
def test_fisher_diag(name, kind, device):
    model, x, y, kw = setup(name, device)
    compare(name, f"fisher diag {kind}", model,
            lambda: fx.fisher(model, (x, y), kind=kind, structure="diag", **kw).diag(),
            fisher_reference(name, kind).diag)


@pytest.mark.parametrize("structure", ["full", "block"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ALL)
def test_fisher_dense(name, kind, structure, device):
    """The exact P x P matrix and its per-module blocks; for models with P > DENSE_LIMIT both over the
    spec's params subset (then `params=` is passed)."""
    model, x, y, kw = setup(name, device)
    subset = dense_names(name)
    params = None if len(subset) == len(named_trainable(model)) else list(subset)
    expected = fisher_reference(name, kind).dense()
    if structure == "block":
        expected = expected * block_mask(model, subset)
    compare(name, f"fisher {structure} {kind}" + (" (subset)" if params else ""), model,
            lambda: fx.fisher(model, (x, y), kind=kind, structure=structure, params=params, **kw).dense(), expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", names(SUBSETS))
def test_fisher_on_a_params_subset(name, kind, device):
    """fisher(params=subset, "full") is the subset's submatrix of the whole Fisher: a head that never
    runs gives exactly 0, out_proj (used functionally by MultiheadAttention) gives its true block."""
    model, x, y, kw = setup(name, device)
    subset = in_model_order(model, SUBSETS[name])
    ref = fisher_reference(name, kind)
    pos = {int(i): k for k, i in enumerate(ref.index)}
    idx = torch.tensor([pos[int(i)] for i in flat_indices(model, subset)])
    compare(name, f"fisher full {kind} params={'+'.join(subset)}", model,
            lambda: fx.fisher(model, (x, y), kind=kind, structure="full", params=list(subset), **kw).dense(),
            submatrix(ref.dense(), idx))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", KFAC_MODELS)
def test_fisher_kfac(name, kind, device):
    """KFAC of nn.Linear-only models whose Linears see in-place activations or a non-batch dim 0."""
    model, x, y, kw = setup(name, device)
    compare(name, f"fisher kfac {kind}", model,
            lambda: fx.fisher(model, (x, y), kind=kind, structure="kfac", **kw).dense(), kfac_reference(name, kind))


CONV_MODELS = ["inplace_cnn", "residual_inplace", "conv3d", "conv2d_same_circular", "conv_frames",
               "conv_frames_minor", "segmentation"]


@pytest.mark.parametrize("chunk", ["whole", "one_sample"])
@pytest.mark.parametrize("form", ["grouped", "unfolded"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CONV_MODELS)
def test_convolution_forms(name, kind, form, chunk, device, monkeypatch):
    """A convolution's per-sample gradients have two exact forms (ConvTerm): a grouped convolution
    backward over the samples of a chunk, and the linear form over unfolded patches. Each, forced on every
    convolution, with chunks of the whole batch or of one sample, gives the diagonal, the full matrix and
    the per-sample traces."""
    monkeypatch.setattr(ConvTerm, "use_grouped", staticmethod(lambda *_: form == "grouped"))
    if chunk == "one_sample":
        monkeypatch.setattr(ConvTerm, "chunk_bytes", 1)
    model, x, y, kw = setup(name, device)
    ref = fisher_reference(name, kind)
    subset = dense_names(name)
    params = None if len(subset) == len(named_trainable(model)) else list(subset)
    tag = f"{kind} {form} {chunk}"
    compare(name, f"conv diag {tag}", model,
            lambda: fx.fisher(model, (x, y), kind=kind, structure="diag", **kw).diag(), ref.diag)
    compare(name, f"conv full {tag}", model,
            lambda: fx.fisher(model, (x, y), kind=kind, structure="full", params=params, **kw).dense(), ref.dense())
    compare(name, f"conv trace {tag}", model,
            lambda: fx.per_sample_fisher(model, x, y, kind=kind, quantity="trace", **kw), ref.trace)


# --------------------------------------------------------------------------------------------------
# per_sample_fisher(): tr(F_n) and v^T F_n v
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantity", ["trace", "quad"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ALL)
def test_per_sample_fisher(name, kind, quantity, device):
    """With labels given (ignored positions left out of both kinds)."""
    model, x, y, kw = setup(name, device)
    v = probe(name).to(device) if quantity == "quad" else None
    ref = fisher_reference(name, kind)
    compare(name, f"per_sample {quantity} {kind}", model,
            lambda: fx.per_sample_fisher(model, x, y, kind=kind, quantity=quantity, v=v, **kw),
            ref.trace if quantity == "trace" else ref.quad)


def _classifiers():
    """The cross-entropy zoo models with logits [N, C] (the outputs v="predicted" is defined for)."""
    out = []
    for name, spec in ZOO.items():
        if spec.loss == "cross_entropy":
            x, _ = zoo_data(name)
            with torch.no_grad():
                if zoo_model(name)(x[:2]).dim() == 2:
                    out.append(name)
    return names(out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", _classifiers())
def test_per_sample_quad_along_each_inputs_predicted_direction(name, kind, device):
    """v="predicted" against plain autograd per input: v_n = ∇log p(ŷ_n) / ‖·‖ by one backward pass of the
    input alone, then Σ w (gᵀv_n)² over the kind's per-sample gradients."""
    model, x, y, kw = setup(name, device)
    ref_model, (xr, yr) = zoo_model(name), zoo_data(name)
    params = [p for _, p in named_trainable(ref_model)]
    expected = []
    for n in range(xr.shape[0]):
        out = ref_model(xr[n:n + 1])
        v = flat_grad(torch.log_softmax(out, -1).max(), params)
        v = v / v.norm()
        logp = torch.log_softmax(out, -1)[0]
        classes = range(logp.numel()) if kind == "true" else [int(yr[n])]
        expected.append(sum((logp[c].exp().detach() if kind == "true" else 1.0) * flat_grad(-logp[c], params).dot(v) ** 2
                            for c in classes))
    compare(name, f"per_sample quad predicted {kind}", model,
            lambda: fx.per_sample_fisher(model, x, y, kind=kind, quantity="quad", v="predicted", **kw),
            torch.stack(expected))


@pytest.mark.parametrize("quantity", ["trace", "quad"])
@pytest.mark.parametrize("name", MULTI_POSITION)
def test_per_sample_true_fisher_without_labels_counts_every_position(name, quantity, device):
    """y=None: there are no labels to infer the class axis from, so class_dim is passed; every
    position counts."""
    model, x, _, kw = setup(name, device)
    kw["class_dim"] = ZOO[name].class_dim
    v = probe(name).to(device) if quantity == "quad" else None
    ref = fisher_reference(name, "true", labels=False)
    compare(name, f"per_sample {quantity} true (no labels)", model,
            lambda: fx.per_sample_fisher(model, x, kind="true", quantity=quantity, v=v, **kw),
            ref.trace if quantity == "trace" else ref.quad)


@pytest.mark.parametrize("call", ["fisher", "per_sample_fisher"])
def test_ambiguous_class_axis_is_refused(call, device):
    """Outputs [N, T, C] with T == C and labels [N, T]: dropping axis 1 or axis 2 both give the labels'
    shape, so class_dim=None must raise a ValueError naming class_dim rather than guess."""
    name = "per_position_t_eq_c"
    model, x, y, _ = setup(name, device)
    with untouched(model), pytest.raises(ValueError, match="class_dim"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if call == "fisher":
            fx.fisher(model, (x, y), kind="empirical", structure="diag")
        else:
            fx.per_sample_fisher(model, x, y, kind="empirical", quantity="trace")


# --------------------------------------------------------------------------------------------------
# Curvature products, operators and influence (representative subset)
# --------------------------------------------------------------------------------------------------

def curvature_setup(name, device):
    """(model, data, loss, V [P, 2]): model and data on `device`, V on the CPU with the oracles."""
    model, x, y, _ = setup(name, device)
    return model, (x, y), loss_fn_for(name), directions(num_params(model), K=2).T


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("name", names(CURVATURE_MODELS))
def test_hvp(name, curvature, device):
    model, data, loss_fn, V = curvature_setup(name, device)
    M = hessian_reference(name) if curvature == "hessian" else ggn_reference(name)
    compare(name, f"hvp {curvature}", model,
            lambda: fx.hvp(model, loss_fn, data, V[:, 0].to(device), curvature=curvature), M @ V[:, 0])


@pytest.mark.parametrize("operator", ["HessianOperator", "GGNOperator"])
@pytest.mark.parametrize("name", names(CURVATURE_MODELS))
def test_curvature_operator(name, operator, device):
    model, data, loss_fn, V = curvature_setup(name, device)
    M = hessian_reference(name) if operator == "HessianOperator" else ggn_reference(name)
    compare(name, f"{operator} @ V", model, lambda: getattr(fx, operator)(model, loss_fn, data) @ V.to(device), M @ V)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", names(CURVATURE_MODELS))
def test_fisher_operator(name, kind, device):
    """FisherOperator @ V equals fisher(..., structure="full") @ V (the per-sample sum over positions)."""
    model, data, _, V = curvature_setup(name, device)
    compare(name, f"FisherOperator {kind} @ V", model,
            lambda: fx.FisherOperator(model, "cross_entropy", data, kind=kind) @ V.to(device),
            fisher_reference(name, kind).dense() @ V)


@pytest.mark.parametrize("name", names(CURVATURE_MODELS))
def test_influence(name, device):
    model, train, loss_fn, _ = curvature_setup(name, device)
    test = to_device(zoo_data(name, 3, seed=1), device)
    subset = list(SUBSETS[name])
    compare(name, "influence (exact, subset)", model,
            lambda: InfluenceFunctions(model, loss_fn, train, damping=INFLUENCE_DAMPING, solver="exact",
                                       params=subset).influence(test),
            influence_reference(name, tuple(subset)))


# --------------------------------------------------------------------------------------------------
# Refusals: Dropout in train mode, at every entry point
# --------------------------------------------------------------------------------------------------

def _ones(model, *shape):
    return torch.ones(num_params(model), *shape, dtype=torch.float64, device=next(model.parameters()).device)


ENTRY_POINTS = {
    "fisher": lambda m, x, y: fx.fisher(m, (x, y), kind="true", structure="diag"),
    "per_sample_fisher trace": lambda m, x, y: fx.per_sample_fisher(m, x, kind="true", quantity="trace"),
    "per_sample_fisher quad": lambda m, x, y: fx.per_sample_fisher(m, x, y, kind="empirical", quantity="quad",
                                                                   v=_ones(m)),
    "hvp": lambda m, x, y: fx.hvp(m, F.cross_entropy, (x, y), _ones(m)),
    "HessianOperator": lambda m, x, y: fx.HessianOperator(m, F.cross_entropy, (x, y)) @ _ones(m, 1),
    "GGNOperator": lambda m, x, y: fx.GGNOperator(m, F.cross_entropy, (x, y)) @ _ones(m, 1),
    "FisherOperator": lambda m, x, y: fx.FisherOperator(m, "cross_entropy", (x, y)) @ _ones(m, 1),
    "InfluenceFunctions": lambda m, x, y: InfluenceFunctions(m, F.cross_entropy, (x, y), damping=1.0).influence((x, y)),
}


def _train_mode_dropout(device):
    """DropoutNet in eval mode except its one Dropout: the error must name that module."""
    model = DropoutNet().to(torch.float64).eval().to(device)
    model.body.regularizer.train()
    return (model, torch.randn(5, 4, dtype=torch.float64, device=device), torch.tensor([0, 1, 2, 0, 1], device=device),
            [DropoutNet.DROPOUT])


def _train_mode_vit(device):
    """The ViT-like model left in train mode (model.train()): its dropouts live inside
    TransformerEncoderLayer (nn.Dropout modules, and MultiheadAttention's own dropout); the error must
    name one of them."""
    model = zoo_model("vit").train().to(device)
    x, y = to_device(zoo_data("vit"), device)
    active = [n for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Dropout, torch.nn.MultiheadAttention)) and n]
    return model, x, y, active


def _train_mode_batchnorm(device):
    """The in-place CNN with its BatchNorm in train mode (batch statistics couple the samples)."""
    model = zoo_model("inplace_cnn").to(device)
    model.bn.train()
    return model, *to_device(zoo_data("inplace_cnn"), device), ["bn"]


# the per-sample entry points, which a train-mode BatchNorm makes ill-defined (the batch-mean Hessian
# and GGN products are not asserted either way for BatchNorm)
PER_SAMPLE_ENTRY_POINTS = ["fisher", "per_sample_fisher trace", "per_sample_fisher quad", "FisherOperator",
                           "InfluenceFunctions"]


@pytest.mark.parametrize("entry,make", [(e, m) for m in (_train_mode_dropout, _train_mode_vit) for e in ENTRY_POINTS]
                         + [(e, _train_mode_batchnorm) for e in PER_SAMPLE_ENTRY_POINTS],
                         ids=lambda v: v if isinstance(v, str) else v.__name__.removeprefix("_train_mode_"))
def test_train_mode_is_refused(entry, make, device):
    """A ValueError saying model.eval() and naming a module in train mode, with the
    model left as it was (still in train mode) and no hook left behind."""
    model, x, y, modules = make(device)
    with untouched(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=re.escape("model.eval()")) as info:
            ENTRY_POINTS[entry](model, x, y)
    message = str(info.value)
    assert any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message) for n in modules), (
        f"the error names none of the modules in train mode {modules}: {message!r}")
