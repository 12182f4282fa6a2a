"""Shared test settings: the `slow` marker, and no model-hub access for the whole session."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long or networked (registry) tests; deselect with -m 'not slow'")
