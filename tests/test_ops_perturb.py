"""fisherext.ops.perturb (kernel family K2): compiled op == pure-PyTorch twin == independent computation, opcheck, and bad
input rejected with a clear error naming the op and the argument (wrapper, compiled op, fake kernel).

Sizes cross the kernels' boundaries: CPU work items of 32768 elements; CUDA chunks of 65536 elements,
76 tensors (101 for a plain copy) and 320 chunks per launch of the multi-tensor kernel (csrc/cuda/multi_tensor_apply.cuh);
one warp of 32 lanes per logit row.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp

import fisherext.reference as ref
from support import assert_close
from support.opcheck import LOW, OVERLAP_PATHS, bad_input_test, opcheck_test, randn, t, views_of
from fisherext import ops


def list_and_flats(shapes, dtype, device, seed=0):
    """(out, x, v): a list of the given shapes that starts as garbage the op must overwrite, and two flat
    vectors with as many elements as the list together."""
    out = [randn(s, dtype, device, seed + i) for i, s in enumerate(shapes)]
    total = sum(o.numel() for o in out)
    return out, randn((total,), dtype, device, seed + 1000), randn((total,), dtype, device, seed + 2000)


def pieces(flat, out):
    """The slices of a flat vector that belong to the tensors of out, shaped like them."""
    return [f.view(o.shape) for f, o in zip(flat.split([o.numel() for o in out]), out)]


# ---------------------------------------------------------------------------------------------------
# unflatten_axpy_

SIZES = [(1,), (7,), (3, 43), (65537,)]  # 65537 crosses a CUDA chunk and two CPU work items
LIST_CASES = {
    "one": [(1,)],
    "three": [(7,), (3, 43), (65537,)],
    "130": [SIZES[i % 4] for i in range(130)],  # more tensors than one CUDA launch holds (76 slots with v, 101 without)
}


@pytest.mark.parametrize("eps", [0.37, -1e-3])
@pytest.mark.parametrize("case", list(LIST_CASES))
def test_unflatten_axpy(case, eps, device, dtype):
    out, x, v = list_and_flats(LIST_CASES[case], dtype, device)
    x_before, v_before = x.clone(), v.clone()
    returned = ops.unflatten_axpy_(out, x, v, eps)
    assert returned is out
    for o, xi, vi in zip(out, pieces(x, out), pieces(v, out)):
        assert_close(o, (xi.double() + eps * vi.double()).to(dtype))
    for o, twin in zip(out, ref.unflatten_axpy(out, x, v, eps)):
        assert_close(o, twin)
    assert torch.equal(x, x_before) and torch.equal(v, v_before)


@pytest.mark.parametrize("case", list(LIST_CASES))
def test_unflatten_copy_is_bitwise(case, device, dtype):
    """Without v the op copies x into the list bit for bit, negative zeros and NaN payloads included
    (x + 0 * v would turn -0.0 into +0.0)."""
    out, x, _ = list_and_flats(LIST_CASES[case], dtype, device)
    x[: x.numel() // 2] = -0.0
    x[-1] = float("nan")
    ops.unflatten_axpy_(out, x, None, 0.0)
    got = torch.cat([o.reshape(-1) for o in out])
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    assert torch.equal(got.view(bits), x.view(bits))
    for o, twin in zip(out, ref.unflatten_axpy(out, x, None, 0.0)):
        assert torch.equal(o.view(bits), twin.view(bits))


def test_unflatten_axpy_pairs_elements_in_memory_order(device):
    """Tensor i takes the next numel(out[i]) entries of the flat vectors, in memory (row-major) order:
    the order of fisherext.flatten."""
    from fisherext import flatten

    out = [randn((4, 3), torch.float64, device, 1), randn((5,), torch.float64, device, 2)]
    x = flatten([randn((4, 3), torch.float64, device, 3), randn((5,), torch.float64, device, 4)])
    v = randn((17,), torch.float64, device, 5)
    ops.unflatten_axpy_(out, x, v, 2.0)
    assert_close(out[0], x[:12].view(4, 3) + 2.0 * v[:12].view(4, 3))
    assert_close(out[1], x[12:] + 2.0 * v[12:])


@pytest.mark.parametrize("low", LOW, ids=["f16", "bf16"])
def test_unflatten_axpy_low_precision_rounds_once(low, device):
    """Computed in float32 and rounded once: within half an ulp of the exact value (2^-p relative, p the
    significand bits), plus float32 rounding far below the smallest half-precision step."""
    out, x, v = list_and_flats(LIST_CASES["three"], low, device)
    ops.unflatten_axpy_(out, x, v, 1e-2)
    bits = {torch.float16: 11, torch.bfloat16: 8}[low]
    for o, xi, vi in zip(out, pieces(x, out), pieces(v, out)):
        assert o.dtype == low
        exact = xi.double() + 1e-2 * vi.double()
        torch.testing.assert_close(o.double(), exact, rtol=1.01 * 2.0**-bits, atol=2.0**-24)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("with_v", [True, False], ids=["axpy", "copy"])
def test_unflatten_axpy_cuda_metadata_boundaries(with_v):
    """75 one-element tensors, then one of 301 chunks that overflows the 320 chunks of a launch (its last
    56 chunks carry over to the next launch), then 60 more tensors: past the slot limits of both depths
    (76 slots with v, 101 without)."""
    chunk = 65536
    shapes = [(1,)] * 75 + [(300 * chunk + 3,)] + [(7,)] * 60
    out, x, v = list_and_flats(shapes, torch.float32, "cuda")
    ops.unflatten_axpy_(out, x, v if with_v else None, 0.125)
    for o, xi, vi in zip(out, pieces(x, out), pieces(v, out)):
        assert_close(o, xi + 0.125 * vi if with_v else xi)


def test_perturb_then_copy_restores_bitwise(device, dtype):
    """theta <- theta_saved ± eps v, then a copy back from the saved vector restores every bit; undoing
    the step by arithmetic (the seeds' +eps, -2 eps, +eps) would not."""
    from fisherext import flatten

    params, _, v = list_and_flats(LIST_CASES["130"], dtype, device)
    saved = flatten(params).clone()
    ops.unflatten_axpy_(params, saved, v, 1e-3)
    ops.unflatten_axpy_(params, saved, v, -1e-3)
    ops.unflatten_axpy_(params, saved, None, 0.0)
    assert torch.equal(flatten(params), saved)

    for step in (1e-3, -2e-3, 1e-3):
        ops.unflatten_axpy_(params, flatten(params), v, step)
    assert not torch.equal(flatten(params), saved), "arithmetic undo was expected to drift"


# ---------------------------------------------------------------------------------------------------
# fd_fisher_reduce


def kl(p_logits, q_logits):
    """KL(p || q) per row in float64, by torch.nn.functional.kl_div."""
    log_p = torch.log_softmax(p_logits.double(), -1)
    log_q = torch.log_softmax(q_logits.double(), -1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def fd_expected(lp, lm, l0, eps):
    """The three outputs in float64 from the defining formulas."""
    p_plus, p_minus = torch.softmax(lp.double(), -1), torch.softmax(lm.double(), -1)
    quad = ((p_plus.log() - p_minus.log()) * (p_plus - p_minus)).sum(-1) / (2 * eps) ** 2
    if l0 is None:
        return quad, kl(lm, lp), kl(lp, lm)
    return quad, kl(l0, lp), kl(l0, lm)


def logits(N, C, dtype, device, with_base, seed=0):
    """Three unrelated logit rows (scale 3): the op is exact for any logits, not just nearby ones."""
    lp, lm, l0 = (randn((N, C), dtype, device, seed + k, scale=3.0) for k in range(3))
    return lp, lm, (l0 if with_base else None)


@pytest.mark.parametrize("with_base", [False, True], ids=["no-base", "base"])
@pytest.mark.parametrize("C", [1, 2, 10, 1000, 1025])  # below, at and across multiples of the 32 lanes
@pytest.mark.parametrize("N", [1, 7, 1000])
def test_fd_fisher_reduce(N, C, with_base, device, dtype):
    lp, lm, l0 = logits(N, C, dtype, device, with_base)
    eps = 0.25
    got = ops.fd_fisher_reduce(lp, lm, l0, eps)
    expected = fd_expected(lp, lm, l0, eps)
    twin = ref.fd_fisher_reduce(lp, lm, l0, eps)
    for g, e, w in zip(got, expected, twin):
        assert g.shape == (N,) and g.dtype == dtype and g.device == lp.device
        assert_close(g, e.to(dtype))
        assert_close(w, e.to(dtype))
    if C == 1:
        assert all(torch.all(g == 0) for g in got), "one class: p = 1 everywhere, nothing moves"


def test_fd_fisher_reduce_noncontiguous_logits(device, dtype):
    lp, lm, l0 = logits(10, 7, dtype, device, True)
    got = ops.fd_fisher_reduce(lp.T.contiguous().T, lm[:, :], l0.T.contiguous().T, 0.1)
    for g, e in zip(got, fd_expected(lp, lm, l0, 0.1)):
        assert_close(g, e.to(dtype))


def test_fd_fisher_reduce_symmetric_kl_identity(device, dtype):
    """Without logits_0: KL(p- || p+) + KL(p+ || p-) = (2 eps)^2 quad exactly (the same sum)."""
    lp, lm, _ = logits(33, 17, dtype, device, False)
    quad, kl_plus, kl_minus = ops.fd_fisher_reduce(lp, lm, None, 0.05)
    assert_close(kl_plus + kl_minus, (2 * 0.05) ** 2 * quad)
    assert torch.all(kl_plus >= 0) and torch.all(kl_minus >= 0)


def test_fd_fisher_reduce_huge_logits_are_stable(device, dtype):
    """Max subtraction: logits around ±1e4 (exp overflows in any dtype) give the results of the same
    logits around 0, as softmax is invariant to a per-row shift. Logits on a 2^-8 grid, so that the
    shifted ones are exact in float32 too."""
    lp, lm, l0 = (torch.round(t * 256) / 256 for t in logits(6, 40, dtype, device, True))
    shift = 1e4 * torch.tensor([1.0, -1.0], dtype=dtype, device=device).repeat(3)[:, None]
    for base in (l0, None):
        shifted = ops.fd_fisher_reduce(lp + shift, lm + shift, None if base is None else base + shift, 0.1)
        for s, e in zip(shifted, ops.fd_fisher_reduce(lp, lm, base, 0.1)):
            assert torch.all(torch.isfinite(s))
            assert_close(s, e)


@pytest.mark.parametrize("low", LOW, ids=["f16", "bf16"])
def test_fd_fisher_reduce_low_precision(low, device):
    lp, lm, l0 = logits(64, 100, low, device, True)
    got = ops.fd_fisher_reduce(lp, lm, l0, 0.5)
    for g, e in zip(got, fd_expected(lp, lm, l0, 0.5)):
        assert g.dtype == torch.float32, "outputs stay in the compute dtype"
        assert_close(g, e, dtype=low)


def test_outputs_are_not_differentiable(device):
    """Both ops are for finite differences under no_grad: no output carries a grad_fn."""
    model = torch.nn.Linear(3, 4).to(device)
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    ops.unflatten_axpy_(params, flat, torch.ones_like(flat), 0.1)
    assert all(p.grad_fn is None and p.requires_grad for p in params)
    out = model(torch.randn(5, 3, device=device))
    assert out.requires_grad
    assert not any(o.requires_grad for o in ops.fd_fisher_reduce(out, out + 1.0, out, 0.1))


# ---- the estimate: v^T F_n v of a model from logits at theta ± eps v ----


def exact_quad(logits0, jv):
    """v^T F_n v = (J v)^T Lambda (J v), Lambda = diag(p) - p p^T, per sample."""
    p = torch.softmax(logits0, -1)
    return (p * jv**2).sum(-1) - (p * jv).sum(-1) ** 2


def fd_at(model, x, v, eps):
    """fd_fisher_reduce of model(x) at theta ± eps v (all parameter tensors at once, v one tensor per
    parameter), restoring theta."""
    params = list(model.parameters())
    saved = torch.cat([p.detach().reshape(-1) for p in params])
    flat_v = torch.cat([t.reshape(-1) for t in v])
    with torch.no_grad():
        try:
            ops.unflatten_axpy_(params, saved, flat_v, eps)
            plus = model(x)
            ops.unflatten_axpy_(params, saved, flat_v, -eps)
            minus = model(x)
        finally:
            ops.unflatten_axpy_(params, saved, None, 0.0)
        assert torch.equal(torch.cat([p.reshape(-1) for p in params]), saved)
        return ops.fd_fisher_reduce(plus, minus, model(x), eps)


def test_fd_quad_converges_at_second_order(device):
    """Linear model f(x) = W x + b: the error of quad against the exact v^T J^T Lambda J v shrinks 4x when
    eps halves (central difference, O(eps^2)); so do those of (KL+ + KL-)/eps^2 (odd orders cancel),
    while each KL alone, 2 KL/eps^2, converges at first order (2x)."""
    torch.manual_seed(0)
    N, D, C = 50, 6, 5
    model = torch.nn.Linear(D, C).to(torch.float64).to(device)
    x = torch.randn(N, D, dtype=torch.float64, device=device)
    v = [torch.randn_like(p) for p in model.parameters()]
    with torch.no_grad():
        exact = exact_quad(model(x), x @ v[0].T + v[1])

    def errors(eps):
        quad, kl_plus, kl_minus = fd_at(model, x, v, eps)
        return ((quad - exact).abs().sum(), ((kl_plus + kl_minus) / eps**2 - exact).abs().sum(),
                (2 * kl_plus / eps**2 - exact).abs().sum())

    coarse, fine = errors(2e-2), errors(1e-2)
    quad_ratio, sym_ratio, one_sided_ratio = (c / f for c, f in zip(coarse, fine))
    assert 3.6 < quad_ratio < 4.4
    assert 3.6 < sym_ratio < 4.4
    assert 1.7 < one_sided_ratio < 2.3
    assert fine[0] / exact.abs().sum() < 1e-3


def test_fd_quad_perturbs_all_tensors_at_once(device):
    """On an MLP, one joint perturbation gives the full v^T F_n v, cross-layer blocks included (exact by
    torch.func.jvp); perturbing one tensor at a time, as seed 001 does, sums only the diagonal blocks."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.to(torch.float64).to(device)
    x = torch.randn(20, 4, dtype=torch.float64, device=device)
    params = dict(model.named_parameters())
    v = [torch.randn_like(p) for p in params.values()]
    with torch.no_grad():
        logits0, jv = jvp(lambda *ps: functional_call(model, dict(zip(params, ps)), (x,)),
                          tuple(params.values()), tuple(v))
    exact = exact_quad(logits0, jv)
    quad, _, _ = fd_at(model, x, v, 1e-4)
    assert_close(quad, exact, dtype=torch.float32)  # O(eps^2) = 1e-8 relative truncation error

    one_at_a_time = sum(
        fd_at(model, x, [vi if j == i else torch.zeros_like(vi) for j, vi in enumerate(v)], 1e-4)[0]
        for i in range(len(v)))
    assert (one_at_a_time - exact).abs().max() > 1e-2 * exact.abs().max()


# ---------------------------------------------------------------------------------------------------
# opcheck, torch.compile, bad input


_f = torch.ops.fisherext


def _list(device):
    return list_and_flats([(3, 4), (5,), (65537,)], torch.float32, device)


def _logits(device):
    return logits(9, 37, torch.float32, device, True)


OPCHECK_CASES = {
    "unflatten_axpy_": lambda dev: (_f.unflatten_axpy_.default, (*_list(dev), 0.5)),
    "unflatten_axpy_-copy": lambda dev: (_f.unflatten_axpy_.default, (*_list(dev)[:2], None, 0.0)),
    "fd_fisher_reduce-base": lambda dev: (_f.fd_fisher_reduce.default, (*_logits(dev), 0.1)),
    "fd_fisher_reduce": lambda dev: (_f.fd_fisher_reduce.default, (*_logits(dev)[:2], None, 0.1)),
    "fd_fisher_reduce-f16": lambda dev: (_f.fd_fisher_reduce.default, (
        *(z.half() for z in _logits(dev)[:2]), None, 0.1)),
    # the autograd registration
    "fd_fisher_reduce-requires-grad": lambda dev: (_f.fd_fisher_reduce.default, (
        *(lambda lp, lm, l0: (lp.requires_grad_(), lm, l0))(*_logits(dev)), 0.1)),
}


test_opcheck = opcheck_test(OPCHECK_CASES)


def test_compile_sees_fakes():
    """torch.compile traces both ops through their fakes (the in-place list op functionalized)."""

    def step(params, saved, v, x):
        ops.unflatten_axpy_(params, saved, v, 1e-2)
        plus = x @ params[0]
        ops.unflatten_axpy_(params, saved, v, -1e-2)
        minus = x @ params[0]
        return ops.fd_fisher_reduce(plus, minus, None, 1e-2)

    saved = torch.randn(12, dtype=torch.float64)
    v = torch.randn(12, dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    p_eager, p_compiled = [saved.view(4, 3).clone()], [saved.view(4, 3).clone()]
    for a, b in zip(compiled(p_compiled, saved, v, x), step(p_eager, saved, v, x)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(p_compiled[0], p_eager[0])


def ts(*sizes, dtype=torch.float32):
    return [t(n, dtype=dtype) for n in sizes]


# (op name, args, exception type, substring the message must contain)
BAD = [
    ("unflatten_axpy_", lambda: ([], t(0), None, 1.0), ValueError, "'out' is an empty list"),
    ("unflatten_axpy_", lambda: (ts(3, 4), t(8), t(7), 1.0), ValueError, "'x' has 8 elements but the tensors of 'out' have 7"),
    ("unflatten_axpy_", lambda: (ts(3, 4), t(7), t(6), 1.0), ValueError, "'v' has 6 elements"),
    ("unflatten_axpy_", lambda: (ts(3, 4), t(7, 1), None, 1.0), ValueError, "'x' must be a contiguous 1-D tensor"),
    ("unflatten_axpy_", lambda: (ts(6), t(6), t(6, 1), 1.0), ValueError,
     "'v' must be a contiguous 1-D tensor"),
    ("unflatten_axpy_", lambda: (ts(3), t(3), t(3, dtype=torch.float64), 1.0), TypeError, "'v' has dtype"),
    ("unflatten_axpy_", lambda: ([t(3), t(2, dtype=torch.float64)], t(5), None, 1.0), TypeError,
     "'out\\[1\\]' has dtype"),
    ("unflatten_axpy_", lambda: ([torch.ones(3, dtype=torch.int64)], torch.ones(3, dtype=torch.int64), None, 1.0),
     TypeError, "'x' must be a floating-point tensor"),
    ("unflatten_axpy_", lambda: ([t(4, 3).T], t(12), None, 1.0), ValueError, "'out\\[0\\]' must be contiguous"),
    ("unflatten_axpy_", lambda: (ts(3), t(3), t(3), float("nan")), ValueError, "'eps' must be finite"),
    ("unflatten_axpy_", lambda: (ts(3), t(3), t(3), float("inf")), ValueError, "'eps' must be finite"),
    ("fd_fisher_reduce", lambda: (t(5, 3), t(5, 4), None, 0.1), ValueError, "'logits_minus' must have the shape"),
    ("fd_fisher_reduce", lambda: (t(5, 3), t(5, 3), t(4, 3), 0.1), ValueError, "'logits_0' must have the shape"),
    ("fd_fisher_reduce", lambda: (t(5), t(5), None, 0.1), ValueError, "'logits_plus' must have shape \\[N, C\\]"),
    ("fd_fisher_reduce", lambda: (t(2, 5, 3), t(2, 5, 3), None, 0.1), ValueError, "'logits_plus' must have shape"),
    ("fd_fisher_reduce", lambda: (t(0, 3), t(0, 3), None, 0.1), ValueError, "'logits_plus' is empty"),
    ("fd_fisher_reduce", lambda: (t(5, 0), t(5, 0), None, 0.1), ValueError, "'logits_plus' is empty"),
    ("fd_fisher_reduce", lambda: (torch.ones(5, 3, dtype=torch.int64), t(5, 3), None, 0.1), TypeError,
     "'logits_plus' must be a floating-point tensor"),
    ("fd_fisher_reduce", lambda: (t(5, 3), torch.ones(5, 3, dtype=torch.int32), None, 0.1), TypeError,
     "'logits_minus' must be a floating-point tensor"),
    ("fd_fisher_reduce", lambda: (t(5, 3), t(5, 3, dtype=torch.float64), None, 0.1), TypeError,
     "'logits_minus' has dtype"),
    ("fd_fisher_reduce", lambda: (t(5, 3), t(5, 3), t(5, 3, dtype=torch.float16), 0.1), TypeError,
     "'logits_0' has dtype"),
    ("fd_fisher_reduce", lambda: (t(5, 3), t(5, 3), None, 0.0), ValueError, "'eps' must be > 0"),
    ("fd_fisher_reduce", lambda: (t(5, 3), t(5, 3), None, -1e-3), ValueError, "'eps' must be > 0"),
    ("fd_fisher_reduce", lambda: (t(5, 3), t(5, 3), None, float("inf")), ValueError, "'eps' must be finite"),
]


test_bad_input_names_the_argument = bad_input_test(BAD)


# The tensors of out must not share memory with each other or with x and v (found after sorting the list by
# address, so overlapping tensors far apart in the list and out of address order are cases too).
OVERLAPPING = [
    ("unflatten_axpy_", views_of(lambda b: ([b[:4], b[2:6]], t(8), None, 0.0)), ValueError,
     "'out\\[0\\]' overlaps argument 'out\\[1\\]'"),
    ("unflatten_axpy_", views_of(lambda b: ([b[:3]] * 2, t(6), t(6), 1.0)), ValueError,
     "'out\\[0\\]' overlaps argument 'out\\[1\\]'"),
    ("unflatten_axpy_", views_of(lambda b: ([b[7:12], t(2), t(0), b[:8]], t(15), None, 0.0)), ValueError,
     "'out\\[0\\]' overlaps argument 'out\\[3\\]'"),
    ("unflatten_axpy_", views_of(lambda b: ([t(3), b[:4].view(2, 2)], b[3:10], None, 0.0)), ValueError,
     "'out\\[1\\]' overlaps argument 'x'"),
    ("unflatten_axpy_", views_of(lambda b: ([t(3), b[6:10]], b[:7], t(7), 1.0)), ValueError,
     "'out\\[1\\]' overlaps argument 'x'"),
    ("unflatten_axpy_", views_of(lambda b: ([t(2), b[:3]], t(5), b[2:7], 1.0)), ValueError,
     "'out\\[1\\]' overlaps argument 'v'"),
]


test_overlapping_arguments_are_refused = bad_input_test(OVERLAPPING, paths=OVERLAP_PATHS)


def test_unflatten_axpy_adjacent_and_shared_operands(device):
    """Tensors of out side by side in one buffer (parameters carved out of one allocation) are not an
    overlap, nor are x and v sharing memory (both are only read)."""
    buf = randn((12,), torch.float64, device, 0)
    out = [buf[:5], buf[5:].view(7, 1)]
    x = randn((12,), torch.float64, device, 1)
    ops.unflatten_axpy_(out, x, x, 0.5)
    assert torch.equal(buf, x * 1.5)


def test_device_mismatch_is_named():
    """Any meta tensor sends the call to the fake kernel, which names the tensor on the other device."""
    f = torch.ops.fisherext
    with pytest.raises(ValueError, match=r"'out\[1\]' is on meta but 'x' is on cpu"):
        f.unflatten_axpy_([t(3), t(2).to("meta")], t(5), None, 1.0)
    with pytest.raises(ValueError, match=r"'v' is on meta but 'x' is on cpu"):
        f.unflatten_axpy_(ts(3), t(3), t(3).to("meta"), 1.0)
    with pytest.raises(ValueError, match="'logits_0' is on meta"):
        f.fd_fisher_reduce(t(5, 3), t(5, 3), t(5, 3).to("meta"), 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cross_device_is_named():
    f = torch.ops.fisherext
    with pytest.raises(ValueError, match=r"'v' is on cpu but 'x' is on cuda"):
        f.unflatten_axpy_([t(3).cuda()], t(3).cuda(), t(3), 1.0)
    with pytest.raises(ValueError, match=r"'out\[1\]' is on cpu but 'x' is on cuda"):
        f.unflatten_axpy_([t(3).cuda(), t(2)], t(5).cuda(), None, 1.0)
    with pytest.raises(ValueError, match="'logits_minus' is on cpu"):
        f.fd_fisher_reduce(t(5, 3).cuda(), t(5, 3), None, 0.1)


def test_wrapper_rejects_non_lists_and_bad_scalars():
    with pytest.raises(TypeError, match="'out' must be a list of tensors"):
        ops.unflatten_axpy_(t(3), t(3), t(3), 1.0)
    with pytest.raises(TypeError, match=r"'out\[1\]' must be a torch.Tensor"):
        ops.unflatten_axpy_([t(3), [1.0, 2.0]], t(5), None, 1.0)
    with pytest.raises(TypeError, match="'v' must be a torch.Tensor"):
        ops.unflatten_axpy_(ts(3), t(3), [1.0, 2.0, 3.0], 1.0)
    with pytest.raises(TypeError, match="'eps' must be a real number"):
        ops.unflatten_axpy_(ts(3), t(3), t(3), "1e-3")
    with pytest.raises(TypeError, match="'logits_0' must be a torch.Tensor"):
        ops.fd_fisher_reduce(t(5, 3), t(5, 3), [[0.0]], 0.1)
    with pytest.raises(ValueError, match="'eps' must be finite"):
        ops.fd_fisher_reduce(t(5, 3), t(5, 3), None, math.nan)
