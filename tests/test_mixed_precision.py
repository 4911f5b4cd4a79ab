r"""Mixed precision: float16/bfloat16 models and float32 models under ``torch.autocast``, against float64.

Every reference is plain autograd in float64 (per-sample, per-class gradient loops from ``support.models``,
double backprop for Hessian and Gauss-Newton products), never fisherext. A half-precision model is compared
with the float64 model of the *same* (rounded) weights and inputs, so the comparison measures fisherext's
arithmetic; an autocast run is compared with the float64 model of its float32 weights.

Tolerances (the derivation, measured values in the README's mixed-precision section):

- u is the unit roundoff of the half dtype, 2^-8 for bfloat16 and 2^-11 for float16. A layer's GEMM
  accumulates in float32 and rounds its output once, so each of the L layers of a model adds one rounding
  of relative size u to whatever flows through it (the float32 sums add about N·2^-24, negligible).
- A per-sample gradient entry g = δ aᵀ of layer l comes from the input side a (l − 1 forward roundings)
  and the output side δ (the logits after L roundings, the cotangent (softmax, its square root or the
  residual) rounded once, then L − l backward roundings): at most 2L + 1 roundings on the longest path,
  and a square (diagonal, traces, K-FAC factors, dense blocks) doubles the relative error: 2(2L + 1).
- A Hessian- or GGN-vector product runs three passes (forward, backward, and the backward of the backward
  or the JVP): 4L + 2 roundings on its longest path, to first order, no square.
- Both are 4L + 2 roundings. Each rounding's effect is amplified by the conditioning of what it feeds
  (‖|W||a|‖ / ‖Wa‖ of a layer, the softmax's 2‖Δz‖∞ bound on Δ log p, ReLU masks flipping at zero), for
  which the bound allows a factor c = 2: ``tol = 2 · (4L + 2) · u = (8L + 4) · u``, normwise (max |error| /
  max |reference|). Under autocast a layer also rounds its float32 weights and inputs to the autocast dtype:
  two roundings per layer, ``tol = (16L + 8) · u``.

Summing N sample contributions in a half-precision accumulator instead would add an error of up to (N − 1)u
(and for equal positive terms the sum stops growing once a term is below half its spacing, after about 1/u
terms): ``test_sum_over_many_batches_is_float32`` sums 512 batches, where a bfloat16 running sum is off by far
more than the bound (the test asserts that too), and fails on a half-precision accumulator. (A Hessian-vector
product, whose batch products differ in sign, loses less to a bfloat16 sum: 0.08-0.1 over 512-4096 batches,
about the bound itself, so it is not the quantity that shows it.)

Finite differences: every routine warns (``PrecisionWarning``) when its step is below what the dtypes
resolve (``fisherext._core.precision.check_step``); the tests below check where it must and must
not warn, and that where it warns the result is indeed off.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherext as fx
from fisherext._core.precision import PrecisionWarning, step_error
from support.models import (make_data, make_model, named_trainable, per_class_grads, reference_kfac,
                            trained_digits_classifier)
from support.zoo import zoo_data, zoo_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits (conftest)

HALF = [torch.bfloat16, torch.float16]
U = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
N = 128


@pytest.fixture(autouse=True)
def _quiet():
    # torch.func's JVP decompositions emit a FutureWarning about torch.jit.script; not ours to test here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def tol(layers: int, dtype: torch.dtype, autocast: bool = False) -> float:
    """(8L + 4)·u, twice that under autocast (module docstring)."""
    return (2 if autocast else 1) * (8 * layers + 4) * U[dtype]


def rel_max(actual, expected) -> float:
    """max |actual − expected| / max |expected|, in float64."""
    a, e = actual.detach().double().reshape(-1), expected.detach().double().reshape(-1)
    return ((a - e).abs().max() / e.abs().max()).item()


def name(dtype):
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------
# Models: the trained digits MLP (L = 2) and a small CNN on the same 8×8 digits (L = 3)


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    model, x, y = trained_digits_classifier()
    return model, x, y


def make_cnn():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                             nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 10)).eval()


@pytest.fixture(scope="module")
def models(digits):
    """name -> (float32 model, inputs [N, ...], labels [N], layers L)."""
    mlp, x, y = digits
    return {"mlp": (mlp, x[:N], y[:N], 2), "cnn": (make_cnn(), x[:N].view(-1, 1, 8, 8), y[:N], 3)}


def half_pair(model, x, dtype):
    """(the model and inputs in ``dtype``, the float64 model and inputs of the same rounded values)."""
    half = copy.deepcopy(model).to(dtype)
    return half, x.to(dtype), copy.deepcopy(half).double(), x.to(dtype).double()


# ---------------------------------------------------------------------------------------------------
# float64 references by plain autograd

_CACHE: dict = {}


def references(key, model64, x64, y):
    """Per-sample and per-class gradients of the float64 model (support.models.per_class_grads), and from
    them the diagonal Fisher of both kinds and the per-sample traces; cached by ``key``."""
    if key not in _CACHE:
        p, g = per_class_grads(model64, x64)                       # [N, C], [N, C, P]: g of −log p(c | x_n)
        g_emp = g[torch.arange(len(y)), y]                         # the data label's
        _CACHE[key] = {"p": p, "g": g, "diag true": torch.einsum("nc,ncp->p", p, g * g) / len(y),
                       "diag empirical": (g_emp ** 2).mean(0),
                       "trace": torch.einsum("nc,ncp->n", p, g * g)}
    return _CACHE[key]


def full_reference(ref, cols):
    """The true Fisher's dense block over the flat positions ``cols``: (1/N) Σ_n Σ_c p_nc g gᵀ."""
    g = ref["g"][:, :, cols]
    return torch.einsum("nc,ncp,ncq->pq", ref["p"], g, g) / g.shape[0]


def leaves(model):
    return [p for _, p in named_trainable(model)]


def unflat(v, params):
    return [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]


def hessian_vector(model64, x64, y, v):
    """H v of the mean cross entropy, double backprop."""
    params = leaves(model64)
    loss = F.cross_entropy(model64(x64), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    return torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, params, unflat(v, params))])


def ggn_vector(model64, x64, y, v):
    """G v = (1/N) Σ_n J_nᵀ Λ_n J_n v of the mean cross entropy: J v by the double-VJP trick,
    Λ = diag(p) − ppᵀ."""
    params = leaves(model64)
    out = model64(x64)
    u = torch.zeros_like(out, requires_grad=True)
    Ju = torch.autograd.grad(out, params, u, create_graph=True)
    Jv = torch.autograd.grad(Ju, u, unflat(v, params))[0]
    p = out.detach().softmax(1)
    lam = p * Jv - p * (p * Jv).sum(1, keepdim=True)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params, lam / out.shape[0])])


def direction(P, seed=1):
    return torch.randn(P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# float16 / bfloat16 models


@pytest.mark.parametrize("quantity", ["diag true", "diag empirical", "kfac", "full"])
@pytest.mark.parametrize("which", ["mlp", "cnn"])
@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_half_model_fisher_is_float32_within_the_bound(models, dtype, which, quantity):
    """fisher() of a half-precision model: a float32 FisherMatrix within (8L + 4)·u of the float64 Fisher."""
    model, x, y, L = models[which]
    half, xh, model64, x64 = half_pair(model, x, dtype)
    ref = references((which, dtype), model64, x64, y)
    if quantity.startswith("diag"):
        F_ = fx.fisher(half, (xh, y), kind=quantity.split()[1], structure="diag")
        got, want = F_.diag(), ref[quantity]
    elif quantity == "kfac":
        F_ = fx.fisher(half, (xh, y), kind="true", structure="kfac")
        got, want = F_.dense(), reference_kfac(model64, x64, y, "true", "cross_entropy")
    else:  # the dense block of the last layer (the P×P reference of the whole model would be slow)
        last = list(half)[-1]
        F_ = fx.fisher(half, (xh, y), kind="true", structure="full", params=[last])
        P = sum(p.numel() for p in half.parameters())
        cols = torch.arange(P - sum(p.numel() for p in last.parameters()), P)
        got, want = F_.dense(), full_reference(ref, cols)
    assert F_.dtype == torch.float32
    assert rel_max(got, want) <= tol(L, dtype)


@pytest.mark.parametrize("which", ["mlp", "cnn"])
@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_half_model_traces_within_the_bound(models, dtype, which):
    """per_sample_fisher(quantity="trace") of a half-precision model: every tr(F_n) within the bound,
    normwise over the inputs."""
    model, x, y, L = models[which]
    half, xh, model64, x64 = half_pair(model, x, dtype)
    got = fx.per_sample_fisher(half, xh, quantity="trace")
    assert rel_max(got, references((which, dtype), model64, x64, y)["trace"]) <= tol(L, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_half_model_per_sample_measures_are_float32(models, dtype):
    """tr(F_n), vᵀF_n v and the predicted-direction quadratic of a half-precision model: float32 and finite
    (float16's v="predicted" overflowed to NaN in its own dtype)."""
    model, x, y, _ = models["mlp"]
    half, xh, model64, x64 = half_pair(model, x, dtype)
    v = direction(sum(p.numel() for p in half.parameters()))
    out = [fx.per_sample_fisher(half, xh, quantity="trace"), fx.per_sample_fisher(half, xh, quantity="quad", v=v),
           fx.per_sample_fisher(half, xh, quantity="quad", v="predicted")]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("which", ["mlp", "cnn"])
@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_half_model_hvp_is_float32_within_the_bound(models, dtype, which, curvature):
    """hvp of a half-precision model over 4 batches: float32, within (8L + 4)·u of float64 double backprop
    (Hessian) or of the explicit Jᵀ Λ J v (GGN)."""
    model, x, y, L = models[which]
    half, xh, model64, x64 = half_pair(model, x, dtype)
    v = direction(sum(p.numel() for p in half.parameters())).to(dtype).double()  # exactly representable
    got = fx.hvp(half, "cross_entropy", (xh, y), v, curvature=curvature, batch_size=32)
    want = (hessian_vector if curvature == "hessian" else ggn_vector)(model64, x64, y, v)
    assert got.dtype == torch.float32
    assert rel_max(got, want) <= tol(L, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_half_model_operators_are_float32_within_the_bound(models, dtype):
    """GGNOperator / FisherOperator of a half-precision model: float32 operators (their batches summed in
    float32) within the bound, which the solvers take as they are."""
    model, x, y, L = models["mlp"]
    half, xh, model64, x64 = half_pair(model, x, dtype)
    v = direction(sum(p.numel() for p in half.parameters())).to(dtype).double()
    want = ggn_vector(model64, x64, y, v)
    for op in (fx.GGNOperator(half, "cross_entropy", (xh, y), batch_size=32),
               fx.FisherOperator(half, "cross_entropy", (xh, y), batch_size=32)):
        got = op @ v
        assert op.dtype == got.dtype == torch.float32
        assert rel_max(got, want) <= tol(L, dtype)
    solution = fx.solvers.cg(op, want.float(), damping=1e-3, tol=0.1)
    assert solution.dtype == torch.float32 and torch.isfinite(solution).all()


def test_half_model_norm_embedding_and_fallback_layers_within_the_bound():
    """The other per-sample rules in bfloat16: GroupNorm + BatchNorm (eval) + Conv1d, Embedding, and a module
    without a rule (the torch.func fallback), each L = 4 (every op that rounds on the gradient's path)."""
    dtype = torch.bfloat16
    for spec in ("norm", "seq", "scaleshift"):
        half = make_model(spec, dtype=torch.float32).to(dtype)
        x, y = make_data(spec, n=24, dtype=torch.float32)
        xh = x.to(dtype) if x.is_floating_point() else x
        model64 = copy.deepcopy(half).double()
        x64 = xh.double() if xh.is_floating_point() else xh
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the fallback's announcement
            got = fx.fisher(half, (xh, y), kind="true", structure="diag")
        p, g = per_class_grads(model64, x64)
        want = torch.einsum("nc,ncp->p", p, g * g) / len(y)
        assert got.dtype == torch.float32, spec
        assert rel_max(got.diag(), want) <= tol(4, dtype), spec


def bfloat16_running_sum(terms, index, batch):
    """What a bfloat16 accumulator gives for the mean over ``index`` of ``terms`` [n, ...] (float64), adding
    one batch's float64 sum, rounded to bfloat16, at a time (as a half-precision running sum of the batches'
    contributions would)."""
    running = torch.zeros(terms.shape[1:], dtype=torch.bfloat16)
    for b in range(0, len(index), batch):
        running += terms[index[b:b + batch]].sum(0).to(torch.bfloat16)
    return running.double() / len(index)


def test_sum_over_many_batches_is_float32(digits):
    """N = 4096 samples in 512 batches of 8 (the digits test set repeated), bfloat16 models: K-FAC's input
    factors A of the trained MLP and the true diagonal Fisher of an untrained one (contributions of
    comparable size from every sample, where a half-precision sum stagnates) stay within the bound, where the
    same batch contributions summed in a bfloat16 running sum miss it several times over (so this test fails
    on a half-precision accumulator)."""
    dtype, batch = torch.bfloat16, 8
    model, x, y = digits
    n = x.shape[0]
    index = torch.arange(4096) % n
    xh = x.to(dtype)
    bound = tol(2, dtype)
    # K-FAC's A = (1/N) Σ ã ãᵀ of both Linear layers, ã = (a, 1), from a plain float64 forward
    half = copy.deepcopy(model).to(dtype)
    F_ = fx.fisher(half, (xh[index], y[index]), kind="empirical", structure="kfac", batch_size=batch)
    w1, b1 = half[0].weight.double(), half[0].bias.double()
    inputs = [xh.double(), torch.relu(xh.double() @ w1.T + b1)]
    factors = [p.A for p in F_.parts if hasattr(p, "A")]
    assert len(factors) == 2
    for layer, (a, A) in enumerate(zip(inputs, factors)):
        a1 = torch.cat([a, torch.ones(n, 1, dtype=torch.float64)], 1)
        outer = a1[:, :, None] * a1[:, None, :]
        want = outer[index].mean(0)
        assert A.dtype == torch.float32
        assert rel_max(A, want) <= bound
        if layer == 0:  # the pixels: non-negative, every image alike in size
            assert rel_max(bfloat16_running_sum(outer, index, batch), want) > 3 * bound
    # the true diagonal Fisher of an untrained MLP
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval().to(dtype)
    got = fx.fisher(fresh, (xh[index], y[index]), kind="true", structure="diag", batch_size=batch)
    p, g = per_class_grads(copy.deepcopy(fresh).double(), xh.double())
    terms = torch.einsum("nc,ncp->np", p, g * g)                      # tr-weighted squares per distinct sample
    want = terms[index].mean(0)
    assert got.dtype == torch.float32
    assert rel_max(got.diag(), want) <= bound
    assert rel_max(bfloat16_running_sum(terms, index, batch), want) > 3 * bound


# ---------------------------------------------------------------------------------------------------
# float32 models under autocast


@pytest.mark.parametrize("quantity", ["diag true", "diag empirical", "kfac", "trace", "hvp", "ggn"])
@pytest.mark.parametrize("which", ["mlp", "cnn"])
@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_autocast_results_are_float32_within_the_bound(models, dtype, which, quantity):
    """A float32 model under torch.autocast("cpu", dtype): the Fisher and products of the autocast forward,
    in float32, within (16L + 8)·u of the float64 model of the float32 weights."""
    model, x, y, L = models[which]
    model64, x64 = copy.deepcopy(model).double(), x.double()
    v = direction(sum(p.numel() for p in model.parameters()))
    with torch.autocast("cpu", dtype=dtype):
        if quantity.startswith("diag"):
            got = fx.fisher(model, (x, y), kind=quantity.split()[1], structure="diag").diag()
        elif quantity == "kfac":
            got = fx.fisher(model, (x, y), kind="true", structure="kfac").dense()
        elif quantity == "trace":
            got = fx.per_sample_fisher(model, x, quantity="trace")
        else:
            got = fx.hvp(model, "cross_entropy", (x, y), v, curvature="hessian" if quantity == "hvp" else "ggn")
    if quantity == "kfac":
        want = reference_kfac(model64, x64, y, "true", "cross_entropy")
    elif quantity in ("hvp", "ggn"):
        want = (hessian_vector if quantity == "hvp" else ggn_vector)(model64, x64, y, v)
    else:
        want = references((which, "float64"), model64, x64, y)[quantity]
    assert got.dtype == torch.float32
    assert rel_max(got, want) <= tol(L, dtype, autocast=True)


@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_autocast_quad_and_ggn_through_an_in_place_residual(dtype):
    """Under autocast, v^T F_n v (per_sample_fisher) and the GGN product of a ResNet block whose in-place
    addition follows a convolution, where torch's forward-mode AD fails: both by reverse mode, float32,
    within the bound (L = 8: three convolutions, three batch norms, the addition, the Linear)."""
    model64 = zoo_model("residual_inplace")
    x64, y = zoo_data("residual_inplace")
    model, x = copy.deepcopy(model64).float(), x64.float()
    model64 = copy.deepcopy(model).double()
    v = direction(sum(p.numel() for p in model.parameters())).float().double()
    p, g = per_class_grads(model64, x.double())
    with torch.autocast("cpu", dtype=dtype):
        quad = fx.per_sample_fisher(model, x, quantity="quad", v=v.float())
        ggn = fx.hvp(model, "cross_entropy", (x, y), v.float(), curvature="ggn")
    assert quad.dtype == ggn.dtype == torch.float32
    assert rel_max(quad, torch.einsum("nc,nc->n", p, (g @ v) ** 2)) <= tol(8, dtype, autocast=True)
    assert rel_max(ggn, ggn_vector(model64, x.double(), y, v)) <= tol(8, dtype, autocast=True)


@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_autocast_runs_every_structure_and_the_fisher_matrix_works_inside_it(models, dtype):
    """Under autocast every structure (block included, with a convolution) gives a float32 FisherMatrix, whose
    products, traces and solves inside the autocast region equal those outside it (its own arithmetic runs
    with autocast off)."""
    model, x, y, _ = models["cnn"]
    P = sum(p.numel() for p in model.parameters())
    v = direction(P).float()
    for structure in ("diag", "kfac", "full", "block"):
        with torch.autocast("cpu", dtype=dtype):
            F_ = fx.fisher(model, (x, y), kind="true", structure=structure)
            inside = (F_ @ v, F_.trace(), F_.solve(v, damping=1e-3), F_.diag())
        outside = (F_ @ v, F_.trace(), F_.solve(v, damping=1e-3), F_.diag())
        assert F_.dtype == torch.float32
        for a, b in zip(inside, outside):
            assert a.dtype == torch.float32 and torch.equal(a, b), structure


# ---------------------------------------------------------------------------------------------------
# finite differences: the precision warning


def warnings_of(call):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = call()
    return out, [w for w in record if issubclass(w.category, PrecisionWarning)]


def fd_calls(model, x, y, v):
    """Every finite-difference entry point with its default step 1e-3."""
    return {
        "fd_quadratic": lambda: fx.fd_quadratic(model, x, v),
        "fd_quadratic_directions": lambda: fx.fd_quadratic_directions(model, x, torch.stack([v, -v], 1)),
        "input_sensitivity": lambda: fx.input_sensitivity(model, x[:4], v, method="fd"),
        "hvp": lambda: fx.hvp(model, "cross_entropy", (x, y), v, method="fd"),
        "perturbed": lambda: fx.perturbed(model, v, 1e-3),
    }


@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_half_precision_default_steps_warn(models, dtype):
    """At eps = 1e-3 along a unit direction a float16/bfloat16 model's step is below its parameters' spacing
    (and below u^(1/3)/10): every routine warns once, a PrecisionWarning (a UserWarning) that names it, gives
    the resolution rule's reason and points at the caller."""
    model, x, y, _ = models["mlp"]
    half = copy.deepcopy(model).to(dtype)
    v = direction(sum(p.numel() for p in half.parameters()))
    v = (v / v.norm()).to(dtype)   # a unit direction: eps·|v_i| ≈ 2e-5, below the spacing of θ ≈ 0.1 in both
    for entry, call in fd_calls(half, x[:16].to(dtype), y[:16], v).items():
        _, caught = warnings_of(call)
        assert len(caught) == 1, entry
        assert issubclass(caught[0].category, UserWarning)
        message = str(caught[0].message)
        assert f"fisherext.{entry}: eps=0.001 is below what the dtype resolves" in message
        assert "fl(θ + eps·v) − θ, off from eps·v by" in message  # the resolution rule fired
        assert caught[0].filename == __file__, entry


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=name)
def test_float32_and_float64_defaults_do_not_warn(models, dtype):
    """No PrecisionWarning from any finite-difference routine at the default eps in float32 or float64."""
    model, x, y, _ = models["mlp"]
    m = copy.deepcopy(model).to(dtype)
    v = direction(sum(p.numel() for p in m.parameters())).to(dtype)
    for entry, call in fd_calls(m, x[:16].to(dtype), y[:16], v).items():
        assert warnings_of(call)[1] == [], entry


def test_each_rule_warns_on_its_own(models):
    """The cancellation rule (eps < u^(1/3)/10: 3.9e-4 in float32) with a resolved step, and the resolution
    rule (the realized step off by > 10%) at a step the cancellation rule accepts; forward differences use
    their own threshold √u/10 (2.4e-5 in float32); perturbed only the resolution rule, and not at eps = 0."""
    model, x, _, _ = models["mlp"]
    x = x[:8]
    P = sum(p.numel() for p in model.parameters())
    v = direction(P).float()
    _, caught = warnings_of(lambda: fx.fd_quadratic(model, x, v, eps=1e-4))
    assert len(caught) == 1 and "cancellation error" in str(caught[0].message)
    assert "off from eps·v" not in str(caught[0].message)
    _, caught = warnings_of(lambda: fx.fd_quadratic(model, x, 1e-6 * v))      # eps·|v| ≈ 1e-9 < ulp(θ)
    assert len(caught) == 1 and "off from eps·v" in str(caught[0].message)
    assert "cancellation error" not in str(caught[0].message)
    assert warnings_of(lambda: fx.fd_quadratic(model, x, v, eps=1e-4, scheme="forward"))[1] == []
    assert len(warnings_of(lambda: fx.fd_quadratic(model, x, v, eps=1e-5, scheme="forward"))[1]) == 1
    assert warnings_of(lambda: fx.perturbed(model, v, 1e-4))[1] == []         # no difference: no cancellation
    assert len(warnings_of(lambda: fx.perturbed(model, 1e-6 * v, 1e-3))[1]) == 1
    assert warnings_of(lambda: fx.perturbed(model, 1e-6 * v, 0.0))[1] == []


def test_a_resolved_step_in_bfloat16_does_not_warn_and_autocast_counts(models):
    """bfloat16 parameters at eps = 0.05 (above u^(1/3)/10 = 0.016, and eps·|v| large against the spacing of
    θ) do not warn; a float32 model under bfloat16 autocast warns at 1e-3 by the cancellation rule."""
    model, x, _, _ = models["mlp"]
    x = x[:8]
    half = copy.deepcopy(model).to(torch.bfloat16)
    v = direction(sum(p.numel() for p in model.parameters()))
    assert warnings_of(lambda: fx.fd_quadratic(half, x.bfloat16(), v.bfloat16(), eps=0.05))[1] == []
    assert step_error(list(half.named_parameters()), v.bfloat16(), 0.05) < 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, caught = warnings_of(lambda: fx.fd_quadratic(model, x, v.float()))
    assert len(caught) == 1 and "two bfloat16 values" in str(caught[0].message)


def test_step_error_is_the_realized_step_error():
    """step_error against the step written out by hand: a step below half the spacing of every θ rounds
    away (error 1, i.e. 100%); a step on the spacing itself is exact (0)."""
    p = nn.Parameter(torch.tensor([1.0, 2.0, -0.5], dtype=torch.bfloat16))
    selected = [("p", p)]
    spacing = torch.tensor([2.0 ** -7, 2.0 ** -6, 2.0 ** -9], dtype=torch.float64)   # ulp of 1, 2, 0.5
    assert step_error(selected, (0.4 * spacing).to(torch.bfloat16), 1.0) == 1.0
    assert step_error(selected, spacing.to(torch.bfloat16), 1.0) == 0.0
    v = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64) * 2.0 ** -9        # 1 + 3·2^-9 rounds to 1 + 2^-7·1
    expected = abs((1 + 2.0 ** -7) - 1 - 3 * 2.0 ** -9) / (3 * 2.0 ** -9)
    assert abs(step_error(selected, v, 1.0) - expected) < 1e-12


def test_where_it_warns_the_result_is_off(models):
    """The warning's claim checked: at the default step the bfloat16 model's central-difference quadratic is
    off by more than 10% from its exact value, and the float32 model's (no warning) is within 1%."""
    model, x, _, _ = models["mlp"]
    x = x[:32]
    v = direction(sum(p.numel() for p in model.parameters()))
    half = copy.deepcopy(model).to(torch.bfloat16)
    v16 = v.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        fd16 = fx.fd_quadratic(half, x.bfloat16(), v16)
    exact16 = fx.per_sample_fisher(copy.deepcopy(half).double(), x.bfloat16().double(), quantity="quad",
                                   v=v16.double())
    assert rel_max(fd16, exact16) > 0.1
    fd32 = fx.fd_quadratic(model, x, v.float())
    exact32 = fx.per_sample_fisher(copy.deepcopy(model).double(), x.double(), quantity="quad", v=v.float().double())
    assert rel_max(fd32, exact32) < 1e-2


def test_fd_results_of_half_models_are_float32(models):
    """The finite-difference measures, the exact input sensitivity and the predicted-class directions of a
    float16 CNN come back in float32 and finite."""
    model, x, y, _ = models["cnn"]
    half = copy.deepcopy(model).to(torch.float16)
    v = direction(sum(p.numel() for p in half.parameters())).to(torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        for entry, call in fd_calls(half, x[:8].half(), y[:8], v).items():
            if entry == "perturbed":
                continue
            out = call()
            assert out.dtype == torch.float32 and torch.isfinite(out).all(), entry
        exact = fx.input_sensitivity(half, x[:4].half(), v, method="exact")
        assert exact.dtype == torch.float32 and torch.isfinite(exact).all()
        assert fx.perturb.predicted_class_directions(half, x[:4].half()).dtype == torch.float32


def test_perturbed_still_restores_bitwise_in_half_precision(models):
    """The precision check changes nothing of perturbed's restore: bfloat16 parameters come back bit for bit
    after an exception inside the block."""
    model, _, _, _ = models["mlp"]
    half = copy.deepcopy(model).to(torch.bfloat16)
    before = [p.detach().clone() for p in half.parameters()]
    v = direction(sum(p.numel() for p in half.parameters())).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        with contextlib.suppress(RuntimeError), fx.perturbed(half, v, 0.5):
            raise RuntimeError
    assert all(torch.equal(a, b) for a, b in zip(before, half.parameters()))
