"""fisherext.ops.softmax (the softmax cross-entropy Hessian, kernel family K3): compiled op == pure-PyTorch
twin == independent computation, autograd of softmax_hvp, opcheck, and bad input rejected with a clear error
naming the op and the argument (wrapper, compiled op, fake kernel).

Sizes cross the kernels' boundaries: one CUDA warp of 32 lanes per logit row.
"""
import pytest
import torch
import torch.nn.functional as F

import fisherext.reference as ref
from support import assert_close
from support.opcheck import LOW, bad_input_test, opcheck_test, randn, t
from fisherext import ops


def ce_hessian_products(logits, u):
    """H_n u_n for every row by double backprop through F.cross_entropy (float64): the Hessian of the
    summed per-sample losses w.r.t. the logits is block diagonal, and the label does not matter."""
    z = logits.detach().double().requires_grad_()
    y = torch.arange(z.shape[0], device=z.device) % z.shape[1]
    (g,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), z, create_graph=True)
    dirs = u.double().reshape(-1, *z.shape)
    return torch.stack([torch.autograd.grad(g, z, d, retain_graph=True)[0] for d in dirs]).reshape(u.shape)


def hvp_scale(logits, u):
    """max |p_c u_c|: the size of the terms of p ⊙ u − p (pᵀu). Where p is nearly one-hot the output
    cancels far below them (u_c − pᵀu ≈ 0 for the dominant class), so any rounding of u or pᵀu shows at
    this scale, not at the output's."""
    return (torch.softmax(logits.double(), -1) * u.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------------
# softmax_hvp

SHAPES = [(1, 1), (1, 3), (7, 3), (5, 1000), (33, 65)]  # C across multiples of the 32 lanes


@pytest.mark.parametrize("K", [None, 1, 7], ids=["NC", "K1", "K7"])
@pytest.mark.parametrize("N,C", SHAPES)
def test_softmax_hvp(N, C, K, device, dtype):
    logits = randn((N, C), dtype, device, 0, scale=3.0)
    u = randn((N, C) if K is None else (K, N, C), dtype, device, 1)
    got = ops.softmax_hvp(logits, u)
    assert got.shape == u.shape and got.dtype == dtype and got.device == u.device
    expected = ce_hessian_products(logits, u)
    scale = hvp_scale(logits, u)
    assert_close(got, expected.to(dtype), scale=scale)
    assert_close(ref.softmax_hvp(logits, u), expected.to(dtype), scale=scale)
    if C == 1:
        assert torch.all(got == 0), "one class: p = 1, the Hessian is 0"
    # Rows of H sum to 0 (H 1 = p - p = 0), so every output row sums to 0 too (Σ_c p_c (u_c - s) = 0).
    zeros = torch.zeros(got.shape[:-1], dtype=torch.float64, device=device)
    assert_close(got.double().sum(-1), zeros, dtype=dtype, scale=C * scale)


def test_softmax_hvp_noncontiguous(device, dtype):
    logits = randn((9, 6), dtype, device, 2)
    u = randn((6, 9, 4), dtype, device, 3).permute(2, 1, 0)  # [4, 9, 6], not contiguous
    got = ops.softmax_hvp(logits.T.contiguous().T, u)
    assert_close(got, ce_hessian_products(logits, u).to(dtype), scale=hvp_scale(logits, u))


def test_softmax_hvp_huge_logits_are_stable(device, dtype):
    """Max subtraction: logits around ±1e4 (exp overflows in any dtype) give the result of the same logits
    around 0 (softmax is shift invariant). Logits on a 2^-8 grid, so the shifted ones are exact in float32."""
    logits = torch.round(randn((6, 40), dtype, device, 4) * 256) / 256
    shift = 1e4 * torch.tensor([1.0, -1.0], dtype=dtype, device=device).repeat(3)[:, None]
    u = randn((3, 6, 40), dtype, device, 5)
    got = ops.softmax_hvp(logits + shift, u)
    assert torch.all(torch.isfinite(got))
    assert_close(got, ops.softmax_hvp(logits, u))


@pytest.mark.parametrize("low", LOW, ids=["f16", "bf16"])
def test_softmax_hvp_low_precision(low, device):
    """Computed in float32, rounded once to u's dtype."""
    logits, u = randn((64, 100), low, device, 6), randn((3, 64, 100), low, device, 7)
    got = ops.softmax_hvp(logits, u)
    assert got.dtype == low
    expected, scale = ce_hessian_products(logits, u), hvp_scale(logits, u)
    assert_close(got, expected, dtype=low, scale=scale)
    assert_close(ref.softmax_hvp(logits, u), expected, dtype=low, scale=scale)


@pytest.mark.parametrize("K", [None, 3], ids=["NC", "K3"])
def test_softmax_hvp_gradcheck(K, device):
    """Both derivatives by finite differences (gradcheck) and against autograd through the twin's explicit
    Hessian matrices; second derivatives by gradgradcheck."""
    logits = randn((4, 5), torch.float64, device, 8, scale=2.0).requires_grad_()
    u = randn((4, 5) if K is None else (K, 4, 5), torch.float64, device, 9).requires_grad_()
    assert torch.autograd.gradcheck(ops.softmax_hvp, (logits, u))
    assert torch.autograd.gradgradcheck(ops.softmax_hvp, (logits, u))
    g = randn(u.shape, torch.float64, device, 10)
    got = torch.autograd.grad(ops.softmax_hvp(logits, u), (logits, u), g)
    twin = torch.autograd.grad(ref.softmax_hvp(logits, u), (logits, u), g)
    for a, b in zip(got, twin):
        assert_close(a, b)
    assert_close(got[1], ops.softmax_hvp(logits, g)), "d/du is H g: H is symmetric"


@pytest.mark.parametrize("wrt", ["logits", "u"])
def test_softmax_hvp_gradient_of_one_input_only(wrt, device):
    """The backward computes only the gradient asked for, and computes it right."""
    logits, u = randn((3, 4), torch.float64, device, 11), randn((2, 3, 4), torch.float64, device, 12)
    g = randn((2, 3, 4), torch.float64, device, 13)
    inputs = {"logits": logits, "u": u}
    inputs[wrt].requires_grad_()
    (got,) = torch.autograd.grad(ops.softmax_hvp(**inputs), inputs[wrt], g)
    (twin,) = torch.autograd.grad(ref.softmax_hvp(**inputs), inputs[wrt], g)
    assert_close(got, twin)


# ---------------------------------------------------------------------------------------------------
# softmax_hessian_sqrt


@pytest.mark.parametrize("N,C", [(1, 1), (1, 3), (7, 3), (2, 1000), (33, 65)])
def test_softmax_hessian_sqrt(N, C, device, dtype):
    logits = randn((N, C), dtype, device, 13, scale=3.0)
    S = ops.softmax_hessian_sqrt(logits)
    assert S.shape == (C, N, C) and S.dtype == dtype and S.device == logits.device
    assert_close(S, ref.softmax_hessian_sqrt(logits))
    p = torch.softmax(logits.double(), -1)
    k = torch.arange(C, device=device)
    assert_close(S.double()[k, :, k].T, (p * (1 - p)) / p.sqrt(), dtype=dtype)  # diagonal √p_k (1 − p_k)
    if C <= 65:  # the factorization Σ_k S_k S_kᵀ = diag(p) − p pᵀ (C = 1000 would take N·C³ flops)
        Lam = torch.einsum("knc,knd->ncd", S.double(), S.double())
        assert_close(Lam, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], dtype=dtype)


def test_softmax_hessian_sqrt_backprops_the_hessian(device, dtype):
    """S[k]ᵀ u summed as (Σ_k S_k S_kᵀ) u equals softmax_hvp: the two ops describe the same H."""
    logits, u = randn((10, 7), dtype, device, 14), randn((10, 7), dtype, device, 15)
    S = ops.softmax_hessian_sqrt(logits)
    via_sqrt = torch.einsum("knc,knd,nd->nc", S, S, u)
    assert_close(via_sqrt, ops.softmax_hvp(logits, u))


@pytest.mark.parametrize("low", LOW, ids=["f16", "bf16"])
def test_softmax_hessian_sqrt_low_precision(low, device):
    logits = randn((16, 11), low, device, 16)
    S = ops.softmax_hessian_sqrt(logits)
    assert S.dtype == low
    assert_close(S, ref.softmax_hessian_sqrt(logits.double()), dtype=low)


def test_softmax_hessian_sqrt_is_not_differentiable(device):
    logits = randn((3, 4), torch.float32, device, 17).requires_grad_()
    assert not ops.softmax_hessian_sqrt(logits).requires_grad


# ---------------------------------------------------------------------------------------------------
# opcheck, torch.compile, bad input

_f = torch.ops.fisherext


def _z(device):
    return randn((9, 37), torch.float32, device, 0)


def _u(device, *K):
    return randn((*K, 9, 37), torch.float32, device, 1 + len(K))


OPCHECK_CASES = {
    "softmax_hvp": lambda dev: (_f.softmax_hvp.default, (_z(dev), _u(dev))),
    "softmax_hvp-K3": lambda dev: (_f.softmax_hvp.default, (_z(dev), _u(dev, 3))),
    "softmax_hvp-K3-requires-grad": lambda dev: (_f.softmax_hvp.default, (
        _z(dev).requires_grad_(), _u(dev, 3).requires_grad_())),
    "softmax_hvp-f16": lambda dev: (_f.softmax_hvp.default, (_z(dev).half(), _u(dev).half())),
    "softmax_hessian_sqrt": lambda dev: (_f.softmax_hessian_sqrt.default, (_z(dev),)),
    "softmax_hessian_sqrt-requires-grad": lambda dev: (_f.softmax_hessian_sqrt.default, (_z(dev).requires_grad_(),)),
}


test_opcheck = opcheck_test(OPCHECK_CASES)


def test_compile_sees_fakes(device):
    """torch.compile traces a Gauss-Newton product and the square root through the fakes."""

    def step(z, u):
        return ops.softmax_hvp(z, u) * 2, ops.softmax_hessian_sqrt(z)

    z, u = randn((5, 4), torch.float64, device, 0), randn((2, 5, 4), torch.float64, device, 1)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(z, u), step(z, u)):
        torch.testing.assert_close(a, b)


def i64(*shape):
    return torch.ones(*shape, dtype=torch.int64)


F64 = torch.float64
# (op name, args, exception type, substring the message must contain)
BAD = [
    ("softmax_hvp", lambda: (t(5), t(5)), ValueError, "'logits' must have shape \\[N, C\\]"),
    ("softmax_hvp", lambda: (t(0, 3), t(0, 3)), ValueError, "'logits' is empty"),
    ("softmax_hvp", lambda: (t(5, 3), t(5, 4)), ValueError, "'u' must have shape"),
    ("softmax_hvp", lambda: (t(5, 3), t(2, 4, 3)), ValueError, "'u' must have shape"),
    ("softmax_hvp", lambda: (t(5, 3), t(1, 2, 5, 3)), ValueError, "'u' must have shape"),
    ("softmax_hvp", lambda: (t(5, 3), t(0, 5, 3)), ValueError, "'u' is empty"),
    ("softmax_hvp", lambda: (i64(5, 3), t(5, 3)), TypeError, "'logits' must be a floating-point tensor"),
    ("softmax_hvp", lambda: (t(5, 3), t(5, 3, dtype=F64)), TypeError, "'u' has dtype"),
    ("softmax_hessian_sqrt", lambda: (t(2, 5, 3),), ValueError, "'logits' must have shape \\[N, C\\]"),
    ("softmax_hessian_sqrt", lambda: (t(5, 0),), ValueError, "'logits' is empty"),
    ("softmax_hessian_sqrt", lambda: (i64(5, 3),), TypeError, "'logits' must be a floating-point tensor"),
]


test_bad_input_names_the_argument = bad_input_test(BAD)


def test_device_mismatch_is_named():
    """Any meta tensor sends the call to the fake kernel, which names the tensor on the other device."""
    with pytest.raises(ValueError, match="'u' is on meta but 'logits' is on cpu"):
        torch.ops.fisherext.softmax_hvp(t(5, 3), t(5, 3).to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cross_device_is_named():
    with pytest.raises(ValueError, match="'u' is on cpu"):
        torch.ops.fisherext.softmax_hvp(t(5, 3).cuda(), t(5, 3))


def test_wrapper_rejects_non_tensors():
    with pytest.raises(TypeError, match="'u' must be a torch.Tensor"):
        ops.softmax_hvp(t(5, 3), [[1.0, 2.0, 3.0]])
