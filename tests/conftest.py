"""Shared test settings: the `slow` marker, no model-hub access for the whole session, and a
one-thread torch fixture."""
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long or networked (registry) tests; deselect with -m 'not slow'")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny ops: one thread is fastest, and robust on a busy machine (restored afterwards)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
