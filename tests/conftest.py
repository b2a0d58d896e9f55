"""Shared fixtures: deterministic seeds and the registry split into tiny and large models."""

import pytest
import torch

import repblocks

TINY_MODELS = repblocks.list_models("*tiny*")
LARGE_MODELS = [name for name in repblocks.list_models() if name not in TINY_MODELS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skip them, saying why, on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
