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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests of tiny models: on a shared 2-core machine a second thread
    only waits for the first (the experiments' quick runs took up to 10× longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
