"""Model size and cost: parameters and multiply-accumulates, in train and deploy form.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (which counts a multiply-add as
two FLOPs) and halved, because the RepVGG paper's "FLOPs" column, like most vision papers', counts
multiply-adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from repblocks.convert import switch_to_deploy
from repblocks.registry import create_model

__all__ = ["ModelCost", "count_macs", "count_params", "model_cost"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics not included)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass at ``input_size``, on a zero input."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            reference = next(model.parameters())
            model(torch.zeros(input_size, device=reference.device, dtype=reference.dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


@dataclass(frozen=True)
class ModelCost:
    """Parameters in both forms and MACs of the deploy form, for one registered model."""

    name: str
    train_params: int
    deploy_params: int
    deploy_macs: int  # at 224x224, batch 1


def model_cost(name: str, image_size: int = 224) -> ModelCost:
    """Build ``name``, convert it, and count both forms (1000 classes, as in the paper)."""
    model = create_model(name)
    deploy = switch_to_deploy(model)
    return ModelCost(
        name, count_params(model), count_params(deploy), count_macs(deploy, (1, 3, image_size, image_size))
    )
