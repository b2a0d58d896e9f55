"""RepGhost's own bottlenecks (ChengpengChen/RepGhost, model/repghost.py), run from its code, and small files made with it.

As :mod:`tests.upstream_blocks` (which reads the code from the mirror, never committed): each case is an
upstream ``RepGhostBottleneck`` with random BN statistics, in float64; its file holds the train-form and
deploy-form state dicts as the upstream code made them (its own ``switch_to_deploy``), an input, and its
outputs. Regenerate them (mirror needed): ``python -m tests.upstream_repghost``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from repblocks.models.repghost import GhostBlock
from repblocks.numerics import randomize_bn_

from .upstream_blocks import FIXTURES, REPOSITORIES, read_fixture, upstream_modules

__all__ = ["BOTTLENECKS", "read_fixture", "upstream_bottleneck", "write_fixture"]


@dataclass(frozen=True)
class Bottleneck:
    """An upstream bottleneck's arguments (our GhostBlock at width 1: its channels are multiples of 4) and input."""

    in_channels: int
    row: GhostBlock
    input_shape: tuple[int, int, int, int]


BOTTLENECKS = {
    # Strided, a 5x5 depthwise conv, SE and the projection shortcut.
    "repghost_bottleneck_s2": Bottleneck(4, GhostBlock(5, 8, 8, 0.25, 2), (1, 4, 7, 6)),
    # Stride 1, the identity shortcut.
    "repghost_bottleneck_identity": Bottleneck(4, GhostBlock(3, 8, 4, 0, 1), (1, 4, 5, 6)),
}


def upstream_bottleneck(name: str) -> torch.nn.Module:
    """The upstream block of case ``name`` in train form, float64, random BN statistics (skips without the mirror)."""
    case = BOTTLENECKS[name]
    row = case.row
    module = upstream_modules("repghost").repghost
    block = module.RepGhostBottleneck(
        case.in_channels, row.expansion, row.channels, row.kernel_size, row.stride, se_ratio=row.se_ratio
    )
    return randomize_bn_(block.double(), seed=0).eval()


def write_fixture(name: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    theirs = upstream_bottleneck(name)
    deployed = copy.deepcopy(theirs)
    for module in deployed.modules():
        if hasattr(module, "switch_to_deploy"):
            module.switch_to_deploy()
    x = torch.randn(BOTTLENECKS[name].input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        tensors = {"input": x, "output.train": theirs(x), "output.deploy": deployed(x)}
    tensors |= {f"train.{k}": v for k, v in theirs.state_dict().items()}
    tensors |= {f"deploy.{k}": v for k, v in deployed.state_dict().items()}
    repo, commit, _ = REPOSITORIES["repghost"]
    path = FIXTURES / f"{name}.safetensors"
    metadata = {"made_by": json.dumps({"repository": repo, "commit": commit, "block": type(theirs).__name__})}
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


if __name__ == "__main__":
    for case_name in BOTTLENECKS:
        print(write_fixture(case_name))
