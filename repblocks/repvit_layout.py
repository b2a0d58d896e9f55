"""The RepViT authors' layout (THU-MIG/RepViT, ``model/repvit.py``) as timm's, and back.

The authors' network is one flat list, ``features.0`` (the stem: ``features.0.0`` and ``features.0.2``)
then one ``RepViTBlock`` per row of their config; timm's (and ours) nests the rows into four stages,
each but the first opening with a downsample. Which row is which is read from the keys: a stride-2 row
(``token_mixer.0`` a depthwise stride-2 Conv+BN, ``token_mixer.2`` a 1x1 Conv+BN to the new width,
``channel_mixer`` the MLP after it) is a stage's downsample, the row before it that downsample's
``pre_block``, and the rows between two downsamples the stage's blocks. The classifier
(``classifier.classifier``, ``classifier.classifier_dist``, each ``bn``/``l``) is timm's ``head.head``
and ``head.head_dist``; fused (the authors' ``replace_batchnorm``), every Conv+BN is one conv where it
was and the classifier one Linear, as timm's ``fuse()`` leaves them. The rest of the renaming (timm's
names to ours) is :mod:`repblocks.layouts`' table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

__all__ = ["authors_to_timm", "timm_to_authors"]

_ROW = re.compile(r"^features\.(\d+)\.(.*)$")
# Inside a stride-1 row: the authors' Sequential(RepVGGDW, SE) and Residual(Sequential(conv, act, conv)).
_BLOCK_PARTS = [
    (r"^token_mixer\.0\.", "token_mixer."),
    (r"^token_mixer\.1\.", "se."),
    (r"^channel_mixer\.m\.0\.", "channel_mixer.conv1."),
    (r"^channel_mixer\.m\.2\.", "channel_mixer.conv2."),
]
# Inside a stride-2 row: Sequential(dw conv, SE or nothing, 1x1 conv) and the residual MLP.
_DOWNSAMPLE_PARTS = [
    (r"^token_mixer\.0\.", "spatial_downsample."),
    (r"^token_mixer\.2\.", "channel_downsample."),
    (r"^channel_mixer\.m\.0\.", "ffn.conv1."),
    (r"^channel_mixer\.m\.2\.", "ffn.conv2."),
]
_STEM = [(r"^0\.", "stem.conv1."), (r"^2\.", "stem.conv2.")]
_CLASSIFIER = [(r"^classifier\.classifier_dist\.", "head.head_dist."), (r"^classifier\.classifier\.", "head.head.")]
_CLASSIFIER_FUSED = (r"^classifier\.(weight|bias)$", r"head.\1")


def _sub_first(rules: list[tuple[str, str]], text: str) -> str:
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, text)
        if count:
            return renamed
    return text


def _row_places(rows: set[int], downsamples: list[int]) -> dict[int, str]:
    """Each row's timm module name: ``stages.i.blocks.j``, ``stages.i.downsample`` or its ``pre_block``."""
    places, stage, block = {}, 0, 0
    for row in sorted(rows):
        if row in downsamples:
            stage, block = stage + 1, 0
            places[row] = f"stages.{stage}.downsample"
        elif row + 1 in downsamples:
            places[row] = f"stages.{stage + 1}.downsample.pre_block"
        else:
            places[row] = f"stages.{stage}.blocks.{block}"
            block += 1
    return places


def authors_to_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The authors' keys as timm's RepVit names them (keys of no RepViT row kept as they are)."""
    rows = {int(m[1]) for key in state_dict if (m := _ROW.match(key)) and m[1] != "0"}
    downsamples = sorted(
        {int(m[1]) for key in state_dict if (m := _ROW.match(key)) and m[2].startswith("token_mixer.2.")}
    )
    places = _row_places(rows, downsamples)
    renamed = {}
    for key, value in state_dict.items():
        match = _ROW.match(key)
        if match is None:
            new = re.sub(*_CLASSIFIER_FUSED, _sub_first(_CLASSIFIER, key))
        elif match[1] == "0":
            new = _sub_first(_STEM, match[2])
        else:
            row, rest = int(match[1]), match[2]
            parts = _DOWNSAMPLE_PARTS if row in downsamples else _BLOCK_PARTS
            new = f"{places[row]}.{_sub_first(parts, rest)}"
        renamed[new] = value
    return renamed


_TIMM_STAGE = re.compile(r"^stages\.(\d+)\.(downsample\.pre_block|downsample|blocks\.(\d+))\.(.*)$")


def timm_to_authors(names: Mapping[str, str]) -> dict[str, str]:
    """``names`` (each key's timm name, as :func:`repblocks.layouts.convert_layout` computes it) as the authors'."""
    depths: dict[int, int] = {}
    for new in names.values():
        if (match := _TIMM_STAGE.match(new)) and match[3] is not None:
            depths[int(match[1])] = max(depths.get(int(match[1]), 0), int(match[3]) + 1)
    first_row, row = {}, 1
    for stage in range(max(depths, default=-1) + 1):
        first_row[stage] = row  # of the stage's pre_block, or of its first block in stage 0
        row += depths.get(stage, 0) + (2 if stage > 0 else 0)
    authors = {}
    for key, new in names.items():
        match = _TIMM_STAGE.match(new)
        if match is None:
            authors[key] = _timm_outside_stages(new)
            continue
        stage, where, block, rest = int(match[1]), match[2], match[3], match[4]
        if where == "downsample":
            row, rest = first_row[stage] + 1, _sub_first(_inverse(_DOWNSAMPLE_PARTS), rest)
        else:
            offset = 0 if where == "downsample.pre_block" else int(block) + (2 if stage > 0 else 0)
            row, rest = first_row[stage] + offset, _sub_first(_inverse(_BLOCK_PARTS), rest)
        authors[key] = f"features.{row}.{rest}"
    return authors


def _inverse(rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The renames of a ``_*_PARTS`` table backwards (its patterns are plain prefixes with escaped dots)."""
    return [(f"^{re.escape(new)}", old.removeprefix("^").replace("\\.", ".")) for old, new in rules]


def _timm_outside_stages(name: str) -> str:
    for pattern, replacement in [
        (r"^stem\.conv1\.", "features.0.0."),
        (r"^stem\.conv2\.", "features.0.2."),
        (r"^head\.head_dist\.", "classifier.classifier_dist."),
        (r"^head\.head\.", "classifier.classifier."),
        (r"^head\.(weight|bias)$", r"classifier.\1"),
    ]:
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    return name
