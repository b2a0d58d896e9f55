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
from pathlib import Path

import safetensors.torch
from torch import Tensor, nn

from repblocks.blocks import RepBlock
from repblocks.checkpoint import RunCheckpoint, StateDict, WeightsSource, read_state_dict
from repblocks.files import atomic_path
from repblocks.layouts import to_repblocks_layout
from repblocks.registry import create_model

__all__ = ["build_run_model", "load_weights", "save_weights"]

log = logging.getLogger(__name__)


def load_weights(model: nn.Module, source: WeightsSource, *, strict: bool = True) -> nn.Module:
    """Load weights from a file or state dict into ``model``, in place, and return it.

    Train-form weights loaded into a deploy-form model (``deploy=True``) are fused on the way.

    Args:
        model: The model to fill.
        source: A path (``.pth``, ``.pt``, ``.ckpt``, ``.safetensors``) or a state dict.
        strict: Raise when keys are missing or unexpected; otherwise log them and load the rest.

    Raises:
        ValueError: The weights do not fit the model (the message names the keys), or the file
            cannot be read safely (see :func:`read_state_dict`).
    """
    expected = model.state_dict()
    roots = {key.split(".")[0] for key in expected}
    state_dict = to_repblocks_layout(read_state_dict(source), roots, keep=expected.keys())
    state_dict = _fuse_train_form_into_deploy(model, state_dict)
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [
        f"{k}: {tuple(state_dict[k].shape)} in the weights, {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    name = type(model).__name__
    if reshaped or (strict and (missing or unexpected)):
        raise ValueError(f"weights do not fit {name}: " + _describe(missing, unexpected, reshaped))
    if missing or unexpected:
        log.warning("loading into %s with strict=False: %s", name, _describe(missing, unexpected, []))
    for key in expected:  # older checkpoints lack BN's step counter; it does not affect outputs
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = expected[key]
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
    return model


def _describe(missing: list[str], unexpected: list[str], reshaped: list[str]) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f", ... ({len(keys) - 5} more)" if len(keys) > 5 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({some(unexpected)})")
    if reshaped:
        parts.append(f"{len(reshaped)} keys with another shape ({some(reshaped)})")
    hint = ""
    if any(k.endswith("reparam.weight") for k in unexpected) and any(".conv_kxk." in k for k in missing):
        hint = "; these are deploy-form weights: build the model with deploy=True"
    return "; ".join(parts) + hint


def _fuse_train_form_into_deploy(model: nn.Module, state_dict: StateDict) -> StateDict:
    """Where the model has a fused block and the weights have its branches, fuse them now."""
    for name, block in model.named_modules():
        if not isinstance(block, RepBlock) or not block.deploy:
            continue
        prefix = f"{name}." if name else ""
        branch_keys = [
            k
            for k in state_dict
            if k.startswith(prefix) and re.match(r"(conv_kxk|conv_1x1|identity)\.", k[len(prefix) :])
        ]
        if not branch_keys or f"{prefix}reparam.weight" in state_dict:
            continue
        train_block = RepBlock(
            block.in_channels,
            block.out_channels,
            stride=block.stride,
            groups=block.groups,
            kernel_size=block.kernel_size,
            act=None,
        )
        branches = {k[len(prefix) :]: state_dict.pop(k) for k in branch_keys}
        try:
            train_block.load_state_dict(branches, strict=False)
        except RuntimeError as err:
            raise ValueError(f"weights do not fit block {name!r}: {str(err).splitlines()[-1].strip()}") from None
        train_block.to(dtype=next(iter(branches.values())).dtype).switch_to_deploy()
        state_dict[f"{prefix}reparam.weight"] = train_block.reparam.weight.detach()
        state_dict[f"{prefix}reparam.bias"] = train_block.reparam.bias.detach()
    return state_dict


def save_weights(
    source: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write a model's (or a state dict's) weights to ``path`` as safetensors, atomically.

    The file is written under a temporary name in the same folder and renamed, so a failure
    never leaves half a file at ``path``.
    """
    state_dict = source.state_dict() if isinstance(source, nn.Module) else source
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def build_run_model(run: RunCheckpoint) -> nn.Module:
    """The network of a train.py checkpoint (:func:`repblocks.checkpoint.read_run_checkpoint`), in eval mode.

    Raises:
        ValueError: The checkpoint names a model that is not registered, or its weights do not fit.
    """
    model = create_model(run.model_name, num_classes=run.num_classes, in_chans=run.in_chans, **run.model_kwargs)
    return load_weights(model, run.state_dict).eval()
