"""DBB's, ACNet's, OREPA's, UniRepLKNet's and ultralytics' own blocks, run from their published code, and small files made with it.

The code is never committed here: :func:`upstream_modules` reads it, at a pinned commit, from a local
git mirror of the public repository (``$REPBLOCKS_UPSTREAM_MIRRORS/<owner>+<name>/repo``, a bare git
dir as ``git clone --mirror`` or the agents' ``fetch`` tool makes it; default ``/work/.mirror``), and
the tests that need it are skipped, saying so, where the mirror is absent. What keeps the tests
meaningful without it is a small committed file per case (``tests/fixtures/upstream/<case>.safetensors``,
float64, a few KB): the block's train-form and deploy-form state dicts as the upstream code made them
(random BN statistics and branch scales, fixed seed), an input, and the upstream block's outputs for it.
With the mirror, a test checks that the upstream code still gives those outputs from those weights.

ultralytics' blocks cannot be imported without the ultralytics package, whose repository is too large to
mirror here: :func:`upstream_modules` ``("ultralytics")`` takes ``RepConv``, ``RepVGGDW`` and what they use from
the installed package's files or from the mirror, and runs those classes alone (:func:`_ultralytics_classes`).

Regenerate the files (mirror or package needed): ``python -m tests.upstream_blocks``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

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
    "unireplknet": ("AILab-CVC/UniRepLKNet", "b5677d8fb0e7b8af61eac39c1bf02727f5afc1d5", ["unireplknet.py"]),
}
# ultralytics: no pinned commit (its blocks have not changed in years); the fixtures record the version read.
ULTRALYTICS = "ultralytics/ultralytics"
# What of ultralytics' files the two blocks need: (file, top-level names).
ULTRALYTICS_NAMES = [
    ("ultralytics/utils/torch_utils.py", ["fuse_conv_and_bn"]),
    ("ultralytics/nn/modules/conv.py", ["autopad", "Conv", "RepConv"]),
    ("ultralytics/nn/modules/block.py", ["RepVGGDW"]),
]


def upstream_files(repo: str, commit: str, paths: list[str]) -> dict[str, bytes] | str:
    """``{path: its bytes at commit}`` from ``repo``'s local mirror, or why they cannot be read (one line)."""
    git_dir = MIRRORS / repo.replace("/", "+") / "repo"
    if not git_dir.is_dir():
        return (
            f"{repo}'s code is not here: mirror it to {git_dir} (git clone --mirror) or set REPBLOCKS_UPSTREAM_MIRRORS"
        )
    files = {}
    for path in paths:
        shown = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{commit}:{path}"], capture_output=True)
        if shown.returncode != 0:
            return f"{repo} at {commit[:12]} has no {path}: {shown.stderr.decode().strip()}"
        files[path] = shown.stdout
    return files


@cache
def _modules(family: str) -> SimpleNamespace | str:
    if family == "ultralytics":
        return _ultralytics_classes()
    repo, commit, paths = REPOSITORIES[family]
    files = upstream_files(repo, commit, paths)
    if isinstance(files, str):
        return files
    names = [Path(path).stem for path in paths]
    # Two repositories ship a dbb_transforms.py: each family imports its own, then the names are freed again.
    with tempfile.TemporaryDirectory(prefix=f"upstream-{family}-") as folder:  # imported, the modules keep their code
        for path, data in files.items():
            (Path(folder) / Path(path).name).write_bytes(data)
        sys.path.insert(0, folder)
        try:
            return SimpleNamespace(**{name: importlib.import_module(name) for name in names})
        finally:
            sys.path.remove(folder)
            for name in names:
                sys.modules.pop(name, None)


def _ultralytics_source(path: str) -> tuple[str, str] | str:
    """``path``'s text and where it came from: the installed package's file, else the mirror's HEAD; or why neither."""
    spec = importlib.util.find_spec("ultralytics")  # finds the package without importing it (its __init__ needs much)
    if spec is not None and spec.submodule_search_locations:
        package = Path(next(iter(spec.submodule_search_locations)))
        file = package.parent / path
        if file.is_file():
            return file.read_text(), f"ultralytics {_ultralytics_version(package)} (installed package)"
    git_dir = MIRRORS / ULTRALYTICS.replace("/", "+") / "repo"
    if not git_dir.is_dir():
        return f"ultralytics' code is not here: install the package (pip install ultralytics) or mirror it to {git_dir}"
    shown = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"HEAD:{path}"], capture_output=True)
    if shown.returncode != 0:
        return f"{ULTRALYTICS} has no {path}: {shown.stderr.decode().strip()}"
    head = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], capture_output=True, text=True)
    return shown.stdout.decode(), f"{ULTRALYTICS} at {head.stdout.strip()[:12]}"


def _ultralytics_version(package: Path) -> str:
    """The ``__version__`` an ultralytics package folder says it is."""
    init = package / "__init__.py"
    found = re.search(r"^__version__ = [\"'](.+?)[\"']", init.read_text(), re.M) if init.is_file() else None
    return found[1] if found else "(unknown version)"


def _ultralytics_classes() -> SimpleNamespace | str:
    """ultralytics' RepConv and RepVGGDW, run alone: their source (and their helpers') taken out of its files.

    The package's modules import the whole package (settings, checks, a config file in the home folder), so
    the few top-level definitions the blocks need are executed by themselves, with what their files import.
    """
    namespace = {
        "math": math,
        "np": np,
        "torch": torch,
        "nn": nn,
        "fuse_conv_bn_weights": fuse_conv_bn_weights,
        "__name__": "ultralytics_blocks",
    }
    made_by = set()
    for path, names in ULTRALYTICS_NAMES:
        source = _ultralytics_source(path)
        if isinstance(source, str):
            return source
        text, origin = source
        made_by.add(origin)
        found = {node.name: node for node in ast.parse(text).body if getattr(node, "name", None) in names}
        if set(found) != set(names):
            return f"{origin} has no {', '.join(sorted(set(names) - set(found)))} in {path}"
        for name in names:  # in the files' order of dependence: helpers first
            exec(compile(ast.Module([found[name]], type_ignores=[]), f"<{path}:{name}>", "exec"), namespace)
    return SimpleNamespace(blocks=SimpleNamespace(**namespace), made_by=", ".join(sorted(made_by)))


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


def _dilated(channels, k):
    """UniRepLKNet's DilatedReparamBlock (its iGEMM kernel off: it is CUDA-only and not installed)."""
    return lambda m: m.unireplknet.DilatedReparamBlock(channels, k, deploy=False, attempt_use_lk_impl=False)


def _repconv(cin, cout, stride, groups, identity):
    """ultralytics' RepConv (YOLOv7/v9; RT-DETR's), SiLU after the sum; without the identity BN: YOLOv9's RepConvN."""
    return lambda m: m.blocks.RepConv(cin, cout, 3, stride, 1, g=groups, act=True, bn=identity)


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
    "unireplk_k7": Case(
        "unireplknet", _dilated(4, 7), {**_shape(4, 4, 7, 1, 4), **BRANCH_SETS["unireplk"]}, (1, 4, 9, 8)
    ),
    "unireplk_k13": Case(
        "unireplknet", _dilated(3, 13), {**_shape(3, 3, 13, 1, 3), **BRANCH_SETS["unireplk"]}, (1, 3, 15, 14)
    ),
    "yolo_repconv": Case(
        "ultralytics",
        _repconv(4, 4, 1, 1, True),
        {**_shape(4, 4, 3, 1, 1), **BRANCH_SETS["yolo_repconv"], "act": "silu"},
        (1, 4, 6, 7),
    ),
    "yolo_repconvn_grouped_s2": Case(
        "ultralytics",
        _repconv(4, 8, 2, 2, False),
        {**_shape(4, 8, 3, 2, 2), **BRANCH_SETS["yolo_repconv"], "identity_branch": None, "act": "silu"},
        (1, 4, 7, 6),
    ),
    "yolo_repvggdw": Case(
        "ultralytics",
        lambda m: m.blocks.RepVGGDW(4),
        {**_shape(4, 4, 7, 1, 4), **BRANCH_SETS["repvggdw"], "act": "silu"},
        (1, 4, 9, 8),
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


@contextlib.contextmanager
def _float64_ones(wanted: bool = True) -> Iterator[None]:
    """torch's default dtype float64 for the duration: UniRepLKNet's ``convert_dilated_to_nondilated`` builds its
    identity kernel with ``torch.ones`` in the default dtype, whatever the kernel's, and fails on a float64 one."""
    previous = torch.get_default_dtype()
    if wanted:
        torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# Each code base's own fusion method: RepVGG's line, UniRepLKNet's DilatedReparamBlock, ultralytics' RepConv and RepVGGDW.
_FUSIONS = ("switch_to_deploy", "merge_dilated_branches", "fuse_convs", "fuse")


def deploy_copy(block: nn.Module) -> nn.Module:
    """The upstream block after its own fusion (``switch_to_deploy``, ``merge_dilated_branches``, ``fuse_convs``, ``fuse``).

    ultralytics' fused blocks compute with ``forward_fuse``, which its model's ``fuse()`` makes their forward.
    """
    import copy

    deployed = copy.deepcopy(block)
    fusion = next(name for name in _FUSIONS if hasattr(deployed, name))
    with torch.no_grad(), _float64_ones(fusion == "merge_dilated_branches"):
        getattr(deployed, fusion)()
    if hasattr(deployed, "forward_fuse"):
        deployed.forward = deployed.forward_fuse
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
    if case.family == "ultralytics":
        made_by = {"code": upstream_modules("ultralytics").made_by}
    else:
        repo, commit, _ = REPOSITORIES[case.family]
        made_by = {"repository": repo, "commit": commit}
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"{name}.safetensors"
    metadata = {"made_by": json.dumps({**made_by, "block": type(theirs).__name__})}
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


# UniRepLKNet's whole block (DilatedReparamBlock or plain dwconv, BN, SE, the GRN FFN, layer scale): (dim, kernel).
UNIREPLKNET_BLOCKS = {"unireplknet_block_k7": (8, 7), "unireplknet_block_k3": (8, 3)}


def unireplknet_block(modules: SimpleNamespace, name: str, seed: int) -> nn.Module:
    """Upstream's UniRepLKNetBlock of ``UNIREPLKNET_BLOCKS[name]`` in float64, every parameter and BN statistic random.

    GRN's gamma and beta start at zero and the layer scale at 1e-6: random values make each of them count.
    """
    dim, kernel = UNIREPLKNET_BLOCKS[name]
    block = modules.unireplknet.UniRepLKNetBlock(dim, kernel, attempt_use_lk_impl=False)
    block = randomize_bn_(block.double(), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in block.named_parameters():
            if param_name.startswith(("act.1.", "gamma")):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype) + 0.2)
    return block.eval()


def unireplknet_deploy_copy(module: nn.Module) -> nn.Module:
    """Upstream's block after its own ``reparameterize()``, or its network after ``reparameterize_unireplknet()``."""
    import copy

    deployed = copy.deepcopy(module)
    with torch.no_grad(), _float64_ones():
        (getattr(deployed, "reparameterize_unireplknet", None) or deployed.reparameterize)()
    return deployed


def write_unireplknet_block_fixture(name: str, seed: int = 0) -> Path:
    """Run upstream's UniRepLKNetBlock of ``UNIREPLKNET_BLOCKS[name]`` and write its weights, an input and its outputs."""
    theirs = unireplknet_block(upstream_modules("unireplknet"), name, seed)
    deployed = unireplknet_deploy_copy(theirs)
    dim = UNIREPLKNET_BLOCKS[name][0]
    x = torch.randn(1, dim, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        tensors = {"input": x, "output.train": theirs(x), "output.deploy": deployed(x)}
    tensors |= {f"train.{k}": v for k, v in theirs.state_dict().items()}
    tensors |= {f"deploy.{k}": v for k, v in deployed.state_dict().items()}
    repo, commit, _ = REPOSITORIES["unireplknet"]
    metadata = {"made_by": json.dumps({"repository": repo, "commit": commit, "block": type(theirs).__name__})}
    path = FIXTURES / f"{name}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


if __name__ == "__main__":
    for case_name in CASES:
        print(write_fixture(case_name))
    for block_name in UNIREPLKNET_BLOCKS:
        print(write_unireplknet_block_fixture(block_name))
