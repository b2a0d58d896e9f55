"""Optimizer parameter groups and the learning-rate schedule of the RepVGG recipe.

* :func:`param_groups`: weight decay on conv and linear kernels only. The official RepVGG code
  (like most ImageNet recipes since Goyal et al. 2017) takes normalization parameters and biases
  out of weight decay: BN is scale invariant, so decaying its weight only shrinks the effective
  learning rate of the layer before it, and a bias has nothing to regularize.
* :func:`cosine_with_warmup`: linear warm-up, then cosine decay, stepped once per optimizer step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Set

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["NORM_TYPES", "cosine_schedule", "cosine_with_warmup", "param_groups"]

log = logging.getLogger(__name__)

# Every BatchNorm/InstanceNorm variant (SyncBatchNorm and LazyBatchNorm included) derives from _NormBase.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float, *, skip: Set[int] = frozenset()) -> list[dict[str, object]]:
    """Split the trainable parameters into a decayed and a non-decayed group.

    Not decayed: every parameter of a normalization layer (:data:`NORM_TYPES`), every bias, every
    parameter with at most one dimension (layer scales, learnable scalars), and every parameter
    whose ``id`` is in ``skip``. Everything else (conv and linear kernels) gets ``weight_decay``.
    With :func:`repblocks.train.losses.rep_l2` in the loss, pass ``skip=rep_l2_parameters(model)`` so the
    kernels it already decays are not decayed twice.

    Args:
        model: The model; frozen parameters (``requires_grad=False``) are left out, shared ones
            appear once.
        weight_decay: Decay of the decayed group.
        skip: Ids (``id(param)``) of further parameters to keep out of weight decay.

    Returns:
        Parameter groups for any ``torch.optim`` optimizer, each with a ``name`` ("decay",
        "no_decay"; Lightning's ``LearningRateMonitor`` uses it) and its ``weight_decay``.
        A group with no parameters is left out.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_TYPES)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = is_norm or name.endswith("bias") or param.ndim <= 1 or id(param) in skip
            (no_decay if exempt else decay).append(param)
    groups = [
        dict(name="decay", params=decay, weight_decay=weight_decay),
        dict(name="no_decay", params=no_decay, weight_decay=0.0),
    ]
    return [group for group in groups if group["params"]]


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
    warmup_start_ratio: float = 0.01,
) -> LambdaLR:
    """Linear warm-up from ``warmup_start_ratio * lr`` to ``lr``, then cosine decay to ``min_lr_ratio * lr``.

    The factor at scheduler step ``s`` (call ``scheduler.step()`` after every optimizer step; in
    Lightning, ``interval="step"``) is ``warmup_start_ratio`` at ``s = 0``, rises linearly to 1 at
    ``s = warmup_steps``, follows half a cosine down to ``min_lr_ratio`` at ``s = total_steps`` and
    stays there after. ``warmup_steps=0`` starts the cosine at once. When ``total_steps <=
    warmup_steps`` the warm-up is cut to ``total_steps`` and there is no decay (a warning is logged):
    short debugging runs then still run, at the shape they asked for up to where they stop.

    Args:
        optimizer: The optimizer; each group's initial ``lr`` is its base.
        warmup_steps: Optimizer steps of linear warm-up (0 for none).
        total_steps: Optimizer steps of the whole run, warm-up included.
        min_lr_ratio: Final learning rate as a fraction of the base, in [0, 1].
        warmup_start_ratio: First learning rate as a fraction of the base, in [0, 1]; not 0 by
            default, so the first step already updates the weights.

    Raises:
        ValueError: ``total_steps <= 0``, ``warmup_steps < 0`` or a ratio outside [0, 1].
    """
    warmup_steps = _checked_warmup(warmup_steps, total_steps, min_lr_ratio, warmup_start_ratio)
    decay_steps = total_steps - warmup_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_start_ratio + (1.0 - warmup_start_ratio) * step / warmup_steps
        if decay_steps == 0:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def _checked_warmup(warmup_steps: int, total_steps: int, min_lr_ratio: float, warmup_start_ratio: float) -> int:
    """The warm-up steps, cut to ``total_steps`` (with a warning) when longer; a ValueError for a setting out of range."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive (optimizer steps of the whole run), got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be non-negative, got {warmup_steps}")
    for name, ratio in (("min_lr_ratio", min_lr_ratio), ("warmup_start_ratio", warmup_start_ratio)):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {ratio}")
    if total_steps <= warmup_steps:
        log.warning(
            "total_steps (%d) <= warmup_steps (%d): warming up over all %d steps, no cosine decay",
            total_steps,
            warmup_steps,
            total_steps,
        )
    return min(warmup_steps, total_steps)


def cosine_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """:func:`cosine_with_warmup` with the warm-up given in epochs, as training recipes state it.

    This is the form the Lightning module calls (``scheduler(optimizer, total_steps=...,
    steps_per_epoch=...)``), so a config says ``warmup_epochs: 5`` whatever the batch size.
    """
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    return cosine_with_warmup(
        optimizer, warmup_steps=min(warmup_steps, total_steps), total_steps=total_steps, min_lr_ratio=min_lr_ratio
    )
