"""torch.compile and fisherext (issue 15, part 3).

1. Every op of ``fisherext.ops`` called from a function compiled with ``torch.compile(fullgraph=True)``:
   one graph holding the op (a graph break raises), the eager result (float64 and float32), and for the
   in-place ops their writes visible in the caller's tensors afterwards. Backend "aot_eager" for every op,
   "inductor" for ops of each family, and a compiled CG loop against CG written in plain torch.
2. A model compiled by ``torch.compile(model)``: every entry point taking a model gives the same result on
   the compiled model as on the model (float64; an MLP, a CNN, shared and in-place zoo models), accepts
   parameter names of the original module, never lets dynamo trace the compiled forward, and leaves the
   compiled model as it was. ``compile=`` of the curvature products on a compiled model compiles its own
   graph of the original module. EWC on a compiled model equals EWC on the model. A model compiled in
   place (``model.compile()``) runs its eager call in every entry point, with the same results.
"""
import pytest
import torch
from torch import nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import fisherext as fx
import fisherext.reference as ref
from fisherext import ops
from fisherext._core.conventions import original_forward
from fisherext._core.params import original_module, resolve_params
from support import assert_close
from support.models import make_data, make_model
from support.zoo import zoo_data, zoo_model


# ---------------------------------------------------------------------------------------------------
# 1. The ops inside torch.compile(fullgraph=True)

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def spd(n, dtype, seed):
    """A symmetric positive definite n x n matrix with eigenvalues in [1, 2]."""
    q, _ = torch.linalg.qr(randn(n, n, dtype=torch.float64, seed=seed))
    return ((q * torch.linspace(1.0, 2.0, n, dtype=torch.float64)) @ q.T).to(dtype)


N, T, I, O, C, P = 6, 3, 4, 5, 3, 10


# name -> (a function calling the op through its wrapper, args factory(dtype), indices of the arguments it
# writes). Shapes are shared by the families; positive per-sample weights, steps and scales.
OPS = {
    "linear_sq_grad": (
        lambda a, delta, w: ops.linear_sq_grad(a, delta, w),
        lambda dt: (randn(N, T, I, dtype=dt, seed=1), randn(N, T, O, dtype=dt, seed=2),
                    randn(N, dtype=dt, seed=3).abs()), ()),
    "linear_outer_accum_": (
        lambda out, a, delta, w: ops.linear_outer_accum_(out, a, delta, w, alpha=0.5),
        lambda dt: (spd(O * I, dt, 4), randn(N, T, I, dtype=dt, seed=1), randn(N, T, O, dtype=dt, seed=2),
                    randn(N, dtype=dt, seed=3).abs()), (0,)),
    "sym_outer_accum_": (
        lambda out, x, w: ops.sym_outer_accum_(out, x, w, alpha=0.5, beta=2.0),
        lambda dt: (spd(I, dt, 4), randn(N, T, I, dtype=dt, seed=1), randn(N, dtype=dt, seed=3).abs()), (0,)),
    "kfac_factor_update_": (
        lambda factor, x: ops.kfac_factor_update_(factor, x, decay=0.9),
        lambda dt: (spd(I, dt, 4), randn(N, T, I, dtype=dt, seed=1)), (0,)),
    "class_gram": (
        lambda a, delta: ops.class_gram(a, delta),
        lambda dt: (randn(N, T, I, dtype=dt, seed=1), randn(N, C, T, O, dtype=dt, seed=5)), ()),
    "unflatten_axpy_": (
        lambda out0, out1, x, v: ops.unflatten_axpy_([out0, out1], x, v, 0.25),
        lambda dt: (randn(2, 3, dtype=dt, seed=6), randn(4, dtype=dt, seed=7), randn(P, dtype=dt, seed=8),
                    randn(P, dtype=dt, seed=9)), (0, 1)),
    "fd_fisher_reduce": (
        lambda plus, minus, zero: ops.fd_fisher_reduce(plus, minus, zero, 1e-3),
        lambda dt: (randn(N, C, dtype=dt, seed=10), randn(N, C, dtype=dt, seed=11), randn(N, C, dtype=dt, seed=12)),
        ()),
    "softmax_hvp": (
        lambda z, u: ops.softmax_hvp(z, u),
        lambda dt: (randn(N, C, dtype=dt, seed=10), randn(2, N, C, dtype=dt, seed=11)), ()),
    "softmax_hessian_sqrt": (
        lambda z: ops.softmax_hessian_sqrt(z),
        lambda dt: (randn(N, C, dtype=dt, seed=10),), ()),
    "cg_update_": (
        lambda x, r, p, Ap, alpha, d: ops.cg_update_(x, r, p, Ap, alpha, d),
        lambda dt: (randn(P, dtype=dt, seed=13), randn(P, dtype=dt, seed=14), randn(P, dtype=dt, seed=15),
                    randn(P, dtype=dt, seed=16), torch.tensor(0.3, dtype=dt), randn(P, dtype=dt, seed=17).abs()),
        (0, 1)),
    "cg_direction_": (
        lambda p, r, beta: ops.cg_direction_(p, r, beta),
        lambda dt: (randn(P, 2, dtype=dt, seed=15), randn(P, 2, dtype=dt, seed=14), torch.tensor([0.3, 0.7], dtype=dt)),
        (0,)),
    "lissa_update_": (
        lambda h, v, Hh: ops.lissa_update_(h, v, Hh, 0.1, 2.0),
        lambda dt: (randn(P, dtype=dt, seed=13), randn(P, dtype=dt, seed=14), randn(P, dtype=dt, seed=15)), (0,)),
    "neumann_update_": (
        lambda term, acc, Aterm: ops.neumann_update_(term, acc, Aterm, 2.0),
        lambda dt: (randn(P, dtype=dt, seed=13), randn(P, dtype=dt, seed=14), randn(P, dtype=dt, seed=15)), (0, 1)),
}

# the op each wrapper calls (kfac_factor_update_ is a composition of sym_outer_accum_)
CALLS = {"kfac_factor_update_": "sym_outer_accum_"}

# One op of each family, an in-place one where the family has any (inductor's first compile on a cold cache
# takes seconds; glue code around the op, such as the CG loop's dot products, tens of seconds).
# The in-place linear-family ops compile with inductor because their Autograd kernel passes arguments that
# do not require grad to the kernel as they are (csrc/autograd.cpp): detached copies would add alias nodes,
# and inductor traces an in-place custom op's replacement twice and requires the same nodes both times.
INDUCTOR = ["linear_sq_grad", "unflatten_axpy_", "softmax_hvp", "lissa_update_", "linear_outer_accum_",
            "sym_outer_accum_"]


@pytest.fixture
def fresh_dynamo():
    """Each compile test traces its own graph (none cached by an earlier test, dtype or backend)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graphs_with(counter, op_name):
    """The captured graphs that do work, and how many of them call torch.ops.fisherext.<op_name>."""
    packet = getattr(torch.ops.fisherext, op_name)
    working = [g for g in counter.graphs if any(n.op == "call_function" for n in g.graph.nodes)]
    calling = [g for g in working if any(n.target in (packet, packet.default) for n in g.graph.nodes)]
    return len(working), len(calling)


def tensors_of(out):
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def check_compiled_op(name, backend, dtype):
    fn, make, written = OPS[name]
    args = make(dtype)
    eager_args, compiled_args = [a.clone() for a in args], [a.clone() for a in args]
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True)  # a graph break raises
    expected = fn(*eager_args)
    got = compiled(*compiled_args)
    assert graphs_with(counter, CALLS.get(name, name)) == (1, 1), "one graph, and the op in it"
    for g, e in zip(tensors_of(got), tensors_of(expected), strict=True):
        assert_close(g, e, dtype)
    for i, (before, e, g) in enumerate(zip(args, eager_args, compiled_args)):
        if i in written:  # the compiled call wrote into the caller's tensor, as the eager call did
            assert not torch.equal(e, before), f"test set-up: argument {i} is written by the eager call"
            assert_close(g, e, dtype)
        else:
            assert torch.equal(g, before), f"argument {i} is read only"
    return counter, compiled, compiled_args


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(OPS))
def test_every_op_compiles_into_one_graph_with_aot_eager(name, dtype, fresh_dynamo):
    """aot_eager runs the fake kernel and functionalizes the in-place ops: one graph, the eager values, the
    writes visible in the caller's tensors, and a second call with new values reuses the graph."""
    counter, compiled, _ = check_compiled_op(name, "aot_eager", dtype)
    fn, make, written = OPS[name]
    args = [a * 1.5 for a in make(dtype)]  # the same shapes, other values
    eager_args = [a.clone() for a in args]
    for g, e in zip(tensors_of(compiled(*args)), tensors_of(fn(*eager_args)), strict=True):
        assert_close(g, e, dtype)
    for i in written:
        assert_close(args[i], eager_args[i], dtype)
    assert graphs_with(counter, CALLS.get(name, name)) == (1, 1), "no recompilation for new values"


@pytest.mark.parametrize("name", INDUCTOR)
def test_ops_of_every_family_compile_with_inductor(name, fresh_dynamo):
    """Inductor generates code around the op (the op itself runs its own kernel), float64."""
    check_compiled_op(name, "inductor", torch.float64)


def cg_plain(A, b, steps):
    """Conjugate gradients in plain torch: (x, r, p) after `steps` iterations from x = 0."""
    x, r = torch.zeros_like(b), b.clone()
    p, rz = r.clone(), r @ r
    for _ in range(steps):
        Ap = A @ p
        alpha = rz / (p @ Ap)
        x, r = x + alpha * p, r - alpha * Ap
        rz_new = r @ r
        p, rz = r + (rz_new / rz) * p, rz_new
    return x, r, p


def cg_fused(A, b):
    """Three CG iterations by the fused updates, each reading what the one before wrote."""
    x, r = torch.zeros_like(b), b.clone()
    p, rz = r.clone(), r @ r
    for _ in range(3):
        Ap = A @ p
        rz_new, _ = ops.cg_update_(x, r, p, Ap, rz / (p @ Ap))
        ops.cg_direction_(p, r, rz_new / rz)
        rz = rz_new
    return x, r, p


def test_a_compiled_cg_loop_orders_the_in_place_updates(fresh_dynamo):
    """A solver loop of in-place ops and matvecs, compiled into one graph, equals CG in plain torch: every
    update reads the previous one's writes (the functionalized graph keeps their order)."""
    A, b = spd(P, torch.float64, 20), randn(P, dtype=torch.float64, seed=21)
    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(cg_fused, backend=counter, fullgraph=True)(A, b)
    assert graphs_with(counter, "cg_update_") == (1, 1) and graphs_with(counter, "cg_direction_") == (1, 1)
    for g, e in zip(got, cg_plain(A, b, 3), strict=True):
        assert_close(g, e)


def test_compiled_ops_equal_the_reference_twins(fresh_dynamo):
    """The compiled op is the op: float32 softmax products compiled with aot_eager against fisherext.reference."""
    z, u = randn(N, C, dtype=torch.float32, seed=10), randn(2, N, C, dtype=torch.float32, seed=11)
    hvp, root = torch.compile(lambda z, u: (ops.softmax_hvp(z, u), ops.softmax_hessian_sqrt(z)),
                              backend="aot_eager", fullgraph=True)(z, u)
    assert_close(hvp, ref.softmax_hvp(z.double(), u.double()), torch.float32)
    assert_close(root, ref.softmax_hessian_sqrt(z.double()), torch.float32)


# ---------------------------------------------------------------------------------------------------
# 2. Models compiled by torch.compile(model)

def mlp():
    return make_model("mlp"), make_data("mlp", n=9)


def cnn():
    return make_model("cnn"), make_data("cnn", n=7)


def shared():
    return zoo_model("shared_parameter"), zoo_data("shared_parameter")


def inplace():
    return zoo_model("inplace_mlp"), zoo_data("inplace_mlp")


# name -> (model and data factory, a weight named as in the original module)
MODELS = {"mlp": (mlp, "fc2.weight"), "cnn": (cnn, "fc.weight"), "shared_parameter": (shared, "a.weight"),
          "inplace_mlp": (inplace, "fc2.weight")}


def directions(model, K=2, seed=3):
    Pm = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return randn(Pm, K, dtype=torch.float64, seed=seed)


CE = "cross_entropy"

# name -> entry(model, x, y, V) for every entry point that takes a model
ENTRIES = {
    "fisher-diag": lambda m, x, y, V: fx.fisher(m, (x, y)).diag(),
    "fisher-kfac": lambda m, x, y, V: fx.fisher(m, (x, y), structure="kfac").dense(),
    "fisher-full": lambda m, x, y, V: fx.fisher(m, (x, y), structure="full").dense(),
    "fisher-block": lambda m, x, y, V: fx.fisher(m, (x, y), structure="block").mv(V[:, 0]),
    "per_sample_fisher-trace": lambda m, x, y, V: fx.per_sample_fisher(m, x, y),
    "per_sample_fisher-quad": lambda m, x, y, V: fx.per_sample_fisher(m, x, y, quantity="quad", v=V),
    "per_sample_fisher-predicted": lambda m, x, y, V: fx.per_sample_fisher(m, x, quantity="quad", v="predicted"),
    "hvp-hessian": lambda m, x, y, V: fx.hvp(m, CE, (x, y), V),
    "hvp-ggn": lambda m, x, y, V: fx.hvp(m, CE, (x, y), V, curvature="ggn"),
    "hvp-fd": lambda m, x, y, V: fx.hvp(m, CE, (x, y), V[:, 0], method="fd"),
    "HessianOperator": lambda m, x, y, V: fx.HessianOperator(m, CE, (x, y), batch_size=4) @ V,
    "GGNOperator": lambda m, x, y, V: fx.GGNOperator(m, CE, (x, y)) @ V,
    "FisherOperator": lambda m, x, y, V: fx.FisherOperator(m, CE, (x, y), kind="empirical") @ V,
    "fd_quadratic": lambda m, x, y, V: fx.fd_quadratic(m, x, V[:, 0]),
    "fd_quadratic_directions": lambda m, x, y, V: fx.fd_quadratic_directions(m, x, V),
    "fd_quadratic_directions-vmap": lambda m, x, y, V: fx.fd_quadratic_directions(m, x, V, strategy="vmap"),
    "input_sensitivity": lambda m, x, y, V: fx.input_sensitivity(m, x),
    "input_sensitivity-fd": lambda m, x, y, V: fx.input_sensitivity(m, x, V[:, 0], method="fd"),
    "InfluenceFunctions-cg": lambda m, x, y, V: fx.InfluenceFunctions(
        m, CE, (x, y), damping=10.0, solver="cg").influence((x[:3], y[:3])),
    "InfluenceFunctions-ggn-exact": lambda m, x, y, V: fx.InfluenceFunctions(  # the head's tensors as params
        m, CE, (x, y), damping=0.5, curvature="ggn", params=list(m.parameters())[-2:]).influence((x[:3], y[:3])),
}


def traced_frames():
    return counters["frames"]["total"]


def compiled_pair(name):
    """(model, torch.compile(model), x, y) for the model `name` (float64, eval mode)."""
    model, (x, y) = MODELS[name][0]()
    compiled = torch.compile(model)  # lazy: nothing is traced before its first call
    return model, compiled, x, y


def assert_wrapper_untouched(model, compiled, forward):
    """The compiled model still wraps `model` with its compiled forward, and `model` carries no forward
    or hook of its own."""
    assert compiled._orig_mod is model and vars(compiled)["forward"] is forward
    assert "forward" not in vars(model) and not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_entry_point_on_a_compiled_model_equals_the_model(model_name, entry):
    """fisher (every structure), per_sample_fisher, hvp, the operators, the finite differences, input
    sensitivity and influence: the compiled model's result is the model's; dynamo never traces the
    compiled forward (it runs the original module eagerly), and the compiled model is left as it was."""
    model, compiled, x, y = compiled_pair(model_name)
    V = directions(model)
    forward = vars(compiled)["forward"]
    call = ENTRIES[entry]
    with torch.random.fork_rng(devices=[]):
        expected = call(model, x, y, V)
    counters.clear()
    with torch.random.fork_rng(devices=[]):
        got = call(compiled, x, y, V)
    assert traced_frames() == 0, "dynamo traced the compiled model's forward"
    assert_close(got, expected)
    assert_wrapper_untouched(model, compiled, forward)


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_every_entry_point_on_a_model_compiled_in_place_equals_the_model(model_name, entry):
    """``model.compile()`` compiles the module's own __call__ (no wrapper, the same names): every entry point
    runs its eager call instead, with the uncompiled model's result, never traced, and puts the compiled
    call back."""
    model, (x, y) = MODELS[model_name][0]()
    twin, _ = MODELS[model_name][0]()
    V = directions(model)
    model.compile()
    compiled_call = model._compiled_call_impl
    with torch.random.fork_rng(devices=[]):
        expected = ENTRIES[entry](twin, x, y, V)
    counters.clear()
    with torch.random.fork_rng(devices=[]):
        got = ENTRIES[entry](model, x, y, V)
    assert traced_frames() == 0, "dynamo traced the model's compiled call"
    assert_close(got, expected)
    assert model._compiled_call_impl is compiled_call


@pytest.mark.parametrize("model_name", list(MODELS))
def test_params_of_a_compiled_model_by_name_module_or_tensor(model_name):
    """params= on the compiled model: the original module's name ("fc.weight"), the wrapper's own name
    ("_orig_mod.fc.weight"), the submodule and the tensor all select the same parameter as the original's
    name on the model; the resolved names are the original's."""
    model, compiled, x, y = compiled_pair(model_name)
    name = MODELS[model_name][1]
    owner, attr = name.rsplit(".", 1)
    submodule = model.get_submodule(owner)
    V = directions(model)
    expected = fx.fisher(model, (x, y), params=[name]).diag()
    counters.clear()
    for params in ([name], ["_orig_mod." + name], [getattr(submodule, attr)]):
        assert [n for n, _ in resolve_params(compiled, params)] == [name]
        assert_close(fx.fisher(compiled, (x, y), params=params).diag(), expected)
    assert_close(fx.fisher(compiled, (x, y), params=[submodule]).diag(),
                 fx.fisher(model, (x, y), params=[submodule]).diag())
    W = V[:getattr(submodule, attr).numel(), 0]
    assert_close(fx.hvp(compiled, CE, (x, y), W, params=[name]), fx.hvp(model, CE, (x, y), W, params=[name]))
    assert_close(fx.fd_quadratic(compiled, x, W, params=["_orig_mod." + name]),
                 fx.fd_quadratic(model, x, W, params=[name]))
    assert [n for n, _ in resolve_params(compiled)] == [n for n, _ in model.named_parameters()]
    assert traced_frames() == 0


def test_original_module_and_the_compiled_names():
    model, compiled, _, _ = compiled_pair("mlp")
    assert original_module(compiled) is model and original_module(model) is model
    assert [n for n, _ in compiled.named_parameters()] == ["_orig_mod." + n for n, _ in model.named_parameters()]


def test_original_forward_stands_the_wrapper_in_for_the_original_and_restores_it():
    """Inside original_forward the compiled model's call is the original module's call (its hooks fire,
    dynamo traces nothing) and its parameter names are the original's, so functional_call with them moves a
    shared weight under both of its names; on exit, also after an exception, the wrapper is as it was."""
    model, compiled, x, _ = compiled_pair("shared_parameter")
    forward = vars(compiled)["forward"]
    seen = []
    handle = model.a.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    zero = {"a.weight": torch.zeros_like(model.a.weight)}  # a.weight is b.weight
    counters.clear()
    try:
        with original_forward(compiled):
            out = compiled(x)
            names = [n for n, _ in compiled.named_parameters()]
            moved = torch.func.functional_call(compiled, zero, (x,))
        with pytest.raises(RuntimeError, match="mat1 and mat2"), original_forward(compiled):
            compiled(x[:, :3])  # the forward raises in the hooked module
    finally:
        handle.remove()
    assert_close(out, model(x))
    assert_close(moved, model.head(torch.tanh(model.b.bias)).expand(x.shape[0], -1))
    assert names == [n for n, _ in model.named_parameters()]
    assert seen == [torch.Size([x.shape[0], 5])] * 2 and traced_frames() == 0
    assert vars(compiled)["forward"] is forward and "named_parameters" not in vars(compiled)
    assert [n for n, _ in compiled.named_parameters()] == ["_orig_mod." + n for n in names]
    with original_forward(model):  # a plain module: nothing to do
        assert "forward" not in vars(model)


def test_compile_option_on_a_compiled_model_compiles_the_original_module(fresh_dynamo):
    """hvp(compile=) and an operator's compile= on the compiled model trace the products' graphs of the
    original module and equal the eager products on the model; the compiled model's own forward is never
    compiled (it would leave compiled code on the original's forward, its frame under torch.compile(model))."""
    model, compiled, x, y = compiled_pair("mlp")
    V = directions(model)
    counters.clear()
    options = {"backend": "aot_eager"}
    assert_close(fx.hvp(compiled, CE, (x, y), V, compile=options), fx.hvp(model, CE, (x, y), V))
    ggn = fx.GGNOperator(compiled, CE, (x, y), compile=options)
    assert_close(ggn @ V, fx.GGNOperator(model, CE, (x, y)) @ V)
    assert counters["stats"]["unique_graphs"] >= 2, "the products were compiled"
    assert _debug_get_cache_entry_list(type(model).forward.__code__) == []
    assert model.forward_calls > 0 and "forward" not in vars(model)


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.fc(x))


def test_errors_on_a_compiled_model_name_the_original_module():
    """A name the original module does not have is refused naming 'params'; a dropout module in train mode
    is named as in the original module ('drop', not '_orig_mod.drop')."""
    model, compiled, x, y = compiled_pair("mlp")
    with pytest.raises(ValueError, match=r"argument 'params' the model has no parameter named 'fc3.weight'"):
        fx.fisher(compiled, (x, y), params=["fc3.weight"])
    with pytest.raises(ValueError, match=r"argument 'params' the model has no parameter named "
                                         r"'_orig_mod\._orig_mod\.fc1\.weight'"):
        fx.hvp(compiled, CE, (x, y), directions(model)[:, 0], params=["_orig_mod._orig_mod.fc1.weight"])
    dropout = torch.compile(DropoutMLP().double())  # train mode
    counters.clear()
    for call in (lambda: fx.fisher(dropout, (x, y)), lambda: fx.hvp(dropout, CE, (x, y), torch.ones(24)),
                 lambda: fx.fd_quadratic(dropout, x, torch.ones(24))):
        with pytest.raises(ValueError, match=r"argument 'model' module 'drop' \(Dropout\) drops activations"):
            call()
    assert traced_frames() == 0


def test_ewc_on_a_compiled_model_equals_the_model():
    """EWC built on, and its penalty taken at, the compiled model equals EWC on the model, away from the
    anchor (the parameters moved after consolidation)."""
    model, compiled, x, y = compiled_pair("mlp")
    on_model, on_compiled = fx.ewc.EWC(model, (x, y), lam=2.0), fx.ewc.EWC(compiled, (x, y), lam=2.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=_gen(4), dtype=p.dtype))
    expected = on_model.penalty()
    assert expected > 0, "test set-up: the parameters left the anchor"
    assert_close(on_compiled.penalty(), expected)
    assert_close(on_model.penalty(compiled), expected)
