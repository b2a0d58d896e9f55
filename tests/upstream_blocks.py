"""DBB's, ACNet's and OREPA's own blocks, run from their published code, and small files made with it.

The code is never committed here: :func:`upstream_modules` reads it, at a pinned commit, from a local
git mirror of the public repository (``$REPBLOCKS_UPSTREAM_MIRRORS/<owner>+<name>/repo``, a bare git
dir as ``git clone --mirror`` or the agents' ``fetch`` tool makes it; default ``/work/.mirror``), and
the tests that need it are skipped, saying so, where the mirror is absent. What keeps the tests
meaningful without it is a small committed file per case (``tests/fixtures/upstream/<case>.safetensors``,
float64, a few KB): the block's train-form and deploy-form state dicts as the upstream code made them
(random BN statistics and branch scales, fixed seed), an input, and the upstream block's outputs for it.
With the mirror, a test checks that the upstream code still gives those outputs from those weights.

Regenerate the files (mirror needed): ``python -m tests.upstream_blocks``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from torch import nn

from repblocks.blocks import BRANCH_SETS, RepBlock
from repblocks.numerics import randomize_bn_

MIRRORS = Path(os.environ.get("REPBLOCKS_UPSTREAM_MIRRORS", "/work/.mirror"))
FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
# The public repositories, the commit read, and the files each block needs (their own imports included).
REPOSITORIES = {
    "dbb": (
        "DingXiaoH/DiverseBranchBlock",
        "8d2b16b6aee45a33236b2d11685be6857f9ba929",
        ["dbb_transforms.py", "diversebranchblock.py"],
    ),
    "acnet": ("DingXiaoH/ACNet", "748fb0c734b41c48eacaacf7fc5e851e33a63ce8", ["acnet/acb.py"]),
    "orepa": (
        "JUGGHM/OREPA_CVPR2022",
        "3ed037beeb106cc1c3d011eb2678cebfefc4cba0",
        ["dbb_transforms.py", "basic.py", "blocks.py", "blocks_repvgg.py"],
    ),
    # RepGhost's network and bottleneck (tests/upstream_repghost.py): ChengpengChen/RepGhost, model/repghost.py.
    "repghost": ("ChengpengChen/RepGhost", "3c7d87e22c36b75507afc458f089940155308c3f", ["model/repghost.py"]),
}


@cache
def _modules(family: str) -> SimpleNamespace | str:
    repo, commit, files = REPOSITORIES[family]
    git_dir = MIRRORS / repo.replace("/", "+") / "repo"
    if not git_dir.is_dir():
        return (
            f"{repo}'s code is not here: mirror it to {git_dir} (git clone --mirror) or set REPBLOCKS_UPSTREAM_MIRRORS"
        )
    folder = Path(tempfile.mkdtemp(prefix=f"upstream-{family}-"))
    for path in files:
        shown = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{commit}:{path}"], capture_output=True)
        if shown.returncode != 0:
            return f"{repo} at {commit[:12]} has no {path}: {shown.stderr.decode().strip()}"
        (folder / Path(path).name).write_bytes(shown.stdout)
    names = [Path(path).stem for path in files]
    # Two repositories ship a dbb_transforms.py: each family imports its own, then the names are freed again.
    sys.path.insert(0, str(folder))
    try:
        return SimpleNamespace(**{name: importlib.import_module(name) for name in names})
    finally:
        sys.path.remove(str(folder))
        for name in names:
            sys.modules.pop(name, None)


def upstream_modules(family: str) -> SimpleNamespace:
    """The upstream code of ``family`` (``dbb``, ``acnet``, ``orepa``, ``repghost``) as modules by file name; the test skips without it."""
    modules = _modules(family)
    if isinstance(modules, str):
        pytest.skip(modules)
    return modules


@dataclass(frozen=True)
class Case:
    """One upstream block, the block of ours that takes its weights, and an input shape."""

    family: str
    build: Callable[[SimpleNamespace], nn.Module]  # the upstream block in train form, from its modules
    ours: dict  # RepBlock's arguments (deploy=True is added for the deploy form)
    input_shape: tuple[int, int, int, int]
    train_into_train: bool = True  # OREPA's conv blocks: their train form loads into a deploy-form block only
    layout: str = field(default="")

    @property
    def layout_name(self) -> str:
        return self.layout or self.family

    def our_block(self, *, deploy: bool) -> RepBlock:
        return RepBlock(**self.ours, deploy=deploy).double().eval()


def _dbb(cin, cout, k, stride, groups):
    return lambda m: m.diversebranchblock.DiverseBranchBlock(cin, cout, k, stride, padding=k // 2, groups=groups)


def _acnet(cin, cout, k, stride, groups):
    return lambda m: m.acb.ACBlock(cin, cout, k, stride, padding=k // 2, groups=groups)


def _shape(cin, cout, k, stride, groups):
    return dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=stride, groups=groups, act=None)


CASES = {
    "dbb_dense": Case("dbb", _dbb(4, 8, 3, 2, 1), {**_shape(4, 8, 3, 2, 1), **BRANCH_SETS["dbb"]}, (1, 4, 7, 6)),
    "dbb_grouped_k5": Case("dbb", _dbb(4, 8, 5, 1, 2), {**_shape(4, 8, 5, 1, 2), **BRANCH_SETS["dbb"]}, (1, 4, 6, 7)),
    "dbb_depthwise": Case("dbb", _dbb(4, 4, 3, 1, 4), {**_shape(4, 4, 3, 1, 4), **BRANCH_SETS["dbb"]}, (1, 4, 6, 5)),
    "dbb_depthwise_s2": Case("dbb", _dbb(4, 4, 3, 2, 4), {**_shape(4, 4, 3, 2, 4), **BRANCH_SETS["dbb"]}, (1, 4, 7, 7)),
    "acnet_dense": Case(
        "acnet", _acnet(4, 8, 3, 1, 1), {**_shape(4, 8, 3, 1, 1), **BRANCH_SETS["acnet"]}, (1, 4, 6, 7)
    ),
    "acnet_grouped_k5": Case(
        "acnet", _acnet(6, 6, 5, 2, 3), {**_shape(6, 6, 5, 2, 3), **BRANCH_SETS["acnet"]}, (1, 6, 9, 8)
    ),
    "orepa": Case("orepa", lambda m: m.blocks.OREPA(4, 8, 3, 1, padding=1), _shape(4, 8, 3, 1, 1), (1, 4, 6, 5), False),
    "orepa_grouped_s2": Case(
        "orepa", lambda m: m.blocks.OREPA(8, 8, 3, 2, padding=1, groups=2), _shape(8, 8, 3, 2, 2), (1, 8, 7, 6), False
    ),
    "orepa_1x1": Case("orepa", lambda m: m.blocks.OREPA_1x1(4, 8, 1), _shape(4, 8, 1, 1, 1), (1, 4, 5, 5), False),
    "orepa_repvgg": Case(
        "orepa",
        lambda m: m.blocks_repvgg.RepVGGBlock_OREPA(4, 4, 3, padding=1),
        {**_shape(4, 4, 3, 1, 1), "act": "relu"},
        (1, 4, 6, 6),
        layout="official",  # its deploy form is the official block's; its train form has OREPA's rbr_dense
    ),
}


def randomized(block: nn.Module, seed: int) -> nn.Module:
    """``block`` in float64 with random BN statistics and random values where init leaves zeros or constants.

    DBB's identity-based 1x1 starts at zero and OREPA's branch scales (``vector``) start constant, one row
    at zero: random values make a grouped layout or a dropped branch show.
    """
    block = randomize_bn_(block.double(), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in block.named_parameters():
            if name.endswith(("idconv1.weight", "conv1.weight", "vector")) or "_idconv1" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype) + 0.1)
    return block.eval()


def deploy_copy(block: nn.Module) -> nn.Module:
    """The upstream block after its own ``switch_to_deploy`` (RepVGGBlock_OREPA's needs its rbr_dense fused first)."""
    import copy

    deployed = copy.deepcopy(block)
    with torch.no_grad():
        deployed.switch_to_deploy()
    return deployed


def write_fixture(name: str, seed: int = 0) -> Path:
    """Run the upstream block of ``CASES[name]`` and write its weights, an input and its outputs."""
    case = CASES[name]
    torch.manual_seed(seed)
    theirs = randomized(case.build(upstream_modules(case.family)), seed)
    deployed = deploy_copy(theirs)
    x = torch.randn(case.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        tensors = {"input": x, "output.train": theirs(x), "output.deploy": deployed(x)}
    tensors |= {f"train.{k}": v for k, v in theirs.state_dict().items()}
    tensors |= {f"deploy.{k}": v for k, v in deployed.state_dict().items()}
    repo, commit, _ = REPOSITORIES[case.family]
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"{name}.safetensors"
    metadata = {"made_by": json.dumps({"repository": repo, "commit": commit, "block": type(theirs).__name__})}
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def read_fixture(name: str) -> dict[str, dict[str, torch.Tensor] | torch.Tensor]:
    """A case's file: ``train`` and ``deploy`` state dicts, ``input``, ``output.train``, ``output.deploy``."""
    tensors = safetensors.torch.load_file(FIXTURES / f"{name}.safetensors")
    fixture: dict = {"train": {}, "deploy": {}}
    for key, value in tensors.items():
        form, _, rest = key.partition(".")
        if form in ("train", "deploy"):
            fixture[form][rest] = value
        else:
            fixture[key] = value
    return fixture


if __name__ == "__main__":
    for case_name in CASES:
        print(write_fixture(case_name))
