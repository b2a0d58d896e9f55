"""Shared fixtures: deterministic seeds and the registry split into tiny, large and torchvision models."""

import pytest
import torch

import repblocks

TINY_MODELS = repblocks.list_models("*tiny*")
# torchvision's classifiers (tv_*) are no zoo models (no features_only, no RepBlocks of their own): tests/test_expand.py covers them.
TORCHVISION_MODELS = repblocks.list_models("tv_*")
LARGE_MODELS = [name for name in repblocks.list_models() if name not in TINY_MODELS + TORCHVISION_MODELS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Modules that load OpenVINO and NNCF into the test process run last: a DataLoader that forks its
# workers after OpenVINO's thread pool exists (tests/test_train.py's num_workers=2 runs) made the
# pytest process segfault at exit. deploy.py and train.py never fork after loading them.
ENGINE_MODULES = ("test_quantize.py", "test_qat.py")


def pytest_collection_modifyitems(config, items):
    """Engine modules last (see ENGINE_MODULES); tests marked ``gpu`` skipped, saying why, without CUDA."""
    items.sort(key=lambda item: item.path.name in ENGINE_MODULES)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
