"""Expand any network into re-parameterizable training blocks, and collapse it back to the very same architecture.

``expand(model, branches="repvgg")`` replaces every eligible kxk convolution of any ``nn.Module``,
together with the BatchNorm that reads its output, by a training :class:`~repblocks.blocks.RepBlock`
(kxk branch plus the branch set's other branches: RepVGG's 1x1 and identity, ACNet's, DBB's ...).
The original conv and its BatchNorm become the block's kxk branch, unchanged, and every new branch
starts at zero (the last BatchNorm of each branch gets weight and bias 0), so the expanded model
computes the same function as the original, in eval mode and in training mode alike: a pretrained
network is fine-tuned with branches from where it stands (the zero-init of residual branches,
as in Goyal et al. 2017, is what lets the new branches grow from there).

``repblocks.switch_to_deploy(expanded)`` then gives back the original architecture: each block
becomes the conv (with or without its bias, as it was) and the BatchNorm (its class and settings)
it replaced, holding the fused kernel; the BatchNorm is set to divide by exactly 1 and carries the
fused bias. Its ``state_dict()`` loads with ``strict=True`` into the original class.

What is taken: an ``nn.Conv2d`` (the class itself: a subclass may compute something else, such as
weight standardization) with a square odd kernel of at least 3, dilation 1, zero padding of
``k // 2``, any stride and groups, whose output only a BatchNorm reads (a class :mod:`repblocks.norms` knows:
``nn.BatchNorm2d``, ``nn.SyncBatchNorm``, torchvision's ``FrozenBatchNorm2d``, timm's ``BatchNormAct2d``
family, whose drop and activation stay where the BatchNorm was and follow the branch sum; with running
statistics), both sitting in the same parent module and each called once. Which conv feeds which BatchNorm is read from the
``torch.fx`` graph (:mod:`repblocks.pairs`); untraceable networks give only the pairs that sit next
to each other in an ``nn.Sequential``. What is left, and why, is in the returned :class:`Expansion`:

* 1x1 convs: every branch of a 1x1 block is a 1x1 conv, i.e. nothing a single 1x1 conv cannot hold;
* convs no BatchNorm follows: a new branch would bring its own BatchNorm (and a bias) into a place
  that trained without one, and the fused bias would have nowhere to go in the original architecture;
* dilated, even, non-square, 'same'/other padding, non-zero padding modes, Conv1d/3d, transposed convs;
* convs inside blocks that re-parameterize themselves already (``RepBlock``, timm's MobileOne, ...);
* convs followed by a BatchNorm subclass no fold knows (its forward may do more than normalize);
* convs where the branch set has nothing to add or no branches for the kernel size: ``"repghost"``'s identity
  BN needs stride 1 and as many outputs as inputs (RepGhost's depthwise cheap ops), ``"unireplk"``'s dilated
  branches a kernel of 5 to 17 (UniRepLKNet's large depthwise kernels).
"""

from __future__ import annotations

import copy
import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from repblocks.blocks import BRANCH_SETS, BRANCHES, RepBlock, extra_kernel_pairs, resolve_branch_set
from repblocks.folds import DeployForm, checked_fold, conv_probe
from repblocks.norms import (
    DropAct,
    after_fold,
    is_batch_norm_like,
    normalization_only,
    unknown_reason,
)
from repblocks.online import (
    ONLINE_BRANCH_SETS,
    OnlineRepBlock,
    online_block_from_conv,
    resolve_online_branch_set,
)
from repblocks.pairs import conv_bn_pairs, set_submodule

__all__ = [
    "ExpandedOnlineRepBlock",
    "ExpandedRepBlock",
    "Expansion",
    "LeftConv",
    "Reason",
    "Replaced",
    "TakenConv",
    "block_from_conv",
    "branch_set_names",
    "expand",
    "resolve_branches",
]

log = logging.getLogger(__name__)

BranchSet = str | Mapping[str, object]

# RepBlock keywords that are not about branches: expand sets them from the conv it replaces.
_NOT_BRANCHES = ("in_channels", "out_channels", "stride", "groups", "kernel_size", "act", "use_se", "deploy")


def _branch_sets(*, online: bool = False) -> dict[str, dict]:
    """The named branch sets expand knows: the core's table (RepVGG, ACNet, DBB, and the QARepVGG sets it
    refuses), and with ``online`` the online block's own (OREPA's)."""
    return {**BRANCH_SETS, **ONLINE_BRANCH_SETS} if online else BRANCH_SETS


def resolve_branches(branches: BranchSet, *, online: bool = False) -> dict:
    """The block's branch keywords for a branch-set name (``"repvgg"``...) or a dict of them.

    ``online``: for the online block (:mod:`repblocks.online`), which also has OREPA's branches.

    Raises:
        ValueError: An unknown name (the message lists the known ones), a keyword that is not about
            branches, or a branch set whose branches cannot start at zero (a plain identity or average
            pool, a BatchNorm after the sum), so the expanded model would not compute the original's function.
    """
    sets = _branch_sets(online=online)
    if isinstance(branches, str):
        if branches not in sets:
            raise ValueError(
                f"unknown branch set {branches!r}; known: {', '.join(sets)} (or a dict of RepBlock keywords)"
            )
        kwargs = dict(sets[branches])
    elif isinstance(branches, Mapping):
        kwargs = dict(branches)
        branch_keys = {key: value for key, value in kwargs.items() if key not in _NOT_BRANCHES}
        # keys that name no branch, and values a branch cannot take: one line
        (resolve_online_branch_set if online else resolve_branch_set)(branch_keys)
    else:
        raise ValueError(f"branches must be a branch-set name ({', '.join(sets)}) or a dict, got {branches!r}")
    wrong = sorted(set(kwargs) & set(_NOT_BRANCHES))
    if wrong:
        raise ValueError(f"branch set {branches!r}: {', '.join(wrong)} are set by expand from each conv, not branches")
    problem = _zero_start_problem(kwargs)
    if problem:
        raise ValueError(f"branch set {branches!r} cannot expand a trained conv: {problem}")
    return kwargs


def branch_set_names(*, online: bool = False) -> list[str]:
    """Names of the branch sets :func:`expand` takes (those whose every new branch can start at zero, and with
    ``online``, that the online block trains)."""
    return [
        name
        for name, kwargs in _branch_sets(online=online).items()
        if _zero_start_problem(kwargs) is None and (not online or _online_problem(name) is None)
    ]


def _online_problem(name: str) -> str | None:
    try:
        resolve_online_branch_set(name)
    except ValueError as err:
        return str(err)
    return None


def _zero_start_problem(kwargs: Mapping) -> str | None:
    if kwargs.get("post_bn"):
        return "its BatchNorm after the sum would renormalize the original conv's output in training"
    if kwargs.get("identity_branch") == "plain":
        return "its plain identity branch has no weight to start at zero"
    if kwargs.get("avg_pool_branch"):
        return "its average-pool branch has no weight to start at zero"
    return None


class Reason(str, enum.Enum):
    """Why :func:`expand` left a convolution as it was."""

    NOT_CONV2D = "not an nn.Conv2d (Conv1d/3d, transposed, or a subclass whose forward may differ)"
    ONE_BY_ONE = "1x1: its branches would all be 1x1 convs, which one 1x1 conv already holds"
    KERNEL = "non-square or even kernel: the branches could not be centred in it"
    DILATED = "dilated: the branches are not dilated"
    PADDING = "padding is not zeros of kernel_size // 2 on every side"
    INSIDE_BLOCK = "inside a block that re-parameterizes itself already"
    NO_BATCH_NORM = "no BatchNorm alone reads its output in the same parent (or one of them is called twice)"
    BATCH_NORM_KIND = "its BatchNorm has no affine parameters or keeps no running statistics"
    UNKNOWN_BATCH_NORM = "its BatchNorm's class is not one the fold knows (its forward may do more than normalize)"
    SET_KERNEL_SIZE = "the branch set has no branches for this kernel size"
    NO_NEW_BRANCH = (
        "the branch set adds no branch at this conv's shape (an identity needs stride 1, in == out channels)"
    )


@dataclass(frozen=True)
class TakenConv:
    """A convolution :func:`expand` replaced by a training block."""

    name: str  # where the conv was (now the block)
    batch_norm: str  # where its BatchNorm was (now an nn.Identity)
    kernel_size: int
    stride: int
    groups: int


@dataclass(frozen=True)
class LeftConv:
    """A convolution :func:`expand` left as it was."""

    name: str
    reason: Reason


@dataclass
class Expansion:
    """What :func:`expand` did: the expanded model, and which convs it took and which it left."""

    model: nn.Module
    branches: dict  # the RepBlock keywords of every block
    taken: list[TakenConv] = field(default_factory=list)
    left: list[LeftConv] = field(default_factory=list)

    def summary(self) -> str:
        """One line per reason: how many convs were taken, how many left and why."""
        lines = [f"expanded {len(self.taken)} convs into training blocks, left {len(self.left)}"]
        for reason in Reason:
            names = [conv.name for conv in self.left if conv.reason is reason]
            if names:
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                lines.append(f"  left {len(names)}: {reason.value} ({shown})")
        return "\n".join(lines)


@dataclass(frozen=True)
class Replaced:
    """What an expanded block replaced, so that its deploy form gives those very modules back."""

    conv_bias: bool  # the conv had a bias of its own
    batch_norm: str  # the BatchNorm's attribute name in the block's parent (an nn.Identity while expanded)
    bn_template: nn.Module  # an empty (meta) copy of that BatchNorm: its class and settings, no memory
    # What stands in the BatchNorm's place while expanded: nn.Identity, or timm's drop and activation
    # (repblocks.norms.DropAct), which follow the branch sum and go back into the restored BatchNorm.
    after: nn.Module = field(default_factory=nn.Identity)


def expand(
    model: nn.Module, branches: BranchSet = "repvgg", *, online: bool = False, inplace: bool = False
) -> Expansion:
    """Replace every eligible kxk Conv+BatchNorm of ``model`` by a training block of ``branches``.

    The expanded model computes what ``model`` computes (see the module docstring for what is
    taken and left); :func:`repblocks.switch_to_deploy` gives back ``model``'s architecture.

    Args:
        model: Any module, typically with trained weights.
        branches: A branch-set name (:func:`branch_set_names`) or a dict of RepBlock branch keywords.
        online: Online re-parameterization blocks (one conv per step, :mod:`repblocks.online`) instead of
            RepBlock, for every branch set; OREPA's (``"orepa"``) only so.
        inplace: Expand ``model`` itself; by default a deep copy is expanded and ``model`` is untouched.

    Raises:
        ValueError: An unknown or unusable branch set (see :func:`resolve_branches`).
    """
    kwargs = resolve_branches(branches, online=online)
    make_block = _block_for(online=online)
    if not inplace:
        model = copy.deepcopy(model)
    expansion = Expansion(model, kwargs)
    modules = dict(model.named_modules())
    followers = dict(conv_bn_pairs(model, is_conv=lambda m: isinstance(m, _ConvNd), is_bn=_is_batch_norm))
    inside = _inside_blocks(model)
    for name, conv in modules.items():
        if not isinstance(conv, _ConvNd):
            continue
        reason = _why_left(name, conv, followers.get(name), modules, inside) or _set_misfit(conv, kwargs)
        if reason is not None:
            expansion.left.append(LeftConv(name, reason))
            continue
        bn_name = followers[name]
        replaced = Replaced(
            conv_bias=conv.bias is not None,
            batch_norm=bn_name.rpartition(".")[2],
            bn_template=copy.deepcopy(modules[bn_name]).to("meta"),
            after=after_fold(modules[bn_name]),
        )
        block = make_block(conv, modules[bn_name], kwargs, replaced=replaced)
        set_submodule(model, name, block)
        set_submodule(model, bn_name, replaced.after)
        expansion.taken.append(TakenConv(name, bn_name, conv.kernel_size[0], conv.stride[0], conv.groups))
    log.info("%s", expansion.summary())
    return expansion


def _block_for(*, online: bool):
    """The function that builds one training block from a conv and its BatchNorm: the one place the block class is chosen.

    A block class fits when its builder has :func:`block_from_conv`'s signature (computing ``bn(conv(x))``
    at first, new branches at zero) and builds a class with :class:`_Collapses`'s ``deploy_form()``.
    """
    if online:
        return lambda conv, bn, branches, *, replaced: online_block_from_conv(
            conv, bn, branches, block_class=ExpandedOnlineRepBlock, replaced=replaced
        )
    return block_from_conv


@torch.no_grad()
def block_from_conv(conv: nn.Conv2d, bn: nn.Module, branches: Mapping, *, replaced: Replaced | None = None) -> RepBlock:
    """A training RepBlock that computes ``bn(conv(x))``: both in its kxk branch, every other branch at zero.

    ``conv`` and ``bn`` are not changed (the block holds copies). A conv bias moves into the BatchNorm's
    running mean, where it has the same effect in eval and in training mode (the batch mean absorbs it).

    Args:
        conv: A square, odd, zero-padded ``nn.Conv2d`` (any stride and groups).
        bn: The BatchNorm that reads its output, with running statistics.
        branches: RepBlock's branch keywords (:func:`resolve_branches`).
        replaced: What the block stands for in the network (:func:`expand`'s): the block is then an
            :class:`ExpandedRepBlock`, whose deploy form is that conv and BatchNorm again.

    Raises:
        ValueError: A branch that cannot start at zero (no BatchNorm and no weight of its own).
    """
    extra = {} if replaced is None else {"replaced": replaced}
    block = (RepBlock if replaced is None else ExpandedRepBlock)(
        conv.in_channels,
        conv.out_channels,
        stride=conv.stride[0],
        groups=conv.groups,
        kernel_size=conv.kernel_size[0],
        act=None,
        **branches,
        **extra,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    if block.post_bn is not None:
        raise ValueError("a block with a BatchNorm after the sum cannot start as the original conv and BatchNorm")
    kxk = block.conv_kxk[0] if isinstance(block.conv_kxk, nn.ModuleList) else block.conv_kxk
    kxk.conv.weight.copy_(conv.weight)
    # Its class (FrozenBatchNorm2d stays frozen), settings and statistics; an activation it applies follows the sum.
    kxk.bn = normalization_only(bn)
    if conv.bias is not None:
        kxk.bn.running_mean.sub_(conv.bias.to(kxk.bn.running_mean.dtype))
    for branch in block.branches():
        if branch is not kxk:
            _start_at_zero(branch)
    block.requires_grad_(conv.weight.requires_grad)  # a frozen layer stays frozen, new branches included
    return block.train(conv.training)


def _start_at_zero(branch: nn.Module) -> None:
    """Make a branch output zero, in eval and in training mode, while every parameter still gets a gradient.

    Its last BatchNorm (in registration order, which is data-flow order in every branch RepBlock builds)
    gets weight and bias 0: that BatchNorm's weight then has a gradient, and one step brings the branch
    to life. Zeroing every BatchNorm of a sequence would leave it dead for good.
    """
    norms = [module for module in branch.modules() if isinstance(module, _BatchNorm)]
    if norms:
        norms[-1].weight.zero_()
        norms[-1].bias.zero_()
        return
    weights = [param for name, param in branch.named_parameters() if name.endswith("weight")]
    if not weights:
        raise ValueError(f"the branch {type(branch).__name__} has no BatchNorm or weight to start at zero")
    weights[-1].zero_()
    for name, param in branch.named_parameters():  # a conv with a bias and no BN (scale_branch="conv_bias")
        if name.endswith("bias"):
            param.zero_()


def _is_batch_norm(module: nn.Module) -> bool:
    return is_batch_norm_like(module)


def _why_left(
    name: str, conv: _ConvNd, bn_name: str | None, modules: Mapping[str, nn.Module], inside: set[str]
) -> Reason | None:
    if type(conv) is not nn.Conv2d:
        return Reason.NOT_CONV2D
    if name in inside:
        return Reason.INSIDE_BLOCK
    height, width = conv.kernel_size
    if height != width or height % 2 == 0:
        return Reason.KERNEL
    if height == 1:
        return Reason.ONE_BY_ONE
    if conv.dilation != (1, 1):
        return Reason.DILATED
    if conv.padding != (height // 2, height // 2) or conv.padding_mode != "zeros":
        return Reason.PADDING
    if bn_name is None or bn_name.rpartition(".")[0] != name.rpartition(".")[0]:
        return Reason.NO_BATCH_NORM
    bn = modules[bn_name]
    if unknown_reason(bn) is not None or isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm3d)):
        return Reason.UNKNOWN_BATCH_NORM
    if bn.running_mean is None:
        return Reason.BATCH_NORM_KIND
    if getattr(bn, "weight", None) is None:
        return Reason.BATCH_NORM_KIND  # affine=False: the collapsed BatchNorm would have no bias to carry the fused one
    return None


def _set_misfit(conv: nn.Conv2d, kwargs: Mapping) -> Reason | None:
    """Why the branch set does not apply to a conv _why_left took: no branches for its size, or none beside the kxk."""
    kernel_size = conv.kernel_size[0]
    try:
        extra_kernel_pairs(kwargs.get("extra_kernels"), kernel_size)
    except ValueError:
        return Reason.SET_KERNEL_SIZE
    offline = {kind.arg for kind in BRANCHES}
    if any(value is True for key, value in kwargs.items() if key not in offline):  # the online block's own branches
        return None
    with torch.device("meta"):  # which branches the block would have, without memory
        block = RepBlock(
            conv.in_channels,
            conv.out_channels,
            stride=conv.stride[0],
            groups=conv.groups,
            kernel_size=kernel_size,
            act=None,
            **{key: value for key, value in kwargs.items() if key in offline},
        )
    return Reason.NO_NEW_BRANCH if len(block.branches()) < 2 else None


def _inside_blocks(model: nn.Module) -> set[str]:
    """Names of modules below a block that fuses itself (RepBlock, or one with its own fusion method)."""
    inside = set()
    for name, module in model.named_modules():
        fuses = isinstance(module, RepBlock) or any(
            callable(getattr(module, method, None)) for method in ("switch_to_deploy", "reparameterize")
        )
        if fuses and module is not model:
            prefix = f"{name}." if name else ""
            inside |= {prefix + child for child, _ in module.named_modules() if child}
    return inside


class _Collapses:
    """What a block :func:`expand` made says about its deploy form: the conv and BatchNorm it replaced, fused weights inside.

    The conv holds the block's fused kernel (and, if it had a bias, the fused bias); the BatchNorm,
    of the original class and settings, divides by exactly 1 (running variance ``v`` with
    ``v + eps == 1`` in its dtype, mean 0, weight 1) and adds the fused bias as its bias. A conv that
    had a bias gets the fused bias itself, and its BatchNorm adds 0.
    """

    def __init__(self, *args, replaced: Replaced, **kwargs):
        super().__init__(*args, **kwargs)
        self.replaced = replaced

    @torch.no_grad()
    def deploy_form(self, *, keep_post_bn: bool | None = None, verify: bool | None = None) -> DeployForm:
        """The conv in this block's place and the BatchNorm in its BatchNorm's: the original architecture.

        Checked as one fold: the restored conv and BatchNorm against the block's train form.
        ``keep_post_bn`` is ignored: the architecture given to expand() had no BatchNorm after a sum.
        """
        restored: list[nn.Module] = []
        weight = next(self.parameters())
        probe = conv_probe(self.in_channels, (self.kernel_size,) * 2, (self.stride,) * 2, device=weight.device)
        with checked_fold(self, verify=verify, probe=probe, after=lambda: nn.Sequential(*restored)):
            self.switch_to_deploy(keep_post_bn=False)  # any block class that fuses itself into one conv, `reparam`
            restored += _restored(self.reparam, self.replaced)
        conv, bn = restored
        if isinstance(self.replaced.after, DropAct):  # checked without them: the block's sum comes before them
            bn.drop, bn.act = self.replaced.after.drop, self.replaced.after.act
        return DeployForm(conv, siblings={self.replaced.batch_norm: bn}, restores_architecture=True)


class ExpandedRepBlock(_Collapses, RepBlock):
    """A RepBlock that :func:`expand` put in place of a Conv+BatchNorm; its deploy form is that pair again."""


class ExpandedOnlineRepBlock(_Collapses, OnlineRepBlock):
    """An online block that :func:`expand` put in place of a Conv+BatchNorm; its deploy form is that pair again."""


def _restored(fused: nn.Conv2d, replaced: Replaced) -> tuple[nn.Conv2d, nn.Module]:
    weight, bias = fused.weight, fused.bias
    conv = nn.Conv2d(
        fused.in_channels,
        fused.out_channels,
        fused.kernel_size,
        stride=fused.stride,
        padding=fused.padding,
        groups=fused.groups,
        bias=replaced.conv_bias,
        device="meta",
    )
    conv.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
    shift = bias
    if replaced.conv_bias:
        conv.bias = nn.Parameter(bias, requires_grad=weight.requires_grad)
        shift = torch.zeros_like(bias)
    bn = copy.deepcopy(replaced.bn_template).to_empty(device=weight.device).to(weight.dtype)
    if isinstance(replaced.after, DropAct):  # until the live ones come back, its drop and activation do nothing
        bn.drop, bn.act = nn.Identity(), nn.Identity()
    bn.running_var.copy_(_unit_variance(bn.eps, weight.dtype).expand_as(bn.running_var))
    bn.running_mean.zero_()
    bn.weight.fill_(1)
    bn.bias.copy_(shift)
    if getattr(bn, "num_batches_tracked", None) is not None:
        bn.num_batches_tracked.zero_()
    bn.requires_grad_(weight.requires_grad)
    return conv, bn.train(fused.training)


def _unit_variance(eps: float, dtype: torch.dtype) -> Tensor:
    """A variance ``v`` with ``v + eps == 1`` exactly in ``dtype``: the BatchNorm then divides by sqrt(1) = 1."""
    eps_t = torch.tensor(eps, dtype=dtype)
    guess = 1 - eps_t
    for candidate in (guess, torch.nextafter(guess, torch.ones_like(guess)), torch.nextafter(guess, eps_t)):
        if candidate + eps_t == 1:
            return candidate
    return guess  # no such v in this dtype (never seen): off by one rounding of 1 at most
