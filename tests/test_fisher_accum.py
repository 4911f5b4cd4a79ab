"""K1 ops (fisher_accum family): compiled op == pure-PyTorch twin == independent torch.func computation.

Sizes are chosen to cross the kernels' chunk and tile boundaries (see the comments on each case).
"""
import pytest
import torch
from torch.func import grad, vmap

import fisherext.reference as ref
from fisherext import ops
from support import assert_close


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


def make(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def linear_inputs(N, T, I, O, dtype, device, weighted, classes=None):
    pos = () if T is None else (T,)
    a = make((N, *pos, I), dtype, device, 1)
    cls = () if classes is None else (classes,)
    delta = make((N, *cls, *pos, O), dtype, device, 2)
    w = make((N,), dtype, device, 3).abs() + 0.1 if weighted else None
    return a, delta, w


def sym_matrix(D, dtype, device):
    m = make((D, D), dtype, device, 4)
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


def test_linear_sq_grad_is_not_square_of_summed_gradient():
    """sum_n g_n^2 differs from (sum_n g_n)^2: the batch-mean-squared bug would fail here."""
    a, delta, _ = linear_inputs(16, 3, 5, 4, torch.float64, "cpu", False)
    per_sample = ops.linear_sq_grad(a, delta)
    summed_sq = func_grads(a, delta).sum(0) ** 2
    assert not torch.allclose(per_sample, summed_sq)


# (N, T, I, O) for full outer products: P = O*I.
OUTER_CASES = [
    (1, None, 1, 1),
    (7, None, 13, 5),
    (129, 3, 7, 129),     # P = 903 crosses the 512-wide symmetric tile
    (1025, 2, 133, 31),   # P = 4123: the CPU chunk is 1017 samples, so 2 chunks
]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("N,T,I,O", OUTER_CASES)
def test_linear_outer_accum(N, T, I, O, weighted, device, dtype):
    if N * O * I > 10**6 and dtype == torch.float64 and device.type == "cpu" and not weighted:
        pytest.skip("largest case runs weighted only in float64, to keep the suite short")
    a, delta, w = linear_inputs(N, T, I, O, dtype, device, weighted)
    P = O * I
    out0 = sym_matrix(P, dtype, device)
    G = func_grads(a, delta).reshape(N, P)
    wv = torch.ones(N, dtype=dtype, device=device) if w is None else w
    expected = out0 + 0.5 * (G * wv[:, None]).T @ G
    out = out0.clone()
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
    x = make((N, *pos, D), dtype, device, 5)
    w = make((N,), dtype, device, 6).abs() if weighted else None
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
    x = make((9, 6), dtype, device, 7)
    upper = torch.triu(sym_matrix(6, dtype, device))
    full = upper + torch.triu(upper, 1).T
    junk_lower = upper + torch.tril(make((6, 6), dtype, device, 8), -1) * 100
    a = ops.sym_outer_accum_(full.clone(), x)
    b = ops.sym_outer_accum_(junk_lower.clone(), x)
    assert_close(b, a)


def test_sym_outer_beta_zero_ignores_old_content(device, dtype):
    x = make((9, 6), dtype, device, 9)
    out = torch.full((6, 6), float("nan"), dtype=dtype, device=device)
    ops.sym_outer_accum_(out, x, alpha=1.0, beta=0.0)
    assert_close(out, x.T @ x)


def test_sym_outer_noncontiguous_out(device, dtype):
    x = make((20, 3, 8), dtype, device, 10)
    big = torch.zeros(8, 16, dtype=dtype, device=device)
    view = big[:, ::2]  # non-contiguous [8, 8] view
    ops.sym_outer_accum_(view, x)
    rows = x.reshape(-1, 8)
    assert_close(big[:, ::2], rows.T @ rows)
    assert torch.all(big[:, 1::2] == 0)


def test_kfac_factor_update_sum_and_running_average(device, dtype):
    x1 = make((30, 4, 5), dtype, device, 11)
    x2 = make((50, 4, 5), dtype, device, 12)
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
    (129, 10, 50, 60, 40),    # position-Gram path on CPU; a chunk holds at most 98 samples
    (700, 2, 200, 50, 64),    # materializing path on CPU (T large); a chunk holds at most 655 samples
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


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_inputs_accumulate_in_float(low, device):
    a, delta, w = linear_inputs(64, 4, 9, 6, torch.float32, device, True)
    a, delta, w = a.to(low), delta.to(low), w.to(low)
    out = ops.linear_sq_grad(a, delta, w)
    assert out.dtype == low
    exact = ref.linear_sq_grad(a.double(), delta.double(), w.double())
    assert_close(out, exact, dtype=low)
    K = ops.class_gram(a, delta.unsqueeze(1).expand(64, 3, 4, 6).contiguous())
    assert K.dtype == low
