"""Deploy conversion of any network: collapse re-parameterizable blocks and fold Conv+BN pairs.

``switch_to_deploy(model)`` works on RepVGG, on custom backbones built from ``RepBlock``, on
timm models whose blocks know how to re-parameterize themselves, and on plain networks such as
torchvision's ResNets and MobileNets, whose Conv2d->BatchNorm2d pairs are folded into one conv.

Which conv feeds which BatchNorm is read from the module's ``torch.fx`` graph, not guessed from
attribute order: a pair is folded only when the BN's sole input is the conv's output and the
conv's output goes nowhere else. Networks that fx cannot trace fall back to pairs that sit next
to each other inside an ``nn.Sequential``, where the data flow is certain.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Collection

import torch
from torch import nn

from repblocks.blocks import RepBlock
from repblocks.expand import collapse_expanded
from repblocks.fusion import fuse_conv_bn
from repblocks.pairs import conv_bn_pairs, frozen_batch_norms, set_submodule

__all__ = ["fold_conv_bn", "switch_to_deploy"]

log = logging.getLogger(__name__)

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def switch_to_deploy(model: nn.Module, inplace: bool = False, *, keep_post_bn: bool = False) -> nn.Module:
    """Return the deploy form of ``model``, in eval mode, with outputs equal to ``model.eval()``'s.

    Every ``RepBlock`` (any branch set) is fused into one conv, every other module exposing ``switch_to_deploy()``
    or ``reparameterize()`` without arguments (the official code's, mmpretrain's and timm's
    RepVGG/MobileOne blocks) is asked to fuse itself, and every remaining Conv->BatchNorm pair is
    folded into the conv. A model that :func:`repblocks.expand` made is the exception: its expanded
    blocks become the Conv+BatchNorm modules they replaced (fused weights inside), nothing is folded,
    and the result has the original architecture (its state dict loads into the original class).

    Args:
        model: Any module.
        inplace: Convert ``model`` itself; by default a deep copy is converted and ``model`` is untouched.
        keep_post_bn: Keep the BatchNorm after the branch sum of blocks that have one (QARepVGG) as its
            own module, unfolded: the form quantization-aware training fine-tunes. Other Conv+BN pairs fold.
    """
    if not inplace:
        model = _copy_sharing_branches(model)
    restored = collapse_expanded(model)  # before RepBlocks fuse: these go back to their own Conv+BN
    blocks = _reparameterize_blocks(model, keep_post_bn=keep_post_bn)
    model.eval()  # after fusing: until then the copy shares branch modules with the caller's model
    if restored:
        # Folding would change the architecture that expand() promised to give back.
        log.info(
            "deploy conversion: %d expanded convs restored to the original architecture, %d blocks fused; "
            "Conv+BN pairs kept (fold_conv_bn folds them)",
            restored,
            blocks,
        )
        return model
    kept = {id(m.post_bn) for m in model.modules() if isinstance(m, RepBlock) and m.post_bn is not None}
    pairs = fold_conv_bn(model, keep=kept)
    log.info("deploy conversion: %d re-parameterizable blocks fused, %d Conv+BN pairs folded", blocks, pairs)
    return model


def _copy_sharing_branches(model: nn.Module) -> nn.Module:
    """Deep copy, except that RepBlock branches are shared rather than copied.

    Fusion only reads the branches and then drops them from the copy, so copying them would cost
    time and memory for nothing (for RepVGG-B3, most of a second and 0.5 GB). The copy must not
    change them: nothing touches it between this copy and the fusion of its RepBlocks.
    """
    memo = {}
    for module in model.modules():
        if isinstance(module, RepBlock) and not module.deploy:
            for branch in module.branches():
                memo[id(branch)] = branch
    return copy.deepcopy(model, memo)


def _reparameterize_blocks(model: nn.Module, *, keep_post_bn: bool) -> int:
    fused = 0
    for module in list(model.modules()):
        if module is model:
            continue  # the root's own switch_to_deploy may be this very function's caller
        if isinstance(module, RepBlock):
            fused += not module.deploy
            module.switch_to_deploy(keep_post_bn=keep_post_bn)
        elif (fuse := _own_fusion(module)) is not None:
            fuse()
            fused += 1
    return fused


def _own_fusion(module: nn.Module) -> Callable[[], object] | None:
    """The module's own method that fuses it in place, or None.

    ``switch_to_deploy()`` comes first: mmpretrain's RepVGG block has both, and its ``reparameterize()``
    only returns the fused kernel and bias (timm's two names do the same thing). A method that
    needs arguments is someone else's ``reparameterize(mu, logvar)`` (a VAE's sampling), not a fusion.
    """
    for name in ("switch_to_deploy", "reparameterize"):
        method = getattr(module, name, None)
        if callable(method) and _takes_no_arguments(method):
            return method
    return None


def _takes_no_arguments(method: Callable) -> bool:
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): do not guess
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)


@torch.no_grad()
def fold_conv_bn(model: nn.Module, *, keep: Collection[int] = ()) -> int:
    """Fold every eval-mode BatchNorm that directly follows a conv into that conv, in place.

    ``keep`` holds the ids of BatchNorms to leave alone (``switch_to_deploy(keep_post_bn=True)``'s).

    The conv keeps its class and gains a bias; the BatchNorm is replaced by ``nn.Identity``.
    BatchNorms in training mode are left alone: they normalize with batch statistics, which no
    conv can reproduce (call ``model.eval()`` first, as ``switch_to_deploy`` does).
    Returns the number of pairs folded.
    """
    if not any(_foldable_bn(m) for m in model.modules()):
        return 0
    pairs = conv_bn_pairs(model, is_conv=_foldable_conv, is_bn=_foldable_bn)
    modules = dict(model.named_modules())
    pairs = [(conv_name, bn_name) for conv_name, bn_name in pairs if id(modules[bn_name]) not in keep]
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        kernel, bias = fuse_conv_bn(conv, bn)
        conv.weight = nn.Parameter(kernel, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        set_submodule(model, bn_name, nn.Identity())
    return len(pairs)


def _foldable_bn(module: nn.Module) -> bool:
    if isinstance(module, frozen_batch_norms()):
        return True  # always normalizes with its stored statistics
    # In training mode, or without running statistics, a BN uses batch statistics: not a fixed affine map.
    return isinstance(module, _BATCH_NORMS) and not module.training and module.running_mean is not None


def _foldable_conv(module: nn.Module) -> bool:
    return isinstance(module, _CONVS)
