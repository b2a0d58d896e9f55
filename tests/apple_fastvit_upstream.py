"""apple's FastViT, run from its published code (apple/ml-fastvit), and a small file made with it.

The code is never committed here: :func:`apple_fastvit_modules` reads it, at a pinned commit, from a local git
mirror of the public repository (``$REPBLOCKS_UPSTREAM_MIRRORS/apple+ml-fastvit/repo``, default
``/work/.mirror``, as :mod:`tests.upstream_blocks` does), and the tests that need it are skipped, saying so,
where the mirror is absent. What keeps the tests meaningful without it is a committed file
(``tests/fixtures/upstream/apple_fastvit_tiny.safetensors``, float64, ~0.4 MB): a tiny FastViT (:data:`TINY`), its train-form and reparameterized state dicts as apple's code made
them (random BN statistics and layer scales, fixed seed), an input, and apple's outputs for it.

Regenerate the file (mirror needed): ``python -m tests.apple_fastvit_upstream``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import tempfile
import warnings
from functools import cache, partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from repblocks.numerics import randomize_bn_

from .upstream_blocks import upstream_files

FIXTURE = Path(__file__).parent / "fixtures" / "upstream" / "apple_fastvit_tiny.safetensors"
REPOSITORY = "apple/ml-fastvit"
COMMIT = "8af5928238cab99c45f64fc3e4e7b1516b8224ba"
FILES = ["models/fastvit.py", "models/modules/mobileone.py", "models/modules/replknet.py"]
INPUT = (1, 3, 64, 64)
# A FastViT with every kind of part (RepMixer, RepCPE, attention over 2x2 tokens, SE) in a few hundred KB of float64.
TINY = dict(depths=(1, 1, 1, 1), widths=(8, 16, 16, 32), mlp_ratio=2, token_mixers=("repmixer",) * 3 + ("attention",))


@cache
def _modules() -> SimpleNamespace | str:
    files = upstream_files(REPOSITORY, COMMIT, FILES)
    if isinstance(files, str):
        return files
    import timm.models.registry as timm_registry

    with tempfile.TemporaryDirectory(prefix="upstream-fastvit-") as tmp:  # imported, the modules keep their code
        folder = Path(tmp)
        for path, data in files.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)
        # apple's files import each other as the package `models`; empty package files of ours stand in for its
        # __init__.py files, which import every variant.
        for package in ("models", "models/modules"):
            (folder / package / "__init__.py").write_text("")
        register = timm_registry.register_model
        timm_registry.register_model = lambda fn: fn  # apple's variants would overwrite timm's own in its registry
        sys.path.insert(0, tmp)
        try:
            # Its "please install mmsegmentation" lines, and timm's warning on its old import path timm.models.layers.
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                fastvit = importlib.import_module("models.fastvit")
            return SimpleNamespace(fastvit=fastvit, mobileone=importlib.import_module("models.modules.mobileone"))
        finally:
            timm_registry.register_model = register
            sys.path.remove(tmp)
            for name in [name for name in sys.modules if name == "models" or name.startswith("models.")]:
                sys.modules.pop(name)


def apple_fastvit_modules() -> SimpleNamespace:
    """apple's ``models.fastvit`` and ``models.modules.mobileone``; the test skips without the mirror."""
    modules = _modules()
    if isinstance(modules, str):
        pytest.skip(modules)
    return modules


def tiny_apple_fastvit(modules: SimpleNamespace, **kwargs) -> torch.nn.Module:
    """apple's FastViT of :data:`TINY`'s architecture."""
    cpe = partial(modules.fastvit.RepCPE, spatial_shape=(7, 7))
    return modules.fastvit.FastViT(
        layers=TINY["depths"],
        embed_dims=TINY["widths"],
        mlp_ratios=(TINY["mlp_ratio"],) * 4,
        downsamples=(True, True, True, True),
        token_mixers=TINY["token_mixers"],
        pos_embs=(None, None, None, cpe),
        num_classes=10,
        **kwargs,
    )


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64, random BN statistics and layer scales (apple's ``layer_scale*`` parameters)."""
    model = randomize_bn_(model.double(), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_scale" in name:
                param.copy_(torch.rand(param.shape, generator=generator, dtype=param.dtype) + 0.5)
    return model.eval()


def write_fixture(seed: int = 0) -> Path:
    modules = apple_fastvit_modules()
    torch.manual_seed(seed)
    theirs = randomized(tiny_apple_fastvit(modules), seed)
    deployed = modules.mobileone.reparameterize_model(theirs)
    x = torch.randn(INPUT, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        tensors = {"input": x, "output.train": theirs(x), "output.deploy": deployed(x)}
    tensors |= {f"train.{k}": v for k, v in theirs.state_dict().items()}
    tensors |= {f"deploy.{k}": v for k, v in deployed.state_dict().items()}
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"made_by": json.dumps({"repository": REPOSITORY, "commit": COMMIT, "model": "FastViT (tiny)"})}
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, FIXTURE, metadata=metadata)
    return FIXTURE


def read_fixture() -> dict:
    """``train`` and ``deploy`` state dicts, ``input``, ``output.train``, ``output.deploy``."""
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
