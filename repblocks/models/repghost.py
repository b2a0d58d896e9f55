"""RepGhost and GhostNetV3: ghost bottlenecks whose cheap operations are re-parameterizable blocks.

RepGhost: A Hardware-Efficient Ghost Module via Re-parameterization. Chen, Guo, Zeng, Xiong, Dong. 2022.
https://arxiv.org/abs/2211.06088; code and weights: https://github.com/ChengpengChen/RepGhost (timm re-publishes
them as ``repghostnet_*.in1k``). Its ghost module sums where GhostNet concatenates: the cheap depthwise
Conv+BN beside a BatchNorm of its own input (``fusion_bn``), which fuses into the depthwise conv. Here the
cheap operation is a RepBlock with one kxk depthwise branch and an identity BN, no 1x1.

GhostNetV3: Exploring the Training Strategies for Compact Models. Liu, Guo, Tang, Wang et al. 2024.
https://arxiv.org/abs/2404.11202; code: huawei-noah/Efficient-AI-Backbones (timm: ``ghostnetv3_100.in1k``).
GhostNet's modules trained with MobileOne's branches: the primary 1x1 conv as three 1x1 Conv+BN
branches, the cheap depthwise conv as three kxk Conv+BN branches, a 1x1 Conv+BN and an identity BN, and
the strided depthwise conv as three kxk and a 1x1 Conv+BN: each a RepBlock. From the third bottleneck on,
the first module's output is gated by GhostNetV2's "short" branch (2x2 average pool, a 1x1, a 1x5 and a
5x1 depthwise Conv+BN, sigmoid, nearest upsampling), whose non-square Conv+BN pairs fold as :class:`ConvNorm`.

Both networks: a 3x3 stride-2 stem, the bottlenecks in timm's groups (``blocks.0`` .. ``blocks.8``, a
row of the paper's table each, a strided bottleneck alone in its group), a 1x1 Conv+BN+ReLU (``blocks.9``),
then global pooling, a 1x1 conv with bias to 1280 channels, ReLU, dropout and the classifier. The groups sit
in RepNet's four stages (stride 4, 8, 16, 32) as items of the stage, 3, 2, 2 and 3 groups, so every key is
timm's but for the group's place and the RepBlock names (layouts ``timm_repghost``, ``timm_ghostnetv3``).
Every Conv+BN is a RepBlock (one kxk branch) or a ConvNorm: each folds through ``deploy_form()``, checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repblocks.blocks import BRANCH_SETS, DEFAULT_BN_EPS, ActFactory, _relu, check_bn_eps, resolve_act
from repblocks.folds import DeployForm, checked_fold
from repblocks.fusion import fuse_conv_bn
from repblocks.models.base import RepNet, imagenet_pretrained_cfg
from repblocks.online import resolve_block_mode
from repblocks.registry import register_model

__all__ = [
    "GHOSTNET_CONFIGS",
    "GROUPS_PER_STAGE",
    "ConvNorm",
    "GhostBlock",
    "GhostBottleneck",
    "GhostHead",
    "GhostNetConfig",
    "RepGhostNet",
    "conv_bn_factories",
]


@dataclass(frozen=True)
class GhostBlock:
    """One row of the papers' tables: a ghost bottleneck before the width multiplier."""

    kernel_size: int  # the depthwise kernel of the strided conv and of the projection shortcut
    expansion: int  # channels between the two ghost modules
    channels: int  # output channels
    se_ratio: float  # squeeze-excitation's reduction (0: none)
    stride: int


_B = GhostBlock
# Stages of groups of bottlenecks (timm's blocks.0 .. blocks.8); the final 1x1 conv is the last stage's last group.
REPGHOST_STAGES = (
    ((_B(3, 8, 16, 0, 1),), (_B(3, 24, 24, 0, 2),), (_B(3, 36, 24, 0, 1),)),
    ((_B(5, 36, 40, 0.25, 2),), (_B(5, 60, 40, 0.25, 1),)),
    (
        (_B(3, 120, 80, 0, 2),),
        (
            _B(3, 100, 80, 0, 1),
            _B(3, 120, 80, 0, 1),
            _B(3, 120, 80, 0, 1),
            _B(3, 240, 112, 0.25, 1),
            _B(3, 336, 112, 0.25, 1),
        ),
    ),
    ((_B(5, 336, 160, 0.25, 2),), tuple(_B(5, 480, 160, se, 1) for se in (0, 0.25, 0, 0.25))),
)
GHOSTNET_STAGES = (
    ((_B(3, 16, 16, 0, 1),), (_B(3, 48, 24, 0, 2),), (_B(3, 72, 24, 0, 1),)),
    ((_B(5, 72, 40, 0.25, 2),), (_B(5, 120, 40, 0.25, 1),)),
    (
        (_B(3, 240, 80, 0, 2),),
        (
            _B(3, 200, 80, 0, 1),
            _B(3, 184, 80, 0, 1),
            _B(3, 184, 80, 0, 1),
            _B(3, 480, 112, 0.25, 1),
            _B(3, 672, 112, 0.25, 1),
        ),
    ),
    ((_B(5, 672, 160, 0.25, 2),), tuple(_B(5, 960, 160, se, 1) for se in (0, 0.25, 0, 0.25))),
)
# Groups per stage, the final conv's included: how timm's blocks.N map to our stages.i.j (repblocks.layouts).
GROUPS_PER_STAGE = (3, 2, 2, 3)


def _first_blocks(stages: tuple, count: int) -> tuple:
    """The same stages and groups with at most ``count`` bottlenecks a group: the tiny variants."""
    return tuple(tuple(group[:count] for group in stage) for stage in stages)


@dataclass(frozen=True)
class GhostNetConfig:
    """Architecture of one RepGhost or GhostNetV3 variant, and the images its published weights expect."""

    width: float  # the papers' width multiplier of every layer but the head's 1280
    version: str = "repghost"  # "repghost" (RepGhost's modules) or "v3" (GhostNetV3's)
    stages: tuple = REPGHOST_STAGES  # stages of groups of GhostBlock rows
    final_expansion: float = 2.0  # the final 1x1 conv: last row's expansion x width x this (GhostNetV3: 1)
    head_channels: int = 1280  # the 1x1 conv with bias before the classifier
    image_size: int = 224  # side of the images the weights were evaluated at
    crop_pct: float = 0.875  # evaluation: resize to image_size / crop_pct, then centre-crop image_size
    timm_tag: str | None = "in1k"  # timm publishes the weights as "<name>.<tag>"; None where none

    def channels(self, base: float) -> int:
        return make_divisible(base * self.width, 4)

    @property
    def stem_channels(self) -> int:
        return self.channels(16)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        widths = [self.channels(stage[-1][-1].channels) for stage in self.stages]
        widths[-1] = self.final_channels
        return tuple(widths)

    @property
    def final_channels(self) -> int:
        return self.channels(self.stages[-1][-1][-1].expansion * self.final_expansion)


def make_divisible(value: float, divisor: int) -> int:
    """``value`` rounded to a multiple of ``divisor``, never more than 10% down (the TF MobileNet rule both codes use)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


_V3 = dict(version="v3", stages=GHOSTNET_STAGES, final_expansion=1.0)
_TINY = dict(stages=_first_blocks(REPGHOST_STAGES, 1), head_channels=64, image_size=32, crop_pct=1.0, timm_tag=None)
GHOSTNET_CONFIGS: dict[str, GhostNetConfig] = {
    "repghostnet_050": GhostNetConfig(0.5),
    "repghostnet_058": GhostNetConfig(0.58),
    "repghostnet_080": GhostNetConfig(0.8),
    "repghostnet_100": GhostNetConfig(1.0),
    "ghostnetv3_100": GhostNetConfig(1.0, **_V3),
    # For tests and smoke runs: every kind of bottleneck (strided, SE, identity and projection shortcuts,
    # GhostNetV3's gated modules) in a few ms on 32x32 images.
    "repghostnet_tiny": GhostNetConfig(0.25, **_TINY),
    "ghostnetv3_tiny": GhostNetConfig(0.25, **{**_TINY, **_V3, "stages": _first_blocks(GHOSTNET_STAGES, 1)}),
}


class ConvNorm(nn.Module):
    """A bias-free conv of any kernel shape and a BatchNorm, folded into one conv by :meth:`deploy_form`.

    For GhostNetV3's 1x5 and 5x1 depthwise Conv+BN pairs, which no RepBlock (square kernels) holds.
    Keys: ``conv.weight`` and ``bn.*``; deploy form: ``conv.weight`` and ``conv.bias``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        *,
        groups: int = 1,
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
    ):
        super().__init__()
        padding = tuple(side // 2 for side in kernel_size)
        self.bn_eps = bn_eps
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, groups=groups, bias=deploy)
        self.bn = None if deploy else nn.BatchNorm2d(out_channels, eps=check_bn_eps(bn_eps))

    @property
    def deploy(self) -> bool:
        return self.bn is None

    def train_form(self) -> ConvNorm:
        """An empty twin in train form, on the CPU: what ``load_weights`` fuses train-form weights through."""
        conv = self.conv
        with torch.device("meta"):  # no init of weights about to be loaded
            twin = ConvNorm(
                conv.in_channels, conv.out_channels, conv.kernel_size, groups=conv.groups, bn_eps=self.bn_eps
            )
        return twin.to_empty(device="cpu")

    def switch_to_deploy(self) -> ConvNorm:
        """The BatchNorm folded into the conv, in place (unchecked: :meth:`deploy_form` checks)."""
        if self.bn is not None:
            with torch.no_grad():
                kernel, bias = fuse_conv_bn(self.conv, self.bn)
            self.conv.weight = nn.Parameter(kernel, requires_grad=self.conv.weight.requires_grad)
            self.conv.bias = nn.Parameter(bias, requires_grad=self.conv.weight.requires_grad)
            self.bn = None
        return self

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return x if self.bn is None else self.bn(x)

    def deploy_form(self, *, keep_post_bn: bool | None = None, verify: bool | None = None) -> DeployForm:
        """The BatchNorm folded into the conv, in place, checked (the fold protocol of :mod:`repblocks.folds`)."""
        if self.bn is not None:
            with checked_fold(self, verify=verify):
                self.switch_to_deploy()
        return DeployForm(self)


class GhostSqueezeExcite(nn.Module):
    """Both codes' squeeze-excitation: pool, 1x1 conv with bias, ReLU, 1x1 conv with bias, hard sigmoid gate."""

    def __init__(self, channels: int, ratio: float):
        super().__init__()
        reduced = make_divisible(channels * ratio, 4)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))  # (B, C, 1, 1)
        return x * F.hardsigmoid(scale)


class RepGhostModule(nn.Module):
    """RepGhost's module: a 1x1 Conv+BN(+act), then its cheap operation, a depthwise Conv+BN beside an identity BN."""

    def __init__(self, in_channels: int, out_channels: int, *, act: ActFactory | None, block: partial):
        super().__init__()
        self.primary_conv = block(in_channels, out_channels, kernel_size=1, act=act)
        branches = BRANCH_SETS["repghost"]  # the depthwise kxk Conv+BN beside an identity BN
        self.cheap_operation = block(
            out_channels, out_channels, kernel_size=3, groups=out_channels, act=act, **branches
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.cheap_operation(self.primary_conv(x))


class GhostModuleV3(nn.Module):
    """GhostNetV3's module: three 1x1 branches make half the channels, MobileOne's depthwise block the other half.

    With ``gated``, the output is multiplied by GhostNetV2's short branch of the module's input.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, act: ActFactory | None, gated: bool, block: partial, norm: partial
    ):
        super().__init__()
        self.out_channels = out_channels
        half = math.ceil(out_channels / 2)
        self.primary_conv = block(in_channels, half, kernel_size=1, num_conv_branches=3, act=act)
        self.cheap_operation = block(
            half,
            half,
            kernel_size=3,
            groups=half,
            num_conv_branches=3,
            scale_branch="bn",
            identity_branch="bn",
            act=act,
        )
        self.short_conv = None
        if gated:
            self.short_conv = nn.Sequential(
                block(in_channels, out_channels, kernel_size=1, act=None),
                norm(out_channels, out_channels, (1, 5), groups=out_channels),
                norm(out_channels, out_channels, (5, 1), groups=out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        primary = self.primary_conv(x)
        out = torch.cat([primary, self.cheap_operation(primary)], dim=1)  # (B, 2 * ceil(C / 2), H, W)
        if self.short_conv is None:
            return out
        # Ops that would be no-ops (a slice of every channel, a 1x1 pool, a resize to the same size) are left out:
        # exported, they are aliases, which Core ML's converter refuses.
        if out.shape[1] != self.out_channels:  # an odd width: ceil(C / 2) twice is one channel too many
            out = out[:, : self.out_channels]
        # timm's 2x2 pool; a side of 1 pixel (where timm's pool fails) is taken as it is.
        window = (min(2, x.shape[-2]), min(2, x.shape[-1]))
        if window != (1, 1):
            x = F.avg_pool2d(x, kernel_size=window, stride=window)
        gate = torch.sigmoid(self.short_conv(x))
        if gate.shape[-2:] != out.shape[-2:]:
            gate = F.interpolate(gate, size=out.shape[-2:], mode="nearest")
        return out * gate


def conv_bn_factories(
    *, act: ActFactory | None = _relu, bn_eps: float = DEFAULT_BN_EPS, deploy: bool = False, block_mode: str = "offline"
) -> tuple[partial, partial]:
    """How a network of this family builds a Conv+BN: a RepBlock with its one kxk branch (the branches a module
    adds are keywords of its call), and a :class:`ConvNorm` for the non-square kernels."""
    block = partial(
        resolve_block_mode(block_mode), scale_branch=None, identity_branch=None, act=act, bn_eps=bn_eps, deploy=deploy
    )
    return block, partial(ConvNorm, bn_eps=bn_eps, deploy=deploy)


class GhostBottleneck(nn.Module):
    """A ghost module, a strided depthwise Conv+BN where the block strides, SE, a linear ghost module, a shortcut.

    Args:
        in_channels: Input channels.
        row: The bottleneck (kernel, expansion, channels, SE, stride) before ``width``.
        width: The network's width multiplier.
        version: ``"repghost"`` (RepGhost's modules) or ``"v3"`` (GhostNetV3's).
        gated: GhostNetV3: gate the first module with the short branch.
        act: The activation of the first module (both codes: ReLU).
        bn_eps, deploy, block_mode: As the network's.
    """

    def __init__(
        self,
        in_channels: int,
        row: GhostBlock,
        *,
        width: float = 1.0,
        version: str = "repghost",
        gated: bool = False,
        act: ActFactory | None = _relu,
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
        block_mode: str = "offline",
    ):
        super().__init__()
        if version not in ("repghost", "v3"):
            raise ValueError(f"version must be 'repghost' or 'v3', got {version!r}")
        block, norm = conv_bn_factories(act=act, bn_eps=bn_eps, deploy=deploy, block_mode=block_mode)
        mid, out = make_divisible(row.expansion * width, 4), make_divisible(row.channels * width, 4)
        k, stride = row.kernel_size, row.stride
        if version == "v3":
            module = partial(GhostModuleV3, block=block, norm=norm)
            self.ghost1 = module(in_channels, mid, act=act, gated=gated)
            self.ghost2 = module(mid, out, act=None, gated=False)
            strided = dict(num_conv_branches=3, scale_branch="bn")
        else:
            self.ghost1 = RepGhostModule(in_channels, mid, act=act, block=block)
            self.ghost2 = RepGhostModule(mid, out, act=None, block=block)
            strided = {}
        dw = dict(kernel_size=k, stride=stride, act=None)
        self.conv_dw = block(mid, mid, groups=mid, **dw, **strided) if stride > 1 else None
        self.se = GhostSqueezeExcite(mid, row.se_ratio) if row.se_ratio > 0 else None
        self.shortcut = nn.Identity()
        if in_channels != out or stride > 1:
            self.shortcut = nn.Sequential(
                block(in_channels, in_channels, groups=in_channels, **dw),
                block(in_channels, out, kernel_size=1, act=None),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.ghost1(x)
        if self.conv_dw is not None:
            out = self.conv_dw(out)
        if self.se is not None:
            out = self.se(out)
        return self.ghost2(out) + self.shortcut(x)


class GhostHead(nn.Module):
    """Global average pool, a 1x1 conv with bias, the activation, dropout and the classifier (``fc``)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, *, act: ActFactory, drop_rate: float):
        super().__init__()
        self.hidden = hidden
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(in_features, hidden, 1)
        self.act = act()
        self.drop = nn.Dropout(drop_rate)
        self.reset(num_classes)

    def reset(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.act(self.conv_head(self.pool(x))).flatten(1))  # (B, hidden)
        return x if pre_logits else self.fc(x)


def _pretrained_cfg(name: str, cfg: GhostNetConfig) -> dict:
    """timm's ``pretrained_cfg`` keys for a variant: what its weights are and how they expect images."""
    return imagenet_pretrained_cfg(
        name,
        tag=cfg.timm_tag,
        image_size=cfg.image_size,
        crop_pct=cfg.crop_pct,
        interpolation="bicubic",
        first_conv="stem.conv_kxk.conv",  # deploy form: stem.reparam
    )


class RepGhostNet(RepNet):
    """RepGhostNet or GhostNetV3 classifier or backbone.

    Feature levels: 0 = the stem (stride 2), 1-4 = the four stages (stride 4, 8, 16, 32). The head differs
    from RepNet's (a 1x1 conv to ``head_hidden_size`` channels before the classifier), so ``forward_head(x,
    pre_logits=True)`` gives ``head_hidden_size`` features, as timm's.

    Args:
        cfg: The architecture (a row of ``GHOSTNET_CONFIGS``).
        num_classes: Classifier outputs; 0 keeps the head's pre-logit features.
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier (both codes train with 0.2).
        act: Activation of the blocks and of the head (both codes: ReLU); SE keeps its ReLU.
        bn_eps: The eps of every BatchNorm.
        deploy: Build the plain deploy form directly.
        block_mode: ``"offline"`` or ``"online"`` (OREPA's training form of every RepBlock).
        features_only: A backbone: no head, no stages past the last level in ``out_indices``.
        out_indices: With ``features_only``, the levels to return.
    """

    def __init__(
        self,
        cfg: GhostNetConfig,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.2,
        act: str | ActFactory | None = _relu,
        bn_eps: float = DEFAULT_BN_EPS,
        deploy: bool = False,
        block_mode: str = "offline",
        features_only: bool = False,
        out_indices: int | Sequence[int] | None = None,
    ):
        super().__init__(
            (cfg.stem_channels, *cfg.stage_channels),
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=drop_rate,
            features_only=features_only,
            out_indices=out_indices,
        )
        self.cfg = cfg
        self.bn_eps = bn_eps
        act = resolve_act(act) or nn.Identity
        options = dict(act=act, bn_eps=bn_eps, deploy=deploy, block_mode=block_mode)
        block, _ = conv_bn_factories(**options)
        stem = block(in_chans, cfg.stem_channels, stride=2)
        bottleneck = partial(GhostBottleneck, width=cfg.width, version=cfg.version, **options)
        stages, channels, index = [], cfg.stem_channels, 0
        for stage_idx, stage in enumerate(cfg.stages[: self.num_stages_to_build]):
            groups = []
            for group in stage:
                bottlenecks = []
                for row in group:
                    # GhostNetV3 gates the first module from the third bottleneck on (timm's layer_idx > 1).
                    bottlenecks.append(bottleneck(channels, row, gated=index > 1))
                    channels, index = cfg.channels(row.channels), index + 1
                groups.append(nn.Sequential(*bottlenecks))
            if stage_idx == len(cfg.stages) - 1:
                groups.append(nn.Sequential(block(channels, cfg.final_channels, kernel_size=1)))
            stages.append(nn.Sequential(*groups))
        self._assemble(stem, stages)
        self.head_hidden_size = cfg.head_channels
        if self.head is not None:
            self.head = GhostHead(self.num_features, cfg.head_channels, num_classes, act=act, drop_rate=drop_rate)


for _name, _cfg in GHOSTNET_CONFIGS.items():
    register_model(_name, partial(RepGhostNet, _cfg), pretrained_cfg=_pretrained_cfg(_name, _cfg))
