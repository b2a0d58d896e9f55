"""Weights in and out: loading any supported layout (train-to-deploy fusion on the way), saving as safetensors.

``load_weights`` reads a file safely (:mod:`repblocks.checkpoint`), renames other code bases' keys
to ours (:mod:`repblocks.layouts`), fuses train-form branches where the target model is already in
deploy form, and loads. We write weights as safetensors, atomically.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from repblocks.blocks import BRANCH_MODULES, RepBlock
from repblocks.checkpoint import StateDict, WeightsSource, read_state_dict
from repblocks.files import atomic_path
from repblocks.layouts import LAYOUT_BN_EPS, detect_layout, to_repblocks_layout
from repblocks.online import ONLINE_BRANCH_MODULES
from repblocks.provenance import (
    BLOCK_KINDS_KEY,
    BN_EPS_KEY,
    ambiguous_qa_blocks,
    assumed_bn_eps,
    check_qa_kind,
    check_recorded,
    check_stated_bn_eps,
    recorded_metadata,
    unstated_bn_eps_note,
    weights_metadata,
)

__all__ = ["load_weights", "save_weights", "weights_form"]

log = logging.getLogger(__name__)

# Keys of a RepBlock's train-form branches and of its fused conv, below the block's own name.
_BRANCH = re.compile(rf"(^|\.)({'|'.join(BRANCH_MODULES)})\.")  # post_bn is no branch: it may stay
_FUSED = re.compile(r"(^|\.)reparam\.weight$")


def load_weights(
    model: nn.Module,
    source: WeightsSource,
    *,
    strict: bool = True,
    metadata: Mapping[str, str] | None = None,
    bn_eps: float | None = None,
    branches: str | dict | None = None,
) -> nn.Module:
    """Load weights from a file or state dict into ``model``, in place, and return it.

    Any layout of :data:`repblocks.layouts.LAYOUTS` is read (the one recognised is logged at INFO).
    Train-form weights loaded into a deploy-form model (``deploy=True``) are fused on the way, in
    float64 from the values given, and rounded once to the model's own dtype. A model without a
    classifier (``features_only``, ``num_classes=0``) takes classifier checkpoints: their ``head.*``
    keys are dropped (and logged). A ``torch.compile``d or DataParallel/DDP-wrapped model is filled
    through the module it wraps, without compiling anything.

    A state dict does not record BatchNorm's eps: the weights' statistics are used with the model's
    (logged at INFO). Where the file's code base makes files with more than one eps (YOLOv6: 1e-3 in
    its networks, 1e-5 in a block built alone; the official layout, whose block keys YOLOv6's
    RepVGGBlock shares) and neither ``bn_eps`` nor the model (built with another eps than the default)
    states it, the log says which eps is used and how to change it. A file of ours
    (:func:`save_weights` records eps and block kinds) is refused by a model that differs in either.
    QARepVGG v1 and v2 weights have the same keys: another code base's load only where the kind is
    known (the QARepVGG authors' code builds v1 only) or stated (``branches``) and is the model's.

    Args:
        model: The model to fill.
        source: A path (``.pth``, ``.pt``, ``.ckpt``, ``.safetensors``) or a state dict.
        strict: Raise when keys are missing or unexpected (fused branches included); otherwise log
            them and load the rest. Keys whose shape differs from the model's raise either way.
        metadata: What the file of the given state dict records (:func:`save_weights`' metadata);
            read from the file itself when ``source`` is a path.
        bn_eps: The BatchNorm eps the weights were made with, where the file does not record it:
            the model's BatchNorms that take their statistics must use it.
        branches: The branch set of the file's QARepVGG blocks (``"qarepvgg"``, ``"qarepvgg_v2"``: YOLOv6's
            QARepVGGBlock, QARepVGGBlockV2), which their keys cannot tell.

    Raises:
        ValueError: The weights do not fit the model (the message names the keys and any block
            left unfused), were made with another BatchNorm eps or other blocks than the model's or
            than stated, hold QARepVGG blocks of an unknown kind (the message says what to build the
            model with or to state), or the file cannot be read safely (see :func:`read_state_dict`).
    """
    target = _wrapped_module(model)
    expected = target.state_dict()
    roots = {key.split(".")[0] for key in expected}
    given = read_state_dict(source)
    layout = detect_layout(given)
    state_dict = to_repblocks_layout(given, roots, keep=expected.keys())
    name = type(target).__name__
    state_dict = _drop_classifier_if_headless(state_dict, expected, name)
    assumed = assumed_bn_eps(target, state_dict, expected)
    eps = f"; BatchNorm eps {', '.join(f'{e:g}' for e in sorted(assumed))} (the model's)" if assumed else ""
    log.info("loading weights into %s: %s layout%s%s", name, layout, _form(state_dict), eps)
    metadata = recorded_metadata(source) if metadata is None else metadata
    if bn_eps is not None:
        check_stated_bn_eps(bn_eps, assumed, name)
    elif BN_EPS_KEY not in metadata:
        note = unstated_bn_eps_note(layout, assumed, name)
        if note:
            log.log(logging.WARNING if layout in LAYOUT_BN_EPS else logging.INFO, note)
    check_recorded(metadata, target, assumed=assumed, train_form=any(_BRANCH.search(k) for k in state_dict))
    check_qa_kind(target, state_dict, layout, branches)
    if BLOCK_KINDS_KEY not in metadata and layout == "repblocks":
        _say_qarepvgg_version_is_unknown(target, state_dict)
    fused = _fuse_train_form_into_deploy(target, state_dict, expected)
    state_dict = fused.state_dict
    missing = [
        k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked") and k not in fused.replaced
    ] + fused.missing
    unexpected = [k for k in state_dict if k not in expected] + fused.unexpected
    reshaped = [
        f"{k}: {tuple(state_dict[k].shape)} in the weights, {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ] + fused.reshaped
    if reshaped or (strict and (missing or unexpected)):
        raise ValueError(
            f"weights do not fit {name}: " + _describe(missing, unexpected, reshaped, fused.unfused, layout=layout)
        )
    if missing or unexpected:
        described = _describe(missing, unexpected, [], fused.unfused, layout=layout)
        log.warning("loading into %s with strict=False: %s", name, described)
    for key in expected:  # older checkpoints lack BN's step counter; it does not affect outputs
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = expected[key]
    target.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
    return model


def _wrapped_module(model: nn.Module) -> nn.Module:
    """The module whose weights ``model`` holds: wrappers prefix every key (``_orig_mod.``, ``module.``)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def weights_form(state_dict: StateDict) -> str | None:
    """``"deploy"`` (fused blocks only), ``"train"`` (branches only), ``"both"``, or None (no re-parameterizable blocks).

    Any layout of :data:`repblocks.layouts.LAYOUTS` is read.
    """
    keys = to_repblocks_layout(state_dict).keys()
    fused = any(_FUSED.search(key) for key in keys)
    branches = any(_BRANCH.search(key) for key in keys)
    return {(True, False): "deploy", (False, True): "train", (True, True): "both"}.get((fused, branches))


def _form(state_dict: StateDict) -> str:
    """Whether re-parameterizable blocks come fused, as branches, or both; empty for other networks."""
    fused = any(_FUSED.search(key) for key in state_dict)
    branches = any(_BRANCH.search(key) for key in state_dict)
    return {(True, False): ", deploy form", (False, True): ", train form", (True, True): ", train and deploy form"}.get(
        (fused, branches), ""
    )


def _drop_classifier_if_headless(state_dict: StateDict, expected: Mapping[str, Tensor], name: str) -> StateDict:
    """A backbone takes a classifier's weights: without a head in the model, the checkpoint's head goes."""
    if any(key.startswith("head.") for key in expected):
        return state_dict
    dropped = [key for key in state_dict if key.startswith("head.")]
    if dropped:
        log.info("%s has no classifier head: dropping the weights' %s", name, ", ".join(dropped))
    return {key: value for key, value in state_dict.items() if key not in dropped}


def _say_qarepvgg_version_is_unknown(model: nn.Module, state_dict: StateDict) -> None:
    """Our QARepVGG v1 and v2 weights have the same keys: say which one the model takes them for (INFO).

    Only for our own layout, whose files record block kinds and whose run checkpoints name their model;
    another code base's are checked (:func:`repblocks.provenance.check_qa_kind`).
    """
    blocks = ambiguous_qa_blocks(model, state_dict)
    if not blocks:
        return
    modules = dict(model.named_modules())
    by_version = {"v1 (no average pool)": [], "v2 (an average pool)": []}
    for block in blocks:
        pooled = bool(modules[block].branch_config.get("avg_pool_branch"))
        by_version["v2 (an average pool)" if pooled else "v1 (no average pool)"].append(block or "(the model)")
    taken_as = "; ".join(
        f"{version}: {', '.join(names[:3])}{f' ... ({len(names) - 3} more)' if len(names) > 3 else ''}"
        for version, names in by_version.items()
        if names
    )
    log.info(
        "weights of QARepVGG blocks: QARepVGG v1 and v2 (an extra average-pool branch) have the same keys, and "
        "these weights record neither. They are loaded as the model's blocks are, %s",
        taken_as,
    )


def _describe(
    missing: list[str], unexpected: list[str], reshaped: list[str], unfused: list[str] = (), *, layout: str = ""
) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f", ... ({len(keys) - 5} more)" if len(keys) > 5 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({some(unexpected)})")
    if reshaped:
        parts.append(f"{len(reshaped)} keys with another shape ({some(reshaped)})")
    if unfused:
        parts.append(
            f"{len(unfused)} deploy-form block(s) left unfused for want of their branches' weights: their fused conv "
            f"keeps the weights it had, a new model's random init ({some(unfused)})"
        )
    hint = ""
    if any(k.endswith("reparam.weight") for k in unexpected) and any(
        re.search(r"(^|\.)conv_kxk\.", k) for k in missing
    ):
        fused_by_us = " (OREPA's train form is read as its fused conv: no branch set here holds its branches)"
        hint = f"; these are deploy-form weights{fused_by_us if layout == 'orepa' else ''}: build the model with deploy=True"
    elif any(re.search(r"(^|\.)conv_kxk\.(\d+\.)?scale$", k) for k in unexpected):
        hint = "; these are online-mode weights (repblocks.online): build the model with block_mode='online'"
    return "; ".join(parts) + hint


@dataclass
class _Fused:
    """Train-form weights fused for a deploy-form model, and what did not fit the branches."""

    state_dict: StateDict
    replaced: set[str] = field(default_factory=set)  # the model's fused keys, given as branches instead
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)
    unfused: list[str] = field(default_factory=list)  # blocks whose fused conv keeps its own (random) weights


def _fuse_train_form_into_deploy(model: nn.Module, state_dict: StateDict, expected: Mapping[str, Tensor]) -> _Fused:
    """Where the model has a fused block and the weights have another form of it, fuse them now.

    The other form is the train form (branches), or a deploy form that kept the BatchNorm after the
    sum (YOLOv6's QARepVGG, or ours with ``keep_post_bn``) for a model that folds it. Besides RepBlocks,
    any deploy-form module with a ``train_form()`` (an empty twin in its train form: RepViT's classifier
    head) takes its train-form weights so. The weights are checked against that form like any other keys:
    a missing or an extra branch is reported, never filled with defaults. Fusion runs in float64 from the
    values given (fp16 weights included) and rounds once, to the dtype of the model's own fused conv.
    """
    fused = _Fused(dict(state_dict))
    for name, block in model.named_modules():
        is_block = isinstance(block, RepBlock)
        if not _says_deployed(block) or not (is_block or callable(getattr(block, "train_form", None))):
            continue
        prefix = f"{name}." if name else ""
        belongs = _fusable if is_block else lambda key: True
        given_keys = [k for k in fused.state_dict if k.startswith(prefix) and belongs(k[len(prefix) :])]
        given = {k[len(prefix) :]: fused.state_dict[k] for k in given_keys}
        own = [k for k in block.state_dict() if belongs(k)]
        if is_block:
            branches = any(_BRANCH.match(k) for k in given)
            kept_post_bn = block.post_bn is None and any(k.startswith("post_bn.") for k in given)
            if not (branches or kept_post_bn):
                continue  # the block's own form (or keys simply missing): loaded and reported as usual
            twin = _twin_of(block, deploy=not branches)
            form = "train" if branches else "deploy"
        else:
            if set(given) <= set(own):
                continue
            twin = block.train_form().to(device="cpu", dtype=torch.float64)
            form = "train"
        for key in given_keys:
            del fused.state_dict[key]
        fused.replaced |= {prefix + k for k in own}
        wanted = twin.state_dict()
        missing = [k for k in wanted if k not in given and not k.endswith("num_batches_tracked")]
        reshaped = [
            f"{prefix}{k}: {tuple(v.shape)} in the weights, {tuple(wanted[k].shape)} in the model's {form} form"
            for k, v in given.items()
            if k in wanted and v.shape != wanted[k].shape
        ]
        fused.missing += [prefix + k for k in missing]
        fused.unexpected += [prefix + k for k in given if k not in wanted]
        fused.reshaped += reshaped
        if missing or reshaped:
            fused.unfused.append(name or "(the model itself)")
            continue  # nothing to fuse faithfully; the block keeps its own weights and the keys are reported
        twin.load_state_dict({k: v for k, v in given.items() if k in wanted}, strict=False)
        if is_block:
            twin.switch_to_deploy(keep_post_bn=block.post_bn is not None)
        else:
            twin.switch_to_deploy()
        for key, value in twin.state_dict().items():
            if key in own:
                target = expected[prefix + key]
                fused.state_dict[prefix + key] = value.detach().to(target.device, target.dtype)
    _fold_other_train_weights(model, fused)
    return fused


def _says_deployed(module: nn.Module) -> bool:
    """Whether a module says it is in deploy form (its ``deploy`` is True)."""
    return getattr(module, "deploy", False) is True


def _fold_other_train_weights(model: nn.Module, fused: _Fused) -> None:
    """Deploy-form modules beside RepBlocks that fold more than branches (UniRepLKNet's FFN) read train-form weights.

    Such a module says how with ``fold_train_weights(given)``: its keys from the train-form ones below its name
    (its RepBlocks' already fused above), or None when there is nothing to fold.
    """
    for name, module in model.named_modules():
        fold = getattr(module, "fold_train_weights", None)
        if not callable(fold):
            continue
        prefix = f"{name}." if name else ""
        given = {k[len(prefix) :]: v for k, v in fused.state_dict.items() if k.startswith(prefix)}
        folded = fold(given)
        if folded is None:
            continue
        for key in given:
            del fused.state_dict[prefix + key]
        fused.state_dict |= {prefix + k: v for k, v in folded.items()}


def _fusable(key: str) -> bool:
    """Whether a key below a RepBlock's name belongs to what fusion turns into ``reparam`` (not SE, not act)."""
    # avg_pool: an online block's pool branch has a scale (repblocks.online); RepBlock's has no weights.
    return key.split(".")[0] in (*BRANCH_MODULES, *ONLINE_BRANCH_MODULES, "avg_pool", "reparam", "post_bn")


def _twin_of(block: RepBlock, *, deploy: bool) -> RepBlock:
    """An empty float64 twin of a fused block on the CPU, in train form or in deploy form with its post-sum BN kept.

    Of the block's own class: an online block's train form (repblocks.online) has other keys than RepBlock's.
    """
    with torch.device("meta"):  # no random init of weights about to be overwritten
        twin = type(block)(
            block.in_channels,
            block.out_channels,
            stride=block.stride,
            groups=block.groups,
            kernel_size=block.kernel_size,
            **block.branch_config,
            keep_post_bn=True,
            act=None,
            bn_eps=block.bn_eps,  # the eps the weights were trained with, as the deploy-form block was told
            deploy=deploy,
        )
    # Module.to(dtype) leaves BN's integer step counters alone; float64 holds fp16/bf16/fp32 values exactly.
    return twin.to_empty(device="cpu").to(torch.float64)


def save_weights(
    source: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write a model's (or a state dict's) weights to ``path`` as safetensors, atomically.

    The file is written under a temporary name in the same folder and renamed, so a failure
    never leaves half a file at ``path``. Tensors that share memory (tied weights) are stored
    as copies of their own, which safetensors requires. A model's file also records what its
    weights depend on beyond the tensors (``bn_eps``, ``block_kinds``: see
    :func:`repblocks.provenance.weights_metadata`), which :func:`load_weights` checks; ``metadata``
    adds to it.
    """
    if isinstance(source, nn.Module):
        metadata = {**weights_metadata(_wrapped_module(source)), **(metadata or {})}
    state_dict = source.state_dict() if isinstance(source, nn.Module) else source
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    # safetensors refuses tensors that share memory (tied weights): such a tensor is stored as its own copy.
    storages = set()
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in storages:
            tensors[key] = tensor.clone()
        storages.add(storage)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
    return Path(path)
