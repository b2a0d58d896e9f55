"""Ultralytics' re-parameterizable blocks, renamed to ours and back: YOLOv7/v9 ``RepConv`` and YOLOv10 ``RepVGGDW``.

``ultralytics/nn/modules/conv.py``'s ``RepConv`` (YOLOv9's ``RepConvN`` has the same keys, without ``bn``)
holds ``conv1`` (kxk ``Conv``: ``conv`` + ``bn``), ``conv2`` (1x1 ``Conv``) and an identity ``bn``, and after
``fuse_convs()`` one ``conv`` with a bias: our ``yolo_repconv`` branch set (``conv_kxk``, ``conv_1x1``,
``identity``, ``reparam``). ``block.py``'s ``RepVGGDW`` holds ``conv`` (7x7 depthwise ``Conv``) and ``conv1``
(3x3), and after ``fuse()`` one ``conv`` with a bias: our ``repvggdw`` set (``conv_kxk``, ``conv_extra.0``).

The names mean different branches in the two blocks (``conv1`` is RepConv's kxk and RepVGGDW's 3x3), so
each block is read from the keys around it: a block with ``conv2`` is a RepConv, one with ``conv.conv``
a RepVGGDW, and a lone ``conv`` with a bias a fused block. Blocks only: ultralytics' networks are not
ours (as YOLOv6's, :mod:`repblocks.layouts`). Its networks train with BatchNorm eps 1e-3
(``initialize_weights``), a block built alone with 1e-5; a state dict records neither.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from repblocks.block_renames import rename_below

__all__ = ["from_ultralytics_names", "is_ultralytics", "to_ultralytics_names"]

_REPCONV = re.compile(r"^(?P<block>(?:.*\.)?)conv2\.conv\.weight$")
_REPVGGDW = re.compile(r"^(?P<block>(?:.*\.)?)conv\.conv\.weight$")
_FUSED = re.compile(r"^(?P<block>(?:.*\.)?)conv\.bias$")


def _blocks(keys: list[str], pattern: re.Pattern) -> list[str]:
    return [match["block"] for key in keys if (match := pattern.match(key))]


def _repconvs(keys: list[str]) -> list[str]:
    """RepConv blocks: a 1x1 ``conv2`` beside a kxk ``conv1``, and no ``conv3`` (a bottleneck's)."""
    present = set(keys)
    return [
        block
        for block in _blocks(keys, _REPCONV)
        if f"{block}conv1.conv.weight" in present and not any(key.startswith(f"{block}conv3.") for key in keys)
    ]


def _repvggdws(keys: list[str]) -> list[str]:
    """RepVGGDW blocks: a ``conv`` and a ``conv1``, both Conv+BN, and no ``conv2``."""
    present = set(keys)
    return [
        block
        for block in _blocks(keys, _REPVGGDW)
        if f"{block}conv1.conv.weight" in present and not any(key.startswith(f"{block}conv2.") for key in keys)
    ]


def _fused(keys: list[str]) -> list[str]:
    """Fused blocks: ``conv.weight`` and ``conv.bias`` and nothing else below the block."""
    return [
        block
        for block in _blocks(keys, _FUSED)
        if {k for k in keys if k.startswith(block)} == {f"{block}conv.weight", f"{block}conv.bias"}
    ]


def is_ultralytics(keys: Iterable[str]) -> bool:
    """Whether the keys hold an ultralytics RepConv or RepVGGDW in train form, or are fused blocks of them only.

    A fused block is a conv with a bias, which many code bases have: only a state dict of nothing else reads so.
    """
    keys = list(keys)
    if _repconvs(keys) or _repvggdws(keys):
        return True
    fused = _fused(keys)
    return bool(fused) and 2 * len(fused) == len(keys)


def from_ultralytics_names(keys: Iterable[str]) -> dict[str, str]:
    """Each key's name in our layout (keys of no ultralytics block keep theirs)."""
    keys = list(keys)
    names = {key: key for key in keys}
    for block in _repconvs(keys):
        rename_below(names, block, [("conv1.", "conv_kxk."), ("conv2.", "conv_1x1."), ("bn.", "identity.")])
    for block in _repvggdws(keys):
        rename_below(names, block, [("conv.", "conv_kxk."), ("conv1.", "conv_extra.0.")])
    for block in _fused(keys):
        rename_below(names, block, [("conv.", "reparam.")])
    return names


_OUR_BLOCK = re.compile(r"^(?P<block>(?:.*\.)?)(conv_kxk\.conv|reparam)\.weight$")


def to_ultralytics_names(keys: Iterable[str]) -> dict[str, str]:
    """Each key of our layout as ultralytics names it: a block with ``conv_extra`` is a RepVGGDW, any other a RepConv.

    Raises:
        ValueError: A block with branches neither block has (ACNet's, DBB's, several kxk or extra kernels).
    """
    keys = list(keys)
    names = {key: key for key in keys}
    for block in _blocks(keys, _OUR_BLOCK):
        below = {key[len(block) :].split(".")[0] for key in keys if key.startswith(block)}
        extra = {key[len(block) :].split(".")[1] for key in keys if key.startswith(f"{block}conv_extra.")}
        if below <= {"reparam"}:
            renames = [("reparam.", "conv.")]
        elif extra and below <= {"conv_kxk", "conv_extra"} and extra == {"0"}:
            renames = [("conv_kxk.", "conv."), ("conv_extra.0.", "conv1.")]
        elif below <= {"conv_kxk", "conv_1x1", "identity"}:
            renames = [("conv_kxk.", "conv1."), ("conv_1x1.", "conv2."), ("identity.", "bn.")]
        else:
            raise ValueError(
                f"block {block.rstrip('.') or '(the root)'} has branches {', '.join(sorted(below))}: ultralytics' "
                "RepConv has conv_kxk, conv_1x1 and identity, its RepVGGDW conv_kxk and conv_extra.0"
            )
        rename_below(names, block, renames)
    return names
