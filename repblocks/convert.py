"""Deploy conversion of any network: collapse re-parameterizable blocks and fold Conv+BN pairs.

``switch_to_deploy(model)`` works on RepVGG, on custom backbones built from ``RepBlock``, on
timm models whose blocks know how to re-parameterize themselves, and on plain networks such as
torchvision's ResNets and MobileNets, whose Conv2d->BatchNorm2d pairs are folded into one conv.

Which conv feeds which BatchNorm is read from the module's ``torch.fx`` graph, not guessed from
attribute order: a pair is folded only when the BN's sole input is the conv's output and the
conv's output goes nowhere else. Networks that fx cannot trace fall back to pairs that sit next
to each other inside an ``nn.Sequential``, where the data flow is certain.

How a module folds is said by the module: ``deploy_form()`` (:class:`repblocks.folds.DeployForm`) on
RepBlock, the online block and the blocks :func:`repblocks.expand` makes; a BatchNorm folds only if
its class is one :mod:`repblocks.norms` knows. Every fold checks itself (:mod:`repblocks.folds`).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from repblocks.blocks import RepBlock
from repblocks.errors import FoldError
from repblocks.expand import Expansion
from repblocks.folds import DeployForm, Reparameterizable, checked_fold, verify_default
from repblocks.fusion import fuse_conv_bn
from repblocks.norms import after_fold, is_batch_norm_like, unknown_reason
from repblocks.pairs import conv_bn_pairs, set_submodule

__all__ = ["Deployed", "LeftNorm", "fold_conv_bn", "reparameterize", "switch_to_deploy"]

log = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LeftNorm:
    """A BatchNorm after a conv that was not folded into it."""

    name: str
    reason: str


@dataclass
class Deployed:
    """What :func:`reparameterize` did: the deploy-form model, what it folded and what it left, and why."""

    model: nn.Module
    blocks: int = 0  # re-parameterizable modules folded (RepBlocks, online and expanded blocks, third-party ones)
    pairs: int = 0  # Conv+BN pairs folded
    left: list[LeftNorm] = field(default_factory=list)  # BatchNorms after a conv left as they are


def switch_to_deploy(
    model: nn.Module | Expansion, inplace: bool = False, *, keep_post_bn: bool = False, verify: bool | None = None
) -> nn.Module:
    """Return the deploy form of ``model``, in eval mode, with outputs equal to ``model.eval()``'s.

    Every ``RepBlock`` (any branch set, online too) is fused into one conv, every other module exposing
    ``switch_to_deploy()`` or ``reparameterize()`` without arguments (the official code's, mmpretrain's and timm's
    RepVGG/MobileOne blocks) is asked to fuse itself, and every remaining Conv->BatchNorm pair is
    folded into the conv (timm's BatchNormAct2d family keeps its activation; a BatchNorm class the
    fold does not know is left, see :func:`reparameterize`). A model that :func:`repblocks.expand` made
    (or its :class:`~repblocks.expand.Expansion`) is the exception: its expanded blocks become the
    Conv+BatchNorm modules they replaced (fused weights inside), nothing is folded, and the result has
    the original architecture (its state dict loads into the original class).

    Every fold checks itself on a small float64 probe and raises :class:`~repblocks.errors.FoldError`
    (naming the module) if its result differs from what it replaced.

    Args:
        model: Any module: a network, a bare block, an expanded model or an Expansion.
        inplace: Convert ``model`` itself; by default a copy is converted and ``model`` is not changed at all.
        keep_post_bn: Keep the BatchNorm after the branch sum of blocks that have one (QARepVGG) as its
            own module, unfolded: the form quantization-aware training fine-tunes. Other Conv+BN pairs fold.
        verify: Check every fold (default: yes, unless the environment variable ``REPBLOCKS_VERIFY_FOLDS=0``).
    """
    return reparameterize(model, inplace=inplace, keep_post_bn=keep_post_bn, verify=verify).model


def reparameterize(
    model: nn.Module | Expansion, *, inplace: bool = False, keep_post_bn: bool = False, verify: bool | None = None
) -> Deployed:
    """:func:`switch_to_deploy`, with what was folded and which BatchNorms were left and why.

    BatchNorms after a conv that are not folded (a class the fold does not know: its forward may do more
    than normalize) are listed in ``left`` and logged in one warning.
    """
    if isinstance(model, Expansion):
        model = model.model
    verify = verify_default() if verify is None else verify
    if not inplace:
        model = _copy_sharing_branches(model)
    model, blocks, restores = _fold_modules(model, keep_post_bn=keep_post_bn, verify=verify)
    model.eval()  # after fusing: until then the copy shares branch modules with the caller's model
    deployed = Deployed(model, blocks=blocks)
    if restores:
        # Folding would change the architecture that expand() promised to give back.
        log.info(
            "deploy conversion: %d blocks fused or restored to the original architecture; "
            "Conv+BN pairs kept (fold_conv_bn folds them)",
            blocks,
        )
        return deployed
    kept = {id(m.post_bn) for m in model.modules() if isinstance(m, RepBlock) and m.post_bn is not None}
    deployed.pairs, deployed.left = _fold_pairs(model, keep=kept, verify=verify)
    _log_left(deployed.left)
    log.info("deploy conversion: %d re-parameterizable blocks fused, %d Conv+BN pairs folded", blocks, deployed.pairs)
    return deployed


def _copy_sharing_branches(model: nn.Module) -> nn.Module:
    """Deep copy, except that RepBlock branches are shared rather than copied.

    Fusion only reads the branches (its check runs them in eval mode and puts the flags back) and
    then drops them from the copy, so copying them would cost time and memory for nothing (for
    RepVGG-B3, most of a second and 0.5 GB). The copy must not change them: nothing touches it
    between this copy and the fusion of its RepBlocks.
    """
    memo = {}
    for module in model.modules():
        if isinstance(module, RepBlock) and not module.deploy:
            for branch in module.branches():
                memo[id(branch)] = branch
    return copy.deepcopy(model, memo)


def _fold_modules(model: nn.Module, *, keep_post_bn: bool, verify: bool) -> tuple[nn.Module, int, bool]:
    """The one walker: every module that folds itself does, children before parents. Returns the model (a bare
    block's deploy form may be another module), how many folded, and whether one restored expand()'s architecture."""
    folded, restores = 0, False
    for name, module in list(_children_first(model)):  # a parent's own fusion finds its children done
        try:
            if isinstance(module, Reparameterizable):
                folded += not getattr(module, "deploy", False)
                form: DeployForm = module.deploy_form(keep_post_bn=keep_post_bn, verify=verify)
                restores |= form.restores_architecture
                if module is model:
                    model = form.module
                else:
                    _put(model, name, form)
            elif module is not model and (fuse := _own_fusion(module)) is not None:
                # The root is skipped: its own switch_to_deploy may be this very function's caller.
                # A container (a backbone with its own switch_to_deploy) is not checked as one: its blocks
                # were, and checking it would be a forward of the whole network.
                with checked_fold(module, verify=verify and not _holds_folds(module)):
                    fuse()
                folded += 1
        except FoldError as err:
            raise err.within(name) from None
    return model, folded, restores


def _holds_folds(module: nn.Module) -> bool:
    """Whether a module below ``module`` folds itself (``deploy_form()``, or its own fusion method)."""
    return any(
        isinstance(m, Reparameterizable) or _own_fusion(m) is not None for m in module.modules() if m is not module
    )


def _children_first(module: nn.Module, name: str = "", seen: set[int] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` with every module after its children (in order), each module once."""
    seen = set() if seen is None else seen
    seen.add(id(module))
    for child_name, child in module.named_children():
        if id(child) not in seen:
            yield from _children_first(child, f"{name}.{child_name}" if name else child_name, seen)
    yield name, module


def _put(model: nn.Module, name: str, form: DeployForm) -> None:
    if form.module is not model.get_submodule(name):
        set_submodule(model, name, form.module)
    parent = name.rpartition(".")[0]
    for sibling, module in form.siblings.items():
        set_submodule(model, f"{parent}.{sibling}" if parent else sibling, module)


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


def fold_conv_bn(model: nn.Module, *, keep: Collection[int] = (), verify: bool | None = None) -> int:
    """Fold every eval-mode BatchNorm that directly follows a conv into that conv, in place.

    ``keep`` holds the ids of BatchNorms to leave alone (``switch_to_deploy(keep_post_bn=True)``'s).

    The conv keeps its class and gains a bias; the BatchNorm is replaced by ``nn.Identity`` (timm's
    BatchNormAct2d family by its dropout and activation, :class:`repblocks.norms.DropAct`).
    BatchNorms in training mode are left alone: they normalize with batch statistics, which no
    conv can reproduce (call ``model.eval()`` first, as ``switch_to_deploy`` does). So are BatchNorm
    classes the fold does not know (logged in one warning; :func:`reparameterize` lists them).
    Every fold checks itself (``verify``, see :func:`switch_to_deploy`). Returns the number of pairs folded.
    """
    pairs, left = _fold_pairs(model, keep=keep, verify=verify_default() if verify is None else verify)
    _log_left(left)
    return pairs


@torch.no_grad()
def _fold_pairs(model: nn.Module, *, keep: Collection[int], verify: bool) -> tuple[int, list[LeftNorm]]:
    if not any(is_batch_norm_like(m) for m in model.modules()):
        return 0, []
    pairs = conv_bn_pairs(model, is_conv=_foldable_conv, is_bn=_foldable_bn)
    modules = dict(model.named_modules())
    pairs = [(conv_name, bn_name) for conv_name, bn_name in pairs if id(modules[bn_name]) not in keep]
    left = []
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        reason = unknown_reason(bn)
        if reason is not None:
            left.append(LeftNorm(bn_name, reason))
            continue
        replacement = after_fold(bn)
        try:
            _fold_pair(conv, bn, replacement, verify=verify)
        except FoldError as err:
            pair = f"{type(conv).__name__} + {type(bn).__name__}"
            raise FoldError(f"{conv_name} + {bn_name}", pair, err.error, err.tolerance, err.detail) from None
        set_submodule(model, bn_name, replacement)
    return len(pairs) - len(left), left


def _fold_pair(conv: nn.Module, bn: nn.Module, replacement: nn.Module, *, verify: bool) -> None:
    """Fold ``bn`` into ``conv`` in place, checked against the pair; ``replacement`` is what will stand in ``bn``'s place."""
    with checked_fold(nn.Sequential(conv, bn), verify=verify, after=lambda: nn.Sequential(conv, replacement)):
        kernel, bias = fuse_conv_bn(conv, bn)
        conv.weight = nn.Parameter(kernel, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)


def _log_left(left: list[LeftNorm]) -> None:
    if left:
        shown = ", ".join(norm.name for norm in left[:3]) + (", ..." if len(left) > 3 else "")
        reasons = "; ".join(dict.fromkeys(norm.reason for norm in left))
        log.warning("deploy conversion: %d BatchNorms left unfused (%s): %s", len(left), shown, reasons)


def _foldable_bn(module: nn.Module) -> bool:
    """A BatchNorm-like module that normalizes with fixed statistics (known class or not: unknown ones are listed)."""
    if not is_batch_norm_like(module):
        return False
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True  # frozen: always normalizes with its stored statistics
    # In training mode, or without running statistics, a BN uses batch statistics: not a fixed affine map.
    return not module.training and module.running_mean is not None


def _foldable_conv(module: nn.Module) -> bool:
    return isinstance(module, _CONVS)
