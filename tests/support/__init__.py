"""Test support: devices and dtypes, one assert_close, the model zoo (``support.zoo``, ``support.models``),
independent oracles (``support.oracles``, ``support.curvature``, ``support.spectra``) and the op-family
bad-input factory (``support.opcheck``). Tests import from here, never from conftest."""
import torch

import fisherext  # noqa: F401  (registers torch.ops.fisherext)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]


def assert_close(actual, expected, dtype=None, scale=None, rtol=None):
    """max |actual − expected| ≤ rtol · scale: equal up to ``rtol`` (by default the precision of `dtype`, or
    of `expected`'s dtype) relative to the largest entry of `expected`, or to `scale`, the size of the terms
    `expected` was summed from, where a sum cancels far below them. Compared in float64 on the CPU, shapes
    equal; a NaN anywhere fails. The one closeness assertion of the test suite."""
    if rtol is None:
        dtype = dtype or expected.dtype
        rtol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}[dtype]
    actual = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    expected = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = scale or (expected.abs().max().item() if expected.numel() else 0.0) or 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale, f"max abs error {err:.3g} > rtol {rtol:.1e} x scale {scale:.3g}"


def to_device(obj, device):
    """`obj` with every tensor in it (nested tuples, lists, dicts) moved to `device`; other values kept."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
