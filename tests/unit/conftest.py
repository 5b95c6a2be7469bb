import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on a shared 2-core box: one intra-op thread avoids spin contention."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
