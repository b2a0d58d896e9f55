"""What weights depend on beyond their tensors: the BatchNorm eps and the kind of each block.

A state dict records neither. Weights trained with BatchNorm eps 1e-3 (YOLOv6's) give other outputs
in a model whose BatchNorms use 1e-5, and QARepVGG v2's average-pool branch has no weights, so its
train-form keys are exactly QARepVGG's. :func:`weights_metadata` records both in the files we write
(``save_weights``); :func:`check_recorded` refuses to load such a file into a model that differs, and
:func:`check_layout_eps` refuses weights of a code base known to train with another eps
(:data:`repblocks.layouts.LAYOUT_BN_EPS`) unless the model uses it too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from repblocks.blocks import RepBlock
from repblocks.checkpoint import WeightsSource, read_safetensors_metadata
from repblocks.layouts import LAYOUT_BN_EPS

__all__ = [
    "BLOCK_KINDS_KEY",
    "BN_EPS_KEY",
    "ambiguous_qa_blocks",
    "assumed_bn_eps",
    "block_kinds",
    "check_layout_eps",
    "check_recorded",
    "describe_kind",
    "model_bn_eps",
    "recorded_metadata",
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


def check_layout_eps(layout: str, assumed: set[float], name: str) -> None:
    """Refuse weights of a code base that trains with another BatchNorm eps than the model's.

    Raises:
        ValueError: The layout's code base trains with an eps (YOLOv6: 1e-3) that some of the model's
            BatchNorms do not use; the message says what to build the model with.
    """
    wanted = LAYOUT_BN_EPS.get(layout)
    if wanted is None or all(math.isclose(eps, wanted, rel_tol=1e-6) for eps in assumed):
        return
    raise ValueError(
        f"these are {layout} weights, trained with BatchNorm eps {wanted:g} (a state dict does not record eps), but "
        f"{name}'s BatchNorms use eps {_listed(assumed)}: outputs would be off. Build the model with "
        f"bn_eps={wanted:g} (create_model(..., bn_eps={wanted:g}), RepBlock(..., bn_eps={wanted:g}); "
        f"nn.BatchNorm2d(..., eps={wanted:g}) elsewhere)"
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
        if not (module.in_channels == module.out_channels and module.stride == 1):
            continue  # no identity, no average pool: v1 and v2 are the same block here
        prefix = f"{name}." if name else ""
        if any(key.startswith(f"{prefix}conv_kxk.") for key in state_dict):
            names.append(name)
    return names


def _json(metadata: Mapping[str, str], key: str) -> object:
    try:
        return json.loads(metadata[key]) if key in metadata else None
    except (TypeError, json.JSONDecodeError):
        return None


def _comparable(kinds: list) -> set[str]:
    # Absent branches (None, False) are left out, so a branch kind added later does not make older files differ.
    return {
        json.dumps({key: value for key, value in kind.items() if value}, sort_keys=True)
        for kind in kinds
        if isinstance(kind, Mapping)
    }


def _kinds(kinds: list) -> str:
    return "; ".join(f"[{describe_kind(kind)}]" for kind in kinds if isinstance(kind, Mapping))


def _listed(values: set[float]) -> str:
    return ", ".join(f"{value:g}" for value in sorted(values))
