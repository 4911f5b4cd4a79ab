"""fisherext.ops.solver_updates (the fused solver steps, kernel family K3): compiled op == pure-PyTorch twin ==
independent computation, opcheck, and bad input rejected with a clear error naming the op and the argument
(wrapper, compiled op, fake kernel).

Sizes cross the kernels' boundaries: CPU work items of 32768 elements (P = 100003 spans several cg_update_
chunks); CUDA blocks of 256 threads, which cg_update_ lays over min(K, 256) columns times 256 // that many rows.
"""
import pytest
import torch

import fisherext.reference as ref
from support import assert_close
from support.opcheck import LOW, OVERLAP_PATHS, bad_input_test, opcheck_test, randn, t, views_of
from fisherext import ops

PS = [1, 7, 100003]  # 100003 spans several CPU chunks and CUDA blocks


def flat(P, K, dtype, device, seed):
    return randn((P,) if K is None else (P, K), dtype, device, seed)


def column_scalar(K, dtype, device, seed):
    """A per-column scalar in the compute dtype of `dtype`."""
    compute = torch.float32 if dtype in LOW else dtype
    return randn(() if K is None else (K,), compute, device, seed)


def cols(s, like):
    return s if like.dim() == 1 else s[None, :]


def rows(d, like):
    return d if like.dim() == 1 else d[:, None]


@pytest.mark.parametrize("precond", [False, True], ids=["plain", "precond"])
@pytest.mark.parametrize("K", [None, 1, 7], ids=["P", "K1", "K7"])
@pytest.mark.parametrize("P", PS)
def test_cg_update(P, K, precond, device, dtype):
    x, r, p, Ap = (flat(P, K, dtype, device, s) for s in range(4))
    alpha = column_scalar(K, dtype, device, 4)
    inv_diag = randn((P,), dtype, device, 5).abs() + 0.5 if precond else None
    x0, r0 = x.clone(), r.clone()
    rz, rr = ops.cg_update_(x, r, p, Ap, alpha, inv_diag)
    # Independent: float64 from the definitions.
    a = cols(alpha.double(), x)
    assert_close(x, (x0.double() + a * p.double()).to(dtype))
    assert_close(r, (r0.double() - a * Ap.double()).to(dtype))
    r64 = r.double()
    w = torch.ones(P, dtype=torch.float64, device=device) if inv_diag is None else inv_diag.double()
    assert rz.shape == alpha.shape and rr.shape == alpha.shape and rz.dtype == alpha.dtype
    assert_close(rr, (r64**2).sum(0).to(dtype))
    assert_close(rz, (r64**2 * rows(w, r64)).sum(0).to(dtype))
    if inv_diag is None:
        assert torch.equal(rz, rr)
    twin = ref.cg_update(x0, r0, p, Ap, alpha, inv_diag)
    for got, want in zip((x, r, rz, rr), twin):
        assert_close(got, want)


# (P, K) around cg_update_'s CUDA block shapes: 3 columns x 85 rows (255 of 256 threads), one block row of
# 256 columns, 300 columns over two column tiles (the second ragged), 257 columns with fewer rows than blocks.
@pytest.mark.parametrize("P,K", [(1000, 3), (999, 256), (700, 300), (5, 257)])
def test_cg_update_column_tiles(P, K, device, dtype):
    x, r, p, Ap = (flat(P, K, dtype, device, s) for s in range(4))
    alpha = column_scalar(K, dtype, device, 4)
    inv_diag = randn((P,), dtype, device, 5).abs() + 0.5
    twin = ref.cg_update(x.clone(), r.clone(), p, Ap, alpha, inv_diag)
    rz, rr = ops.cg_update_(x, r, p, Ap, alpha, inv_diag)
    for got, want in zip((x, r, rz, rr), twin):
        assert_close(got, want)


@pytest.mark.parametrize("low", LOW, ids=["f16", "bf16"])
def test_cg_update_low_precision(low, device):
    x, r, p, Ap = (flat(1000, 3, low, device, s) for s in range(4))
    alpha = column_scalar(3, low, device, 4)
    x0, r0 = x.clone(), r.clone()
    rz, rr = ops.cg_update_(x, r, p, Ap, alpha)
    assert rz.dtype == torch.float32
    for got, want in zip((x, r, rz, rr), ref.cg_update(x0, r0, p, Ap, alpha)):
        assert_close(got, want, dtype=low)


def test_cg_update_reduction_independent_of_threads():
    """Fixed chunks combined in a fixed order: the same bits with 1 thread and with several."""
    x, r, p, Ap = (flat(300001, 2, torch.float32, "cpu", s) for s in range(4))
    alpha = column_scalar(2, torch.float32, "cpu", 4)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            xs, rs = x.clone(), r.clone()
            results.append((*ops.cg_update_(xs, rs, p, Ap, alpha), xs, rs))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def strided_like(t, layout):
    """t's values in a non-contiguous layout: every other element of a larger tensor, or (t constant) an
    expanded 0-dim tensor, whose K entries share one memory location."""
    if layout == "every_other":
        return torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0]
    assert torch.all(t == t.reshape(-1)[0])
    return t.reshape(-1)[0].clone().expand(t.shape)


@pytest.mark.parametrize("layout", ["every_other", "expanded"])
def test_solver_scalars_of_any_layout(layout, device, dtype):
    """alpha, beta and inv_diag are read at their strides (made contiguous, not misread as contiguous):
    the same bits as contiguous ones (their neighbours in the every-other layout are NaN, so a misread
    shows)."""
    P, K = 37, 5
    x, r, p, Ap = (flat(P, K, dtype, device, s) for s in range(4))
    const = layout == "expanded"
    alpha = torch.full((K,), 0.375, dtype=dtype, device=device) if const else column_scalar(K, dtype, device, 4)
    inv = torch.full((P,), 1.5, dtype=dtype, device=device) if const else randn((P,), dtype, device, 5).abs()
    strided_alpha, strided_inv = strided_like(alpha, layout), strided_like(inv, layout)
    assert not strided_alpha.is_contiguous() and not strided_inv.is_contiguous()
    results = []
    for a, d in ((alpha, inv), (strided_alpha, strided_inv)):
        xs, rs, ps = x.clone(), r.clone(), p.clone()
        rz, rr = ops.cg_update_(xs, rs, p, Ap, a, d)
        ops.cg_direction_(ps, rs, a, d)
        results.append((xs, rs, rz, rr, ps))
    for got, want in zip(*results):
        assert torch.equal(got, want)
    assert_close(results[1][0], (x.double() + alpha.double() * p.double()).to(dtype))


# Before the fix the kernels read an expanded alpha/beta of one element as K contiguous ones: with
# K = 2^22 that runs 16 MB past its storage and crashed the interpreter, hence a subprocess.
_EXPANDED_SCALAR_SCRIPT = """
import torch
from fisherext import ops
K, device = 2**22, "{device}"
x, r, p, Ap = (torch.randn(1, K, device=device) for _ in range(4))
x0, r0, p0 = x.clone(), r.clone(), p.clone()
half = torch.tensor(0.5, device=device).expand(K)
rz, rr = ops.cg_update_(x, r, p, Ap, half)
assert torch.equal(x, x0 + 0.5 * p) and torch.equal(r, r0 - 0.5 * Ap), "cg_update_ misread alpha"
assert torch.equal(rr, r.square()[0]) and torch.equal(rz, rr), "cg_update_ misreduced"
ops.cg_direction_(p, r, half)
assert torch.equal(p, r + 0.5 * p0), "cg_direction_ misread beta"
print("ok")
"""


@pytest.mark.slow
def test_expanded_scalar_over_many_columns(device):
    import os
    import subprocess
    import sys

    import fisherext

    # The child imports the fisherext under test, wherever it was imported from here.
    root = os.path.dirname(os.path.dirname(fisherext.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", _EXPANDED_SCALAR_SCRIPT.format(device=device)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stdout, run.stderr[-2000:])


@pytest.mark.parametrize("precond", [False, True], ids=["plain", "precond"])
@pytest.mark.parametrize("K", [None, 1, 7], ids=["P", "K1", "K7"])
@pytest.mark.parametrize("P", PS)
def test_cg_direction(P, K, precond, device, dtype):
    p, r = flat(P, K, dtype, device, 0), flat(P, K, dtype, device, 1)
    beta = column_scalar(K, dtype, device, 2)
    inv_diag = randn((P,), dtype, device, 3).abs() + 0.5 if precond else None
    p0 = p.clone()
    assert ops.cg_direction_(p, r, beta, inv_diag) is p
    z = r.double() if inv_diag is None else r.double() * rows(inv_diag.double(), r)
    assert_close(p, (z + cols(beta.double(), p) * p0.double()).to(dtype))
    assert_close(p, ref.cg_direction(p0, r, beta, inv_diag))


@pytest.mark.parametrize("K", [None, 7], ids=["P", "K7"])
@pytest.mark.parametrize("P", PS)
def test_lissa_update(P, K, device, dtype):
    h, v, Hh = (flat(P, K, dtype, device, s) for s in range(3))
    h0 = h.clone()
    assert ops.lissa_update_(h, v, Hh, 0.01, 7.5) is h
    assert_close(h, (v.double() + 0.99 * h0.double() - Hh.double() / 7.5).to(dtype))
    assert_close(h, ref.lissa_update(h0, v, Hh, 0.01, 7.5))


@pytest.mark.parametrize("K", [None, 7], ids=["P", "K7"])
@pytest.mark.parametrize("P", PS)
def test_neumann_update(P, K, device, dtype):
    term, acc, Aterm = (flat(P, K, dtype, device, s) for s in range(3))
    term0, acc0 = term.clone(), acc.clone()
    assert ops.neumann_update_(term, acc, Aterm, 3.0) == (term, acc)
    new_term = term0.double() - Aterm.double() / 3.0
    assert_close(term, new_term.to(dtype))
    assert_close(acc, (acc0.double() + new_term).to(dtype))
    for got, want in zip((term, acc), ref.neumann_update(term0, acc0, Aterm, 3.0)):
        assert_close(got, want)


@pytest.mark.parametrize("low", LOW, ids=["f16", "bf16"])
def test_elementwise_updates_low_precision(low, device):
    a, b, c = (flat(1001, 2, low, device, s) for s in range(3))
    beta = column_scalar(2, low, device, 3)
    h, p, term, acc = a.clone(), a.clone(), a.clone(), b.clone()
    ops.lissa_update_(h, b, c, 0.1, 2.0)
    ops.cg_direction_(p, b, beta)
    ops.neumann_update_(term, acc, c, 2.0)
    assert_close(h, ref.lissa_update(a, b, c, 0.1, 2.0), dtype=low)
    assert_close(p, ref.cg_direction(a, b, beta), dtype=low)
    for got, want in zip((term, acc), ref.neumann_update(a, b, c, 2.0)):
        assert_close(got, want, dtype=low)


# ---------------------------------------------------------------------------------------------------
# opcheck, torch.compile, bad input

_f = torch.ops.fisherext


def _vecs(device, K=4):
    return [flat(33, K, torch.float32, device, s) for s in range(4)]


def _inv(device):
    return randn((33,), torch.float32, device, 7).abs()


OPCHECK_CASES = {
    "cg_update_-columns-precond": lambda dev: (_f.cg_update_.default, (
        *_vecs(dev), column_scalar(4, torch.float32, dev, 5), _inv(dev))),
    "cg_update_": lambda dev: (_f.cg_update_.default, (
        *_vecs(dev, None), column_scalar(None, torch.float32, dev, 6), None)),
    "cg_direction_-columns-precond": lambda dev: (_f.cg_direction_.default, (
        *_vecs(dev)[:2], column_scalar(4, torch.float32, dev, 5), _inv(dev))),
    "cg_direction_": lambda dev: (_f.cg_direction_.default, (
        *_vecs(dev, None)[:2], column_scalar(None, torch.float32, dev, 6), None)),
    "lissa_update_": lambda dev: (_f.lissa_update_.default, (*_vecs(dev)[:3], 0.1, 5.0)),
    "neumann_update_": lambda dev: (_f.neumann_update_.default, (*_vecs(dev)[:3], 5.0)),
}


test_opcheck = opcheck_test(OPCHECK_CASES)


def test_compile_sees_fakes(device):
    """torch.compile traces a CG step through the fakes (the in-place updates functionalized)."""

    def step(x, r, p, Ap, alpha):
        rz, rr = ops.cg_update_(x, r, p, Ap, alpha)
        ops.cg_direction_(p, r, rz / rr)
        return rz

    vecs = [randn((9, 2), torch.float64, device, s) for s in range(4)]
    alpha = torch.rand(2, dtype=torch.float64, device=device)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager_vecs, compiled_vecs = [v.clone() for v in vecs], [v.clone() for v in vecs]
    torch.testing.assert_close(compiled(*compiled_vecs, alpha), step(*eager_vecs, alpha))
    for a, b in zip(compiled_vecs, eager_vecs):
        torch.testing.assert_close(a, b)


def i64(*shape):
    return torch.ones(*shape, dtype=torch.int64)


F64 = torch.float64
# (op name, args, exception type, substring the message must contain)
BAD = [
    ("cg_update_", lambda: (t(4, 2, 2), t(4, 2, 2), t(4, 2, 2), t(4, 2, 2), t(2)), ValueError,
     "'x' must have shape \\[P\\] or \\[P, K\\]"),
    ("cg_update_", lambda: (t(0), t(0), t(0), t(0), t(())), ValueError, "'x' is empty"),
    ("cg_update_", lambda: (t(3, 4).T, t(4, 3), t(4, 3), t(4, 3), t(3)), ValueError, "'x' must be contiguous"),
    ("cg_update_", lambda: (t(4, 3), t(4, 3), t(3, 4).T, t(4, 3), t(3)), ValueError, "'p' must be contiguous"),
    ("cg_update_", lambda: (t(4, 3), t(4, 2), t(4, 3), t(4, 3), t(3)), ValueError, "'r' must have the shape"),
    ("cg_update_", lambda: (t(4, 3), t(4, 3), t(4, 3), t(4), t(3)), ValueError, "'Ap' must have the shape"),
    ("cg_update_", lambda: (t(4, 3), t(4, 3), t(4, 3, dtype=F64), t(4, 3), t(3)), TypeError, "'p' has dtype"),
    ("cg_update_", lambda: (i64(4), t(4), t(4), t(4), t(())), TypeError, "'x' must be a floating-point tensor"),
    ("cg_update_", lambda: (t(4, 3), t(4, 3), t(4, 3), t(4, 3), t(())), ValueError,
     "'alpha' must have shape \\[3\\] \\(one per column\\)"),
    ("cg_update_", lambda: (t(4, 3), t(4, 3), t(4, 3), t(4, 3), t(4)), ValueError, "'alpha' must have shape \\[3\\]"),
    ("cg_update_", lambda: (t(4), t(4), t(4), t(4), t(1)), ValueError, "'alpha' must have shape \\[\\]"),
    ("cg_update_", lambda: (t(4), t(4), t(4), t(4), t((), dtype=F64)), TypeError, "'alpha' must have dtype"),
    ("cg_update_", lambda: (t(4, dtype=torch.half), t(4, dtype=torch.half), t(4, dtype=torch.half),
                            t(4, dtype=torch.half), t((), dtype=torch.half)), TypeError, "'alpha' must have dtype"),
    ("cg_update_", lambda: (t(4), t(4), t(4), t(4), t(()), t(5)), ValueError, "'inv_diag' must have shape \\[4\\]"),
    ("cg_update_", lambda: (t(4, 2), t(4, 2), t(4, 2), t(4, 2), t(2), t(4, 2)), ValueError,
     "'inv_diag' must have shape \\[4\\]"),
    ("cg_update_", lambda: (t(4), t(4), t(4), t(4), t(()), t(4, dtype=F64)), TypeError, "'inv_diag' has dtype"),
    ("cg_direction_", lambda: (t(4, 3), t(4, 2), t(3)), ValueError, "'r' must have the shape"),
    ("cg_direction_", lambda: (t(4, 3), t(4, 3), t(2)), ValueError, "'beta' must have shape \\[3\\]"),
    ("cg_direction_", lambda: (t(4), t(4), t(1)), ValueError, "'beta' must have shape \\[\\]"),
    ("cg_direction_", lambda: (t(4), t(4), i64(())), TypeError, "'beta' must be a floating-point tensor"),
    ("cg_direction_", lambda: (t(4), t(4), t(()), t(3)), ValueError, "'inv_diag' must have shape \\[4\\]"),
    ("cg_direction_", lambda: (t(3, 4).T, t(4, 3), t(3)), ValueError, "'p' must be contiguous"),
    ("lissa_update_", lambda: (t(4), t(5), t(4), 0.0, 1.0), ValueError, "'v' must have the shape"),
    ("lissa_update_", lambda: (t(4), t(4), t(4, dtype=F64), 0.0, 1.0), TypeError, "'Hh' has dtype"),
    ("lissa_update_", lambda: (t(4), t(4), t(4), -0.1, 1.0), ValueError, "'damping' must be in \\[0, 1\\)"),
    ("lissa_update_", lambda: (t(4), t(4), t(4), 1.0, 1.0), ValueError, "'damping' must be in \\[0, 1\\)"),
    ("lissa_update_", lambda: (t(4), t(4), t(4), float("nan"), 1.0), ValueError, "'damping' must be finite"),
    ("lissa_update_", lambda: (t(4), t(4), t(4), 0.0, 0.0), ValueError, "'scale' must be > 0"),
    ("lissa_update_", lambda: (t(4), t(4), t(4), 0.0, -2.0), ValueError, "'scale' must be > 0"),
    ("lissa_update_", lambda: (t(4), t(4), t(4), 0.0, float("inf")), ValueError, "'scale' must be finite"),
    ("neumann_update_", lambda: (t(4), t(4, 1), t(4), 1.0), ValueError, "'acc' must have the shape"),
    ("neumann_update_", lambda: (t(4), t(4), t(5), 1.0), ValueError, "'Aterm' must have the shape"),
    ("neumann_update_", lambda: (t(4), t(4), t(4), 0.0), ValueError, "'scale' must be > 0"),
    ("neumann_update_", lambda: (t(4), t(4), t(4), float("inf")), ValueError, "'scale' must be finite"),
    ("neumann_update_", lambda: (t(4, 3).T, t(3, 4), t(3, 4), 1.0), ValueError, "'term' must be contiguous"),
]


test_bad_input_names_the_argument = bad_input_test(BAD)


# In-place ops refuse a written vector that shares memory with another argument: exactly (the same tensor)
# or in part (views of one buffer that overlap by a few elements).
OVERLAPPING = [
    ("cg_update_", views_of(lambda b: (b[:4], b[:4], t(4), t(4), t(()))), ValueError, "'x' overlaps argument 'r'"),
    ("cg_update_", views_of(lambda b: (t(6), b[:6], b[4:10], t(6), t(()))), ValueError, "'r' overlaps argument 'p'"),
    ("cg_update_", views_of(lambda b: (b[:6], t(6), t(6), b[5:11], t(()))), ValueError, "'x' overlaps argument 'Ap'"),
    ("cg_update_", views_of(lambda b: (b[:4].view(2, 2), t(2, 2), t(2, 2), t(2, 2), b[2:4])), ValueError,
     "'x' overlaps argument 'alpha'"),
    ("cg_update_", views_of(lambda b: (t(4), b[:4], t(4), t(4), t(()), b[:4])), ValueError,
     "'r' overlaps argument 'inv_diag'"),
    ("cg_direction_", views_of(lambda b: (b[:5], b[:5], t(()))), ValueError, "'p' overlaps argument 'r'"),
    ("cg_direction_", views_of(lambda b: (b[:5], t(5), b[4])), ValueError, "'p' overlaps argument 'beta'"),
    ("cg_direction_", views_of(lambda b: (b[:5], t(5), t(()), b[3:8])), ValueError, "'p' overlaps argument 'inv_diag'"),
    ("lissa_update_", views_of(lambda b: (b[:4], b[:4], t(4), 0.0, 1.0)), ValueError, "'h' overlaps argument 'v'"),
    ("lissa_update_", views_of(lambda b: (b[2:6], t(4), b[:4], 0.0, 1.0)), ValueError, "'h' overlaps argument 'Hh'"),
    ("neumann_update_", views_of(lambda b: (b[:4], b[1:5], t(4), 1.0)), ValueError, "'term' overlaps argument 'acc'"),
    ("neumann_update_", views_of(lambda b: (t(4), b[:4], b[:4], 1.0)), ValueError, "'acc' overlaps argument 'Aterm'"),
    ("neumann_update_", views_of(lambda b: (b[:6].view(3, 2), t(3, 2), b[:6].view(3, 2), 1.0)), ValueError,
     "'term' overlaps argument 'Aterm'"),
]


test_overlapping_arguments_are_refused = bad_input_test(OVERLAPPING, paths=OVERLAP_PATHS)


def test_adjacent_views_of_one_buffer_do_not_overlap():
    """Vectors side by side in one buffer (the last element of one just before the first of the next) are
    not an overlap: the solvers' vectors may be carved out of one allocation."""
    buf = torch.randn(4 * 7, dtype=torch.float64)
    x, r, p, Ap = buf.view(4, 7)
    x0, r0 = x.clone(), r.clone()
    alpha = torch.tensor(0.25, dtype=torch.float64)
    ops.cg_update_(x, r, p, Ap, alpha)
    assert torch.equal(x, x0 + 0.25 * p) and torch.equal(r, r0 - 0.25 * Ap)
    h, v, Hh = buf[:21].view(3, 7)
    h0 = h.clone()
    ops.lissa_update_(h, v, Hh, 0.5, 2.0)
    assert_close(h, v + 0.5 * h0 - Hh / 2.0)


def test_device_mismatch_is_named():
    """Any meta tensor sends the call to the fake kernel, which names the tensor on the other device."""
    f = torch.ops.fisherext
    with pytest.raises(ValueError, match="'Ap' is on meta but 'x' is on cpu"):
        f.cg_update_(t(4), t(4), t(4), t(4).to("meta"), t(()))
    with pytest.raises(ValueError, match="'alpha' is on meta but 'x' is on cpu"):
        f.cg_update_(t(4), t(4), t(4), t(4), t(()).to("meta"))
    with pytest.raises(ValueError, match="'beta' is on meta but 'p' is on cpu"):
        f.cg_direction_(t(4), t(4), t(()).to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cross_device_is_named():
    f = torch.ops.fisherext
    with pytest.raises(ValueError, match="'alpha' is on cpu but 'x' is on cuda"):
        f.cg_update_(*(t(4).cuda() for _ in range(4)), t(()))
    with pytest.raises(ValueError, match="'inv_diag' is on cpu but 'p' is on cuda"):
        f.cg_direction_(t(4).cuda(), t(4).cuda(), t(()).cuda(), t(4))
    with pytest.raises(ValueError, match="'Hh' is on cpu but 'h' is on cuda"):
        f.lissa_update_(t(4).cuda(), t(4).cuda(), t(4), 0.0, 1.0)


def test_wrapper_rejects_non_tensors_and_bad_scalars():
    with pytest.raises(TypeError, match="'inv_diag' must be a torch.Tensor"):
        ops.cg_update_(t(4), t(4), t(4), t(4), t(()), [1.0] * 4)
    with pytest.raises(TypeError, match="'alpha' must be a torch.Tensor"):
        ops.cg_update_(t(4), t(4), t(4), t(4), 0.5)
    with pytest.raises(TypeError, match="'scale' must be a real number"):
        ops.lissa_update_(t(4), t(4), t(4), 0.0, "10")
    with pytest.raises(ValueError, match="'scale' must be finite"):
        ops.neumann_update_(t(4), t(4), t(4), float("nan"))
