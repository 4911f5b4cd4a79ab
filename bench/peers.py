r"""Peer adapters: each quantity of the benchmark as the peer libraries compute it, brought to one convention.

``PEER_IMPLS[quantity][peer]`` is a callable the harness times and checks against its reference. Peers
(optional, bench-only; each is imported inside its adapters, so a missing one raises ImportError, which the
harness shows as "not installed"): ``backpack`` (backpack-for-pytorch 1.7.1), ``nngeometry`` (0.4),
``curvlinops`` (curvlinops-for-pytorch 3.0.1), ``opacus`` (1.6.0), ``asdl`` (asdfghjkl 0.1a5). A peer appears
under a quantity only where it computes it; where it cannot for a given model its adapter raises rather
than return a number of another convention. Two peer results are wrong without a word, deterministically,
and are passed on as they are so that the benchmark shows them (tests/test_bench_peers.py asserts both):
ASDL's diagonals of a Linear applied over positions (it treats each position as a sample: Σₜ(δₜaₜ)² in
place of (Σₜ δₜaₜ)², 14-15 % off on a small sequence model), and curvlinops' HVP through a LayerNorm
(torch.func's jvp over jacrev, 11 % off in torch 2.14.1; jvp over grad is right).

Conventions. N samples, C classes, per-sample loss ℓₙ = −log p(yₙ | xₙ, θ) (cross entropy on logits);
gₙ = ∇θ ℓₙ; g_nc = ∇θ(−log p(c | xₙ, θ)); p_nc = p(c | xₙ, θ); Fₙ = Σ_c p_nc g_nc g_ncᵀ = Jₙᵀ Λₙ Jₙ with
Λₙ = diag(pₙ) − pₙpₙᵀ (the exact true Fisher of input n, which for softmax cross entropy is also its GGN).
Flat vectors and matrices follow ``model.parameters()``, parameters with ``requires_grad`` only.

==================  ================================  =====================================================
quantity            signature                         value
==================  ================================  =====================================================
``diag_empirical``  ``fn(model, x, y) -> [P]``        (1/N) Σₙ gₙ ⊙ gₙ
``diag_true``       ``fn(model, x, y) -> [P]``        diag of F = (1/N) Σₙ Fₙ (= the GGN of the mean CE)
``full_empirical``  ``fn(model, x, y) -> [P, P]``     (1/N) Σₙ gₙ gₙᵀ
``kfac``            ``fn(model, x, y) -> [(A, G)]``   a pair per nn.Linear / nn.Conv2d, ``modules()`` order
``trace_true``      ``fn(model, x, y) -> [N]``        tr Fₙ
``quad_true``       ``fn(model, x, y, v) -> [N]``     vᵀ Fₙ v, v flat [P]
``hvp``             ``fn(model, x, y, V) -> [P, K]``  ∇²θ L · V, L = (1/N) Σₙ ℓₙ
``ggn``             ``fn(model, x, y, V) -> [P, K]``  F · V (the GGN of L)
==================  ================================  =====================================================

K-FAC (exact over the classes, "KFLR" / curvlinops' type-2, no sampling; KFAC-expand of Eschenhagen et al.
2023 for weight sharing). For a layer with input a_nt and output s_nt at its positions t = 1..T (T = 1 for
a Linear on [N, in], L for a Linear on [N, L, in], H_out·W_out for a Conv2d, whose a_nt is the unfolded
patch of C_in·kh·kw entries in ``F.unfold`` order), ã = [a; 1] with a bias, [a] without, δ_nct = ∂(−log p_nc)/∂s_nt:

    A = (1/(N T)) Σₙ Σₜ ã_nt ã_ntᵀ            [in(+1), in(+1)]   (the conventional input factor: a mean)
    G = (1/N) Σₙ Σ_c p_nc Σₜ δ_nct δ_nctᵀ     [out, out]         (positions summed, samples averaged)

so that G ⊗ A, over the row-major vec of [W | b], approximates the layer's block of F (exactly so for a
Linear with T = 1). Only the product is meaningful; this split fixes the scale. A layer that the forward
does not call as a module (``MultiheadAttention.out_proj``) or calls more than once has no such factors:
every adapter raises for it.

Peer conventions met here (PEERS.md):

- BackPACK: SumGradSquared, BatchGrad and BatchDiagGGNExact are 1/N too small under reduction='mean', so
  every BackPACK pass here uses reduction='sum' and divides by N itself. KFLR (reduction='mean') keeps
  weight and bias as separate blocks, output side first ([G, A] and [G]): A gets its bias row, the mean
  input E[a], from a forward hook. Its conv factors are another approximation (positions summed inside
  G's outer product, A summed over positions), which no rescaling maps to the one above: it raises there.
  Its products (hvp, ggn) are ``backpack.hessianfree``'s autograd R-/L-operators, one column at a time.
  Its Embedding extensions build a float32 one-hot: float64 models with an Embedding raise.
- nngeometry: ``FIM`` is the true Fisher only (its exact C − 1 column Cholesky factor of Λ); the empirical
  Fisher goes through the generic Jacobian backend with the data label's log-likelihood. FIM builds that
  factor in the default dtype, so its adapters run with the default dtype set to the model's (in float64
  it would otherwise raise, or add float32's eps to every 1 − cumsum(p)). Its K-FAC puts the bias in A,
  sums A over positions and averages G over them, and splits √(C − 1) between the factors: the adapter
  multiplies G by T√(C − 1) and divides A by it. It silently skips parameters of modules it does not know
  (MultiheadAttention's in_proj); the adapters check that its layers cover every parameter, in order.
  Its GGN product is ``PMatImplicit.mv`` of the FIM (exact, matrix-free), one column at a time.
- curvlinops: built with ``check_deterministic=False`` (its check adds passes, and the default KFAC
  constructor computes the factors during the check, so one more ``compute_kronecker_factors()`` would
  double them), ``num_data`` given (no counting pass over the data), K-FAC with fisher_type='type-2',
  kfac_approx='expand', ``separate_weight_and_bias=False``, factors computed once per call and read from
  its ``_input_covariances`` / ``_gradient_covariances`` (3.0.1 has no public accessor). It has no exact
  diagonal or per-sample quantity (only stochastic estimators).
- Opacus: per-sample gradients (N × P held in memory) with loss_reduction='sum' on a summed loss (a
  mismatch scales them by N silently). Its hooks record nothing for a module in eval mode, so on a copy
  of the model only the modules with parameters are put in train mode — after checking that their own
  forward does not depend on it (dropout inside MultiheadAttention or between LSTM layers raises); the
  copy is fresh per call, so per-sample gradients never accumulate across calls.
- ASDL: FisherMaker with loss reduction 'sum' and data_size = N (mean-normalized); its exact Fisher is C
  backward passes weighted by √p. It silently skips modules it does not support (GroupNorm, LSTM,
  MultiheadAttention): the adapters check that a result exists for every parameter. Its K-FAC keeps the
  bias out of A (the adapter adds E[a] as for BackPACK) and, for a Linear over positions, sums A over
  them (divided by T here).

Copies: BackPACK (``extend``), Opacus (``GradSampleModule``, train mode) and ASDL (results stored on the
modules) mutate the model, and nngeometry and curvlinops' K-FAC remove their hooks only when they succeed,
so these adapters work on a ``copy.deepcopy`` made inside the timed call: a user pays the extension too, and
the copy is small next to the work (0.22 ms for the digits MLP, P = 85,002, against 2.4 ms for one gradient
over 1024 samples; CPU, 2 threads, min of 50). The matrix-free
products of curvlinops (torch.func) and BackPACK (autograd) run on the caller's model.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

KFAC_LAYERS = (nn.Linear, nn.Conv2d)


# ---- shared helpers ---------------------------------------------------------------------------------

def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(v, params):
    return [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]


def _kfac_layers(model):
    return [m for m in model.modules() if isinstance(m, KFAC_LAYERS)]


def _describe(layer):
    return f"{type(layer).__name__}({layer.weight.shape[1]}→{layer.weight.shape[0]})"


def _attribute(obj, *names):
    """obj.name1.name2... or None where a link is missing (where a peer stores its results)."""
    return functools.reduce(lambda o, name: getattr(o, name, None), names, obj)


def _unfold(conv, x):
    """The patches of a Conv2d input [n, C_in, H, W] as [n, C_in·kh·kw, positions]."""
    return F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)


class _LayerInputs:
    """Forward hooks on the K-FAC layers of a model, removed on exit. Per layer: the calls seen, the
    positions per sample T, and the mean over samples and positions of its (unfolded) input, E[a]."""

    def __init__(self, model):
        self.layers = _kfac_layers(model)
        self.calls = {layer: 0 for layer in self.layers}
        self.positions, self.mean_input = {}, {}

    def __enter__(self):
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def _record(self, layer, inputs, output):
        a = inputs[0].detach()
        N = a.shape[0]
        self.calls[layer] += 1
        if isinstance(layer, nn.Conv2d):
            self.positions[layer] = output.shape[2:].numel()
            # unfold is linear: summing the images first unfolds one image instead of N.
            self.mean_input[layer] = _unfold(layer, a.sum(0, keepdim=True))[0].mean(1) / N
        else:
            rows = a.reshape(-1, a.shape[-1])
            self.positions[layer] = rows.shape[0] // N
            self.mean_input[layer] = rows.mean(0)

    def check_called_once(self):
        for layer, calls in self.calls.items():
            if calls != 1:
                raise NotImplementedError(
                    f"{_describe(layer)} was called {calls} times as a module: no per-layer K-FAC factors "
                    "(e.g. MultiheadAttention applies out_proj functionally)")

    def with_bias_row(self, layer, A):
        """[[A, E[a]], [E[a]ᵀ, 1]] for a layer with a bias (the peer kept the bias out of A); A otherwise."""
        if layer.bias is None:
            return A
        m = self.mean_input[layer]
        return torch.cat([torch.cat([A, m[:, None]], 1), torch.cat([m, m.new_ones(1)])[None]], 0)


def _missing(peer, what, where):
    return NotImplementedError(f"{peer} computed no {what} for {where}: its module is not supported")


def _parameter(index, p):
    return f"parameter {index} (shape {tuple(p.shape)})"


# ---- BackPACK -----------------------------------------------------------------------------------------

def _backpack(model, x, y, extension, reduction="sum", second_order=False, layer_inputs=False):
    """One BackPACK backward pass on an extended deepcopy of the model (inside the timed call).

    Second-order passes of a model that is not an nn.Sequential go through BackPACK's converter, which turns
    functional ops between modules (flatten, +, getitem, ...) into modules its backpropagation can traverse;
    first-order extensions need only each module's own input and output gradient. Returns the copy's
    parameters (taken before the converter rebuilds the module graph) and, with ``layer_inputs``, the
    ``_LayerInputs`` of the copy's K-FAC layers.
    """
    from backpack import backpack, extend

    twin = copy.deepcopy(model)
    params = _params(twin)
    recorder = _LayerInputs(twin) if layer_inputs else contextlib.nullcontext()
    twin = extend(twin, use_converter=second_order and not isinstance(twin, nn.Sequential))
    with recorder:
        loss = extend(nn.CrossEntropyLoss(reduction=reduction))(twin(x), y)
    with backpack(extension), warnings.catch_warnings():
        # BackPACK's module hooks warn when a module's input needs no gradient (the first layer's); harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    return params, recorder


def _saved(params, attr):
    for i, p in enumerate(params):
        if not hasattr(p, attr):
            raise _missing("BackPACK", attr, _parameter(i, p))
    return [getattr(p, attr) for p in params]


def backpack_diag_empirical(model, x, y):
    from backpack.extensions import SumGradSquared
    params, _ = _backpack(model, x, y, SumGradSquared())
    return _flat(_saved(params, "sum_grad_squared")) / x.shape[0]


def backpack_diag_true(model, x, y):
    from backpack.extensions import DiagGGNExact
    params, _ = _backpack(model, x, y, DiagGGNExact(), second_order=True)
    return _flat(_saved(params, "diag_ggn_exact")) / x.shape[0]


def backpack_full_empirical(model, x, y):
    from backpack.extensions import BatchGrad
    params, _ = _backpack(model, x, y, BatchGrad())
    G = torch.cat([g.flatten(1) for g in _saved(params, "grad_batch")], 1)
    return G.T @ G / x.shape[0]


def backpack_trace_true(model, x, y):
    from backpack.extensions import BatchDiagGGNExact
    # Under reduction='sum' each sample's diagonal is its own Fₙ's, so its sum is tr Fₙ.
    params, _ = _backpack(model, x, y, BatchDiagGGNExact(), second_order=True)
    return sum(d.flatten(1).sum(1) for d in _saved(params, "diag_ggn_exact_batch"))


def backpack_quad_true(model, x, y, v):
    from backpack.extensions import SqrtGGNExact
    # sqrt_ggn_exact is [C, N, *p.shape] with Fₙ = Σ_c s_nc s_ncᵀ (reduction='sum': no 1/√N in it).
    params, _ = _backpack(model, x, y, SqrtGGNExact(), second_order=True)
    roots = _saved(params, "sqrt_ggn_exact")
    return sum(S.flatten(2) @ vp.reshape(-1) for S, vp in zip(roots, _split(v, params))).square().sum(0)


def backpack_kfac(model, x, y):
    from backpack.extensions import KFLR
    if any(isinstance(layer, nn.Conv2d) for layer in _kfac_layers(model)):
        raise NotImplementedError("BackPACK's conv KFLR sums the positions inside G's outer product and over A: "
                                  "another approximation than KFAC-expand, not a rescaling of it")
    # reduction='mean': KFLR's square root carries 1/√N, so G is already the mean over samples.
    _, recorder = _backpack(model, x, y, KFLR(), reduction="mean", second_order=True, layer_inputs=True)
    recorder.check_called_once()
    factors = []
    for layer in recorder.layers:
        if not hasattr(layer.weight, "kflr"):
            raise _missing("BackPACK", "kflr", _describe(layer))
        G, A = layer.weight.kflr
        factors.append((recorder.with_bias_row(layer, A), G))
    return factors


def _columns(V, params, product):
    """[P, K]: ``product`` (tensor list in, tensor list out) applied to each column of V."""
    return torch.stack([_flat(product(_split(v, params))) for v in V.T], 1)


def backpack_hvp(model, x, y, V):
    from backpack.hessianfree.hvp import hessian_vector_product
    params = _params(model)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)  # one gradient graph for all columns
    return _columns(V, params, lambda v: hessian_vector_product(loss, params, v, grad_params=grads))


def backpack_ggn(model, x, y, V):
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
    params = _params(model)
    out = model(x)
    loss = F.cross_entropy(out, y)
    return _columns(V, params, lambda v: ggn_vector_product_from_plist(loss, out, params, v))


# ---- nngeometry -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _nngeometry_adapter(adapter):
    """Run an nngeometry adapter on a deepcopy of the model (nngeometry removes its hooks only when it
    succeeds) with the default dtype set to the model's (FIM builds its Cholesky factor of Λ, and the eps it
    adds to 1 − cumsum(p), in the default dtype)."""
    @functools.wraps(adapter)
    def run(model, x, y, *args):
        twin = copy.deepcopy(model)
        with _default_dtype(_params(twin)[0].dtype):
            # x.detach(): nngeometry sets requires_grad on the batch it is given.
            return adapter(twin, x.detach(), y, *args)
    return run


def _nngeometry_layers(model, layers=None):
    """nngeometry's LayerCollection of ``layers`` (all the model's, when None), checked to cover exactly
    those layers' parameters in ``model.parameters()`` order."""
    from nngeometry.layercollection import LayerCollection

    if layers is None:
        collection = LayerCollection.from_model(model)
        expected = _params(model)
    else:
        collection = LayerCollection()
        for layer in layers:
            try:
                collection.add_layer_from_model(model, layer)
            except NotImplementedError:  # raised without a message
                raise NotImplementedError(f"nngeometry has no layer type for {type(layer).__name__}") from None
        expected = [p for layer in layers for p in _params(layer)]
    modules = dict(model.named_modules())
    covered = [p for name in collection.layers for p in (modules[name].weight, modules[name].bias) if p is not None]
    if [id(p) for p in covered] != [id(p) for p in expected]:
        raise NotImplementedError("nngeometry's layers do not cover the parameters in order (it skips the parameters "
                                  "of modules it does not know, e.g. MultiheadAttention's in_proj_weight)")
    return collection


def _nngeometry_fim(model, x, representation, layers=None):
    from nngeometry.metrics import FIM
    return FIM(model, (x,), representation, variant="classif_logits", device=x.device,
               layer_collection=_nngeometry_layers(model, layers))


def _nngeometry_empirical(model, x, y, representation):
    from nngeometry.backend import TorchHooksJacobianBackend

    def log_likelihood(xb, yb):
        return torch.log_softmax(model(xb), dim=1).gather(1, yb[:, None])

    backend = TorchHooksJacobianBackend(model=model, function=log_likelihood,
                                        layer_collection=_nngeometry_layers(model))
    return representation(generator=backend, examples=(x, y))


@_nngeometry_adapter
def nngeometry_diag_empirical(model, x, y):
    from nngeometry.object import PMatDiag
    return _nngeometry_empirical(model, x, y, PMatDiag).get_diag()


@_nngeometry_adapter
def nngeometry_full_empirical(model, x, y):
    from nngeometry.object import PMatDense
    return _nngeometry_empirical(model, x, y, PMatDense).to_torch()


@_nngeometry_adapter
def nngeometry_diag_true(model, x, y):
    from nngeometry.object import PMatDiag
    return _nngeometry_fim(model, x, PMatDiag).get_diag()


@_nngeometry_adapter
def nngeometry_kfac(model, x, y):
    from nngeometry.object import PMatKFAC
    layers = _kfac_layers(model)
    with _LayerInputs(model) as recorder:
        kfac = _nngeometry_fim(model, x, PMatKFAC, layers)
    recorder.check_called_once()
    names = {module: name for name, module in model.named_modules()}
    with torch.no_grad():
        C = model(x[:1]).shape[-1]  # the class count sets nngeometry's √(C − 1) split
    factors = []
    for layer in layers:
        A, G = kfac.data[names[layer]]
        scale = recorder.positions[layer] * math.sqrt(C - 1)
        factors.append((A / scale, G * scale))
    return factors


@_nngeometry_adapter
def nngeometry_ggn(model, x, y, V):
    from nngeometry.object import PMatImplicit, PVector
    fisher = _nngeometry_fim(model, x, PMatImplicit)
    collection = fisher.generator.layer_collection
    return torch.stack([fisher.mv(PVector(collection, vector_repr=v.contiguous())).to_torch() for v in V.T], 1)


# ---- curvlinops -------------------------------------------------------------------------------------

def _curvlinops(cls, model, x, y, params, **options):
    return cls(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False, num_data=x.shape[0],
               **options)


def curvlinops_hvp(model, x, y, V):
    from curvlinops import HessianLinearOperator
    return _curvlinops(HessianLinearOperator, model, x, y, _params(model)) @ V


def curvlinops_ggn(model, x, y, V):
    from curvlinops import GGNLinearOperator
    return _curvlinops(GGNLinearOperator, model, x, y, _params(model)) @ V


def curvlinops_kfac(model, x, y):
    from curvlinops import FisherType, KFACLinearOperator, KFACType
    model = copy.deepcopy(model)  # curvlinops removes its K-FAC hooks only when the pass succeeds
    layers = _kfac_layers(model)
    kfac = _curvlinops(KFACLinearOperator, model, x, y, [p for layer in layers for p in _params(layer)],
                       fisher_type=FisherType.TYPE2, kfac_approx=KFACType.EXPAND, separate_weight_and_bias=False,
                       num_per_example_loss_terms=1)
    with _LayerInputs(model) as recorder:
        kfac.compute_kronecker_factors()  # once: it adds to the factors it holds
    recorder.check_called_once()
    names = {module: name for name, module in model.named_modules()}
    return [(kfac._input_covariances[names[layer]], kfac._gradient_covariances[names[layer]]) for layer in layers]


# ---- Opacus -----------------------------------------------------------------------------------------

def _train_mode_for_hooks(model):
    """Put the modules that own parameters in train mode (Opacus records nothing in eval mode), checking
    that none of them computes differently there; other modules (Dropout, ...) keep their mode."""
    for module in model.modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)) and module.dropout > 0:
            raise ValueError(f"{type(module).__name__} with dropout={module.dropout} computes differently in train "
                             "mode, which Opacus needs to record per-sample gradients")
        module.training = True


def _opacus_per_sample_grads(model, x, y):
    """Per parameter, Opacus' per-sample gradients [N, *p.shape] of ℓₙ (on a deepcopy, inside the timed call)."""
    from opacus import GradSampleModule

    twin = copy.deepcopy(model)
    params = _params(twin)
    _train_mode_for_hooks(twin)
    # loss_reduction must match the loss: 'sum' with a summed loss gives each sample's own gradient.
    loss = F.cross_entropy(GradSampleModule(twin, batch_first=True, loss_reduction="sum")(x), y, reduction="sum")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # as for BackPACK
        loss.backward()
    for i, p in enumerate(params):
        if getattr(p, "grad_sample", None) is None:
            raise _missing("Opacus", "grad_sample", _parameter(i, p))
    return [p.grad_sample for p in params]


def opacus_diag_empirical(model, x, y):
    return _flat([g.square().mean(0) for g in _opacus_per_sample_grads(model, x, y)])


def opacus_full_empirical(model, x, y):
    G = torch.cat([g.flatten(1) for g in _opacus_per_sample_grads(model, x, y)], 1)
    return G.T @ G / x.shape[0]


# ---- ASDL -------------------------------------------------------------------------------------------

def _asdl_fisher(twin, x, y, fisher_type, shape):
    """ASDL's Fisher of one shape; its results become attributes of the modules of ``twin``, a deepcopy."""
    import asdl

    config = asdl.FisherConfig(fisher_type=fisher_type, fisher_shapes=[shape], loss_type=asdl.LOSS_CROSS_ENTROPY,
                               data_size=x.shape[0])
    maker = asdl.get_fisher_maker(twin, config)
    maker.setup_loss_call(F.cross_entropy, maker.setup_model_call(twin, x), y)
    with warnings.catch_warnings():
        # ASDL registers module backward hooks of the old kind; torch warns about them on every call.
        warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
        maker.forward_and_backward()
    return twin


def _asdl_diag(model, x, y, fisher_type):
    twin = _asdl_fisher(copy.deepcopy(model), x, y, fisher_type, "diag")
    diags = []
    for module in twin.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                diags.append(_attribute(module, "fisher", "diag", name))
                if diags[-1] is None:
                    raise _missing("ASDL", "diagonal", _parameter(len(diags) - 1, p))
    return _flat(diags)


def asdl_diag_empirical(model, x, y):
    return _asdl_diag(model, x, y, "fisher_emp")


def asdl_diag_true(model, x, y):
    return _asdl_diag(model, x, y, "fisher_exact")


def asdl_full_empirical(model, x, y):
    full = _attribute(_asdl_fisher(copy.deepcopy(model), x, y, "fisher_emp", "full"), "fisher", "data")
    P = sum(p.numel() for p in _params(model))
    if full is None or full.shape[0] != P:
        raise NotImplementedError(f"ASDL's full Fisher covers {0 if full is None else full.shape[0]} of {P} "
                                  "parameters: it skips the modules it does not support")
    return full


def asdl_kfac(model, x, y):
    twin = copy.deepcopy(model)
    with _LayerInputs(twin) as recorder:
        _asdl_fisher(twin, x, y, "fisher_exact", "kron")
    recorder.check_called_once()
    factors = []
    for layer in recorder.layers:
        kron = _attribute(layer, "fisher", "kron")
        if kron is None:
            raise _missing("ASDL", "Kronecker factors", _describe(layer))
        # A: a mean over positions for a conv, a sum over them for a Linear.
        positions = recorder.positions[layer] if isinstance(layer, nn.Linear) else 1
        factors.append((recorder.with_bias_row(layer, kron.A / positions), kron.B))
    return factors


# ---- the registry -----------------------------------------------------------------------------------

PEER_IMPLS = {
    "diag_empirical": {"backpack": backpack_diag_empirical, "nngeometry": nngeometry_diag_empirical,
                       "opacus": opacus_diag_empirical, "asdl": asdl_diag_empirical},
    "diag_true": {"backpack": backpack_diag_true, "nngeometry": nngeometry_diag_true, "asdl": asdl_diag_true},
    "full_empirical": {"backpack": backpack_full_empirical, "nngeometry": nngeometry_full_empirical,
                       "opacus": opacus_full_empirical, "asdl": asdl_full_empirical},
    "kfac": {"backpack": backpack_kfac, "nngeometry": nngeometry_kfac, "curvlinops": curvlinops_kfac,
             "asdl": asdl_kfac},
    "trace_true": {"backpack": backpack_trace_true},
    "quad_true": {"backpack": backpack_quad_true},
    "hvp": {"backpack": backpack_hvp, "curvlinops": curvlinops_hvp},
    "ggn": {"backpack": backpack_ggn, "nngeometry": nngeometry_ggn, "curvlinops": curvlinops_ggn},
}
