"""fisherext._ops: opcheck of every op (schema, fake, dispatch), and bad input rejected with a clear
error naming the argument, by the Python wrapper, the compiled kernel and the fake kernel alike."""
import pytest
import torch

from support.opcheck import OVERLAP_PATHS, bad_input_test, views_of
from fisherext import ops

F = torch.float32


def t(*shape, dtype=F, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def opcheck_cases(device):
    a3, d3 = t(5, 3, 4, device=device), t(5, 3, 6, device=device)
    a2, d2 = t(5, 4, device=device), t(5, 6, device=device)
    w = t(5, device=device).abs()
    sym = lambda D: (lambda m: m + m.T)(t(D, D, device=device))  # noqa: E731
    f = torch.ops.fisherext
    return [
        (f.linear_sq_grad.default, (a3, d3, w)),
        (f.linear_sq_grad.default, (a2, d2, None)),
        (f.linear_outer_accum_.default, (sym(24), a3, d3, w, 0.5)),
        (f.linear_outer_accum_.default, (sym(24), a2, d2, None, 1.0)),
        (f.sym_outer_accum_.default, (sym(4), a3, w, 1.0, 0.5)),
        (f.sym_outer_accum_.default, (sym(6), d2, None, 2.0, 1.0)),
        (f.class_gram.default, (a3, t(5, 2, 3, 6, device=device))),
        (f.class_gram.default, (a2, t(5, 2, 6, device=device))),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case, device):
    op, args = opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


def test_compile_sees_fakes():
    """torch.compile traces through the fake kernels and gives the eager result."""
    a, d, w = t(8, 3, 5), t(8, 3, 4), t(8).abs()
    compiled = torch.compile(lambda a, d, w: ops.linear_sq_grad(a, d, w) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(a, d, w), ops.linear_sq_grad(a, d, w) * 2)


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


def _sym(D):
    m = t(D, D)
    return m + m.T


def _aliased(make):
    return views_of(make, buffer=lambda: _sym(6))


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
        torch.ops.fisherext.linear_sq_grad(t(5, 4, device="cuda"), t(5, 6))
