"""Which BatchNorms a fold knows: their classes, and what is left in a BatchNorm's place once it is folded.

A BatchNorm in eval mode is an affine map per channel, so it folds into the conv before it. A
*subclass* may do more in its forward: timm's ``BatchNormAct2d`` family also applies a dropout and
an activation (folded as a plain BatchNorm, the activation would be lost). So a fold takes only the
classes listed here, by exact class, and leaves every other BatchNorm-like module as it is, with a
reason (:func:`unknown_reason`). Classes of torchvision and timm are looked up only if those packages
are already imported: a model can hold one only then, and the core imports neither.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "DropAct",
    "after_fold",
    "frozen_batch_norms",
    "is_batch_norm_like",
    "known_batch_norms",
    "normalization_only",
    "unknown_reason",
]

# What takes a BatchNorm's place once folded into its conv, by the BatchNorm's exact class.
AfterFold = Callable[[nn.Module], nn.Module]


class DropAct(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its BatchNorm is folded into the conv before it: drop, then act.

    The attribute names are BatchNormAct2d's, so their keys (a PReLU's weight) stay as they were.
    """

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


def _identity(bn: nn.Module) -> nn.Module:
    return nn.Identity()


def _drop_act(bn: nn.Module) -> nn.Module:
    # timm's SyncBatchNormAct gets drop and act only when converted from a BatchNormAct2d (hasattr in its forward).
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    return DropAct(nn.Identity() if drop is None else drop, nn.Identity() if act is None else act)


def frozen_batch_norms() -> tuple[type, ...]:
    """torchvision's ``FrozenBatchNorm2d`` (detection backbones; timm's is the same class) when torchvision is loaded."""
    misc = sys.modules.get("torchvision.ops.misc")
    return (misc.FrozenBatchNorm2d,) if misc is not None else ()


def known_batch_norms() -> dict[type, AfterFold]:
    """Every BatchNorm class a fold takes, with what is left in its place once folded."""
    known: dict[type, AfterFold] = {
        cls: _identity for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    }
    known.update({cls: _identity for cls in frozen_batch_norms()})
    norm_act = sys.modules.get("timm.layers.norm_act")
    if norm_act is not None:
        for name in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"):
            if hasattr(norm_act, name):
                known[getattr(norm_act, name)] = _drop_act
    return known


def is_batch_norm_like(module: nn.Module) -> bool:
    """A BatchNorm, a subclass, or a module that looks like one (running statistics and eps: other frozen BatchNorms)."""
    if isinstance(module, _BatchNorm) or type(module) in known_batch_norms():
        return True
    return all(isinstance(getattr(module, name, None), Tensor) for name in ("running_mean", "running_var")) and hasattr(
        module, "eps"
    )


def after_fold(bn: nn.Module) -> nn.Module:
    """What takes ``bn``'s place once it is folded into its conv (``nn.Identity``, or timm's drop and activation)."""
    return known_batch_norms()[type(bn)](bn)


def unknown_reason(bn: nn.Module) -> str | None:
    """Why a BatchNorm-like module after a conv is not folded, or None when a fold knows its class."""
    if type(bn) in known_batch_norms():
        return None
    return (
        f"{type(bn).__module__}.{type(bn).__qualname__} is not a BatchNorm class the fold knows "
        "(its forward may do more than normalize, e.g. apply an activation)"
    )


@torch.no_grad()
def normalization_only(bn: nn.Module) -> nn.Module:
    """A copy of a known BatchNorm without what its forward does after normalizing (timm's drop and activation).

    Of ``bn``'s own class when it only normalizes; timm's ``BatchNormAct2d`` family becomes ``nn.BatchNorm2d``
    (``FrozenBatchNormAct2d``: torchvision's ``FrozenBatchNorm2d``), with the same settings, statistics and
    affine parameters: what :func:`repblocks.expand` puts in a branch, whose sum the activation must follow.
    """
    if known_batch_norms()[type(bn)] is _identity:
        return copy.deepcopy(bn)
    if isinstance(bn, _BatchNorm):
        plain = nn.BatchNorm2d(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device=bn.running_mean.device
        )
    else:
        plain = frozen_batch_norms()[0](len(bn.running_mean), eps=bn.eps)
    plain.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype).requires_grad_(
        any(p.requires_grad for p in bn.parameters())
    )
    own = plain.state_dict()
    plain.load_state_dict({key: value for key, value in bn.state_dict().items() if key in own}, strict=False)
    return plain.train(bn.training)
