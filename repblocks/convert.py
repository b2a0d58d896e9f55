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
import sys
from collections import Counter
from collections.abc import Callable, Collection

import torch
from torch import nn

from repblocks.blocks import RepBlock
from repblocks.fusion import fuse_conv_bn

__all__ = ["fold_conv_bn", "switch_to_deploy"]

log = logging.getLogger(__name__)

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def switch_to_deploy(model: nn.Module, inplace: bool = False, *, keep_post_bn: bool = False) -> nn.Module:
    """Return the deploy form of ``model``, in eval mode, with outputs equal to ``model.eval()``'s.

    Every ``RepBlock`` (any branch set) is fused into one conv, every other module exposing ``switch_to_deploy()``
    or ``reparameterize()`` without arguments (the official code's, mmpretrain's and timm's
    RepVGG/MobileOne blocks) is asked to fuse itself, and every remaining Conv->BatchNorm pair is
    folded into the conv.

    Args:
        model: Any module.
        inplace: Convert ``model`` itself; by default a deep copy is converted and ``model`` is untouched.
        keep_post_bn: Keep the BatchNorm after the branch sum of blocks that have one (QARepVGG) as its
            own module, unfolded: the form quantization-aware training fine-tunes. Other Conv+BN pairs fold.
    """
    if not inplace:
        model = _copy_sharing_branches(model)
    blocks = _reparameterize_blocks(model, keep_post_bn=keep_post_bn)
    model.eval()  # after fusing: until then the copy shares branch modules with the caller's model
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
    pairs = _traced_pairs(model)
    if pairs is None:
        pairs = _sequential_pairs(model)
    modules = dict(model.named_modules())
    pairs = [(conv_name, bn_name) for conv_name, bn_name in pairs if id(modules[bn_name]) not in keep]
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        kernel, bias = fuse_conv_bn(conv, bn)
        conv.weight = nn.Parameter(kernel, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        _set_submodule(model, bn_name, nn.Identity())
    return len(pairs)


def _foldable_bn(module: nn.Module) -> bool:
    if isinstance(module, _frozen_batch_norms()):
        return True  # always normalizes with its stored statistics
    # In training mode, or without running statistics, a BN uses batch statistics: not a fixed affine map.
    return isinstance(module, _BATCH_NORMS) and not module.training and module.running_mean is not None


def _frozen_batch_norms() -> tuple[type, ...]:
    # torchvision's detection models use FrozenBatchNorm2d. Importing torchvision costs ~1 s,
    # and a model can only hold one if torchvision is already imported, so look, don't import.
    misc = sys.modules.get("torchvision.ops.misc")
    return (misc.FrozenBatchNorm2d,) if misc is not None else ()


def _foldable_conv(module: nn.Module) -> bool:
    return isinstance(module, _CONVS)


class _ConvBNTracer(torch.fx.Tracer):
    """Keeps every conv and BN a single graph node, including subclasses defined outside torch.nn
    (timm's ``Conv2dSame``, torchvision's ``FrozenBatchNorm2d``), which fx would otherwise trace into."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return _foldable_conv(module) or _foldable_bn(module) or super().is_leaf_module(module, qualified_name)


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    try:
        graph = _ConvBNTracer().trace(model)
    except Exception as err:  # fx raises many kinds of errors on dynamic code; any of them means "untraceable"
        log.info(
            "torch.fx cannot trace %s (%s); folding only Conv+BN pairs inside nn.Sequential", type(model).__name__, err
        )
        return None
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    shared = _shared_module_ids(model)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable_bn(modules[node.target]) or len(node.args) != 1:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv = modules[source.target]
        if (
            _foldable_conv(conv)
            and len(source.users) == 1
            and calls[source.target] == 1
            and calls[node.target] == 1
            and id(conv) not in shared
            and id(modules[node.target]) not in shared
        ):
            pairs.append((source.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    shared = _shared_module_ids(model)
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if _foldable_conv(conv) and _foldable_bn(bn) and id(conv) not in shared and id(bn) not in shared:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + conv_name, prefix + bn_name))
    return pairs


def _shared_module_ids(model: nn.Module) -> set[int]:
    """Modules reachable under more than one name: folding one use would change the others."""
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return {key for key, count in counts.items() if count > 1}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)
