"""What weights depend on beyond their tensors: the BatchNorm eps and the kind of each block.

A state dict records neither. Weights trained with BatchNorm eps 1e-3 (YOLOv6's) give other outputs
in a model whose BatchNorms use 1e-5, and QARepVGG v2's average-pool branch has no weights, so its
train-form keys are exactly QARepVGG's. :func:`weights_metadata` records both in the files we write
(``save_weights``); :func:`check_recorded` refuses to load such a file into a model that differs.
Another code base's file is read with the eps its loader states (``load_weights(..., bn_eps=)``) or,
unstated, with the model's, which :func:`unstated_bn_eps_note` says, with how to change it; its
QARepVGG blocks load only where the file's kind is known (:func:`check_qa_kind`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from repblocks.blocks import DEFAULT_BN_EPS, RepBlock, resolve_branch_set
from repblocks.checkpoint import WeightsSource, read_safetensors_metadata
from repblocks.layouts import LAYOUT_BN_EPS

__all__ = [
    "BLOCK_KINDS_KEY",
    "BN_EPS_KEY",
    "ambiguous_qa_blocks",
    "assumed_bn_eps",
    "block_kinds",
    "check_qa_kind",
    "check_recorded",
    "check_stated_bn_eps",
    "describe_kind",
    "model_bn_eps",
    "recorded_metadata",
    "unstated_bn_eps_note",
    "weights_metadata",
]

BN_EPS_KEY = "bn_eps"  # metadata: the eps of every BatchNorm of the model (JSON number), when they share one
BLOCK_KINDS_KEY = "block_kinds"  # metadata: the distinct branch sets of its RepBlocks (JSON list of objects)


def model_bn_eps(model: nn.Module) -> set[float]:
    """The eps of the model's BatchNorms, and the ``bn_eps`` of its RepBlocks (a fused block keeps it)."""
    eps = {module.eps for module in model.modules() if isinstance(module, _BatchNorm)}
    return eps | {module.bn_eps for module in model.modules() if isinstance(module, RepBlock)}


def block_kinds(model: nn.Module) -> list[dict]:
    """The distinct branch sets (``RepBlock.branch_config``) of the model's blocks, in order of first use."""
    kinds: list[dict] = []
    for module in model.modules():
        if isinstance(module, RepBlock) and module.branch_config not in kinds:
            kinds.append(dict(module.branch_config))
    return kinds


def describe_kind(kind: Mapping) -> str:
    """A branch set as the block's repr gives it: the branches present, ``scale_branch=conv, post_bn=True``."""
    return ", ".join(f"{key}={value}" for key, value in kind.items() if value) or "no optional branch"


def weights_metadata(model: nn.Module) -> dict[str, str]:
    """The metadata ``save_weights`` records for a model: its BatchNorm eps (when shared) and its block kinds."""
    metadata = {}
    eps = model_bn_eps(model)
    if len(eps) == 1:
        metadata[BN_EPS_KEY] = json.dumps(eps.pop())
    kinds = block_kinds(model)
    if kinds:
        metadata[BLOCK_KINDS_KEY] = json.dumps(kinds)
    return metadata


def recorded_metadata(source: WeightsSource) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file (ours record eps and block kinds); ``{}`` for anything else."""
    if isinstance(source, Mapping):
        return {}
    try:
        return read_safetensors_metadata(source)
    except (ValueError, OSError):  # a pickle or another format: it records nothing of this
        return {}


def assumed_bn_eps(model: nn.Module, state_dict: Mapping, expected: Collection[str]) -> set[float]:
    """The eps the weights' BatchNorm statistics are used with: their BatchNorm's, or the fused block's ``bn_eps``.

    Args:
        model: The model being filled.
        state_dict: The weights, in our layout.
        expected: The model's own keys (a deploy-form block's branch statistics are not among them).
    """
    eps = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, _BatchNorm) and f"{prefix}running_var" in state_dict:
            eps.add(module.eps)
        elif isinstance(module, RepBlock) and module.deploy:
            fused = (
                key
                for key in state_dict
                if key.startswith(prefix) and key.endswith("running_var") and key not in expected
            )
            if any(
                key[len(prefix) :].split(".")[0] in ("conv_kxk", "conv_1x1", "identity", "post_bn") for key in fused
            ):
                eps.add(module.bn_eps)
    return eps


def check_stated_bn_eps(stated: float, assumed: set[float], name: str) -> None:
    """Refuse a model whose BatchNorms that take the weights' statistics use another eps than the one stated.

    Raises:
        ValueError: What was stated, what the model uses, and what to build it with.
    """
    if any(not math.isclose(eps, stated, rel_tol=1e-6) for eps in assumed):
        raise ValueError(
            f"these weights were made with BatchNorm eps {stated:g} (bn_eps={stated:g}), but {name}'s BatchNorms use "
            f"eps {_listed(assumed)}: build it with bn_eps={stated:g} (create_model(..., bn_eps={stated:g}), "
            f"RepBlock(..., bn_eps={stated:g}); nn.BatchNorm2d(..., eps={stated:g}) elsewhere)"
        )


# Where a layout's files may have been made with another eps than BatchNorm's default, and by what code.
_EPS_ORIGINS = {
    "ultralytics": "ultralytics' networks train with eps 1e-3 (initialize_weights), its blocks built alone with 1e-5",
    "yolov6": "YOLOv6's networks train with eps 1e-3 (initialize_weights), its blocks built alone with 1e-5",
    "official": (
        "the official RepVGG code and the QARepVGG authors' train with 1e-5; YOLOv6's RepVGGBlock, whose keys are "
        "the official block's, with 1e-3 inside a YOLOv6 network (initialize_weights)"
    ),
}


def unstated_bn_eps_note(layout: str, assumed: set[float], name: str) -> str | None:
    """What to say when another code base's weights are read with the model's eps, nobody having stated the file's.

    None where no BatchNorm statistics are read, where the model states its eps (built with another than
    BatchNorm's default: someone chose it), or where the layout's code base has one eps only.
    """
    origin = _EPS_ORIGINS.get(layout)
    if origin is None or not assumed or any(not math.isclose(eps, DEFAULT_BN_EPS) for eps in assumed):
        return None
    other = LAYOUT_BN_EPS["yolov6"]  # the note fires for a default-eps model: the other eps is YOLOv6 networks'
    return (
        f"{layout} layout weights do not record their BatchNorm eps ({origin}): they are read with {name}'s "
        f"eps {_listed(assumed)}. For a file made with eps {other:g}, build the model with bn_eps={other:g}; "
        f"to state the file's eps and silence this, load_weights(..., bn_eps=<its eps>)"
    )


def check_recorded(metadata: Mapping[str, str], model: nn.Module, *, assumed: set[float], train_form: bool) -> None:
    """Refuse a file of ours whose recorded BatchNorm eps or block kinds differ from the model's.

    Block kinds matter only for train-form weights (every kind fuses into the same conv); the eps
    only where BatchNorm statistics are loaded (``assumed``, from :func:`assumed_bn_eps`).

    Raises:
        ValueError: What the file records, what the model has, and what to build it with.
    """
    saved_from = f" (saved from {metadata['model']})" if metadata.get("model") else ""
    recorded_eps = _json(metadata, BN_EPS_KEY)
    if isinstance(recorded_eps, (int, float)) and any(
        not math.isclose(eps, recorded_eps, rel_tol=1e-6) for eps in assumed
    ):
        raise ValueError(
            f"these weights{saved_from} were saved from a model with BatchNorm eps {recorded_eps:g}; "
            f"{type(model).__name__}'s BatchNorms use eps {_listed(assumed)}: build it with bn_eps={recorded_eps:g}"
        )
    recorded_kinds = _json(metadata, BLOCK_KINDS_KEY)
    if not train_form or not isinstance(recorded_kinds, list):
        return
    ours = block_kinds(model)
    # A subset: a backbone (features_only) has only some of the blocks of the classifier whose file it loads.
    if not _comparable(ours) <= _comparable(recorded_kinds):
        raise ValueError(
            f"these train-form weights{saved_from} come from blocks with {_kinds(recorded_kinds)}; "
            f"{type(model).__name__}'s blocks have {_kinds(ours)}: the keys may fit (an average pool has no "
            f"weights), the outputs would not. Build the model with the blocks the weights were saved from"
        )


def ambiguous_qa_blocks(model: nn.Module, state_dict: Mapping) -> list[str]:
    """Blocks given train-form weights whose kind the keys cannot tell: QARepVGG v1 or v2.

    v2's average pool has no weights and sits where the plain identity does, so wherever the identity
    exists, weights of either kind fit a block of either kind, with other outputs.
    """
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, RepBlock) or module.branch_config.get("identity_branch") != "plain":
            continue
        if module.branch_config.get("scale_branch") != "conv":
            continue  # QARepVGG's plain 1x1 (RepViT's token mixer has a 1x1 with a bias: no code base pools beside it)
        if not (module.in_channels == module.out_channels and module.stride == 1):
            continue  # no identity, no average pool: v1 and v2 are the same block here
        prefix = f"{name}." if name else ""
        if any(key.startswith(f"{prefix}conv_kxk.") for key in state_dict):
            names.append(name)
    return names


def check_qa_kind(model: nn.Module, state_dict: Mapping, layout: str, stated: str | dict | None) -> None:
    """Refuse QARepVGG weights whose kind (v1, or v2 with an average pool) is unknown or not the model's.

    The keys cannot tell (:func:`ambiguous_qa_blocks`). The QARepVGG authors' code (official layout)
    builds only blocks without the pool, its ``QARepVGGV2`` network included; YOLOv6 builds both
    (QARepVGGBlock, QARepVGGBlockV2), so its files load where ``stated`` (``load_weights(...,
    branches=)``) says which. Our own layout is left to the recorded metadata (:func:`check_recorded`).

    Raises:
        ValueError: The branches the file has (or may have), the model's, and which model takes the file.
    """
    if layout == "repblocks":
        return
    blocks = ambiguous_qa_blocks(model, state_dict)
    if not blocks:
        return
    modules = dict(model.named_modules())
    pooled = {bool(modules[block].branch_config.get("avg_pool_branch")) for block in blocks}
    some = ", ".join(block or "(the model)" for block in blocks[:3]) + (
        f" ... ({len(blocks) - 3} more)" if len(blocks) > 3 else ""
    )
    ours = " and ".join(_QA_KINDS[kind] for kind in sorted(pooled))
    name = type(model).__name__
    if stated is not None:
        file_pooled = bool(resolve_branch_set(stated).get("avg_pool_branch"))
    elif layout == "official":
        file_pooled = False  # the authors' code has no pooled block
    else:
        raise ValueError(
            f"{layout} layout weights of QARepVGG blocks: v1 (QARepVGGBlock) and v2 (QARepVGGBlockV2: an average-pool "
            f"branch) have the same keys, so nothing in them says which they are, and {name}'s blocks ({some}) are "
            f"{ours}: outputs differ between the two. State what the file holds: load_weights(..., branches="
            f"'qarepvgg') for v1, branches='qarepvgg_v2' for v2 (a model of the other kind then refuses it)"
        )
    if pooled != {file_pooled}:
        said = "as stated (branches=...)" if stated is not None else "as the QARepVGG authors' code builds every block"
        raise ValueError(
            f"these {layout} layout weights hold {_QA_KINDS[file_pooled]} QARepVGG blocks ({said}), but {name}'s blocks "
            f"({some}) are {ours}: the keys fit, the outputs would not. Load them into a model of branch set "
            f"'{'qarepvgg_v2' if file_pooled else 'qarepvgg'}' (create_model('{'qarepvgg_v2' if file_pooled else 'qarepvgg'}_...'))"
        )


_QA_KINDS = {False: "v1 (kxk Conv+BN, plain 1x1, identity, BN after the sum)", True: "v2 (v1 and an average pool)"}


def _json(metadata: Mapping[str, str], key: str) -> object:
    try:
        return json.loads(metadata[key]) if key in metadata else None
    except (TypeError, json.JSONDecodeError):
        return None


def _comparable(kinds: list) -> set[str]:
    # Absent branches (None, False) are left out, so a branch kind added later does not make older files differ.
    # DBB's 1x1 was "bn" before "bn_unless_depthwise" said where it is absent; the keys tell a depthwise block.
    # extra_kernels' pairs compare as the JSON lists a file records.
    return {
        json.dumps(
            {
                key: _SAME_BRANCH.get(value, value) if isinstance(value, str) else value
                for key, value in kind.items()
                if value
            },
            sort_keys=True,
        )
        for kind in kinds
        if isinstance(kind, Mapping)
    }


_SAME_BRANCH = {"bn_unless_depthwise": "bn"}


def _kinds(kinds: list) -> str:
    return "; ".join(f"[{describe_kind(kind)}]" for kind in kinds if isinstance(kind, Mapping))


def _listed(values: set[float]) -> str:
    return ", ".join(f"{value:g}" for value in sorted(values))
