import pytest
import torch

import fisherext  # noqa: F401  (registers torch.ops.fisherext)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param


def assert_close(actual, expected, dtype=None):
    """Equal up to the precision of `dtype`, relative to the largest entry of `expected`."""
    dtype = dtype or expected.dtype
    rtol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}[dtype]
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=rtol * scale)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: statistical or larger tests (still run by default; deselect with -m 'not slow')")
