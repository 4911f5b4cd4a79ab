import pytest
import torch

from support import DEVICES, DTYPES


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: statistical or larger tests (still run by default; deselect with -m 'not slow')")
