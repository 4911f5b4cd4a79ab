"""fisherext.perturb: perturbed(), the finite-difference Fisher quadratic, input sensitivity.

Every finite-difference value is checked against an exact value (``per_sample_fisher(quantity="quad")``,
itself checked against the per-sample autograd loop of tests/support/models.py, or an explicit autograd loop
written here), and every routine against the standing invariant of DESIGN.md: the model is left bit for
bit as it was (parameters, storage, .grad, buffers, modes), also when the forward pass raises.

Seed 001's fisher_quadratic_form perturbs one parameter tensor at a time, so it sums only the diagonal
blocks of F_n; ``block=True`` reproduces that and must differ from the full vᵀF_nv where cross-tensor
terms matter (test_block_is_not_the_full_quadratic builds a case where the full value is exactly 0).

Vectors: one direction [P]; K shared directions as the columns of [P, K] (fd_quadratic_directions, whose
result is [N, K]); one direction per input as the rows of [N, P], only with per_input=True.
"""
import math
import warnings

import pytest
import torch
from torch import nn

import fisherext as fx
from support import assert_close, to_device
from support.perturb import randn, tanh_mlp, with_grads
from fisherext import unflatten
from support.models import (
    bitwise_equal, make_data, make_model, named_trainable, names_argument, num_params,
    param_slices, per_sample_fishers, untouched,
)


@pytest.fixture(autouse=True)
def _quiet():
    # torch.func's JVP decompositions emit a FutureWarning about torch.jit.script; not ours to test here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def exact_quad(model, x, v, params=None):
    return fx.per_sample_fisher(model, x, quantity="quad", v=v, params=params)


class FailingForward(nn.Module):
    """Wraps a model; its forward call number ``fail_at`` (1-based) raises after the wrapped forward ran."""

    def __init__(self, inner, fail_at):
        super().__init__()
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        if self.calls == self.fail_at:
            raise RuntimeError("forward failed on purpose")
        return out


def rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ---------------------------------------------------------------------------------------------------
# perturbed()


@pytest.mark.parametrize("eps", [0.37, -1e-3, 0.0])
def test_perturbed_sets_theta_plus_eps_v_and_restores_bitwise(eps, device, dtype):
    model = with_grads(make_model("cnn", dtype=dtype, device=device))
    v = randn(num_params(model), 1, dtype, device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with untouched(model):
        with fx.perturbed(model, v, eps) as m:
            assert m is model
            for name, p in model.named_parameters():
                expected = (before[name].double() + eps * v[param_slices(model)[name]].double().view_as(p)).to(dtype)
                assert_close(p.detach(), expected, dtype)
                if eps != 0:
                    assert not torch.equal(p, before[name]), f"{name} did not move"


def test_perturbed_restores_after_an_exception_in_the_block(device):
    model = with_grads(make_model("mlp", device=device))
    v = randn(num_params(model), 2, device=device)
    weight = model.fc1.weight.detach().clone()
    with untouched(model), pytest.raises(KeyError, match="raised in the block"):
        with fx.perturbed(model, v, 0.5):
            assert not torch.equal(model.fc1.weight, weight)
            raise KeyError("raised in the block")


def test_perturbed_restores_after_the_forward_raises(device):
    inner = with_grads(make_model("mlp", device=device))
    model = FailingForward(inner, fail_at=1)
    x, _ = make_data("mlp", device=device)
    with untouched(model), pytest.raises(RuntimeError, match="on purpose"):
        with fx.perturbed(model, randn(num_params(model), 3, device=device), 1e-2):
            model(x)


def test_perturbed_nested_restores_each_level_bitwise(device):
    model = make_model("mlp", device=device)
    v1, v2 = randn(num_params(model), 4, device=device), randn(num_params(model), 5, device=device)
    level0 = [p.detach().clone() for p in model.parameters()]
    with fx.perturbed(model, v1, 0.3):
        level1 = [p.detach().clone() for p in model.parameters()]
        with fx.perturbed(model, v2, -0.7):
            for p, base, piece in zip(model.parameters(), level1, unflatten(v2, level1)):
                assert_close(p.detach(), base - 0.7 * piece)
        assert all(bitwise_equal(p, q) for p, q in zip(model.parameters(), level1))
    assert all(bitwise_equal(p, q) for p, q in zip(model.parameters(), level0))


@pytest.mark.parametrize("subset", ["names", "module", "tensor"])
def test_perturbed_moves_only_the_selected_parameters(subset, device):
    model = with_grads(make_model("mlp", device=device))
    params = {"names": ["fc2.weight", "fc1.bias"], "module": [model.fc2],
              "tensor": [model.fc1.bias, model.fc2.weight]}[subset]
    chosen = {"names": ["fc1.bias", "fc2.weight"], "module": ["fc2.weight", "fc2.bias"],
              "tensor": ["fc1.bias", "fc2.weight"]}[subset]  # in named_parameters() order
    sizes = [dict(model.named_parameters())[n].numel() for n in chosen]
    v = randn(sum(sizes), 6, device=device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with untouched(model):
        with fx.perturbed(model, v, 0.25, params=params):
            pieces = dict(zip(chosen, v.split(sizes)))
            for name, p in model.named_parameters():
                if name in pieces:
                    assert_close(p.detach(), before[name] + 0.25 * pieces[name].view_as(p))
                else:
                    assert bitwise_equal(p, before[name]), f"{name} moved but was not selected"


BAD_PERTURBED = [
    ("v", ValueError, lambda P: (randn(P + 1, 0), 0.1)),
    ("v", ValueError, lambda P: (randn((2, P), 0), 0.1)),
    ("v", ValueError, lambda P: (torch.cat([randn(P - 1, 0), torch.tensor([math.nan], dtype=torch.float64)]), 0.1)),
    ("v", ValueError, lambda P: (torch.full((P,), math.inf, dtype=torch.float64), 0.1)),
    ("v", TypeError, lambda P: ([0.0] * P, 0.1)),
    ("v", TypeError, lambda P: (torch.ones(P, dtype=torch.int64), 0.1)),
    ("eps", ValueError, lambda P: (randn(P, 0), math.nan)),
    ("eps", ValueError, lambda P: (randn(P, 0), math.inf)),
    ("eps", ValueError, lambda P: (randn(P, 0), "0.1")),
]


@pytest.mark.parametrize("arg, error, make", BAD_PERTURBED,
                         ids=["v-long", "v-2d", "v-nan", "v-inf", "v-list", "v-int", "eps-nan", "eps-inf", "eps-str"])
def test_perturbed_bad_input_is_named_and_leaves_the_model_alone(arg, error, make, device):
    model = with_grads(make_model("mlp", device=device))
    v, eps = to_device(make(num_params(model)), device)
    ran = False
    with untouched(model), pytest.raises(error, match=names_argument(arg)):
        with fx.perturbed(model, v, eps):
            ran = True
    assert not ran


def test_perturbed_channels_last_and_non_contiguous_direction(device):
    """A channels_last Conv2d weight and v a column of a matrix: both non-contiguous, both must work
    (the multi-tensor kernel pairs elements in memory order; v's logical order must win)."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)).double().eval()
    model = model.to(device=device, memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    P = num_params(model)
    v = randn((P, 3), 8, device=device)[:, 1]
    assert not v.is_contiguous()
    before = [p.detach().clone() for p in model.parameters()]
    with untouched(model):
        with fx.perturbed(model, v, 0.5):
            for p, b, piece in zip(model.parameters(), before, unflatten(v.contiguous(), before)):
                assert_close(p.detach(), b + 0.5 * piece)
        x = randn((5, 2, 6, 6), 9, device=device)
        assert_close(fx.fd_quadratic(model, x, v, eps=1e-4), exact_quad(model, x, v.contiguous()),
                     torch.float32)  # FD tolerance, not float64 round-off


# ---------------------------------------------------------------------------------------------------
# fd_quadratic


def test_fd_quadratic_central_matches_the_exact_quadratic(device, dtype):
    model = tanh_mlp(dtype, device)
    x = randn((9, 5), 10, dtype, device)
    v = randn(num_params(model), 11, dtype, device)
    eps, rtol = {torch.float64: (1e-4, 1e-6), torch.float32: (1e-2, 5e-3)}[dtype]
    with untouched(model):
        out = fx.fd_quadratic(model, x, v, eps=eps)
    assert out.shape == (9,) and out.dtype == dtype and out.device.type == device.type
    exact = exact_quad(model, x, v)
    assert rel_err(out.double(), exact.double()) < rtol
    if dtype == torch.float64:  # the exact value itself against the per-sample autograd loop
        F_n = per_sample_fishers(model, x, torch.zeros(9, dtype=torch.long), "true", "cross_entropy")
        assert_close(exact, torch.einsum("i,nij,j->n", v, F_n, v))


@pytest.mark.parametrize("scheme, order", [("central", 2), ("forward", 1)])
def test_fd_quadratic_convergence_order(scheme, order, device):
    model = tanh_mlp(device=device)
    x = randn((9, 5), 12, device=device)
    v = randn(num_params(model), 13, device=device)
    exact = exact_quad(model, x, v)
    errs = [(fx.fd_quadratic(model, x, v, eps=eps, scheme=scheme) - exact).norm().item() for eps in (1e-2, 5e-3)]
    ratio = errs[0] / errs[1]
    lo, hi = {2: (3.5, 4.5), 1: (1.8, 2.2)}[order]
    assert lo <= ratio <= hi, f"{scheme}: error ratio {ratio:.3f} for eps -> eps/2, expected ~{2 ** order}"


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_fd_quadratic_per_input_directions(scheme, device):
    model = tanh_mlp(device=device)
    x = randn((6, 5), 14, device=device)
    V = randn((6, num_params(model)), 15, device=device)
    with untouched(model):
        batched = fx.fd_quadratic(model, x, V, eps=1e-3, scheme=scheme, per_input=True)
    one_at_a_time = torch.cat([fx.fd_quadratic(model, x[n:n + 1], V[n], eps=1e-3, scheme=scheme) for n in range(6)])
    assert batched.shape == (6,)
    assert_close(batched, one_at_a_time, torch.float32)  # two FD paths: equal up to FD-amplified round-off
    assert rel_err(batched, one_at_a_time) < 1e-9
    exact = torch.cat([exact_quad(model, x[n:n + 1], V[n]) for n in range(6)])
    assert rel_err(batched, exact) < (1e-5 if scheme == "central" else 1e-2)


def per_tensor_sum(fn, model, v):
    """Σ over parameter tensors t of fn(v_t, [t]): the block-diagonal sum done by hand, one tensor at a time."""
    return sum(fn(v[..., sl], [name]) for name, sl in param_slices(model).items())


@pytest.mark.parametrize("directions", ["shared", "per_input"])
def test_block_equals_the_explicit_sum_over_tensors(directions, device):
    model = tanh_mlp(device=device)
    x = randn((7, 5), 16, device=device)
    P = num_params(model)
    per_input = directions == "per_input"
    v = randn((7, P), 17, device=device) if per_input else randn(P, 17, device=device)
    with untouched(model):
        block = fx.fd_quadratic(model, x, v, eps=1e-4, block=True, per_input=per_input)
    by_hand = per_tensor_sum(lambda vt, names: fx.fd_quadratic(model, x, vt, eps=1e-4, per_input=per_input,
                                                               params=names), model, v)
    assert rel_err(block, by_hand) < 1e-9
    if directions == "shared":
        exact_blocks = per_tensor_sum(lambda vt, names: exact_quad(model, x, vt, params=names), model, v)
        assert rel_err(block, exact_blocks) < 1e-6
        full = exact_quad(model, x, v)
        assert rel_err(block, full) > 0.05, "block-diagonal sum and full quadratic should differ here"


def test_block_is_not_the_full_quadratic(device):
    """z = Wx + b with per-input v_n = (V_n, -V_n x_n): J_n v_n = V_n x_n - V_n x_n = 0, so the full
    v_nᵀF_nv_n is 0, while the per-tensor blocks ‖V_n x_n‖²_Λ + ‖V_n x_n‖²_Λ are not."""
    model = make_model("linear1", device=device)  # nn.Linear(5, 4), float64
    x = randn((5, 5), 18, device=device)
    Vw = randn((5, 4, 5), 19, device=device)
    V = torch.cat([Vw.flatten(1), -torch.einsum("noi,ni->no", Vw, x)], 1)
    full = fx.fd_quadratic(model, x, V, eps=1e-3, per_input=True)
    block = fx.fd_quadratic(model, x, V, eps=1e-3, block=True, per_input=True)
    weight_only = torch.cat([fx.fd_quadratic(model, x[n:n + 1], V[n, :20], eps=1e-3, params=["weight"])
                             for n in range(5)])
    assert full.abs().max() < 1e-12 * block.abs().max()
    assert (block > 1e-2).all()
    assert_close(block, 2 * weight_only, torch.float32)  # the bias block equals the weight block here


@pytest.mark.parametrize("layout", ["contiguous", "transposed_rows"])
@pytest.mark.parametrize("strategy", ["vmap", "in_place", "linear", "auto"])
def test_fd_quadratic_directions_columns_equal_k_calls_and_the_exact_values(strategy, layout, device):
    """V [P, K]: column k of the [N, K] result is fd_quadratic of column k, and the explicit autograd
    value; V contiguous, or the transpose of a contiguous [K, P] (the layout the strategies use)."""
    model = with_grads(tanh_mlp(device=device))
    x = randn((8, 5), 20, device=device)
    P = num_params(model)
    V = randn((P, 3), 21, device=device) if layout == "contiguous" else randn((3, P), 21, device=device).T
    with untouched(model):
        out = fx.fd_quadratic_directions(model, x, V, eps=1e-4, strategy=strategy)
    assert out.shape == (8, 3)
    separate = torch.stack([fx.fd_quadratic(model, x, V[:, k], eps=1e-4) for k in range(3)], dim=1)
    assert rel_err(out, separate) < 1e-9
    assert rel_err(out, explicit_directional_fisher(model, x, V)) < 1e-6


class ReusedWeight(nn.Module):
    """Uses its first Linear's weight outside that module too: the "linear" strategy must notice."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(torch.tanh(nn.functional.linear(h, self.fc.weight)))


@pytest.mark.parametrize("case", ["tied", "seq", "subset", "reused", "float32"])
def test_fd_quadratic_directions_linear_strategy_equals_in_place(case, device):
    """The "linear" strategy (±ε V_k h added to each nn.Linear's output) against moving the parameters:
    a Linear applied twice, a Linear over sequence positions [N, T, I] (Embedding left out by params=),
    only some weights and biases selected, a weight also used outside its module (falls back), and
    float32 parameters with a float64 V."""
    params, dtype = None, torch.float64
    if case == "tied":
        model = make_model("tied", device=device)
    elif case == "seq":
        model, params = make_model("seq", device=device), ["proj.weight", "proj.bias", "head.weight"]
    elif case == "subset":
        model, params = tanh_mlp(device=device), ["fc1.weight", "fc2.bias"]
    elif case == "reused":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            model = ReusedWeight().double().eval().to(device)
    else:
        model, dtype = tanh_mlp(dtype=torch.float32, device=device), torch.float32
    x = make_data(case, n=6, device=device)[0] if case in ("tied", "seq") else randn((6, 5), 30, dtype, device)
    P = sum(p.numel() for _, p in fx._core.params.resolve_params(model, params))
    V = randn((P, 4), 31, device=device)
    with untouched(model):
        linear = fx.fd_quadratic_directions(model, x, V, eps=1e-4, params=params, strategy="linear")
        in_place = fx.fd_quadratic_directions(model, x, V, eps=1e-4, params=params, strategy="in_place")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks left behind"
    assert rel_err(linear, in_place) < (1e-3 if dtype == torch.float32 else 1e-7)
    exact = torch.stack([exact_quad(model, x, V[:, k].to(dtype), params=params) for k in range(4)], dim=1)
    assert rel_err(linear, exact) < (1e-2 if dtype == torch.float32 else 1e-6)


def test_fd_quadratic_directions_linear_strategy_needs_linear_parameters(device):
    model = make_model("cnn", device=device)
    x, _ = make_data("cnn", n=3, device=device)
    with pytest.raises(ValueError, match="argument 'strategy' 'linear' needs"):
        fx.fd_quadratic_directions(model, x, randn((num_params(model), 2), 32, device=device), strategy="linear")
    with pytest.raises(ValueError, match="argument 'strategy' must be one of"):
        fx.fd_quadratic_directions(model, x, randn((num_params(model), 2), 32, device=device), strategy="batched")


@pytest.mark.parametrize("name", ["cnn", "norm"])
def test_fd_quadratic_conv_and_norm_models(name, device):
    """Conv2d + LayerNorm (cnn); Conv1d + GroupNorm + BatchNorm in eval mode (norm)."""
    model = with_grads(make_model(name, device=device))
    x, _ = make_data(name, n=5, device=device)
    P = num_params(model)
    v, V = randn(P, 22, device=device), randn((5, P), 23, device=device)
    with untouched(model):
        shared = fx.fd_quadratic(model, x, v, eps=1e-4)
        per_input = fx.fd_quadratic(model, x, V, eps=1e-4, per_input=True)
        block = fx.fd_quadratic(model, x, v, eps=1e-4, block=True)
        directions = fx.fd_quadratic_directions(model, x, V[:2].T, eps=1e-4)
        stacked = fx.fd_quadratic_directions(model, x, V[:2].T, eps=1e-4, strategy="vmap")
    assert rel_err(stacked, directions) < 1e-9
    assert rel_err(shared, exact_quad(model, x, v)) < 1e-5
    assert rel_err(per_input, torch.cat([exact_quad(model, x[n:n + 1], V[n]) for n in range(5)])) < 1e-5
    exact_blocks = per_tensor_sum(lambda vt, names: exact_quad(model, x, vt, params=names), model, v)
    assert rel_err(block, exact_blocks) < 1e-5
    assert rel_err(directions, torch.stack([exact_quad(model, x, V[k]) for k in range(2)], dim=1)) < 1e-5


def test_fd_quadratic_params_subset(device):
    model = tanh_mlp(device=device)
    x = randn((6, 5), 24, device=device)
    v = randn(7 * 5 + 7, 25, device=device)  # fc1.weight + fc1.bias
    with untouched(model):
        out = fx.fd_quadratic(model, x, v, eps=1e-4, params=[model.fc1])
    assert rel_err(out, exact_quad(model, x, v, params=[model.fc1])) < 1e-6


@pytest.mark.parametrize("scheme", ["central", "forward"])
@pytest.mark.parametrize("fail_at", [1, 2])
def test_fd_quadratic_restores_when_the_forward_raises(scheme, fail_at, device):
    model = FailingForward(with_grads(tanh_mlp(device=device)), fail_at)
    x = randn((4, 5), 26, device=device)
    with untouched(model), pytest.raises(RuntimeError, match="on purpose"):
        fx.fd_quadratic(model, x, randn(num_params(model), 27, device=device), eps=1e-2, scheme=scheme)
    assert model.calls == fail_at


@pytest.mark.parametrize("fail_at", [1, 4])
def test_fd_quadratic_directions_restores_when_the_forward_raises(fail_at, device):
    """The in-place path moves the model's own parameters: a forward that raises at θ + εv_1 (call 1) or
    at θ − εv_2 (call 4) leaves them bit for bit as they were."""
    model = FailingForward(with_grads(tanh_mlp(device=device)), fail_at)
    with untouched(model), pytest.raises(RuntimeError, match="on purpose"):
        fx.fd_quadratic_directions(model, randn((4, 5), 28, device=device),
                                   randn((num_params(model), 3), 29, device=device), strategy="in_place")
    assert model.calls == fail_at


BAD_FD = [
    ("eps", dict(eps=0.0)), ("eps", dict(eps=-1e-3)), ("eps", dict(eps=math.nan)), ("eps", dict(eps=math.inf)),
    ("scheme", dict(scheme="backward")), ("v", dict(v="long")), ("v", dict(v="rows")), ("v", dict(v="3d")),
    ("v", dict(v="nan")),
]


@pytest.mark.parametrize("arg, kwargs", BAD_FD, ids=[f"{a}-{list(k.values())[0]}" for a, k in BAD_FD])
def test_fd_quadratic_bad_input(arg, kwargs, device):
    model = with_grads(make_model("mlp", device=device))
    x, _ = make_data("mlp", n=5, device=device)
    P = num_params(model)
    kwargs = dict(kwargs)
    v = {"long": randn(P + 1, 0), "rows": randn((6, P), 0), "3d": randn((5, P, 1), 0),
         "nan": torch.full((P,), math.nan, dtype=torch.float64)}.get(kwargs.pop("v", None), randn(P, 0)).to(device)
    calls = model.forward_calls
    with untouched(model), pytest.raises(ValueError, match=names_argument(arg)):
        fx.fd_quadratic(model, x, v, **kwargs)
    assert model.forward_calls == calls, "refused only after running the model"


def test_fd_quadratic_refuses_a_2d_v_without_per_input(device):
    """A 2-D v is not read as per-input directions unless asked, also when its rows happen to number N
    (the earlier silent reading of K = N shared directions) or N == P; the message says how to pass each
    case. With per_input=True, v must be exactly [N, P]. Refused before the model runs (any forward raises)."""
    model = FailingForward(make_model("linear1", device=device), fail_at=1)  # nn.Linear(5, 4): P = 24
    P = num_params(model)
    x = randn((P, 5), 40, device=device)  # N == P
    layout = (r"argument 'v' is 2-D, shape \({}, {}\), without per_input=True: one direction is \[24\]; "
              r"K shared directions go as the columns \[24, K\] to fisherext.fd_quadratic_directions; "
              r"one direction per input is the rows \[N, P\] = \[{}, 24\] with per_input=True")
    with untouched(model):
        for n, v in [(P, randn((P, P), 41, device=device)), (6, randn((6, P), 42, device=device)),
                     (6, randn((P, 3), 43, device=device))]:
            with pytest.raises(ValueError, match=layout.format(*v.shape, n)):
                fx.fd_quadratic(model, x[:n], v)
        for v in [randn(P, 44, device=device), randn((5, P), 44, device=device)]:
            with pytest.raises(ValueError, match=rf"argument 'v' per_input=True takes one direction per input as "
                                                 rf"the rows of \[N, P\] = \[6, {P}\], got shape"):
                fx.fd_quadratic(model, x[:6], v, per_input=True)
        with pytest.raises(TypeError, match="argument 'per_input' expected a bool"):
            fx.fd_quadratic(model, x[:6], randn((6, P), 45, device=device), per_input=1)
    assert model.calls == 0


def test_per_input_equals_the_loop_over_inputs_for_n_equal_p(device):
    """N == P: per_input=True reads row n as input n's direction, like one call per input."""
    model = make_model("linear1", device=device)
    P = num_params(model)
    x, V = randn((P, 5), 46, device=device), randn((P, P), 47, device=device)
    batched = fx.fd_quadratic(model, x, V, eps=1e-4, per_input=True)
    loop = torch.cat([fx.fd_quadratic(model, x[n:n + 1], V[n], eps=1e-4) for n in range(P)])
    assert rel_err(batched, loop) < 1e-9
    shared = fx.fd_quadratic_directions(model, x, V, eps=1e-4)  # the same matrix as P shared columns
    assert shared.shape == (P, P)
    assert rel_err(torch.diagonal(shared), torch.cat([fx.fd_quadratic(model, x[n:n + 1], V[:, n], eps=1e-4)
                                                      for n in range(P)])) < 1e-9


@pytest.mark.parametrize("case", ["1d", "width", "rows", "int", "nan", "eps"])
def test_fd_quadratic_directions_bad_input(case, device):
    model = make_model("mlp", device=device)
    x, _ = make_data("mlp", n=5, device=device)
    P = num_params(model)
    V = {"1d": randn(P, 0), "width": randn((P - 1, 2), 0), "rows": randn((2, P), 0),
         "int": torch.ones(P, 2, dtype=torch.long),
         "nan": torch.full((P, 2), math.nan, dtype=torch.float64)}.get(case, randn((P, 2), 0)).to(device)
    with untouched(model), pytest.raises(ValueError, match=names_argument("eps" if case == "eps" else "V")):
        fx.fd_quadratic_directions(model, x, V, eps=0.0 if case == "eps" else 1e-3)
    assert model.forward_calls == 0


def test_fd_quadratic_directions_names_the_column_layout(device):
    """Directions as rows [K, P] (the earlier layout) or one direction [P]: the error names [P, K]."""
    model = make_model("mlp", device=device)
    x, _ = make_data("mlp", n=5, device=device)
    P = num_params(model)
    expected = rf"argument 'V' expected the K directions as the columns of a floating-point tensor \[{P}, K\]"
    with pytest.raises(ValueError, match=expected + rf".*\(2, {P}\) \(directions as rows \[K, {P}\] are the "
                                         r"earlier layout: pass V.T\)"):
        fx.fd_quadratic_directions(model, x, randn((2, P), 0, device=device))
    with pytest.raises(ValueError, match=expected + r".*one direction goes to fisherext.fd_quadratic"):
        fx.fd_quadratic_directions(model, x, randn(P, 0, device=device))


# ---------------------------------------------------------------------------------------------------
# input_sensitivity and predicted_class_directions


def fis_reference(model, x, V):
    """FIS_i = Σ_c ∂x_i(d p_c/dε) ∂x_i(d log p_c/dε) by explicit loops over inputs and classes: each
    directional derivative d/dε = vᵀ∇θ by autograd (create_graph), then differentiated again in x."""
    params = [p for _, p in named_trainable(model)]
    out = []
    for n in range(x.shape[0]):
        xn = x[n:n + 1].detach().clone().requires_grad_(True)
        vs = unflatten(V[n] if V.dim() == 2 else V, params)
        log_p = torch.log_softmax(model(xn), -1)[0]
        total = torch.zeros_like(xn[0])
        for c in range(log_p.numel()):
            rates = []
            for scalar in (log_p[c].exp(), log_p[c]):
                grads = torch.autograd.grad(scalar, params, create_graph=True)
                rate = sum((g * t).sum() for g, t in zip(grads, vs))  # d/dε at ε = 0, a function of x
                rates.append(torch.autograd.grad(rate, xn, retain_graph=True)[0][0])
            total = total + rates[0] * rates[1]
        out.append(total)
    return torch.stack(out).detach()


def predicted_class_reference(model, x):
    """Per input: ∇θ log p(ŷ|x) / ‖·‖ with ŷ the argmax, by a plain autograd loop."""
    params = [p for _, p in named_trainable(model)]
    rows = []
    for n in range(x.shape[0]):
        log_p = torch.log_softmax(model(x[n:n + 1]), -1)[0]
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(log_p[log_p.argmax()], params)])
        rows.append(g / g.norm())
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["tanh_mlp", "cnn"])
@pytest.mark.parametrize("directions", ["shared", "per_input"])
def test_input_sensitivity_exact_matches_the_autograd_loop(name, directions, device):
    model = with_grads(tanh_mlp(device=device) if name == "tanh_mlp" else make_model("cnn", device=device))
    x = randn((4, 5), 28, device=device) if name == "tanh_mlp" else make_data("cnn", n=4, device=device)[0]
    P = num_params(model)
    per_input = directions == "per_input"
    V = randn((4, P), 29, device=device) if per_input else randn(P, 29, device=device)
    with untouched(model):
        out = fx.input_sensitivity(model, x, V, per_input=per_input)
    assert out.shape == x.shape
    expected = fis_reference(model, x, V)
    assert_close(out, expected)
    assert expected.abs().max() > 0


@pytest.mark.parametrize("name", ["tanh_mlp", "cnn"])
def test_input_sensitivity_fd_matches_exact(name, device):
    model = tanh_mlp(device=device) if name == "tanh_mlp" else make_model("cnn", device=device)
    x = randn((4, 5), 30, device=device) if name == "tanh_mlp" else make_data("cnn", n=4, device=device)[0]
    V = randn((4, num_params(model)), 31, device=device)
    exact = fx.input_sensitivity(model, x, V, method="exact", per_input=True)
    with untouched(model):
        fd = [fx.input_sensitivity(model, x, V, method="fd", eps=eps, per_input=True) for eps in (1e-3, 5e-4)]
    errs = [rel_err(f, exact) for f in fd]
    assert errs[0] < 1e-4, f"FD error {errs[0]:.2e} at eps=1e-3"
    if name == "tanh_mlp":  # smooth: the error is O(eps²)
        assert 3.0 < errs[0] / errs[1] < 5.0


def test_default_direction_is_the_normalized_predicted_class_gradient(device):
    model = with_grads(make_model("cnn", device=device))
    x, _ = make_data("cnn", n=5, device=device)
    with untouched(model):
        V = fx.perturb.predicted_class_directions(model, x)
        default = fx.input_sensitivity(model, x)
    assert V.shape == (5, num_params(model))
    assert_close(V, predicted_class_reference(model, x))
    assert_close(V.norm(dim=1), torch.ones(5, dtype=torch.float64))
    assert_close(default, fx.input_sensitivity(model, x, V, per_input=True))
    assert default.shape == (5, 2, 6, 6)


def test_input_sensitivity_bad_input(device):
    model = make_model("cnn", device=device)
    x, _ = make_data("cnn", n=3, device=device)
    with untouched(model):
        with pytest.raises(ValueError, match=names_argument("method")):
            fx.input_sensitivity(model, x, method="backprop")
        with pytest.raises(ValueError, match=names_argument("v")):
            fx.input_sensitivity(model, x, randn(num_params(model) + 1, 0, device=device))
        with pytest.raises(TypeError, match=names_argument("x")):
            fx.input_sensitivity(model, x.long())
        with pytest.raises(ValueError, match=names_argument("eps")):
            fx.input_sensitivity(model, x, method="fd", eps=-1.0)
        P = num_params(model)
        with pytest.raises(ValueError, match=r"argument 'v' is 2-D, shape \(3, \d+\), without per_input=True: "
                                             r"one direction is \[\d+\]; K shared directions take one call each; "
                                             r"one direction per input is the rows \[N, P\] = \[3, \d+\] with "
                                             r"per_input=True"):
            fx.input_sensitivity(model, x, randn((3, P), 0, device=device))
        with pytest.raises(ValueError, match=r"argument 'v' per_input=True takes one direction per input"):
            fx.input_sensitivity(model, x, randn(P, 0, device=device), per_input=True)


def test_fd_quadratic_rejects_non_tensor_inputs_and_misplaced_v(device):
    model = make_model("mlp", device=device)
    P = num_params(model)
    with untouched(model):
        with pytest.raises(TypeError, match="argument 'data' inputs x must be a tensor"):
            fx.fd_quadratic(model, [[0.0] * 5], randn(P, 31, device=device))
        with pytest.raises(ValueError, match="argument 'v' is on meta"):
            fx.fd_quadratic(model, make_data("mlp", n=3, device=device)[0], randn(P, 31).to("meta"))


# ---------------------------------------------------------------------------------------------------
# fd_quadratic_directions, "linear" strategy: the batch axis of each Linear input is established


class SequenceFirst(nn.Module):
    """x [N, T·4] viewed as [N, T, 4], transposed to sequence-first [T, N, 4]: fc sees the batch on axis 1."""

    def __init__(self, T):
        super().__init__()
        self.T = T
        self.fc, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = x.view(x.shape[0], self.T, 4).transpose(0, 1)
        return self.head(torch.tanh(self.fc(h)).mean(0))


class BroadcastBuffer(nn.Module):
    """pos_fc applies to a buffer [T, 4] (no batch axis) whose result is broadcast over the batch."""

    def __init__(self, T):
        super().__init__()
        self.register_buffer("pos", torch.randn(T, 4))
        self.inp, self.pos_fc, self.head = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.inp(x.view(x.shape[0], -1, 4)) + self.pos_fc(self.pos)
        return self.head(torch.tanh(h).mean(1))


def explicit_directional_fisher(model, x, V):
    """[N, K]: v_kᵀ F_n v_k = (J_n v_k)ᵀ (diag p_n − p_n p_nᵀ) (J_n v_k) for the columns v_k of V [P, K],
    J by a backward per output."""
    from support.explicit import explicit_jacobian

    J = explicit_jacobian(model, x).view(x.shape[0], -1, V.shape[0])
    p = torch.softmax(model(x), -1).detach()[:, :, None]
    JV = torch.einsum("ncp,pk->nck", J, V)
    return (p * JV ** 2).sum(1) - ((p * JV).sum(1)) ** 2


@pytest.mark.parametrize("T", [3, 8], ids=["T=3", "T=2KN"])
@pytest.mark.parametrize("build", [SequenceFirst, BroadcastBuffer], ids=["sequence_first", "broadcast_buffer"])
def test_linear_strategy_establishes_the_batch_axis_or_falls_back(build, T, monkeypatch):
    # CPU only: it counts calls of a CPU path by monkeypatching, and "auto" chooses by device
    """With K = 2 directions and N = 2 inputs the replicated batch has 2KN = 8 rows. A sequence-first
    Linear input [T, 8, 4] has its batch on axis 1 (used); with T = 8 two axes qualify (ambiguous: in
    place). A Linear applied to a buffer has no batch axis at all, whatever T (in place). Either way the
    numbers are the exact ones (the dim-0 assumption was 42-85 % off on such models)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = build(T).double().eval()
    x = randn((2, T * 4), 40)
    V = randn((num_params(model), 2), 41)
    in_place_calls = []
    real = fx.perturb.finite_differences._in_place_logits
    monkeypatch.setattr(fx.perturb.finite_differences, "_in_place_logits", lambda *a: in_place_calls.append(1) or real(*a))
    with untouched(model):
        linear = fx.fd_quadratic_directions(model, x, V, eps=1e-4, strategy="linear")
        auto = fx.fd_quadratic_directions(model, x, V, eps=1e-4)  # CPU, 2 inputs: "linear" where it can
    monkeypatch.undo()
    in_place = fx.fd_quadratic_directions(model, x, V, eps=1e-4, strategy="in_place")
    used = build is SequenceFirst and T == 3
    assert len(in_place_calls) == (0 if used else 2), "the linear strategy was used or refused wrongly"
    if used:
        assert rel_err(linear, in_place) < 1e-7
    else:
        assert torch.equal(linear, in_place) and torch.equal(auto, in_place)
    assert torch.equal(auto, linear)
    assert rel_err(linear, explicit_directional_fisher(model, x, V)) < 1e-6
