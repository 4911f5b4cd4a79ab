"""compile= of fisherext.hvp and the curvature operators: the products compiled by torch.compile
(fisherext/curvature/compiled.py) equal the eager ones to rounding (float64 and float32, an MLP and a
CNN), reuse their graphs across products, leave the model untouched, and refuse what they cannot do
with errors naming ``compile``."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherext
from support import assert_close
from fisherext import FisherOperator, GGNOperator, HessianOperator

pytestmark = pytest.mark.slow  # each new graph takes seconds to compile


@pytest.fixture(autouse=True)
def fresh_graphs():
    """Every test compiles its own graphs: none left over from another test, counted from zero."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))


def cnn():
    """The benchmark's CNN in miniature: conv (padding 1), GroupNorm, ReLU, conv (stride 2), ReLU,
    adaptive pooling, Linear."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, 4))


MODELS = {"mlp": (mlp, (5,)), "cnn": (cnn, (3, 6, 6))}


def problem(name, dtype, device="cpu", n=8):
    """A seeded model (eval mode) and data (x, labels of 4 classes), drawn on the CPU, then on `device`."""
    make, shape = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make().to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    return model.to(device), (x.to(device), y.to(device))


def columns(model, K=3, seed=2):
    P = sum(p.numel() for p in model.parameters())
    p = next(model.parameters())
    return torch.randn(P, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(p.device, p.dtype)


def snapshot(model):
    return [(n, p, p.detach().clone()) for n, p in model.named_parameters()]


def assert_untouched(model, before):
    """The same parameter objects with the same values and no .grad, and the model not wrapped."""
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _, _ in before]
    for (_, p, value), (_, q) in zip(before, after):
        assert q is p and torch.equal(q.detach(), value) and q.grad is None
    assert "forward" not in vars(model) and getattr(model, "_compiled_call_impl", None) is None
    assert not model.training


def graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_products_equal_eager_and_reuse_their_graphs(name, dtype, device):
    """hvp (Hessian, GGN) and the three operators, compile=True against eager on K = 3 columns: equal to
    the dtype's rounding; a second product of an operator, and an hvp call after the operator's first
    product on the same model and shapes, compile nothing new; the model is left as it was."""
    model, data = problem(name, dtype, device)
    before = snapshot(model)
    V = columns(model)
    for curvature, operator in (("hessian", HessianOperator), ("ggn", GGNOperator)):
        eager = fisherext.hvp(model, F.cross_entropy, data, V, curvature=curvature)
        assert_close(fisherext.hvp(model, F.cross_entropy, data, V, curvature=curvature, compile=True), eager)
        compiled = graphs()
        A = operator(model, F.cross_entropy, data, batch_size=4, compile=True)
        assert_close(A @ V, operator(model, F.cross_entropy, data, batch_size=4) @ V)
        assert graphs() == compiled + 1  # one batch shape of 4 samples
        assert_close(A @ V, operator(model, F.cross_entropy, data, batch_size=4) @ V)
        fisherext.hvp(model, F.cross_entropy, data, V, curvature=curvature, compile=True)
        assert graphs() == compiled + 1
    A = FisherOperator(model, "cross_entropy", data, batch_size=4, compile=True)
    assert_close(A @ V, FisherOperator(model, "cross_entropy", data, batch_size=4) @ V)
    assert_untouched(model, before)


def test_fisher_kinds_single_vectors_and_a_ragged_last_batch():
    """Every Fisher kind (the MC labels from the same replayed generator; the true Fisher with labels and
    without, which take different paths), one vector (mv) and several,
    7 samples in batches of 3 (the last of 1: its own static graph); more vectors than one block
    (VECTORS_PER_PASS) reuse the block's graph for the full blocks."""
    model, data = problem("mlp", torch.float64, n=7)
    V = columns(model, K=5)
    for kind, labelled in (("true", True), ("true", False), ("empirical", True), ("mc", True)):
        make = lambda compile: FisherOperator(model, "cross_entropy", data if labelled else (data[0], None), kind=kind,
                                              batch_size=3, compile=compile, generator=torch.Generator().manual_seed(4))
        A, B = make(True), make(False)
        assert_close(A @ V, B @ V)
        assert_close(A @ V[:, 0], B @ V[:, 0])
    start = graphs()
    H = HessianOperator(model, "cross_entropy", data, batch_size=3, compile=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fisherext.curvature.compiled, "VECTORS_PER_PASS", 2)
        assert_close(H @ V, HessianOperator(model, "cross_entropy", data, batch_size=3) @ V)
    assert graphs() == start + 4  # (3 or 1 samples) x (2 or 1 vectors)


class _PerPosition(nn.Module):
    """x [N, T, 5] -> outputs [N, T, 4] (Linear - tanh - Linear at every position)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
def test_true_fisher_of_every_likelihood_with_positions(loss):
    """The compiled true Fisher is the GGN of the likelihood's mean loss rescaled by the positions that count
    (cross-entropy over [N, T, C] with ignored labels) or by the entries (mse: E/2, bce: E): equal to the
    eager product, which applies the likelihood's own Λ."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = _PerPosition().double().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, 4, (6, 3), generator=g)
        y[0, 1] = y[3, 2] = -100  # ignored positions
    else:
        y = torch.rand(6, 3, 4, generator=g, dtype=torch.float64)
    V = columns(model)
    make = lambda compile: FisherOperator(model, loss, (x, y), batch_size=3, compile=compile)
    assert_close(make(True) @ V, make(False) @ V)


def test_torch_compile_arguments_pass_through():
    """A dict updates the defaults: backend="aot_eager" traces the same product and skips code generation."""
    model, data = problem("mlp", torch.float64)
    V = columns(model)
    got = fisherext.hvp(model, "cross_entropy", data, V, compile={"backend": "aot_eager"})
    assert_close(got, fisherext.hvp(model, "cross_entropy", data, V))


class _DataDependent(nn.Module):
    """A forward that branches on the values of its input: torch.compile cannot trace it into one graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        out = self.fc(x)
        return out if float(out.sum()) > 0 else -out


def test_an_untraceable_model_is_refused_naming_compile():
    _, data = problem("mlp", torch.float64)
    model = _DataDependent().double().eval()
    before = snapshot(model)
    V = columns(model)
    with pytest.raises(ValueError, match=r"fisherext.hvp: argument 'compile' torch.compile could not compile the "
                                         r"curvature product .*pass compile=False"):
        fisherext.hvp(model, "cross_entropy", data, V, compile=True)
    with pytest.raises(ValueError, match=r"argument 'compile' torch.compile could not compile"):
        GGNOperator(model, "cross_entropy", data, compile=True) @ V
    assert_untouched(model, before)
    fisherext.hvp(model, "cross_entropy", data, V)  # eagerly the model runs


def test_torch_compile_unavailable(monkeypatch):
    """torch.compile raising at construction (as it does on a Python it does not support) is a ValueError
    naming compile, before any product."""

    @functools.wraps(torch.compile)
    def unavailable(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on Python 3.99+")

    monkeypatch.setattr(torch, "compile", unavailable)
    model, data = problem("mlp", torch.float64)
    for call in (lambda: fisherext.hvp(model, "cross_entropy", data, columns(model), compile=True),
                 lambda: HessianOperator(model, "cross_entropy", data, compile=True),
                 lambda: FisherOperator(model, "cross_entropy", data, compile={"mode": "reduce-overhead"})):
        with pytest.raises(ValueError, match=r"argument 'compile' torch.compile is unavailable or refused .*"
                                             r"not supported on Python 3.99"):
            call()


@pytest.mark.parametrize("compile,exc,msg", [
    ("yes", TypeError, "argument 'compile' expected a bool or a dict of torch.compile keyword arguments, got str"),
    ({"fullgrap": True}, ValueError, "argument 'compile' torch.compile has no keyword argument 'fullgrap'"),
    ({"mode": "max-autotune", "options": {"max_autotune": True}}, ValueError,
     "argument 'compile' torch.compile is unavailable or refused"),
])
def test_bad_compile_values(compile, exc, msg):
    model, data = problem("mlp", torch.float64)
    for call in (lambda: fisherext.hvp(model, "cross_entropy", data, columns(model), compile=compile),
                 lambda: GGNOperator(model, "cross_entropy", data, compile=compile)):
        with pytest.raises(exc, match=msg):
            call()


def test_compile_with_finite_differences_is_refused():
    model, data = problem("mlp", torch.float64)
    with pytest.raises(ValueError, match="argument 'compile' compiles the autograd products; method='fd'"):
        fisherext.hvp(model, "cross_entropy", data, columns(model), method="fd", compile=True)
