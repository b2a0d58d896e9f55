"""Building blocks: the re-parameterizable ``RepBlock`` and the small modules it is made of.

``RepBlock`` is one general re-parameterizable block. During training it sums parallel branches
over the same input; for deployment they collapse, exactly, into one kxk convolution with a bias.
Which branches exist is data (keyword arguments), so one class covers the families of the zoo:

* RepVGG (Ding et al., CVPR 2021, https://arxiv.org/abs/2101.03697): kxk Conv+BN, 1x1 Conv+BN and,
  when shapes allow, an identity BN (the defaults);
* MobileOne (Vasu et al., CVPR 2023, https://arxiv.org/abs/2206.04040): ``num_conv_branches`` kxk
  Conv+BN branches, a 1x1 Conv+BN ("scale") branch and an identity BN;
* QARepVGG (Chu et al., 2022, https://arxiv.org/abs/2212.01593): kxk Conv+BN, a 1x1 conv without
  BN, a plain identity and a BatchNorm after the sum; v2 adds a kxk average-pool branch;
* ACNet (Ding et al., ICCV 2019, https://arxiv.org/abs/1908.03930): 1xk and kx1 Conv+BN beside the kxk;
* DBB (Ding et al., CVPR 2021, https://arxiv.org/abs/2103.13425): 1x1 Conv+BN -> kxk Conv+BN and
  1x1 Conv+BN -> kxk average pool -> BN sequences beside the kxk and 1x1 (:mod:`repblocks.sequences`);
* smaller and dilated kernels beside a large one (``extra_kernels``): YOLOv10's RepVGGDW, RepLKNet,
  UniRepLKNet's DilatedReparamBlock, FastViT's large-kernel conv; RepGhost's BN identity; RepViT's
  depthwise mixer (a 1x1 conv with a bias, a plain identity, a BN after the sum); YOLOv7/v9's RepConv.

``BRANCH_SETS`` names each family's branch set; :func:`resolve_branch_set` checks a name or a dict.

It takes any ``in/out_channels``, ``stride`` and ``groups`` (grouped and depthwise included), so it
drops into any backbone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from repblocks.folds import DeployForm, checked_fold, conv_probe
from repblocks.fusion import ConvBranch, equivalent_kernel_bias, fold_bn, fused_kernel_bias
from repblocks.sequences import AvgSequence, ConvSequence

__all__ = [
    "ACTIVATIONS",
    "BRANCHES",
    "BRANCH_KINDS",
    "BRANCH_MODULES",
    "BRANCH_SETS",
    "DEFAULT_BN_EPS",
    "EXTRA_KERNEL_TABLES",
    "BranchKind",
    "ConvBN",
    "RepBlock",
    "SqueezeExcite",
    "extra_kernel_pairs",
    "resolve_act",
    "resolve_branch_set",
]

ActFactory = Callable[[], nn.Module]


def _relu() -> nn.Module:
    # In place is safe: the block's sum (or fused conv output) is a fresh tensor nobody else holds.
    return nn.ReLU(inplace=True)


# Activations by name, so a config can say `act: gelu` (names as timm spells them).
ACTIVATIONS: dict[str, ActFactory] = {
    "relu": _relu,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "prelu": nn.PReLU,
    "identity": nn.Identity,
}


def resolve_act(act: str | ActFactory | None) -> ActFactory | None:
    """An activation factory from a name in :data:`ACTIVATIONS`, a factory (``nn.GELU``), or None (no activation).

    Raises:
        ValueError: An unknown name (the message lists the known ones), or a module instance
            instead of a factory (every block needs its own, or a PReLU would share its weights).
    """
    if act is None:
        return None
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; known activations: {', '.join(ACTIVATIONS)}")
        return ACTIVATIONS[act]
    if isinstance(act, nn.Module) or not callable(act):
        raise ValueError(
            f"act must be an activation name ({', '.join(ACTIVATIONS)}) or a factory such as nn.GELU, got {act!r}"
        )
    return act


def check_int(value: object, name: str, *, minimum: int) -> int:
    """``value`` if it is an int of at least ``minimum``; otherwise a one-line ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


# BatchNorm's own default. Weights trained with another eps (YOLOv6: 1e-3) need the same here: a state
# dict does not carry eps, and every BN output (and every fused kernel) depends on it.
DEFAULT_BN_EPS = 1e-5


def check_bn_eps(value: object) -> float:
    """``value`` as a float if it is a positive finite number; otherwise a one-line ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"bn_eps must be a positive number (BatchNorm's default: {DEFAULT_BN_EPS:g}), got {value!r}")
    return float(value)


class ConvBN(nn.Sequential):
    """A bias-free convolution followed by BatchNorm, padded to keep the spatial size at stride 1.

    ``kernel_size`` is an int, or ``(height, width)`` for ACNet's 1xk and kx1 (each side padded by half);
    ``dilation`` spreads the taps (UniRepLKNet), the padding growing with it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        bn_eps: float = DEFAULT_BN_EPS,
    ):
        sides = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        padding = tuple(dilation * (side // 2) for side in sides)
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            sides,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        super().__init__(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels, eps=check_bn_eps(bn_eps))))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation as in RepVGG-D2se: global pool, reduce, ReLU, expand, sigmoid gate.

    Not re-parameterizable (it depends on the input), so it survives deployment unchanged.
    """

    def __init__(self, channels: int, *, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.down = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        scale = self.up(torch.relu(self.down(scale)))
        return x * torch.sigmoid(scale)


@dataclass(frozen=True)
class BranchKind:
    """A kind of branch RepBlock may have: the keyword that asks for it, what it takes, and the modules it adds."""

    arg: str  # RepBlock's keyword argument, and a key of a branch set
    # the values that turn it on (None and False turn it off); () for num_conv_branches, an int; extra_kernels:
    # the names of EXTRA_KERNEL_TABLES (or (kernel, dilation) pairs)
    values: tuple
    modules: tuple[str, ...]  # attribute names of the modules it adds: its state-dict keys, in summation order
    same_shape: bool = False  # exists only where shapes allow: stride 1 and in_channels == out_channels


# UniRepLKNet's DilatedReparamBlock (Ding et al., CVPR 2024, https://arxiv.org/abs/2311.15599): the depthwise
# (kernel, dilation) Conv+BN branches beside its large kernel, by the large kernel's size (its kernel_sizes, dilates).
UNIREPLK_EXTRA_KERNELS: dict[int, tuple[tuple[int, int], ...]] = {
    5: ((3, 1), (3, 2)),
    7: ((5, 1), (3, 2), (3, 3)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
}
# Names `extra_kernels` may take instead of pairs: the pairs depend on the block's kernel_size, which a branch
# set does not fix (expand takes it from each conv), so RepBlock looks them up (extra_kernel_pairs).
EXTRA_KERNEL_TABLES: dict[str, dict[int, tuple[tuple[int, int], ...]]] = {"unireplk": UNIREPLK_EXTRA_KERNELS}

# Every branch of RepBlock, in the order the forward sums them: the one place branches are named.
BRANCHES = (
    # The kxk Conv+BN: one held as `conv_kxk` itself (None: RepVGG's keys), or a list of n (MobileOne's).
    BranchKind("num_conv_branches", (), ("conv_kxk",)),
    # More Conv+BNs over the input, (kernel, dilation) each, inside the kxk once dilated: a list `conv_extra`.
    BranchKind("extra_kernels", tuple(EXTRA_KERNEL_TABLES), ("conv_extra",)),
    # The 1x1: Conv+BN (RepVGG), a plain conv (QARepVGG), a conv with a bias and no BN (RepViT), or Conv+BN but
    # none in a depthwise block, groups >= out_channels (DBB's DiverseBranchBlock builds dbb_1x1 only where groups
    # < out_channels).
    BranchKind("scale_branch", ("bn", "conv", "conv_bias", "bn_unless_depthwise"), ("conv_1x1",)),
    BranchKind("asym_branches", (True,), ("conv_1xk", "conv_kx1")),  # ACNet's 1xk and kx1 Conv+BN
    BranchKind("seq_conv_branch", (True,), ("conv_1x1_kxk",)),  # DBB's 1x1 -> kxk
    BranchKind("seq_avg_branch", (True,), ("conv_1x1_avg",)),  # DBB's 1x1 -> average pool
    BranchKind("identity_branch", ("bn", "plain"), ("identity",), same_shape=True),  # a BN (RepVGG) or as is (QARepVGG)
    BranchKind("avg_pool_branch", (True,), ("avg_pool",), same_shape=True),  # QARepVGG v2's kxk average pool
    BranchKind("post_bn", (True,), ()),  # a BatchNorm after the sum: no branch, so it may stay in deploy form
)
# The keyword arguments of RepBlock that say which branches it has: what a branch set may hold.
_BRANCH_ARGS = tuple(kind.arg for kind in BRANCHES)
# The values each optional branch with more than one form may take (None: the branch is absent; extra_kernels
# also takes (kernel, dilation) pairs).
BRANCH_KINDS = {kind.arg: kind.values for kind in BRANCHES if any(isinstance(v, str) for v in kind.values)}
# A RepBlock's modules that fusion turns into ``reparam`` and that hold weights (RepBlock's pool has none).
BRANCH_MODULES = tuple(name for kind in BRANCHES for name in kind.modules if name != "avg_pool")
_BRANCH_ATTRS = tuple(name for kind in BRANCHES for name in kind.modules)

# The branches of each family's block (RepBlock's keyword arguments): the families differ in nothing else.
BRANCH_SETS: dict[str, dict] = {
    # RepVGG: kxk Conv+BN, 1x1 Conv+BN, identity BN (RepBlock's defaults).
    "repvgg": {},
    # QARepVGG (Chu et al. 2022, Table 5, as YOLOv6's QARepVGGBlock): BN only on the kxk branch, a plain
    # 1x1 conv and identity, one BN after the sum. Per-channel quantization then sees no branch whose
    # scale a BN blows up, which is what made RepVGG lose accuracy in int8.
    "qarepvgg": dict(scale_branch="conv", identity_branch="plain", post_bn=True),
    # QARepVGG v2 (YOLOv6's QARepVGGBlockV2): the same plus a kxk average pool where the identity is.
    "qarepvgg_v2": dict(scale_branch="conv", identity_branch="plain", avg_pool_branch=True, post_bn=True),
    # ACNet v1 (Ding et al. 2019, acnet/acb.py's ACBlock): kxk, 1xk and kx1 Conv+BN; no 1x1, no identity.
    "acnet": dict(scale_branch=None, identity_branch=None, asym_branches=True),
    # DBB (Ding et al. 2021, DiverseBranchBlock): kxk and 1x1 Conv+BN, 1x1 -> kxk and 1x1 -> average pool.
    "dbb": dict(scale_branch="bn_unless_depthwise", identity_branch=None, seq_conv_branch=True, seq_avg_branch=True),
    # RepGhost (Chen et al. 2022, RepGhostModule): the depthwise cheap op's kxk Conv+BN and an identity BN
    # (its fusion_bn); no 1x1.
    "repghost": dict(scale_branch=None, identity_branch="bn"),
    # YOLOv10's RepVGGDW: a 7x7 depthwise Conv+BN (the block's kernel_size=7, groups=channels) and a 3x3 one.
    "repvggdw": dict(scale_branch=None, identity_branch=None, extra_kernels=((3, 1),)),
    # YOLOv7/v9's RepConv(N): RepVGG's set, named for YOLO users (RepConvN: identity_branch=None).
    "yolo_repconv": {},
    # RepViT's RepVggDw: bn(3x3 depthwise Conv+BN + 1x1 depthwise conv with a bias + x).
    "repvit_dw": dict(scale_branch="conv_bias", identity_branch="plain", post_bn=True),
    # UniRepLKNet's DilatedReparamBlock: the large depthwise kernel and its dilated branches (UNIREPLK_EXTRA_KERNELS,
    # for kernel_size 5 to 17).
    "unireplk": dict(scale_branch=None, identity_branch=None, extra_kernels="unireplk"),
}


def extra_kernel_pairs(extra_kernels: object, kernel_size: int | None = None) -> tuple[tuple[int, int], ...]:
    """The ``(kernel, dilation)`` pairs of ``extra_kernels`` for a block of ``kernel_size``, checked.

    ``extra_kernels`` is None, pairs, or a name in :data:`EXTRA_KERNEL_TABLES` (looked up by ``kernel_size``).
    Without ``kernel_size`` (a branch set, before any block has a size) only the form is checked, and a
    name gives ``()``.

    Raises:
        ValueError: An unknown name, a name with no entry for this kernel size, or a pair that is not an
            odd kernel and a dilation >= 1 spanning at most ``kernel_size`` (``dilation * (kernel - 1) + 1``).
    """
    if extra_kernels is None:
        return ()
    if isinstance(extra_kernels, str):
        table = EXTRA_KERNEL_TABLES.get(extra_kernels)
        if table is None:
            known = ", ".join(EXTRA_KERNEL_TABLES)
            raise ValueError(f"extra_kernels must be (kernel, dilation) pairs or one of {known}, got {extra_kernels!r}")
        if kernel_size is not None and kernel_size not in table:
            sizes = ", ".join(map(str, table))
            raise ValueError(f"extra_kernels={extra_kernels!r} has branches for kernel_size {sizes}, not {kernel_size}")
        return table[kernel_size] if kernel_size is not None else ()
    pairs = tuple(tuple(pair) for pair in extra_kernels) if isinstance(extra_kernels, Sequence) else ()  # lists too
    if not pairs or any(len(pair) != 2 or not all(_is_int(v) for v in pair) for pair in pairs):
        raise ValueError(
            f"extra_kernels must be (kernel, dilation) pairs such as ((3, 1), (3, 2)) or one of "
            f"{', '.join(EXTRA_KERNEL_TABLES)}, got {extra_kernels!r}"
        )
    for kernel, dilation in pairs:
        span = dilation * (kernel - 1) + 1
        if kernel < 1 or kernel % 2 != 1 or dilation < 1 or (kernel_size is not None and span > kernel_size):
            within = f" spanning at most kernel_size {kernel_size} (dilation * (kernel - 1) + 1 = {span})"
            raise ValueError(
                f"extra_kernels ({kernel}, {dilation}) must be an odd kernel and a dilation >= 1"
                f"{within if kernel_size is not None else ''}"
            )
    return pairs


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_branch_set(branches: str | dict) -> dict:
    """The RepBlock keyword arguments of a branch set: a name in :data:`BRANCH_SETS`, or a dict of them, checked.

    Returns a new dict (changing it changes no preset).

    Raises:
        ValueError: An unknown name (the message lists the known ones), a dict with keys that name
            no branch (listed, with the ones that exist), or a value a branch cannot take.
    """
    if isinstance(branches, str):
        if branches not in BRANCH_SETS:
            raise ValueError(f"unknown branch set {branches!r}; known branch sets: {', '.join(BRANCH_SETS)}")
        return dict(BRANCH_SETS[branches])
    if not isinstance(branches, dict):
        raise ValueError(f"a branch set is a name ({', '.join(BRANCH_SETS)}) or a dict, got {branches!r}")
    unknown = [key for key in branches if key not in _BRANCH_ARGS]
    if unknown:
        raise ValueError(
            f"unknown branch set keys {', '.join(map(str, unknown))}; a branch set may hold {', '.join(_BRANCH_ARGS)}"
        )
    _check_branch_values(**branches)
    return dict(branches)


def _check_branch_values(**branches: object) -> None:
    for kind in BRANCHES:
        value = branches.get(kind.arg)
        if kind.arg == "num_conv_branches":
            if value is not None:
                check_int(value, kind.arg, minimum=1)
        elif kind.arg == "extra_kernels":
            # the shape alone; whether the kernels fit needs the block's kernel_size (extra_kernel_pairs)
            extra_kernel_pairs(value)
        elif kind.values == (True,):
            if not isinstance(value if value is not None else False, bool):
                raise ValueError(f"{kind.arg} must be True or False, got {value!r}")
        elif value is not None and value not in kind.values:
            raise ValueError(f"{kind.arg} must be one of {', '.join(kind.values)} or None, got {value!r}")


class RepBlock(nn.Module):
    """A re-parameterizable block: parallel conv branches summed, then an optional BN, SE and activation.

    The defaults are the RepVGG block: kxk Conv+BN + 1x1 Conv+BN (+ identity BN). Every combination of
    branches fuses into one kxk conv with a bias (:meth:`switch_to_deploy`), in float64 rounded once.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Convolution stride; the identity and average-pool branches exist only at stride 1
            with ``in_channels == out_channels``.
        groups: Convolution groups (``groups == in_channels`` is depthwise).
        kernel_size: Odd size of the main kernel (3 in RepVGG; MobileOne's pointwise blocks: 1).
        num_conv_branches: None for one kxk Conv+BN branch held as ``conv_kxk`` itself (RepVGG's
            keys); n for a list of n (``conv_kxk.0`` ... : MobileOne's over-parameterization, its keys).
        extra_kernels: More Conv+BN branches ``conv_extra.0``, ``conv_extra.1`` ... at the block's stride and
            groups: ``(kernel, dilation)`` pairs, each spanning at most ``kernel_size`` once dilated (YOLOv10's
            RepVGGDW: ``((3, 1),)`` in a 7x7 block), or ``"unireplk"``: UniRepLKNet's pairs for this
            ``kernel_size`` (:data:`UNIREPLK_EXTRA_KERNELS`). ``branch_config`` keeps the name, the attribute
            ``extra_kernels`` the pairs.
        scale_branch: The 1x1 branch ``conv_1x1``: ``"bn"`` for Conv+BN, ``"conv"`` for a plain conv
            without BN (QARepVGG), ``"conv_bias"`` for a conv with a bias and no BN (RepViT),
            ``"bn_unless_depthwise"`` for Conv+BN only where ``groups < out_channels``
            (DBB), None for none (MobileOne's 1x1 blocks, whose kxk branch is 1x1).
        identity_branch: The identity branch ``identity``, where shapes allow: ``"bn"`` for a BatchNorm
            of the input, ``"plain"`` for the input itself (QARepVGG), None for none.
        avg_pool_branch: Add a kxk stride-1 average pool of the input (QARepVGG v2), where shapes allow.
        asym_branches: Add a 1xk Conv+BN ``conv_1xk`` and a kx1 Conv+BN ``conv_kx1``, centred on the
            kxk's window (ACNet).
        seq_conv_branch: Add a 1x1 Conv+BN -> kxk Conv+BN sequence ``conv_1x1_kxk`` (DBB's ``dbb_1x1_kxk``,
            :class:`~repblocks.sequences.ConvSequence`).
        seq_avg_branch: Add a 1x1 Conv+BN -> kxk average pool -> BN sequence ``conv_1x1_avg`` (DBB's
            ``dbb_avg``, :class:`~repblocks.sequences.AvgSequence`), at the block's stride.
        post_bn: A BatchNorm ``post_bn`` after the branch sum (QARepVGG), before SE, so it always folds.
            (YOLOv6 applies its BN after SE, but refuses SE in these blocks: no weights differ.)
        keep_post_bn: Keep ``post_bn`` as its own module in the deploy form instead of folding it into
            the fused conv: the form quantization-aware training fine-tunes (YOLOv6 keeps it so).
        use_se: Add squeeze-excitation after the branch sum (RepVGG-D2se, MobileOne-S4).
        act: Activation: a name from :data:`ACTIVATIONS` (``"gelu"``), a factory (``nn.GELU``), or None for none.
        bn_eps: The eps of every BatchNorm of the block (1e-5, BatchNorm's default; YOLOv6's weights: 1e-3).
            A deploy-form block keeps it, to fuse train-form weights loaded into it as they were trained.
        deploy: Build only the fused convolution (for loading deploy-form weights).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        groups: int = 1,
        kernel_size: int = 3,
        num_conv_branches: int | None = None,
        extra_kernels: str | tuple[tuple[int, int], ...] | None = None,
        scale_branch: str | None = "bn",
        identity_branch: str | None = "bn",
        avg_pool_branch: bool = False,
        asym_branches: bool = False,
        seq_conv_branch: bool = False,
        seq_avg_branch: bool = False,
        post_bn: bool = False,
        keep_post_bn: bool = False,
        use_se: bool = False,
        act: str | ActFactory | None = _relu,
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
    ):
        super().__init__()
        for arg, value in dict(
            in_channels=in_channels, out_channels=out_channels, stride=stride, groups=groups
        ).items():
            check_int(value, arg, minimum=1)
        if check_int(kernel_size, "kernel_size", minimum=1) % 2 != 1:
            raise ValueError(f"kernel_size must be odd so the 1x1 branch can be centred, got {kernel_size}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.groups = groups
        self.kernel_size = kernel_size
        # What the branches are (RepBlock's keywords, named in BRANCHES): enough to rebuild this block's
        # train form (loading fuses through such a twin).
        if extra_kernels is not None and not isinstance(extra_kernels, str):  # a list from a config: hashable pairs
            extra_kernels = extra_kernel_pairs(extra_kernels, kernel_size) or None
        self.branch_config = dict(
            num_conv_branches=num_conv_branches,
            extra_kernels=extra_kernels,
            scale_branch=scale_branch,
            identity_branch=identity_branch,
            avg_pool_branch=avg_pool_branch,
            asym_branches=asym_branches,
            seq_conv_branch=seq_conv_branch,
            seq_avg_branch=seq_avg_branch,
            post_bn=post_bn,
        )
        _check_branch_values(**self.branch_config)
        self.extra_kernels = extra_kernel_pairs(extra_kernels, kernel_size)  # the pairs, a name resolved
        self.keep_post_bn = keep_post_bn
        self.bn_eps = check_bn_eps(bn_eps)
        shapes_allow = in_channels == out_channels and stride == 1
        self.has_identity = shapes_allow and identity_branch is not None

        self.reparam = None
        self._drop_branches()
        if deploy:
            self.reparam = self._fused_conv()
        else:
            for kind in BRANCHES:
                value = self.branch_config[kind.arg]
                wanted = kind.arg == "num_conv_branches" or value not in (None, False)
                if (
                    wanted
                    and kind.modules
                    and (shapes_allow or not kind.same_shape)
                    and not self._absent_here(kind.arg, value)
                ):
                    for name, module in zip(kind.modules, self._build_branch(kind.arg, value), strict=True):
                        setattr(self, name, module)
        norm = partial(nn.BatchNorm2d, eps=self.bn_eps)
        self.post_bn = norm(out_channels) if post_bn and (keep_post_bn or not deploy) else None
        self.se = SqueezeExcite(out_channels) if use_se else nn.Identity()
        act = resolve_act(act)
        self.act = act() if act is not None else nn.Identity()

    def _absent_here(self, arg: str, value: object) -> bool:
        """A branch asked for that this block's shape leaves out: DBB's 1x1 in a depthwise block."""
        return arg == "scale_branch" and value == "bn_unless_depthwise" and self.groups >= self.out_channels

    def _build_branch(self, arg: str, value: object) -> tuple[nn.Module, ...]:
        """The modules of the branch that keyword ``arg`` asks for with ``value`` (``BranchKind.modules``, in order)."""
        shape = dict(stride=self.stride, groups=self.groups, bn_eps=self.bn_eps)
        conv_bn = partial(ConvBN, self.in_channels, self.out_channels, **shape)
        k = self.kernel_size
        if arg == "num_conv_branches":
            return (conv_bn(k) if value is None else nn.ModuleList(conv_bn(k) for _ in range(value)),)
        if arg == "extra_kernels":
            return (nn.ModuleList(conv_bn(size, dilation=dilation) for size, dilation in self.extra_kernels),)
        if arg == "scale_branch":
            if value in ("bn", "bn_unless_depthwise"):
                return (conv_bn(1),)
            plain = nn.Conv2d(
                self.in_channels,
                self.out_channels,
                1,
                stride=self.stride,
                groups=self.groups,
                bias=value == "conv_bias",
            )
            return (plain,)
        if arg == "asym_branches":
            return conv_bn((1, k)), conv_bn((k, 1))
        if arg == "seq_conv_branch":
            return (ConvSequence(self.in_channels, self.out_channels, k, **shape),)
        if arg == "seq_avg_branch":
            return (AvgSequence(self.in_channels, self.out_channels, k, **shape),)
        if arg == "identity_branch":
            return (nn.BatchNorm2d(self.in_channels, eps=self.bn_eps) if value == "bn" else nn.Identity(),)
        if arg == "avg_pool_branch":
            return (nn.AvgPool2d(k, stride=1, padding=k // 2),)
        raise ValueError(f"RepBlock builds no branch for {arg!r}")  # a BranchKind added without its modules here

    def _drop_branches(self) -> None:
        """Set every branch module to None (none built yet, or fused into ``reparam``)."""
        for name in _BRANCH_ATTRS:
            setattr(self, name, None)

    @property
    def deploy(self) -> bool:
        """True once the branches have been fused into ``reparam``."""
        return self.reparam is not None

    def branches(self) -> list[nn.Module]:
        """The train-form branches summed over the input, in order (empty in deploy form)."""
        if self.reparam is not None:
            return []
        found = []
        for name in _BRANCH_ATTRS:
            module = getattr(self, name)
            found += list(module) if isinstance(module, nn.ModuleList) else [module] if module is not None else []
        return found

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam is not None:
            out = self.reparam(x)
        else:
            first, *rest = self.branches()
            out = first(x)
            for index, branch in enumerate(rest):
                # The first sum makes a fresh tensor nobody else holds; the rest can add into it in place.
                out = out + branch(x) if index == 0 else out.add_(branch(x))
        if self.post_bn is not None:
            out = self.post_bn(out)
        return self.act(self.se(out))

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """Kernel and bias of the single conv equal to the block before SE and activation, in eval mode.

        Differentiable (the RepVGG L2 penalty is taken on it) and covers every branch: identity,
        average pool and the BatchNorm after the sum included. In deploy form it returns the fused
        convolution's own parameters (with a kept ``post_bn`` folded in).
        """
        if self.reparam is not None:
            if self.post_bn is None:
                return self.reparam.weight, self.reparam.bias
            kernel, bias = fold_bn(self.reparam.weight, self.post_bn, self.reparam.bias)
            return kernel.to(self.reparam.weight.dtype), bias.to(self.reparam.weight.dtype)
        conv_branches, identity, options = self._fusion_args(fold_post_bn=True)
        return equivalent_kernel_bias(conv_branches, identity, **options)

    def kernel_parameters(self) -> list[nn.Parameter]:
        """The parameters that enter :meth:`get_equivalent_kernel_bias`'s kernel (conv kernels and BN weights).

        The RepVGG L2 penalty decays exactly these, so they are taken out of plain weight decay.
        """
        modules = [self.reparam] if self.reparam is not None else self.branches()
        modules = [*modules, self.post_bn]
        return [
            param
            for module in modules
            if module is not None
            for name, param in module.named_parameters()
            if name.endswith("weight")  # conv kernels and BN scales; BN and conv biases shift, they do not scale
        ]

    def _fusion_args(self, *, fold_post_bn: bool) -> tuple:
        conv_branches, sequences = [], []
        for branch in self.branches():
            if isinstance(branch, ConvBN):
                conv, bn = branch.conv, branch.bn
                conv_branches.append(ConvBranch(conv.weight, bn, bias=conv.bias, dilation=conv.dilation[0]))
            elif isinstance(branch, nn.Conv2d):
                conv_branches.append(ConvBranch(branch.weight, None, bias=branch.bias))
            elif isinstance(branch, (ConvSequence, AvgSequence)):
                sequences.append(branch.fusion_part())
        post_bn = self.post_bn if fold_post_bn else None
        avg_pool = self.kernel_size if self.avg_pool is not None else None
        options = {"kernel_size": self.kernel_size, "avg_pool": avg_pool, "post_bn": post_bn, "sequences": sequences}
        return conv_branches, self.identity, options

    def deploy_form(self, *, keep_post_bn: bool | None = None, verify: bool | None = None) -> DeployForm:
        """This block fused in place (:meth:`switch_to_deploy`), checked against its train form: the fold protocol.

        The check (:func:`repblocks.folds.checked_fold`) runs the block before and after on a small float64
        probe and raises :class:`~repblocks.errors.FoldError` if they differ; ``verify=False`` skips it.
        """
        keep = self.keep_post_bn if keep_post_bn is None else keep_post_bn
        if self.reparam is not None and (self.post_bn is None or keep):
            return DeployForm(self)  # nothing to fold
        weight = next(self.parameters())
        probe = conv_probe(self.in_channels, (self.kernel_size,) * 2, (self.stride,) * 2, device=weight.device)
        with checked_fold(self, verify=verify, probe=probe):
            self.switch_to_deploy(keep_post_bn)
        return DeployForm(self)

    @torch.no_grad()
    def switch_to_deploy(self, keep_post_bn: bool | None = None) -> RepBlock:
        """Replace the branches by one fused conv, in place. Calling it again does nothing.

        Args:
            keep_post_bn: Keep the BatchNorm after the sum as its own module (for quantization-aware
                training) instead of folding it; by default the block's own ``keep_post_bn``. A block
                whose ``post_bn`` was kept folds it when called with False.
        """
        keep = self.keep_post_bn if keep_post_bn is None else keep_post_bn
        if self.reparam is not None:
            if self.post_bn is not None and not keep:
                kernel, bias = self.get_equivalent_kernel_bias()
                self.reparam.weight.copy_(kernel)
                self.reparam.bias.copy_(bias)
                self.post_bn = None
            return self
        conv_branches, identity, options = self._fusion_args(fold_post_bn=not keep)
        kernel, bias = fused_kernel_bias(conv_branches, identity, **options)
        weight = conv_branches[0].kernel
        if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
            kernel = kernel.contiguous(memory_format=torch.channels_last)  # a channels_last model stays so
        requires_grad = weight.requires_grad
        fused = self._fused_conv(device="meta")  # no random init of weights about to be replaced
        fused.weight = nn.Parameter(kernel, requires_grad=requires_grad)
        fused.bias = nn.Parameter(bias, requires_grad=requires_grad)
        self.reparam = fused
        self._drop_branches()
        if not keep:
            self.post_bn = None
        return self

    def _fused_conv(self, device: str | None = None) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.kernel_size // 2,
            groups=self.groups,
            bias=True,
            device=device,
        )

    def extra_repr(self) -> str:
        branches = ", ".join(f"{key}={value}" for key, value in self.branch_config.items() if value)
        eps = f", bn_eps={self.bn_eps:g}" if self.bn_eps != DEFAULT_BN_EPS else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, {branches}{eps}, deploy={self.deploy}"
        )
