"""fisherext.ops.linear (kernel family K1, fisher_accum): compiled op == pure-PyTorch twin == independent
torch.func computation; opcheck of every op (schema, fake, dispatch); not differentiable, with a clear error;
and bad input rejected with a clear error naming the argument, by the Python wrapper, the compiled kernel
and the fake kernel alike.

Sizes are chosen to cross the kernels' chunk and tile boundaries (see the comments on each case); the chunk
boundaries are crossed with small inputs under a small scratch budget (support.opcheck.scratch_elems). The
GEMM compositions that CUDA runs (csrc/fisher_accum_gemm.cpp) are also run on CPU tensors, through a test
hook (gemm_kernels_on_cpu below), so that they are checked where no GPU is.
"""
import contextlib
import warnings

import pytest
import torch
from torch.func import grad, vmap

import fisherext.reference as ref
from fisherext import _C, ops
from support import assert_close
from support.opcheck import (
    LOW,
    OVERLAP_PATHS,
    bad_input_test,
    opcheck_test,
    randn,
    scratch_elems,
    t,
    views_of,
)


@contextlib.contextmanager
def gemm_kernels_on_cpu():
    """Within the block the CPU kernels of class_gram and linear_sq_grad run the device-generic GEMM
    compositions that the CUDA kernels run (sym_outer_accum_ and linear_outer_accum_ always run them)."""
    previous = _C._set_gemm_kernels_on_cpu(True)
    try:
        yield
    finally:
        _C._set_gemm_kernels_on_cpu(previous)


def _with_t(t, pos_axis):
    return t if t.dim() == pos_axis + 2 else t.unsqueeze(pos_axis)


def func_grads(a, delta):
    """Per-sample weight gradients of a linear layer by autograd: g_n = d/dW sum_t <W a_nt, delta_nt>.

    delta [N, (T,) O] -> [N, O, I]; with a class axis, delta [N, C, (T,) O] -> [N, C, O, I].
    """
    A = _with_t(a, 1)
    W = torch.zeros(delta.shape[-1], A.shape[-1], dtype=a.dtype, device=a.device)

    def pairing(W, a_n, d_n):
        return (torch.nn.functional.linear(a_n, W) * d_n).sum()

    per_sample = vmap(grad(pairing), in_dims=(None, 0, 0))
    if delta.dim() == a.dim():
        return per_sample(W, A, _with_t(delta, 1))
    per_class = vmap(grad(pairing), in_dims=(None, None, 0))
    return vmap(per_class, in_dims=(None, 0, 0))(W, A, _with_t(delta, 2))


def linear_inputs(N, T, I, O, dtype, device, weighted, classes=None):
    pos = () if T is None else (T,)
    a = randn((N, *pos, I), dtype, device, 1)
    cls = () if classes is None else (classes,)
    delta = randn((N, *cls, *pos, O), dtype, device, 2)
    w = randn((N,), dtype, device, 3).abs() + 0.1 if weighted else None
    return a, delta, w


def sym_matrix(D, dtype, device):
    m = randn((D, D), dtype, device, 4)
    return m + m.T


# (N, T, I, O); T=None means a [N, I] without a position axis.
LINEAR_CASES = [
    (1, None, 1, 1),
    (7, None, 13, 5),
    (7, 1, 13, 5),        # explicit T = 1
    (129, 3, 7, 129),     # O = 129 crosses 32/64/128-wide tiles
    (33, 5, 129, 129),    # full and ragged CPU sq-grad register tiles in both O and I
    (9, 4, 64, 24),       # I, O multiples of every CPU sq-grad tile width: a and delta read in place
    (1000, 2, 17, 3),
    (6, 130, 9, 7),       # T >= 128: batched GEMMs on CUDA instead of the fused kernel
]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("N,T,I,O", LINEAR_CASES)
def test_linear_sq_grad(N, T, I, O, weighted, device, dtype):
    a, delta, w = linear_inputs(N, T, I, O, dtype, device, weighted)
    g = func_grads(a, delta)
    wv = torch.ones(N, dtype=dtype, device=device) if w is None else w
    expected = torch.einsum("n,noi->oi", wv, g * g)
    out = ops.linear_sq_grad(a, delta, w)
    assert out.shape == (O, I) and out.dtype == dtype and out.device == a.device
    assert_close(out, expected)
    assert_close(ref.linear_sq_grad(a, delta, w), expected)


def test_linear_sq_grad_is_not_square_of_summed_gradient(device):
    """sum_n g_n^2 differs from (sum_n g_n)^2: the batch-mean-squared bug would fail here."""
    a, delta, _ = linear_inputs(16, 3, 5, 4, torch.float64, device, False)
    per_sample = ops.linear_sq_grad(a, delta)
    summed_sq = func_grads(a, delta).sum(0) ** 2
    assert not torch.allclose(per_sample, summed_sq)


# (N, T, I, O, scratch) for full outer products: P = O*I; scratch is the per-chunk budget in elements (None:
# the default, 2^22).
OUTER_CASES = [
    (1, None, 1, 1, None),
    (7, None, 13, 5, None),
    (129, 3, 7, 129, None),   # P = 903 crosses the 512-wide symmetric tile
    (41, 2, 13, 7, 16 * 91),  # P = 91: chunks of 16 samples, so 2 full chunks and a ragged one
]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("N,T,I,O,scratch", OUTER_CASES)
def test_linear_outer_accum(N, T, I, O, scratch, weighted, device, dtype):
    a, delta, w = linear_inputs(N, T, I, O, dtype, device, weighted)
    P = O * I
    out0 = sym_matrix(P, dtype, device)
    G = func_grads(a, delta).reshape(N, P)
    wv = torch.ones(N, dtype=dtype, device=device) if w is None else w
    expected = out0 + 0.5 * (G * wv[:, None]).T @ G
    out = out0.clone()
    with scratch_elems(scratch or 0):
        returned = ops.linear_outer_accum_(out, a, delta, w, alpha=0.5)
    assert returned is out
    assert_close(out, expected)
    assert torch.equal(out, out.T), "result must be exactly symmetric"
    assert_close(ref.linear_outer_accum(out0, a, delta, w, alpha=0.5), expected)


# (N, T, D) for symmetric rank-k updates.
SYM_CASES = [
    (1, None, 1),
    (7, None, 13),
    (129, 4, 257),
    (1000, None, 600),    # D = 600 crosses the 512-wide symmetric tile
]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("N,T,D", SYM_CASES)
def test_sym_outer_accum(N, T, D, weighted, device, dtype):
    pos = () if T is None else (T,)
    x = randn((N, *pos, D), dtype, device, 5)
    w = randn((N,), dtype, device, 6).abs() if weighted else None
    out0 = sym_matrix(D, dtype, device)
    rows = x.reshape(-1, D)
    wv = (torch.ones(N, dtype=dtype, device=device) if w is None else w).repeat_interleave(rows.shape[0] // N)
    expected = 0.9 * out0 + 2.0 * (rows * wv[:, None]).T @ rows
    out = out0.clone()
    ops.sym_outer_accum_(out, x, w, alpha=2.0, beta=0.9)
    assert_close(out, expected)
    assert torch.equal(out, out.T)
    assert_close(ref.sym_outer_accum(out0, x, w, alpha=2.0, beta=0.9), expected)


def test_sym_outer_reads_only_upper_triangle(device, dtype):
    x = randn((9, 6), dtype, device, 7)
    upper = torch.triu(sym_matrix(6, dtype, device))
    full = upper + torch.triu(upper, 1).T
    junk_lower = upper + torch.tril(randn((6, 6), dtype, device, 8), -1) * 100
    a = ops.sym_outer_accum_(full.clone(), x)
    b = ops.sym_outer_accum_(junk_lower.clone(), x)
    assert_close(b, a)


def test_sym_outer_beta_zero_ignores_old_content(device, dtype):
    x = randn((9, 6), dtype, device, 9)
    out = torch.full((6, 6), float("nan"), dtype=dtype, device=device)
    ops.sym_outer_accum_(out, x, alpha=1.0, beta=0.0)
    assert_close(out, x.T @ x)


def test_sym_outer_noncontiguous_out(device, dtype):
    x = randn((20, 3, 8), dtype, device, 10)
    big = torch.zeros(8, 16, dtype=dtype, device=device)
    view = big[:, ::2]  # non-contiguous [8, 8] view
    ops.sym_outer_accum_(view, x)
    rows = x.reshape(-1, 8)
    assert_close(big[:, ::2], rows.T @ rows)
    assert torch.all(big[:, 1::2] == 0)


def test_kfac_factor_update_sum_and_running_average(device, dtype):
    x1 = randn((30, 4, 5), dtype, device, 11)
    x2 = randn((50, 4, 5), dtype, device, 12)
    A = torch.zeros(5, 5, dtype=dtype, device=device)
    ops.kfac_factor_update_(A, x1)
    ops.kfac_factor_update_(A, x2)
    allrows = torch.cat([x1, x2]).reshape(-1, 5)
    assert_close(A, allrows.T @ allrows)

    def batch_mean(x):
        r = x.reshape(-1, 5)
        return r.T @ r / x.shape[0]

    R = torch.zeros(5, 5, dtype=dtype, device=device)
    ops.kfac_factor_update_(R, x1, decay=0.0)
    assert_close(R, batch_mean(x1))
    ops.kfac_factor_update_(R, x2, decay=0.75)
    expected = 0.75 * batch_mean(x1) + 0.25 * batch_mean(x2)
    assert_close(R, expected)
    assert_close(ref.kfac_factor_update(ref.kfac_factor_update(torch.zeros_like(R), x1, decay=0.0), x2, decay=0.75),
                 expected)


# (N, C, T, I, O)
GRAM_CASES = [
    (1, 1, None, 1, 1),
    (7, 10, None, 13, 5),     # T absent: K_n = |a_n|^2 delta_n delta_n^T
    (7, 3, 1, 13, 5),
    (33, 10, 9, 60, 40),
    (129, 10, 50, 60, 40),    # position-Gram form; a chunk holds at most 98 samples
    (700, 2, 200, 50, 64),    # materialized-gradient form (T large); a chunk holds at most 131 samples
]


@pytest.mark.parametrize("N,C,T,I,O", GRAM_CASES)
def test_class_gram(N, C, T, I, O, device, dtype):
    a, delta, _ = linear_inputs(N, T, I, O, dtype, device, False, classes=C)
    J = func_grads(a, delta).reshape(N, C, O * I)
    expected = J @ J.transpose(1, 2)
    K = ops.class_gram(a, delta)
    assert K.shape == (N, C, C) and K.dtype == dtype
    assert_close(K, expected)
    assert torch.equal(K, K.transpose(1, 2))
    assert_close(ref.class_gram(a, delta), expected)


def test_class_gram_gives_per_input_fisher_trace(dtype):
    """tr(F_n) = tr(Lambda_n K_n) for a softmax output layer, against an explicit per-class loop."""
    torch.manual_seed(0)
    N, I, C = 5, 7, 4
    layer = torch.nn.Linear(I, C, bias=False).to(dtype)
    x = torch.randn(N, I, dtype=dtype)
    p = torch.softmax(layer(x), -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    # d logits / d logits_c: the identity rows, one per class
    delta = torch.eye(C, dtype=dtype).expand(N, C, C)
    traces = torch.einsum("ncd,ndc->n", lam, ops.class_gram(x, delta))
    for n in range(N):
        expected = 0.0
        for y in range(C):
            layer.zero_grad()
            (-torch.log_softmax(layer(x[n : n + 1]), -1)[0, y]).backward()
            expected += p[n, y].item() * layer.weight.grad.pow(2).sum().item()
        assert traces[n].item() == pytest.approx(expected, rel=1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("T", [4, 70], ids=["T4", "T70"])  # T >= 64: batched GEMMs on CUDA for half/bfloat16
@pytest.mark.parametrize("low", LOW, ids=["f16", "bf16"])
def test_low_precision_inputs_accumulate_in_float(low, T, device):
    a, delta, w = linear_inputs(64, T, 9, 6, torch.float32, device, True)
    a, delta, w = a.to(low), delta.to(low), w.to(low)
    out = ops.linear_sq_grad(a, delta, w)
    assert out.dtype == low
    exact = ref.linear_sq_grad(a.double(), delta.double(), w.double())
    assert_close(out, exact, dtype=low)
    d3 = delta.unsqueeze(1).expand(64, 3, T, 6).contiguous()
    K = ops.class_gram(a, d3)
    assert K.dtype == low
    assert_close(K, ref.class_gram(a.double(), d3.double()), dtype=low)


@pytest.mark.parametrize("low", LOW, ids=["f16", "bf16"])
def test_half_precision_into_a_float32_accumulator(low, device):
    """out may be float32 for half/bfloat16 inputs: the sum is then never rounded to half precision."""
    a, delta, w = (v.to(low) for v in linear_inputs(40, 3, 5, 4, torch.float32, device, True))
    out0 = sym_matrix(20, torch.float32, device)
    out = out0.clone()
    ops.linear_outer_accum_(out, a, delta, w, alpha=0.5)
    assert out.dtype == torch.float32 and torch.equal(out, out.T)
    assert_close(out, ref.linear_outer_accum(out0.double(), a.double(), delta.double(), w.double(), alpha=0.5),
                 dtype=low)
    factor = torch.zeros(5, 5, device=device)
    ops.kfac_factor_update_(factor, a, decay=0.5)
    assert_close(factor, ref.kfac_factor_update(torch.zeros(5, 5, dtype=torch.float64, device=device), a.double(),
                                                decay=0.5), dtype=low)


def test_float16_weights_far_from_one(device):
    """Weighted float16 rows are split as (sign(w) √|w| x)(√|w| x)^T, each side rounded once: with w = 2^-14
    and rows of size 2^-9, w x on one side would be a float16 subnormal of a few ulps (about 3 % off);
    √w x stays within 1e-3."""
    x = randn((64, 16), torch.float16, device, 1, scale=2.0**-9)
    w = torch.full((64,), 2.0**-14, dtype=torch.float16, device=device)
    out = torch.zeros(16, 16, device=device)
    ops.sym_outer_accum_(out, x, w)
    assert_close(out, ref.sym_outer_accum(torch.zeros(16, 16, dtype=torch.float64), x.double(), w.double()),
                 rtol=1e-3)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_sym_outer_accum_chunks_apply_beta_once(weighted, device, dtype):
    """Weighted rows are taken in chunks (under a budget of 140 elements, 20 of the 123 rows of D = 7, the last
    chunk ragged): beta scales the old out once, not once per chunk. Unweighted, all rows at once."""
    x = randn((41, 3, 7), dtype, device, 13)
    w = randn((41,), dtype, device, 14).abs() if weighted else None
    out0 = sym_matrix(7, dtype, device)
    out = out0.clone()
    with scratch_elems(2 * 7 * 10):
        ops.sym_outer_accum_(out, x, w, alpha=0.5, beta=0.25)
    rows = x.reshape(-1, 7)
    wv = (torch.ones(41, dtype=dtype, device=device) if w is None else w).repeat_interleave(3)
    assert_close(out, 0.25 * out0 + 0.5 * (rows * wv[:, None]).T @ rows)
    assert torch.equal(out, out.T)


# ---------------------------------------------------------------------------------------------------
# The GEMM compositions of csrc/fisher_accum_gemm.cpp that CUDA runs for class_gram and linear_sq_grad,
# on CPU tensors: each case once in one chunk and once under a scratch budget of 64 elements, which puts
# every sample (three for T = 1 in linear_sq_grad) in its own chunk.


@pytest.mark.parametrize("scratch", [0, 64], ids=["budget", "tiny-chunks"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("N,T,I,O", LINEAR_CASES)
def test_linear_sq_grad_gemm_composition(N, T, I, O, weighted, scratch, dtype):
    a, delta, w = linear_inputs(N, T, I, O, dtype, "cpu", weighted)
    g = func_grads(a, delta)
    wv = torch.ones(N, dtype=dtype) if w is None else w
    with gemm_kernels_on_cpu(), scratch_elems(scratch):
        out = ops.linear_sq_grad(a, delta, w)
    assert out.shape == (O, I) and out.dtype == dtype
    assert_close(out, torch.einsum("n,noi->oi", wv, g * g))


@pytest.mark.parametrize("scratch", [0, 64], ids=["budget", "tiny-chunks"])
@pytest.mark.parametrize("N,C,T,I,O", GRAM_CASES + [(41, 3, 20, 3, 2)])  # + a small materialized-gradient case
def test_class_gram_gemm_composition(N, C, T, I, O, scratch, dtype):
    a, delta, _ = linear_inputs(N, T, I, O, dtype, "cpu", False, classes=C)
    J = func_grads(a, delta).reshape(N, C, O * I)
    with gemm_kernels_on_cpu(), scratch_elems(scratch):
        K = ops.class_gram(a, delta)
    assert K.shape == (N, C, C) and K.dtype == dtype
    assert_close(K, J @ J.transpose(1, 2))
    assert torch.equal(K, K.transpose(1, 2))


@pytest.mark.parametrize("low", LOW, ids=["f16", "bf16"])
def test_gemm_compositions_low_precision(low):
    """Half/bfloat16 through the compositions (on the CPU their GEMMs multiply float32 copies), in chunks:
    linear_sq_grad for T = 1 and T > 1, class_gram in each of its three forms."""
    with gemm_kernels_on_cpu(), scratch_elems(200):
        for T in (None, 6):
            a, delta, w = (v.to(low) for v in linear_inputs(30, T, 9, 5, torch.float32, "cpu", True))
            out = ops.linear_sq_grad(a, delta, w)
            assert out.dtype == low
            assert_close(out, ref.linear_sq_grad(a.double(), delta.double(), w.double()), dtype=low)
        for T, I, O in ((None, 7, 5), (4, 7, 5), (20, 3, 2)):  # norms, position Gram, materialized gradients
            a, delta = (v.to(low) for v in linear_inputs(30, T, I, O, torch.float32, "cpu", False, classes=3)[:2])
            K = ops.class_gram(a, delta)
            assert K.dtype == low
            assert_close(K, ref.class_gram(a.double(), delta.double()), dtype=low)


# ---------------------------------------------------------------------------------------------------
# opcheck, torch.compile, autograd, bad input


def _f32(*shape, device, seed):
    return randn(shape, torch.float32, device, seed)


def _sym(D, device):
    m = _f32(D, D, device=device, seed=D)
    return m + m.T


_f = torch.ops.fisherext
OPCHECK_CASES = {
    "linear_sq_grad-positions-weighted": lambda dev: (_f.linear_sq_grad.default, (
        _f32(5, 3, 4, device=dev, seed=0), _f32(5, 3, 6, device=dev, seed=1), _f32(5, device=dev, seed=2).abs())),
    "linear_sq_grad-2d": lambda dev: (_f.linear_sq_grad.default, (
        _f32(5, 4, device=dev, seed=0), _f32(5, 6, device=dev, seed=1), None)),
    "linear_outer_accum_-positions-weighted": lambda dev: (_f.linear_outer_accum_.default, (
        _sym(24, dev), _f32(5, 3, 4, device=dev, seed=0), _f32(5, 3, 6, device=dev, seed=1),
        _f32(5, device=dev, seed=2).abs(), 0.5)),
    "linear_outer_accum_-2d": lambda dev: (_f.linear_outer_accum_.default, (
        _sym(24, dev), _f32(5, 4, device=dev, seed=0), _f32(5, 6, device=dev, seed=1), None, 1.0)),
    "sym_outer_accum_-positions-weighted": lambda dev: (_f.sym_outer_accum_.default, (
        _sym(4, dev), _f32(5, 3, 4, device=dev, seed=0), _f32(5, device=dev, seed=2).abs(), 1.0, 0.5)),
    "sym_outer_accum_-2d": lambda dev: (_f.sym_outer_accum_.default, (
        _sym(6, dev), _f32(5, 6, device=dev, seed=1), None, 2.0, 1.0)),
    "class_gram-positions": lambda dev: (_f.class_gram.default, (
        _f32(5, 3, 4, device=dev, seed=0), _f32(5, 2, 3, 6, device=dev, seed=3))),
    "class_gram-2d": lambda dev: (_f.class_gram.default, (
        _f32(5, 4, device=dev, seed=0), _f32(5, 2, 6, device=dev, seed=3))),
    "sym_outer_accum_-half-into-float32": lambda dev: (_f.sym_outer_accum_.default, (
        _sym(4, dev), _f32(5, 3, 4, device=dev, seed=0).half(), _f32(5, device=dev, seed=2).abs().half(), 1.0, 0.5)),
}


test_opcheck = opcheck_test(OPCHECK_CASES)


def test_compile_sees_fakes(device):
    """torch.compile traces through the fake kernels and gives the eager result."""
    a, d, w = _f32(8, 3, 5, device=device, seed=0), _f32(8, 3, 4, device=device, seed=1), _f32(8, device=device, seed=2).abs()
    compiled = torch.compile(lambda a, d, w: ops.linear_sq_grad(a, d, w) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(a, d, w), ops.linear_sq_grad(a, d, w) * 2)


# Each op on inputs a [5, 3, 4], delta [5, 3, 6] (or out) of which `a` requires grad: (call, output to
# backpropagate from). In-place ops: the written `out` takes the op's history.
def _sq_grad(a, d):
    return ops.linear_sq_grad(a, d)


def _outer(a, d):
    return ops.linear_outer_accum_(torch.zeros(24, 24, dtype=a.dtype, device=a.device), a, d)


def _sym_outer(a, d):
    return ops.sym_outer_accum_(torch.zeros(4, 4, dtype=a.dtype, device=a.device), a)


def _gram(a, d):
    return ops.class_gram(a, d.unsqueeze(1))


NOT_DIFFERENTIABLE = {"linear_sq_grad": _sq_grad, "linear_outer_accum_": _outer, "sym_outer_accum_": _sym_outer,
                      "class_gram": _gram}


@pytest.mark.parametrize("name", list(NOT_DIFFERENTIABLE))
def test_backward_raises_a_clear_error(name, device):
    """A backward through a K1 op raises an error naming it (csrc/autograd.cpp), not the dispatcher's warning
    that a missing autograd kernel "may lead to silently incorrect behavior"; the forward values are those
    computed without autograd."""
    a = randn((5, 3, 4), torch.float64, device, 0)
    d = randn((5, 3, 6), torch.float64, device, 1)
    expected = NOT_DIFFERENTIABLE[name](a, d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = NOT_DIFFERENTIABLE[name](a.clone().requires_grad_(), d)
        assert got.requires_grad
        assert torch.equal(got.detach(), expected)
        with pytest.raises(RuntimeError, match=f"fisherext.{name}: not differentiable"):
            got.sum().backward()


@pytest.mark.parametrize("name", list(NOT_DIFFERENTIABLE))
def test_no_graph_without_inputs_requiring_grad(name, device):
    a, d = randn((5, 3, 4), torch.float64, device, 0), randn((5, 3, 6), torch.float64, device, 1)
    assert not NOT_DIFFERENTIABLE[name](a, d).requires_grad
    with torch.no_grad():
        assert not NOT_DIFFERENTIABLE[name](a.requires_grad_(), d).requires_grad


# (op name, args, exception type, substring the message must contain)
BAD = [
    ("linear_sq_grad", lambda: (torch.ones(5, 4, dtype=torch.int64), t(5, 6), None), TypeError, "'a'"),
    ("linear_sq_grad", lambda: (t(5, 4), t(5, 6, dtype=torch.float64), None), TypeError, "'delta'"),
    ("linear_sq_grad", lambda: (t(4), t(5, 6), None), ValueError, "'a'"),
    ("linear_sq_grad", lambda: (t(5, 3, 4), t(5, 6), None), ValueError, "'delta'"),
    ("linear_sq_grad", lambda: (t(5, 4), t(6, 6), None), ValueError, "disagree on N"),
    ("linear_sq_grad", lambda: (t(5, 3, 4), t(5, 2, 6), None), ValueError, "disagree on T"),
    ("linear_sq_grad", lambda: (t(0, 4), t(0, 6), None), ValueError, "'a' is empty"),
    ("linear_sq_grad", lambda: (t(5, 4), t(5, 0), None), ValueError, "'delta' is empty"),
    ("linear_sq_grad", lambda: (t(5, 4), t(5, 6), t(4)), ValueError, "'weight'"),
    ("linear_sq_grad", lambda: (t(5, 4), t(5, 6), t(5, dtype=torch.float64)), TypeError, "'weight'"),
    ("linear_outer_accum_", lambda: (t(23, 24), t(5, 4), t(5, 6), None, 1.0), ValueError, "'out'"),
    ("linear_outer_accum_", lambda: (t(24, 24, dtype=torch.float64), t(5, 4), t(5, 6), None, 1.0), TypeError, "'out'"),
    ("sym_outer_accum_", lambda: (t(4, 4, dtype=torch.float64), t(5, 4, dtype=torch.float16), None, 1.0, 1.0),
     TypeError, "'out'"),
    ("sym_outer_accum_", lambda: (t(4, 4, dtype=torch.float16), t(5, 4), None, 1.0, 1.0), TypeError, "'out'"),
    ("sym_outer_accum_", lambda: (t(4, 4), t(5, 2, 3, 4), None, 1.0, 1.0), ValueError, "'x'"),
    ("sym_outer_accum_", lambda: (t(3, 3), t(5, 4), None, 1.0, 1.0), ValueError, "'out'"),
    ("sym_outer_accum_", lambda: (t(4, 4), t(5, 4), t(5, 1), 1.0, 1.0), ValueError, "'weight'"),
    ("class_gram", lambda: (t(5, 4), t(5, 6)), ValueError, "'delta'"),
    ("class_gram", lambda: (t(5, 3, 4), t(5, 2, 6)), ValueError, "'delta'"),
    ("class_gram", lambda: (t(5, 3, 4), t(5, 2, 4, 6)), ValueError, "disagree on T"),
    ("class_gram", lambda: (t(5, 4, dtype=torch.float16), t(5, 2, 6)), TypeError, "'delta'"),
    # An output whose elements share memory: expanded (a zero stride), or an as_strided view whose rows
    # overlap (strides (2, 1): no zero stride, ATen's has_internal_overlap cannot tell).
    ("sym_outer_accum_", lambda: (t(4).expand(4, 4), t(5, 4), None, 1.0, 1.0), ValueError,
     "'out' has elements that share memory"),
    ("sym_outer_accum_", lambda: (t(20).as_strided((4, 4), (2, 1)), t(5, 4), None, 1.0, 0.0), ValueError,
     "'out' has elements that share memory"),
    ("linear_outer_accum_", lambda: (t(1, 24).expand(24, 24), t(5, 4), t(5, 6), None, 1.0), ValueError,
     "'out' has elements that share memory"),
]


test_bad_input_names_the_argument = bad_input_test(BAD)


def _aliased(make):
    return views_of(make, buffer=lambda: _sym(6, "cpu"))


# In-place ops refuse an output that shares memory with another argument (the kernels would read what they
# already wrote). Views of one [6, 6] buffer; O * I = 6.
OVERLAPPING = [
    ("sym_outer_accum_", _aliased(lambda b: (b, b, None, 1.0, 1.0)), ValueError,
     "'out' overlaps argument 'x'"),
    ("sym_outer_accum_", _aliased(lambda b: (b, b[2:5], None, 1.0, 1.0)), ValueError,
     "'out' overlaps argument 'x'"),
    ("sym_outer_accum_", _aliased(lambda b: (b, b.T, None, 1.0, 1.0)), ValueError,
     "'out' overlaps argument 'x'"),
    ("sym_outer_accum_", _aliased(lambda b: (b, t(6, 6), b[0], 1.0, 1.0)), ValueError,
     "'out' overlaps argument 'weight'"),
    ("linear_outer_accum_", _aliased(lambda b: (b, b.view(12, 3), t(12, 2), None, 1.0)), ValueError,
     "'out' overlaps argument 'a'"),
    ("linear_outer_accum_", _aliased(lambda b: (b, t(18, 3), b.view(18, 2), None, 1.0)), ValueError,
     "'out' overlaps argument 'delta'"),
    ("linear_outer_accum_", _aliased(lambda b: (b, t(6, 3), t(6, 2), b[5], 1.0)), ValueError,
     "'out' overlaps argument 'weight'"),
]


test_overlapping_arguments_are_refused = bad_input_test(OVERLAPPING, paths=OVERLAP_PATHS)


def test_strided_views_of_the_output_buffer_are_computed_right():
    """Arguments that share a buffer with out but no element: x interleaved with out (ATen cannot decide
    their overlap; both are read through copies), and rows of the same buffer beside out's."""
    big = torch.randn(8, 16, dtype=torch.float64)
    out, x = big[:, ::2], big[:, 1::2]
    out0, x0 = out.clone(), x.clone()
    ops.sym_outer_accum_(out, x, alpha=0.5, beta=2.0)
    torch.testing.assert_close(out, 2.0 * (torch.triu(out0) + torch.triu(out0, 1).T) + 0.5 * x0.T @ x0)
    assert torch.equal(big[:, 1::2], x0)
    rows = torch.randn(10, 4, dtype=torch.float64)
    out, x = rows[:4], rows[4:]  # out [4, 4] and x [6, 4], adjacent in memory
    out.zero_()
    x0 = x.clone()
    ops.sym_outer_accum_(out, x)
    torch.testing.assert_close(out, x0.T @ x0)


def test_wrapper_rejects_non_tensors_and_bad_scalars():
    with pytest.raises(TypeError, match="'a' must be a torch.Tensor"):
        ops.linear_sq_grad([[1.0]], t(1, 1))
    with pytest.raises(ValueError, match="'alpha' must be finite"):
        ops.linear_outer_accum_(t(4, 4), t(3, 2), t(3, 2), alpha=float("nan"))
    with pytest.raises(TypeError, match="'beta'"):
        ops.sym_outer_accum_(t(2, 2), t(3, 2), beta="1")
    with pytest.raises(ValueError, match="'decay'"):
        ops.kfac_factor_update_(t(2, 2), t(3, 2), decay=1.0)
    with pytest.raises(ValueError, match="'x' is empty"):
        ops.kfac_factor_update_(t(2, 2), t(0, 2), decay=0.5)


def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match="'delta' is on meta"):
        torch.ops.fisherext.linear_sq_grad(t(5, 4), t(5, 6).to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cross_device_is_named():
    with pytest.raises(ValueError, match="'delta' is on cpu"):
        torch.ops.fisherext.linear_sq_grad(t(5, 4).cuda(), t(5, 6))
