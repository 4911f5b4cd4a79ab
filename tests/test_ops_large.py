"""Index overflow: every op of ``fisherext.ops`` on CUDA tensors with more than 2³¹ elements, or whose flat index
crosses 2³¹ (where 32-bit index arithmetic wraps), against its pure-PyTorch twin (``fisherext.reference``) on
slices at the start, around the element whose offset reaches 2³¹, and at the end.

Each case runs at two sizes: ``large`` (past 2³¹; needs the free device memory its ``_need`` states, 10-42 GiB,
and skips with the amount when the device has less) and ``small`` (the same code on tiny tensors: the one quick
test per op that ``scripts/gpu_check.sh`` runs under compute-sanitizer). CUDA only: on the CPU the large cases
would need tens of GiB of host memory and minutes each, and the small ones repeat tests/test_ops_*.py.

Where a case contracts over 10⁴-10⁷ terms, its inputs are integers in {-1, 0, 1} stored as float32: every
product and partial sum is then an integer below 2²⁴, exact in float32, so those sums are exact in any order
and the twin's result is the kernel's up to the rounding of weighted terms.
"""
import gc

import pytest
import torch

import fisherext.reference as ref
from fisherext import ops
from support import assert_close

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA only: the cases past 2^31 elements need tens of GiB")

LIMIT = 2**31
DEV = "cuda"


@pytest.fixture(params=["small", pytest.param("large", marks=pytest.mark.slow)])
def large(request):
    """False: the small twin of a case; True: the case past 2³¹."""
    return request.param == "large"


@pytest.fixture(autouse=True)
def _release_memory():
    """The next case sees the memory this one held (tensors of 8-40 GiB)."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _need(large, gib):
    """Skip a large case unless the device has `gib` GiB free (what its tensors and the twin's slices take)."""
    if not large:
        return
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free CUDA memory; {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _normal(shape, seed):
    """Seeded normal float32 entries drawn on the device (support.opcheck.randn draws in float64 on the CPU:
    16 GiB of host memory and a copy to the device per 2³¹ entries)."""
    return torch.randn(shape, generator=_gen(seed), device=DEV)


def _positive(shape, seed):
    """Uniform entries in [0.5, 1.5): sample weights, preconditioners."""
    return torch.rand(shape, generator=_gen(seed), device=DEV) + 0.5


def _ints(shape, seed):
    """Entries in {-1, 0, 1} as float32 (see the module docstring)."""
    return torch.randint(-1, 2, shape, generator=_gen(seed), device=DEV, dtype=torch.float32)


def _probe(n, at, width=4):
    """Indices into an axis of length n: the first and last `width`, and `width` either side of `at` (the
    index whose offset reaches 2³¹), or of the middle where `at` is not in [0, n) (a small case)."""
    at = at if 0 <= at < n else n // 2
    idx = torch.cat([torch.arange(width), torch.arange(at - width, at + width), torch.arange(n - width, n)])
    return torch.unique(idx.clamp(0, n - 1)).to(DEV)


# ---- K1 fisher_accum ----


def test_linear_sq_grad_output_past_2_31(large):
    """out [O, I] with O·I = 2³¹ + 6144: the last row crosses 2³¹."""
    _need(large, 10)
    N, O, I = (3, 2048, 2**20 + 3) if large else (3, 8, 37)
    a, delta, w = _ints((N, I), 0), _ints((N, O), 1), _positive(N, 2)
    out = ops.linear_sq_grad(a, delta, w)
    rows = _probe(O, LIMIT // I)
    assert_close(out[rows], ref.linear_sq_grad(a, delta[:, rows], w))


def test_linear_sq_grad_input_past_2_31(large):
    """a [N, T, I] with N·T·I = 2³¹ + 524288 (T = 2¹⁷ positions): the last sample's rows lie past 2³¹."""
    _need(large, 10)
    N, T, I, O = (4, 2**17, 4097, 3) if large else (4, 5, 7, 3)
    a, delta, w = _ints((N, T, I), 3), _ints((N, T, O), 4), _positive(N, 5)
    out = ops.linear_sq_grad(a, delta, w)
    cols = _probe(I, I // 2)
    assert_close(out[:, cols], ref.linear_sq_grad(a[..., cols], delta, w))


def test_linear_outer_accum_output_past_2_31(large):
    """out [P, P] with P = 50000 (2.5·10⁹ elements, written symmetric from the upper triangle): rows past
    42949 lie past 2³¹. With O = 1, vec(g_n) = delta_n a_n, so a principal submatrix of out is the op on a
    subset of a's columns."""
    _need(large, 12)
    N, P = (4, 50000) if large else (4, 40)
    a, delta, w = _normal((N, P), 6), _normal((N, 1), 7), _positive(N, 8)
    out = _normal((P, P), 9)
    idx = _probe(P, LIMIT // P)
    sub = idx[:, None], idx[None, :]
    expected = ref.linear_outer_accum(out[sub], a[:, idx], delta, w, alpha=0.5)
    ops.linear_outer_accum_(out, a, delta, w, alpha=0.5)
    assert_close(out[sub], expected)


def test_sym_outer_accum_output_past_2_31(large):
    """out [D, D] with D = 50000: rows past 42949 lie past 2³¹ (old content scaled by beta, upper triangle read)."""
    _need(large, 12)
    N, D = (4, 50000) if large else (4, 40)
    x, w = _normal((N, D), 10), _positive(N, 11)
    out = _normal((D, D), 12)
    idx = _probe(D, LIMIT // D)
    sub = idx[:, None], idx[None, :]
    expected = ref.sym_outer_accum(out[sub], x[:, idx], w, alpha=0.5, beta=0.5)
    ops.sym_outer_accum_(out, x, w, alpha=0.5, beta=0.5)
    assert_close(out[sub], expected)


def test_sym_outer_accum_input_past_2_31(large):
    """x [N, T, D] with N·T·D = 2³¹ + 2048 (a Kronecker factor over 8.4·10⁶ rows): rows past 2²³ lie past
    2³¹; the sums have up to 8.4·10⁶ < 2²⁴ terms, exact."""
    _need(large, 10)
    N, T, D = (8, 2**20 + 1, 256) if large else (8, 5, 12)
    x, out = _ints((N, T, D), 13), _normal((D, D), 14)
    idx = _probe(D, D // 2)
    sub = idx[:, None], idx[None, :]
    expected = ref.sym_outer_accum(out[sub], x[..., idx], None, alpha=1.0, beta=0.5)
    ops.sym_outer_accum_(out, x, None, alpha=1.0, beta=0.5)
    assert_close(out[sub], expected)


def test_class_gram_delta_past_2_31(large):
    """T = 1, delta [N, C, O] with N·C·O = 2³¹ + 131072: the last sample lies past 2³¹."""
    _need(large, 10)
    N, C, I, O = (2**14 + 1, 16, 4, 8192) if large else (5, 3, 4, 7)
    a, delta = _ints((N, I), 15), _ints((N, C, O), 16)
    out = ops.class_gram(a, delta)
    n = _probe(N, LIMIT // (C * O))
    assert_close(out[n], ref.class_gram(a[n], delta[n]))


def test_class_gram_input_past_2_31(large):
    """T > 1, a [N, T, I] with N·T·I = 2³¹ + 2²⁰: the last sample lies past 2³¹ (position-Gram path, chunks
    of samples)."""
    _need(large, 10)
    N, C, T, I, O = (2049, 2, 64, 16384, 4) if large else (5, 2, 3, 6, 4)
    a, delta = _ints((N, T, I), 17), _ints((N, C, T, O), 18)
    out = ops.class_gram(a, delta)
    n = _probe(N, LIMIT // (T * I))
    assert_close(out[n], ref.class_gram(a[n], delta[n]))


# ---- K2 perturb ----


def test_unflatten_axpy_offsets_past_2_31(large):
    """A list whose first tensor has 2³¹ + 10 elements (its chunks cross 2³¹) and whose next two start past
    2³¹ in x and v: the axpy, then the bitwise copy back."""
    _need(large, 27)
    head = LIMIT + 10 if large else 1034
    shapes = [(head,), (30, 100), (1024, 1024)] if large else [(head,), (3, 10), (8, 8)]
    total = sum(torch.Size(s).numel() for s in shapes)
    x, v = _normal(total, 19), _normal(total, 20)
    out = [torch.empty(s, device=DEV) for s in shapes]
    idx = _probe(head, LIMIT)
    expected_head = ref.unflatten_axpy([x[idx]], x[idx], v[idx], 0.37)[0]
    expected_tail = ref.unflatten_axpy(out[1:], x[head:], v[head:], 0.37)
    ops.unflatten_axpy_(out, x, v, 0.37)
    assert_close(out[0][idx], expected_head)
    for got, want in zip(out[1:], expected_tail):
        assert_close(got, want)
    ops.unflatten_axpy_(out, x, None, 0.0)
    assert torch.equal(out[0][idx], x[idx])
    assert torch.equal(torch.cat([t.flatten() for t in out[1:]]), x[head:])


def test_fd_fisher_reduce_rows_past_2_31(large):
    """Logits [N, C] with N·C = 2³¹ + 8352 (three of them, 24 GiB): rows past 2147483 lie past 2³¹."""
    _need(large, 27)
    N, C = (LIMIT // 1000 + 9, 1000) if large else (9, 33)
    lp, lm, l0 = (_normal((N, C), 21 + k).mul_(3) for k in range(3))
    got = ops.fd_fisher_reduce(lp, lm, l0, 0.25)
    n = _probe(N, LIMIT // C)
    expected = ref.fd_fisher_reduce(lp[n].double(), lm[n].double(), l0[n].double(), 0.25)
    for g, e in zip(got, expected):
        assert_close(g[n], e.float())


# ---- K3 softmax ----


def test_softmax_hvp_directions_past_2_31(large):
    """u [K, N, C] with K·N·C = 257·2²³ (directions sharing the logits): direction 256 lies past 2³¹."""
    _need(large, 18)
    K, N, C = (257, 2**16, 128) if large else (3, 5, 7)
    logits, u = 3 * _normal((N, C), 24), _normal((K, N, C), 25)
    out = ops.softmax_hvp(logits, u)
    k, n = _probe(K, LIMIT // (N * C))[:, None], _probe(N, N // 2)
    assert_close(out[k, n], ref.softmax_hvp(logits[n], u[k, n]))


def test_softmax_hessian_sqrt_output_past_2_31(large):
    """S [C, N, C] with C·N·C = 2³¹ + 4096 from logits of 3.4·10⁷ elements: S[C − 1, n] crosses 2³¹ at
    n = 524225."""
    _need(large, 10)
    N, C = (2**19 + 1, 64) if large else (9, 5)
    logits = 3 * _normal((N, C), 26)
    out = ops.softmax_hessian_sqrt(logits)
    n = _probe(N, (LIMIT - (C - 1) * N * C) // C)
    assert_close(out[:, n], ref.softmax_hessian_sqrt(logits[n]))


# ---- K3 solver updates ----


def test_cg_update_columns_past_2_31(large):
    """x, r, p, Ap [P, 2] with 2P = 2³¹ + 1024 and a preconditioner [P]: rows past 2³⁰ lie past 2³¹. The
    reductions over all rows against the twin's, summed over chunks of rows."""
    _need(large, 42)
    P, K = (2**30 + 512, 2) if large else (1000, 2)
    x, r, p, Ap = (_normal((P, K), 27 + k) for k in range(4))
    alpha, inv = _normal(K, 31), _positive(P, 32)
    rows = _probe(P, LIMIT // K)
    x_want, r_want, _, _ = ref.cg_update(x[rows], r[rows], p[rows], Ap[rows], alpha, inv[rows])
    rz_want = rr_want = torch.zeros(K, dtype=torch.float64, device=DEV)
    for s in range(0, P, 2**26):
        c = slice(s, s + 2**26)
        _, _, rz, rr = ref.cg_update(x[c], r[c], p[c], Ap[c], alpha, inv[c])
        rz_want, rr_want = rz_want + rz, rr_want + rr
    rz, rr = ops.cg_update_(x, r, p, Ap, alpha, inv)
    assert_close(x[rows], x_want)
    assert_close(r[rows], r_want)
    assert_close(rz, rz_want.float())
    assert_close(rr, rr_want.float())


def test_cg_direction_past_2_31(large):
    """p, r, inv_diag [P] with P = 2³¹ + 1000."""
    _need(large, 27)
    P = LIMIT + 1000 if large else 1000
    p, r, inv = _normal(P, 33), _normal(P, 34), _positive(P, 35)
    beta = _normal((), 36)
    idx = _probe(P, LIMIT)
    expected = ref.cg_direction(p[idx], r[idx], beta, inv[idx])
    ops.cg_direction_(p, r, beta, inv)
    assert_close(p[idx], expected)


def test_lissa_update_past_2_31(large):
    """h, v, Hh [P] with P = 2³¹ + 1000."""
    _need(large, 27)
    P = LIMIT + 1000 if large else 1000
    h, v, Hh = (_normal(P, 37 + k) for k in range(3))
    idx = _probe(P, LIMIT)
    expected = ref.lissa_update(h[idx], v[idx], Hh[idx], 0.1, 2.0)
    ops.lissa_update_(h, v, Hh, 0.1, 2.0)
    assert_close(h[idx], expected)


def test_neumann_update_columns_past_2_31(large):
    """term, acc, Aterm [P, 3] with 3P = 2³¹ + 298: rows past 715827882 lie past 2³¹."""
    _need(large, 27)
    P, K = (LIMIT // 3 + 100, 3) if large else (1000, 3)
    term, acc, Aterm = (_normal((P, K), 40 + k) for k in range(3))
    rows = _probe(P, LIMIT // K)
    term_want, acc_want = ref.neumann_update(term[rows], acc[rows], Aterm[rows], 2.0)
    ops.neumann_update_(term, acc, Aterm, 2.0)
    assert_close(term[rows], term_want)
    assert_close(acc[rows], acc_want)
