"""The RepViT authors' network (THU-MIG/RepViT, ``model/repvit.py``), run from their code, and a small file made with it.

As :mod:`tests.upstream_blocks`: the code is never committed here. It is read at a pinned commit from a
local mirror of the public repository (``$REPBLOCKS_UPSTREAM_MIRRORS/THU-MIG+RepViT/repo``), and the tests
that need it skip, saying so, without it. ``tests/fixtures/upstream/repvit_tiny.safetensors`` (float64) keeps
them meaningful without the mirror: the authors' tiny network's train-form and fused state dicts (random BN
statistics, fixed seed), an input, and its outputs in both forms.

Regenerate the file (mirror needed): ``python -m tests.repvit_upstream``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import tempfile
from functools import cache
from pathlib import Path
from unittest import mock

import pytest
import safetensors.torch
import torch
from torch import nn

from repblocks.models.repvit import RepVitConfig
from repblocks.numerics import randomize_bn_

from .upstream_blocks import FIXTURES, upstream_files

REPOSITORY, COMMIT, FILE = "THU-MIG/RepViT", "298f42075eda5d2e6102559fad260c970769d34e", "model/repvit.py"
FIXTURE = FIXTURES / "repvit_tiny.safetensors"
NUM_CLASSES = 4
INPUT_SHAPE = (1, 3, 32, 32)
# Smaller than repvit_tiny, to keep the file small: every row kind (SE and plain blocks, pre_block, downsample).
FIXTURE_CFG = RepVitConfig((8, 8, 8, 8), (2, 1, 1, 1), image_size=32, crop_pct=1.0)


@cache
def _module():
    files = upstream_files(REPOSITORY, COMMIT, [FILE])
    if isinstance(files, str):
        return files
    with tempfile.TemporaryDirectory(prefix="upstream-repvit-") as folder:  # executed, the module keeps its code
        path = Path(folder) / "thu_repvit.py"
        path.write_bytes(files[FILE])
        spec = importlib.util.spec_from_file_location("thu_repvit", path)
        module = importlib.util.module_from_spec(spec)
        # The file registers its variants in timm's registry under timm's own names: keep timm's registry as it is.
        with mock.patch("timm.models.register_model", lambda fn: fn):
            spec.loader.exec_module(module)
    return module


def authors_module():
    """The authors' ``model/repvit.py`` as a module; the test skips without the mirror."""
    module = _module()
    if isinstance(module, str):
        pytest.skip(module)
    return module


def authors_cfgs(cfg: RepVitConfig) -> list[list[int]]:
    """The authors' rows (kernel, expansion, channels, SE, HS, stride) for one of our configs.

    A stage after the first is a row of the previous width without SE (timm's ``pre_block``), a stride-2
    row (the downsample), then its blocks with SE on every other one, the first included. HS is unused
    by their code (GELU either way); it is set where their published configs set it.
    """
    rows, previous = [], None
    for stage, (depth, width) in enumerate(zip(cfg.depths, cfg.widths, strict=True)):
        hs = int(stage >= 2)
        if stage > 0:
            rows += [[cfg.kernel_size, 2, previous, 0, hs, 1], [cfg.kernel_size, 2, width, 0, hs, 2]]
        rows += [[cfg.kernel_size, 2, width, int(index % 2 == 0), hs, 1] for index in range(depth)]
        previous = width
    return rows


def authors_network(cfg: RepVitConfig = FIXTURE_CFG, *, num_classes: int = NUM_CLASSES) -> nn.Module:
    """The authors' RepViT for ``cfg``, with a distillation head, in train form."""
    return authors_module().RepViT(authors_cfgs(cfg), num_classes=num_classes, distillation=True)


def fused_copy(network: nn.Module) -> nn.Module:
    """The authors' network after their own fusion (``utils.replace_batchnorm``: each module's ``fuse()``)."""

    def replace(net: nn.Module) -> None:  # their utils.replace_batchnorm, which imports their training stack
        for name, child in net.named_children():
            if hasattr(child, "fuse"):
                fused = child.fuse()
                setattr(net, name, fused)
                replace(fused)
            elif isinstance(child, nn.BatchNorm2d):
                setattr(net, name, nn.Identity())
            else:
                replace(child)

    fused = copy.deepcopy(network)
    with torch.no_grad():
        # Their fuse() builds fresh float32 layers: float64 by default while it runs keeps the file in float64.
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            replace(fused)
        finally:
            torch.set_default_dtype(default)
    return fused.eval()


def write_fixture(seed: int = 0) -> Path:
    """Run the authors' tiny network in both forms and write its weights, an input and its outputs."""
    torch.manual_seed(seed)
    theirs = randomize_bn_(authors_network().double(), seed=seed).eval()
    fused = fused_copy(theirs)
    x = torch.randn(INPUT_SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        tensors = {"input": x, "output.train": theirs(x), "output.deploy": fused(x)}
    tensors |= {f"train.{k}": v for k, v in theirs.state_dict().items()}
    tensors |= {f"deploy.{k}": v for k, v in fused.state_dict().items()}
    metadata = {"made_by": json.dumps({"repository": REPOSITORY, "commit": COMMIT, "network": "RepViT"})}
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, FIXTURE, metadata=metadata)
    return FIXTURE


def read_fixture() -> dict:
    """The file: ``train`` and ``deploy`` state dicts, ``input``, ``output.train``, ``output.deploy``."""
    fixture: dict = {"train": {}, "deploy": {}}
    for key, value in safetensors.torch.load_file(FIXTURE).items():
        form, _, rest = key.partition(".")
        if form in ("train", "deploy"):
            fixture[form][rest] = value
        else:
            fixture[key] = value
    return fixture


if __name__ == "__main__":
    print(write_fixture())
